"""The CUDA backend end to end on a CPU: host dispatch + the kernel, emulated.

The kernel sources are built for the host (tests/cuda_emulation/emulate.cpp: one OS
thread per CUDA thread, a real barrier for __syncthreads), once per KernelConfig, and the
backend's kernel loader (``_kernel``) is pointed at them. Everything else is the
production path: the MergeCall the public API builds, the kernel configuration (vector
width, threads per row, output LSE, LSE base, epilogue), the packed parameter block, the
grid and row order, and the kernel's indexing, weights, special values, strides, tail
tokens and aliasing. What this cannot show (the GPU's own math library, PTX conversions,
the driver binding) the GPU test suite covers.
"""

from __future__ import annotations

import cuda_emulator_support
import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from test_fuzz import FUZZ, cases
from utils import FP8, make_case, padded

from attnmerge import api, dispatch
from attnmerge.call import MergeCall
from attnmerge.cuda import backend as cuda_backend


@pytest.fixture(scope="module")
def emulator_dir(tmp_path_factory):
    return cuda_emulator_support.emulator_dir(tmp_path_factory)


@pytest.fixture
def emulated(emulator_dir, monkeypatch):
    """Route the cuda backend's launches to host builds of the kernel; yields the list of
    the KernelConfig of every launch, in order."""
    return cuda_emulator_support.emulate(emulator_dir, monkeypatch)


def _layout_case(dtype, D, alias, out_dtype=None, nan_frac=0.0):
    """A case for the kernel-layout tests: 11 tokens x 3 heads (a row count no block's row
    count divides), tail tokens past P = 8, mixed special LSEs, FP8 with a scale of 0.05."""
    scale = 0.05 if out_dtype == FP8 else None
    return make_case(
        11, 3, D, dtype=dtype, out_dtype=out_dtype, scale=scale, alias=alias,
        lse_pattern="mixed", P=8, nan_frac=nan_frac,
    )  # fmt: skip


def _call(case, real_tensors: bool = True) -> MergeCall:
    """The MergeCall the public API builds for the case (every argument checked)."""
    return api._build_call(*case.args(), case.lse_base, "cuda", real_tensors=real_tensors)


def _run(case, **launch_overrides) -> None:
    """Run the case through the cuda backend's own path, or, with ``chunk_bytes`` or
    ``head_major`` given, through launch_arguments with those overrides."""
    call = _call(case)
    if not launch_overrides:
        dispatch.REGISTRY["cuda"].run(call)
        return
    launch = cuda_backend.launch_arguments(call, **launch_overrides)
    assert launch is not None
    launch.kernel.launch(launch.grid, 0, launch.params)


def _check(case, **launch_overrides) -> None:
    _check_against_expected(case, case.expected(), **launch_overrides)


def _check_against_expected(case, expected, **launch_overrides) -> None:
    _run(case, **launch_overrides)
    case.check_against(expected)


@pytest.mark.parametrize(
    ("dtype", "out_dtype", "D"),
    [
        # (chunks of this small grid: 16 bytes of the widest partial, at most 16 of output)
        (torch.bfloat16, FP8, 128),  # the common case: 16 threads a row
        (torch.float16, torch.float16, 72),  # 9 chunks: a team of 16, 7 lanes idle
        (torch.float32, torch.bfloat16, 80),  # 20 chunks: a team of 32, 12 lanes idle
        (torch.bfloat16, torch.float32, 8),  # wider output: 8-byte chunks, teams of 2
        (torch.float32, torch.float32, 576),  # 144 chunks: the team of 128 loops
        (torch.float16, FP8, 13),  # odd head size: scalar path
    ],
)
def test_against_reference(emulated, dtype, out_dtype, D):
    """The backend's own choices (vector width, team, chunk bytes) merge as the reference
    does: 9 tokens x 3 heads, tail tokens past P = 7, every special LSE."""
    scale = 0.05 if out_dtype == FP8 else None
    case = make_case(
        9, 3, D, dtype=dtype, out_dtype=out_dtype, scale=scale, lse_pattern="mixed", P=7
    )
    _check(case)
    assert emulated, "nothing reached the kernel"


def test_vector_and_scalar_paths(emulated, monkeypatch):
    """Padded, 16-byte aligned views keep vector accesses (32-byte chunks, or 16-byte ones
    where the head size needs them); an odd storage offset falls back to scalar ones."""
    monkeypatch.setattr(cuda_backend, "SMALL_GRID_CHUNKS", {})  # 32-byte chunks here too
    monkeypatch.setattr(cuda_backend, "MAX_STORE_BYTES", 32)  # and for a bf16 output
    H, D = 4, 128
    aligned = make_case(6, H, D, dtype=torch.bfloat16, prefix_strides=padded(H, D, head_pad=8))
    _check(aligned)
    assert emulated[-1].vec == 16
    fallback = make_case(6, H, 72, dtype=torch.bfloat16, prefix_strides=padded(H, 72, 8))
    _check(fallback)
    assert emulated[-1].vec == 8
    odd = make_case(6, H, D, dtype=torch.bfloat16, offsets=(1, 0, 0))
    _check(odd)
    assert emulated[-1].vec == 1 and emulated[-1].team == cuda_backend.BLOCK_THREADS
    # the small-grid rule: 16-byte chunks for 2-byte partials, its tiers chosen by
    # whether the call writes the output LSE (make_case's cases do, unless with_lse=False)
    tiers = {(2, False): ((8192, 16),), (2, True): ()}
    monkeypatch.setattr(cuda_backend, "SMALL_GRID_CHUNKS", tiers)
    _check(aligned)
    assert emulated[-1].vec == 16
    no_lse = make_case(
        6, H, D, dtype=torch.bfloat16, prefix_strides=padded(H, D, head_pad=8), with_lse=False
    )
    _check(no_lse)
    assert emulated[-1].vec == 8


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
    """Large grids' chunks hold at most MAX_STORE_BYTES of output (every grid here, with
    the small-grid tiers off), and merge as the reference does."""
    monkeypatch.setattr(cuda_backend, "SMALL_GRID_CHUNKS", {})
    scale = 0.05 if out_dtype == FP8 else None
    case = make_case(5, 4, 128, dtype=dtype, out_dtype=out_dtype, scale=scale, lse_pattern="mixed")
    _check(case)
    assert emulated[-1].vec == vec


@pytest.mark.parametrize(
    ("dtype", "D", "team"),
    [
        (torch.bfloat16, 128, 16),  # teams within a warp: a warp barrier before the write
        (torch.float32, 576, 128),  # a team of 128 (the block's barrier) that loops
    ],
)
def test_output_lse_code_only_in_configs_that_write_it(emulated, dtype, D, team):
    """Whether the output LSE is written is part of the kernel configuration (a template
    argument), so a call without one runs none of that code; both merge correctly."""
    _check(make_case(6, 4, D, dtype=dtype, with_lse=False, lse_pattern="mixed"))
    assert not emulated[-1].write_lse and emulated[-1].team == team
    _check(make_case(6, 4, D, dtype=dtype, alias="lse_prefix", lse_pattern="mixed"))
    assert emulated[-1].write_lse and emulated[-1].team == team


@pytest.mark.parametrize("base", ["e", 2])
def test_special_values_and_base(emulated, base):
    """Special LSEs and NaN/inf in the rows, in either LSE base (a template argument)."""
    case = make_case(
        12, 5, 40, dtype=torch.float32, lse_pattern="mixed", lse_base=base, nan_frac=0.05
    )
    _check(case)
    assert emulated[-1].lse_base_2 == (base == 2)


def test_size_one_dimensions_with_strides_past_32_bits(emulated):
    """The kernel's strides are 32-bit. Dimensions of size 1 address nothing, so a stride
    of 2^32 or more on one (torch leaves such strides after views) is not refused: the
    call runs with it set to 0."""
    case = make_case(1, 3, 64, dtype=torch.bfloat16, out_dtype=FP8, scale=0.05, lse_pattern="mixed")
    expected = case.expected()
    huge = 2**32 + 64
    prefix = case.prefix_output
    case.prefix_output = prefix.as_strided(prefix.shape, (huge, *prefix.stride()[1:]))
    lse = case.output_lse  # [H, T = 1]
    case.output_lse = lse.as_strided(lse.shape, (lse.stride(0), huge))
    _check_against_expected(case, expected)
    assert len(emulated) == 1
    assert case.output_lse.stride(1) == huge  # the caller's tensor is left as it was


def test_strides_past_32_bits_are_refused(emulated):
    """A real stride of 2^32 elements or more (token 1 of prefix_output) does not fit the
    kernel's parameters: a ValueError naming the tensor, before any launch."""

    def meta(shape, strides, dtype=torch.bfloat16):
        return torch.empty_strided(shape, strides, dtype=dtype, device="meta")

    output = meta((2, 1, 8), (8, 8, 1))
    prefix = meta((2, 1, 8), (2**32, 8, 1))
    lse = meta((1, 2), (2, 1), torch.float32)
    # meta tensors have no memory: the call is built without the aliasing checks
    call = api._build_call(
        output, prefix, lse, output, lse, None, None, None, "e", "cuda", real_tensors=False
    )
    with pytest.raises(ValueError, match=r"prefix_output has strides \(4294967296, 8, 1\)"):
        cuda_backend.launch_arguments(call)
    assert not emulated  # nothing launched


@pytest.mark.parametrize("alias", ["prefix", "suffix", "lse_prefix", "lse_suffix"])
def test_aliasing(emulated, alias):
    """In place: a row's input LSEs are read, and its output LSE written, by one team;
    each output chunk by the thread that reads its inputs."""
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
    """Output-LSE kernels with 32-byte chunks store the output LSE before the combine,
    the others after it (kLseFirst in the kernel): both orders give the reference's
    result, in place too. Without the small-grid tiers these grids take 32-byte chunks
    (``vec`` elements of the widest partial)."""
    if not small_grid_chunks:
        monkeypatch.setattr(cuda_backend, "SMALL_GRID_CHUNKS", {})
    scale = 0.05 if out_dtype == FP8 else None
    case = make_case(
        9, 3, D, dtype=dtype, out_dtype=out_dtype, scale=scale, lse_pattern="mixed", P=7,
        alias=alias,
    )  # fmt: skip
    _check(case)
    config = emulated[-1]
    assert config.write_lse and (config.vec == vec) != small_grid_chunks
    # kLseFirst: 32-byte chunks, i.e. exactly the grids without the small-grid tiers
    assert (config.vec * dtype.itemsize >= 32) != small_grid_chunks


def _record_inner_counts(monkeypatch) -> list[int]:
    """The kernel's inner_count of every emulated launch: H token-major, T head-major."""
    inner_counts = []
    kernel = cuda_emulator_support.EmulatedKernel
    launch = kernel.launch

    def recording_launch(self, grid, stream, params):
        inner_counts.append(cuda_emulator_support.fields(self._config, params)["inner_count"])
        launch(self, grid, stream, params)

    monkeypatch.setattr(kernel, "launch", recording_launch)
    return inner_counts


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
    inner_counts = _record_inner_counts(monkeypatch)
    dtype = torch.bfloat16
    out_dtype = dtype if alias == "prefix" else FP8
    case = make_case(
        11, 3, 64, dtype=dtype, out_dtype=out_dtype, scale=0.05 if out_dtype == FP8 else None,
        lse_pattern="mixed", P=P, alias=alias, lse_layouts=("ht", "ht", out_lse_layout),
    )  # fmt: skip
    _check(case)
    assert inner_counts == [11 if head_major else 3]


@pytest.mark.parametrize(
    ("P", "out_lse_layout", "alias", "head_major"),
    [
        (None, "th", None, True),  # [T, H] output LSE, which the rule sends token-major
        (7, "th", "lse_suffix", True),  # in place, P = T
        (0, None, "prefix", True),  # no output LSE, no prefix, output in place
        (None, "ht", "lse_prefix", False),  # one the rule sends head-major
        (0, "ht", None, False),  # P = 0, which the rule sends head-major too
    ],
)
def test_forced_row_order(emulated, monkeypatch, P, out_lse_layout, alias, head_major):
    """Either row order merges every call whose first partial is on every token or none
    (launch_arguments' head_major override, against head_major_rows' choice), with 7
    tokens x 5 heads: neither count divides the other or the block's rows."""
    inner_counts = _record_inner_counts(monkeypatch)
    T, H, dtype = 7, 5, torch.float16
    out_dtype = dtype if alias == "prefix" else FP8
    case = make_case(
        T, H, 48, dtype=dtype, out_dtype=out_dtype, scale=0.05 if out_dtype == FP8 else None,
        lse_pattern="mixed", P=P, alias=alias, with_lse=out_lse_layout is not None,
        lse_layouts=("th", "ht", out_lse_layout or "ht"),
    )  # fmt: skip
    _check(case, head_major=head_major)
    assert inner_counts == [T if head_major else H]


def test_head_major_rows_need_a_whole_row_range_with_a_first_partial(emulated):
    """Head-major rows test the first partial on the row index: forcing them on a call
    whose first partial covers some tokens but not all is refused, before any launch."""
    case = make_case(7, 5, 48, dtype=torch.float16, P=3)
    with pytest.raises(ValueError, match="head-major rows need a first partial"):
        cuda_backend.launch_arguments(_call(case), head_major=True)
    assert not emulated


def test_head_major_rows_rule():
    """Head-major rows: output LSE [H, T], T > 1, H > 1, a prefix on every token or none,
    and partials of at most HEAD_MAJOR_MAX_PARTIAL_BYTES (past it, HBM-bound, the token
    stride between a block's rows cost more than the LSE stores saved)."""
    rule = cuda_backend.head_major_rows
    limit = cuda_backend.HEAD_MAJOR_MAX_PARTIAL_BYTES
    ht, th = 1, 3  # the output LSE's token stride: [H, T] storage, [T, H] storage
    assert rule(ht, 5, 3, 5, limit) and rule(ht, 5, 3, 0, 1)
    assert not rule(ht, 5, 3, 5, limit + 1)
    assert not rule(ht, 5, 3, 4, 1)  # tokens 4.. have no prefix
    assert not rule(ht, 5, 3, 1, 1)
    assert not rule(th, 5, 3, 5, 1)
    assert not rule(None, 5, 3, 5, 1)  # no output LSE
    assert not rule(ht, 1, 3, 1, 1) and not rule(ht, 5, 1, 5, 1)


def test_mixed_partial_dtypes_and_lse_layouts(emulated):
    """Partials of different dtypes (each read in its own element type) and LSEs stored
    [T, H] or [H, T], padded."""
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
    assert emulated[-1].partial_elements == ("F16", "F32")


# Each new kernel configuration costs a host compile (~1 s), so fewer examples than the
# backends' own fuzz on a CPU.
EMULATED_FUZZ_EXAMPLES = 40


def test_fuzz_against_reference(emulated):
    """Random shapes, dtypes, strides, layouts, special values and aliasing (the fuzz's
    cases) through the emulated kernel."""

    @seed(20261128)
    @settings(FUZZ, max_examples=EMULATED_FUZZ_EXAMPLES)
    @given(data=st.data())
    def check(data):
        _check(make_case(**data.draw(cases("cpu"))))

    check()
    assert len(emulated) >= EMULATED_FUZZ_EXAMPLES // 2  # most examples reached the kernel


@pytest.mark.parametrize(
    ("dtype", "out_dtype", "D", "alias"),
    [
        (torch.bfloat16, FP8, 128, None),  # 4 to 16 elements a thread, FP8 stores of as many
        (torch.float32, torch.float32, 576, "lse_prefix"),  # 72+ chunks: the team loops
        (torch.bfloat16, torch.bfloat16, 256, "lse_suffix"),  # 64 threads a row at 8 bytes
        (torch.float16, torch.float16, 48, "prefix"),  # 3 to 12 threads a row, in place
        (torch.float16, torch.float32, 13, None),  # scalar path whatever the chunk
    ],
)
@pytest.mark.parametrize("chunk_bytes", [8, 16, 32])
def test_chunk_sizes(emulated, dtype, out_dtype, D, alias, chunk_bytes):
    """Every chunk size the launcher can pick or be told (launch_arguments' chunk_bytes:
    the variants `attnmerge bench` times), uncapped by MAX_STORE_BYTES: 8-byte accesses
    (more threads a row, fewer elements each), 16, or two 16-byte accesses per thread and
    row chunk, with special values in the rows and tail tokens."""
    _check(_layout_case(dtype, D, alias, out_dtype, nan_frac=0.05), chunk_bytes=chunk_bytes)
    config = emulated[-1]
    assert config.vec == (1 if D == 13 else chunk_bytes // dtype.itemsize)
    assert config.team == min(
        cuda_backend.BLOCK_THREADS, 1 << (-(-D // config.vec) - 1).bit_length()
    )
