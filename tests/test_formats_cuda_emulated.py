"""The cuda backend's per-token-group FP8 store (``FP8GroupStore`` in csrc/epilogues.cuh), its
per-token FP8 store (``FP8TokenStore``, the token-tile kernel) and the amax output of every
store on a CPU, bit for bit against the formats' reference quantisers and ``amax_reference``
(docs/contract.md C36 to C40).

Both kernels (two partials, csrc/merge.cuh; stacked or packed partials, csrc/partials.cuh)
are built for the host (tests/cuda_emulator_support.py, tests/cuda_emulation/emulate.cpp:
one OS thread per CUDA thread, warp shuffles, reductions, named barriers and atomics
emulated) and the backend's kernel loader is pointed at them; the rest is the production
path: the call the API builds, the kernel configuration, the packed parameters (with the
scales' layout and the amax output), the grid and the row order. A kernel's float32 result
may differ from the torch reference's by the ulps C23 allows, and a group's scale follows
its amax, so each check runs the same call into a float32 output too and compares the FP8
output, the scales and amax with what the reference makes of that.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import cuda_emulator_support
import pytest
import torch
from cuda_emulator_support import CSRC
from utils import FP8, INF, NAN, assert_bits_equal

from attnmerge import FP8PerToken, FP8PerTokenGroup, FP8Static, Plain, api, dispatch
from attnmerge.call import CallSignature, PartialLayout
from attnmerge.cuda import backend as cuda_backend
from attnmerge.formats import FP8_E4M3_MAX, FP8_GROUP_EPS, FP8_MIN_TOKEN_SCALE, amax_reference

LAYOUTS = ("row_major", "col_major", "col_major_tma")
PACKED = "ue8m0_packed"
SENTINEL = 12345.0  # in float32 scales the store must not write (TMA padding)
INT_SENTINEL = 0x5A5A5A5A  # in packed scales
MARGIN = 8  # sentinel elements before and after the scales' storage


@pytest.fixture(scope="module")
def emulator_dir(tmp_path_factory):
    return cuda_emulator_support.emulator_dir(tmp_path_factory)


@pytest.fixture
def emulated(emulator_dir, monkeypatch):
    """Route the cuda backend's launches of both kernels to host builds; yields the
    configurations launched, in order."""
    return cuda_emulator_support.emulate(emulator_dir, monkeypatch)


def states(form: str, tokens: int, heads: int, head_size: int, seed: int, dtype=torch.bfloat16):
    """(outputs, lses, indptr) of one input form with empty, NaN and infinite entries: two
    partials (the two-partial kernel), K = 3 stacked, or packed rows (0 to 3 a token)."""
    g = torch.Generator().manual_seed(seed)
    k = 2 if form == "pair" else 3
    o = torch.randn(k, tokens, heads, head_size, generator=g) * 4
    lse = torch.randn(k, heads, tokens, generator=g) * 3
    if tokens:
        lse[0, 0, 0] = INF  # an empty partial
        o[1, 0, 0, 5] = NAN  # a NaN in a weighted row: its group's scale is NaN
        lse[:, heads - 1, tokens - 1] = -INF  # an empty row: zeros, the smallest scale
    if tokens > 2:
        lse[1, 0, 1] = NAN  # a NaN LSE: the whole row is NaN
        o[0, 2, 0, head_size - 1] = INF  # an infinite value, weighted: scale +inf
        lse[0, 0, 2] = 50.0
    if form == "pair":
        return [o[0].to(dtype), o[1].to(dtype)], [lse[0], lse[1]], None
    if form == "stacked":
        return o.to(dtype), lse, None
    counts = torch.arange(tokens) % 4  # token 0 has no rows: an empty row
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    n = int(indptr[-1])
    rows = torch.randn(n, heads, head_size, generator=g) * 4
    row_lses = torch.randn(heads, n, generator=g) * 3
    if n > 2:
        rows[1, 0, head_size // 2] = NAN
        row_lses[heads - 1, 2] = INF
    return rows.to(dtype), row_lses, indptr


def run_cuda(outputs, lses, indptr, fmt, *, with_lse=True, P=None, out=None, lse_base="e"):
    """The call the API builds, through the cuda backend's launch path; (out, out_lse)."""
    pair = isinstance(outputs, list)
    if pair:
        tokens, heads, head_size = outputs[0].shape
    else:
        tokens = outputs.shape[1] if indptr is None else indptr.numel() - 1
        heads, head_size = outputs.shape[-2:]
    if out is None:
        out = torch.full((tokens, heads, head_size), 7.0).to(fmt.dtype)
    out_lse = torch.full((heads, tokens), 3.0) if with_lse else None
    if pair:
        call = api._build_call(
            out, outputs[0], lses[0], outputs[1], lses[1], out_lse, P, fmt, lse_base, "cuda",
            real_tensors=True,
        )  # fmt: skip
    else:
        call = api._build_partials_call(
            out, out_lse, outputs, lses, indptr, P, fmt, lse_base, "cuda", real_tensors=True
        )
    cuda_backend.run(call)
    return out, out_lse, call


def group_format(group_size, ue8m0, layout, tokens, heads, head_size):
    """``(format, buffer)``: the format with new scales in ``buffer``, which holds their
    storage (TMA and packed padding included) with MARGIN elements before and after it,
    every element SENTINEL (INT_SENTINEL for packed scales)."""
    fmt = FP8PerTokenGroup(group_size, ue8m0=ue8m0, layout=layout)
    shape, strides, dtype = fmt.scales_layout(tokens, fmt.groups(heads, head_size))
    extent = 1 + sum((n - 1) * st for n, st in zip(shape, strides, strict=True)) if tokens else 0
    fill = SENTINEL if dtype == torch.float32 else INT_SENTINEL
    buffer = torch.full((extent + 2 * MARGIN,), fill, dtype=dtype)
    return dataclasses.replace(fmt, scales=buffer.as_strided(shape, strides, MARGIN)), buffer


def expected_buffer(fmt, before: torch.Tensor, want_scales: torch.Tensor) -> torch.Tensor:
    """The scales' buffer as the torch backend leaves it (``_store_scales``: the scales,
    packed padding zeroed, TMA padding and the margins as they were)."""
    want = before.clone()
    view = want.as_strided(fmt.scales.shape, fmt.scales.stride(), MARGIN)
    dataclasses.replace(fmt, scales=view)._store_scales(want_scales)
    return want


def check_group_store(outputs, lses, indptr, group_size, ue8m0, launched, **kw):
    """Every layout's FP8 output, scales (their whole buffer: padding and margins) and
    output LSE against the reference quantiser of the same call's float32 result; the
    launched kernels are the ones dispatch prepares."""
    merged, merged_lse, _ = run_cuda(outputs, lses, indptr, Plain(torch.float32), **kw)
    tokens, heads, head_size = merged.shape
    for layout in LAYOUTS + ((PACKED,) if ue8m0 else ()):
        fmt, buffer = group_format(group_size, ue8m0, layout, tokens, heads, head_size)
        before = buffer.clone()
        out, out_lse, call = run_cuda(outputs, lses, indptr, fmt, **kw)
        want_q, want_scales = fmt.quantize_with_scales(merged)
        assert_bits_equal(out, want_q, f"{layout}: output")
        assert_bits_equal(buffer, expected_buffer(fmt, before, want_scales), f"{layout}: scales")
        if out_lse is not None:
            assert_bits_equal(out_lse, merged_lse, f"{layout}: output LSE")
        if tokens:
            config = launched[-1]
            assert config in cuda_backend._configs_of(call.signature)  # what prepare builds
            assert config.takes_scale_layout and config.epilogue == "FP8GroupStore"
            flags = f"{str(ue8m0).lower()}, {str(layout == PACKED).lower()}"
            tiled = cuda_backend.groups_in_token_tiles(fmt.key, head_size)
            assert config.whole_tokens == tiled
            flags += ", true>" if tiled else ">"
            assert f"FP8E4M3, {group_size}, {flags}" in config.template_arguments()


SHAPES = [(0, 1), (1, 2), (5, 3), (7, 4)]  # (T, H): none and odd tokens, 1 to 4 heads


@pytest.mark.parametrize("form", ["pair", "stacked", "packed"])
@pytest.mark.parametrize(
    "head_size, group_size, ue8m0",
    [(64, 64, False), (64, 64, True), (128, 64, True), (128, 128, False), (128, 128, True),
     (256, 64, False), (256, 128, True)],
)  # fmt: skip
def test_group_store_is_the_reference_quantiser(emulated, form, head_size, group_size, ue8m0):
    """Groups of 64 and 128 within heads of 64 to 256, fp32 and UE8M0 scales in the three
    float32 layouts and UE8M0 ones packed (G = 1 to 16, padding tokens where T is odd), T = 0
    and odd, H = 1 to 4, empty partials and rows, NaN and infinite LSEs and values; two
    partials (head-major rows where T, H > 1, the output LSE being [H, T]), K = 3 stacked,
    packed rows."""
    for tokens, heads in SHAPES:
        outputs, lses, indptr = states(form, tokens, heads, head_size, tokens * 10 + heads)
        check_group_store(outputs, lses, indptr, group_size, ue8m0, emulated)
    if form == "pair":
        # 16-byte chunks of bf16: 8 to 32 lanes a row, 8 or 16 a group
        assert {c.vec for c in emulated if c.takes_scale_layout} == {8}
    assert emulated, "nothing reached the kernel"


@pytest.mark.parametrize("form", ["pair", "stacked", "packed"])
@pytest.mark.parametrize(
    "head_size, group_size, ue8m0, dtype",
    [(64, 128, True, torch.bfloat16), (16, 64, False, torch.float32)],
)  # fmt: skip
def test_groups_of_whole_heads(emulated, form, head_size, group_size, ue8m0, dtype):
    """Groups of 2 or 4 whole heads (D a power of two dividing G): a group's rows are
    consecutive teams (token-major rows, also where the output LSE is [H, T], and one team
    a row of K partials on small grids), whose lanes reduce its amax together; every
    layout, packed UE8M0 padding included, with empty, NaN and infinite entries."""
    span = group_size // head_size
    for tokens, heads in [(0, span), (1, span), (5, 2 * span), (7, 3 * span)]:
        seed = tokens * 10 + heads
        outputs, lses, indptr = states(form, tokens, heads, head_size, seed, dtype)
        check_group_store(outputs, lses, indptr, group_size, ue8m0, emulated)
    if form == "stacked":  # 12 partials on a small grid: teams would share rows, but not here
        g = torch.Generator().manual_seed(12)
        outputs = (torch.randn(12, 3, 2 * span, head_size, generator=g) * 4).to(dtype)
        lses = torch.randn(12, 2 * span, 3, generator=g) * 3
        lses[0, 0, 0] = NAN
        check_group_store(outputs, lses, None, group_size, ue8m0, emulated)
        assert emulated.launches[-1].fields["split"] == 1
        assert cuda_backend.partials_split(6 * span, emulated[-1].team, 12) > 1
    assert emulated, "nothing reached the kernel"


@pytest.mark.parametrize("form", ["pair", "stacked", "packed"])
@pytest.mark.parametrize(
    "head_size, group_size, ue8m0, dtype, heads",
    [(96, 64, True, torch.bfloat16, 2), (40, 64, False, torch.float32, 8)],
)  # fmt: skip
def test_groups_spanning_heads_unevenly(emulated, form, head_size, group_size, ue8m0, dtype,
                                        heads):  # fmt: skip
    """Groups that span heads without being whole heads (D = 96 in groups of 64, 40 in 64:
    a group across two or three heads, starting mid-head; groups of 128 below) take the
    token tiles, a block a token, where a group is G / VEC consecutive lanes; every layout
    with empty, NaN and infinite entries; amax on the same call, one atomic a block."""
    for tokens, mult in [(0, 1), (1, 1), (5, 2), (7, 1)]:
        seed = tokens * 10 + heads
        outputs, lses, indptr = states(form, tokens, heads * mult, head_size, seed, dtype)
        check_group_store(outputs, lses, indptr, group_size, ue8m0, emulated)
    assert all(c.whole_tokens for c in emulated if c.epilogue == "FP8GroupStore")
    merged, _, _ = run_cuda(outputs, lses, indptr, Plain(torch.float32))
    without, _ = group_format(group_size, ue8m0, "row_major", 7, heads, head_size)
    fmt = dataclasses.replace(without, scales=without.scales.clone(), amax=torch.full((1,), 3e38))
    out_without, _, _ = run_cuda(outputs, lses, indptr, without)
    out, _, _ = run_cuda(outputs, lses, indptr, fmt)
    assert_bits_equal(fmt.amax, amax_reference(merged).reshape(1), "amax")
    assert_bits_equal(out, out_without, "output with amax")
    assert_bits_equal(fmt.scales, without.scales, "scales with amax")
    assert emulated.launches[-1].config.amax and emulated.launches[-1].atomics == 7


@pytest.mark.parametrize(
    "form, dtype, head_size, heads, group_size, vec",
    [
        ("pair", torch.bfloat16, 96, 176, 64, 8),  # 16896 values: past a block's registers
        ("stacked", torch.float32, 96, 4, 128, 4),  # 32 lanes a group
        ("packed", torch.bfloat16, 96, 4, 128, 1),  # misaligned: 128 lanes a group
    ],
)
def test_uneven_groups_past_the_registers_and_across_warps(emulated, form, dtype, head_size,
                                                           heads, group_size, vec):  # fmt: skip
    """Token tiles of uneven groups: chunks past the registers (merged again for the
    store), groups of 32 lanes, and scalar accesses, whose groups of 128 lanes span four
    warps (named barriers of a 128-thread block)."""
    outputs, lses, indptr = states(form, 3, heads, head_size, heads, dtype)
    if vec == 1:
        shifted = torch.empty(outputs.numel() + 1, dtype=dtype)
        outputs = shifted[1:].view(outputs.shape).copy_(outputs)
    check_group_store(outputs, lses, indptr, group_size, True, emulated)
    assert (emulated[-1].vec, emulated[-1].whole_tokens) == (vec, True)


@pytest.mark.parametrize(
    "form, head_size, group_size, ue8m0, with_lse, vec",
    [
        # fp32 into FP8 on a small grid without output LSE: 8-byte chunks, so a group of
        # 128 is 64 lanes (two warps); a team of 128 a row at D = 256
        ("pair", 128, 128, False, False, 2),
        ("pair", 256, 128, True, False, 2),
        # 32 lanes a group of 64 in a team of 128 that loops over the columns (2 passes);
        # 16 lanes at 16-byte chunks, 2 passes, the block's barrier before the output LSE
        ("pair", 320, 64, True, False, 2),
        ("pair", 576, 64, False, True, 4),
        # stacked fp32 at D = 576: 144 chunks, a team of 128 that loops
        ("stacked", 576, 64, True, True, 4),
    ],
)
def test_groups_across_warps_and_column_loops(
    emulated, form, head_size, group_size, ue8m0, with_lse, vec
):
    """Groups whose lanes span warps (their warps' maxima meet in shared memory behind a
    named barrier of the group's warps) and teams of a block that loop over the columns."""
    for tokens, heads in [(3, 2), (1, 3)]:
        outputs, lses, indptr = states(form, tokens, heads, head_size, head_size, torch.float32)
        check_group_store(outputs, lses, indptr, group_size, ue8m0, emulated, with_lse=with_lse)
        assert emulated[-1].vec == vec


@pytest.mark.parametrize(
    "form, head_size, group_size, with_lse",
    [("pair", 64, 64, False), ("pair", 192, 64, True), ("stacked", 128, 128, False),
     ("stacked", 256, 128, True), ("pair", 64, 128, True)],
)  # fmt: skip
def test_misaligned_partials_take_scalar_accesses(emulated, form, head_size, group_size, with_lse):
    """Partials one element off 16-byte alignment take scalar accesses (VEC = 1): a group is
    64 or 128 lanes, two or four warps, and teams of a block loop over D = 192, 256."""
    tokens, heads = 3, 2
    outputs, lses, indptr = states(form, tokens, heads, head_size, 5)
    if form == "pair":
        shifted = torch.empty(outputs[1].numel() + 1, dtype=outputs[1].dtype)
        outputs[1] = shifted[1:].view(outputs[1].shape).copy_(outputs[1])
    else:
        shifted = torch.empty(outputs.numel() + 1, dtype=outputs.dtype)
        outputs = shifted[1:].view(outputs.shape).copy_(outputs)
    check_group_store(outputs, lses, indptr, group_size, True, emulated, with_lse=with_lse)
    assert emulated[-1].vec == 1


def test_prefill_tokens_strides_and_given_scales(emulated):
    """Tokens past prefill_tokens_with_context (token-major rows), strided partials and
    output, and TMA-aligned or packed scales the caller passes in a larger buffer: T = 7
    (one padding token), G = 6 or 3 (packed: the last column holds 2 or 3 groups); two
    partials, and the same two stacked (the K-partial kernel)."""
    tokens, heads, head_size = 7, 3, 128
    g = torch.Generator().manual_seed(11)
    big = torch.randn(2, tokens, heads + 1, head_size + 64, generator=g).to(torch.bfloat16)
    prefix, suffix = big[0, :, :heads, :head_size], big[1, :, 1:, 64:]
    lses = [torch.randn(heads, tokens, generator=g), torch.randn(tokens, heads, generator=g).t()]
    forms = [([prefix, suffix], lses), (torch.stack([prefix, suffix]), torch.stack(lses))]
    for (outputs, form_lses), group_size, layout in itertools.product(
        forms, (64, 128), ("col_major_tma", PACKED)
    ):
        merged, merged_lse, _ = run_cuda(outputs, form_lses, None, Plain(torch.float32), P=4)
        fmt, buffer = group_format(group_size, True, layout, tokens, heads, head_size)
        before = buffer.clone()
        out = torch.zeros(tokens, heads + 2, head_size, dtype=torch.float8_e4m3fn)[:, 1:-1]
        res, res_lse, _ = run_cuda(outputs, form_lses, None, fmt, P=4, out=out)
        want_q, want_scales = fmt.quantize_with_scales(merged)
        assert res is out
        assert_bits_equal(out, want_q, "output")
        assert_bits_equal(buffer, expected_buffer(fmt, before, want_scales), "scales")
        assert_bits_equal(res_lse, merged_lse, "output LSE")


@pytest.mark.parametrize("form", ["pair", "stacked"])
@pytest.mark.parametrize(
    "layout, ue8m0", [("row_major", False), ("row_major", True), (PACKED, True)]
)
def test_special_groups(emulated, form, layout, ue8m0):
    """docs/contract.md C38 in the kernel's store: a NaN in a group gives scale NaN (packed:
    byte 0xFF) and NaN codes; an infinite value scale +inf (0xFF); an empty row zeros and
    the smallest scale (UE8M0: 2^-33, byte 0x5E)."""
    tokens, heads, head_size, group_size = 4, 2, 128, 64
    outputs, lses, _ = states(form, tokens, heads, head_size, 3)
    fmt, _ = group_format(group_size, ue8m0, layout, tokens, heads, head_size)
    out, _, _ = run_cuda(outputs, lses, None, fmt)
    codes = out.view(torch.uint8)
    if layout == PACKED:  # the bytes of groups 0 to 3 of each token (one int32 column)
        exponents = fmt.scales[:, 0].contiguous().view(torch.uint8).reshape(tokens, 4).int()
        scales = torch.where(exponents == 0xFF, NAN, (exponents << 23).view(torch.float32))
        inf_scale = NAN  # UE8M0 has one byte for both
    else:
        scales, inf_scale = fmt.scales, INF
    assert scales[0, 0].isnan() and not scales[0, 1:].isnan().any()  # value NaN at column 5
    assert ((codes[0, 0, :64] & 0x7F) == 0x7F).all()
    assert scales[1, :2].isnan().all() and ((codes[1, 0] & 0x7F) == 0x7F).all()  # NaN LSE
    assert not scales[1, 2:].isnan().any()
    assert_bits_equal(scales[2, 1], torch.tensor(inf_scale), "the scale of an infinite value")
    smallest = torch.tensor(FP8_GROUP_EPS) / torch.tensor(FP8_E4M3_MAX)
    if ue8m0:
        smallest = torch.tensor(2.0**-33)  # 2^ceil(log2(max(1e-10 / 448, 1e-10))): 0x5E
    assert_bits_equal(scales[3, 2:], smallest.expand(2), "empty row's scales")
    assert (codes[3, 1] == 0).all()


def test_scale_layout_in_the_kernel_row_order():
    """The launcher's ScaleLayout: a row's token stride and first column within its token
    along the outer and inner index (swapped for head-major rows), the group stride, 0
    along dimensions of one element; packed scales in bytes, with G, token T - 1's offset
    and the padding tokens after it; past 32 bits a ValueError naming the scales."""

    def layout(fmt, tokens, heads, head_size, head_major=False):
        fmt = fmt.with_scales(tokens, heads, head_size, "meta")
        output = torch.empty(tokens, heads, head_size, device="meta")
        call = SimpleNamespace(output=output, output_format=fmt)
        return tuple(cuda_backend._scale_layout(call, head_major).values())

    col_major = FP8PerTokenGroup(64, layout="col_major")
    assert layout(col_major, 5, 3, 128) == (1, 0, 0, 128, 5, 6, 0, 0)
    assert layout(col_major, 5, 3, 128, head_major=True) == (0, 1, 128, 0, 5, 6, 0, 0)
    assert layout(FP8PerTokenGroup(128), 1, 1, 128) == (0, 0, 0, 0, 0, 1, 0, 0)
    # groups of two heads of 64: [3, 2] row-major, a head 64 columns into its token
    assert layout(FP8PerTokenGroup(128), 3, 4, 64) == (2, 0, 0, 64, 1, 2, 0, 0)
    packed = FP8PerTokenGroup(64, True, PACKED)
    # int32 [5, 2] with strides (1, 8): 4 bytes a token, 32 a column, 3 padding tokens
    assert layout(packed, 5, 3, 128) == (4, 0, 0, 128, 32, 6, 16, 3)
    assert layout(packed, 5, 3, 128, head_major=True) == (0, 4, 128, 0, 32, 6, 16, 3)
    assert layout(packed, 8, 2, 64) == (4, 0, 0, 64, 0, 2, 28, 0)  # one column: no padding
    assert layout(packed, 1, 5, 64) == (0, 0, 0, 64, 16, 5, 0, 3)  # [1, 2], strides (1, 4)
    tokens = 2**32  # col_major: 2^32 elements a group
    fmt = FP8PerTokenGroup(64, layout="col_major").with_scales(tokens, 2, 128, "meta")
    call = SimpleNamespace(output=torch.empty(tokens, 2, 128, device="meta"), output_format=fmt)
    with pytest.raises(ValueError, match=r"scales has strides \(1, 4294967296\)"):
        cuda_backend._scale_layout(call)
    tokens = 2**30 + 1  # packed: token T - 1 lies 2^32 bytes in
    fmt = packed.with_scales(tokens, 1, 64, "meta")
    call = SimpleNamespace(output=torch.empty(tokens, 1, 64, device="meta"), output_format=fmt)
    with pytest.raises(ValueError, match="below 2\\^32 bytes"):
        cuda_backend._scale_layout(call)


_LAYOUT_HARNESS = r"""
#include <cstddef>
#include <cstdio>
#include "partials.cuh"
using namespace attnmerge;
template <typename Params>
void print() {
  typedef WithOutputs<Params, true, true> Both;
  typedef WithOutputs<Params, true, false> Scales;
  typedef WithOutputs<Params, false, true> Amax;
  printf("%zu %zu %zu %zu %zu %zu %zu\n", sizeof(Both), offsetof(Both, scale_layout),
         offsetof(Both, amax), sizeof(Scales), offsetof(Scales, scale_layout), sizeof(Amax),
         offsetof(Amax, amax));
}
template <typename Params>
void print_token() {
  typedef WithOutputs<Params, true, true, TokenScaleLayout> Both;
  typedef WithOutputs<Params, true, false, TokenScaleLayout> Scales;
  printf("%zu %zu %zu %zu %zu\n", sizeof(Both), offsetof(Both, scale_layout),
         offsetof(Both, amax), sizeof(Scales), offsetof(Scales, scale_layout));
}
int main() {
  static_assert(sizeof(KernelArgs<MergeParams, false, false>) == sizeof(MergeParams));
  print<MergeParams>();
  print<PartialsParams>();
  print_token<MergeParams>();
  print_token<PartialsParams>();
  return 0;
}
"""


def test_outputs_follow_the_parameters(tmp_path):
    """The launcher appends the packed ScaleLayout (or a token tile's TokenScaleLayout) and the
    amax output's address to MergeParams or PartialsParams at their alignment and pads to 8
    bytes: WithOutputs' layout as g++ compiles it, in each of its forms."""
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    (tmp_path / "layout.cpp").write_text(_LAYOUT_HARNESS)
    exe = tmp_path / "layout"
    source = tmp_path / "layout.cpp"
    subprocess.run(["g++", "-std=c++17", f"-I{CSRC}", str(source), "-o", str(exe)], check=True)
    printed = subprocess.run([str(exe)], capture_output=True, check=True).stdout.decode()
    scale_layout = dict(zip(cuda_backend.SCALE_LAYOUT.fields, range(1, 9), strict=True))
    scale_bytes = b"".join(i.to_bytes(4, "little") for i in range(1, 9))
    amax_bytes = (0x0102030405060708).to_bytes(8, "little")
    lines = printed.splitlines()
    token_layout = cuda_backend.TOKEN_SCALE_LAYOUT.pack(scale_ub=0x1112131415161718,
                                                        scale_stride_token=7)  # fmt: skip
    blocks = (cuda_backend.PARAMS, cuda_backend.PARTIALS_PARAMS)
    for block, line in zip(blocks, lines[2:], strict=True):
        both, both_scales, both_amax, scales, scales_at = map(int, line.split())
        params = block.pack(**dict.fromkeys(block.fields, 0))
        packed = cuda_backend._with_outputs(params, token_layout, 0x0102030405060708)
        assert (len(packed), both_scales) == (both, -(-block.size // 8) * 8)
        assert packed[both_scales : both_scales + 16] == token_layout
        assert packed[both_amax : both_amax + 8] == amax_bytes
        packed = cuda_backend._with_outputs(params, token_layout, None)
        assert (len(packed), scales_at) == (scales, -(-block.size // 8) * 8)
        assert packed[scales_at : scales_at + 16] == token_layout
    for block, line in zip(
        (cuda_backend.PARAMS, cuda_backend.PARTIALS_PARAMS), lines[:2], strict=True
    ):
        both, both_scales, both_amax, scales, scales_at, amax, amax_at = map(int, line.split())
        params = block.pack(**dict.fromkeys(block.fields, 0))
        packed = cuda_backend._with_outputs(params, scale_layout, 0x0102030405060708)
        assert (len(packed), both_scales) == (both, block.size)
        assert packed[both_scales : both_scales + 32] == scale_bytes
        assert packed[both_amax : both_amax + 8] == amax_bytes
        packed = cuda_backend._with_outputs(params, scale_layout, None)
        assert (len(packed), scales_at) == (scales, block.size)
        assert packed[scales_at : scales_at + 32] == scale_bytes
        packed = cuda_backend._with_outputs(params, None, 0x0102030405060708)
        assert len(packed) == amax and packed[amax_at : amax_at + 8] == amax_bytes


def test_dispatch_serves_groups_within_a_head(clean_dispatch, monkeypatch):
    """The format's gaps are the kernels' (FP8PerTokenGroup.kernel_gap): groups within a head,
    of whole heads or spanning heads unevenly (the token tiles), in every layout, and amax
    of every format, reach the cuda backend."""

    class Serves:
        def unsupported(self, signature):
            return None

    monkeypatch.setitem(dispatch.REGISTRY, "cuda", Serves())

    def reason(fmt, head_size, layout=PartialLayout.SEPARATE):
        dtypes = (torch.bfloat16,) * (2 if layout is PartialLayout.SEPARATE else 1)
        sig = CallSignature(torch.device("cuda"), dtypes, head_size, fmt.key, False, False, layout)
        return dispatch._unsupported("cuda", sig)

    amax = torch.zeros(1)
    for layout in (PartialLayout.SEPARATE, PartialLayout.STACKED, PartialLayout.PACKED):
        for fmt_layout in (*LAYOUTS, PACKED):
            assert reason(FP8PerTokenGroup(128, True, fmt_layout), 256, layout) is None
            assert reason(FP8PerTokenGroup(64, True, fmt_layout, amax=amax), 64, layout) is None
        for fmt in (Plain(torch.float16, amax), FP8Static(torch.ones(1), amax=amax)):
            assert reason(fmt, 128, layout) is None
    assert reason(FP8PerTokenGroup(128), 64) is None  # groups of two heads
    assert reason(FP8PerTokenGroup(128, True, PACKED, amax=amax), 32) is None
    # groups across heads unevenly: the token tiles
    assert reason(FP8PerTokenGroup(64), 96) is None
    assert reason(FP8PerTokenGroup(128, True, PACKED, amax=amax), 192) is None
    assert reason(FP8PerTokenGroup(128), 258) is None  # (past the triton backend's tiles)


@pytest.mark.parametrize(
    "layout, dtype, head_size, group_size, vec, fmt_layout, amax",
    [
        # a group in 16 lanes
        (PartialLayout.SEPARATE, torch.bfloat16, 128, 128, 8, "row_major", False),
        (PartialLayout.SEPARATE, torch.bfloat16, 128, 64, 8, PACKED, True),
        # four warps a group, a loop
        (PartialLayout.SEPARATE, torch.float32, 256, 128, 1, "row_major", False),
        (PartialLayout.SEPARATE, torch.float32, 256, 128, 1, PACKED, False),
        (PartialLayout.STACKED, torch.float16, 576, 64, 8, "row_major", False),
        (PartialLayout.STACKED, torch.float16, 576, 64, 8, PACKED, True),
        (PartialLayout.STACKED, torch.float32, 128, 128, 1, "row_major", True),
    ],
)
def test_group_kernels_compile_with_nvrtc(monkeypatch, tmp_path, layout, dtype, head_size,
                                          group_size, vec, fmt_layout, amax):  # fmt: skip
    """The first-use build (NVRTC, sm_90a) of group-store kernels, which `attnmerge build`
    does not prepare: warp shuffles, the named barrier of groups wider than a warp, packed
    scales' byte stores, and the amax reduction (redux and an atomic max)."""
    from attnmerge.cuda import nvrtc

    if nvrtc.unavailable_reason() is not None:
        pytest.skip(nvrtc.unavailable_reason())
    monkeypatch.setenv("ATTNMERGE_CACHE_DIR", str(tmp_path))
    two = layout is PartialLayout.SEPARATE
    fmt = FP8PerTokenGroup(group_size, True, fmt_layout, amax=torch.zeros(1) if amax else None)
    sig = CallSignature(
        torch.device("cuda"), (dtype,) * (2 if two else 1), head_size, fmt.key, True, False,
        layout,
    )  # fmt: skip
    configs = [c for c in cuda_backend._configs_of(sig) if c.vec == vec]
    assert len(configs) == 1 and configs[0].takes_scale_layout and configs[0].amax == amax
    assert cuda_backend.build_kernel(configs[0], "sm_90a")[:4] == b"\x7fELF"


# ---------------------------------------------------------------------------
# amax (docs/contract.md C39): every store of both kernels reduces max |O| of the float32
# result into the caller's scalar, zeroed by the launch path first.

AMAX_GARBAGE = 3.0e38  # what the amax output holds before a call: the launch path zeroes it


def amax_states(form, tokens, heads, head_size, seed, special, dtype=torch.bfloat16):
    """(outputs, lses, indptr) of one input form with empty partials and an empty row, and
    per ``special``: "finite" nothing more; "inf" an infinite value in a weighted row; "nan"
    a NaN of another payload than the canonical one (sign set, low mantissa bits); "empty"
    every row empty. T >= 1 has the special value."""
    g = torch.Generator().manual_seed(seed)
    k = 2 if form == "pair" else 3
    if form == "packed":
        counts = (torch.arange(tokens) + 1) % 4  # token 3 has no rows: an empty row
        indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        n = int(indptr[-1])
        o = torch.randn(n, heads, head_size, generator=g) * 4
        lse = torch.randn(heads, n, generator=g) * 3
        if n > 2:
            lse[heads - 1, 2] = INF  # an empty partial
        lse_at, o_at = (0, 0), (0, 0, 3)  # token 0's row, head 0
    else:
        indptr = None
        o = torch.randn(k, tokens, heads, head_size, generator=g) * 4
        lse = torch.randn(k, heads, tokens, generator=g) * 3
        if tokens:
            lse[0, 0, 0] = INF  # an empty partial
            lse[:, heads - 1, tokens - 1] = -INF  # an empty row
        t = tokens // 2  # in the last partial, which every token has
        lse_at, o_at = (k - 1, 0, t), (k - 1, t, 0, 3)
    o = o.to(dtype)
    if special == "empty":
        lse.fill_(-INF)
    elif special in ("inf", "nan") and tokens:
        lse[lse_at] = 5.0  # a weight far from 0
        if special == "inf":
            o[o_at] = INF
        elif dtype == torch.float32:  # |x| is 0x7FC00001
            o.view(torch.int32)[o_at] = -0x3FFFFF
        else:  # bf16 0xFFC1: |x| is 0x7FC10000 in float32
            o.view(torch.int16)[o_at] = -0x3F
    if form == "pair":
        return [o[0], o[1]], [lse[0], lse[1]], None
    return o, lse, indptr


def amax_formats(tokens, heads, head_size):
    """Every store as pairs (with amax, without): plain float32 and bf16, static FP8,
    per-group FP8 with float32 and with packed UE8M0 scales (each in its own buffer). The
    amax outputs hold AMAX_GARBAGE."""
    pairs = []
    for fmt in (Plain(torch.float32), Plain(torch.bfloat16), FP8Static(torch.tensor([0.05]))):
        pairs.append((dataclasses.replace(fmt, amax=torch.full((1,), AMAX_GARBAGE)), fmt))
    for ue8m0, layout in ((False, "row_major"), (True, PACKED)):
        fmt, without = (group_format(64, ue8m0, layout, tokens, heads, head_size)[0]
                        for _ in range(2))  # fmt: skip
        pairs.append((dataclasses.replace(fmt, amax=torch.full((1,), AMAX_GARBAGE)), without))
    return pairs


def check_amax(outputs, lses, indptr, fmt, without, launched, **kw):
    """The call with ``fmt`` stores what it stores with ``without`` (the format without
    amax: output, scales, output LSE) and writes amax_reference of the same call's float32
    result into ``fmt.amax``, with one atomic per warp at most (exactly one per warp in the
    K-partial kernel, where every lane of a block reaches the reduction)."""
    merged, _, _ = run_cuda(outputs, lses, indptr, Plain(torch.float32), **kw)
    out_without, lse_without, _ = run_cuda(outputs, lses, indptr, without, **kw)
    out, out_lse, call = run_cuda(outputs, lses, indptr, fmt, **kw)
    name = f"{type(fmt).__name__} {getattr(fmt, 'layout', fmt.dtype)}"
    assert_bits_equal(fmt.amax, amax_reference(merged).reshape(1), f"{name}: amax")
    assert_bits_equal(out, out_without, f"{name}: output")
    if lse_without is not None:
        assert_bits_equal(out_lse, lse_without, f"{name}: output LSE")
    if getattr(fmt, "scales", None) is not None:
        assert_bits_equal(fmt.scales, without.scales, f"{name}: scales")
    if merged.numel():
        launch = launched.launches[-1]
        assert launch.config.amax and launch.config in cuda_backend._configs_of(call.signature)
        warps = launch.grid * cuda_backend.BLOCK_THREADS // 32
        if cuda_emulator_support.is_two_partial(launch.config):
            assert 1 <= launch.atomics <= warps
        else:
            assert launch.atomics == warps


@pytest.mark.parametrize("form", ["pair", "stacked", "packed"])
@pytest.mark.parametrize("special", ["finite", "inf", "nan", "empty"])
def test_amax_of_every_store(emulated, form, special):
    """amax of the float32 result, bit for bit, through every store of both kernels: finite
    values, +inf, NaN (0x7FC00000 whatever the payload), all rows empty (0), T = 0 (0);
    T not a multiple of 4 and G = 2 to 8 (packed scales with padding tokens)."""
    for tokens, heads in [(0, 2), (1, 3), (5, 1), (9, 4)]:
        outputs, lses, indptr = amax_states(form, tokens, heads, 128, tokens + heads, special)
        for fmt, without in amax_formats(tokens, heads, 128):
            check_amax(outputs, lses, indptr, fmt, without, emulated)
            if tokens == 0 or special == "empty":
                assert fmt.amax.item() == 0 and not fmt.amax.signbit()
            elif special == "inf":
                assert fmt.amax.item() == INF
            elif special == "nan":
                assert fmt.amax.view(torch.int32).item() == 0x7FC00000
            else:
                assert 0 < fmt.amax.item() < INF


@pytest.mark.parametrize(
    "dtype, out_dtype, head_size, tokens, heads, with_lse, team",
    [
        # teams within a warp, with idle lanes, and rows that end mid-block (the last block's
        # last teams have none): the warp's mask of lanes is worked out, not __activemask
        (torch.bfloat16, torch.float32, 72, 5, 3, False, 32),  # 18 of 32 lanes
        (torch.bfloat16, torch.bfloat16, 72, 5, 3, False, 16),  # 9 of 16 lanes, 15 of 16 rows
        (torch.bfloat16, torch.bfloat16, 72, 5, 3, True, 16),
        (torch.float32, torch.float32, 2, 37, 1, False, 1),  # a row a lane: warp 1 has 5 rows
        (torch.float32, torch.float32, 8, 7, 3, True, 2),  # head-major rows
        # teams of 64 or 128 lanes, some without columns: the early exit, or (output LSE) not
        (torch.float32, torch.float32, 200, 100, 3, False, 64),  # 50 of 64 lanes
        (torch.float32, torch.float32, 200, 3, 1, False, 128),  # 100 of 128 lanes
        (torch.float32, torch.float32, 456, 3, 1, True, 128),  # 114 of 128 lanes
        (torch.float32, torch.float8_e4m3fn, 576, 3, 2, False, 128),  # a loop over columns
    ],
)
def test_amax_reduction_lanes(emulated, dtype, out_dtype, head_size, tokens, heads, with_lse,
                              team):  # fmt: skip
    """The two-partial kernel's lanes that leave early (no row, no column) take no part in
    the warp's reduction, the others all do (the emulator fails a launch whose mask leaves
    out a lane that takes part or names one that left); the largest value at the last
    column of the last row, and at the first of the first, is found."""
    g = torch.Generator().manual_seed(head_size + tokens)
    for corner in ((tokens - 1, heads - 1, head_size - 1), (0, 0, 0)):
        o = torch.randn(2, tokens, heads, head_size, generator=g)
        o[(1, *corner)] = -1000.0  # the suffix has weight 1 past P, and in empty prefixes
        outputs = [o[0].to(dtype), o[1].to(dtype)]
        # a prefix on the middle tokens only: the corners are the suffix's, unweighted
        lses = [torch.full((heads, tokens), INF), torch.randn(heads, tokens, generator=g)]
        middle = max(1, tokens // 2) - 1
        lses[0][:, 1 : 1 + middle] = torch.randn(heads, middle, generator=g)
        amax = torch.full((1,), AMAX_GARBAGE)
        if out_dtype == FP8:
            without = FP8Static(torch.tensor([4.0]))
            fmt = dataclasses.replace(without, amax=amax)
        else:
            fmt, without = Plain(out_dtype, amax), Plain(out_dtype)
        check_amax(outputs, lses, None, fmt, without, emulated, with_lse=with_lse)
        assert emulated.launches[-1].config.team == team
        assert torch.isclose(amax, torch.tensor(1000.0))


def test_amax_includes_tokens_past_prefill_tokens(emulated):
    """Tokens past prefill_tokens_with_context (the suffix alone) are part of the result,
    and of its amax, in both kernels."""
    tokens, heads, head_size = 6, 2, 64
    g = torch.Generator().manual_seed(5)
    o = torch.randn(2, tokens, heads, head_size, generator=g)
    o[1, tokens - 1, 1, 7] = 300.0  # past P = 3
    lse = torch.randn(2, heads, tokens, generator=g)
    for outputs, lses in (([o[0], o[1]], [lse[0], lse[1]]), (o, lse)):
        amax = torch.full((1,), AMAX_GARBAGE)
        fmt, without = Plain(torch.float16, amax), Plain(torch.float16)
        check_amax(outputs, lses, None, fmt, without, emulated, P=3)
        assert amax.item() == 300.0


def test_eager_launcher_declines_amax(emulated):
    """The eager launcher's plans patch pointers into a stored launch and would not zero
    amax first: the cuda backend gives none for a format with amax."""
    outputs, lses, _ = amax_states("pair", 3, 2, 64, 1, "finite")
    _, _, call = run_cuda(outputs, lses, None, Plain(torch.float32, torch.zeros(1)))
    assert dispatch.REGISTRY["cuda"].eager_plan(b"key", call) is None


def _new_store_configs():
    """The kernels of the stores `attnmerge build` does not prepare: amax of every store,
    per-group FP8 in float32 and packed scales, both kernels, bf16 and fp32 partials, two
    head sizes, with and without the output LSE, every vector width a call can take."""
    amax = torch.zeros(1)
    formats = [
        Plain(torch.float32, amax), Plain(torch.bfloat16, amax),
        FP8Static(torch.ones(1), amax=amax),
        FP8PerTokenGroup(64, True, "row_major", amax=amax),
        FP8PerTokenGroup(128, False, "col_major_tma", amax=amax),
        FP8PerTokenGroup(64, True, PACKED, amax=amax), FP8PerTokenGroup(64, True, PACKED),
        FP8PerTokenGroup(128, True, PACKED),
    ]  # fmt: skip
    layouts = (PartialLayout.SEPARATE, PartialLayout.STACKED)
    found = {}
    for fmt, dtype, layout, head_size, lse in itertools.product(
        formats, (torch.bfloat16, torch.float32), layouts, (128, 576), (False, True)
    ):
        if head_size % getattr(fmt, "group_size", 1):
            continue
        dtypes = (dtype,) * (2 if layout is PartialLayout.SEPARATE else 1)
        sig = CallSignature(torch.device("cuda"), dtypes, head_size, fmt.key, lse, False, layout)
        found.update(dict.fromkeys(cuda_backend._configs_of(sig)))
    return list(found)


def _partial_elements(config) -> tuple[str, ...]:
    return getattr(config, "partial_elements", None) or (config.partial_element,)


def _nvcc_archs() -> list[str]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    return ["sm_80", "sm_90a"] + (["sm_100a"] if "compute_100" in listed else [])


@pytest.mark.parametrize(
    "arch", _nvcc_archs() or [pytest.param("none", marks=pytest.mark.skip(reason="no nvcc"))]
)
def test_new_store_configs_compile_with_nvcc_without_spills(arch, tmp_path):
    """As tests/test_cuda_source.py's check of `attnmerge build`'s configurations, for the
    kernels of the amax reduction, the group stores and the per-token store's token tiles
    of both kernels (launch bounds of their block size): each compiles for every target
    with registers only (no spills, no stack), without warnings. Beyond sm_90a only the
    token tiles of float32 partials, which hold the most registers, and of those for
    stacked or packed partials the 512-thread blocks (128 registers at most), to keep the
    suite's time down."""
    partials_tiles = _partials_token_store_configs()
    configs = _new_store_configs() + _token_store_configs() + partials_tiles
    configs += _uneven_group_configs()
    if arch != "sm_90a":
        configs = [c for c in configs if c.whole_tokens and "F32" in _partial_elements(c)]
        configs = [c for c in configs if c not in partials_tiles or c.team == 512]
    lines = ['#include "partials.cuh"', "namespace attnmerge {"]
    for i, config in enumerate(configs):
        args = config.template_arguments()
        if cuda_emulator_support.is_two_partial(config):
            instance, body = "MergeInstance", "merge_two_rows"
        else:
            instance, body = "PartialsInstance", "merge_partial_rows"
        bounds = f"{instance}<{args}>::kThreads, {instance}<{args}>::kMinBlocks"
        lines.append(f"constexpr int kBounds{i}[2] = {{{bounds}}};")  # commas in a macro
        bounds = f"kBounds{i}[0], kBounds{i}[1]"
        lines.append(
            f'extern "C" __global__ void __launch_bounds__({bounds}) config_{i}('
            f"const {instance}<{args}>::Params p) {{ {body}<{args}>(p); }}"
        )
    source = tmp_path / "instantiate.cu"
    source.write_text("\n".join([*lines, "}"]) + "\n")
    number = arch[3:]
    proc = subprocess.run(
        ["nvcc", "-std=c++17", f"-I{CSRC}", f"-gencode=arch=compute_{number},code={arch}",
         "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(source)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warning" not in proc.stderr, proc.stderr[-4000:]
    frames = dict(
        re.findall(
            r"Function properties for (\w+)\n\s*(\d+ bytes stack frame, \d+ bytes spill)",
            proc.stderr,
        )
    )
    assert len(frames) == len(configs), proc.stderr[-4000:]
    names = {f"config_{i}": c.template_arguments() for i, c in enumerate(configs)}
    bad = {names[f]: v for f, v in frames.items() if v != "0 bytes stack frame, 0 bytes spill"}
    assert not bad, f"kernels with a stack or spills on {arch}: {bad}"


# ---------------------------------------------------------------------------
# Per-token FP8 (docs/contract.md C36, C38, C39, C40): the token-tile kernel (a block holds
# one token, store_token in csrc/merge.cuh) stores FP8TokenStore bit for bit as the
# reference quantiser makes of the kernel's own float32 result.

UB = 3.0  # a scale bound below the values' absmax: values past it saturate to +-448
TOKEN_SCALE_LAYOUTS = {  # name: (shape of T, strides of T) of the scales in their buffer
    "[T]": (lambda t: (t,), lambda t: (1,)),
    "[T, 1]": (lambda t: (t, 1), lambda t: (1, 1)),
    "[T] strided": (lambda t: (t,), lambda t: (3,)),
    "[T, 1] strided": (lambda t: (t, 1), lambda t: (2, 5)),
}


def token_states(tokens, heads, head_size, seed, dtype=torch.bfloat16):
    """Two partials whose tokens are, from token 0: one holding a NaN, one +inf, one -inf,
    one all empty (zeros, the smallest scale), then finite ones; empty partials and an
    empty row among them. T = 1: a finite token."""
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(2, tokens, heads, head_size, generator=g) * 4
    lse = torch.randn(2, heads, tokens, generator=g) * 3
    if tokens > 1:
        lse[:, :, 0] = 1.0  # weights far from 0
        o[1, 0, heads - 1, head_size - 1] = NAN  # token 0: scale NaN
        o[0, 1, 0, 0] = INF  # token 1: scale +inf (with scale_ub: saturates)
        o[1, 2 % tokens, heads // 2, 3] = -INF
        lse[:, :, 1:3] = 2.0
    if tokens > 3:
        lse[:, :, 3] = -INF  # token 3: every row empty
    if tokens > 4:
        lse[0, 0, 4] = INF  # an empty partial
        lse[:, heads - 1, 4] = -INF  # an empty row in a token with values
    return [o[0].to(dtype), o[1].to(dtype)], [lse[0], lse[1]]


def token_format(tokens, layout, scale_ub=None, amax=None):
    """``(format, buffer)``: FP8PerToken with scales of ``layout`` in ``buffer``, SENTINEL
    everywhere, MARGIN elements before and after their extent."""
    shape, strides = (f(tokens) for f in TOKEN_SCALE_LAYOUTS[layout])
    extent = 1 + sum((n - 1) * st for n, st in zip(shape, strides, strict=True)) if tokens else 0
    buffer = torch.full((extent + 2 * MARGIN,), SENTINEL)
    scales = buffer.as_strided(shape, strides, MARGIN)
    return FP8PerToken(scale_ub=scale_ub, scales=scales, amax=amax), buffer


def check_token_store(outputs, lses, launched, *, scale_ub=None, layout="[T, 1]", **kw):
    """The FP8 output, the scales (their whole buffer), amax and the output LSE against the
    reference of the same call's float32 result; the launch is a token tile."""
    merged, merged_lse, _ = run_cuda(outputs, lses, None, Plain(torch.float32), **kw)
    tokens = merged.shape[0]
    amax = torch.full((1,), AMAX_GARBAGE)
    fmt, buffer = token_format(tokens, layout, scale_ub, amax)
    before = buffer.clone()
    out, out_lse, call = run_cuda(outputs, lses, None, fmt, **kw)
    want_q, want_scales = fmt.quantize_with_scales(merged)
    assert_bits_equal(out, want_q, f"{layout}: output")
    want_buffer = before.clone()
    want_buffer.as_strided(fmt.scales.shape, fmt.scales.stride(), MARGIN).copy_(
        want_scales.reshape(fmt.scales.shape)
    )
    assert_bits_equal(buffer, want_buffer, f"{layout}: scales")
    assert_bits_equal(amax, amax_reference(merged).reshape(1), f"{layout}: amax")
    if out_lse is not None:
        assert_bits_equal(out_lse, merged_lse, f"{layout}: output LSE")
    if tokens:
        launch = launched.launches[-1]
        config = launch.config
        assert config.whole_tokens and config.epilogue == "FP8TokenStore" and config.amax
        assert config in cuda_backend._configs_of(call.signature)  # what prepare builds
        assert f"FP8E4M3, {str(scale_ub is not None).lower()}>" in config.template_arguments()
        assert launch.grid == tokens and launch.atomics == tokens  # one atomic a block
    return want_scales


@pytest.mark.parametrize("heads", [1, 3, 8, 32])
@pytest.mark.parametrize("head_size", [64, 128, 256])
def test_token_store_is_the_reference_quantiser(emulated, heads, head_size):
    """H = 1 to 32, D = 64 to 256, T = 0, 1, 5, with and without scale_ub: tokens with NaN
    (scale NaN, NaN codes), +inf and -inf (scale +inf; with scale_ub saturated), all rows
    empty (zeros, the smallest scale), empty partials and rows; amax of the result; the
    output LSE; token-tile blocks of 128 or 256 threads (H * D up to 8192 values)."""
    layouts = list(TOKEN_SCALE_LAYOUTS)
    for i, (tokens, bound) in enumerate(itertools.product((0, 1, 5), (None, UB))):
        outputs, lses = token_states(tokens, heads, head_size, heads * head_size + tokens)
        scale_ub = None if bound is None else torch.tensor([bound])
        scales = check_token_store(
            outputs, lses, emulated, scale_ub=scale_ub, layout=layouts[i % len(layouts)]
        )
        if tokens == 5:
            assert scales[0].isnan()
            bounded = (torch.tensor(UB) / torch.tensor(FP8_E4M3_MAX)).item()  # in float32
            assert scales[1].item() == (INF if bound is None else bounded)
            assert scales[3].item() == FP8_MIN_TOKEN_SCALE
    threads = cuda_backend.token_tile_threads(heads * head_size)
    assert (
        emulated.launches[-1].config.team == threads == (256 if heads * head_size > 4096 else 128)
    )


@pytest.mark.parametrize(
    "heads, head_size, dtype, misaligned, threads, vec",
    [
        (40, 512, torch.bfloat16, False, 512, 8),  # 20480 values: past the registers
        (33, 512, torch.float32, False, 512, 4),  # 16896: 128 chunks merged twice
        (5, 96, torch.float32, True, 128, 1),  # scalar accesses, 480 chunks of 1
        (3, 72, torch.float16, False, 128, 8),  # chunks of 8 on a head of 9
        (1, 200, torch.bfloat16, False, 128, 8),  # a head of 25 chunks
    ],
)
def test_token_tiles_past_the_registers_and_scalar(
    emulated, heads, head_size, dtype, misaligned, threads, vec
):
    """Tokens of more values than a block of 512 keeps in registers (those past them merged
    again for the store, the same bits), fp32 partials, misaligned partials (VEC = 1),
    heads not a multiple of 16 bytes; with prefill_tokens_with_context, with and without
    the output LSE and scale_ub."""
    tokens = 3
    outputs, lses = token_states(tokens, heads, head_size, heads, dtype)
    if misaligned:
        shifted = torch.empty(outputs[0].numel() + 1, dtype=dtype)
        outputs[0] = shifted[1:].view(outputs[0].shape).copy_(outputs[0])
    for P, with_lse, bound in ((None, True, None), (1, False, torch.tensor([UB]))):
        check_token_store(outputs, lses, emulated, scale_ub=bound, P=P, with_lse=with_lse)
        config = emulated.launches[-1].config
        assert (config.team, config.vec, config.write_lse) == (threads, vec, with_lse)


def test_token_store_prefill_tokens_in_place_lse_and_strided_output(emulated):
    """Tokens past prefill_tokens_with_context (the suffix alone, its LSE kept) are stored
    and part of amax; the output LSE written into the suffix's LSE (every read of it before
    the block's second barrier); a strided FP8 output; scale_ub NaN makes every scale NaN."""
    tokens, heads, head_size = 5, 8, 64
    outputs, lses = token_states(tokens, heads, head_size, 7)
    outputs[1][4, 2, 9] = 500.0  # past P = 2: the token's and amax's maximum
    check_token_store(outputs, lses, emulated, P=2)
    merged, merged_lse, _ = run_cuda(outputs, lses, None, Plain(torch.float32), P=2)
    fmt, _ = token_format(tokens, "[T]", torch.tensor([NAN]))
    out = torch.zeros(tokens, heads + 2, head_size, dtype=torch.float8_e4m3fn)[:, 1:-1]
    suffix_lse = lses[1].clone()
    call = api._build_call(
        out, outputs[0], lses[0], outputs[1], suffix_lse, suffix_lse, 2, fmt, "e", "cuda",
        real_tensors=True,
    )  # fmt: skip
    cuda_backend.run(call)
    assert_bits_equal(suffix_lse, merged_lse, "output LSE in place")
    want_q, want_scales = fmt.quantize_with_scales(merged)
    assert want_scales.isnan().all() and fmt.scales.isnan().all()
    assert_bits_equal(out, want_q, "strided output")


def test_token_tile_dispatch_and_eager_plans(clean_dispatch, emulated, monkeypatch):
    """FP8PerToken reaches the cuda backend (the format has a cuda epilogue and no gap), which
    serves it for two separate partials and for stacked and packed ones (token tiles of both
    kernels) and is chosen first; the eager launcher gets no plan for it in any layout (its
    launch has a block a token and a scale bound the plan would not patch)."""
    from attnmerge.cuda import CudaBackend

    monkeypatch.setattr(CudaBackend, "_device_reason", staticmethod(lambda device: None))
    monkeypatch.setattr(cuda_backend, "prepare", lambda index, signature: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def signature(fmt, layout):
        dtypes = (torch.bfloat16,) * (2 if layout is PartialLayout.SEPARATE else 1)
        return CallSignature(torch.device("cuda"), dtypes, 128, fmt.key, False, False, layout)

    for fmt in (FP8PerToken(), FP8PerToken(scale_ub=torch.ones(1), amax=torch.zeros(1))):
        for layout in PartialLayout:
            assert dispatch._unsupported("cuda", signature(fmt, layout)) is None
            run = dispatch.select("auto", signature(fmt, layout))
            assert run == dispatch.REGISTRY["cuda"].run
    outputs, lses = token_states(4, 2, 64, 1)
    counts = torch.tensor([0, 2, 1, 3])
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    forms = [
        (outputs, lses, None),
        (torch.stack(outputs), torch.stack(lses), None),
        (torch.cat([outputs[0], outputs[1][:2]]), torch.cat([lses[0], lses[1][:, :2]], 1), indptr),
    ]
    for form, layout in zip(forms, PartialLayout, strict=True):
        fmt, _ = token_format(4, "[T, 1]", torch.tensor([UB]))
        _, _, call = run_cuda(*form, fmt)
        assert call.signature.layout is layout and emulated.launches[-1].config.whole_tokens
        assert dispatch.REGISTRY["cuda"].eager_plan(b"key", call) is None


def test_token_scale_layout():
    """The launcher's TokenScaleLayout: the bound's address (0 without), the scales' token
    stride (0 for one token); past 32 bits a ValueError naming the scales."""
    fields = cuda_backend.TOKEN_SCALE_LAYOUT

    def layout(fmt, tokens):
        call = SimpleNamespace(output=torch.empty(tokens, 2, 64, device="meta"), output_format=fmt)
        values = fields._struct.unpack(cuda_backend._token_scale_layout(call))
        return dict(zip(fields.fields, values, strict=True))

    ub = torch.ones(1)
    assert fields.fields == ("scale_ub", "scale_stride_token") and fields.size == 16
    assert layout(FP8PerToken(scales=torch.empty(5, 1)), 5) == {
        "scale_ub": 0, "scale_stride_token": 1
    }  # fmt: skip
    strided = torch.empty(12)[::3]
    assert layout(FP8PerToken(ub, scales=strided), 4) == {
        "scale_ub": ub.data_ptr(), "scale_stride_token": 3
    }  # fmt: skip
    assert layout(FP8PerToken(scales=torch.empty(1, 1)[:, :]), 1)["scale_stride_token"] == 0
    huge = torch.empty(2, device="meta").as_strided((2,), (2**32,))
    with pytest.raises(ValueError, match="scales has strides"):
        layout(FP8PerToken(scales=huge), 2)


def _token_store_configs():
    """The token-tile kernels of two separate partials: bf16 and fp32 partials, head sizes of
    128 and 576, with and without the output LSE, scale_ub and amax, every block size and
    vector width a call can take."""
    found = {}
    for ub, amax, dtype, head_size, lse in itertools.product(
        (None, torch.ones(1)), (None, torch.zeros(1)), (torch.bfloat16, torch.float32),
        (128, 576), (False, True),
    ):  # fmt: skip
        fmt = FP8PerToken(scale_ub=ub, amax=amax)
        sig = CallSignature(
            torch.device("cuda"), (dtype, dtype), head_size, fmt.key, lse, False,
            PartialLayout.SEPARATE,
        )  # fmt: skip
        found.update(dict.fromkeys(cuda_backend._configs_of(sig)))
    return list(found)


def _uneven_group_configs():
    """The token tiles of groups spanning heads unevenly (D = 96, G = 64) with every flag,
    bf16 and fp32 partials, two of them and stacked: 512-thread blocks (the most registers
    a thread may have are 128), vector and scalar accesses."""
    fmt = FP8PerTokenGroup(64, True, PACKED, amax=torch.zeros(1))
    found = {}
    for dtype, layout in itertools.product(
        (torch.bfloat16, torch.float32), (PartialLayout.SEPARATE, PartialLayout.STACKED)
    ):
        dtypes = (dtype,) * (2 if layout is PartialLayout.SEPARATE else 1)
        sig = CallSignature(torch.device("cuda"), dtypes, 96, fmt.key, True, False, layout)
        found.update(dict.fromkeys(c for c in cuda_backend._configs_of(sig) if c.team == 512))
    return list(found)


def _partials_token_store_configs():
    """The token-tile kernels of stacked or packed partials (one kernel for both), each
    block size and vector width a call can take, bf16 and fp32 partials, with the output
    LSE, scale_ub and amax (what holds the most registers): the flags change a few
    instructions each, and every configuration costs the suite seconds to compile."""
    fmt = FP8PerToken(scale_ub=torch.ones(1), amax=torch.zeros(1))
    found = {}
    for dtype in (torch.bfloat16, torch.float32):
        sig = CallSignature(
            torch.device("cuda"), (dtype,), 576, fmt.key, True, False, PartialLayout.STACKED
        )
        found.update(dict.fromkeys(cuda_backend._configs_of(sig)))
    return list(found)


def test_token_tile_asks_for_its_rows_before_the_weights(monkeypatch, tmp_path):
    """The production build (NVRTC, sm_90a) of the two-partial token tile of bf16 partials
    at 512 threads: at least four of the eight 16-byte row loads of a thread's held chunks
    are issued before the first exponential (Rows::merge_chunks; loading each chunk after
    the previous one's weights issued two)."""
    from attnmerge.cuda import nvrtc

    if nvrtc.unavailable_reason() is not None:
        pytest.skip(nvrtc.unavailable_reason())
    triton = pytest.importorskip("triton")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("this Triton ships no cuobjdump to read the machine code with")
    monkeypatch.setenv("ATTNMERGE_CACHE_DIR", str(tmp_path))
    sig = CallSignature(
        torch.device("cuda"), (torch.bfloat16,) * 2, 128, FP8PerToken().key, False, False,
        PartialLayout.SEPARATE,
    )  # fmt: skip
    (config,) = [c for c in cuda_backend._configs_of(sig) if (c.team, c.vec) == (512, 8)]
    cubin = tmp_path / "tile.cubin"
    cubin.write_bytes(cuda_backend.build_kernel(config, "sm_90a"))
    sass = subprocess.run(
        [str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    loads = [i for i, line in enumerate(sass) if "LDG.E.128" in line]
    exps = [i for i, line in enumerate(sass) if "MUFU.EX2" in line]
    assert len(loads) >= 8 and exps, sass
    assert sum(i < exps[0] for i in loads) >= 4, [sass[i] for i in sorted(loads + exps)]


@pytest.mark.parametrize(
    "layout, dtype, threads, vec, groups",
    [
        (PartialLayout.SEPARATE, torch.bfloat16, 128, 8, False),
        (PartialLayout.SEPARATE, torch.bfloat16, 512, 1, False),
        (PartialLayout.STACKED, torch.bfloat16, 128, 8, False),
        (PartialLayout.PACKED, torch.float32, 512, 1, False),
        # groups spanning heads unevenly: named barriers of 512 threads at scalar accesses
        (PartialLayout.SEPARATE, torch.bfloat16, 512, 1, True),
        (PartialLayout.STACKED, torch.bfloat16, 256, 8, True),
    ],
)
def test_token_tile_compiles_with_nvrtc(monkeypatch, tmp_path, layout, dtype, threads, vec,
                                        groups):  # fmt: skip
    """The first-use build (NVRTC, sm_90a) of token-tile kernels of both kernels: the block's
    barrier, the warps' maxima in shared memory, redux, the IEEE division per value, launch
    bounds of the block size; per-token scales, or groups across heads (D = 72, G = 64)."""
    from attnmerge.cuda import nvrtc

    if nvrtc.unavailable_reason() is not None:
        pytest.skip(nvrtc.unavailable_reason())
    monkeypatch.setenv("ATTNMERGE_CACHE_DIR", str(tmp_path))
    amax = torch.zeros(1)
    if groups:
        fmt = FP8PerTokenGroup(64, True, PACKED, amax=amax)
    else:
        fmt = FP8PerToken(scale_ub=torch.ones(1), amax=amax)
    dtypes = (dtype,) * (2 if layout is PartialLayout.SEPARATE else 1)
    sig = CallSignature(torch.device("cuda"), dtypes, 72, fmt.key, True, False, layout)
    configs = [c for c in cuda_backend._configs_of(sig) if (c.team, c.vec) == (threads, vec)]
    assert len(configs) == 1 and configs[0].whole_tokens and configs[0].block_threads == threads
    two = cuda_emulator_support.is_two_partial(configs[0])
    assert two == (layout is PartialLayout.SEPARATE)
    assert cuda_backend.build_kernel(configs[0], "sm_90a")[:4] == b"\x7fELF"
