"""FlashInfer's K-way merge kernels, built from its headers, callable on torch tensors.

``flashinfer_merge.cu`` (ours) instantiates FlashInfer's ``MergeStates`` and
``VariableLengthMergeStates`` (``include/flashinfer/attention/cascade.cuh``) behind a C
interface; this module compiles it with nvcc into a shared library on first use (cached
under ``$ATTNMERGE_PEERS_CACHE``, default ``/tmp/attnmerge-peers``, keyed by the source,
the headers and the flags), loads it with ctypes and launches on torch's current stream, so
calls can be captured in CUDA graphs. The headers come from ``.peers/flashinfer/include``
(``fetch_flashinfer.py``) or ``$FLASHINFER_INCLUDE``; nvcc from ``$NVCC``, ``PATH`` or
``/usr/local/cuda/bin``. FlashInfer's conventions: LSEs in base 2, ``-inf`` for an empty
partial, input and output of one dtype (bf16 or fp16), dense tensors, head sizes 64, 128,
256 and 512. Without a GPU, ``python -m benchmarks.peers.flashinfer --build --arch sm_90a``
checks that the library builds.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "flashinfer_merge.cu"
INCLUDE = Path(os.environ.get("FLASHINFER_INCLUDE", HERE.parents[1] / ".peers/flashinfer/include"))
CACHE = Path(os.environ.get("ATTNMERGE_PEERS_CACHE", "/tmp/attnmerge-peers"))
FLAGS = ("-O3", "-std=c++17", "-DNDEBUG", "-Xcompiler", "-fPIC", "-shared")
_DTYPES = {torch.bfloat16: 0, torch.float16: 1}
_I64P = ctypes.POINTER(ctypes.c_int64)


def nvcc() -> str:
    """The nvcc to build with: ``$NVCC``, the one on ``PATH``, or CUDA's default place."""
    found = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(found).exists():
        raise FileNotFoundError(f"nvcc not found (tried $NVCC, PATH, {found})")
    return found


def default_arch() -> str:
    """sm_XY of the current GPU, with the ``a`` features on sm_90 (H100, H200)."""
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}{'a' if (major, minor) == (9, 0) else ''}"


def compile_command(out: Path, arch: str, include: Path = INCLUDE) -> list[str]:
    return [nvcc(), f"-arch={arch}", *FLAGS, "-I", str(include), str(SOURCE), "-o", str(out)]


def library_path(arch: str, include: Path = INCLUDE) -> Path:
    """Where the library of this source, these headers, nvcc and flags is cached."""
    headers = sorted(include.rglob("*")) if include.is_dir() else []
    if not any(p.is_file() for p in headers):
        raise FileNotFoundError(
            f"no FlashInfer headers in {include}: run benchmarks/peers/fetch_flashinfer.py "
            "(and carry .peers to this machine)"
        )
    key = hashlib.sha256(SOURCE.read_bytes())
    for p in headers:
        if p.is_file():
            key.update(str(p.relative_to(include)).encode() + p.read_bytes())
    key.update(" ".join([nvcc(), arch, *FLAGS]).encode())
    return CACHE / f"flashinfer_merge-{arch}-{key.hexdigest()[:16]}.so"


def build(arch: str, include: Path = INCLUDE, log=sys.stderr) -> Path:
    """Compile the library unless cached; returns its path."""
    path = library_path(arch, include)
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        cmd = compile_command(Path(tmp) / path.name, arch, include)
        print(f"flashinfer: {' '.join(cmd)}", file=log, flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"nvcc failed ({done.returncode}):\n{done.stderr[-4000:]}")
        os.replace(Path(tmp) / path.name, path)  # atomic: concurrent builders agree
        print(f"flashinfer: built {path} in {time.perf_counter() - t0:.0f} s", file=log)
    return path


_failed: list[BaseException] = []


@functools.cache
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build(default_arch())))
    lib.fi_last_error.restype = ctypes.c_char_p
    lib.fi_last_error.argtypes = []
    ptr, i64, f32p = ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)
    lib.fi_merge_states.restype = ctypes.c_int
    lib.fi_merge_states.argtypes = [ctypes.c_int, ptr, _I64P, f32p, _I64P, ptr, _I64P, f32p]
    lib.fi_merge_states.argtypes += [_I64P, i64, i64, i64, i64, ptr]
    fn = lib.fi_variable_length_merge_states
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ptr, _I64P, f32p, _I64P, ptr, ptr, _I64P, f32p]
    fn.argtypes += [_I64P, i64, i64, i64, i64, ptr]
    return lib


def library() -> ctypes.CDLL:
    """The loaded library; built on first use. A failed build is not retried."""
    if _failed:
        raise RuntimeError(f"the FlashInfer library is unavailable: {_failed[0]}")
    try:
        return _library()
    except Exception as e:
        _failed.append(e)
        raise


def _strides(t: torch.Tensor | None):
    return None if t is None else (ctypes.c_int64 * t.dim())(*t.stride())


def _f32(t: torch.Tensor | None):
    return None if t is None else ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))


def _check(rc: int) -> None:
    if rc:
        raise RuntimeError(library().fi_last_error().decode())


def _outputs(v: torch.Tensor, s: torch.Tensor, t: int, out, out_lse, write_lse: bool):
    if v.dtype not in _DTYPES or s.dtype != torch.float32 or not v.is_cuda:
        raise TypeError(f"expected bf16/fp16 v and float32 s on a GPU, got {v.dtype}, {s.dtype}")
    h, d = v.shape[-2:]
    out = torch.empty(t, h, d, dtype=v.dtype, device=v.device) if out is None else out
    if out_lse is None and write_lse:
        out_lse = torch.empty(t, h, dtype=torch.float32, device=v.device)
    if out.shape != (t, h, d) or out.dtype != v.dtype:
        raise ValueError(f"out must be {v.dtype} {(t, h, d)}, got {out.dtype} {tuple(out.shape)}")
    if out_lse is not None and (out_lse.shape != (t, h) or out_lse.dtype != torch.float32):
        raise ValueError(f"out_lse must be float32 {(t, h)}, got {tuple(out_lse.shape)}")
    return out, out_lse


def merge_states(v, s, *, out=None, out_lse=None, write_lse=True):
    """FlashInfer's ``MergeStates``: ``v [T, K, H, D]``, ``s [T, K, H]`` (base 2) -> ``(out
    [T, H, D], out_lse [T, H])``, as ``flashinfer.merge_states``; ``write_lse=False`` (and
    no ``out_lse``) leaves the LSE unwritten (None)."""
    t, k, h, d = v.shape
    if s.shape != (t, k, h):
        raise ValueError(f"s must be {(t, k, h)} for v {tuple(v.shape)}, got {tuple(s.shape)}")
    out, out_lse = _outputs(v, s, t, out, out_lse, write_lse)
    stream = torch.cuda.current_stream(v.device).cuda_stream
    lib = library()
    args = (_DTYPES[v.dtype], v.data_ptr(), _strides(v), _f32(s), _strides(s), out.data_ptr())
    args += (_strides(out), _f32(out_lse), _strides(out_lse), t, k, h, d, stream)
    _check(lib.fi_merge_states(*args))
    return out, out_lse


def variable_length_merge_states(v, s, indptr, *, out=None, out_lse=None, write_lse=True):
    """FlashInfer's ``VariableLengthMergeStates``: rows ``v [N, H, D]``, ``s [N, H]`` (base
    2), token t merging rows ``indptr[t] .. indptr[t + 1] - 1`` (int32 or int64 ``[T + 1]``
    on the GPU) -> ``(out [T, H, D], out_lse [T, H])``."""
    n, h, d = v.shape
    t = indptr.numel() - 1
    if s.shape != (n, h) or indptr.dtype not in (torch.int32, torch.int64) or t < 0:
        raise ValueError(f"expected s {(n, h)} and int32/int64 indptr [T + 1], got {s.shape}")
    out, out_lse = _outputs(v, s, t, out, out_lse, write_lse)
    stream = torch.cuda.current_stream(v.device).cuda_stream
    lib = library()
    bits = 8 * indptr.element_size()
    args = (_DTYPES[v.dtype], bits, v.data_ptr(), _strides(v), _f32(s), _strides(s))
    args += (indptr.data_ptr(), out.data_ptr(), _strides(out), _f32(out_lse), _strides(out_lse))
    _check(lib.fi_variable_length_merge_states(*args, n, t, h, d, stream))
    return out, out_lse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="store_true", help="build (or find) the library")
    parser.add_argument("--arch", help="e.g. sm_90a (default: the current GPU's)")
    args = parser.parse_args(argv)
    if args.build:
        print(build(args.arch or default_arch()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
