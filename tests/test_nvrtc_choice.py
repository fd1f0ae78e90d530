"""Which libnvrtc the CUDA backend uses: ``nvrtc.choose_library`` on fake library lists
(every branch, CPU only), the version of a library read from its files, the wiring of
``select`` (override, torch's and the driver's versions) and the driver's version query."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnmerge.cuda import driver, nvrtc
from attnmerge.cuda.nvrtc import Candidate, LibraryChoiceError, choose_library

PIP12 = Candidate("/venv/nvidia/cuda_nvrtc/lib/libnvrtc.so.12", (12, 4))
PIP13 = Candidate("/venv/nvidia/cu13/lib/libnvrtc.so.13", (13, 5))
TK122 = Candidate("/usr/local/cuda-12.2/lib64/libnvrtc.so.12", (12, 2, 140))
TK126 = Candidate("/usr/local/cuda-12.6/lib64/libnvrtc.so.12", (12, 6, 77))
TK128 = Candidate("/usr/local/cuda-12.8/lib64/libnvrtc.so.12", (12, 8, 93))
TK118 = Candidate("/usr/local/cuda-11.8/lib64/libnvrtc.so.11.2", (11, 8, 89))
TK130 = Candidate("/usr/local/cuda-13.0/lib64/libnvrtc.so.13", (13, 0, 48))


def _pick(found, torch_cuda, driver_cuda) -> nvrtc.Choice:
    return choose_library(found, torch_cuda, driver_cuda)


# --------------------------------------------------------------------------------------
# torch with CUDA: its major.minor, else its major
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver_cuda", [(12, 4), (12, 8), (13, 0), None])
def test_torch_match_beats_newer(driver_cuda) -> None:
    """torch 2.6.0+cu124 with a CUDA 13 nvidia-cuda-nvrtc installed too: torch's 12.4,
    whatever the driver (newest-wins took 13.5, whose cubins a 12.x driver rejects)."""
    choice = _pick([PIP13, PIP12, TK128], (12, 4), driver_cuda)
    assert choice.path == PIP12.path and choice.version == (12, 4)
    assert choice.why == "matches torch's CUDA 12.4"


def test_torch_match_ignores_patch_and_takes_first_in_search_order() -> None:
    other = Candidate("/opt/cuda/lib64/libnvrtc.so.12.4.131", (12, 4, 131))
    assert _pick([TK126, other, PIP12], (12, 4), (12, 6)).path == other.path


def test_same_major_newest_not_newer_than_driver() -> None:
    choice = _pick([TK128, TK122, TK126, PIP13], (12, 4), (12, 6))
    assert choice.path == TK126.path
    assert "torch's CUDA is 12.4" in choice.why
    assert "the newest 12.x not newer than the driver's CUDA 12.6" in choice.why


def test_same_major_all_newer_than_driver_takes_the_nearest() -> None:
    """Minor-version compatibility: a 12.6 cubin loads on a 12.2 driver; 12.6 is the
    nearest above it."""
    choice = _pick([TK128, TK126, PIP13], (12, 4), (12, 2))
    assert choice.path == TK126.path
    assert "nearest 12.x above the driver's CUDA 12.2" in choice.why
    assert "minor-version compatibility" in choice.why


def test_same_major_without_driver_is_capped_by_torch() -> None:
    choice = _pick([TK126, TK122, PIP13], (12, 4), None)
    assert choice.path == TK122.path
    assert "not newer than torch's 12.4 (no NVIDIA driver found)" in choice.why


def test_same_major_only_major_known() -> None:
    bare = Candidate("/x/libnvrtc.so.12", (12,))
    choice = _pick([PIP13, bare], (12, 4), (12, 4))
    assert choice.path == bare.path


# --------------------------------------------------------------------------------------
# No usable match for torch: the driver decides
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("driver_cuda", "expected"),
    [((12, 4), TK122), ((12, 6), TK126), ((13, 0), TK130), ((13, 9), PIP13), ((11, 8), TK118)],
)
def test_cpu_torch_newest_not_newer_than_driver(driver_cuda, expected) -> None:
    choice = _pick([PIP13, TK130, TK126, TK122, TK118], None, driver_cuda)
    assert choice.path == expected.path
    dotted = f"{driver_cuda[0]}.{driver_cuda[1]}"
    assert (
        choice.why == f"torch is a CPU build: the newest not newer than the driver's CUDA {dotted}"
    )


def test_cpu_torch_driver_major_beats_older_major() -> None:
    """12.8 on a 12.4 driver (minor-version compatibility) rather than 11.8, which cannot
    compile sm_90a."""
    choice = _pick([TK128, TK118], None, (12, 4))
    assert choice.path == TK128.path
    assert "nearest above the driver's CUDA 12.4" in choice.why


def test_torch_major_missing_falls_back_to_driver() -> None:
    choice = _pick([PIP13, TK118], (12, 4), (13, 0))
    assert choice.path == PIP13.path  # 13.5 on a 13.0 driver: minor-version compatibility
    assert choice.why.startswith("none of torch's CUDA 12.x found: ")


def test_torch_newer_than_driver_falls_back_to_driver() -> None:
    choice = _pick([PIP13, PIP12], (13, 0), (12, 6))
    assert choice.path == PIP12.path
    assert choice.why == (
        "torch's CUDA 13.0 is newer than the driver's: "
        "the newest not newer than the driver's CUDA 12.6"
    )


# --------------------------------------------------------------------------------------
# No driver (a build machine, CI): the newest, and say so
# --------------------------------------------------------------------------------------


def test_no_driver_cpu_torch_takes_newest() -> None:
    choice = _pick([TK122, PIP13, TK130], None, None)
    assert choice.path == PIP13.path
    assert choice.why == "torch is a CPU build, no NVIDIA driver found: the newest found"


def test_no_driver_no_torch_match_takes_newest() -> None:
    choice = _pick([TK118, PIP13], (12, 4), None)
    assert choice.path == PIP13.path
    assert "none of torch's CUDA 12.x found" in choice.why and "the newest found" in choice.why


def test_ties_go_to_search_order() -> None:
    twin = Candidate("/other/nvidia/cu13/lib/libnvrtc.so.13", (13, 5))
    assert _pick([PIP13, twin], None, None).path == PIP13.path
    assert _pick([twin, PIP13], None, (13, 5)).path == twin.path


# --------------------------------------------------------------------------------------
# Nothing fits: one line naming what was found, torch's and the driver's CUDA, the fix
# --------------------------------------------------------------------------------------


def test_none_fits_the_driver() -> None:
    with pytest.raises(LibraryChoiceError) as info:
        _pick([PIP13, TK130], (12, 4), (12, 4))
    message = str(info.value)
    assert "\n" not in message
    assert PIP13.path in message and TK130.path in message
    assert "NVRTC 13.5" in message and "NVRTC 13.0" in message
    assert "torch is built with CUDA 12.4" in message
    assert "the NVIDIA driver supports CUDA 12.4" in message
    assert 'pip install "nvidia-cuda-nvrtc-cu12==12.4.*"' in message
    assert "ATTNMERGE_NVRTC_LIBRARY" in message
    assert isinstance(info.value, nvrtc.BuildError)


def test_none_fits_cpu_torch() -> None:
    with pytest.raises(LibraryChoiceError) as info:
        _pick([PIP13], None, (12, 2))
    message = str(info.value)
    assert "torch is a CPU build" in message and "CUDA 12.2" in message
    assert 'pip install "nvidia-cuda-nvrtc-cu12==12.2.*"' in message


@pytest.mark.parametrize(
    ("torch_cuda", "driver_cuda", "hint"),
    [
        (None, None, "pip install nvidia-cuda-nvrtc"),
        ((12, 4), None, 'pip install "nvidia-cuda-nvrtc-cu12==12.4.*"'),
        ((13, 0), (13, 1), 'pip install "nvidia-cuda-nvrtc==13.0.*"'),
        ((13, 0), (12, 8), 'pip install "nvidia-cuda-nvrtc-cu12==12.8.*"'),
        (None, (11, 8), 'pip install "nvidia-cuda-nvrtc-cu11==11.8.*"'),
    ],
)
def test_nothing_found(torch_cuda, driver_cuda, hint) -> None:
    with pytest.raises(LibraryChoiceError) as info:
        _pick([], torch_cuda, driver_cuda)
    message = str(info.value)
    assert message.startswith("libnvrtc not found (searched ")
    assert message.endswith(f"fix: {hint}") and "\n" not in message
    assert ("torch is a CPU build" if torch_cuda is None else "torch is built with CUDA") in message
    assert ("no NVIDIA driver" if driver_cuda is None else "driver supports CUDA") in message


# --------------------------------------------------------------------------------------
# Versions from files, select(), the driver's version
# --------------------------------------------------------------------------------------


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_library_version_from_files(tmp_path: Path) -> None:
    wheel = _touch(tmp_path / "cu13" / "lib" / "libnvrtc.so.13")
    _touch(wheel.parent / "libnvrtc-builtins.so.13.5")
    assert nvrtc._library_version(str(wheel)) == (13, 5)
    toolkit = _touch(tmp_path / "lib64" / "libnvrtc.so.12.4.127")
    assert nvrtc._library_version(str(toolkit)) == (12, 4, 127)
    (tmp_path / "lib64" / "libnvrtc.so.12").symlink_to("libnvrtc.so.12.4.127")
    assert nvrtc._library_version(str(tmp_path / "lib64" / "libnvrtc.so.12")) == (12, 4, 127)
    lonely = _touch(tmp_path / "bare" / "libnvrtc.so.12")
    _touch(lonely.parent / "libnvrtc-builtins.so.11.8")  # another major: not its version
    assert nvrtc._library_version(str(lonely)) == (12,)


def test_candidates_one_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = _touch(tmp_path / "lib64" / "libnvrtc.so.12.6.77")
    (tmp_path / "lib64" / "libnvrtc.so.12").symlink_to(real.name)
    wheel = _touch(tmp_path / "cu13" / "lib" / "libnvrtc.so.13")
    _touch(wheel.parent / "libnvrtc-builtins.so.13.0")
    monkeypatch.setattr(nvrtc, "_pip_candidates", lambda: [str(wheel)])
    toolkit = [str(tmp_path / "lib64" / "libnvrtc.so.12"), str(real)]
    monkeypatch.setattr(nvrtc, "_toolkit_candidates", lambda: toolkit)
    assert nvrtc.candidates() == [
        Candidate(str(wheel), (13, 0)),
        Candidate(toolkit[0], (12, 6, 77)),
    ]


def test_select_override_consults_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden():
        raise AssertionError("consulted despite ATTNMERGE_NVRTC_LIBRARY")

    monkeypatch.setattr(nvrtc, "candidates", forbidden)
    monkeypatch.setattr(driver, "cuda_version", forbidden)
    monkeypatch.setenv("ATTNMERGE_NVRTC_LIBRARY", "/opt/x/libnvrtc.so.12.1.105")
    choice = nvrtc.select()
    assert choice.path == "/opt/x/libnvrtc.so.12.1.105" and choice.version == (12, 1, 105)
    assert choice.why == "set by ATTNMERGE_NVRTC_LIBRARY"


def test_select_passes_torch_and_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATTNMERGE_NVRTC_LIBRARY", raising=False)
    monkeypatch.setattr(nvrtc, "candidates", lambda: [PIP13, PIP12])
    monkeypatch.setattr(nvrtc, "_torch_cuda_version", lambda: (12, 4))
    monkeypatch.setattr(driver, "cuda_version", lambda: (12, 4))
    assert nvrtc.select().path == PIP12.path
    assert nvrtc.find_library() == PIP12.path
    monkeypatch.setattr(nvrtc, "candidates", lambda: [PIP13])
    with pytest.raises(LibraryChoiceError):
        nvrtc.select()
    assert nvrtc.find_library() is None


def test_unavailable_reason_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATTNMERGE_NVRTC_LIBRARY", raising=False)
    monkeypatch.setattr(nvrtc, "candidates", lambda: [PIP13])
    monkeypatch.setattr(nvrtc, "_torch_cuda_version", lambda: (12, 4))
    monkeypatch.setattr(driver, "cuda_version", lambda: (12, 4))
    nvrtc._load.cache_clear()
    try:
        reason = nvrtc.unavailable_reason()
        assert reason is not None and "nvidia-cuda-nvrtc-cu12" in reason
        assert nvrtc.describe() == f"NVRTC unavailable: {reason}"
        with pytest.raises(nvrtc.BuildError, match="NVRTC is unavailable"):
            nvrtc.version()
    finally:
        nvrtc._load.cache_clear()


class _FakeGetVersion:
    """Stands for libcuda's cuDriverGetVersion: writes ``value``, returns ``code``."""

    def __init__(self, value: int, code: int = 0) -> None:
        self.value, self.code = value, code

    def __call__(self, pointer) -> int:
        pointer._obj.value = self.value  # ctypes.byref(x)._obj is x
        return self.code


class _FakeLibcuda:
    def __init__(self, get_version: _FakeGetVersion) -> None:
        self.cuDriverGetVersion = get_version
        self.cuInit = lambda flags: pytest.fail("cuInit called for the version")


@pytest.mark.parametrize(
    ("value", "code", "expected"),
    [(12040, 0, (12, 4)), (13000, 0, (13, 0)), (11080, 0, (11, 8)), (0, 34, None)],
)
def test_driver_version(monkeypatch: pytest.MonkeyPatch, value, code, expected) -> None:
    monkeypatch.setattr(driver, "_library", lambda: _FakeLibcuda(_FakeGetVersion(value, code)))
    driver.cuda_version.cache_clear()
    try:
        assert driver.cuda_version() == expected
    finally:
        driver.cuda_version.cache_clear()


def test_driver_version_without_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> ctypes.CDLL:
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(driver, "_library", missing)
    driver.cuda_version.cache_clear()
    try:
        assert driver.cuda_version() is None
    finally:
        driver.cuda_version.cache_clear()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_import_loads_no_library() -> None:
    """``import attnmerge`` neither chooses nor loads libnvrtc, nor loads libcuda."""
    code = (
        "import attnmerge, attnmerge.cli\n"
        "from attnmerge.cuda import nvrtc, driver\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'libnvrtc' not in maps and 'libcuda' not in maps, maps\n"
        "assert nvrtc._load.cache_info().currsize == 0\n"
        "assert driver.cuda_version.cache_info().currsize == 0\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
