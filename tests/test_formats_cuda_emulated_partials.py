"""The cuda backend's per-token FP8 store (``FP8PerToken``) for stacked and packed partials
on a CPU: the K-partial token-tile kernel (``merge_partial_tokens`` in csrc/partials.cuh, a
block a token through ``store_token``), bit for bit (docs/contract.md C36, C38 to C40).

As in tests/test_formats_cuda_emulated.py, the kernels are built for the host
(tests/cuda_emulator_support.py) and the rest is the production path. Each call is checked
against two references:

- the K-partial row kernel's float32 result of the same call (``merge_partial_rows``,
  whose arithmetic the token tile repeats: the same bits, any LSEs), through the format's
  reference quantiser and ``amax_reference``, and its output LSE;
- where the exponentials are exact (base-2 LSEs a whole number apart), so that the host's
  ``exp2f`` and torch's cannot round apart, the torch backend's result of the same call:
  the FP8 output, the scales and amax bit for bit, the output LSE within the tolerance
  table (a logarithm of a sum).
"""

from __future__ import annotations

import itertools

import cuda_emulator_support
import pytest
import torch
from utils import INF, NAN, assert_bits_equal, assert_lse_close

from attnmerge import FP8PerToken, Plain, api
from attnmerge.cuda import backend as cuda_backend
from attnmerge.formats import FP8_E4M3_MAX, FP8_MIN_TOKEN_SCALE, amax_reference
from attnmerge.reference import BACKEND as TORCH_BACKEND

SENTINEL = 12345.0  # in the scales' buffer, where the store must not write
MARGIN = 8  # sentinel elements before and after the scales' storage
AMAX_GARBAGE = 3.0e38  # what the amax output holds before a call: the launch path zeroes it
CANONICAL_NAN = 0x7FC00000  # the NaN amax_reference returns, and the kernels' amax
UB = 3.0  # a scale bound below the values' absmax: values past it saturate to +-448
BOUNDED = (torch.tensor(UB) / torch.tensor(FP8_E4M3_MAX)).item()  # UB's scale, in float32
TOKEN_SCALE_LAYOUTS = {  # name: (shape of T, strides of T) of the scales in their buffer
    "[T]": (lambda t: (t,), lambda t: (1,)),
    "[T, 1]": (lambda t: (t, 1), lambda t: (1, 1)),
    "[T] strided": (lambda t: (t,), lambda t: (3,)),
    "[T, 1] strided": (lambda t: (t, 1), lambda t: (2, 5)),
}


@pytest.fixture(scope="module")
def emulator_dir(tmp_path_factory):
    return cuda_emulator_support.emulator_dir(tmp_path_factory)


@pytest.fixture
def emulated(emulator_dir, monkeypatch):
    """Route the cuda backend's launches to host builds; yields the configurations
    launched, in order."""
    return cuda_emulator_support.emulate(emulator_dir, monkeypatch)


def run(outputs, lses, indptr, fmt, *, backend="cuda", with_lse=True, P=None, out=None,
        out_lse=None, lse_base="e"):  # fmt: skip
    """The call the API builds for a stacked (``indptr`` None) or packed merge, run by the
    cuda backend's launch path or by the torch backend; ``(out, out_lse, call)``."""
    tokens = outputs.shape[1] if indptr is None else indptr.numel() - 1
    heads, head_size = outputs.shape[-2:]
    if out is None:
        out = torch.full((tokens, heads, head_size), 7.0).to(fmt.dtype)
    if out_lse is None and with_lse:
        out_lse = torch.full((heads, tokens), 3.0)
    call = api._build_partials_call(
        out, out_lse, outputs, lses, indptr, P, fmt, lse_base, backend, real_tensors=True
    )
    (cuda_backend.run if backend == "cuda" else TORCH_BACKEND.run)(call)
    return out, out_lse, call


def token_format(tokens, layout="[T, 1]", scale_ub=None):
    """``(format, buffer)``: FP8PerToken with amax (AMAX_GARBAGE) and scales of ``layout`` in
    ``buffer``, SENTINEL everywhere, MARGIN elements before and after their extent."""
    shape, strides = (f(tokens) for f in TOKEN_SCALE_LAYOUTS[layout])
    extent = 1 + sum((n - 1) * st for n, st in zip(shape, strides, strict=True)) if tokens else 0
    buffer = torch.full((extent + 2 * MARGIN,), SENTINEL)
    scales = buffer.as_strided(shape, strides, MARGIN)
    amax = torch.full((1,), AMAX_GARBAGE)
    return FP8PerToken(scale_ub=scale_ub, scales=scales, amax=amax), buffer


def scales_buffer(fmt, before: torch.Tensor, want_scales: torch.Tensor) -> torch.Tensor:
    """The scales' buffer with ``want_scales`` written where the format's scales are."""
    want = before.clone()
    view = want.as_strided(fmt.scales.shape, fmt.scales.stride(), MARGIN)
    view.copy_(want_scales.reshape(fmt.scales.shape))
    return want


def check_amax(amax: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """amax bit for bit, a NaN the canonical one (assert_bits_equal takes any NaN)."""
    assert_bits_equal(amax, want.reshape(1), what)
    if want.isnan():
        assert amax.view(torch.int32).item() == CANONICAL_NAN, f"{what}: NaN not canonical"


def check_token_store(outputs, lses, indptr, launched, *, exact=False, scale_ub=None,
                      layout="[T, 1]", **kw):  # fmt: skip
    """The token tile's FP8 output, scales (their whole buffer), amax and output LSE bit for
    bit against the reference quantiser of the row kernel's float32 result of the same call
    and its output LSE; with ``exact`` (exponentials exact) against the torch backend's
    result of the same call too. Returns the scales."""
    merged, merged_lse, _ = run(outputs, lses, indptr, Plain(torch.float32), **kw)
    tokens, heads, head_size = merged.shape
    if tokens:
        assert not launched.launches[-1].config.whole_tokens  # the row kernel
    fmt, buffer = token_format(tokens, layout, scale_ub)
    before = buffer.clone()
    out, out_lse, call = run(outputs, lses, indptr, fmt, **kw)
    want_q, want_scales = fmt.quantize_with_scales(merged)
    assert_bits_equal(out, want_q, f"{layout}: output")
    assert_bits_equal(buffer, scales_buffer(fmt, before, want_scales), f"{layout}: scales")
    check_amax(fmt.amax, amax_reference(merged), f"{layout}: amax")
    if out_lse is not None:
        assert_bits_equal(out_lse, merged_lse, f"{layout}: output LSE")
    if tokens:
        launch = launched.launches[-1]
        config = launch.config
        assert not cuda_emulator_support.is_two_partial(config)
        assert config.whole_tokens and config.epilogue == "FP8TokenStore" and config.amax
        assert config.team == cuda_backend.token_tile_threads(heads * head_size)
        assert config.write_lse == (out_lse is not None)
        assert config in cuda_backend._configs_of(call.signature)  # what prepare builds
        assert f"FP8E4M3, {str(scale_ub is not None).lower()}>" in config.template_arguments()
        assert launch.grid == tokens and launch.atomics == tokens  # one atomic a block
    if exact:
        ref_fmt, ref_buffer = token_format(tokens, layout, scale_ub)
        ref_out, ref_lse, _ = run(outputs, lses, indptr, ref_fmt, backend="torch", **kw)
        assert_bits_equal(out, ref_out, f"{layout}: output against the torch backend")
        assert_bits_equal(buffer, ref_buffer, f"{layout}: scales against the torch backend")
        check_amax(fmt.amax, ref_fmt.amax, f"{layout}: amax against the torch backend")
        if out_lse is not None:
            assert_lse_close(out_lse, ref_lse, f"{layout}: output LSE against the torch backend")
    return want_scales


def lse_values(shape, gen, exact: bool) -> torch.Tensor:
    """LSEs: whole numbers in [-6, 6) where ``exact`` (base 2: exact exponentials), else
    normal ones."""
    if exact:
        return torch.randint(-6, 6, shape, generator=gen).float()
    return torch.randn(shape, generator=gen) * 3


def stacked_states(k, tokens, heads, head_size, seed, dtype=torch.bfloat16, exact=False):
    """``(outputs [K, T, H, D], lses [K, H, T])`` whose tokens are, from token 0: one with a
    NaN in a weighted row (scale NaN), one with +inf (scale +inf), one with -inf, one whose
    rows are all empty (-inf and +inf LSEs: zeros, the smallest scale), one with an empty
    partial (+inf) whose row holds NaN and an empty row, one with a NaN LSE (its row NaN),
    one with a partial of weight 0 (its exponential underflows) whose row holds inf, then
    finite ones, the last with -0 in every partial's first column of head 0. K = 1 has no
    partial of weight 0 beside a weighted one."""
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(k, tokens, heads, head_size, generator=g) * 4
    o[:, tokens - 1 :, 0, 0] = -0.0  # weighted -0 in every partial: -0 (the sum starts at -0)
    lse = lse_values((k, heads, tokens), g, exact)
    last = k - 1
    if tokens > 6:
        lse[:, :, 0:3] = 1.0  # weights far from 0
        o[last, 0, heads - 1, head_size - 1] = NAN
        o[0, 1, 0, 0] = INF
        o[last, 2, heads // 2, 3] = -INF
        lse[:, :, 3] = -INF
        lse[0, heads - 1, 3] = INF
        lse[:, heads - 1, 4] = -INF
        lse[last, 0, 5] = NAN
    if tokens > 6 and k > 1:
        lse[0, 0, 4] = INF
        o[0, 4, 0, 1] = NAN
        lse[:, 0, 6] = 0.0
        lse[last, 0, 6] = 200.0  # the others' exponentials are 0 (2^-200 and e^-200)
        o[0, 6, 0, 2] = INF
    return o.to(dtype), lse


def packed_states(counts, heads, head_size, seed, dtype=torch.bfloat16, exact=False,
                  index_dtype=torch.int64):  # fmt: skip
    """``(rows [N, H, D], lses [H, N], indptr)`` of ``counts`` rows a token, with an empty
    row (+inf) holding NaN, a NaN LSE, an empty row of the first token with rows, a row
    whose weight is 0 holding inf, and -0 in every row of the last token (its value -0)."""
    g = torch.Generator().manual_seed(seed)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(counts).cumsum(0)])
    n = int(indptr[-1])
    rows = torch.randn(n, heads, head_size, generator=g) * 4
    rows[int(indptr[-2]) :, 0, 0] = -0.0  # the last token's rows: its value is -0
    lse = lse_values((heads, n), g, exact)
    first = next(i for i, c in enumerate(counts) if c > 1)  # a token with two rows or more
    start = int(indptr[first])
    lse[0, start] = INF
    rows[start, 0, 3] = NAN
    lse[heads - 1, start : start + counts[first]] = -INF  # an empty row
    lse[0, start + 1] = 1.0
    rows[start + 1, 0, 1] = INF  # weighted: the token's scale is +inf
    second = next(i for i, c in enumerate(counts) if c > 2 and i != first)
    start = int(indptr[second])
    lse[0, start] = NAN
    lse[heads - 1, start] = 0.0
    lse[heads - 1, start + 1] = 200.0
    rows[start, heads - 1, 0] = INF  # weight 0
    return rows.to(dtype), lse, indptr.to(index_dtype)


# (heads, head_size, dtype): 8-wide chunks, 4-wide float32 chunks, scalar accesses (a head
# of 13 elements).
SHAPES = [(4, 64, torch.bfloat16), (2, 100, torch.float32), (3, 13, torch.float16)]


@pytest.mark.parametrize("k", [1, 2, 3, 8, 17])
@pytest.mark.parametrize("heads, head_size, dtype", SHAPES)
def test_stacked_token_store(emulated, k, heads, head_size, dtype):
    """K = 1 to 17 stacked partials (one to five of the token tile's batches of 4 rows, one
    to three of the row kernel's 8), vector and scalar accesses, T = 0, 1, 9 with the
    special tokens of stacked_states; base e against the row kernel, base 2 with
    whole-number LSEs against the torch backend too; with and without scale_ub and the
    output LSE, every scales layout."""
    layouts = itertools.cycle(TOKEN_SCALE_LAYOUTS)
    cases = itertools.product((0, 1, 9), ((False, "e"), (True, 2)), (None, UB))
    for i, (tokens, (exact, base), bound) in enumerate(cases):
        outputs, lses = stacked_states(k, tokens, heads, head_size, k + i, dtype, exact)
        scale_ub = None if bound is None else torch.tensor([bound])
        scales = check_token_store(
            outputs, lses, None, emulated, exact=exact, scale_ub=scale_ub,
            layout=next(layouts), lse_base=base, with_lse=i % 3 != 1,
        )  # fmt: skip
        if tokens == 9:
            assert scales[0].isnan() and scales[5].isnan()
            assert scales[1].item() == (INF if bound is None else BOUNDED)
            assert scales[3].item() == FP8_MIN_TOKEN_SCALE
            if k > 1:
                assert scales[4].isfinite() and scales[6].isfinite()


@pytest.mark.parametrize("heads, head_size, dtype", SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_packed_token_store(emulated, heads, head_size, dtype, index_dtype):
    """Packed rows, 0 to 17 a token (tokens without rows: zeros, the smallest scale, LSE
    -inf), int32 and int64 indptr, vector and scalar accesses, base e against the row
    kernel, base 2 with whole-number LSEs against the torch backend too."""
    counts = [0, 3, 1, 17, 2, 0, 8, 4]
    for i, (exact, base) in enumerate(((False, "e"), (True, 2))):
        rows, lses, indptr = packed_states(counts, heads, head_size, i, dtype, exact, index_dtype)
        scale_ub = torch.tensor([UB]) if i else None
        scales = check_token_store(
            rows, lses, indptr, emulated, exact=exact, scale_ub=scale_ub, lse_base=base,
            layout="[T]" if i else "[T, 1] strided",
        )  # fmt: skip
        assert scales[0].item() == scales[5].item() == FP8_MIN_TOKEN_SCALE
        assert scales[1].item() == (INF if scale_ub is None else BOUNDED)
        assert scales[3].isnan() and scales[7].isfinite()


@pytest.mark.parametrize(
    "heads, head_size, dtype, threads, vec",
    [
        (33, 512, torch.float32, 512, 4),  # 16896 values: 128 chunks merged twice
        (40, 512, torch.bfloat16, 512, 8),  # 20480 values: past the registers
        (16, 512, torch.float16, 256, 8),  # 8192 values: 256 threads
        (5, 96, torch.float32, 128, 1),  # misaligned partials: scalar accesses
    ],
)
def test_token_tiles_past_the_registers_and_misaligned(emulated, heads, head_size, dtype,
                                                       threads, vec):  # fmt: skip
    """Tokens of more values than a block of 512 threads keeps in registers (those past them
    merged again for the store, the same bits), 256-thread blocks, misaligned partials;
    stacked (K = 3) and packed, base 2 exact against the torch backend."""
    outputs, lses = stacked_states(3, 2, heads, head_size, heads, dtype, exact=True)
    rows, row_lses, indptr = packed_states([2, 3], heads, head_size, heads, dtype, exact=True)
    if vec == 1:
        shifted = torch.empty(outputs.numel() + 1, dtype=dtype)
        outputs = shifted[1:].view(outputs.shape).copy_(outputs)
        shifted = torch.empty(rows.numel() + 1, dtype=dtype)
        rows = shifted[1:].view(rows.shape).copy_(rows)
    for args, bound in (((outputs, lses, None), None), ((rows, row_lses, indptr), UB)):
        scale_ub = None if bound is None else torch.tensor([bound])
        check_token_store(*args, emulated, exact=True, scale_ub=scale_ub, lse_base=2)
        config = emulated.launches[-1].config
        assert (config.team, config.vec) == (threads, vec)


def test_tokens_past_the_staged_lses(emulated):
    """A token tile stages a token's LSEs in shared memory where its heads times its
    partials fit (kTokenLses, 4096), else each chunk reads them from global memory: packed
    tokens of 2049 rows (4098 LSEs: not staged), 2048 (4096: staged) and 3 over two heads,
    the same bits as the torch backend (base 2, exact)."""
    counts = [2049, 3, 2048]
    rows, lses, indptr = packed_states(counts, 2, 16, 7, torch.bfloat16, exact=True)
    check_token_store(rows, lses, indptr, emulated, exact=True, lse_base=2)
    assert emulated.launches[-1].config.vec == 8


def test_prefill_tokens_in_place_lse_and_flashinfer_layout(emulated):
    """Stacked partials with prefill_tokens_with_context (tokens from P on without the first
    partial: its rows and LSEs there not read); the output LSE written into lses[0] and into
    lses[2] (every read of a token's LSEs before the block's second barrier); FlashInfer's
    [T, K, H, D] / [T, K, H] layout as views; a strided FP8 output; given scales [T] and
    [T, 1]."""
    tokens, heads, head_size, k = 9, 4, 64, 3
    outputs, lses = stacked_states(k, tokens, heads, head_size, 11)
    check_token_store(outputs, lses, None, emulated, P=4)
    exact_outputs, exact_lses = stacked_states(k, tokens, heads, head_size, 12, exact=True)
    check_token_store(exact_outputs, exact_lses, None, emulated, exact=True, P=4, lse_base=2)
    # FlashInfer's layout: the same values, [T, K, H, D] and [T, K, H] storage.
    flash = outputs.transpose(0, 1).contiguous().transpose(0, 1)
    flash_lses = lses.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not flash.is_contiguous() and flash_lses.stride(0) == heads
    for layout in ("[T]", "[T, 1] strided"):
        check_token_store(flash, flash_lses, None, emulated, layout=layout, P=6)
    merged, merged_lse, _ = run(outputs, lses, None, Plain(torch.float32), P=4)
    for alias in (0, 2):
        in_place = lses.clone()
        fmt, _ = token_format(tokens, "[T]", torch.tensor([UB]))
        out = torch.zeros(tokens, heads + 2, head_size, dtype=torch.float8_e4m3fn)[:, 1:-1]
        run(outputs, in_place, None, fmt, out=out, out_lse=in_place[alias], P=4)
        assert_bits_equal(in_place[alias], merged_lse, f"output LSE in lses[{alias}]")
        want_q, want_scales = fmt.quantize_with_scales(merged)
        assert_bits_equal(out, want_q, "strided output")
        assert_bits_equal(fmt.scales, want_scales, "scales")
        check_amax(fmt.amax, amax_reference(merged), "amax")


def test_two_stacked_partials_are_the_two_partial_token_tile(emulated):
    """K = 2 stacked partials store the bits of the two-partial token tile
    (merge_two_tokens) for the same partials: output, scales, amax and output LSE, in both
    LSE bases, special tokens included."""
    tokens, heads, head_size = 9, 3, 64
    for seed, base in ((1, "e"), (2, 2)):
        outputs, lses = stacked_states(2, tokens, heads, head_size, seed)
        fmt, _ = token_format(tokens, "[T]", torch.tensor([UB]))
        out, out_lse, _ = run(outputs, lses, None, fmt, lse_base=base)
        assert emulated.launches[-1].config.whole_tokens
        pair_fmt, _ = token_format(tokens, "[T]", torch.tensor([UB]))
        pair_out = torch.full((tokens, heads, head_size), 7.0).to(pair_fmt.dtype)
        pair_lse = torch.full((heads, tokens), 3.0)
        call = api._build_call(
            pair_out, outputs[0], lses[0], outputs[1], lses[1], pair_lse, None, pair_fmt,
            base, "cuda", real_tensors=True,
        )  # fmt: skip
        cuda_backend.run(call)
        config = emulated.launches[-1].config
        assert cuda_emulator_support.is_two_partial(config) and config.whole_tokens
        assert_bits_equal(out, pair_out, f"base {base}: output")
        assert_bits_equal(fmt.scales, pair_fmt.scales, f"base {base}: scales")
        assert_bits_equal(fmt.amax, pair_fmt.amax, f"base {base}: amax")
        assert_bits_equal(out_lse, pair_lse, f"base {base}: output LSE")
        assert fmt.scales.isnan().any() and (fmt.scales == FP8_MIN_TOKEN_SCALE).any()
