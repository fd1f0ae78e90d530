"""Hypothesis fuzzing of the dynamic FP8 output formats (docs/contract.md C36 to C40):
``FP8PerToken`` (with and without ``scale_ub``) and ``FP8PerTokenGroup`` (groups of 64 and
128, UE8M0, every scale layout), with or without amax, over random shapes, partial dtypes,
input forms (two partials with or without ``prefill_tokens_with_context``, K stacked
partials or FlashInfer's layout viewed as them, packed rows with an int32 or int64
``indptr``), special LSE values, NaN and infinite elements, scales the caller passes and
strided outputs.

A kernel's float32 merge result may differ from the reference's by the ulps C23 allows,
and the scales follow the values (tests/test_formats_kernels.py). So every case merges
twice on the backend under test: into float32, checked against the float32 reference
through the shared tolerance, and in the format, whose FP8 codes, scales (with a caller's
buffer: every element of it, the poison around the scales included) and amax bits must be
what the format's reference store makes of that float32 result, bit for bit. A case the
backend cannot store (the format's ``kernel_gap``) must raise BackendError naming the
reason; each shard counts such cases and fails if none of its cases ran the backend.

Backends: torch and triton (under Triton's interpreter) on a CPU, triton and cuda on a GPU.
ATTNMERGE_FUZZ_EXAMPLES sets the count as for tests/test_fuzz.py, halved (every case runs
the backend twice), in shards of fixed seeds. On a GPU the cases are checked one by one,
each with several host-device synchronisations (tests/test_fuzz.py batches its cases to
avoid them): the GPU script's default count affords that.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from test_fuzz import FUZZ, _progress_writer
from test_kway import add_junk
from utils import (
    FLOAT_DTYPES,
    FP8,
    FUZZ_EXAMPLES,
    INF,
    LSE_CATEGORIES,
    NAN,
    ON_GPU,
    Expected,
    Guard,
    as_int,
    assert_bits_equal,
    assert_lse_close,
    assert_output_close,
    dtype_name,
    lse_tensor,
    lse_values,
    padded,
    strided_tensor,
)

import attnmerge
from attnmerge import FP8PerToken, FP8PerTokenGroup
from attnmerge.reference import merge_packed_reference, merge_states_reference

MAX_T, MAX_H = (64, 16) if ON_GPU else (6, 4)
#: head sizes of the per-token format (any H * D)
TOKEN_HEAD_SIZES = [1, 8, 13, 64, 80, 128, 192, 256]
#: head sizes of the per-token-group format: groups within a head (D a multiple of the
#: group size), groups of whole heads (32 and 64 in groups of 128, 32 in groups of 64: the
#: triton backend's token tiles) and other groups that span heads (96, and 192 in groups of
#: 128: the cuda backend's token tiles, the triton backend's rows of part of a head)
GROUP_HEAD_SIZES = [32, 64, 96, 128, 192, 256]
LAYOUTS = ("row_major", "col_major", "col_major_tma", "ue8m0_packed")
FORMS = ("pair", "stacked", "flashinfer", "packed")

SHARDS = 24 if ON_GPU else 4
# Half the count of tests/test_fuzz.py per backend: each case runs the backend twice.
CASES = max(SHARDS, FUZZ_EXAMPLES // 2)
FUZZ_FORMATS = settings(FUZZ, max_examples=math.ceil(CASES / SHARDS))

# The interpreter reduces with numpy, which warns on the all-NaN rows the cases hold on
# purpose (conftest ignores its other warnings on special values).
pytestmark = pytest.mark.filterwarnings(
    "ignore:All-NaN slice encountered:RuntimeWarning:triton\\.runtime\\.interpreter"
)

#: scales of grid values: for each, the product of s * m with the float32 1 / s rounds off
#: m for some FP8 midpoints m (as it never does for s = 3 or 5)
GRID_SCALES = (7.0, 15.0, 61.0, 63.0)
#: poison of a caller's scales buffer (int32 elements; a finite float32 too)
POISON = 0x5A5A5A5A
#: elements of the caller's scales buffer before and after the scales' extent
GUARD = 3
#: what a caller's FP8 output holds before the call (outside the view: must stay)
OUT_FILL = 7.0


@st.composite
def cases(draw):
    if draw(st.booleans()):
        group_size = draw(st.sampled_from([64, 128]))
        D = draw(st.sampled_from(GROUP_HEAD_SIZES))
        step = group_size // math.gcd(group_size, D)  # H * D a multiple of the group size
        H = step * draw(st.integers(1, MAX_H // step))
        ue8m0 = draw(st.booleans())
        fmt = dict(
            kind="group",
            group_size=group_size,
            ue8m0=ue8m0,
            layout=draw(st.sampled_from(LAYOUTS if ue8m0 else LAYOUTS[:3])),
        )
    else:
        D = draw(st.sampled_from(TOKEN_HEAD_SIZES))
        H = draw(st.integers(1, MAX_H))
        # scale_ub bounds the absmax: 0, +inf and NaN too (C36)
        ub = st.floats(-3, 3).map(lambda e: 10.0**e) | st.sampled_from([0.0, INF, NAN])
        fmt = dict(
            kind="token",
            scale_ub=draw(st.none() | ub),
            # a caller's scales: [T] (with this element stride) or [T, 1]
            scales_shape=draw(st.sampled_from(["t", "t1"])),
            scales_stride=draw(st.sampled_from([1, 2, 5])),
        )
    T = draw(st.integers(1, MAX_T))  # T = 0 has its own tests (test_formats_triton.py)
    form = draw(st.sampled_from(FORMS))
    K = {"pair": 2, "packed": 1}.get(form) or draw(st.integers(1, 5))
    return dict(
        T=T,
        H=H,
        D=D,
        form=form,
        K=K,
        counts=draw(st.lists(st.integers(0, 4), min_size=T, max_size=T))
        if form == "packed"
        else None,
        indptr_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        P=None if form == "packed" else draw(st.none() | st.integers(0, T)),
        dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        padded=draw(st.booleans()),  # partials with padded strides
        lse_th=draw(st.booleans()),  # LSEs stored [T, H] ([N, H] packed)
        lse_base=draw(st.sampled_from(["e", 2])),
        values=draw(st.sampled_from(["random", "grid"])),  # see grid_values
        # LSE categories of random values
        lse_pattern=tuple(sorted(draw(st.sets(st.sampled_from(LSE_CATEGORIES), min_size=1)))),
        # powers of two keep grid values exact; 256 overflows float16 there
        magnitude=draw(st.sampled_from([2.0**-20, 2.0**-7, 1.0, 1.0, 16.0, 256.0])),
        nan_frac=draw(st.sampled_from([0.0, 0.0, 0.001, 0.01])),
        fmt=fmt,
        given_scales=draw(st.booleans()),
        amax=draw(st.none() | st.sampled_from([0.0, 3.0e38, NAN])),  # None: no amax
        out_pad=draw(st.none() | st.tuples(st.sampled_from([0, 1, 8]), st.sampled_from([0, 3]))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@dataclasses.dataclass
class Inputs:
    outputs: object  # what merge() receives
    lses: object
    kw: dict  # indptr, prefill_tokens_with_context, lse_base
    expected: Expected  # the float32 reference (CPU)


def _junk(D: int) -> torch.Tensor:
    return torch.tensor([NAN, INF, -INF])[torch.arange(D) % 3]


def grid_values(n: int, H: int, D: int, counts: list | None, T: int, gen):
    """(V [n, H, D], L [H, n]): rows whose merge is exact and whose stores round ties.
    Values are ``s * m`` with ``m`` an FP8 code or the midpoint between two (2^-6 to 252)
    and ``s`` one of GRID_SCALES, and every 64 values of a token start with +-448 * s: a
    token's or group's scale is then ``s`` and value / scale lands on FP8 midpoints, where a
    store that rounds one float32 ulp off (a product with 1 / s where it must divide, or
    the reverse) picks the other code. One row of each (token, head) is weighted, the
    others empty or 10^4 below it, so its weight is exactly 1. Rows are partial-major
    (``counts`` None) or packed."""
    s = GRID_SCALES[int(torch.randint(len(GRID_SCALES), (), generator=gen))]
    exponent = torch.randint(-6, 8, (n, H, D), generator=gen)
    m = (32 + torch.randint(0, 32, (n, H, D), generator=gen)) / 32 * 2.0**exponent
    sign = torch.where(torch.rand(n, H, D, generator=gen) < 0.5, -1.0, 1.0)
    V = sign * s * m
    flat = V.view(n, H * D)
    sign = torch.rand(flat[:, ::64].shape, generator=gen) < 0.5
    flat[:, ::64] = torch.where(sign, -448.0 * s, 448.0 * s)
    if counts is None:  # row k * T + t
        rows_of = [torch.arange(t, n, T) for t in range(T)]
    else:
        starts = [0, *itertools.accumulate(counts)]
        rows_of = [torch.arange(starts[t], starts[t + 1]) for t in range(T)]
    top = torch.randn(H, T, generator=gen) * 4  # the weighted row's LSE
    L = torch.full((H, n), -INF)
    for t, rows in enumerate(rows_of):
        if len(rows):
            r = torch.rand(H, len(rows), generator=gen)
            top_t = top[:, t : t + 1]
            others = torch.where(r < 1 / 3, -INF, torch.where(r < 2 / 3, INF, top_t - 1e4))
            pick = torch.randint(0, len(rows), (H, 1), generator=gen)
            L[:, rows] = torch.where(torch.arange(len(rows)) == pick, top_t, others)
    return V, L


def build_inputs(c: dict, device: str) -> Inputs:
    """The case's partials in its form on ``device`` and the float32 reference of them.
    Rows that must not be read (empty, zero weight against a gap of 2000 or more, the first
    partial past P) hold NaN and infinities."""
    T, H, D, K, dt = c["T"], c["H"], c["D"], c["K"], c["dtype"]
    gen = torch.Generator().manual_seed(c["seed"])
    base2 = c["lse_base"] == 2
    counts = c["counts"]
    n = sum(counts) if counts is not None else K * T  # rows of all partials
    if c["values"] == "grid":
        V, L = grid_values(n, H, D, counts, T, gen)
    else:
        L = lse_values(H, n, c["lse_pattern"], gen)  # [H, n]
        V = torch.randn(n, H, D, generator=gen)  # [n, H, D]
    V *= c["magnitude"]
    if counts is None:
        L = L.reshape(H, K, T).permute(1, 0, 2).contiguous()  # [K, H, T]
        V = V.reshape(K, T, H, D)
        add_junk(V, L, c["P"])
    else:
        eff = torch.where(L == INF, -INF, L)
        start = 0
        for count in counts:  # per token, as add_junk per partial
            mine = eff[:, start : start + count]  # [H, count]
            if count:
                m = mine.amax(dim=1, keepdim=True)
                unread = (mine == -INF) | ((m - mine) >= 2000)  # NaN comparisons are False
                V[start : start + count][unread.t()] = _junk(D)
            start += count
    if c["nan_frac"] > 0:
        hit = torch.rand(V.shape, generator=gen) < c["nan_frac"]
        specials = torch.tensor([NAN, INF, -INF])[torch.randint(0, 3, V.shape, generator=gen)]
        V[hit] = specials[hit]
    V = V.to(dt)  # what every backend and the reference read

    form, P = c["form"], c["P"]
    kw: dict = {"lse_base": c["lse_base"]}
    layout = "th" if c["lse_th"] else "ht"
    strides = padded(H, D, head_pad=3, token_pad=5) if c["padded"] else (H * D, D)
    if form == "pair":
        outputs, lses = [], []
        for k in range(2):
            _, view = strided_tensor((T, H, D), (*strides, 1), k, dt, device, V[k], fill=NAN)
            outputs.append(view)
            lses.append(lse_tensor(L[k], layout, k, device)[1])
    elif form == "stacked":
        o_strides = (T * strides[0] + 7, *strides, 1)
        _, outputs = strided_tensor((K, T, H, D), o_strides, 2, dt, device, V, fill=NAN)
        l_strides = (T * H, 1, H) if c["lse_th"] else (H * T, T, 1)
        _, lses = strided_tensor((K, H, T), l_strides, 0, torch.float32, device, L, fill=NAN)
    elif form == "flashinfer":  # v [T, K, H, D] and s [T, K, H], viewed [K, T, H, D], [K, H, T]
        outputs = V.permute(1, 0, 2, 3).contiguous().to(device).transpose(0, 1)
        lses = L.permute(2, 0, 1).contiguous().to(device).permute(1, 2, 0)
    else:
        _, outputs = strided_tensor((n, H, D), (*strides, 1), 1, dt, device, V, fill=NAN)
        lses = lse_tensor(L, layout, 2, device)[1]
        indptr = torch.tensor([0, *counts]).cumsum(0).to(c["indptr_dtype"])
        kw["indptr"] = indptr.to(device)
    if P is not None:
        kw["prefill_tokens_with_context"] = P

    if counts is None:
        ref_kw = dict(lse_base_2=base2, prefill_tokens_with_context=P)
        out, lse = merge_states_reference(list(V), list(L), **ref_kw)
        mag, _ = merge_states_reference([v.float().abs() for v in V], list(L), **ref_kw)
    else:
        out, lse = merge_packed_reference(V, L, indptr, lse_base_2=base2)
        mag, _ = merge_packed_reference(V.float().abs(), L, indptr, lse_base_2=base2)
    return Inputs(outputs, lses, kw, Expected(out, lse, mag))


def poisoned(shape, strides, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): a view with ``shape`` and ``strides`` into a buffer of POISON with
    ``GUARD`` elements on either side of its extent."""
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    buffer = torch.full((GUARD + extent + GUARD,), POISON, dtype=torch.int32).view(dtype)
    buffer = buffer.to(device)
    return buffer, buffer.as_strided(shape, strides, GUARD)


def make_format(c: dict, device: str):
    """(format, the caller's scales buffer or None) of the case."""
    T, H, D, f = c["T"], c["H"], c["D"], c["fmt"]
    amax = None
    if c["amax"] is not None:
        amax = torch.zeros(1, device=device).fill_(c["amax"])  # overwritten by the store
    if f["kind"] == "group":
        fmt = FP8PerTokenGroup(f["group_size"], f["ue8m0"], f["layout"], amax=amax)
        if not c["given_scales"]:
            return fmt, None
        shape, strides, dtype = fmt.scales_layout(T, fmt.groups(H, D))
    else:
        ub = f["scale_ub"]
        ub = None if ub is None else torch.tensor([ub], dtype=torch.float32, device=device)
        fmt = FP8PerToken(scale_ub=ub, amax=amax)
        if not c["given_scales"]:
            return fmt, None
        s = f["scales_stride"]
        shape, strides = ((T,), (s,)) if f["scales_shape"] == "t" else ((T, 1), (s, 4))
        dtype = torch.float32
    buffer, scales = poisoned(shape, strides, dtype, device)
    return dataclasses.replace(fmt, scales=scales), buffer


def reference_store(fmt, merged: torch.Tensor, buffer: torch.Tensor | None):
    """(FP8 output, scales, amax) as the format's reference store writes ``merged``:
    the scales into a CPU copy of the caller's buffer (returned whole), or into new ones."""
    replace = {}
    if buffer is not None:
        buffer = buffer.cpu().clone()
        replace["scales"] = buffer.as_strided(fmt.scales.shape, fmt.scales.stride(), GUARD)
    if fmt.amax is not None:
        replace["amax"] = fmt.amax.cpu().clone()
    if getattr(fmt, "scale_ub", None) is not None:
        replace["scale_ub"] = fmt.scale_ub.cpu()
    ref = dataclasses.replace(fmt, **replace)
    if buffer is None:
        ref = ref.with_scales(*merged.shape, "cpu")
    out = torch.empty(merged.shape, dtype=FP8)
    ref.store_reference(merged, out)
    return out, buffer if buffer is not None else ref.scales, replace.get("amax")


def describe(c: dict, backend: str, device: str) -> str:
    f = c["fmt"]
    if f["kind"] == "group":
        fmt = f"FP8PerTokenGroup({f['group_size']}, ue8m0={f['ue8m0']}, {f['layout']!r})"
    else:
        scales = f"scales {f['scales_shape']} stride {f['scales_stride']}"
        fmt = f"FP8PerToken(scale_ub={f['scale_ub']}, {scales})"
    return (
        f"{backend} on {device}: {fmt} given_scales={c['given_scales']} amax={c['amax']} "
        f"out_pad={c['out_pad']}; {c['form']} K={c['K']} counts={c['counts']} "
        f"T={c['T']} H={c['H']} D={c['D']} {dtype_name(c['dtype'])} P={c['P']} "
        f"base={c['lse_base']} values={c['values']} pattern={c['lse_pattern']} "
        f"magnitude={c['magnitude']} nan_frac={c['nan_frac']} padded={c['padded']} "
        f"lse_th={c['lse_th']} seed={c['seed']}"
    )


def run_case(c: dict, backend: str, device: str) -> bool:
    """Check one case on ``backend``; False where the backend refused it (as it must)."""
    T, H, D = c["T"], c["H"], c["D"]
    what = describe(c, backend, device)
    inputs = build_inputs(c, device)
    fmt, buffer = make_format(c, device)
    out = guard = None
    if c["out_pad"] is not None:
        strides = (*padded(H, D, *c["out_pad"]), 1)
        base, out = strided_tensor((T, H, D), strides, 1, FP8, device, fill=OUT_FILL)
        guard = Guard(base, (T, H, D), strides, 1)

    def merge(**kw):
        return attnmerge.merge(inputs.outputs, inputs.lses, backend=backend, **inputs.kw, **kw)

    gap = None if backend == "torch" else fmt.kernel_gap(fmt.key, D, backend)
    if gap is not None:
        written = [t for t in (buffer, fmt.amax) if t is not None]
        before = [as_int(t).clone() for t in written]
        with pytest.raises(attnmerge.BackendError, match=re.escape(gap)):
            merge(quant=fmt, out=out)
        # refused before anything is written
        for t, was in zip(written, before, strict=True):
            assert torch.equal(as_int(t), was), what
        if out is not None:
            assert torch.equal(as_int(guard.base), guard.snapshot), what
        return False

    exp = inputs.expected
    res32 = merge(out_dtype=torch.float32, return_lse=True)
    merged = res32.output.cpu()
    assert_output_close(merged, exp.output, exp.magnitude, what=f"float32 output of {what}")
    assert_lse_close(res32.lse.cpu(), exp.lse, f"lse of {what}")

    res = merge(quant=fmt, out=out, return_lse=True)
    want_q, want_scales, want_amax = reference_store(fmt, merged, buffer)
    assert_bits_equal(res.output.cpu(), want_q, f"FP8 output of {what}")
    assert_lse_close(res.lse.cpu(), exp.lse, f"lse (FP8 output) of {what}")
    if out is not None:
        assert res.output is out, what
        guard.check(what)
    if buffer is not None:
        assert res.scales is fmt.scales, what
        assert_bits_equal(buffer.cpu(), want_scales, f"scales' buffer of {what}")
    else:
        assert res.scales.shape == want_scales.shape, what
        assert res.scales.stride() == want_scales.stride(), what
        assert_bits_equal(
            res.scales.cpu().contiguous(), want_scales.contiguous(), f"scales of {what}"
        )
    if fmt.amax is not None:
        got, want = as_int(fmt.amax.cpu()), as_int(want_amax)
        assert torch.equal(got, want), f"amax of {what}: {got.tolist()} vs {want.tolist()}"
    return True


@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize(
    ("backend", "device"),
    [
        pytest.param(b, d, id=f"{b}-{d}")
        for b, d in (
            [("triton", "cuda"), ("cuda", "cuda")]
            if ON_GPU
            else [("torch", "cpu"), ("triton", "cpu")]
        )
    ],
)
def test_fuzz_formats_against_reference(backend, device, shard):
    progress = _progress_writer(f"formats-{backend}-{device}-{shard}")
    ran = refused = 0

    @seed(20261214 + shard)
    @FUZZ_FORMATS
    @given(data=st.data())
    def check(data):
        nonlocal ran, refused
        if run_case(data.draw(cases(), label="case"), backend, device):
            ran += 1
        else:
            refused += 1
        progress(ran + refused)

    check()
    progress(ran + refused, final=True)
    # refusals are checked too, but a shard must also have run the backend
    assert ran > 0, f"{backend}: all {refused} cases were refused"
