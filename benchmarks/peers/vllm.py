"""vLLM's own ``merge_attn_states`` without vLLM: its CUDA op built with nvcc, its Python files
on small stand-ins of the rest of vLLM.

vLLM is not installed where the benchmarks run. ``fetch_vllm.py`` exports vLLM's merge into
``.peers/vllm`` (or ``$ATTNMERGE_VLLM_PEER``): the CUDA source
``csrc/attention/merge_attn_states.cu`` with the headers it includes, the dispatcher
``vllm/v1/attention/ops/merge_attn_states.py`` and the Triton kernel
``vllm/v1/attention/ops/triton_merge_attn_states.py``. This module

* builds the CUDA op: nvcc (``$NVCC``, ``PATH`` or ``/usr/local/cuda/bin``; host compiler
  ``$CUDAHOSTCXX`` or nvcc's default) compiles vLLM's ``.cu`` and our
  ``vllm_merge_binding.cpp``, which registers vLLM's host function with vLLM's schema as
  ``torch.ops.vllm_peer.merge_attn_states``, against the installed torch's headers (vLLM's
  flags: ``-O3``, C++20, torch's stable ABI at 2.11, FP8 on) and links them with torch's
  libraries into a shared library, cached under ``$ATTNMERGE_PEERS_CACHE`` (default
  ``/tmp/attnmerge-peers``) and keyed by the sources, the flags, nvcc, the GPU
  architecture and torch's version. No ninja, no CMake. Where the CUDA toolkit has no
  cuBLAS headers (vLLM's ``torch_utils.h`` includes ``cublas_v2.h`` for a handle type the
  merge never uses), a one-line ``cublas_v2.h`` of ours declares that type;
* writes a stand-in ``vllm`` package into the same cache: vLLM's two Python files
  unchanged, and ours for what they (and vLLM's test of the merge) import from vLLM:
  ``vllm.platforms.current_platform`` (an NVIDIA GPU where torch has one, else the CPU,
  as vLLM's platforms detect them), ``vllm.triton_utils`` (Triton itself),
  ``vllm._custom_ops.merge_attn_states`` (the built op, loaded on first call, passed its
  arguments in the order vLLM's wrapper passes them) and
  ``vllm._custom_ops.scaled_fp8_quant`` (static per-tensor FP8 in torch, the one use in
  vLLM's test). On an NVIDIA GPU vLLM's dispatcher thus takes the path it takes in vLLM:
  the CUDA op for float32/float16/bfloat16 inputs whose head size is a multiple of 16
  bytes, its Triton kernel otherwise; on a CPU its torch code. Writing the package checks
  that every name the vLLM files import from ``vllm`` is provided (``vllm.platforms.rocm``
  excepted: the dispatcher imports it only on ROCm), so that a later vLLM fails here, not
  in a benchmark.

With the package's folder on ``PYTHONPATH``, ``vllm.v1.attention.ops.merge_attn_states``
and ``...triton_merge_attn_states`` import as in vLLM (``attnmerge bench``'s provider
``vllm``, ``benchmarks/grid.py``'s ``vllm-triton``)::

    export PYTHONPATH="$(python -m benchmarks.peers.vllm --print-path):$PYTHONPATH"
    python -m benchmarks.peers.vllm --build --arch sm_90a   # no GPU needed

``--print-path`` builds for the GPU (or ``--arch``) unless cached; without a GPU and
without ``--arch`` it writes the package without the CUDA op (its Triton and torch paths
work, the op raises when called). Without a CUDA build of torch the library links but
cannot load (torch's CUDA library is missing): ``--build`` then only checks that vLLM's
``.cu`` and the binding compile and link.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.peers import fetch_vllm
from benchmarks.peers.flashinfer import default_arch, nvcc

HERE = Path(__file__).resolve().parent
BINDING = HERE / "vllm_merge_binding.cpp"
PEER = Path(os.environ.get("ATTNMERGE_VLLM_PEER", fetch_vllm.DEST))
CACHE = Path(os.environ.get("ATTNMERGE_PEERS_CACHE", "/tmp/attnmerge-peers"))
NAMESPACE = "vllm_peer"  # torch.ops.vllm_peer.merge_attn_states (vllm_merge_binding.cpp)
# vLLM's CMake build of its stable-ABI library: Release (-O3 -DNDEBUG), C++20, torch's
# COMMON_NVCC_FLAGS less the half-conversion switches (CUDA >= 12), ENABLE_FP8, USE_CUDA
# (the CUDA entries of torch's C shim) and the oldest torch it targets (2.11)
FLAGS = (
    "-O3",
    "-DNDEBUG",
    "-std=c++20",
    "--expt-relaxed-constexpr",
    "-DENABLE_FP8",
    "-DUSE_CUDA",
    "-DTORCH_TARGET_VERSION=0x020B000000000000ULL",
    "-Xcompiler",
    "-fPIC",
)
LIBRARIES = ("c10", "torch", "torch_cpu", "c10_cuda", "torch_cuda")  # those torch has
CUBLAS_SHIM = (
    "// Written by attnmerge's benchmarks/peers/vllm.py where the CUDA toolkit has no cuBLAS\n"
    "// headers: vLLM's torch_utils.h names this handle type, which the merge never uses.\n"
    "#pragma once\ntypedef struct cublasContext* cublasHandle_t;\n"
)


# --- building the CUDA op -------------------------------------------------------------


def host_compiler() -> list[str]:
    found = os.environ.get("CUDAHOSTCXX")
    return ["-ccbin", found] if found else []


def cublas_shim() -> Path | None:
    """A folder with our ``cublas_v2.h`` where nvcc's toolkit has none, else None."""
    home = Path(nvcc()).resolve().parents[1]
    if any(home.glob("include/cublas_v2.h")) or any(home.glob("targets/*/include/cublas_v2.h")):
        return None
    folder = CACHE / "vllm-cublas-shim"
    header = folder / "cublas_v2.h"
    if not header.is_file() or header.read_text() != CUBLAS_SHIM:
        folder.mkdir(parents=True, exist_ok=True)
        part = folder / f"cublas_v2.h.{os.getpid()}"
        part.write_text(CUBLAS_SHIM)
        os.replace(part, header)
    return folder


def torch_libraries() -> tuple[list[str], list[str]]:
    """torch's library folders and those of ``LIBRARIES`` they hold (CPU builds of torch
    have no ``c10_cuda``, ``torch_cuda``)."""
    from torch.utils.cpp_extension import library_paths

    folders = library_paths()
    names = [n for n in LIBRARIES if any((Path(d) / f"lib{n}.so").exists() for d in folders)]
    return folders, names


def commands(out: Path, arch: str, peer: Path = PEER) -> list[list[str]]:
    """The two compiles (vLLM's ``.cu``, our binding, to objects next to ``out``) and the
    link into ``out``."""
    from torch.utils.cpp_extension import include_paths

    shim = cublas_shim()
    includes = ["-I", str(peer / fetch_vllm.INCLUDE_ROOT)]
    for folder in [*include_paths(), *([shim] if shim else [])]:
        includes += ["-I", str(folder)]
    compile_ = [nvcc(), *host_compiler(), f"-arch={arch}", *FLAGS, *includes, "-c"]
    kernel, binding = out.with_suffix(".kernel.o"), out.with_suffix(".binding.o")
    folders, names = torch_libraries()
    link = [nvcc(), *host_compiler(), f"-arch={arch}", "-shared", str(kernel), str(binding)]
    for folder in folders:
        link += ["-L", folder, "-Xlinker", f"-rpath={folder}"]
    link += [f"-l{n}" for n in names] + ["-o", str(out)]
    return [
        [*compile_, str(peer / fetch_vllm.KERNEL), "-o", str(kernel)],
        [*compile_, str(BINDING), "-o", str(binding)],
        link,
    ]


def library_path(arch: str, peer: Path = PEER) -> Path:
    """Where the op's library of these sources, flags, nvcc and torch is cached."""
    csrc = peer / fetch_vllm.INCLUDE_ROOT
    if not (peer / fetch_vllm.KERNEL).is_file():
        raise FileNotFoundError(
            f"no vLLM sources in {peer}: run benchmarks/peers/fetch_vllm.py "
            "(and carry .peers to this machine)"
        )
    key = hashlib.sha256(BINDING.read_bytes())
    for p in sorted(csrc.rglob("*")):
        if p.is_file():
            key.update(str(p.relative_to(csrc)).encode() + p.read_bytes())
    shim = cublas_shim()
    key.update(" ".join([nvcc(), *host_compiler(), arch, *FLAGS, str(shim)]).encode())
    key.update(f"torch {torch.__version__} {torch.version.cuda} {torch_libraries()}".encode())
    return CACHE / f"vllm_merge-{arch}-{key.hexdigest()[:16]}.so"


def build(arch: str, peer: Path = PEER, log=sys.stderr) -> Path:
    """Compile and link the op's library unless cached; returns its path."""
    path = library_path(arch, peer)
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        *compiles, link = commands(Path(tmp) / path.name, arch, peer)
        t0 = time.perf_counter()
        for cmd in compiles:
            print(f"vllm: {' '.join(cmd)}", file=log, flush=True)
        pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
        running = [subprocess.Popen(c, **pipe) for c in compiles]  # in parallel
        outputs = [(p.communicate()[0].decode(errors="replace"), p.returncode) for p in running]
        for output, rc in outputs:
            if rc:
                raise RuntimeError(f"nvcc failed ({rc}):\n{output[-4000:]}")
        print(f"vllm: {' '.join(link)}", file=log, flush=True)
        done = subprocess.run(link, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"linking failed ({done.returncode}):\n{done.stderr[-4000:]}")
        os.replace(Path(tmp) / path.name, path)  # atomic: concurrent builders agree
    print(f"vllm: built {path} in {time.perf_counter() - t0:.0f} s", file=log)
    if "torch_cuda" not in torch_libraries()[1]:
        print("vllm: torch here has no CUDA library: the op links but cannot load", file=log)
    return path


# --- the stand-in vllm package --------------------------------------------------------

_INIT = '''"""A stand-in for vLLM, written by attnmerge's benchmarks/peers/vllm.py: vLLM {version}'s
merge_attn_states (its dispatcher and Triton kernel, unchanged, and its CUDA op, built
alone) on small stand-ins of the rest of vLLM. Not vLLM: nothing else is here."""

__version__ = "{version}"
STANDIN = True
'''

_PLATFORMS = '''"""Stand-in for vllm.platforms: what vLLM's merge files and its test ask of
``current_platform``, answered as vLLM's platforms answer on an NVIDIA GPU (where torch
is a CUDA build and sees a GPU) or on a CPU (anywhere else)."""

import torch


class _Platform:
    def __init__(self) -> None:
        gpu = torch.version.cuda is not None and torch.cuda.is_available()
        self.device_type = "cuda" if gpu else "cpu"

    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    def is_cuda_alike(self) -> bool:
        return self.is_cuda()

    def is_rocm(self) -> bool:
        return False

    def is_xpu(self) -> bool:
        return False

    def is_cpu(self) -> bool:
        return self.device_type == "cpu"

    def fp8_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    def get_device_name(self, device_id: int = 0) -> str:
        return torch.cuda.get_device_name(device_id) if self.is_cuda() else "cpu"


current_platform = _Platform()
'''

_TRITON_UTILS = '''"""Stand-in for vllm.triton_utils: Triton itself."""

import triton
import triton.language as tl

HAS_TRITON = True
'''

_CUSTOM_OPS = '''"""Stand-in for vllm._custom_ops: vLLM's CUDA merge, built from its source by
attnmerge's benchmarks/peers/vllm.py (torch.ops.{namespace}.merge_attn_states, vLLM's
schema), and the FP8 quantisation that vLLM's test of the merge uses."""

import functools

import torch

from vllm.platforms import current_platform

LIBRARY = {library!r}  # None: written without the op (no GPU, no --arch)


@functools.cache
def _ops():
    if LIBRARY is None:
        raise RuntimeError(
            "this stand-in vllm was written without vLLM's CUDA op: "
            "python -m benchmarks.peers.vllm --print-path on a GPU machine builds it"
        )
    torch.ops.load_library(LIBRARY)
    return torch.ops.{namespace}


def merge_attn_states(
    output,
    prefix_output,
    prefix_lse,
    suffix_output,
    suffix_lse,
    output_lse=None,
    prefill_tokens_with_context=None,
    output_scale=None,
) -> None:
    _ops().merge_attn_states(
        output,
        output_lse,
        prefix_output,
        prefix_lse,
        suffix_output,
        suffix_lse,
        prefill_tokens_with_context,
        output_scale,
    )


def scaled_fp8_quant(input, scale=None, num_token_padding=None, scale_ub=None,
                     use_per_token_if_dynamic=False, output=None, group_shape=None):
    """Static per-tensor FP8 (``scale`` of one element) of a 2-D ``input``, in torch: the
    value times 1 / scale (0 for a zero scale), clamped to the FP8 range, rounded.
    Returns (FP8 tensor, scale) as vLLM's does; other modes are not stood in for."""
    if scale is None or scale.numel() != 1 or num_token_padding or output is not None:
        raise NotImplementedError("the stand-in does static per-tensor FP8 only")
    assert input.ndim == 2
    dtype = current_platform.fp8_dtype()
    limit = torch.finfo(dtype).max
    inverse = torch.where(scale == 0, 0.0, 1.0 / scale.float())
    return (input.float() * inverse).clamp(-limit, limit).to(dtype), scale
'''

#: vLLM's files in the package, unchanged (paths inside the peer folder and the package)
REAL = fetch_vllm.PYTHON
#: modules vLLM's files import only on platforms the stand-in never claims to be
UNUSED_HERE = frozenset({"vllm.platforms.rocm"})


def standin_sources(library: Path | None, version: str) -> dict[str, str]:
    """Our modules of the package: path -> text."""
    values = {"version": version, "library": None if library is None else str(library)}
    values["namespace"] = NAMESPACE
    return {
        "vllm/__init__.py": _INIT.format(**values),
        "vllm/platforms/__init__.py": _PLATFORMS,
        "vllm/triton_utils/__init__.py": _TRITON_UTILS,
        "vllm/_custom_ops.py": _CUSTOM_OPS.format(**values),
        "vllm/v1/__init__.py": "",
        "vllm/v1/attention/__init__.py": "",
        "vllm/v1/attention/ops/__init__.py": "",
    }


def _module(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def _defined(text: str) -> set[str]:
    """The top-level names a module's text binds."""
    names: set[str] = set()
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def missing_imports(package: dict[str, str], importers: dict[str, str]) -> list[str]:
    """What the ``importers`` (path -> text) import from ``vllm`` that ``package`` (path ->
    text, every module of the stand-in) lacks, as ``module`` or ``module.name``; also the
    attributes of ``current_platform`` that its stand-in class lacks."""
    modules = {_module(p): _defined(t) for p, t in package.items()}
    platform = modules.get("vllm.platforms", set())
    for node in ast.walk(ast.parse(package.get("vllm/platforms/__init__.py", ""))):
        if isinstance(node, ast.FunctionDef):
            platform.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            platform.add(node.attr)
    missing: list[str] = []
    for path, text in importers.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                wanted = [(node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                wanted = [(a.name, None) for a in node.names]
            else:
                continue
            for module, name in wanted:
                if module.split(".")[0] != "vllm" or module in UNUSED_HERE:
                    continue
                if module not in modules:
                    missing.append(f"{path}: {module}")
                elif name is not None and name not in modules[module] and name != "*":
                    missing.append(f"{path}: {module}.{name}")
        for attribute in sorted(set(re.findall(r"current_platform\.(\w+)", text))):
            if attribute not in platform:
                missing.append(f"{path}: current_platform.{attribute}")
    return missing


def write_standin(
    library: Path | None, peer: Path = PEER, importers: dict[str, str] | None = None
) -> Path:
    """Write (unless written) the stand-in package for ``library`` (None: without the CUDA
    op); returns the folder to put on ``PYTHONPATH``. ``importers``: more files (name ->
    text) whose ``vllm`` imports the package must serve (vLLM's test, as rewritten)."""
    if not all((peer / p).is_file() for p in REAL):
        raise FileNotFoundError(
            f"no vLLM files in {peer}: run benchmarks/peers/fetch_vllm.py "
            "(and carry .peers to this machine)"
        )
    version = fetch_vllm.read_record(peer)["version"] if (peer / "SOURCE").exists() else "?"
    files = standin_sources(library, version)
    files.update({p: (peer / p).read_text() for p in REAL})
    missing = missing_imports(files, {**{p: files[p] for p in REAL}, **(importers or {})})
    if missing:
        raise ImportError(
            "vLLM's files import what the stand-in vllm lacks (another vLLM release?): "
            + "; ".join(missing)
        )
    key = hashlib.sha256()
    for path in sorted(files):
        key.update(path.encode() + b"\0" + files[path].encode() + b"\0")
    folder = CACHE / f"vllm-standin-{key.hexdigest()[:16]}"
    if (folder / "vllm" / "__init__.py").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix="vllm-standin-"))
    for path, text in files.items():
        (tmp / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp / path).write_text(text)
    try:
        os.replace(tmp, folder)
    except OSError:  # written meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def standin(arch: str | None = None, peer: Path = PEER, importers=None, log=sys.stderr) -> Path:
    """The stand-in package's folder, the op built first for ``arch`` (default: the GPU's;
    without a GPU and ``arch``, the package is written without the op)."""
    if arch is None and torch.cuda.is_available():
        arch = default_arch()
    if arch is None:
        print("vllm: no GPU and no --arch: the stand-in has no CUDA op", file=log)
    library = build(arch, peer, log) if arch else None
    return write_standin(library, peer, importers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="store_true", help="build (or find) the op's library")
    parser.add_argument(
        "--print-path",
        action="store_true",
        help="build if needed, write the stand-in vllm package, print the folder for PYTHONPATH",
    )
    parser.add_argument("--arch", help="e.g. sm_90a (default: the current GPU's)")
    parser.add_argument("--peer", type=Path, default=PEER, help=f"vLLM's files ({PEER})")
    args = parser.parse_args(argv)
    if not (args.build or args.print_path):
        parser.error("nothing to do: --build and/or --print-path")
    if args.build and not (args.arch or torch.cuda.is_available()):
        parser.error("no GPU here: --build needs --arch (e.g. sm_90a)")
    if args.build:
        print(build(args.arch or default_arch(), args.peer))
    if args.print_path:
        print(standin(args.arch, args.peer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
