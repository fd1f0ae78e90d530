"""The semantics contract of docs/contract.md: named tests per item, and the layout rules.

Each test's docstring names the items it checks ("docs/contract.md C<n>"). The digits in
the test names (test_contract_1 to test_contract_8) are an older numbering of the same
rules, not the C numbers.

Where the contract promises an exact result (empty rows, zero weights, rows past P,
aliasing, FP8 bits) the tests compare bit for bit; elsewhere they use the shared
tolerance table through ``run_and_check``.
"""

from __future__ import annotations

import math

import pytest
import torch
from utils import (
    FLOAT_DTYPES,
    FP8,
    INF,
    NAN,
    ON_GPU,
    Tol,
    assert_bits_equal,
    assert_output_close,
    bits_equal,
    dtype_name,
    fp8_codes,
    make_case,
    padded,
    run_and_check,
)

import attnmerge
from attnmerge.reference import quantize_fp8_static

OUT_DTYPES = [*FLOAT_DTYPES, FP8]
T_MANY = 300 if ON_GPU else 17  # several programs (and thread blocks) on a GPU


def _lse(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _fp8_is_nan(t: torch.Tensor) -> torch.Tensor:
    return (fp8_codes(t) & 0x7F) == 0x7F


def _scale_for(dtype):
    return 0.5 if dtype == FP8 else None


# ---------------------------------------------------------------------------
# +inf LSE is "empty" (docs/contract.md C4).


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=dtype_name)
def test_contract_1_pos_inf_lse_is_empty(backend_device, out_dtype):
    """docs/contract.md C4: +inf reads as -inf, bit for bit; and C6: a row whose only
    non-empty partial is one side is that side's row and LSE, bit for bit."""
    backend, device = backend_device
    T, H, D = 6, 2, 16
    # columns: prefix empty (+inf) / suffix empty (+inf) / both / mixed +inf and -inf
    p = _lse([[INF, 0.5, INF, -INF, INF, 1.0], [INF, -2.0, INF, INF, 3.0, INF]])
    s = _lse([[0.3, INF, INF, INF, -INF, -1.0], [2.0, INF, -INF, INF, INF, 4.0]])
    runs = []
    for pl, sl in ((p, s), (torch.where(p == INF, -INF, p), torch.where(s == INF, -INF, s))):
        case = make_case(
            T,
            H,
            D,
            out_dtype=out_dtype,
            scale=_scale_for(out_dtype),
            device=device,
            prefix_lse=pl,
            suffix_lse=sl,
            seed=1,
        )
        run_and_check(case, backend)
        runs.append(case)
    # +inf gives exactly what -inf gives
    assert_bits_equal(runs[0].output, runs[1].output, "output")
    assert_bits_equal(runs[0].output_lse, runs[1].output_lse, "output_lse")
    # a row whose only non-empty partial is the suffix is that row, its LSE the suffix's
    c = runs[0]
    for t, h, src, lse in (
        (0, 0, c.suffix_output, 0.3),
        (0, 1, c.suffix_output, 2.0),
        (1, 0, c.prefix_output, 0.5),
        (4, 1, c.prefix_output, 3.0),
    ):
        want = src[t, h].float()
        if out_dtype == FP8:
            want = quantize_fp8_static(want, c.scale)
        assert_bits_equal(c.output[t, h], want.to(out_dtype), f"row ({t}, {h})")
        assert c.output_lse[h, t].item() == torch.tensor(lse).item()


# ---------------------------------------------------------------------------
# All partials empty: exactly 0, LSE -inf, no NaN (docs/contract.md C5).


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("base", ["e", 2])
def test_contract_2_all_empty_row_is_zero(backend_device, out_dtype, base):
    """docs/contract.md C5: all-empty rows are exactly 0 with LSE -inf, whatever the rows
    hold; in both bases (C3) and every output dtype."""
    backend, device = backend_device
    T, H, D = 4, 3, 24
    combos = [(-INF, -INF), (INF, INF), (INF, -INF), (-INF, INF)]
    p = torch.tensor([[a for a, _ in combos]] * H)
    s = torch.tensor([[b for _, b in combos]] * H)
    # garbage=True fills every row of both partials with NaN/inf (all are empty)
    case = make_case(
        T,
        H,
        D,
        out_dtype=out_dtype,
        scale=_scale_for(out_dtype),
        device=device,
        lse_base=base,
        prefix_lse=p,
        suffix_lse=s,
        seed=2,
    )
    assert case.prefix_output.float().isnan().any() and case.suffix_output.float().isinf().any()
    case.run(backend)
    out = case.output.float()
    assert not out.isnan().any()
    assert (out == 0).all()
    assert torch.equal(case.output_lse.cpu(), torch.full((H, T), -INF))


def test_contract_2_empty_rows_among_others(backend_device):
    """docs/contract.md C5: empty rows next to ordinary rows."""
    # Empty rows next to ordinary rows in the same program.
    backend, device = backend_device
    case = make_case(
        T_MANY, 3, 40, device=device, lse_pattern=("neg_inf", "pos_inf", "normal"), seed=3
    )
    run_and_check(case, backend)
    lse_eff = [torch.where(x == INF, -INF, x).cpu() for x in (case.prefix_lse, case.suffix_lse)]
    empty = ((lse_eff[0] == -INF) & (lse_eff[1] == -INF)).t()  # [T, H]
    assert empty.any() and (~empty).any()
    assert (case.output.cpu()[empty] == 0).all()
    assert (case.output_lse.cpu().t()[empty] == -INF).all()


# ---------------------------------------------------------------------------
# A zero-weight partial contributes exactly 0, whatever its row holds (docs/contract.md C6).


@pytest.mark.parametrize("gap", [INF, 1e4, 1e30], ids=["empty", "gap1e4", "gap1e30"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("base", ["e", 2])
def test_contract_3_zero_weight_partial_contributes_exactly_zero(
    backend_device, gap, out_dtype, base
):
    """docs/contract.md C6: a zero-weight partial (empty, or an exp that underflows to 0)
    contributes exactly 0 despite NaN/inf in its row; in both bases (C3), also into FP8
    (C9)."""
    backend, device = backend_device
    T, H, D = 4, 2, 24
    hi = torch.tensor([[0.7, -3.0, 5.0, 1e3], [-1e3, 2.0, 0.0, 40.0]])
    lo = hi - gap  # exp(lo - hi) underflows to exactly 0 (or is empty)
    # tokens 0, 1: the prefix is the zero-weight one; tokens 2, 3: the suffix
    first = torch.arange(T) < 2
    p = torch.where(first, lo, hi)
    s = torch.where(first, hi, lo)
    case = make_case(
        T,
        H,
        D,
        dtype=torch.float32,
        out_dtype=out_dtype,
        scale=_scale_for(out_dtype),
        device=device,
        lse_base=base,
        prefix_lse=p,
        suffix_lse=s,
        seed=4,
    )
    po, so = case.prefix_output.cpu(), case.suffix_output.cpu()
    assert po[:2].isnan().any() and so[2:].isnan().any() and po[:2].isinf().any()
    run_and_check(case, backend)
    # the result is the weighted row itself, bit for bit, and its LSE
    want = torch.cat([so[:2], po[2:]])
    if out_dtype == FP8:
        want = quantize_fp8_static(want, case.scale.cpu())
    assert_bits_equal(case.output.cpu(), want.to(out_dtype), "output")
    assert torch.equal(case.output_lse.cpu(), hi)


# ---------------------------------------------------------------------------
# NaN stays visible (docs/contract.md C7).


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=dtype_name)
def test_contract_4_nan_lse_propagates(backend_device, out_dtype):
    """docs/contract.md C7: a NaN LSE against a finite LSE, -inf, +inf, 1e30 or NaN gives
    a NaN row (the FP8 NaN code, C9) and a NaN output LSE."""
    backend, device = backend_device
    T, H, D = 5, 1, 16
    # a NaN LSE against: a finite LSE, -inf, +inf, 1e30, another NaN
    p = _lse([[NAN, NAN, NAN, 1e30, NAN]])
    s = _lse([[0.5, -INF, INF, NAN, NAN]])
    case = make_case(
        T,
        H,
        D,
        out_dtype=out_dtype,
        scale=_scale_for(out_dtype),
        device=device,
        prefix_lse=p,
        suffix_lse=s,
        garbage=False,
        seed=5,
    )
    run_and_check(case, backend)
    out = case.output.cpu()
    nan = _fp8_is_nan(out) if out_dtype == FP8 else out.isnan()
    assert nan.all(), "every row with a NaN LSE must be NaN"
    assert case.output_lse.isnan().all()


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=dtype_name)
def test_contract_4_nan_in_weighted_row_propagates(backend_device, out_dtype):
    """docs/contract.md C7: exactly the NaN elements of rows with non-zero weight are NaN;
    the output LSE is not."""
    backend, device = backend_device
    T, H, D = 3, 2, 16
    p = _lse([[0.0, 0.0, 5.0], [1.0, -INF, 80.0]])
    s = _lse([[0.0, -2.0, 5.0], [1.0, 3.0, 0.0]])  # every row: both weights > 0 or one = 1
    pv = torch.randn(T, H, D)
    sv = torch.randn(T, H, D)
    pv[0, 0, 3] = NAN  # weight 1/2
    sv[1, 1, 5] = NAN  # the only non-empty partial
    sv[2, 1, 7] = NAN  # weight exp(-80): tiny but not zero in fp32
    case = make_case(
        T,
        H,
        D,
        out_dtype=out_dtype,
        scale=_scale_for(out_dtype),
        device=device,
        prefix_lse=p,
        suffix_lse=s,
        prefix_values=pv,
        suffix_values=sv,
        garbage=False,
        seed=6,
    )
    run_and_check(case, backend)
    out = case.output.cpu()
    nan = _fp8_is_nan(out) if out_dtype == FP8 else out.float().isnan()
    want = torch.zeros(T, H, D, dtype=torch.bool)
    want[0, 0, 3] = want[1, 1, 5] = want[2, 1, 7] = True
    assert torch.equal(nan, want), "exactly the NaN elements of weighted rows are NaN"
    assert not case.output_lse.isnan().any()


@pytest.mark.parametrize(("base", "gap"), [("e", 95.0), ("e", 100.0), (2, 130.0), (2, 140.0)])
def test_contract_4_nan_in_row_with_subnormal_weight(backend_device, base, gap):
    """docs/contract.md C3 and C6: a subnormal weight is not zero, so the NaN and inf of its
    row show (C7), in both bases."""
    # exp(-gap) is subnormal in fp32 but not zero: that partial's weight is non-zero, so a
    # NaN (or inf) in its row must show, exactly as in the reference. (A kernel whose exp
    # flushes subnormal results to zero would silently drop them.)
    backend, device = backend_device
    exp_fn = torch.exp2 if base == 2 else torch.exp
    w = exp_fn(torch.tensor(-gap))
    assert 0 < w.item() < torch.finfo(torch.float32).tiny
    T, H, D = 2, 1, 8
    p = _lse([[0.0, -gap]])
    s = _lse([[-gap, 0.0]])
    g = torch.Generator().manual_seed(21)
    pv, sv = torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)
    sv[0, 0, 1], sv[0, 0, 2] = NAN, INF  # token 0: the suffix has the tiny weight
    pv[1, 0, 1], pv[1, 0, 2] = NAN, -INF  # token 1: the prefix has it
    case = make_case(
        T,
        H,
        D,
        device=device,
        lse_base=base,
        prefix_lse=p,
        suffix_lse=s,
        prefix_values=pv,
        suffix_values=sv,
        garbage=False,
    )
    run_and_check(case, backend)
    out = case.output.cpu()
    assert out[0, 0, 1].isnan() and out[0, 0, 2] == INF
    assert out[1, 0, 1].isnan() and out[1, 0, 2] == -INF


# ---------------------------------------------------------------------------
# LSE base 2 (docs/contract.md C3).


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, FP8], ids=dtype_name)
def test_contract_5_base_2_equals_base_e_rescaled(backend_device, out_dtype):
    """docs/contract.md C3: a base-2 call is the base-e merge of the rescaled LSEs (up to the
    rounding of the rescaling), with its output LSE in base 2."""
    backend, device = backend_device
    T, H, D = T_MANY, 3, 32
    log2e = 1 / math.log(2.0)
    # Categories with small |lse| or exact 0/1 weights: rounding lse * log2(e) moves a
    # weight by ~|lse| * 2^-24 relative, so "offset" (1000) and "huge" (1e4) are left out.
    pattern = ("normal", "neg_inf", "pos_inf", "nan", "big_pos", "big_neg")
    base_e = make_case(
        T,
        H,
        D,
        out_dtype=out_dtype,
        scale=_scale_for(out_dtype),
        device=device,
        lse_pattern=pattern,
        seed=7,
    )
    base_2 = make_case(
        T,
        H,
        D,
        out_dtype=out_dtype,
        scale=_scale_for(out_dtype),
        device=device,
        lse_base=2,
        prefix_lse=base_e.prefix_lse * log2e,
        suffix_lse=base_e.suffix_lse * log2e,
        prefix_values=base_e.prefix_output.float(),
        suffix_values=base_e.suffix_output.float(),
        garbage=False,
    )
    base_2.run(backend)
    # Same merge up to that rounding: the base-2 call against the base-e reference, with
    # a wider fp32 slack than the backend-vs-reference table (1e-5 instead of 2e-6), and
    # its LSE in base 2.
    exp = base_e.expected()
    assert_output_close(
        base_2.output,
        exp.output,
        exp.magnitude,
        base_2.scale,
        "base 2",
        tol=Tol(ulps=1, rtol=1e-5, max_diff_frac=1.0),
    )
    lse2 = (exp.lse * log2e).to(base_2.output_lse.device)
    out_lse = base_2.output_lse
    assert torch.equal(out_lse.isnan(), lse2.isnan())
    fin = lse2.isfinite()
    assert torch.equal(out_lse[~fin & ~lse2.isnan()], lse2[~fin & ~lse2.isnan()])
    err = (out_lse - lse2).abs()[fin]
    assert (err <= 4e-6 * lse2.abs().clamp(min=1)[fin]).all()


def test_contract_5_base_2_weights(backend_device):
    """docs/contract.md C1 and C3: the weights and LSE of one row in base 2 and in base e."""
    # LSEs 1 and 0: base 2 weights are 2/3 and 1/3 and the LSE is log2(3); base e
    # would give e/(1+e) and 1/(1+e).
    backend, device = backend_device
    T, H, D = 1, 1, 8
    pv, sv = torch.full((T, H, D), 3.0), torch.zeros(T, H, D)
    for base, w, lse in (
        (2, 2 / 3, math.log2(3)),
        ("e", math.e / (1 + math.e), 1 + math.log1p(math.exp(-1))),
    ):
        case = make_case(
            T,
            H,
            D,
            device=device,
            lse_base=base,
            prefix_lse=_lse([[1.0]]),
            suffix_lse=_lse([[0.0]]),
            prefix_values=pv,
            suffix_values=sv,
        )
        case.run(backend)
        torch.testing.assert_close(
            case.output.cpu(), torch.full((T, H, D), 3 * w), rtol=1e-6, atol=0
        )
        torch.testing.assert_close(case.output_lse.cpu(), _lse([[lse]]), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------
# FP8 static output (docs/contract.md C9).


def _fp8_spec(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The contract's formula, written out: reciprocal in fp32, multiply, saturate."""
    return (x.float() * scale.float().reciprocal()).clamp(-448, 448).to(FP8)


def _assert_fp8_equal(actual: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-exact FP8 codes; both NaN codes (0x7F, 0xFF) count as NaN."""
    a, w = fp8_codes(actual.cpu()), fp8_codes(want.cpu())
    nan_a, nan_w = (a & 0x7F) == 0x7F, (w & 0x7F) == 0x7F
    assert torch.equal(nan_a, nan_w), "FP8 NaN positions differ"
    assert torch.equal(a[~nan_a], w[~nan_w]), (
        f"FP8 codes differ at {(a != w).nonzero()[:5].tolist()}"
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
def test_contract_6_fp8_saturates_and_keeps_nan(backend_device, dtype):
    """docs/contract.md C9: FP8 stores saturate to +-448 (inf included), keep NaN, and
    round tiny values to +-0."""
    backend, device = backend_device
    T, H, D = 3, 2, 16
    sv = torch.randn(T, H, D)
    sv[0, 0, :4] = torch.tensor([NAN, INF, -INF, 0.0])
    sv[1, 1, :2] = torch.tensor([1e-30, -1e-30])  # round to +0 and -0
    scale = torch.tensor([1e-4])  # |x| / 1e-4 far beyond 448: saturates
    # prefix empty: the merged fp32 row is the suffix row exactly
    case = make_case(
        T,
        H,
        D,
        dtype=dtype,
        out_dtype=FP8,
        scale=scale,
        device=device,
        prefix_lse=torch.full((H, T), -INF),
        suffix_lse=torch.randn(H, T),
        suffix_values=sv,
        garbage=True,
        seed=8,
    )
    merged = case.expected().output.cpu()  # the suffix row (+ 0 from the empty prefix)
    case.run(backend)
    _assert_fp8_equal(case.output, _fp8_spec(merged, scale))
    out = case.output.cpu().float()
    big = case.suffix_output.cpu().float().abs() > 448 * 1e-4
    assert (out[big].abs() == 448).all(), "saturation to +-448, never inf/NaN"
    assert _fp8_is_nan(case.output.cpu())[0, 0, 0] and not out[0, 0, 1:].isnan().any()


def _reciprocal_sensitive_values(scale: float) -> torch.Tensor:
    """fp32 values x where fp8(x * fp32(1/scale)) != fp8(x / scale): near FP8 rounding
    midpoints, so that dividing instead of multiplying by the reciprocal shows."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    vals = codes[codes.isfinite()].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    x = (mids.double() * scale).float()
    cands = torch.cat([(x.view(torch.int32) + k).view(torch.float32) for k in range(-3, 4)])
    s = torch.tensor([scale])
    by_rcp = _fp8_spec(cands, s).view(torch.uint8)
    by_div = (cands / s).clamp(-448, 448).to(FP8).view(torch.uint8)
    return cands[by_rcp != by_div]


@pytest.mark.parametrize("scale", [0.37, 3.3, 1e-3])
def test_contract_6_fp8_bit_exact_reciprocal_then_multiply(backend_device, scale):
    """docs/contract.md C9: reciprocal in fp32, then multiply, bit for bit, on values where
    a division by the scale would round differently."""
    backend, device = backend_device
    sensitive = _reciprocal_sensitive_values(scale)
    assert sensitive.numel() > 0
    g = torch.Generator().manual_seed(9)
    # ties, both signs, every binade, saturation, plus the reciprocal-sensitive values
    extra = torch.cat(
        [
            sensitive,
            torch.randn(256, generator=g) * 500 * scale,
            torch.tensor([1.0625, 1.1875, -1.0625, 0.0]) * scale,
        ]
    )
    D = 32
    n_rows = math.ceil(extra.numel() / D)
    H = 2
    T = math.ceil(n_rows / H)
    flat = torch.zeros(T * H * D)
    flat[: extra.numel()] = extra
    sv = flat.reshape(T, H, D)
    case = make_case(
        T,
        H,
        D,
        dtype=torch.float32,
        out_dtype=FP8,
        scale=scale,
        device=device,
        prefix_lse=torch.full((H, T), -INF),
        suffix_lse=torch.zeros(H, T),
        suffix_values=sv,
        seed=9,
    )
    merged = case.expected().output.cpu()
    assert torch.equal(merged, sv)  # weights exactly 1 and 0: O is the suffix row
    case.run(backend)
    _assert_fp8_equal(case.output, _fp8_spec(merged, torch.tensor([scale])))


@pytest.mark.parametrize("scale", [1e-3, 0.05, 10.0])
def test_contract_6_fp8_merged_matches_formula(backend_device, scale):
    """docs/contract.md C9 and C23: real merges into FP8 with scales from 1e-3 to 10, within
    the tolerance table."""
    # A real two-way merge: the codes equal the formula applied to the reference's fp32
    # output, up to the shared tolerance (the fp32 output itself may differ by an ulp).
    backend, device = backend_device
    case = make_case(
        T_MANY,
        3,
        64,
        dtype=torch.bfloat16,
        out_dtype=FP8,
        scale=scale,
        device=device,
        lse_pattern="mixed",
        seed=10,
    )
    run_and_check(case, backend)


# ---------------------------------------------------------------------------
# prefill_tokens_with_context (docs/contract.md C8).


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32, FP8], ids=dtype_name)
@pytest.mark.parametrize("P", ["zero", "mid", "all"])
def test_contract_7_tokens_past_P_take_the_suffix(backend_device, out_dtype, P):
    """docs/contract.md C8: rows past P are the suffix row and LSE, bit for bit, and the
    prefix rows and LSEs there (NaN/inf) are not read."""
    backend, device = backend_device
    T, H, D = T_MANY, 3, 40
    P = {"zero": 0, "mid": T // 2, "all": T}[P]
    # garbage=True: prefix rows and LSEs at tokens >= P are NaN/inf
    case = make_case(
        T,
        H,
        D,
        dtype=torch.bfloat16,
        out_dtype=out_dtype,
        scale=_scale_for(out_dtype),
        device=device,
        P=P,
        seed=11,
    )
    if P < T:
        assert case.prefix_lse[:, P:].isnan().all()
        assert case.prefix_output[P:].float().isnan().any()
    run_and_check(case, backend)
    tail = case.suffix_output[P:].float()
    want = quantize_fp8_static(tail, case.scale) if out_dtype == FP8 else tail.to(out_dtype)
    assert_bits_equal(case.output[P:].cpu(), want.cpu(), "rows past P")
    assert torch.equal(case.output_lse[:, P:].cpu(), case.suffix_lse[:, P:].cpu())


def test_contract_7_P_equal_T_is_no_P(backend_device):
    """docs/contract.md C8: P = T gives the bits of P = None."""
    backend, device = backend_device
    T = 9
    a = make_case(T, 2, 16, device=device, lse_pattern="mixed", P=T, seed=12)
    b = make_case(T, 2, 16, device=device, lse_pattern="mixed", P=None, seed=12)
    a.run(backend)
    b.run(backend)
    assert_bits_equal(a.output, b.output, "output")
    assert_bits_equal(a.output_lse, b.output_lse, "output_lse")


def test_contract_7_past_P_the_suffix_is_copied_whatever_its_lse(backend_device):
    """docs/contract.md C8: past P the suffix row and LSE are copied as they are, also
    where the suffix LSE is -inf, +inf or NaN (vLLM's semantics, which its tests check);
    before P the same LSEs follow C5 and C7."""
    backend, device = backend_device
    T, H, D = 8, 1, 8
    lses = [[-INF, INF, NAN, 0.5, -INF, INF, NAN, 0.5]]
    case = make_case(
        T,
        H,
        D,
        device=device,
        P=4,
        prefix_lse=_lse([[-INF] * 4 + [0.0] * 4]),
        suffix_lse=_lse(lses),
        seed=13,
    )
    run_and_check(case, backend)
    out, suffix = case.output.float().cpu(), case.suffix_output.float().cpu()
    assert_bits_equal(out[4:], suffix[4:] + 0.0, "rows past P")
    assert torch.equal(
        case.output_lse[:, 4:].cpu().nan_to_num(7.0), _lse([lses[0][4:]]).nan_to_num(7.0)
    )
    assert (out[:2] == 0).all() and out[2].isnan().all()  # before P: empty rows, NaN LSE


# ---------------------------------------------------------------------------
# Aliasing (docs/contract.md C16).


@pytest.mark.parametrize("alias", ["prefix", "suffix", "lse_prefix", "lse_suffix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_contract_8_aliasing_is_exact(backend_device, alias, dtype):
    """docs/contract.md C16: in place (output as a partial output, output LSE as a partial
    LSE) gives the out-of-place bits, with P < T and padded strides."""
    backend, device = backend_device
    T, H, D = T_MANY, 5, 72
    kw = dict(
        dtype=dtype,
        device=device,
        lse_pattern="mixed",
        P=T - 3,
        seed=14,
        prefix_strides=padded(H, D, head_pad=8),
        suffix_strides=padded(H, D, token_pad=3),
    )
    aliased = make_case(T, H, D, alias=alias, **kw)
    plain = make_case(T, H, D, **kw)
    exp = aliased.expected()  # on copies, before the in-place call
    aliased.run(backend)
    plain.run(backend)
    aliased.check_against(exp)
    assert_bits_equal(aliased.output, plain.output, "output")
    assert_bits_equal(aliased.output_lse, plain.output_lse, "output_lse")
    if alias == "prefix":
        assert aliased.output.data_ptr() == aliased.prefix_output.data_ptr()
    if alias == "lse_prefix":
        assert aliased.output_lse.data_ptr() == aliased.prefix_lse.data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize(
    "dtype, T, H, D, runs",
    [
        (torch.bfloat16, 4096, 128, 128, 1000),
        (torch.float32, 2048, 64, 512, 100),
        # 16 MiB partials: both backends take the tokens of one head per block/program
        (torch.bfloat16, 1024, 64, 128, 1000),
    ],
    ids=["bf16-4096x128", "fp32-2048x64x512", "bf16-1024x64-head-major"],
)
def test_contract_8_in_place_merges_repeated(backend, dtype, T, H, D, runs):
    """docs/contract.md C16 and C24: in-place merges repeated on large grids.

    A race between the threads that read a row's LSEs and the one that writes its
    output LSE shows only now and then, so the in-place merge (output is prefix_output,
    output_lse is prefix_lse) runs many times on large grids, each time from the same
    inputs, and must give the out-of-place result every time. On an H200 the Triton kernel
    without its barrier before the LSE store differed in 39 of 3000 runs at bf16
    4096 x 128 (so about 13 of these 1000) and 1 of 1000 at fp32 2048 x 64 x 512; with it,
    and the cuda backend, in none. The third grid is small enough for head-major rows
    (cuda head_major_rows, triton head_major_programs)."""
    g = torch.Generator(device="cuda").manual_seed(21)
    prefix = torch.randn(T, H, D, device="cuda", dtype=dtype, generator=g)
    suffix = torch.randn(T, H, D, device="cuda", dtype=dtype, generator=g)
    # LSE gaps of up to ~20 and a few empty rows: every weight matters to the output
    prefix_lse = torch.randn(H, T, device="cuda", generator=g) * 4
    suffix_lse = torch.randn(H, T, device="cuda", generator=g) * 4
    prefix_lse[:, ::97] = -INF
    expected, expected_lse = torch.empty_like(prefix), torch.empty_like(prefix_lse)
    attnmerge.merge_attn_states(
        expected, prefix, prefix_lse, suffix, suffix_lse, expected_lse, backend=backend
    )
    out, out_lse = torch.empty_like(prefix), torch.empty_like(prefix_lse)
    differing = 0
    for _ in range(runs):
        out.copy_(prefix)
        out_lse.copy_(prefix_lse)
        attnmerge.merge_attn_states(out, out, out_lse, suffix, suffix_lse, out_lse, backend=backend)
        differing += int(not (bits_equal(out, expected) and bits_equal(out_lse, expected_lse)))
    assert differing == 0, f"{differing} of {runs} in-place runs differ from the out-of-place merge"


# ---------------------------------------------------------------------------
# Layouts (docs/contract.md C11 to C15).


@pytest.mark.parametrize(
    "layouts", [("th", "th", "th"), ("th", "ht", "th"), ("ht", "th", "ht")], ids="-".join
)
def test_layout_lse_t_h_strided_views(backend_device, layouts):
    """docs/contract.md C13 and C24: [T, H]-stored LSEs passed as .t() views, with padding,
    give the bits of contiguous [H, T] ones."""
    backend, device = backend_device
    T, H, D = T_MANY, 4, 24
    case = make_case(
        T,
        H,
        D,
        device=device,
        lse_layouts=layouts,
        lse_pads=(0, 3, 1),
        lse_pattern="mixed",
        seed=15,
    )
    assert case.prefix_lse.stride() == ((1, H) if layouts[0] == "th" else (T, 1))
    run_and_check(case, backend)
    contiguous = make_case(T, H, D, device=device, lse_pattern="mixed", seed=15)
    contiguous.run(backend)
    assert_bits_equal(case.output, contiguous.output, "output")
    assert_bits_equal(case.output_lse.contiguous(), contiguous.output_lse, "output_lse")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, FP8], ids=dtype_name)
def test_layout_independent_strides(backend_device, out_dtype):
    """docs/contract.md C12: each tensor its own token and head strides; the padding keeps
    its bytes."""
    # Prefix: padded-V view (head stride 192, D = 128); suffix: padded tokens; output:
    # its own token stride. Padding holds NaN (inputs) or a sentinel (output) and is
    # checked untouched.
    backend, device = backend_device
    T, H, D = T_MANY, 3, 128
    case = make_case(
        T,
        H,
        D,
        dtype=torch.bfloat16,
        out_dtype=out_dtype,
        scale=_scale_for(out_dtype),
        device=device,
        prefix_strides=(H * 192, 192),
        suffix_strides=padded(H, D, token_pad=40),
        out_strides=padded(H, D, head_pad=16, token_pad=8),
        lse_pattern="mixed",
        seed=16,
    )
    assert case.prefix_output.stride() == (H * 192, 192, 1)
    run_and_check(case, backend)


def test_layout_unaligned_storage_offsets(backend_device):
    """docs/contract.md C12: storage offsets not aligned to 16 bytes."""
    # Views starting one element into their storage (not 16-byte aligned).
    backend, device = backend_device
    case = make_case(
        T_MANY,
        3,
        40,
        dtype=torch.float16,
        out_dtype=torch.bfloat16,
        device=device,
        offsets=(1, 3, 1),
        lse_pattern="mixed",
        seed=17,
    )
    run_and_check(case, backend)


def test_layout_specialisation_changes_between_calls(backend_device):
    """docs/contract.md C12 and C13: alignments, strides, LSE layouts and head counts that
    change from call to call."""
    # The same dtypes and head size, called in turn with arguments that compiled kernels
    # specialise on differently: aligned / unaligned pointers, strides that are or are
    # not multiples of 16, one head, then the first form again. A kernel cached for one
    # form must never serve another.
    backend, device = backend_device
    H, D = 4, 64
    variants = [
        {},
        {"offsets": (1, 0, 0)},
        {"offsets": (0, 3, 1)},
        {"suffix_strides": padded(H, D, token_pad=3)},
        {"prefix_strides": padded(H, D, head_pad=1), "out_strides": padded(H, D, head_pad=16)},
        {"lse_layouts": ("th", "ht", "th"), "lse_pads": (1, 0, 0)},
        {"H": 1},
        {"H": 16, "lse_layouts": ("th", "th", "th")},
        {},
        {"offsets": (1, 0, 0)},
    ]
    for i, v in enumerate(variants):
        kw = {"H": H, **v}
        case = make_case(
            T_MANY, D=D, dtype=torch.bfloat16, device=device, lse_pattern="mixed", seed=30 + i, **kw
        )
        run_and_check(case, backend)


@pytest.mark.parametrize(
    ("dtype", "out_dtype"),
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, FP8),
    ],
    ids=str,
)
def test_layout_output_dtype_differs_from_inputs(backend_device, dtype, out_dtype):
    """docs/contract.md C11: an output dtype other than the partials'."""
    backend, device = backend_device
    case = make_case(
        T_MANY,
        3,
        48,
        dtype=dtype,
        out_dtype=out_dtype,
        scale=_scale_for(out_dtype),
        device=device,
        lse_pattern="mixed",
        seed=18,
    )
    run_and_check(case, backend)


def test_layout_prefix_and_suffix_of_different_dtypes(backend_device):
    """docs/contract.md C11: prefix and suffix of different dtypes."""
    backend, device = backend_device
    case = make_case(
        T_MANY,
        3,
        48,
        dtype=torch.float16,
        suffix_dtype=torch.bfloat16,
        out_dtype=torch.float32,
        device=device,
        lse_pattern="mixed",
        seed=19,
    )
    run_and_check(case, backend)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=dtype_name)
def test_layout_single_token(backend_device, out_dtype):
    """docs/contract.md C14: one token, one head, a head size that is not a power of two,
    every output dtype."""
    backend, device = backend_device
    case = make_case(
        1,
        1,
        72,
        dtype=torch.bfloat16,
        out_dtype=out_dtype,
        scale=_scale_for(out_dtype),
        device=device,
        seed=20,
    )
    run_and_check(case, backend)


@pytest.mark.parametrize("with_lse", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, FP8], ids=dtype_name)
def test_layout_zero_tokens_is_a_no_op(backend_device, out_dtype, with_lse):
    """docs/contract.md C15: T = 0 writes nothing (the storage around the views keeps its
    bytes)."""
    backend, device = backend_device
    case = make_case(
        0,
        4,
        64,
        dtype=torch.float32,
        out_dtype=out_dtype,
        scale=_scale_for(out_dtype),
        device=device,
        with_lse=with_lse,
        P=0,
    )
    case.run(backend)
    for g in case.guards:
        g.check("T = 0")
    case.P = None
    case.run(backend)
    assert case.output.shape == (0, 4, 64)


@pytest.mark.parametrize("with_lse", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, FP8], ids=dtype_name)
def test_layout_zero_tokens_fresh_tensors(backend_device, out_dtype, with_lse):
    """docs/contract.md C15 and C20: T = 0 with fresh empty tensors, through both
    functions."""
    # T = 0 as an engine passes it: freshly allocated empty tensors (which hold no
    # memory, so their data pointers coincide).
    backend, device = backend_device
    H, D = 4, 64
    output = torch.empty(0, H, D, dtype=out_dtype, device=device)
    parts = [torch.empty(0, H, D, device=device) for _ in range(2)]
    lses = [torch.empty(H, 0, device=device) for _ in range(2)]
    output_lse = torch.empty(H, 0, device=device) if with_lse else None
    scale = torch.ones(1, device=device) if out_dtype == FP8 else None
    attnmerge.merge_attn_states(
        output, parts[0], lses[0], parts[1], lses[1], output_lse, None, scale, backend=backend
    )
    res = attnmerge.merge(
        parts,
        lses,
        backend=backend,
        quant=attnmerge.FP8Static(scale) if out_dtype == FP8 else None,
        out_dtype=None if out_dtype == FP8 else out_dtype,
        return_lse=True,
    )
    assert res.output.shape == (0, H, D) and res.lse.shape == (H, 0)
