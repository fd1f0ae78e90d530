"""Shared test helpers: input factory, reference results, comparisons, the tolerance table.

Everything here runs on any device. ``make_case`` builds the arguments of one
``merge_attn_states`` call (with optional padded strides, ``[T, H]``-stored LSEs,
special LSE values, garbage in rows that must not be read, aliasing), ``Case.expected``
computes the fp32 reference on the same device, and ``assert_case`` compares a
backend's results with it through the one tolerance table below.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

import attnmerge
from attnmerge.reference import merge_states_reference, quantize_fp8_static

ON_GPU = torch.cuda.is_available()
FP8 = torch.float8_e4m3fn
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INF = float("inf")
NAN = float("nan")

#: (backend, device) pairs every backend test runs on. On a CPU machine the Triton
#: kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1).
BACKEND_DEVICES = (
    [("torch", "cuda"), ("triton", "cuda"), ("cuda", "cuda"), ("torch", "cpu")]
    if ON_GPU
    else [("torch", "cpu"), ("triton", "cpu")]
)

#: Fuzz cases per fuzz test and (backend, device): ATTNMERGE_FUZZ_EXAMPLES (the GPU
#: script runs 10,000). Default 100: on a CPU 100 cases take about a second.
FUZZ_EXAMPLES = int(os.environ.get("ATTNMERGE_FUZZ_EXAMPLES", "100"))


def dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# ---------------------------------------------------------------------------
# The tolerance table (the only one; every backend-vs-reference comparison uses it).
#
# Backends do the same fp32 arithmetic in the same order as the reference, but a
# device's exp/log (numpy's under the Triton interpreter, ex2.approx-based on a GPU)
# may round differently from torch's: under the interpreter 39% of exp values differ
# from torch's in the last bit. So the fp32 intermediate O = sum_i w_i O_i may differ
# from the reference by a few fp32 ulps of sum_i |w_i O_i| (the "magnitude": larger
# than |O| when the terms cancel), and rounding that intermediate to the output dtype
# may then land one output ulp apart. The bound per finite element is
#
#     |actual - expected| <= ulps * ulp_out(max(|actual|, |expected|)) + rtol * magnitude
#
# with ``expected`` the reference rounded (or FP8-quantised) to the output dtype.
# FP8 outputs are compared in the quantised domain (codes): at most one code apart
# (except where the fp32 slack alone exceeds a code, i.e. cancellation to ~0 with a
# tiny scale), and only on a small fraction of the elements. Both e4m3fn NaN codes
# (0x7F, 0xFF) are NaN: torch's CPU cast yields 0xFF for x86's default NaN, kernels 0x7F.


@dataclass(frozen=True)
class Tol:
    ulps: float  # output-dtype ulps allowed on top of the fp32 slack
    rtol: float  # fp32 slack, relative to sum_i |w_i O_i|
    max_diff_frac: float  # fraction of elements that may differ at all


TOLERANCES = {
    torch.float32: Tol(ulps=2, rtol=2e-6, max_diff_frac=1.0),
    torch.float16: Tol(ulps=1, rtol=2e-6, max_diff_frac=1.0),
    torch.bfloat16: Tol(ulps=1, rtol=2e-6, max_diff_frac=1.0),
    FP8: Tol(ulps=1, rtol=2e-6, max_diff_frac=0.02),
}

#: Output LSE: |actual - expected| <= LSE_ATOL * max(1, |expected|); NaN/inf identical.
LSE_ATOL = 1e-6


# ---------------------------------------------------------------------------
# Bit-level helpers.

_INT_OF = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


def as_int(t: torch.Tensor) -> torch.Tensor:
    """Same memory viewed as integers of the same width (for bitwise comparisons)."""
    return t.view(_INT_OF[t.element_size()])


def fp8_codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, except that any two NaNs are equal (FP8 0x7F vs 0xFF, or NaN
    payloads/signs)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = a.float().isnan(), b.float().isnan()
    if not torch.equal(nan_a, nan_b):
        return False
    ia, ib = as_int(a.contiguous()).clone(), as_int(b.contiguous()).clone()
    ia[nan_a] = 0
    ib[nan_b] = 0
    return torch.equal(ia, ib)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "tensor") -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    if bits_equal(a, b):
        return
    fa, fb = a.float(), b.float()
    diff = ~((fa == fb) | (fa.isnan() & fb.isnan()))
    idx = diff.nonzero()[:5].tolist()
    raise AssertionError(
        f"{what}: {int(diff.sum())} of {a.numel()} elements differ bitwise; first at {idx}: "
        f"{[fa[tuple(i)].item() for i in idx]} vs {[fb[tuple(i)].item() for i in idx]}"
    )


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at |x| (float32 tensor in, float32 out)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(x.abs().float())  # |x| = m * 2**e, m in [0.5, 1)
    spacing = torch.ldexp(torch.full_like(x, fi.eps, dtype=torch.float32), e - 1)
    return torch.maximum(spacing, torch.full_like(spacing, fi.tiny * fi.eps))


def _fp8_ordered(codes: torch.Tensor) -> torch.Tensor:
    """FP8 codes mapped to integers in value order (so +0 and -0 coincide)."""
    c = codes.to(torch.int32)
    mag = c & 0x7F
    return torch.where(c >= 0x80, -mag, mag)


# ---------------------------------------------------------------------------
# Comparisons.


def assert_output_close(
    actual: torch.Tensor,
    expected32: torch.Tensor,
    magnitude: torch.Tensor,
    scale: torch.Tensor | None = None,
    what: str = "output",
    tol: Tol | None = None,
) -> None:
    """Compare a backend's output with the fp32 reference through ``TOLERANCES``.

    Args:
        actual: the backend's output, in the output dtype (FP8 or float).
        expected32: the reference's fp32 merged output (before rounding/quantising).
        magnitude: the reference applied to |O_i| (fp32): sum_i |w_i O_i|.
        scale: FP8 dequantisation scale (required for FP8 outputs).
        tol: only for comparisons that are not backend vs reference (default: the table).
    """
    dtype = actual.dtype
    tol = tol or TOLERANCES[dtype]
    assert actual.shape == expected32.shape, f"{what}: shape mismatch"
    expected32, magnitude = expected32.to(actual.device), magnitude.to(actual.device)
    if dtype == FP8:
        assert scale is not None
        expected = quantize_fp8_static(expected32, scale)
        mag = magnitude / scale.float().reshape(())
    else:
        expected = expected32.to(dtype)
        mag = magnitude
    a, e = actual.float(), expected.float()
    nan_a, nan_e = a.isnan(), e.isnan()
    if not torch.equal(nan_a, nan_e):
        bad = (nan_a != nan_e).nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: NaN positions differ ({int((nan_a != nan_e).sum())} elements); first "
            f"at {bad}: actual {[a[tuple(i)].item() for i in bad]}, expected "
            f"{[e[tuple(i)].item() for i in bad]}"
        )
    both_finite = a.isfinite() & e.isfinite()
    nonfinite = ~nan_a & ~both_finite
    if not torch.equal(a[nonfinite], e[nonfinite]):
        raise AssertionError(f"{what}: infinities differ: {a[nonfinite]} vs {e[nonfinite]}")

    diff = (a - e).abs()
    slack = torch.where(mag.isfinite(), tol.rtol * mag, torch.zeros_like(mag))
    if dtype == FP8:
        dist = (_fp8_ordered(fp8_codes(actual)) - _fp8_ordered(fp8_codes(expected))).abs()
        ok = (dist <= tol.ulps) | (diff <= slack)
    else:
        bound = tol.ulps * ulp(torch.maximum(a.abs(), e.abs()), dtype) + slack
        ok = diff <= bound
    bad = both_finite & ~ok
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{what} ({dtype_name(dtype)}): {int(bad.sum())} of {a.numel()} elements out of "
            f"tolerance {tol}; first at {idx}: actual {[a[tuple(i)].item() for i in idx]}, "
            f"expected {[e[tuple(i)].item() for i in idx]}, magnitude "
            f"{[mag[tuple(i)].item() for i in idx]}"
        )
    ndiff = int((both_finite & (diff != 0)).sum())
    allowed = max(1, int(tol.max_diff_frac * a.numel()))
    assert ndiff <= allowed, (
        f"{what} ({dtype_name(dtype)}): {ndiff} of {a.numel()} elements differ (each within "
        f"tolerance), more than the {allowed} allowed"
    )


def assert_lse_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "lse") -> None:
    """|a - e| <= LSE_ATOL * max(1, |e|) on finite values; NaN and inf positions identical."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == torch.float32, f"{what}: dtype {actual.dtype}"
    a, e = actual.float(), expected.to(actual.device).float()
    assert torch.equal(a.isnan(), e.isnan()), (
        f"{what}: NaN positions differ: actual {a}, expected {e}"
    )
    fin = a.isfinite() & e.isfinite()
    nonfin = ~a.isnan() & ~fin
    assert torch.equal(a[nonfin], e[nonfin]), f"{what}: infinities differ: {a} vs {e}"
    bound = LSE_ATOL * e.abs().clamp(min=1.0)
    bad = fin & ~((a - e).abs() <= bound)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements out of tolerance; first at {idx}: actual "
            f"{[a[tuple(i)].item() for i in idx]}, expected {[e[tuple(i)].item() for i in idx]}"
        )


# ---------------------------------------------------------------------------
# LSE patterns.

#: Per-element LSE categories for "mixed" patterns and the fuzz tests.
LSE_CATEGORIES = (
    "normal",  # N(0, 4^2): comparable partials
    "wide",  # N(0, 60^2): gaps around fp32 exp underflow (~87..104)
    "offset",  # 1000 + N(0, 1): large common magnitude
    "neg_inf",  # empty partial
    "pos_inf",  # empty partial, FlashAttention-2 style
    "nan",  # corrupted
    "big_pos",  # +1e30
    "big_neg",  # -1e30
    "huge",  # +-1e4 + N(0, 1): weight underflows to exactly 0 against normal values
)


def lse_values(
    H: int, T: int, pattern: str | tuple = "normal", gen: torch.Generator | None = None
) -> torch.Tensor:
    """Float32 [H, T] LSE values (CPU) following ``pattern``: a category name, "mixed"
    (every category, "normal" the most likely) or a tuple of categories to draw from
    per element, uniformly."""
    if pattern == "mixed":
        cats = LSE_CATEGORIES
        weights = torch.tensor([6.0] + [1.0] * (len(cats) - 1))
    elif isinstance(pattern, str):
        cats, weights = (pattern,), torch.ones(1)
    else:
        cats, weights = tuple(pattern), torch.ones(len(pattern))
    n = H * T
    choice = torch.multinomial(weights, max(n, 1), replacement=True, generator=gen)[:n]
    g = torch.randn(n, generator=gen)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    values = {
        "normal": g * 4,
        "wide": g * 60,
        "offset": 1000 + g,
        "neg_inf": torch.full((n,), -INF),
        "pos_inf": torch.full((n,), INF),
        "nan": torch.full((n,), NAN),
        "big_pos": torch.full((n,), 1e30),
        "big_neg": torch.full((n,), -1e30),
        "huge": sign * 1e4 + g,
    }
    out = torch.empty(n)
    for i, c in enumerate(cats):
        out = torch.where(choice == i, values[c], out)
    return out.reshape(H, T).float()


# ---------------------------------------------------------------------------
# Strided tensors whose storage outside the view is checked afterwards.

_OUT_SENTINEL = 7.0  # representable in every output dtype, FP8 included
_PAD_VALUE = NAN  # input padding: a read of it would show up as NaN


def _extent(shape, strides, offset) -> int:
    if any(n == 0 for n in shape):
        return offset
    return offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1


def strided_tensor(shape, strides, offset, dtype, device, values=None, fill=0.0):
    """(base, view): a 1-D base filled with ``fill`` and a strided view of it holding
    ``values`` (float32, CPU) or ``fill``."""
    size = _extent(shape, strides, offset) + 3  # a tail past the view, checked too
    base = torch.full((size,), fill, dtype=torch.float32).to(dtype)
    view = base.as_strided(shape, strides, offset)
    if values is not None:
        view.copy_(values.to(dtype))
    base = base.to(device)
    return base, base.as_strided(shape, strides, offset)


def lse_tensor(values: torch.Tensor, layout: str, pad: int, device, offset: int = 0):
    """(base, view): an [H, T] LSE view. layout "ht": stored [H, T + pad]; "th": stored
    [T, H + pad] and passed as the transposed view (FlashInfer/SGLang)."""
    H, T = values.shape
    if layout == "ht":
        strides = (T + pad, 1)
    elif layout == "th":
        strides = (1, H + pad)
    else:
        raise AssertionError(layout)
    return strided_tensor((H, T), strides, offset, torch.float32, device, values, fill=NAN)


@dataclass
class Guard:
    """Storage outside a view that must keep its bits."""

    base: torch.Tensor
    shape: tuple
    strides: tuple
    offset: int
    snapshot: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.snapshot = as_int(self.base).clone()

    def check(self, what: str) -> None:
        now, before = as_int(self.base).clone(), self.snapshot.clone()
        for t in (now, before):
            t.as_strided(self.shape, self.strides, self.offset).zero_()
        assert torch.equal(now, before), f"{what}: storage outside the view was modified"


# ---------------------------------------------------------------------------
# Cases.


@dataclass
class Expected:
    output: torch.Tensor  # fp32 [T, H, D], before rounding to the output dtype
    lse: torch.Tensor  # fp32 [H, T]
    magnitude: torch.Tensor  # fp32 [T, H, D]: sum_i |w_i O_i|


@dataclass
class Case:
    output: torch.Tensor
    prefix_output: torch.Tensor
    prefix_lse: torch.Tensor
    suffix_output: torch.Tensor
    suffix_lse: torch.Tensor
    output_lse: torch.Tensor | None
    P: int | None
    scale: torch.Tensor | None
    lse_base: str | int
    desc: str
    guards: list = field(default_factory=list)

    def args(self) -> tuple:
        return (
            self.output,
            self.prefix_output,
            self.prefix_lse,
            self.suffix_output,
            self.suffix_lse,
            self.output_lse,
            self.P,
            self.scale,
        )

    def run(self, backend: str) -> None:
        attnmerge.merge_attn_states(*self.args(), lse_base=self.lse_base, backend=backend)

    def expected(self) -> Expected:
        """The reference on copies of the inputs, on their device."""
        outs = (self.prefix_output.clone(), self.suffix_output.clone())
        lses = (self.prefix_lse.clone(), self.suffix_lse.clone())
        kw = dict(lse_base_2=self.lse_base == 2, prefill_tokens_with_context=self.P)
        out, lse = merge_states_reference(outs, lses, **kw)
        mag, _ = merge_states_reference(tuple(o.float().abs() for o in outs), lses, **kw)
        return Expected(out, lse, mag)

    def check_against(self, exp: Expected) -> None:
        assert_output_close(self.output, exp.output, exp.magnitude, self.scale, self.desc)
        if self.output_lse is not None:
            assert_lse_close(self.output_lse, exp.lse, f"lse of {self.desc}")
        for i, g in enumerate(self.guards):
            g.check(f"{self.desc} (guard {i})")


def run_and_check(case: Case, backend: str) -> None:
    """Run ``backend`` on the case and compare with the reference (computed first, on
    copies, so aliased outputs are fine)."""
    exp = case.expected()
    case.run(backend)
    case.check_against(exp)


class _DeviceCopy:
    """One device buffer holding the storages of several CPU cases.

    Every distinct storage the cases use (partials, LSEs, outputs, scales, the padding
    around views) is placed at a 256-byte-aligned offset of one flat buffer, so each
    view keeps its alignment modulo 16 bytes (what the kernels specialise on) and
    aliased tensors still share memory. One copy moves the buffer to the device and
    one copy brings it back into the CPU storages.
    """

    _ALIGN = 256

    def __init__(self, cases: list[Case]) -> None:
        self.offsets: dict[int, int] = {}  # CPU storage address -> byte offset
        self.storages = []
        size = 0
        for case in cases:
            for t in self._tensors(case):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.offsets:
                    self.offsets[storage.data_ptr()] = size
                    self.storages.append(storage)
                    size += -(-storage.nbytes() // self._ALIGN) * self._ALIGN
        self.size = size

    @staticmethod
    def _tensors(case: Case):
        yield from (t for t in case.args() if isinstance(t, torch.Tensor))
        yield from (g.base for g in case.guards)

    def _bytes(self, storage) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8).set_(storage)

    def to(self, device: torch.device) -> torch.Tensor:
        flat = torch.empty(self.size, dtype=torch.uint8)
        for storage in self.storages:
            start = self.offsets[storage.data_ptr()]
            flat[start : start + storage.nbytes()] = self._bytes(storage)
        return flat.to(device)

    def view(self, t: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """``t``'s view (shape, strides, storage offset) into the device buffer."""
        start = self.offsets[t.untyped_storage().data_ptr()]
        elements = flat.view(t.dtype)  # the buffer's size is a multiple of 256 bytes
        offset = start // t.element_size() + t.storage_offset()
        return elements.as_strided(t.shape, t.stride(), offset)

    def copy_back(self, flat: torch.Tensor) -> None:
        host = flat.cpu()
        for storage in self.storages:
            start = self.offsets[storage.data_ptr()]
            self._bytes(storage).copy_(host[start : start + storage.nbytes()])


def run_batch_and_check(cases: list[Case], backend: str, device: str | torch.device) -> None:
    """Run ``backend`` on ``device`` for CPU-built cases and check them on the CPU.

    The reference is computed on the CPU, all cases' storages go to the device in one
    copy, every case is launched, and one copy brings the results back, where each
    case is checked (outputs, output LSEs, storage around the views). A fuzz on a GPU
    thus synchronises twice per batch instead of dozens of times per case: CUDA
    contexts of parallel test workers take turns on the GPU, so every synchronisation
    waits for the others.
    """
    expected = [case.expected() for case in cases]
    for case in cases:
        case.desc += f", run on {device} in a batch of {len(cases)}"
    copy = _DeviceCopy(cases)
    flat = copy.to(torch.device(device))
    for case in cases:
        args = [copy.view(t, flat) if isinstance(t, torch.Tensor) else t for t in case.args()]
        try:
            attnmerge.merge_attn_states(*args, lse_base=case.lse_base, backend=backend)
        except Exception as e:
            raise AssertionError(f"{backend} raised on {case.desc}: {e!r}") from e
    copy.copy_back(flat)
    for case, exp in zip(cases, expected, strict=True):
        case.check_against(exp)


def padded(H: int, D: int, head_pad: int = 0, token_pad: int = 0) -> tuple[int, int]:
    """(token stride, head stride) of a [T, H, D] view padded per head and per token."""
    hs = D + head_pad
    return (H * hs + token_pad, hs)


def make_case(
    T: int,
    H: int,
    D: int,
    *,
    dtype: torch.dtype = torch.float32,
    suffix_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    scale: float | torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    lse_base: str | int = "e",
    P: int | None = None,
    with_lse: bool = True,
    prefix_strides: tuple[int, int] | None = None,
    suffix_strides: tuple[int, int] | None = None,
    out_strides: tuple[int, int] | None = None,
    offsets: tuple[int, int, int] = (0, 0, 0),
    lse_layouts: tuple[str, str, str] = ("ht", "ht", "ht"),
    lse_pads: tuple[int, int, int] = (0, 0, 0),
    lse_pattern: str | tuple = "normal",
    prefix_lse: torch.Tensor | None = None,
    suffix_lse: torch.Tensor | None = None,
    prefix_values: torch.Tensor | None = None,
    suffix_values: torch.Tensor | None = None,
    garbage: bool = True,
    nan_frac: float = 0.0,
    alias: str | None = None,
    seed: int = 0,
) -> Case:
    """Arguments of one merge call.

    Args:
        dtype, suffix_dtype: partial dtypes (suffix defaults to ``dtype``).
        out_dtype: output dtype (default ``dtype``); FP8 needs ``scale``.
        *_strides: (token, head) strides in elements (see :func:`padded`); None is
            contiguous. ``offsets``: storage offsets of prefix, suffix, output.
        lse_layouts / lse_pads: "ht" or "th" storage and padding for prefix, suffix and
            output LSE.
        lse_pattern: see :func:`lse_values`; ``prefix_lse``/``suffix_lse`` override it
            with explicit [H, T] values.
        garbage: rows that must not influence the result hold NaN/inf: empty partials,
            weights that underflow against a gap >= 2000 (0 even in float64, base 2),
            prefix rows at tokens >= P (whose prefix LSEs become NaN).
        nan_frac: fraction of partial-output elements set to NaN or +-inf anywhere.
        alias: None, "prefix" (output is prefix_output), "suffix" (output is
            suffix_output), "lse_prefix" / "lse_suffix" (output_lse is that LSE).
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    suffix_dtype = suffix_dtype or dtype
    if alias == "prefix":
        out_dtype, out_strides = dtype, prefix_strides
    elif alias == "suffix":
        out_dtype, out_strides = suffix_dtype, suffix_strides
    out_dtype = out_dtype or dtype

    p_lse = lse_values(H, T, lse_pattern, gen) if prefix_lse is None else prefix_lse.cpu()
    s_lse = lse_values(H, T, lse_pattern, gen) if suffix_lse is None else suffix_lse.cpu()
    p_lse, s_lse = p_lse.float().clone(), s_lse.float().clone()
    po = torch.randn(T, H, D, generator=gen) if prefix_values is None else prefix_values.cpu()
    so = torch.randn(T, H, D, generator=gen) if suffix_values is None else suffix_values.cpu()
    po, so = po.float().clone(), so.float().clone()

    if garbage:
        junk = torch.tensor([NAN, INF, -INF])[torch.arange(D) % 3]  # [D]

        # Effective LSEs: +inf is empty, and the prefix is absent at tokens >= P.
        p_eff = torch.where(p_lse == INF, -INF, p_lse)
        s_eff = torch.where(s_lse == INF, -INF, s_lse)
        if P is not None:
            p_eff[:, P:] = -INF

        def unread(mine: torch.Tensor, other: torch.Tensor) -> torch.Tensor:  # [T, H]
            gap = (other - mine >= 2000) & ~other.isnan()
            return ((mine == -INF) | gap).t()

        p_unread, s_unread = unread(p_eff, s_eff), unread(s_eff, p_eff)
        if P is not None:
            p_lse[:, P:] = NAN
        po[p_unread] = junk
        so[s_unread] = junk
    if nan_frac > 0:
        for o in (po, so):
            hit = torch.rand(o.shape, generator=gen) < nan_frac
            o[hit] = torch.tensor([NAN, INF, -INF])[torch.randint(0, 3, o.shape, generator=gen)][
                hit
            ]

    guards = []

    def state(values, dt, strides, offset):
        strides = strides or (H * D, D)
        shape = (T, H, D)
        base, view = strided_tensor(shape, (*strides, 1), offset, dt, device, values, fill=NAN)
        guards.append(Guard(base, shape, (*strides, 1), offset))
        return view

    prefix = state(po, dtype, prefix_strides, offsets[0])
    suffix = state(so, suffix_dtype, suffix_strides, offsets[1])
    pl_base, pl = lse_tensor(p_lse, lse_layouts[0], lse_pads[0], device)
    sl_base, sl = lse_tensor(s_lse, lse_layouts[1], lse_pads[1], device)
    guards.append(Guard(pl_base, pl.shape, pl.stride(), 0))
    guards.append(Guard(sl_base, sl.shape, sl.stride(), 0))

    if alias == "prefix":
        output = prefix
    elif alias == "suffix":
        output = suffix
    else:
        strides = out_strides or (H * D, D)
        base, output = strided_tensor(
            (T, H, D), (*strides, 1), offsets[2], out_dtype, device, fill=_OUT_SENTINEL
        )
        guards.append(Guard(base, (T, H, D), (*strides, 1), offsets[2]))

    output_lse = None
    if alias == "lse_prefix":
        output_lse = pl
    elif alias == "lse_suffix":
        output_lse = sl
    elif with_lse:
        ol_base, output_lse = lse_tensor(
            torch.full((H, T), 3.0), lse_layouts[2], lse_pads[2], device
        )
        guards.append(Guard(ol_base, output_lse.shape, output_lse.stride(), 0))

    if isinstance(scale, torch.Tensor):
        scale_t = scale.to(device)
    elif scale is not None:
        scale_t = torch.tensor([float(scale)], dtype=torch.float32, device=device)
    else:
        scale_t = None
    desc = (
        f"T={T} H={H} D={D} {dtype_name(dtype)}/{dtype_name(suffix_dtype)}->"
        f"{dtype_name(out_dtype)} scale={scale} base={lse_base} P={P} lse={with_lse} "
        f"strides={prefix_strides},{suffix_strides},{out_strides} offsets={offsets} "
        f"lse_layouts={lse_layouts} pads={lse_pads} pattern={lse_pattern} alias={alias} "
        f"seed={seed} on {device}"
    )
    return Case(output, prefix, pl, suffix, sl, output_lse, P, scale_t, lse_base, desc, guards)


def reference_result(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """What the contract says the call stores: (output in its dtype, fp32 lse)."""
    exp = case.expected()
    if case.output.dtype == FP8:
        return quantize_fp8_static(exp.output, case.scale), exp.lse
    return exp.output.to(case.output.dtype), exp.lse


def ln2() -> float:
    return math.log(2.0)
