"""attnmerge.integrations.vllm on vLLM's own modules, release 0.34.0 (git 62d4bc3c7).

vLLM's modules come from one of two places:

* **vLLM's files** (the tests that take the ``vllm`` fixture): they download four files
  of the vLLM 0.34.0 wheel (``VLLM_FILES``, sha256-pinned) from the package index pip is
  configured with, reading only those members of the wheel (HTTP range requests, about
  1 MB, not the 239 MB wheel), keep them in ``.vllm-files/`` (ignored by git;
  ``ATTNMERGE_VLLM_FILES`` names another folder holding the same tree) and load vLLM's
  dispatcher (``vllm/v1/attention/ops/merge_attn_states.py``) and the wrapper of its CUDA
  op (``vllm/_custom_ops.py``) as the modules of those names, unchanged; what they import
  from the rest of vLLM (``vllm.platforms.current_platform``, ``vllm.envs``,
  ``vllm.logger``, ``vllm.scalar_type``, ``vllm.utils.flashinfer``) and vLLM's compiled op
  ``torch.ops._C.merge_attn_states`` are stand-ins (the op's stand-in runs vLLM's own
  torch merge from the dispatcher's file, and counts its calls). vLLM's FlashAttention
  backend imports the rest of vLLM and its dependencies, so the module
  ``vllm.v1.attention.backends.flash_attn`` here runs only the statement of the real file
  that binds ``merge_attn_states``. Without the index (no network) these tests skip and
  say why.
* **the installed vLLM package** (``test_real_vllm_package``): where vLLM and its
  dependencies import (a vLLM deployment), a subprocess imports the real dispatcher,
  ``vllm._custom_ops`` and every attention module that binds the function and can be
  imported, installs, merges through a backend module, and uninstalls. Skipped elsewhere.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import types
import urllib.parse
import urllib.request
import zipfile
from email.message import Message
from pathlib import Path

import pytest
import torch
from utils import FP8, as_int

import attnmerge
import attnmerge.integrations.vllm as integration
from attnmerge.integrations.vllm import install, uninstall

ROOT = Path(__file__).resolve().parents[1]
VLLM_VERSION = "0.34.0"
VLLM_COMMIT = "62d4bc3c7"  # vllm/_version.py: commit_id 'g62d4bc3c7'
WHEEL = "vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl"
WHEEL_SHA256 = "79ca4b3cd74aec08c4bf476bdf0cb15735b605ae5368526a2faae1e30f044ca2"
DISPATCHER = "vllm/v1/attention/ops/merge_attn_states.py"
CUSTOM_OPS = "vllm/_custom_ops.py"
FLASH_ATTN = "vllm/v1/attention/backends/flash_attn.py"
VERSION_FILE = "vllm/_version.py"
#: The members taken from the wheel and their sha256 (as in the wheel's RECORD).
VLLM_FILES = {
    DISPATCHER: "5815194b80330fecd191b857a3210c096377d50b9c37dc7a9b332d9c7cf57450",
    CUSTOM_OPS: "7fc3b2e3b3cfc1423e1c53208f4b751687b4294d975fecc3dc72a2e32919e0a1",
    FLASH_ATTN: "ec52d6b0a769f9043a7bd083f0252a18e71a529ea03cbbd3e93d6581ba82d67d",
    VERSION_FILE: "b5773f66069824a6796cc4b8ceb4894510c8cc3de202e8e2a9921cf1c81c5bb5",
}
PATCHED = (
    "vllm.v1.attention.ops.merge_attn_states.merge_attn_states",
    "vllm._custom_ops.merge_attn_states",
    "vllm.v1.attention.backends.flash_attn.merge_attn_states",
)
T, H, D = 7, 3, 16  # D: a head size vLLM's CUDA path takes (a multiple of 8)


# --- Downloading vLLM's files ---------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _index_url() -> str:
    """The index pip installs from: its configured index-url, else pip's default."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    found = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".index-url"):
            found[key.split(".")[0]] = value.strip().strip("'\"")
    for scope in (":env:", "install", "global"):
        if scope in found:
            return found[scope]
    from pip._internal.models.index import PyPI

    return PyPI.simple_url


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[bytes, Message]:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read(), response.headers


def _wheel_url() -> str:
    index = _index_url().rstrip("/") + "/"
    page = urllib.parse.urljoin(index, "vllm/")
    body, _ = _get(page, {"Accept": "application/vnd.pypi.simple.v1+json"})
    for entry in json.loads(body)["files"]:
        if entry["filename"] == WHEEL:
            if entry["hashes"].get("sha256") != WHEEL_SHA256:
                pytest.fail(f"the index lists {WHEEL} with another sha256: {entry['hashes']}")
            return urllib.parse.urljoin(page, entry["url"])
    raise LookupError(f"{WHEEL} is not listed at {page}")


class _RemoteFile(io.RawIOBase):
    """A file on an HTTP server, read by range requests (64 kB blocks at least)."""

    def __init__(self, url: str) -> None:
        self.url, self.pos = url, 0
        self.buffer_start, self.buffer = 0, b""
        self.size = 0
        self._read_range(0, 1)
        self.size = self._total

    def _read_range(self, start: int, count: int) -> bytes:
        end = start + count - 1
        data, headers = _get(self.url, {"Range": f"bytes={start}-{end}"})
        content_range = headers.get("Content-Range", "")
        if not content_range.startswith("bytes "):
            raise OSError(f"the server does not answer range requests ({self.url})")
        self._total = int(content_range.rpartition("/")[2])
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        lo = self.pos - self.buffer_start
        if lo < 0 or lo + n > len(self.buffer):
            count = min(max(n, 1 << 16), self.size - self.pos)
            self.buffer_start, self.buffer = self.pos, self._read_range(self.pos, count)
            lo = 0
        b[:n] = self.buffer[lo : lo + n]
        self.pos += n
        return n


def _download_vllm_files(folder: Path) -> None:
    with zipfile.ZipFile(_RemoteFile(_wheel_url())) as wheel:
        for name, digest in VLLM_FILES.items():
            data = wheel.read(name)
            if _sha256(data) != digest:
                pytest.fail(f"{name} in {WHEEL} has sha256 {_sha256(data)}, expected {digest}")
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(f"{path.name}.{os.getpid()}.part")
            part.write_bytes(data)
            os.replace(part, path)  # atomic: pytest-xdist workers may download at once


def _cached(folder: Path) -> bool:
    for name, digest in VLLM_FILES.items():
        path = folder / name
        if not path.is_file() or _sha256(path.read_bytes()) != digest:
            return False
    return True


@pytest.fixture(scope="module")
def vllm_files() -> Path:
    """A folder holding VLLM_FILES (downloaded once, then taken from the cache)."""
    given = os.environ.get("ATTNMERGE_VLLM_FILES")
    if given:
        folder = Path(given)
        if not _cached(folder):
            pytest.fail(f"ATTNMERGE_VLLM_FILES={given} does not hold vLLM {VLLM_VERSION}'s files")
        return folder
    folder = ROOT / ".vllm-files" / VLLM_VERSION
    if not _cached(folder):
        try:
            _download_vllm_files(folder)
        except (OSError, ValueError, LookupError, ImportError, zipfile.BadZipFile) as exc:
            pytest.skip(
                f"vLLM {VLLM_VERSION}'s files could not be downloaded from the package index "
                f"({type(exc).__name__}: {exc}); set ATTNMERGE_VLLM_FILES to a folder that "
                f"holds {', '.join(VLLM_FILES)} from {WHEEL}"
            )
    return folder


# --- vLLM's modules, loaded from its files --------------------------------------------


class Platform:
    """Stands in for ``vllm.platforms.current_platform``: what the two files call."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def is_rocm(self) -> bool:
        return False

    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    def is_xpu(self) -> bool:
        return False

    def fp8_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    def import_kernels(self) -> None:
        pass


def _unset_setting(name: str) -> None:
    """``vllm.envs``' stand-in: every ``VLLM_*`` setting unset."""
    if name.startswith("VLLM_"):
        return None
    raise AttributeError(name)


class VllmModules:
    """vLLM's dispatcher and ``_custom_ops`` (its files), the FlashAttention backend's
    binding of the name, and the stand-in of vLLM's compiled op."""

    def __init__(self, files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files, self.mp = files, monkeypatch
        self.platform = Platform("cuda")
        self.kernel_calls = 0
        for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            monkeypatch.delitem(sys.modules, name)
        self._package("vllm")
        self._module("vllm.envs", __getattr__=_unset_setting)
        self._module("vllm.logger", init_logger=logging.getLogger)
        self._module("vllm.platforms", current_platform=self.platform)
        self._module("vllm.scalar_type", ScalarType=type("ScalarType", (), {}))
        self._package("vllm.utils")
        self._module("vllm.utils.flashinfer", flashinfer_quant_nvfp4_8x4_sf_layout=lambda *a: None)
        for name in ("vllm.v1", "vllm.v1.attention", "vllm.v1.attention.ops"):
            self._package(name)
        self._package("vllm.v1.attention.backends")
        monkeypatch.setattr(
            torch.ops, "_C", types.SimpleNamespace(merge_attn_states=self._op), raising=False
        )
        version = self._load("vllm._version", VERSION_FILE)  # as vllm/__init__.py does
        sys.modules["vllm"].__version__ = version.__version__
        self.dispatcher = self._load("vllm.v1.attention.ops.merge_attn_states", DISPATCHER)
        self.custom_ops = self._load("vllm._custom_ops", CUSTOM_OPS)
        self.backend = self.bind("vllm.v1.attention.backends.flash_attn")

    def _module(self, name: str, package: bool = False, **attrs) -> types.ModuleType:
        module = types.ModuleType(name)
        if package:
            module.__path__ = []
        vars(module).update(attrs)
        self.mp.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent:
            self.mp.setattr(sys.modules[parent], child, module, raising=False)
        return module

    def _package(self, name: str) -> types.ModuleType:
        return self._module(name, package=True)

    def _load(self, name: str, file: str) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(name, self.files / file)
        module = importlib.util.module_from_spec(spec)
        self.mp.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        self.mp.setattr(sys.modules[parent], child, module, raising=False)
        spec.loader.exec_module(module)
        return module

    def bind(self, name: str) -> types.ModuleType:
        """A module named ``name`` that ran the FlashAttention backend's own statement
        binding merge_attn_states."""
        tree = ast.parse((self.files / FLASH_ATTN).read_text())
        statements = [
            node
            for node in tree.body
            if isinstance(node, ast.ImportFrom)
            and any(a.name == "merge_attn_states" for a in node.names)
        ]
        assert [ast.unparse(s) for s in statements] == [
            "from vllm.v1.attention.ops.merge_attn_states import merge_attn_states"
        ]
        module = self._module(name)
        exec(compile(ast.Module(statements, []), self.files / FLASH_ATTN, "exec"), vars(module))
        return module

    def _op(
        self, output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse, P, scale
    ):
        """Stands in for vLLM's CUDA op: vLLM's torch merge (the dispatcher's file)."""
        self.kernel_calls += 1
        self.dispatcher._merge_attn_states_torch(
            output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse, P, scale
        )

    @property
    def functions(self) -> dict[str, object]:
        return {
            PATCHED[0]: self.dispatcher.merge_attn_states,
            PATCHED[1]: self.custom_ops.merge_attn_states,
            PATCHED[2]: self.backend.merge_attn_states,
        }


@pytest.fixture
def vllm(vllm_files: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(integration, "_logged", set())
    modules = VllmModules(vllm_files, monkeypatch)
    yield modules
    uninstall()  # before the modules go


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture):
    """The attnmerge logger's records (INFO and up)."""
    caplog.set_level(logging.INFO, logger="attnmerge")
    return lambda: [r for r in caplog.records if r.name == "attnmerge"]


def states(dtype=torch.float16, seed=0, t=T):
    g = torch.Generator().manual_seed(seed)
    po, so = (torch.randn(t, H, D, generator=g).to(dtype) for _ in range(2))
    pl, sl = (3 * torch.randn(H, t, generator=g) for _ in range(2))
    pl[0, 1], sl[1, 2] = -torch.inf, torch.inf  # an empty prefix, an empty suffix
    return po, pl, so, sl


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(as_int(a.contiguous()), as_int(b.contiguous()))


# --- vLLM's files as downloaded -------------------------------------------------------


def test_files_are_the_pinned_release(vllm_files):
    version = (vllm_files / VERSION_FILE).read_text()
    assert f"__version__ = version = '{VLLM_VERSION}'" in version
    assert f"commit_id = 'g{VLLM_COMMIT}'" in version
    assert integration.TESTED_VLLM_VERSION == VLLM_VERSION


def test_vllm_signatures_are_attnmerges(vllm):
    """The parameters the replacements take: vLLM's, which are attnmerge's."""
    import inspect

    ours = inspect.signature(attnmerge.merge_attn_states).parameters
    assert list(ours)[:8] == list(integration._PARAMETERS)
    for fn in (vllm.dispatcher.merge_attn_states, vllm.custom_ops.merge_attn_states):
        signature = inspect.signature(fn)
        assert list(signature.parameters) == list(integration._PARAMETERS)
        assert integration._is_attnmerge_signature(signature)
        assert [p.default for p in signature.parameters.values()][5:] == [None] * 3


# --- install --------------------------------------------------------------------------


def test_install_patches_every_binding_and_logs_once(vllm, records):
    originals = vllm.functions
    assert originals[PATCHED[0]] is originals[PATCHED[2]]
    handle = install(backend="torch")
    assert handle.active and handle.backend == "torch"
    assert set(handle.patched) == set(PATCHED)
    assert integration.installed() is handle
    for label, fn in vllm.functions.items():
        assert fn is not originals[label], label
        assert fn.__wrapped__ is originals[label]
        assert fn.__name__ == "merge_attn_states"
    assert vllm.backend.merge_attn_states is vllm.dispatcher.merge_attn_states
    logged = records()
    assert len(logged) == 1 and logged[0].levelno == logging.INFO
    assert logged[0].getMessage().startswith(f"attnmerge: vLLM {VLLM_VERSION}: ")
    assert all(label in logged[0].getMessage() for label in PATCHED)
    assert install(backend="torch") is handle  # idempotent
    assert len(records()) == 1


def test_calls_run_attnmerge_not_vllm(vllm):
    po, pl, so, sl = states()
    expected, expected_lse = torch.empty_like(po), torch.empty_like(pl)
    attnmerge.merge_attn_states(expected, po, pl, so, sl, expected_lse, backend="torch")
    vllm_out = torch.empty_like(po)
    vllm.backend.merge_attn_states(vllm_out, po, pl, so, sl)
    assert vllm.kernel_calls == 1  # vLLM's dispatcher -> _custom_ops -> its op
    install(backend="torch")
    for fn in vllm.functions.values():
        out, lse = torch.full_like(po, torch.nan), torch.full_like(pl, torch.nan)
        fn(out, po, pl, so, sl, lse)  # positional, as the FlashAttention backend
        assert same_bytes(out, expected) and same_bytes(lse, expected_lse)
        out, lse = torch.full_like(po, torch.nan), torch.full_like(pl, torch.nan)
        fn(  # keywords, as the MLA layers
            output=out,
            output_lse=lse,
            prefix_output=po,
            prefix_lse=pl,
            suffix_output=so,
            suffix_lse=sl,
        )
        assert same_bytes(out, expected) and same_bytes(lse, expected_lse)
    assert vllm.kernel_calls == 1
    torch.testing.assert_close(expected, vllm_out, rtol=1e-3, atol=1e-3)  # vLLM's own


@pytest.mark.parametrize("variant", ["P", "P0", "fp8", "fp8_lse_P", "inplace", "bf16_to_fp32"])
def test_arguments_reach_attnmerge(vllm, variant):
    install(backend="torch")
    dtype = torch.bfloat16 if variant == "bf16_to_fp32" else torch.float16
    po, pl, so, sl = states(dtype)
    out_dtype = {"fp8": FP8, "fp8_lse_P": FP8, "bf16_to_fp32": torch.float32}.get(variant, dtype)
    P = {"P": 4, "P0": 0, "fp8_lse_P": 2}.get(variant)
    scale = torch.tensor([0.05]) if out_dtype == FP8 else None
    with_lse = variant in ("P", "P0", "fp8_lse_P", "inplace")
    expected = torch.empty(T, H, D, dtype=out_dtype)
    expected_lse = torch.empty_like(pl) if with_lse else None
    attnmerge.merge_attn_states(expected, po, pl, so, sl, expected_lse, P, scale, backend="torch")
    if variant == "inplace":  # output is prefix_output, output_lse is prefix_lse
        out, lse = po.clone(), pl.clone()
        vllm.backend.merge_attn_states(out, out, lse, so, sl, lse)
    else:
        out = torch.zeros(T, H, D, dtype=out_dtype)
        lse = torch.zeros_like(pl) if with_lse else None
        vllm.backend.merge_attn_states(
            out, po, pl, so, sl, output_lse=lse, prefill_tokens_with_context=P, output_scale=scale
        )
    assert same_bytes(out, expected)
    if with_lse:
        assert same_bytes(lse, expected_lse)
    assert vllm.kernel_calls == 0


def test_backend_comes_from_install(vllm, monkeypatch, records):
    seen = []
    real = integration._merge
    monkeypatch.setattr(
        integration,
        "_merge",
        lambda *a, backend, **k: (seen.append(backend), real(*a, **k, backend="torch")),
    )
    handle = install()
    po, pl, so, sl = states()
    vllm.backend.merge_attn_states(torch.empty_like(po), po, pl, so, sl)
    assert install(backend="torch") is handle and handle.backend == "torch"
    vllm.custom_ops.merge_attn_states(torch.empty_like(po), po, pl, so, sl)
    assert seen == ["auto", "torch"]
    assert "now uses backend 'torch'" in records()[-1].getMessage()
    with pytest.raises(ValueError, match="backend must be one of"):
        install(backend="cutlass")


# --- uninstall ------------------------------------------------------------------------


def test_uninstall_restores_every_attribute(vllm, records):
    originals = vllm.functions
    handle = install(backend="torch")
    replacement = vllm.dispatcher.merge_attn_states
    late = vllm.bind("vllm.v1.attention.backends.late")  # imported after install()
    assert late.merge_attn_states is replacement
    assert uninstall() is True
    assert not handle.active and integration.installed() is None
    for label, fn in vllm.functions.items():
        assert fn is originals[label], label
    assert late.merge_attn_states is originals[PATCHED[0]]
    message = records()[-1].getMessage()
    assert all(label in message for label in (*PATCHED, "backends.late.merge_attn_states"))
    po, pl, so, sl = states()
    vllm.backend.merge_attn_states(torch.empty_like(po), po, pl, so, sl)
    assert vllm.kernel_calls == 1  # vLLM's own again
    replacement(torch.empty_like(po), po, pl, so, sl)  # a reference kept elsewhere
    assert vllm.kernel_calls == 2
    assert uninstall() is False
    handle.restore()  # nothing left to do
    again = install(backend="torch")  # and again, the late module included
    assert again is not handle
    assert set(again.patched) == {*PATCHED, "vllm.v1.attention.backends.late.merge_attn_states"}


def test_restore_and_context_manager(vllm):
    originals = vllm.functions
    with install(backend="torch") as handle:
        assert vllm.functions[PATCHED[2]] is not originals[PATCHED[2]]
    assert not handle.active and vllm.functions == originals
    handle = install(backend="torch")
    handle.restore()
    assert vllm.functions == originals


def test_attribute_changed_since_install_is_left_alone(vllm, records):
    originals = vllm.functions
    install(backend="torch")

    def someone_elses(*args):
        pass

    vllm.backend.merge_attn_states = someone_elses
    uninstall()
    assert vllm.backend.merge_attn_states is someone_elses
    assert vllm.dispatcher.merge_attn_states is originals[PATCHED[0]]
    warning = records()[-1]
    assert warning.levelno == logging.WARNING and PATCHED[2] in warning.getMessage()


def test_concurrent_install_and_uninstall(vllm, records):
    originals = vllm.functions
    handles, barrier = [], threading.Barrier(8)

    def work():
        barrier.wait()
        handles.append(install(backend="torch"))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(h) for h in handles}) == 1 and len(records()) == 1
    results = []
    threads = [threading.Thread(target=lambda: results.append(uninstall())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert vllm.functions == originals


# --- calls attnmerge does not serve: back to vLLM --------------------------------------


def test_refused_call_runs_vllm_and_logs_once(vllm, records):
    """FP8 partials: vLLM takes them (its torch path here), attnmerge's checks refuse
    them before writing anything."""
    vllm.platform.kind = "cpu"
    install(backend="torch")
    po, pl, so, sl = states()
    po8, so8 = po.to(FP8), so.to(FP8)
    expected, expected_lse = torch.empty_like(po), torch.empty_like(pl)
    vllm.dispatcher._merge_attn_states_torch(expected, po8, pl, so8, sl, expected_lse)
    for _ in range(2):
        out, lse = torch.empty_like(po), torch.empty_like(pl)
        vllm.backend.merge_attn_states(out, po8, pl, so8, sl, lse)
        assert same_bytes(out, expected) and same_bytes(lse, expected_lse)
    handed_back = [r for r in records() if "hands calls back" in r.getMessage()]
    assert len(handed_back) == 1 and handed_back[0].levelno == logging.INFO
    assert "prefix_output must be one of" in handed_back[0].getMessage()


def test_refused_call_reaches_vllms_op_once(vllm, records):
    """A float64 LSE: attnmerge refuses it; vLLM's dispatcher calls _custom_ops (also
    replaced), which hands the call on to vLLM's op instead of trying attnmerge again."""
    install(backend="torch")
    po, pl, so, sl = states(torch.float32)
    out = torch.empty_like(po)
    vllm.backend.merge_attn_states(out, po, pl.double(), so, sl)
    assert vllm.kernel_calls == 1
    expected = torch.empty_like(po)
    attnmerge.merge_attn_states(expected, po, pl, so, sl, backend="torch")
    torch.testing.assert_close(out, expected)
    assert len([r for r in records() if "hands calls back" in r.getMessage()]) == 1


def test_backend_that_cannot_serve_hands_back(vllm, records):
    if torch.cuda.is_available():
        pytest.skip("needs a machine where the cuda backend cannot serve CPU tensors")
    install(backend="cuda")  # CPU tensors: BackendError
    po, pl, so, sl = states()
    vllm.custom_ops.merge_attn_states(torch.empty_like(po), po, pl, so, sl)
    assert vllm.kernel_calls == 1
    assert "backend 'cuda' cannot serve" in records()[-1].getMessage()


def test_signature_differences():
    """A vLLM whose function had other parameters: names mapped through _NAMES, an extra
    parameter hands the call back when it is given, a missing one is not patched."""
    calls = []

    def future(
        output,
        prefix_output,
        prefix_lse,
        suffix_output,
        suffix_lse,
        output_lse=None,
        *,
        new_flag=False,
        **rest,
    ):
        calls.append((new_flag, rest))

    signature, reason = integration._plan(future)
    assert reason is None and not integration._is_attnmerge_signature(signature)
    installation = integration.Installation("torch")
    fn = integration._replacement(installation, "vllm.future", future, signature)
    po, pl, so, sl = states()
    out, expected = torch.empty_like(po), torch.empty_like(po)
    fn(out, po, pl, so, sl, new_flag=False)
    attnmerge.merge_attn_states(expected, po, pl, so, sl, backend="torch")
    assert same_bytes(out, expected) and calls == []
    fn(out, po, pl, so, sl, new_flag=True)
    fn(out, po, pl, so, sl, other=1)
    assert calls == [(True, {}), (False, {"other": 1})]
    with pytest.raises(TypeError):  # vLLM's own error for a call it does not take
        fn(out, po, pl, so)

    def renamed(out, prefix_output, prefix_lse, suffix_output, suffix_lse):
        pass

    def requires(output, prefix_output, prefix_lse, suffix_output, suffix_lse, stream):
        pass

    assert integration._plan(renamed) == (None, "it takes no output")
    assert integration._plan(requires)[1] == "it requires stream, which attnmerge does not take"


# --- errors, imports, torch.compile ---------------------------------------------------


def test_without_vllm(monkeypatch):
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError, match=r"nothing to patch.*vllm"):
        install()
    assert integration.installed() is None


def test_import_attnmerge_leaves_the_integrations_out():
    code = (
        "import sys, attnmerge\n"
        "assert not any(m.startswith('attnmerge.integrations') for m in sys.modules)\n"
        "import attnmerge.integrations.vllm\n"
        "assert 'vllm' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compiled_caller(vllm):
    install(backend="torch")
    torch._dynamo.reset()
    backend = vllm.backend

    def fn(out, po, pl, so, sl, lse):
        backend.merge_attn_states(out, po, pl, so, sl, lse)
        return out

    po, pl, so, sl = states()
    out, lse = torch.empty_like(po), torch.empty_like(pl)
    torch.compile(fn, fullgraph=True, backend="aot_eager")(out, po, pl, so, sl, lse)
    expected, expected_lse = torch.empty_like(po), torch.empty_like(pl)
    attnmerge.merge_attn_states(expected, po, pl, so, sl, expected_lse, backend="torch")
    assert same_bytes(out, expected) and same_bytes(lse, expected_lse)
    assert vllm.kernel_calls == 0


# --- the installed vLLM package -------------------------------------------------------

REAL_PACKAGE_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    try:
        import vllm
        import vllm.v1.attention.ops.merge_attn_states as dispatcher
        import vllm._custom_ops as custom_ops
    except Exception as exc:
        print(json.dumps({"skip": f"{type(exc).__name__}: {exc}"}))
        sys.exit(0)
    BINDERS = (
        "vllm.v1.attention.backends.flash_attn",
        "vllm.v1.attention.backends.flashinfer",
        "vllm.v1.attention.backends.rocm_aiter_fa",
        "vllm.model_executor.layers.attention.mla_attention",
        "vllm.model_executor.layers.attention.sparse_mla_attention",
        "vllm.models.kimi_k3.nvidia.mla",
    )
    binders = {}
    for name in BINDERS:
        try:
            binders[name] = importlib.import_module(name)
        except Exception:
            pass
    import torch
    import attnmerge
    import attnmerge.integrations.vllm as integration
    original = {"f": dispatcher.merge_attn_states, "op": custom_ops.merge_attn_states}
    bound = [n for n, m in binders.items() if m.merge_attn_states is original["f"]]
    handle = integration.install(backend="torch")
    patched = list(handle.patched)
    routed = [n for n in bound if binders[n].merge_attn_states is dispatcher.merge_attn_states]
    out = torch.empty(5, 2, 16)
    po, so = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    pl, sl = torch.randn(2, 5), torch.randn(2, 5)
    module = binders[bound[0]] if bound else dispatcher
    module.merge_attn_states(out, po, pl, so, sl)
    expected = torch.empty_like(out)
    attnmerge.merge_attn_states(expected, po, pl, so, sl, backend="torch")
    same = torch.equal(out, expected)
    handle.restore()
    restored = (
        dispatcher.merge_attn_states is original["f"]
        and custom_ops.merge_attn_states is original["op"]
        and all(binders[n].merge_attn_states is original["f"] for n in bound)
    )
    print(json.dumps({
        "version": vllm.__version__, "bound": bound, "routed": routed, "patched": patched,
        "same": same, "restored": restored,
    }))
    """
)


def test_real_vllm_package():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed in this environment")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", REAL_PACKAGE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(f"vLLM is installed but its modules do not import: {result['skip']}")
    assert result["bound"], "no attention module bound vLLM's merge_attn_states"
    assert result["routed"] == result["bound"]
    assert set(result["patched"]) >= {
        "vllm.v1.attention.ops.merge_attn_states.merge_attn_states",
        "vllm._custom_ops.merge_attn_states",
        *(f"{name}.merge_attn_states" for name in result["bound"]),
    }
    assert result["same"] and result["restored"]
