"""Build-on-first-use machinery of the CUDA backend: the disk cache (CPU only) and NVRTC
compilation (needs only libnvrtc, no GPU: skipped when it cannot be found)."""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from attnmerge.cuda import cache, driver, nvrtc
from attnmerge.cuda.cache import cached_build, entries, entry_path
from attnmerge.cuda.nvrtc import BuildError

KEY = {"version": "0.1.0", "source": "abc123", "arch": "sm_90a", "toolchain": "nvrtc-13.0"}
SPAWN_TIMEOUT_S = 60


@pytest.fixture(autouse=True)
def _cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("ATTNMERGE_CACHE_DIR", str(root))
    for var in ("ATTNMERGE_NO_BUILD", "ATTNMERGE_VERBOSE_BUILD"):
        monkeypatch.delenv(var, raising=False)
    return root


class Counter:
    def __init__(self, data: bytes = b"artefact") -> None:
        self.calls = 0
        self.data = data

    def __call__(self) -> bytes:
        self.calls += 1
        return self.data


# --------------------------------------------------------------------------------------
# Disk cache
# --------------------------------------------------------------------------------------


def test_miss_then_hit(_cache_env: Path) -> None:
    build = Counter(b"\x7fELF-payload")
    assert cached_build("merge", KEY, build) == b"\x7fELF-payload"
    assert build.calls == 1
    assert cached_build("merge", KEY, build) == b"\x7fELF-payload"
    assert build.calls == 1

    path = entry_path("merge", KEY)
    assert path.parent == _cache_env
    assert path.name.startswith("merge-") and path.name.endswith(".cubin")
    assert len(path.name) == len("merge-") + 24 + len(".cubin")
    sidecar = json.loads(Path(str(path) + ".json").read_text())
    assert sidecar["key"] == KEY and sidecar["kind"] == "merge"

    (listed,) = entries()
    assert listed["path"] == str(path)
    assert listed["key"] == KEY
    assert listed["size"] == len(b"\x7fELF-payload")


def test_key_sensitivity() -> None:
    build = Counter()
    cached_build("merge", KEY, build)
    cached_build("merge", dict(reversed(list(KEY.items()))), build)  # same key, other order
    assert build.calls == 1
    for field in KEY:
        cached_build("merge", {**KEY, field: KEY[field] + "x"}, build)
    assert build.calls == 1 + len(KEY)
    cached_build("merge", {**KEY, "extra": ""}, build)
    cached_build("other", KEY, build)  # same key, other kind
    cached_build("merge", KEY, build, suffix=".fatbin")  # same key, other suffix
    assert build.calls == 4 + len(KEY)
    assert len(entries()) == 4 + len(KEY)


def test_cache_dir_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _cache_env: Path
) -> None:
    assert cache.cache_dir() == _cache_env
    cached_build("merge", KEY, Counter())
    assert entry_path("merge", KEY).is_file()
    assert entry_path("merge", KEY).parent == _cache_env

    monkeypatch.delenv("ATTNMERGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "attnmerge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "attnmerge"


def test_no_build_raises_without_building(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNMERGE_NO_BUILD", "1")
    build = Counter()
    with pytest.raises(BuildError) as info:
        cached_build("merge", KEY, build, describe="merge kernel (sm_90a)")
    message = str(info.value)
    assert "forbidden" in message and "ATTNMERGE_NO_BUILD" in message
    assert str(entry_path("merge", KEY)) in message
    assert "merge kernel (sm_90a)" in message
    assert "attnmerge build" in message
    assert build.calls == 0

    monkeypatch.delenv("ATTNMERGE_NO_BUILD")
    cached_build("merge", KEY, build)
    monkeypatch.setenv("ATTNMERGE_NO_BUILD", "1")
    assert cached_build("merge", KEY, build) == b"artefact"  # a present entry is served
    assert build.calls == 1


def test_build_log_line_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="attnmerge")
    for _ in range(3):
        cached_build("merge", KEY, Counter(), describe="merge kernel (sm_90a)")
    building = [r for r in caplog.records if "building" in r.getMessage()]
    assert len(building) == 1
    (record,) = building
    assert record.name == "attnmerge" and record.levelno == logging.INFO
    msg = record.getMessage()
    assert msg.startswith("attnmerge: building merge kernel (sm_90a) (first use; cached at ")
    assert str(entry_path("merge", KEY)) in msg
    assert "abc123" not in msg  # the key only with ATTNMERGE_VERBOSE_BUILD
    assert sum("built merge kernel (sm_90a) in" in r.getMessage() for r in caplog.records) == 1


def test_verbose_build_logs_key(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATTNMERGE_VERBOSE_BUILD", "1")
    caplog.set_level(logging.INFO, logger="attnmerge")
    cached_build("merge", KEY, Counter())
    (msg,) = [r.getMessage() for r in caplog.records if "building" in r.getMessage()]
    assert "attnmerge: building merge (first use" in msg  # describe defaults to kind
    assert "abc123" in msg and "sm_90a" in msg


def test_failed_build_leaves_nothing(_cache_env: Path) -> None:
    def boom() -> bytes:
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        cached_build("merge", KEY, boom)
    assert not entry_path("merge", KEY).exists()
    assert entries() == []
    with pytest.raises(BuildError, match="no data"):
        cached_build("merge", KEY, lambda: b"")
    assert not entry_path("merge", KEY).exists()
    assert cached_build("merge", KEY, Counter()) == b"artefact"


def test_bad_names_rejected() -> None:
    for kind in ("", "a/b", "../x", ".hidden"):
        with pytest.raises(ValueError):
            cached_build(kind, KEY, Counter())
    for suffix in (".json", ".lock", ".tmp", "/x"):
        with pytest.raises(ValueError):
            cached_build("merge", KEY, Counter(), suffix=suffix)
    with pytest.raises(TypeError):
        cached_build("merge", {"arch": 90}, Counter())  # type: ignore[dict-item]


def test_stale_temp_files_are_not_entries(_cache_env: Path) -> None:
    path = entry_path("merge", KEY)
    _cache_env.mkdir(parents=True)
    stale = _cache_env / f".{path.name}.k3j2h1.tmp"
    stale.write_bytes(b"\x7fELF-half-writ")  # what a build killed mid-write leaves
    (_cache_env / f"{path.name}.lock").touch()
    assert entries() == []

    build = Counter()
    assert cached_build("merge", KEY, build) == b"artefact"
    assert build.calls == 1
    assert not stale.exists()  # cleaned up under the entry's lock
    assert [e["path"] for e in entries()] == [str(path)]


# Workers for the multi-process tests: module level, so the "spawn" children import them.


def _race_worker(root: str, counter: str, barrier, results) -> None:
    os.environ["ATTNMERGE_CACHE_DIR"] = root

    def build() -> bytes:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return f"built by {os.getpid()}".encode()

    barrier.wait()
    results.put(cached_build("race", KEY, build))


def _killed_worker(root: str, started: str, stage: str) -> None:
    os.environ["ATTNMERGE_CACHE_DIR"] = root
    entry = entry_path("victim", KEY)

    def hang() -> None:
        Path(started).touch()
        time.sleep(SPAWN_TIMEOUT_S)

    def build() -> bytes:
        if stage == "build":
            hang()
        return b"complete artefact"

    if stage == "write":  # stop after the temp file is written, before it is renamed
        real_replace = os.replace

        def replace(src, dst):
            if os.fspath(dst) == str(entry):
                hang()
            real_replace(src, dst)

        cache.os.replace = replace
    cached_build("victim", KEY, build)


def test_concurrent_processes_build_once(_cache_env: Path, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    counter = tmp_path / "builds.txt"
    n = 4
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_race_worker, args=(str(_cache_env), str(counter), barrier, results))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    outputs = [results.get(timeout=SPAWN_TIMEOUT_S) for _ in range(n)]
    for p in procs:
        p.join(SPAWN_TIMEOUT_S)
        assert p.exitcode == 0
    builders = counter.read_text().split()
    assert len(builders) == 1, builders
    assert outputs == [f"built by {builders[0]}".encode()] * n
    assert cached_build("race", KEY, Counter()) == outputs[0]


@pytest.mark.parametrize("stage", ["build", "write"])
def test_killed_build_leaves_no_entry(_cache_env: Path, tmp_path: Path, stage: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    started = tmp_path / "started"
    proc = ctx.Process(target=_killed_worker, args=(str(_cache_env), str(started), stage))
    proc.start()
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not started.exists():
        assert proc.is_alive() and time.monotonic() < deadline, "worker never started its build"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(SPAWN_TIMEOUT_S)
    assert proc.exitcode == -signal.SIGKILL

    path = entry_path("victim", KEY)
    assert not path.exists()
    assert entries() == []
    if stage == "write":
        assert list(_cache_env.glob(f".{path.name}.*.tmp")), "expected a stale temp file"
    # The kernel released the dead process's lock.
    with open(f"{path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)

    build = Counter(b"rebuilt")
    assert cached_build("victim", KEY, build) == b"rebuilt"
    assert build.calls == 1
    assert [e["path"] for e in entries()] == [str(path)]
    assert not list(_cache_env.glob(".*.tmp"))


# --------------------------------------------------------------------------------------
# NVRTC
# --------------------------------------------------------------------------------------

needs_nvrtc = pytest.mark.skipif(
    nvrtc.unavailable_reason() is not None, reason=str(nvrtc.unavailable_reason())
)

SIMPLE = r"""
extern "C" __global__ void scale(float* x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= a;
}
"""

TEMPLATED = r"""
template <typename T, int kBlock>
__global__ void axpy(T* __restrict__ y, const T* __restrict__ x, T a, int n) {
    int i = blockIdx.x * kBlock + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}
"""

ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190


def _check_cubin(cubin: bytes) -> None:
    assert cubin[:4] == ELF_MAGIC
    assert int.from_bytes(cubin[18:20], "little") == EM_CUDA  # e_machine


@pytest.fixture
def _reload_nvrtc():
    nvrtc._load.cache_clear()
    yield
    nvrtc._load.cache_clear()


def test_library_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, _reload_nvrtc) -> None:
    bogus = tmp_path / "libnvrtc.so.99"
    monkeypatch.setenv("ATTNMERGE_NVRTC_LIBRARY", str(bogus))
    assert nvrtc.find_library() == str(bogus)
    reason = nvrtc.unavailable_reason()
    assert reason is not None and "ATTNMERGE_NVRTC_LIBRARY" in reason and "\n" not in reason
    with pytest.raises(BuildError, match="NVRTC is unavailable"):
        nvrtc.compile_cubin(SIMPLE, name="k.cu", arch="sm_80")


def test_library_missing(monkeypatch: pytest.MonkeyPatch, _reload_nvrtc) -> None:
    # Which one is chosen among those found: tests/test_nvrtc_choice.py.
    monkeypatch.delenv("ATTNMERGE_NVRTC_LIBRARY", raising=False)
    monkeypatch.setattr(nvrtc, "candidates", lambda: [])
    monkeypatch.setattr(nvrtc, "_torch_cuda_version", lambda: None)
    monkeypatch.setattr(driver, "cuda_version", lambda: None)
    reason = nvrtc.unavailable_reason()
    assert reason is not None and "\n" not in reason
    assert reason.startswith("libnvrtc not found (searched ")
    assert reason.endswith("fix: pip install nvidia-cuda-nvrtc")
    assert nvrtc.find_library() is None


def test_version_key() -> None:
    assert nvrtc._version_key("/x/libnvrtc.so.13") == (13,)
    assert nvrtc._version_key("/x/libnvrtc.so.12.4.127") == (12, 4, 127)
    assert nvrtc._version_key("/x/libnvrtc.so.12.4.127") < nvrtc._version_key("/y/libnvrtc.so.13")


@needs_nvrtc
def test_version_and_archs() -> None:
    major, minor = nvrtc.version()
    assert (major, minor) >= (11, 2)
    archs = nvrtc.supported_archs()
    assert "sm_80" in archs and "sm_90" in archs
    assert all(a.startswith("sm_") for a in archs)


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compile_extern_c(arch: str) -> None:
    module = nvrtc.compile_cubin(SIMPLE, name="scale.cu", arch=arch)
    _check_cubin(module.cubin)
    assert module.lowered_names == {}


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compile_template_name_expressions(arch: str) -> None:
    exprs = ["axpy<float, 128>", "axpy<double, 256>"]
    module = nvrtc.compile_cubin(TEMPLATED, name="axpy.cu", arch=arch, name_expressions=exprs)
    _check_cubin(module.cubin)
    assert set(module.lowered_names) == set(exprs)
    for expr in exprs:
        lowered = module.lowered_names[expr]
        assert lowered.startswith("_Z") and "axpy" in lowered
        assert lowered.encode() in module.cubin  # the symbol the launcher will look up
    assert len(set(module.lowered_names.values())) == len(exprs)


@needs_nvrtc
def test_compile_error_reports_log() -> None:
    bad = 'extern "C" __global__ void broken(float* x) { x[0] = 1.0f }\n'
    with pytest.raises(BuildError) as info:
        nvrtc.compile_cubin(bad, name="broken.cu", arch="sm_80", options=["-lineinfo"])
    message = str(info.value)
    assert "broken.cu" in message and "error" in message
    assert 'expected a ";"' in message  # the compiler's own diagnostic
    assert "--gpu-architecture=sm_80" in message and "-lineinfo" in message


@needs_nvrtc
def test_compile_rejects_virtual_arch() -> None:
    with pytest.raises(ValueError, match="real architecture"):
        nvrtc.compile_cubin(SIMPLE, name="scale.cu", arch="compute_80")


@needs_nvrtc
def test_cached_nvrtc_build(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="attnmerge")
    key = {"source": "simple", "arch": "sm_90a", "nvrtc": ".".join(map(str, nvrtc.version()))}
    calls = []

    def build() -> bytes:
        calls.append(1)
        return nvrtc.compile_cubin(SIMPLE, name="scale.cu", arch="sm_90a").cubin

    first = cached_build("scale", key, build, describe="scale kernel (sm_90a)")
    second = cached_build("scale", key, build, describe="scale kernel (sm_90a)")
    assert first == second and len(calls) == 1
    _check_cubin(first)
    assert sum("building scale kernel" in r.getMessage() for r in caplog.records) == 1


@needs_nvrtc
def test_compile_with_headers() -> None:
    # The kernel sources are split into headers (merge.cuh includes epilogues.cuh, which
    # includes common.cuh): headers given by name resolve #include, nested ones too, and
    # a header left out is a BuildError that names it.
    source = '#include "outer.h"\nextern "C" __global__ void k(float* x) { x[0] = kOuter; }\n'
    headers = {
        "outer.h": '#pragma once\n#include "inner.h"\nconstexpr float kOuter = 2.0f * kInner;\n',
        "inner.h": "#pragma once\nconstexpr float kInner = 3.0f;\n",
    }
    module = nvrtc.compile_cubin(source, name="headers.cu", arch="sm_90a", headers=headers)
    _check_cubin(module.cubin)
    with pytest.raises(BuildError, match=r"inner\.h"):
        nvrtc.compile_cubin(
            source, name="headers.cu", arch="sm_90a", headers={"outer.h": headers["outer.h"]}
        )
