"""The CUDA backend end to end on a CPU: host dispatch + the kernel, emulated.

The kernel source is built for the host (tests/cuda_emulation/emulate.cpp: one OS thread
per CUDA thread, a real barrier for __syncthreads), and the backend's launch is pointed
at it. Everything else is the production path: instance choice (vector width, threads per
row), the packed parameter struct, the grid, and the kernel's indexing, weights, special
values, strides, tail tokens and aliasing. What this cannot show (the GPU's own math
library, PTX conversions, the driver binding) the GPU test suite covers.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from test_fuzz import FUZZ, cases
from utils import FP8, make_case, padded

from attnmerge.cuda import backend as cuda_backend

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent / "src" / "attnmerge" / "cuda" / "csrc"


@pytest.fixture(scope="module")
def emulator_dir(tmp_path_factory) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the kernel emulator")
    return tmp_path_factory.mktemp("cuda_emulation")


class _EmulatedKernel:
    device_index = None  # as the CPU tensors' device index

    def __init__(self, lib: ctypes.CDLL, instance: tuple, launched: list) -> None:
        self._lib = lib
        self._instance = instance
        self._launched = launched

    def launch(self, grid: int, stream: int, params: bytes) -> None:
        assert len(params) == cuda_backend._PARAMS.size == 128
        assert self._lib.emulate_merge(ctypes.c_char_p(params), ctypes.c_uint(grid)) == 0
        self._launched.append(self._instance)


@pytest.fixture
def emulated(emulator_dir, monkeypatch):
    """Route the cuda backend's launches to host builds of the kernel."""

    launched = []  # the instance of every launch, in order

    @functools.cache
    def library(instance) -> ctypes.CDLL:
        name = "_".join(map(str, instance))
        lib = emulator_dir / f"{name}.so"
        if not lib.exists():
            subprocess.run(
                [
                    "g++",
                    "-O1",
                    "-std=c++20",
                    "-pthread",
                    "-shared",
                    "-fPIC",
                    "-ffp-contract=off",
                    f"-I{CSRC}",
                    f"-DATTNMERGE_MERGE_TWO_INSTANCE={cuda_backend.template_arguments(instance)}",
                    str(HERE / "cuda_emulation" / "emulate.cpp"),
                    "-o",
                    str(lib),
                ],
                check=True,
            )
        cdll = ctypes.CDLL(str(lib))
        cdll.emulate_merge.argtypes = [ctypes.c_char_p, ctypes.c_uint]
        return cdll

    def kernel(device_index, instance) -> _EmulatedKernel:
        return _EmulatedKernel(library(instance), instance, launched)

    monkeypatch.setattr(cuda_backend, "_kernel", kernel)
    monkeypatch.setattr(cuda_backend, "_current_raw_stream", lambda index: 0)
    monkeypatch.setattr(cuda_backend, "_current_device", lambda: None)
    # Launchers hold kernels: no real one in an emulated test, and vice versa.
    cuda_backend._launcher.cache_clear()
    yield launched
    cuda_backend._launcher.cache_clear()


def _layout_case(dtype, D, alias, out_dtype=None, nan_frac=0.0):
    """A case for the kernel-layout tests: 11 tokens x 3 heads (a row count no block size
    divides), tail tokens past P = 8, mixed special LSEs, FP8 with a scale of 0.05."""
    scale = 0.05 if out_dtype == FP8 else None
    return make_case(
        11, 3, D, dtype=dtype, out_dtype=out_dtype, scale=scale, alias=alias,
        lse_pattern="mixed", P=8, nan_frac=nan_frac,
    )  # fmt: skip


def _run(case) -> None:
    cuda_backend.merge_two_states(*case.args(), case.lse_base == 2)


def _check(case) -> None:
    _check_against_expected(case, case.expected())


def _check_against_expected(case, expected) -> None:
    _run(case)
    case.check_against(expected)


@pytest.mark.parametrize(
    ("dtype", "out_dtype", "D"),
    [
        (torch.bfloat16, FP8, 128),  # the common case: 32-byte chunks, 8 threads a row
        (torch.float16, torch.float16, 72),  # 16-byte chunks: 72 is no multiple of 16
        (torch.float32, torch.bfloat16, 80),
        (torch.bfloat16, torch.float32, 8),
        (torch.float32, torch.float32, 576),  # 144 chunks: the team of 128 loops
        (torch.float16, FP8, 13),  # odd head size: scalar path
    ],
)
def test_against_reference(emulated, dtype, out_dtype, D):
    scale = 0.05 if out_dtype == FP8 else None
    case = make_case(
        9, 3, D, dtype=dtype, out_dtype=out_dtype, scale=scale, lse_pattern="mixed", P=7
    )
    _check(case)


def test_vector_and_scalar_paths(emulated, monkeypatch):
    # Padded, 16-byte aligned views keep vector accesses (32-byte chunks, or 16-byte ones
    # where the head size needs them); an odd storage offset does not.
    monkeypatch.setattr(cuda_backend, "SMALL_GRID_CHUNKS", {})  # 32-byte chunks here too
    monkeypatch.setattr(cuda_backend, "MAX_STORE_BYTES", 32)  # and for a bf16 output
    H, D = 4, 128
    aligned = make_case(6, H, D, dtype=torch.bfloat16, prefix_strides=padded(H, D, head_pad=8))
    _check(aligned)
    assert emulated[-1][3] == 16
    fallback = make_case(6, H, 72, dtype=torch.bfloat16, prefix_strides=padded(H, 72, 8))
    _check(fallback)
    assert emulated[-1][3] == 8
    odd = make_case(6, H, D, dtype=torch.bfloat16, offsets=(1, 0, 0))
    _check(odd)
    assert emulated[-1][3] == 1
    # the small-grid rule: 16-byte chunks for 2-byte partials, its tiers chosen by
    # whether the call writes the output LSE (make_case's cases do, unless with_lse=False)
    tiers = {(2, False): ((8192, 16),), (2, True): ()}
    monkeypatch.setattr(cuda_backend, "SMALL_GRID_CHUNKS", tiers)
    _check(aligned)
    assert emulated[-1][3] == 16
    no_lse = make_case(
        6, H, D, dtype=torch.bfloat16, prefix_strides=padded(H, D, head_pad=8), with_lse=False
    )
    _check(no_lse)
    assert emulated[-1][3] == 8


@pytest.mark.parametrize(
    ("dtype", "out_dtype", "vec"),
    [
        (torch.bfloat16, FP8, 16),  # 32-byte chunks: one 16-byte FP8 store a thread
        (torch.bfloat16, torch.bfloat16, 8),  # 16-byte chunks: 16 bytes of output
        (torch.bfloat16, torch.float32, 4),  # 8-byte chunks
        (torch.float32, torch.bfloat16, 8),  # 32-byte chunks: 16 bytes of bf16
        (torch.float32, torch.float32, 4),
    ],
)
def test_chunks_capped_at_one_16_byte_store(emulated, monkeypatch, dtype, out_dtype, vec):
    # Large grids' chunks hold at most MAX_STORE_BYTES of output (every grid here).
    monkeypatch.setattr(cuda_backend, "SMALL_GRID_CHUNKS", {})
    scale = 0.05 if out_dtype == FP8 else None
    case = make_case(5, 4, 128, dtype=dtype, out_dtype=out_dtype, scale=scale, lse_pattern="mixed")
    _check(case)
    assert emulated[-1][3] == vec


@pytest.mark.parametrize(
    ("dtype", "D", "team"),
    [
        (torch.bfloat16, 128, 16),  # teams within a warp: a warp barrier before the write
        (torch.float32, 576, 128),  # a team of 128 (the block's barrier) that loops
    ],
)
def test_output_lse_code_only_in_instances_that_write_it(emulated, dtype, D, team):
    # Whether the output LSE is written is part of the kernel instance (a template
    # argument), so a call without one runs none of that code.
    _check(make_case(6, 4, D, dtype=dtype, with_lse=False, lse_pattern="mixed"))
    assert emulated[-1][8] == 0 and emulated[-1][4] == team
    _check(make_case(6, 4, D, dtype=dtype, alias="lse_prefix", lse_pattern="mixed"))
    assert emulated[-1][8] == 1 and emulated[-1][4] == team


@pytest.mark.parametrize("base", ["e", 2])
def test_special_values_and_base(emulated, base):
    case = make_case(
        12, 5, 40, dtype=torch.float32, lse_pattern="mixed", lse_base=base, nan_frac=0.05
    )
    _check(case)
    assert emulated[-1][9] == (base == 2)  # the LSE base is part of the kernel instance


def test_size_one_dimensions_with_strides_past_32_bits(emulated):
    # The kernel's strides are 32-bit. Dimensions of size 1 address nothing, so a stride
    # of 2^32 or more on one (torch leaves such strides after views) is not refused: the
    # call runs with it set to 0.
    case = make_case(1, 3, 64, dtype=torch.bfloat16, out_dtype=FP8, scale=0.05, lse_pattern="mixed")
    expected = case.expected()
    huge = 2**32 + 64
    prefix = case.prefix_output
    case.prefix_output = prefix.as_strided(prefix.shape, (huge, *prefix.stride()[1:]))
    lse = case.output_lse  # [H, T = 1]
    case.output_lse = lse.as_strided(lse.shape, (lse.stride(0), huge))
    _check_against_expected(case, expected)
    assert case.output_lse.stride(1) == huge  # the caller's tensor is left as it was


def test_strides_past_32_bits_are_refused(emulated):
    # A real stride of 2^32 elements or more (token 1 of prefix_output) does not fit the
    # kernel's parameters: a ValueError naming the tensor, before any launch.
    def meta(shape, strides, dtype=torch.bfloat16):
        return torch.empty_strided(shape, strides, dtype=dtype, device="meta")

    output = meta((2, 1, 8), (8, 8, 1))
    prefix = meta((2, 1, 8), (2**32, 8, 1))
    lse = meta((1, 2), (2, 1), torch.float32)
    with pytest.raises(ValueError, match=r"prefix_output has strides \(4294967296, 8, 1\)"):
        cuda_backend.launch_arguments(output, prefix, lse, output, lse, None, None, None, False)
    assert not emulated  # nothing launched


@pytest.mark.parametrize("alias", ["prefix", "suffix", "lse_prefix", "lse_suffix"])
def test_aliasing(emulated, alias):
    # In place: a row's input LSEs are read, and its output LSE written, by one thread;
    # each output chunk by the thread that reads its inputs.
    _check(make_case(16, 3, 256, dtype=torch.float32, alias=alias, lse_pattern="mixed"))


@pytest.mark.parametrize(
    ("dtype", "out_dtype", "D", "vec"),
    [
        (torch.bfloat16, FP8, 128, 16),  # teams of 8 lanes: a warp barrier
        (torch.float32, torch.bfloat16, 64, 8),
        (torch.float32, FP8, 576, 8),  # 72 chunks: a team of 128, the block barrier
    ],
)
@pytest.mark.parametrize("alias", [None, "lse_prefix", "lse_suffix"])
@pytest.mark.parametrize("small_grid_chunks", [True, False])
def test_output_lse_before_or_after_the_combine(
    emulated, monkeypatch, dtype, out_dtype, D, vec, alias, small_grid_chunks
):
    """Output-LSE instances with 32-byte chunks store the output LSE before the combine,
    the others after it (kLseFirst in the kernel): both orders give the reference's
    result, in place too. Without the small-grid tiers these grids take 32-byte chunks."""
    if not small_grid_chunks:
        monkeypatch.setattr(cuda_backend, "SMALL_GRID_CHUNKS", {})
    scale = 0.05 if out_dtype == FP8 else None
    case = make_case(
        9, 3, D, dtype=dtype, out_dtype=out_dtype, scale=scale, lse_pattern="mixed", P=7,
        alias=alias,
    )  # fmt: skip
    _check(case)
    assert (emulated[-1][3] == vec) != small_grid_chunks


@pytest.mark.parametrize(
    ("P", "out_lse_layout", "alias", "head_major"),
    [
        (None, "ht", None, True),
        (11, "ht", "lse_prefix", True),  # P = T: every token has a prefix
        (0, "ht", "prefix", True),  # no token has one
        (None, "ht", "lse_suffix", True),
        (8, "ht", None, False),  # tokens 8.. have none: P x H rows are a row range
        (None, "th", None, False),  # [T, H] output LSEs are contiguous token-major
    ],
)
def test_row_order(emulated, monkeypatch, P, out_lse_layout, alias, head_major):
    """Rows go to the kernel head-major where the output LSE is stored [H, T] and every
    token or none has a prefix (head_major_rows), token-major otherwise; either way
    the result is the reference's, in place too."""
    inner_counts = []  # the kernel's num_heads field: H token-major, T head-major
    launch = _EmulatedKernel.launch

    def recording_launch(self, grid, stream, params):
        inner_counts.append(cuda_backend._PARAMS.unpack(params)[7])
        launch(self, grid, stream, params)

    monkeypatch.setattr(_EmulatedKernel, "launch", recording_launch)
    dtype = torch.bfloat16
    out_dtype = dtype if alias == "prefix" else FP8
    case = make_case(
        11, 3, 64, dtype=dtype, out_dtype=out_dtype, scale=0.05 if out_dtype == FP8 else None,
        lse_pattern="mixed", P=P, alias=alias, lse_layouts=("ht", "ht", out_lse_layout),
    )  # fmt: skip
    _check(case)
    assert inner_counts == [11 if head_major else 3]


def test_head_major_rows_rule():
    """Head-major rows: output LSE [H, T], T > 1, H > 1, a prefix on every token or none,
    and partials of at most HEAD_MAJOR_MAX_PARTIAL_BYTES (past it, HBM-bound, the token
    stride between a block's rows cost more than the LSE stores saved)."""
    rule = cuda_backend.head_major_rows
    limit = cuda_backend.HEAD_MAJOR_MAX_PARTIAL_BYTES
    ht, th = 1, 3  # the output LSE's token stride: [H, T] storage, [T, H] storage
    assert rule(ht, 5, 3, None, limit) and rule(ht, 5, 3, 0, 1) and rule(ht, 5, 3, 5, 1)
    assert not rule(ht, 5, 3, None, limit + 1)
    assert not rule(ht, 5, 3, 4, 1)  # tokens 4.. have no prefix
    assert not rule(th, 5, 3, None, 1)
    assert not rule(None, 5, 3, None, 1)  # no output LSE
    assert not rule(ht, 1, 3, None, 1) and not rule(ht, 5, 1, None, 1)


def test_mixed_partial_dtypes_and_lse_layouts(emulated):
    case = make_case(
        7,
        2,
        64,
        dtype=torch.float16,
        suffix_dtype=torch.float32,
        out_dtype=torch.bfloat16,
        lse_layouts=("th", "ht", "th"),
        lse_pads=(1, 0, 3),
    )
    _check(case)


# Each new kernel instance costs a host compile (~0.5 s), so fewer examples than the
# backends' own fuzz on a CPU.
EMULATED_FUZZ_EXAMPLES = 40


def test_fuzz_against_reference(emulated):
    @seed(20261128)
    @settings(FUZZ, max_examples=EMULATED_FUZZ_EXAMPLES)
    @given(data=st.data())
    def check(data):
        _check(make_case(**data.draw(cases("cpu"))))

    check()
    assert len(emulated) >= EMULATED_FUZZ_EXAMPLES // 2  # most examples reached the kernel


@pytest.mark.parametrize(
    ("dtype", "D", "alias"),
    [
        (torch.bfloat16, 128, "lse_prefix"),  # output LSE in place, weights shared by rows
        (torch.float32, 576, None),  # 144 chunks: each of a team's rows loops
        (torch.float16, 24, "prefix"),  # three 16-byte chunks a row, in place
    ],
)
@pytest.mark.parametrize("grid", ["medium", "large"])
def test_several_rows_per_team(emulated, monkeypatch, dtype, D, alias, grid):
    # Larger grids give each team more rows; force that here on a small grid whose row
    # count is not a multiple of the block's, with tail tokens and special LSEs.
    monkeypatch.setattr(cuda_backend, "SMALL_GRID_ROWS", 0)
    if grid == "large":
        monkeypatch.setattr(cuda_backend, "LARGE_GRID_ROWS", 0)
    case = _layout_case(dtype, D, alias)
    _check(case)
    expected = {"medium": cuda_backend.ROWS_MEDIUM, "large": cuda_backend.ROWS_LARGE}[grid]
    assert emulated[-1][5] == expected > 1


@pytest.mark.parametrize(
    ("dtype", "out_dtype", "D", "alias"),
    [
        (torch.bfloat16, FP8, 128, None),  # 16 (4) elements a thread, 16 (4)-byte FP8 stores
        (torch.float32, torch.float32, 576, "lse_prefix"),  # 72 chunks of 8: the team loops
        (torch.bfloat16, torch.bfloat16, 256, "lse_suffix"),  # 64 threads a row at 8 bytes
        (torch.float16, torch.float16, 48, "prefix"),  # three chunks a row, in place
    ],
)
@pytest.mark.parametrize("chunk_bytes", [8, 32])
def test_other_chunk_sizes(emulated, monkeypatch, dtype, out_dtype, D, alias, chunk_bytes):
    # The variants `attnmerge bench --cuda-chunk-bytes 8,32` times: 8-byte accesses (more
    # threads per row, fewer elements each), or two 16-byte accesses per thread and row
    # chunk, on one and on several rows per team.
    monkeypatch.setattr(cuda_backend, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(cuda_backend, "SMALL_GRID_CHUNKS", {})  # every grid
    monkeypatch.setattr(cuda_backend, "MAX_STORE_BYTES", 32)  # every output dtype
    for rows_forced in (False, True):
        if rows_forced:
            monkeypatch.setattr(cuda_backend, "SMALL_GRID_ROWS", 0)
        _check(_layout_case(dtype, D, alias, out_dtype))
        assert emulated[-1][3] == chunk_bytes // dtype.itemsize


@pytest.mark.parametrize(
    ("dtype", "out_dtype", "D", "alias", "chunk_bytes"),
    [
        (torch.bfloat16, FP8, 128, "lse_prefix", 16),  # output LSE in place: needs the barrier
        (torch.bfloat16, FP8, 128, "lse_suffix", 32),
        (torch.bfloat16, FP8, 128, None, 8),  # 32 threads a row, 4-byte FP8 stores
        (torch.float32, torch.float32, 576, None, 16),  # the team of 128 loops
        (torch.float16, torch.float16, 48, "prefix", 16),  # in place
        (torch.float16, torch.float32, 13, None, 16),  # scalar path
    ],
)
@pytest.mark.parametrize("grid", ["small", "large"])
def test_weights_per_thread(emulated, monkeypatch, dtype, out_dtype, D, alias, chunk_bytes, grid):
    # The variant `attnmerge bench --cuda-thread-weights` times: no weight warp, every
    # thread computes its rows' weights (128-thread blocks).
    monkeypatch.setattr(cuda_backend, "WEIGHTS", cuda_backend.WEIGHTS_PER_THREAD)
    monkeypatch.setattr(cuda_backend, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(cuda_backend, "SMALL_GRID_CHUNKS", {})  # every grid
    monkeypatch.setattr(cuda_backend, "MAX_STORE_BYTES", 32)  # every output dtype
    if grid == "large":
        monkeypatch.setattr(cuda_backend, "SMALL_GRID_ROWS", 0)
        monkeypatch.setattr(cuda_backend, "LARGE_GRID_ROWS", 0)
    _check(_layout_case(dtype, D, alias, out_dtype, nan_frac=0.05))
    assert emulated[-1][6] == cuda_backend.WEIGHTS_PER_THREAD


@pytest.mark.parametrize(
    ("dtype", "out_dtype", "D", "alias", "chunk_bytes"),
    [
        (torch.bfloat16, FP8, 128, "lse_prefix", 32),  # one team of 8 threads a block
        (torch.bfloat16, FP8, 128, None, 8),  # one warp-sized team
        (torch.float32, torch.float32, 576, "lse_suffix", 16),  # 128 threads: one team loops
        (torch.float16, torch.float16, 48, "prefix", 16),  # in place, 4 threads a row
        (torch.float16, torch.float32, 13, None, 16),  # scalar path
    ],
)
@pytest.mark.parametrize("threads", [8, 16, 32])
@pytest.mark.parametrize("weights", ["per_thread", "warp"])
def test_small_blocks(emulated, monkeypatch, dtype, out_dtype, D, alias, chunk_bytes, threads,
                      weights):  # fmt: skip
    # Small grids take blocks of fewer data threads (data_threads): as few as one team,
    # whatever was asked, with either weights mode; odd row counts leave a partial block.
    monkeypatch.setattr(cuda_backend, "SMALL_BLOCK_GRID_ROWS", 10**6)
    monkeypatch.setattr(cuda_backend, "SMALL_BLOCK_THREADS", threads)
    monkeypatch.setattr(cuda_backend, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(cuda_backend, "SMALL_GRID_CHUNKS", {})  # every grid
    monkeypatch.setattr(cuda_backend, "MAX_STORE_BYTES", 32)  # every output dtype
    monkeypatch.setattr(
        cuda_backend, "WEIGHTS", getattr(cuda_backend, f"WEIGHTS_{weights.upper()}")
    )
    _check(_layout_case(dtype, D, alias, out_dtype, nan_frac=0.05))
    team = emulated[-1][4]
    assert emulated[-1][7] == min(max(threads, team), cuda_backend.DATA_THREADS)
