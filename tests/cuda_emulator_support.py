"""The CUDA kernels on a CPU: what the emulated-kernel tests share.

The kernel sources are built for the host (tests/cuda_emulation/emulate.cpp: one OS thread
per CUDA thread, a real barrier for __syncthreads, warp shuffles, reductions and named
barriers emulated, atomics under a mutex), once per kernel configuration, and the cuda
backend's kernel loader (``_kernel``) is pointed at them. Everything else is the production
path: the MergeCall the API builds, the kernel configuration, the packed parameters, the
grid and the row order.

A test module takes the fixtures by defining them from :func:`emulator_dir` and
:func:`emulate`::

    @pytest.fixture(scope="module")
    def emulator_dir(tmp_path_factory):
        return cuda_emulator_support.emulator_dir(tmp_path_factory)

    @pytest.fixture
    def emulated(emulator_dir, monkeypatch):
        return cuda_emulator_support.emulate(emulator_dir, monkeypatch)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

from attnmerge.cuda import backend as cuda_backend

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent / "src" / "attnmerge" / "cuda" / "csrc"
EMULATOR = HERE / "cuda_emulation" / "emulate.cpp"


_DIRECTORIES: dict[int, Path] = {}


def emulator_dir(tmp_path_factory) -> Path:
    """The session's directory of host builds, which every module shares (skips the module
    without g++)."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the kernel emulator")
    key = id(tmp_path_factory)
    if key not in _DIRECTORIES:
        _DIRECTORIES[key] = tmp_path_factory.mktemp("cuda_emulation")
    return _DIRECTORIES[key]


def is_two_partial(config) -> bool:
    return isinstance(config, cuda_backend.KernelConfig)


def struct_of(config):
    """The ParamBlock of the configuration's kernel: MergeParams or PartialsParams."""
    return cuda_backend.PARAMS if is_two_partial(config) else cuda_backend.PARTIALS_PARAMS


def block_size(config) -> int:
    """Bytes of the instance's parameters (WithOutputs in csrc/epilogues.cuh): its struct,
    then the scales' layout where its store writes scales (a per-token TokenScaleLayout),
    then the amax output's address where it reduces amax, each at its alignment, padded to
    8 bytes."""
    size = struct_of(config).size
    if config.output_element.startswith("TokenScales<"):  # at a pointer's alignment
        size = -(-size // 8) * 8 + cuda_backend.TOKEN_SCALE_LAYOUT.size
    elif config.takes_scale_layout:
        size += cuda_backend.SCALE_LAYOUT.size
    if config.amax:
        size = -(-size // 8) * 8 + cuda_backend.AMAX_OUTPUT.size
    return -(-size // 8) * 8


def fields(config, params: bytes) -> dict[str, int]:
    """The fields of the kernel's own struct in a packed parameter block."""
    block = struct_of(config)
    values = block._struct.unpack(params[: block.size])
    return dict(zip(block.fields, values, strict=True))


@functools.cache
def library(directory: Path, template_args: str, two_partial: bool) -> ctypes.CDLL:
    """The host build of one kernel configuration (cached on disk by its arguments)."""
    macro = "ATTNMERGE_MERGE_INSTANCE" if two_partial else "ATTNMERGE_PARTIALS_INSTANCE"
    lib = directory / f"{hashlib.sha256(f'{macro} {template_args}'.encode()).hexdigest()[:20]}.so"
    if not lib.exists():
        subprocess.run(
            ["g++", "-O1", "-std=c++20", "-pthread", "-shared", "-fPIC", "-ffp-contract=off",
             f"-I{CSRC}", f"-D{macro}={template_args}", str(EMULATOR), "-o", str(lib)],
            check=True,
        )  # fmt: skip
    cdll = ctypes.CDLL(str(lib))
    entry = cdll.emulate_merge if two_partial else cdll.emulate_partials
    entry.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint]
    cdll.emulated_atomics.restype = ctypes.c_ulong
    return cdll


class Launched(NamedTuple):
    """One emulated launch: its configuration, grid, the atomics it made and the fields of
    its parameter struct."""

    config: object
    grid: int
    atomics: int
    fields: dict[str, int]


class Emulated(list):
    """The configurations launched, in order; ``launches`` has each launch's details."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[Launched] = []


class EmulatedKernel:
    """Stands in for a loaded kernel (driver.Kernel): launches run the host build."""

    device_index = None  # as the CPU tensors' device index

    def __init__(self, lib: ctypes.CDLL, config, launched: Emulated):
        self._lib, self._config, self._launched = lib, config, launched

    def launch(self, grid: int, stream: int, params: bytes) -> None:
        assert len(params) == block_size(self._config)
        values = fields(self._config, params)
        if self._config.whole_tokens:  # a token tile: one block a token
            assert grid * values["inner_count"] == values["num_rows"]
        else:  # one block per rows_per_block rows (shared by `split` teams each)
            split = values.get("split", 1)
            assert grid == -(-values["num_rows"] * split // self._config.rows_per_block)
        two = is_two_partial(self._config)
        run = self._lib.emulate_merge if two else self._lib.emulate_partials
        threads = ctypes.c_uint(self._config.block_threads)
        assert run(ctypes.c_char_p(params), ctypes.c_uint(grid), threads) == 0, (
            "the emulated launch failed"
        )
        self._launched.append(self._config)
        self._launched.launches.append(
            Launched(self._config, grid, self._lib.emulated_atomics(), values)
        )


def emulate(directory: Path, monkeypatch) -> Emulated:
    """Route the cuda backend's launches of both kernels to host builds; returns the list
    of the configuration of every launch, in order."""
    launched = Emulated()

    def kernel(device_index, config) -> EmulatedKernel:
        lib = library(directory, config.template_arguments(), is_two_partial(config))
        return EmulatedKernel(lib, config, launched)

    monkeypatch.setattr(cuda_backend, "_kernel", kernel)
    monkeypatch.setattr(cuda_backend, "_current_raw_stream", lambda index: 0)
    monkeypatch.setattr(cuda_backend, "_current_device", lambda: None)
    return launched
