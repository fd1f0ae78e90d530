"""Dynamic FP8 output formats and amax (docs/contract.md C36 to C41).

``FP8PerToken`` and ``FP8PerTokenGroup`` quantise the float32 merge result with scales the
store computes, bit-identical to vLLM 0.34.0's quantisers for the same float32 values:

* ``FP8PerToken``: ``dynamic_per_token_scaled_fp8_quant`` (csrc/quantization/w8a8/fp8/
  common.cu): ``scale = max(min(amax, scale_ub) / 448, 1 / (448 * 512))``, then a
  division per element;
* ``FP8PerTokenGroup``: ``per_token_group_quant_fp8`` (csrc/quantization/w8a8/fp8/
  per_token_group_quant.cu): ``s = max(amax, 1e-10) / 448``, UE8M0 rounds ``s`` up to a
  power of two, then one reciprocal per group and a product per element.

The tests check the torch backend (the reference) three ways: a table of small cases whose
bytes and scales are derived by hand below; an independent float64 re-implementation of
vLLM's arithmetic on random merges (K = 1, 2, 3, 5, stacked and packed partials, tokens
past ``prefill_tokens_with_context``, every layout); and the storage of each scale layout.
Then the checks (C41) and the dispatch (the triton kernels refuse groups whose heads and
groups meet only past their tiles, ``lcm(D, G) > 16384``, with a reason, so ``auto`` takes
torch on a CPU and ``backend="triton"`` raises).
vLLM deviates on NaN (its ``fmaxf``/``fminf`` drop NaN): here NaN stays visible (C38), and
the tables say so.

Values enter through a merge of one partial with LSE 0: its weight is exp(0) / 1 = 1, so
the merge result is the partial's float32 row exactly (C32).
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from utils import FP8, INF, NAN, ON_GPU, assert_bits_equal, fp8_codes

import attnmerge
from attnmerge import FP8PerToken, FP8PerTokenGroup, FP8Static, Plain, dispatch
from attnmerge.call import CallSignature

DEVICES = ["cpu", "cuda"] if ON_GPU else ["cpu"]
#: vLLM's eps = 1e-10, passed to its kernels as a float32
EPS32 = float(torch.tensor(1e-10, dtype=torch.float32))


def bits(t: torch.Tensor) -> list[int]:
    """float32 values as their bit patterns (unsigned)."""
    return [b & 0xFFFFFFFF for b in t.float().contiguous().view(torch.int32).flatten().tolist()]


def merge_one(rows: torch.Tensor, quant, **kw) -> attnmerge.MergeResult:
    """The merge of the single partial ``rows`` ([T, H, D] float32): its rows, exactly."""
    lse = torch.zeros(rows.shape[1], rows.shape[0], device=rows.device)
    return attnmerge.merge([rows], [lse], quant=quant, backend="torch", **kw)


def assert_codes(q: torch.Tensor, expected: list[list[int | None]]) -> None:
    """Per token, the FP8 codes of its first values (None: NaN, either code); the rest 0
    unless the token's row is NaN throughout."""
    codes = fp8_codes(q.reshape(q.shape[0], -1))
    for t, row in enumerate(expected):
        got = codes[t].tolist()
        if row == [None]:  # the whole row (or group) NaN
            assert all(c & 0x7F == 0x7F for c in got), (t, got)
            continue
        for j, want in enumerate(row):
            assert (got[j] & 0x7F == 0x7F) if want is None else got[j] == want, (t, j, got[j])
        assert all(c == 0 for c in got[len(row) :]), (t, got)


# ---------------------------------------------------------------------------
# Hand-derived cases. e4m3fn codes used: 448 = 0x7E, -448 = 0xFE, 224 = 0x76,
# -224 = 0xF6, 112 = 0x6E, 10 = 0x52, 2 = 0x40, 1.875 = 0x3F, 1.25 = 0x3A, 1 = 0x38,
# -1.5 = 0xBC, 320 = 0x7A, 288 = 0x79, -0 = 0x80; NaN = 0x7F or 0xFF (both NaN).

#: FP8_MIN_TOKEN_SCALE: 1 / (448 * 512) = 1 / (7 * 2**15); float32(1 / 7) = 0x3E124925,
#: and 2**-15 lowers the biased exponent 0x7C by 15 to 0x6D: 0x36924925.
MIN_TOKEN_SCALE_BITS = 0x36924925
#: float32(1e-10) = 0x2EDBE6FF; divided by 448 and rounded to nearest: 0x2A7B5123.
ZERO_GROUP_SCALE_BITS = 0x2A7B5123
#: UE8M0 of a zero group: max(eps / 448, 1e-10) = 1e-10 = 1.718 * 2**-34 (biased exponent
#: 0x5D, mantissa not 0) rounds up to 2**-33: biased exponent 0x5E, float32 0x2F000000.
ZERO_GROUP_UE8M0_BITS = 0x2F000000
#: a = 2296 = 448 * 5.125, so scale = 5.125 exactly. 9.9296875 / 5.125 = 1.9375, halfway
#: between the e4m3 values 1.875 (mantissa 7) and 2 (mantissa 0): a division (per-token)
#: ties to even, 2 (0x40); float32(1 / 5.125) is below 1 / 5.125, so the reciprocal's
#: product (per-token-group) is 1.93749988, which rounds to 1.875 (0x3F).
TIE_AMAX, TIE_VALUE = 2296.0, 9.9296875
#: s = 2**16 * (1 + 2**-21) (a = 448 * s, exact in float32): rounded up exactly it is
#: 2**17 (vLLM's register and packed kernels' bit arithmetic; log2f rounds
#: log2(s) = 16 + 6.9e-7 to 16 in float32, which would give 2**16).
BIG_AMAX = 448.0 * 2**16 * (1 + 2**-21)


def test_per_token_hand_table():
    """docs/contract.md C36, C38: per-token scales and codes derived by hand."""
    x = torch.zeros(5, 2, 4)
    x[0, 0, :3] = torch.tensor([448.0, -224.0, 1.0])  # amax 448: scale 1, values as they are
    x[1, 0, :2] = torch.tensor([1792.0, 448.0])  # amax 448 * 4: scale 4; 448 / 4 = 112
    # x[2]: zeros, as an all-empty row gives: the smallest scale, zeros
    x[3, 0, :2] = torch.tensor([TIE_AMAX, TIE_VALUE])  # scale 5.125; the tie divides to 2
    x[4, 1, 3] = NAN  # a NaN: scale NaN, the whole row NaN (vLLM's fmaxf would drop it)
    res = merge_one(x, FP8PerToken())
    assert res.scales.shape == (5, 1) and res.scales.dtype == torch.float32
    scales = res.scales.flatten()
    assert bits(scales[:4]) == [0x3F800000, 0x40800000, MIN_TOKEN_SCALE_BITS, 0x40A40000]
    assert scales[4].isnan()
    assert_codes(res.output, [[0x7E, 0xF6, 0x38], [0x7E, 0x6E], [], [0x7E, 0x40], [None]])


def test_per_token_scale_ub_and_infinity():
    """docs/contract.md C36, C38: scale_ub bounds the absmax (values past it saturate to
    +-448); an infinite element gives scale +inf, a NaN code there and 0 elsewhere,
    unless scale_ub bounds it."""
    x = torch.zeros(2, 1, 8)
    x[0, 0, :3] = torch.tensor([1000.0, 10.0, -2000.0])
    x[1, 0, :2] = torch.tensor([INF, 1.0])
    ub = torch.tensor([448.0])
    res = merge_one(x, FP8PerToken(scale_ub=ub))
    assert bits(res.scales) == [0x3F800000, 0x3F800000]  # min(amax, 448) / 448 = 1
    assert_codes(res.output, [[0x7E, 0x52, 0xFE], [0x7E, 0x38]])
    res = merge_one(x[1:], FP8PerToken())
    assert res.scales.item() == INF
    assert_codes(res.output, [[None, 0x00]])  # inf / inf = NaN, 1 / inf = 0
    res = merge_one(x[:1], FP8PerToken(scale_ub=torch.tensor([NAN])))
    assert res.scales.isnan().all()  # a NaN bound makes the scale NaN


#: Two groups of 64 per token (H = 2, D = 64); per token, (group 0, group 1) values.
GROUP_ROWS = [
    ([896.0, -3.0], [0.0]),  # amax 448 * 2: s = 2, 896 / 2 = 448, -3 / 2 = -1.5; zeros
    ([TIE_AMAX, TIE_VALUE], [NAN, 1.0]),  # s = 5.125, the tie's product 1.875; NaN group
    ([672.0, 672.0], [INF, 1.0]),  # s = 1.5 (UE8M0: 2); +inf: s = +inf, codes NaN, 0
    ([BIG_AMAX], [-0.0]),  # s = 2**16 (1 + 2**-21) (UE8M0: 2**17); -0 stays -0
]


def group_rows() -> torch.Tensor:
    x = torch.zeros(4, 2, 64)
    for t, groups in enumerate(GROUP_ROWS):
        for g, values in enumerate(groups):
            x[t, g, : len(values)] = torch.tensor(values)
    return x


def test_per_token_group_hand_table():
    """docs/contract.md C37, C38: fp32 scales and codes derived by hand. 672 * float32(1 /
    1.5) = 448.0000134 rounds to 448 in float32; 2296 * float32(1 / 5.125) rounds to
    e4m3 448; BIG_AMAX * float32(1 / s) to 448."""
    res = merge_one(group_rows(), FP8PerTokenGroup(64))
    s = res.scales
    assert s.shape == (4, 2) and s.stride() == (2, 1)
    assert bits(s[:, 0]) == [
        0x40000000,
        0x40A40000,
        0x3FC00000,
        bits(torch.tensor(BIG_AMAX / 448))[0],
    ]
    assert bits(s[0:1, 1]) + bits(s[3:4, 1]) == [ZERO_GROUP_SCALE_BITS] * 2
    assert s[1, 1].isnan() and s[2, 1].item() == INF
    q = res.output.reshape(4, 2, 64)
    assert_codes(q[:, 0], [[0x7E, 0xBC], [0x7E, 0x3F], [0x7E, 0x7E], [0x7E]])
    assert_codes(q[:, 1], [[], [None], [None, 0x00], [0x80]])


def test_per_token_group_ue8m0_hand_table():
    """docs/contract.md C37: UE8M0 scales, rounded up exactly: 2 stays 2; 5.125 -> 8 (2296 /
    8 = 287 -> 288, 9.93 / 8 = 1.241 -> 1.25); 1.5 -> 2 (672 / 2 = 336, halfway between 320
    and 352: to even, 320); 2**16 (1 + 2**-21) -> 2**17 (BIG_AMAX / 2**17 = 224.0001 ->
    224); zero groups 2**-33. The packed layout holds the biased exponents: 0x80 (2),
    0x82 (8), 0x90 (2**17), 0x5E (2**-33), 0xFF (NaN and +inf, UE8M0's NaN)."""
    expected_scales = [[2.0, 2.0**-33], [8.0, NAN], [2.0, INF], [2.0**17, 2.0**-33]]
    expected_q0 = [[0x7E, 0xBC], [0x79, 0x3A], [0x7A, 0x7A], [0x76]]
    for layout in ("row_major", "ue8m0_packed"):
        res = merge_one(group_rows(), FP8PerTokenGroup(64, ue8m0=True, layout=layout))
        q = res.output.reshape(4, 2, 64)
        assert_codes(q[:, 0], expected_q0)
        assert_codes(q[:, 1], [[], [None], [None, 0x00], [0x80]])
        if layout == "row_major":
            assert_bits_equal(res.scales, torch.tensor(expected_scales), "scales")
            assert bits(res.scales[0, 1]) == [ZERO_GROUP_UE8M0_BITS]
        else:  # one int32 per token (G = 2 <= 4): bytes 0 and 1, little-endian
            assert res.scales.dtype == torch.int32 and res.scales.shape == (4, 1)
            words = [w & 0xFFFFFFFF for w in res.scales.flatten().tolist()]
            assert words == [0x5E80, 0xFF82, 0xFF80, 0x5E90]


def test_empty_rows_give_zeros_and_the_smallest_scale():
    """docs/contract.md C38 (C5, C6): all partials empty: zeros, the smallest scale, no NaN;
    a zero-weight partial's NaN row adds nothing."""
    o = torch.randn(2, 3, 2, 64)
    o[0, 1] = NAN  # token 1's first partial: NaN row, but empty (LSE -inf)
    lse = torch.randn(2, 2, 3)
    lse[:, :, 0] = -INF  # token 0: all empty
    lse[0, :, 1] = INF  # +inf: empty too (C4)
    for quant, smallest in (
        (FP8PerToken(), MIN_TOKEN_SCALE_BITS),
        (FP8PerTokenGroup(128), ZERO_GROUP_SCALE_BITS),
        (FP8PerTokenGroup(64, ue8m0=True), ZERO_GROUP_UE8M0_BITS),
    ):
        res = attnmerge.merge(o, lse, quant=quant)
        assert (fp8_codes(res.output[0]) == 0).all()
        assert set(bits(res.scales[0])) == {smallest}
        assert not res.output.float().isnan().any() and not res.scales.isnan().any()


# ---------------------------------------------------------------------------
# An independent float64 re-implementation of vLLM's arithmetic. Every float32 operation
# of the kernels is one IEEE operation on float32 operands; computed in float64 and then
# rounded to float32 it gives the same bits (53 >= 2 * 24 + 2), and products of two
# float32 values are exact in float64.


def r32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).to(torch.float64)


def e4m3_f64(y: torch.Tensor) -> torch.Tensor:
    """Round float64 ``y`` to the nearest e4m3fn value, ties to even, saturating to
    +-448; NaN stays NaN. (Not torch's cast: the quantum of each binade, rounded.)"""
    y = y.clamp(-448.0, 448.0)
    _, e = torch.frexp(y)  # |y| = m * 2**e, m in [0.5, 1): the binade of 2**(e - 1)
    quantum = torch.ldexp(torch.ones_like(y), torch.clamp(e - 1, min=-6) - 3)
    return torch.copysign(torch.round(y.abs() / quantum) * quantum, y)


def vllm_per_token_f64(x: torch.Tensor, scale_ub: float | None = None):
    """``ref_dynamic_per_token_quant`` (vLLM tests/kernels/quant_utils.py) in float64."""
    x = x.double().reshape(x.shape[0], -1)
    a = x.abs().amax(dim=1)
    if scale_ub is not None:
        a = torch.minimum(a, torch.tensor(scale_ub, dtype=torch.float64))
    scale = torch.clamp(r32(a / 448.0), min=r32(torch.tensor(1.0 / (448.0 * 512.0))).item())
    return e4m3_f64(r32(x / scale[:, None])), scale


def vllm_per_token_group_f64(x: torch.Tensor, group_size: int, ue8m0: bool):
    """vLLM's ``per_token_group_quant_8bit_kernel`` in float64: scales ``[T, G]``."""
    x = x.double().reshape(x.shape[0], -1, group_size)
    s = r32(torch.clamp(x.abs().amax(dim=2), min=EPS32) / 448.0)
    if ue8m0:  # 2 ** ceil(log2(max(s, 1e-10))): frexp's mantissa is 0.5 for powers of two
        m, e = torch.frexp(torch.clamp(s, min=EPS32))
        power = r32(torch.ldexp(torch.ones_like(s), torch.where(m == 0.5, e - 1, e)))
        s = torch.where(s.isfinite(), power, s)
    inv = r32(1.0 / s)
    return e4m3_f64(r32(x * inv[:, :, None])), s


def packed_words(s: torch.Tensor) -> torch.Tensor:
    """The int32 words of the UE8M0 packed layout for power-of-two scales ``[T, G]``."""
    _, e = torch.frexp(s)
    exponent = torch.where(s.isfinite(), e + 126, 255).long()  # 2**k: frexp's e is k + 1
    words = torch.zeros(s.shape[0], -(-s.shape[1] // 4), dtype=torch.long)
    for g in range(s.shape[1]):
        words[:, g // 4] += exponent[:, g] << (8 * (g % 4))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


FORMATS = {
    "token": lambda **kw: FP8PerToken(**kw),
    "token_ub": lambda **kw: FP8PerToken(scale_ub=torch.tensor([3.0]), **kw),
    "g64_row": lambda **kw: FP8PerTokenGroup(64, **kw),
    "g128_col": lambda **kw: FP8PerTokenGroup(128, layout="col_major", **kw),
    "g64_tma_ue8m0": lambda **kw: FP8PerTokenGroup(64, True, "col_major_tma", **kw),
    "g128_row_ue8m0": lambda **kw: FP8PerTokenGroup(128, True, **kw),
    "g64_packed": lambda **kw: FP8PerTokenGroup(64, True, "ue8m0_packed", **kw),
    "g128_packed": lambda **kw: FP8PerTokenGroup(128, True, "ue8m0_packed", **kw),
}


def random_partials(seed: int, form: str, device: str):
    """Partials of 7 tokens, 4 heads of 64 (H * D = 256), magnitudes from 1e-3 to 1e3 per
    token, some empty partials and NaN; as ``merge``'s arguments."""
    g = torch.Generator().manual_seed(seed)
    T, H, D, K = 7, 4, 64, {"list1": 1, "list2": 2, "list3": 3, "stacked5": 5, "packed": 3}[form]
    o = torch.randn(K, T, H, D, generator=g) * 10.0 ** torch.randint(
        -3, 4, (1, T, 1, 1), generator=g
    )
    lse = torch.randn(K, H, T, generator=g) * 3
    lse[:, :, 1] = -INF  # token 1: all partials empty
    lse[0, :, 2] = -INF  # token 2: the first partial empty...
    o[0, 2] = NAN  # ...and its row garbage
    if seed % 2:
        o[-1, 3, 1, 5] = NAN  # a NaN in a weighted row: its head's group (or token) NaN
        o[-1, 4, 2, 7] = INF
    o, lse = o.to(device), lse.to(device)
    kw: dict = {}
    if form == "packed":
        counts = torch.tensor([3, 0, 2, 1, 3, 2, 1])  # per token; token 1: no rows
        rows = torch.cat([o[: int(c), t] for t, c in enumerate(counts)])
        lses = torch.cat([lse[: int(c), :, t] for t, c in enumerate(counts)]).t()
        indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(device)
        return rows, lses, {"indptr": indptr}
    if form == "stacked5":
        kw["prefill_tokens_with_context"] = 5
        return o, lse, kw
    if K == 2:
        kw["prefill_tokens_with_context"] = 4
    return list(o), list(lse), kw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("form", ["list1", "list2", "list3", "stacked5", "packed"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_float64_vllm(seed, form, fmt, device):
    """docs/contract.md C36 to C39: random merges (K = 1, 2, 3, 5 partials, stacked,
    packed, tokens past P, empty partials, NaN and inf): the codes and scales are the float64
    re-implementation of vLLM's quantiser applied to the float32 merge result, bit for
    bit, and amax is its max |O|."""
    outputs, lses, kw = random_partials(seed, form, device)
    # (backend="torch": under Triton's interpreter "auto" would take Triton, whose exp may
    # round differently; tests/test_formats_triton.py checks the kernels' stores)
    merged = attnmerge.merge(outputs, lses, quant=Plain(torch.float32), backend="torch", **kw)
    merged = merged.output
    amax = torch.full((1,), -1.0, device=device)
    quant = FORMATS[fmt](amax=amax)
    if getattr(quant, "scale_ub", None) is not None:  # on the output's device (C41)
        quant = dataclasses.replace(quant, scale_ub=quant.scale_ub.to(device))
    res = attnmerge.merge(outputs, lses, quant=quant, backend="torch", **kw)
    x = merged.cpu()
    if isinstance(quant, FP8PerToken):
        q, s = vllm_per_token_f64(x, None if quant.scale_ub is None else 3.0)
        assert_bits_equal(res.scales.cpu().flatten(), s.float(), "scales")
    else:
        q, s = vllm_per_token_group_f64(x, quant.group_size, quant.ue8m0)
        if quant.layout == "ue8m0_packed":
            assert torch.equal(res.scales.cpu(), packed_words(s))
        else:
            assert_bits_equal(res.scales.cpu(), s.float(), "scales")
    assert_bits_equal(res.output.cpu(), q.float().reshape(x.shape).to(FP8), "output")
    expected_amax = x.abs().max() if x.numel() else torch.tensor(0.0)
    assert_bits_equal(amax.cpu(), expected_amax.reshape(1), "amax")


@pytest.mark.parametrize("fmt", ["g64_row", "g128_col", "g64_tma_ue8m0", "g64_packed"])
def test_merge_attn_states_output_block_scale(fmt):
    """docs/contract.md C40: vLLM's output_block_scale / quant_group_size (pull request
    #40930), the layout read from the scales tensor, give merge()'s bits."""
    outputs, lses, kw = random_partials(1, "list2", "cpu")
    quant = FORMATS[fmt]()
    want = attnmerge.merge(outputs, lses, quant=quant, **kw)
    out = torch.empty_like(want.output)
    scales = torch.empty_strided(want.scales.shape, want.scales.stride(), dtype=want.scales.dtype)
    attnmerge.merge_attn_states(
        out, outputs[0], lses[0], outputs[1], lses[1], None, kw["prefill_tokens_with_context"],
        None, scales, quant.group_size, use_ue8m0=quant.ue8m0,
    )  # fmt: skip
    assert_bits_equal(out, want.output, "output")
    assert torch.equal(scales.view(torch.int32), want.scales.view(torch.int32))


def test_plain_and_static_amax():
    """docs/contract.md C39: Plain and FP8Static write amax too, of the float32 result
    before rounding, and store the bits they store without it; all-empty rows and T = 0
    give 0, a NaN gives NaN (0x7FC00000)."""
    outputs, lses, _ = random_partials(0, "list3", "cpu")
    merged = attnmerge.merge(outputs, lses, quant=Plain(torch.float32), backend="torch").output
    for quant in (
        Plain(torch.bfloat16, torch.zeros(())),
        FP8Static(torch.tensor([0.5]), amax=torch.zeros(1, 1)),
    ):
        res = attnmerge.merge(outputs, lses, quant=quant, backend="torch")
        assert bits(quant.amax) == bits(merged.abs().max()) and res.scales is None
        without = dataclasses.replace(quant, amax=None)
        without = attnmerge.merge(outputs, lses, quant=without, backend="torch")
        assert_bits_equal(res.output, without.output, "output")
    amax = torch.full((1,), NAN)
    empty = [torch.full((4, 3), -INF)] * 2
    attnmerge.merge(
        [torch.randn(3, 4, 8)] * 2, empty, quant=Plain(torch.float32, amax), backend="torch"
    )
    assert bits(amax) == [0]
    nan_rows = torch.randn(3, 4, 8)
    nan_rows[1, 2, 3] = NAN
    merge_one(nan_rows, Plain(torch.float32, amax))
    assert bits(amax) == [0x7FC00000]
    merge_one(torch.empty(0, 4, 16), FP8PerTokenGroup(64, amax=amax))
    assert bits(amax) == [0]


# ---------------------------------------------------------------------------
# Storage of the scale layouts (docs/contract.md C37).


@pytest.mark.parametrize("tokens", [1, 3, 4, 6])
def test_scale_layouts_storage(tokens):
    """Allocated scales have vLLM's shapes and strides; caller-given scales keep the bytes
    vLLM does not write (the TMA padding of float32 scales) and get the packed layout's
    padding zeroed, as vLLM's packed kernel does (its test poisons it with 0x7F7F7F7F)."""
    H, D, G = 5, 64, 5  # G = 5 groups of 64: two packed words per token, the second half empty
    x = torch.randn(tokens, H, D)
    padded = -(-tokens // 4) * 4
    row = merge_one(x, FP8PerTokenGroup(64)).scales
    assert row.shape == (tokens, G) and row.is_contiguous()
    col = merge_one(x, FP8PerTokenGroup(64, layout="col_major")).scales
    assert col.stride() == (1, tokens) and col.t().is_contiguous()
    tma = merge_one(x, FP8PerTokenGroup(64, layout="col_major_tma")).scales
    assert tma.stride() == (1, padded)
    assert tma.untyped_storage().nbytes() == 4 * (tokens + (G - 1) * padded)
    for scales in (col, tma):
        assert_bits_equal(scales, row, "scales")

    buffer = torch.full((G * padded,), 123.0)  # caller's TMA scales over a poisoned buffer
    given = buffer.as_strided((tokens, G), (1, padded))
    merge_one(x, FP8PerTokenGroup(64, layout="col_major_tma", scales=given))
    assert_bits_equal(given, row, "scales")
    assert (buffer.view(G, padded)[:, tokens:] == 123.0).all()  # padding not written

    ue8m0 = merge_one(x, FP8PerTokenGroup(64, True)).scales
    words = packed_words(ue8m0.double())
    storage = torch.full((tokens + padded,), 0x7F7F7F7F, dtype=torch.int32)
    packed = storage.as_strided((tokens, 2), (1, padded))
    res = merge_one(x, FP8PerTokenGroup(64, True, "ue8m0_packed", scales=packed))
    assert res.scales is packed and torch.equal(packed, words)
    expected = torch.zeros(tokens + padded, dtype=torch.int32)
    expected[:tokens], expected[padded:] = words[:, 0], words[:, 1]
    assert torch.equal(storage, expected)  # padding rows of column 0 zeroed
    assert (words[:, 1] >> 8 == 0).all()  # group 4 alone in word 1: bytes 1 to 3 are 0
    allocated = merge_one(x, FP8PerTokenGroup(64, True, "ue8m0_packed")).scales
    assert allocated.stride() == (1, padded) and torch.equal(allocated, words)


def test_per_token_scales_given_and_strided_output():
    """docs/contract.md C36, C40 (C12): caller-given [T] scales, and an FP8 output in a
    padded view, whose padding keeps its bytes."""
    x = torch.randn(6, 2, 64)
    want = merge_one(x, FP8PerToken())
    scales = torch.empty(6)
    buf = torch.full((6, 3, 80), 0.5).to(FP8)
    out = buf[:, 1:, :64]
    res = merge_one(x, FP8PerToken(scales=scales), out=out)
    assert res.scales is scales and res.output is out
    assert_bits_equal(scales, want.scales.flatten(), "scales")
    assert_bits_equal(out, want.output, "output")
    assert (fp8_codes(buf[:, 0]) == fp8_codes(torch.tensor(0.5).to(FP8))).all()
    assert (fp8_codes(buf[:, :, 64:]) == fp8_codes(torch.tensor(0.5).to(FP8))).all()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_no_tokens_or_no_heads(fmt):
    """docs/contract.md C15, C40: T = 0 and H = 0 are valid calls, with empty scales of the
    layout's shape (H = 0: zero groups, or per token the smallest scale)."""
    for tokens, heads in ((0, 4), (3, 0)):
        partials = [torch.empty(tokens, heads, 64)] * 2
        res = attnmerge.merge(partials, [torch.empty(heads, tokens)] * 2, quant=FORMATS[fmt]())
        assert res.output.shape == (tokens, heads, 64) and res.scales.shape[0] == tokens
        if fmt.startswith("token"):
            assert set(bits(res.scales)) <= {MIN_TOKEN_SCALE_BITS}
        else:
            assert res.scales.numel() == 0 or heads > 0


# ---------------------------------------------------------------------------
# Checks (docs/contract.md C41): named, before anything is written.

E, F64 = torch.empty, torch.float64
BAD_FORMATS = [
    (lambda: FP8PerToken(scales=E(4, dtype=F64)), TypeError, r"scales must be torch\.float32"),
    (lambda: FP8PerToken(scales=E(5)), ValueError, "scales must have shape"),
    (lambda: FP8PerToken(scales=E(4, device="meta")), ValueError, "scales is on meta"),
    (lambda: FP8PerToken(scales=E(1).expand(4)), ValueError, "scales has overlapping"),
    (lambda: FP8PerToken(scale_ub=torch.ones(2)), ValueError, "scale_ub must be a 1-element"),
    (lambda: FP8PerToken(scale_ub=1.0), TypeError, "scale_ub must be a 1-element"),
    (lambda: FP8PerToken(amax=torch.zeros(1, dtype=F64)), TypeError, "amax must be"),
    (lambda: FP8PerTokenGroup(64, amax=torch.zeros(2)), ValueError, "amax must be"),
    (lambda: Plain(torch.float32, torch.zeros(1, device="meta")), ValueError, "amax is on meta"),
    (lambda: FP8Static(torch.ones(1), amax=[0.0]), TypeError, "amax must be"),
    (lambda: FP8PerTokenGroup(64, scales=E(4, 3)), ValueError, "scales must have shape"),
    (lambda: FP8PerTokenGroup(64, scales=E(4, 2, device="meta")), ValueError, "scales is on"),
    (lambda: FP8PerTokenGroup(64, scales=E(2, 4).t()), ValueError, "scales must have strides"),
    (lambda: FP8PerTokenGroup(64, layout="col_major", scales=E(4, 2)), ValueError, "strides"),
    (lambda: FP8PerTokenGroup(64, True, "ue8m0_packed", scales=E(4, 1)), TypeError, "int32"),
    (lambda: FP8PerTokenGroup(64, amax=torch.zeros(1)), ValueError, "multiple of group_size"),
]


@pytest.mark.parametrize("make, error, message", BAD_FORMATS)
def test_bad_operands_raise_before_writing(make, error, message):
    """docs/contract.md C41 (C18, C19): a wrong dtype, shape, device, stride or overlap of
    scales, amax or scale_ub, or H * D not a multiple of group_size, raises naming it, and
    out, out_lse, the given scales and amax keep their bytes."""
    o, lse = torch.randn(2, 4, 2, 64), torch.randn(2, 2, 4)  # T = 4, H * D = 128
    o = o[..., :48] if "multiple" in message else o  # H * D = 96
    out = torch.full(o.shape[1:], 3.0).to(FP8)
    out_lse = torch.full((2, 4), 5.0)
    quant = make()
    if isinstance(quant, Plain):
        out = torch.full(o.shape[1:], 3.0)
    kept = [t.clone() for t in (out, out_lse)]
    with pytest.raises(error, match=message):
        attnmerge.merge(o, lse, quant=quant, out=out, out_lse=out_lse)
    assert all(bits_same(a, b) for a, b in zip((out, out_lse), kept, strict=True))


def bits_same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_bad_formats_at_construction():
    """docs/contract.md C41: configuration errors raise when the format is made."""
    with pytest.raises(ValueError, match="group_size must be 64 or 128"):
        FP8PerTokenGroup(32)
    with pytest.raises(ValueError, match="layout must be one of"):
        FP8PerTokenGroup(128, layout="column")
    with pytest.raises(ValueError, match="with ue8m0=True"):
        FP8PerTokenGroup(128, layout="ue8m0_packed")
    with pytest.raises(TypeError, match="ue8m0 must be a bool"):
        FP8PerTokenGroup(128, ue8m0=1)
    with pytest.raises(ValueError, match="Plain: dtype"):
        Plain(FP8)
    with pytest.raises(TypeError, match=r"out must be torch\.float8_e4m3fn"):
        attnmerge.merge([torch.randn(2, 1, 64)], [torch.randn(1, 2)], quant=FP8PerToken(),
                        out=torch.empty(2, 1, 64))  # fmt: skip


def test_bad_output_block_scale_raises_before_writing():
    """docs/contract.md C40, C41: merge_attn_states' per-token-group arguments checked."""
    p, s = torch.randn(4, 2, 64), torch.randn(4, 2, 64)
    lp, ls = torch.randn(2, 4), torch.randn(2, 4)
    out = torch.full((4, 2, 64), 3.0).to(FP8)
    kept = out.clone()
    cases = [
        (dict(output_block_scale=torch.empty(4, 2)), ValueError, "given together"),
        (dict(quant_group_size=64), ValueError, "given together"),
        (dict(use_ue8m0=True), ValueError, "given together"),
        (dict(output_scale=FP8PerToken()), TypeError, "output_scale must be a float32 tensor"),
        (dict(output_block_scale=torch.empty(4, 2), quant_group_size=64,
              output_scale=torch.ones(1)), ValueError, "output_scale must be None"),
        (dict(output_block_scale=torch.empty(4, 2, dtype=torch.float64), quant_group_size=64),
         TypeError, "output_block_scale must be torch.float32"),
        (dict(output_block_scale=torch.empty(4, 3), quant_group_size=64), ValueError,
         "output_block_scale must have shape"),
        (dict(output_block_scale=torch.empty(8, 2)[::2], quant_group_size=64), ValueError,
         "output_block_scale must have strides"),
        (dict(output_block_scale=torch.empty(4, 1, dtype=torch.int32), quant_group_size=64),
         ValueError, "needs use_ue8m0=True"),
        (dict(output_block_scale=torch.empty(8, 1, dtype=torch.int32)[::2], quant_group_size=64,
              use_ue8m0=True), ValueError, "output_block_scale must have strides"),
        (dict(output_block_scale=torch.empty(4, 1), quant_group_size=256), ValueError,
         "group_size must be 64 or 128"),
    ]  # fmt: skip
    for kwargs, error, message in cases:
        output_scale = kwargs.pop("output_scale", None)
        with pytest.raises(error, match=message):
            attnmerge.merge_attn_states(out, p, lp, s, ls, None, None, output_scale, **kwargs)
        assert bits_same(out, kept)


# ---------------------------------------------------------------------------
# Dispatch (docs/contract.md C40): the kernels refuse these formats with the reason.


HEADS, HEAD_SIZE = 64, 258  # 129 groups of 128 a token, lcm(258, 128) = 16512 values


def _signature(quant) -> CallSignature:
    return CallSignature(
        torch.device("cpu"), (torch.float32,) * 2, HEAD_SIZE, quant.key, False, False
    )


@pytest.mark.parametrize(
    "quant, reason",
    [(FP8PerTokenGroup(128), "groups of 128 span heads of 258: its triton kernels take")],
)
def test_kernels_refuse_with_the_reason(clean_dispatch, caplog, monkeypatch, quant, reason):
    """auto falls back to torch and logs why; backend="triton" (argument or
    ATTNMERGE_BACKEND) raises BackendError naming the reason (the cuda backend's token
    tiles store these groups; on this CPU it refuses the device)."""
    with caplog.at_level(logging.INFO, logger="attnmerge"):
        assert dispatch.select("auto", _signature(quant)) == dispatch.REGISTRY["torch"].run
    assert reason in caplog.text
    o, lse = torch.randn(2, 3, HEADS, HEAD_SIZE), torch.randn(2, HEADS, 3)
    attnmerge.merge(o, lse, quant=quant)  # auto: torch
    for backend in ("triton",):
        with pytest.raises(attnmerge.BackendError, match=f"'{backend}'.*{reason}"):
            attnmerge.merge(o, lse, quant=quant, backend=backend)
        monkeypatch.setenv(dispatch.ENV_BACKEND, backend)
        with pytest.raises(attnmerge.BackendError, match=reason):
            attnmerge.merge(o, lse, quant=quant)
        monkeypatch.delenv(dispatch.ENV_BACKEND)


def test_keys():
    """The key carries what selects a kernel: configuration and amax, no tensors."""
    assert FP8PerTokenGroup(64, True, "col_major").key.options == (64, True, "col_major")
    assert FP8PerToken(scale_ub=torch.ones(1), amax=torch.zeros(1)).key.options == (
        "scale_ub",
        "amax",
    )
    assert Plain(torch.float16).key == (Plain, torch.float16, ())
    assert FP8Static(torch.ones(1)).key == FP8Static(torch.ones(1) * 2).key
    assert attnmerge.MergeResult(torch.zeros(1), None).scales is None  # (fields added, not moved)


def _merge_per_token(o, lse):  # two partials: the two-partial path
    return attnmerge.merge(list(o[:2]), list(lse[:2]), quant=FP8PerToken()).output.float() + 1


def _merge_amax(o, lse):  # three stacked partials: the stacked path
    return attnmerge.merge(o, lse, quant=Plain(torch.float32, torch.zeros(1))).output + 1


def _merge_block_scale(o, lse):  # vLLM's form
    out = torch.empty(o.shape[1:], dtype=FP8)
    scales = torch.empty(o.shape[1], 1)
    attnmerge.merge_attn_states(out, o[0], lse[0], o[1], lse[1], None, None, None, scales, 64)
    return out.float() * scales[:, :, None]


@pytest.mark.parametrize("fn", [_merge_per_token, _merge_amax, _merge_block_scale])
def test_compile_runs_eagerly_or_raises(fn):
    """docs/contract.md C40: the custom ops' schemas do not carry scales or amax yet, so
    under torch.compile these calls break the graph and run eagerly, with the eager bits;
    fullgraph=True raises torch's error for a function it may not trace (the eager one;
    torch 2.6 words it "skip function ..._impl", and stops earlier, at the
    ``dataclasses.replace`` that allocates a format's scales)."""
    o, lse = torch.randn(3, 3, 1, 64), torch.randn(3, 1, 3)
    torch._dynamo.reset()  # (frames compiled by other tests)
    untraceable = r"marked as skipped(.|\n)*_eagerly\(|skip function _merge_\w+_impl|, in replace"
    with pytest.raises(Exception, match=untraceable):
        torch.compile(fn, fullgraph=True, backend="eager")(o, lse)
    torch._dynamo.reset()
    assert_bits_equal(torch.compile(fn, backend="eager")(o, lse), fn(o, lse), "output")
    torch._dynamo.reset()
