"""K-way merges: ``attnmerge.merge`` with K >= 1 partial states, in its three input forms.

The same K partials reach ``merge`` in these forms (``make_inputs``):

* ``list`` / ``tuple``: K separate ``[T, H, D]`` outputs and K ``[H, T]`` LSEs (``list``:
  each in its own padded storage, LSEs alternately ``[H, T]``- and ``[T, H]``-stored);
  ``list_views``: a list of the K views ``stack[k]`` of one padded stacked buffer;
* ``stacked`` / ``stacked_padded``: one ``[K, T, H, D]`` tensor and one ``[K, H, T]`` LSE
  tensor, contiguous or with padded strides; ``flashinfer``: views of FlashInfer's
  ``v [T, K, H, D]`` and ``s [T, K, H]`` (``v.transpose(0, 1)``, ``s.permute(1, 2, 0)``);
* ``packed`` / ``packed_th``: rows ``[N, H, D]``, LSEs ``[H, N]`` (``packed_th``: stored
  ``[N, H]``, passed as ``.t()``) and ``indptr [T + 1]``; token t merges the rows
  ``indptr[t] <= n < indptr[t + 1]``. With K rows per token it holds the same data as the
  stacked forms; ``make_packed`` builds a variable number of rows per token.

The semantics are docs/contract.md's two-way rules generalised to K: per token and head,
``m = max_k l_k``, ``e_k = exp(l_k - m)``, ``total`` summed in order k = 0..K-1,
``w_k = e_k / total``, ``O = sum_k where(w_k != 0, w_k O_k, 0)``, ``lse = m + log(total)``,
all in float32, with C4 to C8 (empty partials, zero weights, NaN, tokens past
``prefill_tokens_with_context``) applied per partial.

Every backend is compared with the float32 reference (``merge_states_reference``, the
torch backend's arithmetic) through the shared tolerance table; where the contract fixes
the result (all-empty rows, a single weighted partial, NaN positions, K = 1, K = 2 against
``merge_attn_states``, one backend's result in every form), the comparison is bit for bit.
The reference and every backend are also checked against an independent float64 merge,
for K up to 64 and LSE spreads where a naive exp overflows. Shapes stay tiny on a CPU,
where the Triton interpreter runs each program in about a millisecond.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch
from utils import (
    FLOAT_DTYPES,
    FP8,
    INF,
    LSE_CATEGORIES,
    NAN,
    ON_GPU,
    Expected,
    Guard,
    assert_bits_equal,
    assert_lse_close,
    assert_output_close,
    dtype_name,
    fp8_codes,
    lse_tensor,
    lse_values,
    padded,
    strided_tensor,
)

import attnmerge
from attnmerge.reference import merge_states_reference, quantize_fp8_static

K_VALUES = (1, 2, 3, 4, 7, 16, 64)
#: One form of each kind, each with non-trivial strides or layouts.
MAIN_FORMS = ("list", "stacked_padded", "flashinfer", "packed_th")
#: Forms with a first partial (in place, prefill_tokens_with_context).
FIRST_FORMS = ("list", "list_views", "stacked_padded", "flashinfer")
ALL_FORMS = (
    "list",
    "tuple",
    "list_views",
    "stacked",
    "stacked_padded",
    "flashinfer",
    "packed",
    "packed_th",
)

FP8_SCALE = 0.02  # |O| <~ 5 maps to <~ 250: the e4m3 range without saturating
OTHER_DTYPE = {
    torch.float32: torch.bfloat16,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float16,
}
#: The device of the argument-check tests (their checks run before any backend).
CHECK_DEVICE = "cuda" if ON_GPU else "cpu"
#: A device the partials are not on.
OTHER_DEVICE = "cpu" if ON_GPU else "meta"

# The float32 merge against float64 math (test_float64_*). Measured on the torch backend
# with K up to 64, LSE spreads up to 1000 and offsets up to +-1000, in both bases: the
# output is within 6.1e-7 * mag (about 10 fp32 ulps of mag = sum_k |w_k O_k|), the LSE
# within 1.5e-7 * max(1, |lse|). The bounds below add the backend-vs-reference slack of
# the tolerance table (2e-6 * mag, 1e-6 for the LSE) and a margin of about 2. They stay
# tight: one LSE off by 1e-4 (its weight off by 1e-4 relative) exceeds the output bound
# eightfold (test_float64_bound_catches_a_wrong_weight).
F64_OUT_RTOL = 4e-6
F64_LSE_RTOL = 2e-6


def dims(device: str) -> tuple[int, int, int]:
    """(T, H, D): tiny on a CPU (the Triton interpreter), several programs on a GPU."""
    return (67, 5, 80) if torch.device(device).type == "cuda" else (5, 3, 16)


# ---------------------------------------------------------------------------
# Values.

_SPECIALS = tuple(c for c in LSE_CATEGORIES if c != "normal")


def kway_lses(K: int, H: int, T: int, pattern: str | tuple, gen: torch.Generator) -> torch.Tensor:
    """Float32 [K, H, T] LSEs. ``pattern``: as :func:`utils.lse_values`, or "kmixed":
    "normal" values with every special category (NaN, +-inf, 1e30, 1e4 gaps, ...) mixed
    in at a rate of 1 / (2K) per partial, so about one row in two holds one whatever K is
    (a fixed rate would make nearly every row of a 64-way merge NaN)."""
    if pattern == "kmixed":
        normal = lse_values(H, K * T, "normal", gen)
        special = lse_values(H, K * T, _SPECIALS, gen)
        pick = torch.rand(H, K * T, generator=gen) < 1 / (2 * K)
        values = torch.where(pick, special, normal)
    else:
        values = lse_values(H, K * T, pattern, gen)
    return values.reshape(H, K, T).permute(1, 0, 2).contiguous()


def _junk(D: int) -> torch.Tensor:
    return torch.tensor([NAN, INF, -INF])[torch.arange(D) % 3]


def add_junk(V: torch.Tensor, L: torch.Tensor, P: int | None = None) -> None:
    """Fill the rows that must not be read with NaN/inf (in place): empty partials,
    partials whose weight is 0 against a gap >= 2000 (0 in float64 too), and the first
    partial at tokens >= P, whose LSEs become NaN there. V [K, T, H, D], L [K, H, T]."""
    eff = torch.where(L == INF, -INF, L)
    if P is not None:
        eff[0, :, P:] = -INF
        L[0, :, P:] = NAN
    m = eff.amax(dim=0)
    unread = (eff == -INF) | ((m - eff) >= 2000)  # NaN comparisons are False
    V[unread.transpose(1, 2)] = _junk(V.shape[-1])


def kway_values(
    K: int,
    T: int,
    H: int,
    D: int,
    *,
    pattern: str | tuple = "normal",
    seed: int = 0,
    P: int | None = None,
    garbage: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU float32 values of K partials: V [K, T, H, D], L [K, H, T]."""
    gen = torch.Generator().manual_seed(seed)
    L = kway_lses(K, H, T, pattern, gen)
    V = torch.randn(K, T, H, D, generator=gen)
    if garbage:
        add_junk(V, L, P)
    return V, L


# ---------------------------------------------------------------------------
# Forms.


@dataclass
class Inputs:
    """One set of partials laid out in one form."""

    form: str
    outputs: object  # what merge() receives
    lses: object
    indptr: torch.Tensor | None
    #: the K partials as [T, H, D] / [H, T] CPU tensors (padded with empty slots for a
    #: variable packed form): what the reference merges
    ref_outputs: list
    ref_lses: list
    #: the K partials as device views ([T, H, D], [H, T]); None for variable packed forms
    parts: list | None
    part_lses: list | None
    #: the first partial's LSE is stored [T, H]
    first_th: bool
    bases: list = field(default_factory=list)
    snapshots: list = field(init=False)

    def __post_init__(self) -> None:
        self.snapshots = [b.clone() for b in self.bases]

    def call(self, backend: str, **kw) -> attnmerge.MergeResult:
        if self.indptr is not None:
            kw["indptr"] = self.indptr
        return attnmerge.merge(self.outputs, self.lses, backend=backend, **kw)

    def expected(self, lse_base: str | int = "e", P: int | None = None) -> Expected:
        return reference(self.ref_outputs, self.ref_lses, lse_base, P)

    def check_unchanged(self, written: Sequence[torch.Tensor] = ()) -> None:
        """Every input storage holds its bytes, except the elements of ``written``."""
        for base, before in zip(self.bases, self.snapshots, strict=True):
            now, was = base.clone(), before.clone()
            for w in written:
                if w.untyped_storage().data_ptr() == base.untyped_storage().data_ptr():
                    for t in (now, was):
                        t.as_strided(w.shape, w.stride(), w.storage_offset()).zero_()
            assert torch.equal(_bytes(now), _bytes(was)), f"{self.form}: an input was modified"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def reference(outputs, lses, lse_base: str | int = "e", P: int | None = None) -> Expected:
    """The float32 reference (CPU) and the magnitude sum_k |w_k O_k|."""
    outs = [o.cpu().clone() for o in outputs]
    ls = [x.cpu().clone() for x in lses]
    kw = {"lse_base_2": lse_base == 2, "prefill_tokens_with_context": P}
    out, lse = merge_states_reference(outs, ls, **kw)
    mag, _ = merge_states_reference([o.float().abs() for o in outs], ls, **kw)
    return Expected(out, lse, mag)


def make_inputs(
    form: str,
    V: torch.Tensor,
    L: torch.Tensor,
    device: str,
    dtype: torch.dtype | Sequence[torch.dtype] = torch.float32,
    first_th: bool | None = None,
) -> Inputs:
    """The partials V [K, T, H, D], L [K, H, T] (CPU float32) in ``form`` on ``device``.
    ``dtype``: the partials' dtype (``list``: one per partial allowed). ``first_th``: the
    first LSE stored [T, H] (fixed by the form for ``flashinfer``/``packed*``)."""
    K, T, H, D = V.shape
    dtypes = list(dtype) if isinstance(dtype, (list, tuple)) else [dtype] * K
    if form != "list":
        assert len(set(dtypes)) == 1, form
    dt = dtypes[0]
    bases = []
    indptr = None
    if form in ("list", "tuple"):
        parts, part_lses = [], []
        for k in range(K):
            th = bool(first_th) if k == 0 else k % 2 == 1
            if form == "list":
                strides = padded(H, D, head_pad=(k + 1) % 3, token_pad=((k + 1) % 2) * 5)
                offset, lse_pad, lse_offset = k % 4, (k + 1) % 3, k % 2
            else:
                strides, offset, lse_pad, lse_offset = (H * D, D), 0, 0, 0
                th = bool(first_th)
            base, view = strided_tensor(
                (T, H, D), (*strides, 1), offset, dtypes[k], device, V[k], fill=NAN
            )
            lbase, lview = lse_tensor(L[k], "th" if th else "ht", lse_pad, device, lse_offset)
            bases += [base, lbase]
            parts.append(view)
            part_lses.append(lview)
        outputs = parts if form == "list" else tuple(parts)
        lses = list(part_lses) if form == "list" else tuple(part_lses)
        first_th = bool(first_th)
    elif form in ("stacked", "stacked_padded", "list_views"):
        first_th = bool(first_th)
        if form == "stacked":
            o_strides, offset = (T * H * D, H * D, D, 1), 0
            l_strides = (T * H, 1, H) if first_th else (H * T, T, 1)
        else:
            hs = D + 3
            ts = H * hs + 5
            o_strides, offset = (T * ts + 7, ts, hs, 1), 2
            l_strides = (T * (H + 2) + 1, 1, H + 2) if first_th else (H * (T + 2) + 1, T + 2, 1)
        base, outputs = strided_tensor((K, T, H, D), o_strides, offset, dt, device, V, fill=NAN)
        lbase, lses = strided_tensor(
            (K, H, T), l_strides, offset, torch.float32, device, L, fill=NAN
        )
        bases += [base, lbase]
        parts = [outputs[k] for k in range(K)]
        part_lses = [lses[k] for k in range(K)]
        if form == "list_views":
            outputs, lses = parts, part_lses
    elif form == "flashinfer":
        first_th = True
        v = V.permute(1, 0, 2, 3).contiguous().to(dt).to(device)  # [T, K, H, D]
        s = L.permute(2, 0, 1).contiguous().to(device)  # [T, K, H]
        outputs, lses = v.transpose(0, 1), s.permute(1, 2, 0)
        bases += [v, s]
        parts = [outputs[k] for k in range(K)]
        part_lses = [lses[k] for k in range(K)]
    elif form in ("packed", "packed_th"):
        first_th = form == "packed_th"
        rows = V.permute(1, 0, 2, 3).reshape(T * K, H, D)  # row t * K + k
        lse_rows = L.permute(2, 0, 1).reshape(T * K, H)
        if form == "packed":
            base, outputs = strided_tensor(
                (T * K, H, D), (H * D, D, 1), 0, dt, device, rows, fill=NAN
            )
            lbase, lses = lse_tensor(lse_rows.t(), "ht", 0, device)
            indptr = (torch.arange(T + 1, dtype=torch.int64) * K).to(device)
        else:
            strides = padded(H, D, head_pad=2, token_pad=3)
            base, outputs = strided_tensor(
                (T * K, H, D), (*strides, 1), 1, dt, device, rows, fill=NAN
            )
            lbase, lses = lse_tensor(lse_rows.t(), "th", 1, device)
            indptr = (torch.arange(T + 1, dtype=torch.int32) * K).to(device)
        bases += [base, lbase, indptr]
        parts = [outputs[k::K] for k in range(K)]
        part_lses = [lses[:, k::K] for k in range(K)]
    else:
        raise AssertionError(form)
    return Inputs(
        form=form,
        outputs=outputs,
        lses=lses,
        indptr=indptr,
        ref_outputs=[p.cpu().clone() for p in parts],
        ref_lses=[x.cpu().clone() for x in part_lses],
        parts=parts,
        part_lses=part_lses,
        first_th=first_th,
        bases=bases,
    )


def make_packed(
    counts: Sequence[int],
    H: int,
    D: int,
    device: str,
    *,
    dtype: torch.dtype = torch.float32,
    indptr_dtype: torch.dtype = torch.int32,
    lse_layout: str = "ht",
    pattern: str | tuple = "normal",
    seed: int = 0,
    lead: int = 0,
    trail: int = 0,
) -> Inputs:
    """A packed form with ``counts[t]`` rows for token t (0 included), ``lead`` unused
    rows before the first token's and ``trail`` after the last one's (junk rows, NaN
    LSEs). The reference merges the same rows as K_max stacked partials, slots past a
    token's count empty."""
    T, N = len(counts), sum(counts)
    k_max = max(max(counts, default=0), 1)
    gen = torch.Generator().manual_seed(seed)
    L = kway_lses(k_max, H, T, pattern, gen)
    V = torch.randn(k_max, T, H, D, generator=gen)
    for t, c in enumerate(counts):
        L[c:, :, t] = -INF  # slots past the count: empty
    add_junk(V, L)
    rows = torch.empty(lead + N + trail, H, D)
    lse_rows = torch.full((H, lead + N + trail), NAN)
    rows[:] = _junk(D)
    n = lead
    for t, c in enumerate(counts):
        for k in range(c):
            rows[n], lse_rows[:, n] = V[k, t], L[k, :, t]
            n += 1
    total = lead + N + trail
    strides = padded(H, D, head_pad=1, token_pad=2) if lse_layout == "th" else (H * D, D)
    base, outputs = strided_tensor((total, H, D), (*strides, 1), 0, dtype, device, rows, NAN)
    lbase, lses = lse_tensor(lse_rows, lse_layout, 1, device)
    bounds = torch.tensor([0, *counts]).cumsum(0) + lead
    indptr = bounds.to(indptr_dtype).to(device)
    return Inputs(
        form=f"packed(counts={list(counts)}, {dtype_name(indptr_dtype)}, lse {lse_layout})",
        outputs=outputs,
        lses=lses,
        indptr=indptr,
        ref_outputs=[V[k].to(dtype) for k in range(k_max)],
        ref_lses=[L[k].clone() for k in range(k_max)],
        parts=None,
        part_lses=None,
        first_th=lse_layout == "th",
        bases=[base, lbase, indptr],
    )


def variable_counts(device: str) -> list[int]:
    """Rows per token: zero-row tokens first, in the middle and last; up to 9 (CPU) or
    40 (GPU) rows."""
    if torch.device(device).type == "cuda":
        g = torch.Generator().manual_seed(5)
        counts = torch.randint(0, 13, (97,), generator=g).tolist()
        counts[0] = counts[-1] = counts[50] = 0
        counts[7], counts[8] = 40, 1
        return counts
    return [0, 3, 1, 0, 2, 9, 1, 0]


# ---------------------------------------------------------------------------
# Output formats and checks.


def quant_kwargs(kind: str, dtype: torch.dtype, device: str):
    """(merge kwargs, output dtype, FP8 scale or None) for an output kind."""
    if kind in ("default", "same"):
        return {}, dtype, None
    if kind == "out_dtype":
        return {"out_dtype": OTHER_DTYPE[dtype]}, OTHER_DTYPE[dtype], None
    if kind == "plain":
        return {"quant": attnmerge.Plain(OTHER_DTYPE[dtype])}, OTHER_DTYPE[dtype], None
    if kind == "fp8":
        scale = torch.tensor([FP8_SCALE], device=device)
        return {"quant": attnmerge.FP8Static(scale)}, FP8, scale
    raise AssertionError(kind)


def stored(out32: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """What the contract stores for the float32 result (CPU)."""
    if dtype == FP8:
        return quantize_fp8_static(out32, scale.cpu())
    return out32.to(dtype)


def check_result(
    res: attnmerge.MergeResult,
    exp: Expected,
    *,
    backend: str,
    device: str,
    out_dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    lse: bool = True,
    what: str = "",
) -> None:
    """A backend's result against the float32 reference, through the tolerance table
    (and bit for bit for the torch backend on the CPU, which is the reference)."""
    assert isinstance(res, attnmerge.MergeResult)
    assert res.output.dtype == out_dtype, f"{what}: output dtype {res.output.dtype}"
    assert res.output.shape == exp.output.shape, f"{what}: output shape {res.output.shape}"
    assert res.output.device.type == torch.device(device).type
    out = res.output.cpu()
    sc = None if scale is None else scale.cpu()
    assert_output_close(out, exp.output, exp.magnitude, sc, f"output of {what}")
    if lse:
        assert res.lse is not None, f"{what}: no LSE returned"
        assert res.lse.dtype == torch.float32
        assert_lse_close(res.lse.cpu(), exp.lse, f"lse of {what}")
    if backend == "torch" and torch.device(device).type == "cpu":
        assert_bits_equal(out, stored(exp.output, out_dtype, sc), f"output of {what}")
        if lse:
            assert_bits_equal(res.lse.cpu(), exp.lse, f"lse of {what}")


def assert_same_values(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal as numbers (NaN equals NaN, +0 equals -0)."""
    a, b = a.cpu().float(), b.cpu().float()
    assert a.shape == b.shape, what
    ok = (a == b) | (a.isnan() & b.isnan())
    assert ok.all(), f"{what}: {int((~ok).sum())} elements differ, first {(~ok).nonzero()[:3]}"


def rows_of(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t[mask]`` on the CPU (FP8 through its codes)."""
    t = t.cpu()
    if t.dtype == FP8:
        return fp8_codes(t)[mask].view(FP8)
    return t[mask]


def is_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.cpu()
    return (fp8_codes(t) & 0x7F) == 0x7F if t.dtype == FP8 else t.float().isnan()


def oracle64(outputs, lses, base2: bool = False, P: int | None = None):
    """Independent float64 merge: (output, lse, magnitude), torch.logsumexp/softmax with
    the contract's substitutions applied directly."""
    ln = torch.stack([x.cpu().double() for x in lses])  # [K, H, T]
    ln = torch.where(ln == INF, -INF, ln)  # +inf is empty
    if P is not None:
        ln[0, :, P:] = -INF  # no first partial at tokens >= P
    if base2:
        ln = ln * math.log(2.0)
    empty = (ln == -INF).all(dim=0)
    lse = torch.logsumexp(ln, dim=0)
    w = torch.where(empty, 0.0, torch.softmax(ln, dim=0))
    out = torch.zeros(outputs[0].shape, dtype=torch.float64)
    mag = torch.zeros_like(out)
    for k, o in enumerate(outputs):
        wk = w[k].t().unsqueeze(-1)
        o = o.cpu().double()
        out = out + torch.where(wk != 0, wk * o, 0.0)
        mag = mag + torch.where(wk != 0, wk * o.abs(), 0.0)
    if base2:
        lse = lse / math.log(2.0)
    return out, lse, mag


def assert_close_f64(out: torch.Tensor, lse: torch.Tensor, want, what: str) -> None:
    ref_out, ref_lse, mag = want
    out, lse = out.cpu().double(), lse.cpu().double()
    assert torch.equal(out.isnan(), ref_out.isnan()), f"{what}: output NaN positions"
    assert torch.equal(lse.isnan(), ref_lse.isnan()), f"{what}: lse NaN positions"
    fin = ref_out.isfinite()
    assert torch.equal(out[~fin & ~out.isnan()], ref_out[~fin & ~ref_out.isnan()]), what
    excess = ((out - ref_out).abs() - F64_OUT_RTOL * mag)[fin]
    assert (excess <= 0).all(), (
        f"{what}: output off float64 by up to {excess.max().item():.3g} beyond {F64_OUT_RTOL} * mag"
    )
    lfin = ref_lse.isfinite()
    assert torch.equal(lse[~lfin & ~lse.isnan()], ref_lse[~lfin & ~ref_lse.isnan()]), what
    lexcess = ((lse - ref_lse).abs() - F64_LSE_RTOL * ref_lse.abs().clamp(min=1.0))[lfin]
    assert (lexcess <= 0).all(), f"{what}: lse off float64 by {lexcess.max().item():.3g}"


# ---------------------------------------------------------------------------
# Every form and K against the reference.


@pytest.mark.parametrize("K", K_VALUES)
@pytest.mark.parametrize("form", MAIN_FORMS)
def test_matches_reference(backend_device, form, K):
    """Mixed special LSEs (NaN, +-inf, 1e30, 1e4 gaps) and junk in unread rows, every K,
    each form; partial dtypes by K."""
    backend, device = backend_device
    T, H, D = dims(device)
    dtype = FLOAT_DTYPES[K % 3]
    V, L = kway_values(K, T, H, D, pattern="kmixed", seed=K)
    inp = make_inputs(form, V, L, device, dtype)
    exp = inp.expected()
    res = inp.call(backend, return_lse=True)
    check_result(res, exp, backend=backend, device=device, out_dtype=dtype, what=f"{form} K={K}")
    inp.check_unchanged()


@pytest.mark.parametrize("kind", ["out_dtype", "plain", "fp8"])
@pytest.mark.parametrize("form", MAIN_FORMS)
def test_output_formats(backend_device, form, kind):
    """quant=Plain(dtype), FP8Static(scale) and out_dtype, in every form."""
    backend, device = backend_device
    T, H, D = dims(device)
    dtype = torch.bfloat16
    V, L = kway_values(5, T, H, D, pattern="kmixed", seed=21)
    inp = make_inputs(form, V, L, device, dtype)
    kw, out_dtype, scale = quant_kwargs(kind, dtype, device)
    exp = inp.expected()
    res = inp.call(backend, return_lse=True, **kw)
    check_result(
        res, exp, backend=backend, device=device, out_dtype=out_dtype, scale=scale, what=kind
    )


def test_mixed_partial_dtypes(backend_device):
    """Separate partials of different dtypes; the output takes the first one's dtype."""
    backend, device = backend_device
    T, H, D = dims(device)
    for K, kind in ((3, "default"), (7, "fp8")):
        dtypes = [FLOAT_DTYPES[(k + 1) % 3] for k in range(K)]
        V, L = kway_values(K, T, H, D, pattern="kmixed", seed=K + 30)
        inp = make_inputs("list", V, L, device, dtypes)
        kw, out_dtype, scale = quant_kwargs(kind, dtypes[0], device)
        res = inp.call(backend, return_lse=True, **kw)
        what = f"dtypes {[dtype_name(d) for d in dtypes]}"
        check_result(
            res, inp.expected(), backend=backend, device=device, out_dtype=out_dtype,
            scale=scale, what=what,
        )  # fmt: skip


HEAD_SIZES = [1, 3, 17, 40] + ([72, 80, 128, 192, 256, 512, 576] if ON_GPU else [])


@pytest.mark.parametrize("D", HEAD_SIZES)
@pytest.mark.parametrize("form", ["stacked_padded", "packed_th", "list"])
def test_head_sizes(backend_device, form, D):
    backend, device = backend_device
    T, H, _ = dims(device)
    V, L = kway_values(3, T, H, D, pattern="kmixed", seed=D)
    inp = make_inputs(form, V, L, device, torch.bfloat16)
    res = inp.call(backend, return_lse=True, out_dtype=torch.float32)
    check_result(
        res, inp.expected(), backend=backend, device=device, out_dtype=torch.float32,
        what=f"D={D}",
    )  # fmt: skip


@pytest.mark.parametrize("K", [3, 16])
@pytest.mark.parametrize("form", MAIN_FORMS)
def test_lse_base_2(backend_device, form, K):
    """lse_base=2 for every LSE of the call, against the reference and float64."""
    backend, device = backend_device
    T, H, D = dims(device)
    V, L = kway_values(K, T, H, D, pattern="kmixed", seed=K + 40)
    inp = make_inputs(form, V, L, device, torch.float32)
    res = inp.call(backend, lse_base=2, return_lse=True)
    exp = inp.expected(lse_base=2)
    check_result(res, exp, backend=backend, device=device, out_dtype=torch.float32, what="base 2")
    # a base-e merge of the same numbers differs: the base is not ignored
    base_e = inp.expected(lse_base="e")
    fin = exp.lse.isfinite()
    assert not torch.equal(base_e.lse[fin], exp.lse[fin])
    # the finite, garbage-free part of the same data against float64
    O2, L2 = kway_values(K, T, H, D, pattern="wide", seed=K + 41, garbage=False)
    inp2 = make_inputs(form, O2, L2, device, torch.float32)
    res2 = inp2.call(backend, lse_base=2, return_lse=True)
    want = oracle64(inp2.ref_outputs, inp2.ref_lses, base2=True)
    assert_close_f64(res2.output, res2.lse, want, f"{form} K={K} base 2")


def test_backend_auto(clean_dispatch):
    """backend="auto" serves K-way merges in every form."""
    device = CHECK_DEVICE
    T, H, D = dims(device)
    V, L = kway_values(5, T, H, D, pattern="kmixed", seed=50)
    for form in MAIN_FORMS:
        inp = make_inputs(form, V, L, device, torch.float16)
        res = inp.call("auto", return_lse=True)
        exp = inp.expected()
        assert_output_close(res.output.cpu(), exp.output, exp.magnitude, what=form)
        assert_lse_close(res.lse.cpu(), exp.lse, form)


@pytest.mark.parametrize("spacing", ["same_tensor", "reversed", "every_other", "two_buffers"])
def test_sequences_of_views(backend_device, spacing):
    """Separate partials that are views of one buffer at spacing 0 (one tensor K times),
    a negative spacing, twice the stack's stride, or of two buffers: the bits of the
    stacked form of the same values."""
    backend, device = backend_device
    T, H, D = dims(device)
    K = 5
    V, L = kway_values(2 * K, T, H, D, pattern="kmixed", seed=150)
    inp = make_inputs("stacked_padded", V, L, device, torch.bfloat16)
    stack, lse_stack = inp.outputs, inp.lses
    if spacing == "same_tensor":
        idx = [3] * K
    elif spacing == "reversed":
        idx = list(range(K - 1, -1, -1))
    elif spacing == "every_other":
        idx = list(range(0, 2 * K, 2))
    else:
        idx = list(range(K))
    outputs = [stack[k] for k in idx]
    lses = [lse_stack[k] for k in idx]
    if spacing == "two_buffers":
        other = make_inputs("stacked", V, L, device, torch.bfloat16)
        outputs[2], lses[2] = other.outputs[2], other.lses[2]
    res = attnmerge.merge(outputs, lses, return_lse=True, backend=backend)
    want = make_inputs("stacked", V[idx], L[idx], device, torch.bfloat16)
    check_result(
        res, want.expected(), backend=backend, device=device, out_dtype=torch.bfloat16,
        what=spacing,
    )  # fmt: skip
    ref = want.call(backend, return_lse=True)
    assert_bits_equal(res.output.cpu(), ref.output.cpu(), f"{spacing}: output")
    assert_bits_equal(res.lse.cpu(), ref.lse.cpu(), f"{spacing}: lse")
    inp.check_unchanged()


@pytest.mark.parametrize("form", ["list", "stacked", "packed"])
def test_zero_tokens(backend_device, form):
    """T = 0 is a valid call that returns empty tensors."""
    backend, device = backend_device
    _, H, D = dims(device)
    V, L = kway_values(3, 0, H, D)
    inp = make_inputs(form, V, L, device, torch.float16)
    res = inp.call(backend, return_lse=True)
    assert res.output.shape == (0, H, D) and res.output.dtype == torch.float16
    assert res.lse.shape == (H, 0) and res.lse.dtype == torch.float32


# ---------------------------------------------------------------------------
# The float32 result against float64 math: large K, LSE spreads where naive exp fails.

# (centre, half-width) of the LSEs per head: exp of the raw LSEs overflows (600) and
# underflows (-600) in float32; spreads of 100 to 1000 leave a few partials weighted.
SPREADS = ((0.0, 100.0), (600.0, 300.0), (-600.0, 1000.0), (0.0, 150.0), (1000.0, 100.0))


def spread_values(K: int, T: int, H: int, D: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centre = torch.tensor([SPREADS[h % len(SPREADS)][0] for h in range(H)]).view(1, H, 1)
    width = torch.tensor([SPREADS[h % len(SPREADS)][1] for h in range(H)]).view(1, H, 1)
    L = (centre + width * (2 * torch.rand(K, H, T, generator=gen) - 1)).float()
    V = torch.randn(K, T, H, D, generator=gen) * (1 + torch.arange(K)).view(K, 1, 1, 1) ** 0.5
    return V, L


@pytest.mark.parametrize("base", ["e", 2])
@pytest.mark.parametrize("K", [2, 3, 7, 16, 64])
def test_float64_large_spreads(backend_device, K, base):
    """Every backend within F64_OUT_RTOL * mag and F64_LSE_RTOL of a float64 merge."""
    backend, device = backend_device
    T, H, D = dims(device)
    if K > 16 and device == "cpu":
        T = 3  # the Triton interpreter
    V, L = spread_values(K, T, H, D, seed=K)
    exp_fn = torch.exp2 if base == 2 else torch.exp
    assert exp_fn(L).isinf().any() and (exp_fn(L) == 0).any()  # naive exp fails here
    form = MAIN_FORMS[K % len(MAIN_FORMS)]
    inp = make_inputs(form, V, L, device, torch.float32)
    res = inp.call(backend, lse_base=base, return_lse=True)
    want = oracle64(inp.ref_outputs, inp.ref_lses, base2=base == 2)
    assert want[0].isfinite().all() and want[1].isfinite().all()
    assert_close_f64(res.output, res.lse, want, f"{form} K={K} base {base}")
    check_result(
        res, inp.expected(base), backend=backend, device=device, out_dtype=torch.float32,
        what=f"{form} K={K}",
    )  # fmt: skip


def test_float64_bound_catches_a_wrong_weight():
    """The float64 bounds are tight enough to fail a merge with one weight off by 1e-4
    relative, or an LSE off by 4e-6 relative."""
    K, T, H, D = 16, 5, 3, 16
    V, L = spread_values(K, T, H, D, seed=3)
    L[:, 0, :] = L[:, 0, :] * 0.02  # head 0: LSEs within +-2, every weight sizeable
    outs, lses = list(V), list(L)
    want = oracle64(outs, lses)
    out, lse = merge_states_reference(outs, lses)
    assert_close_f64(out, lse, want, "reference")
    lses_off = [x.clone() for x in lses]
    lses_off[3][0] += 1e-4  # weight 3 of head 0 off by 1e-4 relative
    bad, _ = merge_states_reference(outs, lses_off)
    with pytest.raises(AssertionError):
        assert_close_f64(bad, lse, want, "perturbed weight")
    with pytest.raises(AssertionError):
        assert_close_f64(out, lse + 4e-6 * lse.abs().clamp(min=1), want, "lse")


def test_float64_reference_special_values():
    """The reference against float64 with every special LSE category, K up to 64."""
    for K in (3, 16, 64):
        V, L = kway_values(K, 9, 3, 8, pattern="kmixed", seed=K + 60)
        L = torch.where((L.abs() > 50) & (L.abs() < 500), 0.0, L)  # no fp32/fp64 underflow gap
        V, L = V.clone(), L.clone()
        add_junk(V, L)
        outs, lses = list(V), list(L)
        out, lse = merge_states_reference(outs, lses)
        assert_close_f64(out, lse, oracle64(outs, lses), f"K={K}")


# ---------------------------------------------------------------------------
# One backend, the same data: bit-identical in every form and LSE layout.


@pytest.mark.parametrize(("K", "kind"), [(1, "same"), (2, "fp8"), (3, "same"), (7, "fp8"),
                                         (16, "same"), (64, "same")])  # fmt: skip
def test_forms_agree_bitwise(backend_device, K, kind):
    """Separate, stacked (padded, FlashInfer views) and packed forms of the same partials,
    with [H, T]- and [T, H]-stored LSEs, give the same bits within one backend."""
    backend, device = backend_device
    T, H, D = dims(device)
    if K > 16 and device == "cpu":
        T, H = 3, 2  # 10 forms of a 64-way merge under the Triton interpreter
    dtype = torch.float16
    V, L = kway_values(K, T, H, D, pattern="kmixed", seed=K + 70)
    kw, out_dtype, scale = quant_kwargs(kind, dtype, device)
    variants = [(f, None) for f in ALL_FORMS] + [("list", True), ("stacked", True)]
    results = []
    for form, first_th in variants:
        inp = make_inputs(form, V, L, device, dtype, first_th=first_th)
        results.append((f"{form} first_th={first_th}", inp.call(backend, return_lse=True, **kw)))
    name0, res0 = results[0]
    check_result(
        res0, make_inputs("stacked", V, L, "cpu", dtype).expected(), backend=backend,
        device=device, out_dtype=out_dtype, scale=scale, what=name0,
    )  # fmt: skip
    for name, res in results[1:]:
        assert_bits_equal(res.output.cpu(), res0.output.cpu(), f"output of {name} vs {name0}")
        assert_bits_equal(res.lse.cpu(), res0.lse.cpu(), f"lse of {name} vs {name0}")


# ---------------------------------------------------------------------------
# K = 2 is the two-way merge, bit for bit.

K2_VARIANTS = ["bf16_to_fp32", "fp8", "base2", "prefill"]


@pytest.mark.parametrize("variant", K2_VARIANTS)
@pytest.mark.parametrize("form", MAIN_FORMS)
def test_k2_is_merge_attn_states(backend_device, form, variant):
    """K = 2 in any form gives merge_attn_states' bits on the same backend."""
    backend, device = backend_device
    if variant == "prefill" and form.startswith("packed"):
        pytest.skip("prefill_tokens_with_context does not apply to packed partials")
    T, H, D = dims(device)
    P = 2 if variant == "prefill" else None
    dtype = torch.bfloat16 if variant == "bf16_to_fp32" else torch.float16
    V, L = kway_values(2, T, H, D, pattern="mixed", seed=80, P=P)
    inp = make_inputs(form, V, L, device, dtype)
    base = 2 if variant == "base2" else "e"
    kw, out_dtype, scale = quant_kwargs("fp8" if variant == "fp8" else "same", dtype, device)
    if variant == "bf16_to_fp32":
        kw, out_dtype = {"out_dtype": torch.float32}, torch.float32
    if P is not None:
        kw["prefill_tokens_with_context"] = P
    res = inp.call(backend, lse_base=base, return_lse=True, **kw)

    out = torch.full((T, H, D), 7.0, device=device).to(out_dtype)
    out_lse = torch.full((H, T), 3.0, device=device)
    p0, p1 = inp.parts
    l0, l1 = inp.part_lses
    attnmerge.merge_attn_states(
        out, p0, l0, p1, l1, out_lse, P, scale, lse_base=base, backend=backend
    )
    assert_bits_equal(res.output.cpu(), out.cpu(), f"{form} {variant}: output")
    assert_bits_equal(res.lse.cpu(), out_lse.cpu(), f"{form} {variant}: lse")
    check_result(
        res, inp.expected(base, P), backend=backend, device=device, out_dtype=out_dtype,
        scale=scale, what=f"{form} {variant}",
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Packed partials with a variable number per token.


@pytest.mark.parametrize("lse_layout", ["ht", "th"])
@pytest.mark.parametrize("indptr_dtype", [torch.int32, torch.int64], ids=dtype_name)
def test_packed_variable_k(backend_device, indptr_dtype, lse_layout):
    """Tokens with 0 to 9 rows (40 on a GPU): against the reference; tokens without rows
    are exactly 0 with LSE -inf, tokens with one finite-LSE row copy it exactly."""
    backend, device = backend_device
    _, H, D = dims(device)
    counts = variable_counts(device)
    dtype = torch.bfloat16
    inp = make_packed(
        counts, H, D, device, dtype=dtype, indptr_dtype=indptr_dtype, lse_layout=lse_layout,
        pattern="kmixed", seed=90,
    )  # fmt: skip
    exp = inp.expected()
    T = len(counts)
    if lse_layout == "th":  # preallocated, padded outputs
        out_base, out = strided_tensor(
            (T, H, D), (*padded(H, D, 1, 3), 1), 1, torch.float32, device, fill=7.0
        )
        lse_base, out_lse = lse_tensor(torch.full((H, T), 3.0), "th", 2, device)
        guards = [
            Guard(out_base, out.shape, out.stride(), out.storage_offset()),
            Guard(lse_base, out_lse.shape, out_lse.stride(), out_lse.storage_offset()),
        ]
        res = inp.call(backend, out=out, out_lse=out_lse, out_dtype=torch.float32)
        assert res.output is out and res.lse is out_lse
        for g in guards:
            g.check("packed out/out_lse")
        out_dtype = torch.float32
    else:
        res = inp.call(backend, return_lse=True)
        out_dtype = dtype
    check_result(res, exp, backend=backend, device=device, out_dtype=out_dtype, what=inp.form)
    inp.check_unchanged()

    output, lse = res.output.cpu(), res.lse.cpu()
    zero = torch.tensor([c == 0 for c in counts])
    assert (output[zero] == 0).all() and not output[zero].isnan().any()
    assert (lse[:, zero] == -INF).all()
    start = inp.indptr.cpu().long()
    rows, lse_rows = inp.outputs.cpu(), inp.lses.cpu()
    for t, c in enumerate(counts):
        if c != 1:
            continue
        row_lse = lse_rows[:, start[t]]
        fin = row_lse.isfinite()
        want = rows[start[t]].float().to(out_dtype)
        assert_bits_equal(output[t][fin], want[fin], f"token {t} (one row)")
        assert_bits_equal(lse[fin, t], row_lse[fin], f"lse of token {t} (one row)")


def test_packed_variable_k_matches_stacked(backend_device):
    """Each token of a variable packed merge gives the bits of a stacked merge of its
    rows (grouped by count) on the same backend."""
    backend, device = backend_device
    _, H, D = dims(device)
    counts = variable_counts(device)
    kw, out_dtype, scale = quant_kwargs("fp8", torch.float16, device)
    inp = make_packed(counts, H, D, device, dtype=torch.float16, pattern="kmixed",
                      seed=91)  # fmt: skip
    res = inp.call(backend, return_lse=True, **kw)
    check_result(
        res, inp.expected(), backend=backend, device=device, out_dtype=out_dtype, scale=scale,
        what=inp.form,
    )  # fmt: skip
    counts_t = torch.tensor(counts)
    for c in sorted(set(counts) - {0}):
        idx = (counts_t == c).nonzero().flatten()
        V = torch.stack([inp.ref_outputs[k][idx].float() for k in range(c)])
        L = torch.stack([inp.ref_lses[k][:, idx] for k in range(c)])
        stacked = make_inputs("stacked", V, L, device, torch.float16)
        want = stacked.call(backend, return_lse=True, **kw)
        assert_bits_equal(res.output.cpu()[idx], want.output.cpu(), f"tokens with {c} rows: output")
        assert_bits_equal(res.lse.cpu()[:, idx], want.lse.cpu(), f"tokens with {c} rows: lse")


def test_packed_rows_outside_indptr_are_not_read(backend_device):
    """Rows before indptr[0] and past indptr[T] (junk, NaN LSEs) change nothing."""
    backend, device = backend_device
    _, H, D = dims(device)
    counts = variable_counts(device)
    kw = {"dtype": torch.float32, "pattern": "kmixed", "seed": 92}
    tight = make_packed(counts, H, D, device, **kw)
    loose = make_packed(counts, H, D, device, lead=2, trail=3, **kw)
    assert int(loose.indptr[0]) == 2 and loose.outputs.shape[0] == tight.outputs.shape[0] + 5
    a = tight.call(backend, return_lse=True)
    b = loose.call(backend, return_lse=True)
    assert_bits_equal(b.output.cpu(), a.output.cpu(), "output")
    assert_bits_equal(b.lse.cpu(), a.lse.cpu(), "lse")
    check_result(
        a, tight.expected(), backend=backend, device=device, out_dtype=torch.float32,
        what="packed",
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Exact results: empty rows, one weighted partial, K = 1, NaN.


@pytest.mark.parametrize("K", [1, 3, 16])
@pytest.mark.parametrize("form", MAIN_FORMS)
def test_all_empty_rows_are_zero(backend_device, form, K):
    """Rows whose K partials are all empty (+inf or -inf LSEs, junk rows) are exactly 0
    with LSE -inf, next to ordinary rows; FP8 for K = 3, base 2 for K = 16."""
    backend, device = backend_device
    T, H, D = dims(device)
    g = torch.Generator().manual_seed(K)
    empty = torch.rand(H, T, generator=g) < 0.5
    empty[0, 0], empty[-1, -1] = True, False
    L = 4 * torch.randn(K, H, T, generator=g)
    sign = torch.rand(K, H, T, generator=g) < 0.5
    L = torch.where(empty & sign, INF, torch.where(empty, -INF, L))
    V = torch.randn(K, T, H, D, generator=g)
    add_junk(V, L)
    inp = make_inputs(form, V, L, device, torch.bfloat16)
    kind = "fp8" if K == 3 else "same"
    base = 2 if K == 16 else "e"
    kw, out_dtype, scale = quant_kwargs(kind, torch.bfloat16, device)
    res = inp.call(backend, return_lse=True, lse_base=base, **kw)
    out, lse = res.output.cpu().float(), res.lse.cpu()
    e = empty.t()  # [T, H]
    assert V[0][e].isnan().any()  # the empty rows hold junk
    assert not out[e].isnan().any() and (out[e] == 0).all()
    assert (lse.t()[e] == -INF).all()
    check_result(
        res, inp.expected(base), backend=backend, device=device, out_dtype=out_dtype,
        scale=scale, what=f"{form} K={K}",
    )  # fmt: skip


@pytest.mark.parametrize("base", ["e", 2])
@pytest.mark.parametrize("kind", ["fp32_to_bf16", "fp8"])
@pytest.mark.parametrize("K", [1, 4, 16])
@pytest.mark.parametrize("form", ["list", "flashinfer", "packed_th"])
def test_single_weighted_partial_is_exact(backend_device, form, K, kind, base):
    """Where one partial has a non-zero weight and every other is empty or weighs exactly
    0 in float32 (junk in their rows), the output row is that partial's row converted
    (NaN and inf elements included) and the LSE is its LSE, bit for bit."""
    backend, device = backend_device
    T, H, D = dims(device)
    g = torch.Generator().manual_seed(K * 10 + len(kind))
    winner = torch.randint(0, K, (H, T), generator=g)
    hi = 4 * torch.randn(H, T, generator=g)
    underflow = 120.0 if base == "e" else 160.0  # exp(-gap) is 0 in float32
    losers = torch.tensor([-INF, INF, underflow, 5000.0, -1e30])
    pick = torch.randint(0, len(losers), (K, H, T), generator=g)
    lo = losers[pick]
    lo = torch.where(lo.abs() < 1e4, hi - lo, lo)  # gaps below the winner
    k_idx = torch.arange(K).view(K, 1, 1)
    L = torch.where(k_idx == winner, hi, lo)
    V = torch.randn(K, T, H, D, generator=g)
    is_winner = (k_idx == winner).transpose(1, 2)  # [K, T, H]
    V[~is_winner] = _junk(D)
    V[0, 0, 0, :3] = torch.tensor([NAN, INF, -INF])  # specials in a weighted row too
    V[K - 1, T - 1, H - 1, 1:4] = torch.tensor([-INF, NAN, INF])
    in_dtype = torch.float32 if kind == "fp32_to_bf16" else torch.bfloat16
    inp = make_inputs(form, V, L, device, in_dtype)
    if kind == "fp8":
        kw, out_dtype, scale = quant_kwargs("fp8", in_dtype, device)
    else:
        kw, out_dtype, scale = {"out_dtype": torch.bfloat16}, torch.bfloat16, None
    res = inp.call(backend, lse_base=base, return_lse=True, **kw)
    w_rows = torch.gather(
        torch.stack(inp.ref_outputs).float(), 0,
        winner.t().reshape(1, T, H, 1).expand(1, T, H, D),
    )[0]  # fmt: skip
    want = stored(w_rows, out_dtype, scale)
    assert_bits_equal(res.output.cpu(), want, f"{form} K={K}: output")
    assert_bits_equal(res.lse.cpu(), hi, f"{form} K={K}: lse")


@pytest.mark.parametrize("kind", ["same", "fp32_out", "fp8"])
@pytest.mark.parametrize("form", MAIN_FORMS)
def test_k1_is_exact(backend_device, form, kind):
    """K = 1: a finite LSE copies the row (converted) and the LSE; an empty partial gives
    0 and -inf; a NaN LSE a NaN row and LSE."""
    backend, device = backend_device
    T, H, D = dims(device)
    V, L = kway_values(1, T, H, D, pattern=("normal", "normal", "pos_inf", "neg_inf", "nan"),
                       seed=len(kind) + len(form))  # fmt: skip
    V[0, :, :, 0] = NAN  # NaN and inf elements of a finite row carry through
    V[0, :, :, 1] = -INF
    inp = make_inputs(form, V, L, device, torch.float16)
    kw, out_dtype, scale = quant_kwargs("fp8" if kind == "fp8" else "same", torch.float16, device)
    if kind == "fp32_out":
        kw, out_dtype = {"out_dtype": torch.float32}, torch.float32
    res = inp.call(backend, return_lse=True, **kw)
    out, lse = res.output.cpu(), res.lse.cpu()
    lse_in = inp.ref_lses[0]
    fin, nan = lse_in.isfinite().t(), lse_in.isnan().t()  # [T, H]
    empty = ~fin & ~nan
    assert fin.any() and nan.any() and empty.any()
    want = stored(inp.ref_outputs[0].float(), out_dtype, scale)
    assert_bits_equal(rows_of(out, fin), rows_of(want, fin), f"{form}: copied rows")
    assert (rows_of(out, empty).float() == 0).all()
    assert is_nan(out)[nan].all()
    assert_bits_equal(lse.t()[fin], lse_in.t()[fin], f"{form}: copied LSEs")
    assert (lse.t()[empty] == -INF).all() and lse.t()[nan].isnan().all()


@pytest.mark.parametrize("kind", ["same", "fp8"])
@pytest.mark.parametrize("form", MAIN_FORMS)
def test_nan_lse_makes_the_row_nan(backend_device, form, kind):
    """A NaN LSE of any partial that is read makes the whole row NaN (the FP8 NaN code)
    and the LSE NaN, whatever the others are; the first partial's NaN LSEs at tokens
    >= P are not read (forms with a first partial)."""
    backend, device = backend_device
    T, H, D = dims(device)
    K = 5
    packed = form.startswith("packed")
    P = None if packed else 2
    g = torch.Generator().manual_seed(len(form) + len(kind))
    L = lse_values(H, K * T, ("normal",) * 4 + ("neg_inf", "pos_inf", "big_neg", "huge"), g)
    L = L.reshape(H, K, T).permute(1, 0, 2).clone()
    nan_at = torch.rand(K, H, T, generator=g) < 0.12
    nan_at[1, 0, 0] = True  # a NaN against ...
    L[:, 0, 0] = torch.tensor([-INF, NAN, INF, 1e30, 3.0])  # ... -inf, +inf, 1e30, finite
    L[nan_at] = NAN
    if P is not None:
        L[0, :, P:] = NAN
    V = torch.randn(K, T, H, D, generator=g)
    read = L.clone()
    if P is not None:
        read[0, :, P:] = 0.0
        V[0, P:] = _junk(D)  # never read
    nan_row = read.isnan().any(dim=0).t()  # [T, H]
    assert nan_row.any() and (~nan_row).any()
    inp = make_inputs(form, V, L, device, torch.float32)
    kw, out_dtype, scale = quant_kwargs(kind, torch.float32, device)
    if P is not None:
        kw["prefill_tokens_with_context"] = P
    res = inp.call(backend, return_lse=True, **kw)
    nan = is_nan(res.output)
    assert nan[nan_row].all(), f"{form}: rows with a NaN LSE must be NaN"
    assert not nan[~nan_row].any(), f"{form}: NaN outside the NaN-LSE rows"
    assert torch.equal(res.lse.cpu().isnan().t(), nan_row)
    check_result(
        res, inp.expected(P=P), backend=backend, device=device, out_dtype=out_dtype,
        scale=scale, what=form,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["same", "fp8"])
@pytest.mark.parametrize("form", MAIN_FORMS)
def test_nan_and_inf_elements_of_weighted_rows(backend_device, form, kind):
    """NaN and inf elements of rows with non-zero weight (a subnormal weight included)
    show at their positions only (inf - inf is NaN); those of zero-weight rows do not."""
    backend, device = backend_device
    K, T, H, D = 4, 3, 2, 8
    L = torch.zeros(K, H, T)
    L[:, 1, 0] = torch.tensor([0.0, -95.0, -INF, INF])  # exp(-95): subnormal, not 0
    L[:, 0, 1] = torch.tensor([-4995.0, -4995.0, -4995.0, 5.0])  # weights 0, 0, 0, 1
    L[:, 1, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    L[:, 0, 2] = torch.tensor([-INF, INF, -INF, INF])  # all empty
    g = torch.Generator().manual_seed(7)
    V = torch.randn(K, T, H, D, generator=g)
    V[2, 0, 0, 3] = NAN
    V[1, 0, 0, 5] = INF
    V[3, 0, 0, 6] = -INF
    V[1, 0, 1, 2] = NAN  # the subnormal-weight partial
    V[2:, 0, 1] = _junk(D)  # empty partials
    V[:3, 1, 0] = _junk(D)  # zero weights
    V[3, 1, 0, 0] = -INF
    V[0, 1, 1, 7] = NAN
    V[1, 1, 1, 1], V[2, 1, 1, 1] = INF, -INF
    V[:, 2, 0] = _junk(D)
    want_nan = torch.zeros(T, H, D, dtype=torch.bool)
    for t, h, d in ((0, 0, 3), (0, 1, 2), (1, 1, 7), (1, 1, 1)):
        want_nan[t, h, d] = True
    inp = make_inputs(form, V, L, device, torch.float32)
    kw, out_dtype, scale = quant_kwargs(kind, torch.float32, device)
    res = inp.call(backend, return_lse=True, **kw)
    out = res.output.cpu()
    assert torch.equal(is_nan(out), want_nan)
    big = 448.0 if kind == "fp8" else INF
    assert out[0, 0, 5].float() == big and out[0, 0, 6].float() == -big
    assert out[1, 0, 0].float() == -big
    assert (out[2, 0].float() == 0).all()
    assert not res.lse.cpu().isnan().any()
    check_result(
        res, inp.expected(), backend=backend, device=device, out_dtype=out_dtype, scale=scale,
        what=form,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# prefill_tokens_with_context.


@pytest.mark.parametrize("where", ["0", "2", "T"])
@pytest.mark.parametrize("form", FIRST_FORMS)
def test_prefill_tokens_with_context(backend_device, form, where):
    """Tokens t >= P take nothing from the first partial (junk rows, NaN LSEs there):
    against the reference, and at t >= P the merge of the other K - 1 partials."""
    backend, device = backend_device
    T, H, D = dims(device)
    P = {"0": 0, "2": 2, "T": T}[where]
    K = 4
    V, L = kway_values(K, T, H, D, pattern="kmixed", seed=100 + P, P=P)
    inp = make_inputs(form, V, L, device, torch.bfloat16)
    res = inp.call(backend, prefill_tokens_with_context=P, return_lse=True)
    check_result(
        res, inp.expected(P=P), backend=backend, device=device, out_dtype=torch.bfloat16,
        what=f"{form} P={P}",
    )  # fmt: skip
    if P < T:
        rest = attnmerge.merge(inp.parts[1:], inp.part_lses[1:], return_lse=True, backend=backend)
        assert_same_values(res.output[P:], rest.output[P:], "output at t >= P")
        assert_same_values(res.lse[:, P:], rest.lse[:, P:], "lse at t >= P")
    inp.check_unchanged()


@pytest.mark.parametrize("form", FIRST_FORMS)
def test_prefill_all_tokens_is_none(backend_device, form):
    """P = T gives the bits of P = None; K = 1 with P: rows t >= P are 0 and -inf, rows
    t < P copies."""
    backend, device = backend_device
    T, H, D = dims(device)
    V, L = kway_values(3, T, H, D, pattern="kmixed", seed=110)
    inp = make_inputs(form, V, L, device, torch.float16)
    a = inp.call(backend, prefill_tokens_with_context=T, return_lse=True)
    b = inp.call(backend, return_lse=True)
    assert_bits_equal(a.output.cpu(), b.output.cpu(), "output")
    assert_bits_equal(a.lse.cpu(), b.lse.cpu(), "lse")

    P = 2
    O1, L1 = kway_values(1, T, H, D, seed=111, P=P)
    one = make_inputs(form, O1, L1, device, torch.float16)
    res = one.call(backend, prefill_tokens_with_context=P, return_lse=True)
    out, lse = res.output.cpu(), res.lse.cpu()
    assert_bits_equal(out[:P], one.ref_outputs[0][:P], "rows t < P")
    assert_bits_equal(lse[:, :P], one.ref_lses[0][:, :P], "lse t < P")
    assert (out[P:].float() == 0).all() and (lse[:, P:] == -INF).all()


# ---------------------------------------------------------------------------
# out, out_lse, in place, return_lse.


@pytest.mark.parametrize("which", ["out", "out_lse", "both"])
@pytest.mark.parametrize("form", FIRST_FORMS)
def test_in_place(backend_device, form, which):
    """out = the first partial's very view (outputs[0], stack[0]) and out_lse = the first
    LSE's: the out-of-place bits, and no other input element written."""
    backend, device = backend_device
    T, H, D = dims(device)
    K = 3
    V, L = kway_values(K, T, H, D, pattern="kmixed", seed=120)
    want = make_inputs(form, V, L, device, torch.float16).call(backend, return_lse=True)
    inp = make_inputs(form, V, L, device, torch.float16)
    kw = {}
    if which in ("out", "both"):
        kw["out"] = inp.outputs[0]
    if which in ("out_lse", "both"):
        kw["out_lse"] = inp.lses[0]
    res = inp.call(backend, return_lse=True, **kw)
    if "out" in kw:
        assert res.output is kw["out"]
    if "out_lse" in kw:
        assert res.lse is kw["out_lse"]
    assert_bits_equal(res.output.cpu(), want.output.cpu(), f"{form} in place ({which}): output")
    assert_bits_equal(res.lse.cpu(), want.lse.cpu(), f"{form} in place ({which}): lse")
    inp.check_unchanged(written=list(kw.values()))


@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("form", MAIN_FORMS)
def test_out_and_out_lse(backend_device, form, return_lse):
    """Preallocated padded out and [T, H]-stored out_lse: written in place, returned as
    the result (result.lse is out_lse whatever return_lse says), storage around them
    untouched."""
    backend, device = backend_device
    T, H, D = dims(device)
    K = 4
    V, L = kway_values(K, T, H, D, pattern="kmixed", seed=130)
    inp = make_inputs(form, V, L, device, torch.float16)
    kind = "fp8" if form in ("list", "packed_th") else "out_dtype"
    kw, out_dtype, scale = quant_kwargs(kind, torch.float16, device)
    out_base, out = strided_tensor(
        (T, H, D), (*padded(H, D, 2, 3), 1), 1, out_dtype, device, fill=7.0
    )
    lse_base, out_lse = lse_tensor(torch.full((H, T), 3.0), "th", 1, device, offset=2)
    guards = [
        Guard(out_base, out.shape, out.stride(), out.storage_offset()),
        Guard(lse_base, out_lse.shape, out_lse.stride(), out_lse.storage_offset()),
    ]
    res = inp.call(backend, out=out, out_lse=out_lse, return_lse=return_lse, **kw)
    assert res.output is out and res.lse is out_lse
    check_result(
        res, inp.expected(), backend=backend, device=device, out_dtype=out_dtype, scale=scale,
        what=f"{form} out/out_lse",
    )  # fmt: skip
    for i, g in enumerate(guards):
        g.check(f"{form} guard {i}")
    inp.check_unchanged()

    # out alone: the LSE only on request, then allocated
    out2 = torch.zeros(T, H, D, device=device).to(out_dtype)
    res2 = inp.call(backend, out=out2, **kw)
    assert res2.output is out2 and res2.lse is None
    assert_bits_equal(out2.cpu(), out.cpu(), f"{form}: out without out_lse")
    res3 = inp.call(backend, out=out2, return_lse=True, **kw)
    assert_bits_equal(res3.lse.cpu(), out_lse.cpu(), f"{form}: returned lse")


@pytest.mark.parametrize(
    ("form", "first_th"),
    [("list", False), ("list", True), ("tuple", True), ("stacked", False), ("stacked", True),
     ("stacked_padded", False), ("flashinfer", None), ("packed", None), ("packed_th", None)],
)  # fmt: skip
def test_return_lse_and_its_layout(backend_device, form, first_th):
    """No LSE by default; with return_lse=True a new float32 [H, T] LSE, stored [T, H]
    exactly when the first partial's LSE is."""
    backend, device = backend_device
    T, H, D = dims(device)
    V, L = kway_values(3, T, H, D, pattern="kmixed", seed=140)
    inp = make_inputs(form, V, L, device, torch.float32, first_th=first_th)
    exp = inp.expected()
    res = inp.call(backend)
    assert res.lse is None
    check_result(
        res, exp, backend=backend, device=device, out_dtype=torch.float32, lse=False, what=form
    )
    res2 = inp.call(backend, return_lse=True)
    assert res2.lse.shape == (H, T) and res2.lse.dtype == torch.float32
    assert res2.lse.device == res2.output.device
    assert res2.lse.stride() == ((1, H) if inp.first_th else (T, 1)), (
        f"{form}: lse strides {res2.lse.stride()}, first LSE strides {inp.part_lses[0].stride()}"
    )
    assert_bits_equal(res2.output.cpu(), res.output.cpu(), "output with and without the LSE")
    assert_lse_close(res2.lse.cpu(), exp.lse)


# ---------------------------------------------------------------------------
# Rejected arguments: the right exception, naming the argument, nothing written.

_T, _H, _D = 5, 3, 16


def _bad_args(form: str = "list", K: int = 3) -> tuple[dict, Inputs]:
    """Good arguments of one call (``out`` and ``out_lse`` preallocated) and its inputs."""
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(K, _T, _H, _D, generator=gen)
    L = torch.randn(K, _H, _T, generator=gen)
    inp = make_inputs(form, V, L, CHECK_DEVICE, torch.float32)
    args = {
        "outputs": list(inp.outputs) if isinstance(inp.outputs, (list, tuple)) else inp.outputs,
        "lses": list(inp.lses) if isinstance(inp.lses, (list, tuple)) else inp.lses,
        "out": torch.full((_T, _H, _D), 7.0, device=CHECK_DEVICE),
        "out_lse": torch.full((_H, _T), 3.0, device=CHECK_DEVICE),
        "backend": "torch",
    }
    if inp.indptr is not None:
        args["indptr"] = inp.indptr
    return args, inp


def _z(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=CHECK_DEVICE)


def _other_strides(t: torch.Tensor) -> torch.Tensor:
    """A view starting where ``t`` does, with contiguous strides (``t`` is padded)."""
    v = t.as_strided(t.shape, torch.empty(t.shape).stride(), t.storage_offset())
    assert v.data_ptr() == t.data_ptr() and v.stride() != t.stride()
    return v


def _set(key: str, value_fn):
    def mutate(a: dict) -> None:
        a[key] = value_fn(a)

    return mutate


def _item(key: str, i: int, value_fn):
    def mutate(a: dict) -> None:
        a[key][i] = value_fn(a)

    return mutate


def _update(**values):
    def mutate(a: dict) -> None:
        a.update({k: v(a) if callable(v) else v for k, v in values.items()})

    return mutate


def _k4_bad_last(a: dict) -> None:
    a["outputs"].append(_z(_T, _H + 1, _D))
    a["lses"].append(a["lses"][0])


_EITHER = (TypeError, ValueError)
_OUT, _OUT_LSE = r"\bout\b", r"\bout_lse\b"
_F64, _I32 = torch.float64, torch.int32

#: (id, form, mutation of the good arguments, exception, message pattern)
BAD_ARGS = [
    # the number of partials
    ("k0_lists", "list", _update(outputs=[], lses=[]), ValueError, r"outputs|lses"),
    ("k0_tuples", "list", _update(outputs=(), lses=()), ValueError, r"outputs|lses"),
    ("k0_stacked", "stacked",
     _update(outputs=lambda a: a["outputs"][:0], lses=lambda a: a["lses"][:0]), ValueError,
     r"outputs|lses"),
    ("k_mismatch_fewer_lses", "list", lambda a: a["lses"].pop(), ValueError, r"outputs|lses"),
    ("k_mismatch_more_lses", "list", lambda a: a["lses"].append(a["lses"][0]), ValueError,
     r"outputs|lses"),
    ("k_mismatch_stacked", "stacked", _set("lses", lambda a: a["lses"][:2]), ValueError,
     r"lses"),
    # separate partials
    ("shape_head_size", "list", _item("outputs", 2, lambda a: _z(_T, _H, _D + 1)), ValueError,
     r"outputs\[2\]"),
    ("shape_tokens", "list", _item("outputs", 2, lambda a: _z(_T + 1, _H, _D)), ValueError,
     r"outputs\[2\]"),
    ("shape_2d", "list", _item("outputs", 2, lambda a: _z(_T, _H * _D)), ValueError,
     r"outputs\[2\]"),
    ("shape_of_outputs_3", "list", _k4_bad_last, ValueError, r"outputs\[3\]"),
    ("dtype_float64", "list", _item("outputs", 2, lambda a: a["outputs"][2].to(_F64)),
     TypeError, r"outputs\[2\]"),
    ("dtype_int32", "list", _item("outputs", 2, lambda a: a["outputs"][2].to(_I32)),
     TypeError, r"outputs\[2\]"),
    ("dtype_fp8", "list", _item("outputs", 2, lambda a: a["outputs"][2].to(FP8)), TypeError,
     r"outputs\[2\]"),
    ("not_a_tensor", "list", _item("outputs", 2, lambda a: None), TypeError, r"outputs\[2\]"),
    ("last_dim_stride", "list", _item("outputs", 2, lambda a: _z(_T, _H, 2 * _D)[..., ::2]),
     ValueError, r"outputs\[2\]"),
    ("lse_dtype", "list", _item("lses", 2, lambda a: a["lses"][2].to(_F64)), TypeError,
     r"lses\[2\]"),
    ("lse_stored_th_untransposed", "list", _item("lses", 2, lambda a: _z(_T, _H)), ValueError,
     r"lses\[2\]"),
    ("lse_tokens", "list", _item("lses", 2, lambda a: _z(_H, _T + 1)), ValueError,
     r"lses\[2\]"),
    ("lse_not_a_tensor", "list", _item("lses", 2, lambda a: [0.0] * _T), TypeError,
     r"lses\[2\]"),
    # stacked partials
    ("stacked_lses_kth", "stacked", _set("lses", lambda a: _z(3, _T, _H)), ValueError, r"lses"),
    ("stacked_lses_2d", "stacked", _set("lses", lambda a: _z(_H, _T)), ValueError, r"lses"),
    ("stacked_lses_dtype", "stacked", _set("lses", lambda a: a["lses"].half()), TypeError,
     r"lses"),
    ("stacked_dtype", "stacked", _set("outputs", lambda a: a["outputs"].to(_F64)), TypeError,
     r"outputs"),
    ("stacked_last_dim", "stacked", _set("outputs", lambda a: _z(3, _T, _H, 2 * _D)[..., ::2]),
     ValueError, r"outputs"),
    ("stacked_tokens", "stacked", _set("outputs", lambda a: _z(3, _T + 1, _H, _D)),
     ValueError, rf"outputs|lses|{_OUT}"),
    ("stacked_with_lse_list", "stacked", _set("lses", lambda a: list(a["lses"])), _EITHER,
     r"outputs|lses"),
    ("list_with_stacked_lses", "list", _set("lses", lambda a: torch.stack(a["lses"])),
     _EITHER, r"outputs|lses"),
    ("3d_without_indptr", "list", _set("outputs", lambda a: _z(_T, _H, _D)), _EITHER,
     r"outputs|lses|indptr"),
    # packed partials
    ("indptr_float", "packed", _set("indptr", lambda a: a["indptr"].float()), TypeError,
     r"indptr"),
    ("indptr_int16", "packed", _set("indptr", lambda a: a["indptr"].to(torch.int16)),
     TypeError, r"indptr"),
    ("indptr_2d", "packed", _set("indptr", lambda a: a["indptr"].view(-1, 1)), ValueError,
     r"indptr"),
    ("indptr_empty", "packed", _set("indptr", lambda a: a["indptr"][:0]), ValueError,
     r"indptr"),
    ("indptr_device", "packed", _set("indptr", lambda a: a["indptr"].to(OTHER_DEVICE)),
     ValueError, r"indptr"),
    ("indptr_not_a_tensor", "packed", _set("indptr", lambda a: a["indptr"].tolist()),
     TypeError, r"indptr"),
    ("indptr_tokens_vs_out", "packed", _set("indptr", lambda a: a["indptr"][:-1]), ValueError,
     rf"{_OUT}|indptr"),
    ("indptr_with_prefill", "packed", _update(prefill_tokens_with_context=1), ValueError,
     r"prefill_tokens_with_context"),
    ("indptr_with_list", "list",
     _set("indptr", lambda a: torch.arange(_T + 1, device=CHECK_DEVICE) * 3), _EITHER,
     r"outputs|indptr"),
    ("packed_lses_untransposed", "packed", _set("lses", lambda a: a["lses"].t().contiguous()),
     ValueError, r"lses"),
    ("packed_lses_rows", "packed", _set("lses", lambda a: a["lses"][:, :-1]), ValueError,
     r"lses"),
    ("packed_lses_dtype", "packed", _set("lses", lambda a: a["lses"].to(_F64)), TypeError,
     r"lses"),
    ("packed_dtype", "packed", _set("outputs", lambda a: a["outputs"].to(_F64)), TypeError,
     r"outputs"),
    ("packed_heads", "packed", _set("outputs", lambda a: a["outputs"][:, :-1]), ValueError,
     rf"outputs|lses|{_OUT}"),
    # out
    ("out_shape", "list", _set("out", lambda a: _z(_T, _H, _D + 1)), ValueError, _OUT),
    ("out_tokens", "stacked", _set("out", lambda a: _z(_T - 1, _H, _D)), ValueError, _OUT),
    ("out_dtype_vs_out_dtype", "stacked", _update(out_dtype=torch.float16), TypeError, _OUT),
    ("out_dtype_vs_fp8", "packed",
     _update(quant=lambda a: attnmerge.FP8Static(torch.tensor([0.5], device=CHECK_DEVICE))),
     TypeError, _OUT),
    ("out_not_a_tensor", "list", _set("out", lambda a: a["out"].tolist()), TypeError, _OUT),
    ("out_device", "list", _set("out", lambda a: a["out"].to(OTHER_DEVICE)), ValueError, _OUT),
    ("out_last_dim", "list", _set("out", lambda a: _z(_T, _H, 2 * _D)[..., ::2]), ValueError,
     _OUT),
    ("out_expanded", "list", _set("out", lambda a: _z(1, _H, _D).expand(_T, _H, _D)),
     ValueError, _OUT),
    ("out_at_second_partial", "list", _set("out", lambda a: _other_strides(a["outputs"][1])),
     ValueError, _OUT),
    ("out_at_last_partial", "list", _set("out", lambda a: _other_strides(a["outputs"][2])),
     ValueError, _OUT),
    ("out_at_first_other_strides", "list", _set("out", lambda a: _other_strides(a["outputs"][0])),
     ValueError, _OUT),
    ("out_at_stack_1", "stacked_padded", _set("out", lambda a: _other_strides(a["outputs"][1])),
     ValueError, _OUT),
    # out_lse
    ("out_lse_shape", "list", _set("out_lse", lambda a: _z(_H, _T + 1)), ValueError, _OUT_LSE),
    ("out_lse_untransposed", "list", _set("out_lse", lambda a: _z(_T, _H)), ValueError,
     _OUT_LSE),
    ("out_lse_dtype", "list", _set("out_lse", lambda a: a["out_lse"].to(_F64)), TypeError,
     _OUT_LSE),
    ("out_lse_not_a_tensor", "stacked", _set("out_lse", lambda a: 3.0), TypeError, _OUT_LSE),
    ("out_lse_expanded", "list", _set("out_lse", lambda a: _z(_H, 1).expand(_H, _T)),
     ValueError, _OUT_LSE),
    ("out_lse_device", "packed", _set("out_lse", lambda a: a["out_lse"].to(OTHER_DEVICE)),
     ValueError, _OUT_LSE),
    # the other options
    ("prefill_out_of_range", "stacked", _update(prefill_tokens_with_context=_T + 1),
     ValueError, r"prefill_tokens_with_context"),
    ("prefill_negative", "list", _update(prefill_tokens_with_context=-1), ValueError,
     r"prefill_tokens_with_context"),
    ("prefill_bool", "list", _update(prefill_tokens_with_context=True), TypeError,
     r"prefill_tokens_with_context"),
    ("lse_base", "stacked", _update(lse_base=10), ValueError, r"lse_base"),
    ("backend", "packed", _update(backend="cudnn"), ValueError, r"backend"),
    ("quant", "list", _update(quant="fp8"), TypeError, r"quant"),
    ("fp8_out_dtype_without_quant", "stacked", _update(out_dtype=FP8, out=None), ValueError,
     r"quant|FP8|float8|out_dtype"),
]  # fmt: skip


def _byte_snapshot(tensors) -> list:
    return [
        (t, t.detach().cpu().clone())
        for t in tensors
        if isinstance(t, torch.Tensor) and t.device.type != "meta"
    ]


def _assert_untouched(snapshot: list) -> None:
    for t, before in snapshot:
        assert torch.equal(_bytes(t), _bytes(before)), "a rejected call wrote to a tensor"


def _call_rejected(args: dict, exc, match: str) -> None:
    args = {k: v for k, v in args.items() if not (k == "out" and v is None)}
    tensors = [args.get("out"), args.get("out_lse")]
    for key in ("outputs", "lses"):
        v = args[key]
        tensors += list(v) if isinstance(v, (list, tuple)) else [v]
    snapshot = _byte_snapshot(tensors)
    outputs, lses = args.pop("outputs"), args.pop("lses")
    with pytest.raises(exc, match=match):
        attnmerge.merge(outputs, lses, **args)
    _assert_untouched(snapshot)


@pytest.mark.parametrize(("form", "mutate", "exc", "match"), [c[1:] for c in BAD_ARGS],
                         ids=[c[0] for c in BAD_ARGS])  # fmt: skip
def test_rejected_arguments(form, mutate, exc, match):
    """Bad inputs raise TypeError (types, dtypes) or ValueError (counts, shapes, devices,
    aliasing), naming the argument, before anything is written."""
    args, _ = _bad_args(form)
    mutate(args)
    _call_rejected(args, exc, match)


@pytest.mark.parametrize("form", ALL_FORMS)
def test_good_arguments_are_accepted(form):
    """The baseline each rejected case breaks in one place."""
    args, inp = _bad_args(form)
    outputs, lses = args.pop("outputs"), args.pop("lses")
    res = attnmerge.merge(outputs, lses, **args)
    assert res.output is args["out"] and res.lse is args["out_lse"]
    exp = inp.expected()
    assert_output_close(res.output.cpu(), exp.output, exp.magnitude, what=form)
    assert_lse_close(res.lse.cpu(), exp.lse, form)


@pytest.mark.parametrize("form", ["list", "list_views", "stacked"])
def test_out_and_out_lse_may_be_any_partial(form):
    """C34, as C16 for two partials: out may be the very view of any partial and out_lse
    that of any partial's LSE (each row is read before it is written); the result is the
    out-of-place one, bit for bit. The same memory with other strides is refused."""
    args, _ = _bad_args(form)
    expected = attnmerge.merge(args["outputs"], args["lses"], return_lse=True, backend="torch")
    args["out"], args["out_lse"] = args["outputs"][2], args["lses"][1]
    res = attnmerge.merge(**args)
    assert res.output is args["out"] and res.lse is args["out_lse"]
    assert_bits_equal(res.output, expected.output, form)
    assert_bits_equal(res.lse, expected.lse, form)
    args, _ = _bad_args(form)
    args["out_lse"] = args["lses"][1].as_strided((_H, _T), (1, _H))
    _call_rejected(args, ValueError, _OUT_LSE)


def test_packed_negative_zero_rows_keep_their_sign(backend_device):
    """C32, C33: a token's merge adds only its own rows. Rows of -0 merge to -0 (each term
    -0, their sum -0), also where a token with more rows shares the kernel's tile: the
    absent partials add nothing, not +0."""
    backend, device = backend_device
    counts = [1, 3, 0, 2]
    indptr = torch.tensor([0, 1, 4, 4, 6], dtype=torch.int32, device=device)
    rows = torch.full((sum(counts), 2, 8), -0.0, device=device)
    lses = torch.zeros(2, sum(counts), device=device)
    res = attnmerge.merge(rows, lses, indptr=indptr, return_lse=True, backend=backend)
    ref = attnmerge.merge(rows, lses, indptr=indptr, return_lse=True, backend="torch")
    assert_bits_equal(res.output, ref.output, "output")
    assert_bits_equal(res.lse, ref.lse, "lse")
    signs = torch.signbit(res.output.cpu()).flatten(1).all(dim=1).tolist()
    assert signs == [True, True, False, True]  # the token without rows gets +0
