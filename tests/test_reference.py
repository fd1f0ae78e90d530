"""The torch reference, checked against an independent float64 formulation.

The oracle below uses torch.logsumexp / torch.softmax in float64 and states the
contract's rules for empty partials directly, so it shares no arithmetic with
``merge_states_reference`` (weights first, ``where(w != 0, w * O, 0)``, fp32).
"""

from __future__ import annotations

import math

import pytest
import torch
from utils import FP8, INF, NAN, lse_values, make_case

from attnmerge.reference import merge_states_reference, quantize_fp8_static

# The reference computes in fp32: a few fp32 ulps of the terms it adds.
O_RTOL, O_ATOL_REL_MAG, LSE_RTOL = 1e-5, 1e-6, 1e-6

# LSE categories whose fp32 and fp64 results agree in kind: "wide" is left out
# because weights around exp(-90..-104) are subnormal in fp32 but not in fp64.
SPECIAL = ("normal", "offset", "neg_inf", "pos_inf", "nan", "big_pos", "big_neg", "huge")


def oracle(outputs, lses, base2=False, P=None):
    """float64 merge: (output, lse, magnitude = sum_i |w_i O_i|)."""
    ln = torch.stack([x.double() for x in lses])  # [K, H, T]
    ln = torch.where(ln == INF, -INF, ln)  # contract 1: +inf is empty
    if P is not None:
        ln[0, :, P:] = -INF  # C8: no prefix at tokens >= P
    if base2:
        ln = ln * math.log(2.0)
    empty = (ln == -INF).all(dim=0)
    lse = torch.logsumexp(ln, dim=0)  # -inf on empty rows, NaN where an LSE is NaN
    w = torch.softmax(ln, dim=0)  # NaN on empty rows: replaced by 0 (contract 2)
    w = torch.where(empty, 0.0, w)
    out = torch.zeros(outputs[0].shape, dtype=torch.float64)
    mag = torch.zeros_like(out)
    for k, o in enumerate(outputs):
        wk = w[k].t().unsqueeze(-1)
        # contract 3: zero weight contributes exactly 0 whatever the row holds
        out = out + torch.where(wk != 0, wk * o.double(), 0.0)
        mag = mag + torch.where(wk != 0, wk * o.double().abs(), 0.0)
    if base2:
        lse = lse / math.log(2.0)
    if P is not None and len(outputs) == 2:
        # C8: past P the suffix is copied, its row and its LSE as given
        out[P:] = outputs[1][P:].double()
        mag[P:] = outputs[1][P:].double().abs()
        lse[:, P:] = lses[1][:, P:].double()
    return out, lse, mag


def assert_close_f64(out, lse, ref_out, ref_lse, mag):
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.equal(out.isnan(), ref_out.isnan()), "output NaN positions differ"
    assert torch.equal(lse.isnan(), ref_lse.isnan()), "lse NaN positions differ"
    fin = ref_out.isfinite()
    assert torch.equal(out[~fin & ~out.isnan()].double(), ref_out[~fin & ~ref_out.isnan()])
    err = (out.double() - ref_out).abs()[fin]
    bound = (O_RTOL * ref_out.abs() + O_ATOL_REL_MAG * mag)[fin]
    assert (err <= bound).all(), f"output: max excess {(err - bound).max().item()}"
    lfin = ref_lse.isfinite()
    assert torch.equal(lse[~lfin & ~lse.isnan()].double(), ref_lse[~lfin & ~ref_lse.isnan()])
    lerr = (lse.double() - ref_lse).abs()[lfin]
    lbound = LSE_RTOL * ref_lse.abs().clamp(min=1.0)[lfin]
    assert (lerr <= lbound).all(), f"lse: max excess {(lerr - lbound).max().item()}"


@pytest.mark.parametrize("base", ["e", 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lse_pattern", ["normal", "offset", "wide"])
def test_reference_matches_float64_on_finite_inputs(dtype, base, lse_pattern):
    # Garbage off: every row is read, so fp32 and fp64 must agree to rounding.
    case = make_case(
        33, 4, 40, dtype=dtype, lse_pattern=lse_pattern, lse_base=base, garbage=False, seed=11
    )
    outs, lses = (case.prefix_output, case.suffix_output), (case.prefix_lse, case.suffix_lse)
    out, lse = merge_states_reference(outs, lses, lse_base_2=base == 2)
    assert_close_f64(out, lse, *oracle(outs, lses, base2=base == 2))


@pytest.mark.parametrize("base", ["e", 2])
@pytest.mark.parametrize("seed", range(4))
def test_reference_matches_float64_on_special_values(base, seed):
    # Empty (+-inf), NaN, +-1e30 and 1e4-gap LSEs, garbage (NaN/inf) in unread rows.
    case = make_case(40, 3, 16, lse_pattern=SPECIAL, lse_base=base, seed=seed)
    outs, lses = (case.prefix_output, case.suffix_output), (case.prefix_lse, case.suffix_lse)
    out, lse = merge_states_reference(outs, lses, lse_base_2=base == 2)
    ref_out, ref_lse, mag = oracle(outs, lses, base2=base == 2)
    # the inputs really hold every kind of special value
    assert ref_lse.isnan().any() and (ref_lse == -INF).any() and ref_out.isnan().any()
    assert_close_f64(out, lse, ref_out, ref_lse, mag)


@pytest.mark.parametrize("P", [0, 5, 20])
def test_reference_prefill_tokens_with_context(P):
    case = make_case(20, 3, 16, lse_pattern=SPECIAL, P=P, seed=P)
    outs, lses = (case.prefix_output, case.suffix_output), (case.prefix_lse, case.suffix_lse)
    out, lse = merge_states_reference(outs, lses, prefill_tokens_with_context=P)
    assert_close_f64(out, lse, *oracle(outs, lses, P=P))


def test_reference_three_states():
    g = torch.Generator().manual_seed(3)
    T, H, D = 9, 2, 8
    outs = [torch.randn(T, H, D, generator=g) for _ in range(3)]
    lses = [lse_values(H, T, SPECIAL, g) for _ in range(3)]
    out, lse = merge_states_reference(outs, lses)
    assert_close_f64(out, lse, *oracle(outs, lses))


def test_reference_empty_rows():
    T, H, D = 4, 1, 8
    outs = (torch.full((T, H, D), NAN), torch.full((T, H, D), INF))
    lses = (torch.tensor([[INF, -INF, INF, -INF]]), torch.tensor([[INF, INF, -INF, -INF]]))
    out, lse = merge_states_reference(outs, lses)
    assert torch.equal(out, torch.zeros(T, H, D))
    assert torch.equal(lse, torch.full((H, T), -INF))


def test_reference_accepts_strided_views():
    # [T, H]-stored LSE views and padded outputs give the same result as contiguous ones.
    case = make_case(
        7,
        3,
        24,
        lse_layouts=("th", "th", "ht"),
        prefix_strides=(3 * 40, 40),
        suffix_strides=(3 * 24 + 5, 24),
        seed=5,
    )
    outs, lses = (case.prefix_output, case.suffix_output), (case.prefix_lse, case.suffix_lse)
    out, lse = merge_states_reference(outs, lses)
    out_c, lse_c = merge_states_reference(
        tuple(o.contiguous() for o in outs), tuple(x.contiguous() for x in lses)
    )
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


def _fp8_rne_oracle(y: torch.Tensor) -> torch.Tensor:
    """Round float32 values to e4m3fn by table look-up: nearest value, ties to the even
    code, saturating at +-448, NaN kept. Returns uint8 codes."""
    codes = torch.arange(256, dtype=torch.int32)
    vals = codes.to(torch.uint8).view(FP8).double()
    finite = vals.isfinite()
    codes, vals = codes[finite], vals[finite]
    y64 = y.double().clamp(-448, 448)
    dist = (vals[None, :] - y64.reshape(-1, 1)).abs()
    best = dist.min(dim=1, keepdim=True).values
    cand = dist == best
    # among ties, prefer the even code; between +0 and -0, the sign of the input
    same_sign = (codes[None, :] >= 128) == torch.signbit(y64.reshape(-1, 1))
    score = cand.int() * 4 + ((codes[None, :] & 1) == 0).int() * 2 + same_sign.int()
    pick = codes[score.argmax(dim=1)]
    pick = torch.where(y.reshape(-1).isnan(), 0x7F, pick)
    return pick.to(torch.uint8).reshape(y.shape)


@pytest.mark.parametrize("scale", [1.0, 0.37, 1e-3, 10.0])
def test_quantize_fp8_static_rounding(scale):
    g = torch.Generator().manual_seed(1)
    special = [0.0, -0.0, 1e-9, -1e-9, 1.0625, 1.1875, -1.0625, 1e30, -1e30, INF, -INF, NAN]
    x = torch.cat([torch.randn(4000, generator=g) * 100, torch.tensor(special)])
    s = torch.tensor([scale])
    got = quantize_fp8_static(x, s).view(torch.uint8)
    want = _fp8_rne_oracle(x * s.reciprocal())
    nan = x.isnan()
    assert torch.equal(got[~nan], want[~nan])
    assert (got[nan] & 0x7F == 0x7F).all()
