#!/usr/bin/env python
"""Bit-for-bit output comparison of two versions of attnmerge over a fixed fuzz corpus.

Every case is one call of the public API (``merge_attn_states``, or ``merge`` for a few),
made with identical inputs through the base revision's package (``attnmerge_base``, see
``versions.py``) and the package under test (the working tree, or ``--new-rev``), once per
backend. After each call every buffer the call could touch (outputs with their padding,
in-place inputs, the other inputs) is compared byte for byte, and for ``merge`` the
returned tensors (bits, shape, strides). A call that raises must raise the same exception
type in both versions; such cases are counted apart. Any difference exits with 1.

The corpus is deterministic: case ``i`` depends only on ``--seed``, ``--profile`` and
``i``, so ``--cases`` grows the same corpus and ``--case ID`` reruns one case. The
``cpu`` profile keeps most grids at 64 (token, head) rows or fewer because Triton's
interpreter costs milliseconds per program; the ``gpu`` profile adds grids up to
hundreds of thousands of rows and fixed large shapes (the kernels pick their tiles by
grid size).

Run from the repository root, e.g.::

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/compare/compare_outputs.py --jobs 2
    .venv/bin/python benchmarks/compare/compare_outputs.py            # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import versions  # the directory above is not a package: found through sys.path

DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
    "fp64": torch.float64,
}
PARTIAL_DTYPES = ("fp32", "fp16", "bf16")
HEAD_SIZES = (1, 3, 8, 16, 32, 64, 80, 96, 100, 128, 192, 256, 512)
# Same-size integer dtypes: a float tensor viewed as these compares bits, NaN payloads too.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# GPU profile: (T, H, D) of its first cases, at the kernels' grid-size tiers and beyond.
GPU_ANCHORS = (
    (4096, 32, 128),
    (4096, 128, 128),
    (4096, 32, 128),
    (1024, 64, 128),  # 16 MiB bf16 partials: the head-major limit
    (1025, 64, 128),
    (2048, 16, 128),  # 32768 rows
    (2049, 16, 128),
    (8193, 1, 64),
    (256, 32, 128),  # 8192 rows
    (257, 32, 128),
    (16, 128, 128),  # 2048 rows
    (17, 128, 128),
    (32, 128, 128),  # 4096 rows
    (2, 128, 512),
    (4096, 8, 512),
    (32768, 1, 128),
    (32769, 2, 96),
    (300, 128, 80),
)

# Invalid calls: each must raise the same exception type in both versions.
INVALID_KINDS = (
    "no_scale",
    "extra_scale",
    "scale_2_elements",
    "P_out_of_range",
    "lse_fp16",
    "partial_fp64",
    "alias_other_strides",
    "output_overlaps_itself",
    "lse_as_TH",
    "lse_base_10",
    "unknown_backend",
)


# ---------------------------------------------------------------------------
# The corpus: plain, JSON-able case descriptions.


@dataclass(frozen=True)
class Case:
    """One call of the corpus; everything needed to rebuild its inputs bit for bit."""

    id: int
    api: str  # "mas" (merge_attn_states) or "merge"
    T: int
    H: int
    D: int
    p_dtype: str
    s_dtype: str
    out_dtype: str  # for "merge": "none" means out_dtype=None (the prefix's dtype)
    scale: float | None
    scale_form: str  # "1" ([1] tensor), "0d", "view" (1 element of a larger buffer)
    p_layout: str
    s_layout: str
    out_layout: str
    p_lse_layout: str
    s_lse_layout: str
    out_lse: str  # "" (none), a layout, or "prefix"/"suffix" (in place)
    inplace: str  # "", "prefix" or "suffix": output is that partial
    P: int | None
    lse_base: str | int
    lse_kind: str
    lse_offset: float
    lse_special: float
    all_empty: bool
    p_mag: float
    s_mag: float
    row_special: float
    zero_weight_nan: bool
    fp8_ties: bool
    invalid: str
    seed: int


def _weighted(rng: random.Random, table: dict) -> object:
    return rng.choices(list(table), weights=list(table.values()))[0]


def _size_cpu(rng: random.Random) -> tuple[int, int, int | None]:
    """(T, H, D): D None to be drawn, negative for -D with 2-byte partials only."""
    u = rng.random()
    if u < 0.01:
        return 0, rng.randint(1, 8), None
    if u < 0.55:
        T = rng.randint(1, 16)
        return T, rng.randint(1, max(1, 16 // T)), None
    if u < 0.88:
        H = rng.choice((1, 2, 3, 4, 5, 8, 16, 32, 64))
        return rng.randint(1, max(1, 64 // H)), H, None
    if u < 0.965:
        if rng.random() < 0.5:
            return rng.randint(65, 300), rng.choice((1, 1, 2)), None
        H = rng.choice((96, 100, 128))
        return rng.randint(1, 2), H, None
    if u < 0.996:
        # Past 8192 rows; tiny heads of 2-byte partials put hundreds of rows in a program.
        H = rng.choice((4, 8, 16, 32))
        return rng.randint(8193, 12000) // H + 1, H, -rng.choice((1, 3, 8))
    H = rng.choice((1, 8))  # the 2048..8192-row tier, 8 rows a program: slow, so rare
    return rng.randint(2049, 2400) // H + 1, H, -1


def _size_gpu(rng: random.Random) -> tuple[int, int, int | None]:
    u = rng.random()
    H = rng.choice((1, 2, 3, 4, 5, 8, 12, 16, 32, 40, 64, 96, 128))
    if u < 0.01:
        return 0, H, None
    if u < 0.30:
        return rng.randint(1, max(1, 64 // H)), H, None
    if u < 0.55:
        return rng.randint(1, max(1, 2048 // H)), H, None
    if u < 0.75:
        return max(1, rng.randint(2049, 9000) // H), H, None
    if u < 0.92:
        return max(1, rng.randint(9001, 40000) // H), H, None
    T = rng.randint(1024, 8192)
    return T, rng.choice((8, 16, 32, 64, 128)), rng.choice((64, 96, 128))


def _partial_layout(rng: random.Random, D: int, writable: bool) -> str:
    kinds = {"contig": 45, "padD": 15, "hmajor": 10, "tgap": 10, "hmajorpad": 5}
    if not writable:
        kinds["expT"] = 5  # token stride 0: fine to read, overlapping if written
    kind = _weighted(rng, kinds)
    if kind == "padD":
        kind += f"+{rng.choice((1, 8, 64))}"  # D=128 +64: the [T, H, 192] slice
    elif kind == "hmajorpad":
        kind += f"+{rng.choice((1, 4))}"
    elif kind == "tgap":
        kind += f"+{rng.choice((1, 3))}"
    if rng.random() < 0.12:
        kind += f"@{rng.choice((1, 3))}"  # misaligned: offset by an odd number of elements
    return kind


def _lse_layout(rng: random.Random, writable: bool) -> str:
    kinds = {"ht": 45, "th": 25, "htpad": 8, "thpad": 8, "htstep": 7}
    if not writable:
        kinds["expH"] = 7
    kind = _weighted(rng, kinds)
    if kind in ("htpad", "thpad"):
        kind += f"+{rng.choice((1, 5))}"
    if rng.random() < 0.1:
        kind += "@1"
    return kind


def make_case(index: int, seed: int, profile: str) -> Case:
    """Case ``index`` of the corpus for ``seed`` and ``profile`` ("cpu" or "gpu")."""
    rng = random.Random(f"attnmerge-compare:{seed}:{profile}:{index}")
    if profile == "gpu" and index < len(GPU_ANCHORS):
        T, H, D = GPU_ANCHORS[index]
    else:
        T, H, D = (_size_cpu if profile == "cpu" else _size_gpu)(rng)
    partial_dtypes = PARTIAL_DTYPES
    if D is None:
        D = rng.choice(HEAD_SIZES)
    elif D < 0:
        D, partial_dtypes = -D, ("fp16", "bf16")
    invalid = rng.choice(INVALID_KINDS) if rng.random() < 0.025 else ""
    api = "merge" if not invalid and rng.random() < 0.06 else "mas"
    p_dtype, s_dtype = rng.choice(partial_dtypes), rng.choice(partial_dtypes)
    out_dtype = _weighted(rng, {"fp32": 20, "fp16": 20, "bf16": 20, "fp8": 40})
    if api == "merge" and out_dtype != "fp8" and rng.random() < 0.3:
        out_dtype = "none"
    inplace = ""
    if api == "mas" and rng.random() < 0.12:
        inplace = rng.choice(("prefix", "suffix"))
        out_dtype = p_dtype if inplace == "prefix" else s_dtype
    p_layout = _partial_layout(rng, D, writable=inplace == "prefix")
    s_layout = _partial_layout(rng, D, writable=inplace == "suffix")
    out_layout = {"prefix": p_layout, "suffix": s_layout}.get(inplace) or _partial_layout(
        rng, D, writable=True
    )
    lse_inplace = rng.random() < 0.15
    p_lse_layout = _lse_layout(rng, writable=False)
    s_lse_layout = _lse_layout(rng, writable=False)
    out_lse = ""
    if rng.random() < 0.5:
        if api == "mas" and lse_inplace:
            out_lse = rng.choice(("prefix", "suffix"))
            if out_lse == "prefix" and p_lse_layout.startswith("expH"):
                p_lse_layout = "ht"
            if out_lse == "suffix" and s_lse_layout.startswith("expH"):
                s_lse_layout = "ht"
        else:
            out_lse = _lse_layout(rng, writable=True) if api == "mas" else "yes"
    scale = None
    scale_form = "1"
    if out_dtype == "fp8":
        if rng.random() < 0.04:  # never validated on the host: the kernels decide
            scale = rng.choice((0.0, math.inf, -0.5, math.nan, 1e-40))
        else:
            scale = rng.choice((0.1, 1.0, 0.05, 0.01, 2**-7, 1e-3, 1e-5, 3.0, 300.0, 1e4))
        scale_form = _weighted(rng, {"1": 85, "0d": 5, "view": 10})
    P = _weighted(rng, {"none": 40, "0": 12, "half": 16, "all": 12, "random": 20})
    P = {"none": None, "0": 0, "half": T // 2, "all": T}.get(P, rng.randint(0, T))
    lse_base = rng.choice(("e", "e", "e", 2, 2))
    lse_kind = _weighted(
        rng,
        {"normal": 33, "spread100": 12, "spread1000": 10, "equal": 8, "ulp": 7, "gap": 18},
    )
    if rng.random() < 0.05:
        lse_kind = "huge"
    lse_special = 0.0 if rng.random() < 0.55 else rng.choice((0.02, 0.1, 0.3, 0.7))
    mags = {1.0: 55, 1e-3: 6, 1e-6: 6, 1e-9: 5, 50.0: 8, 1e3: 8, 7e4: 6, 1e6: 6}
    # Partials at FP8 rounding midpoints x scale, in rows of weight exactly 1 (the other
    # partial empty): the last bit of the scaling decides the FP8 rounding there.
    fp8_ties = out_dtype == "fp8" and rng.random() < 0.35
    if fp8_ties:
        lse_special = max(lse_special, 0.3)
    case = Case(
        id=index,
        api=api,
        T=T,
        H=H,
        D=D,
        p_dtype=p_dtype,
        s_dtype=s_dtype,
        out_dtype=out_dtype,
        scale=scale,
        scale_form=scale_form,
        p_layout=p_layout,
        s_layout=s_layout,
        out_layout=out_layout,
        p_lse_layout=p_lse_layout,
        s_lse_layout=s_lse_layout,
        out_lse=out_lse,
        inplace=inplace,
        P=P,
        lse_base=lse_base,
        lse_kind=lse_kind,
        lse_offset=rng.choice((0.0, 0.0, 20.0, -50.0, 1e4)),
        lse_special=lse_special,
        all_empty=rng.random() < 0.04,
        p_mag=_weighted(rng, mags),
        s_mag=_weighted(rng, mags),
        row_special=0.0 if rng.random() < 0.6 else rng.choice((0.05, 0.25)),
        zero_weight_nan=rng.random() < 0.4,
        fp8_ties=fp8_ties,
        invalid=invalid,
        seed=rng.getrandbits(62),
    )
    return _make_invalid(case) if invalid else case


def _make_invalid(case: Case) -> Case:
    """Adjust an invalid case so that its one defect is what makes the call fail."""
    change: dict = {}
    kind = case.invalid
    if kind in ("no_scale", "scale_2_elements"):
        change = {"out_dtype": "fp8", "scale": case.scale or 0.1, "inplace": ""}
    elif kind == "extra_scale":
        change = {"out_dtype": "fp32", "scale": None, "inplace": "", "out_layout": "contig"}
        change["fp8_ties"] = False
    elif kind == "alias_other_strides":
        change = {"T": max(case.T, 2), "H": max(case.H, 2), "p_layout": "contig"}
        change |= {"inplace": "", "out_layout": "contig", "P": None}
    elif kind == "output_overlaps_itself":
        change = {"T": max(case.T, 2), "P": None}
    elif kind == "lse_as_TH":
        change = {"H": case.T + 1}
    if change.get("out_dtype") == "fp8" or case.out_dtype == "fp8":
        change.setdefault("scale", case.scale)
    if case.out_lse in ("prefix", "suffix") and change.get("inplace") == "":
        change["out_lse"] = ""
    return dataclasses.replace(case, **change)


def describe(case: Case) -> str:
    """One line that says what the case exercises."""
    out = case.out_dtype
    if out == "fp8":
        out += f"(scale={case.scale:g},{case.scale_form})"
    parts = [
        f"#{case.id}",
        "merge" if case.api == "merge" else "mas",
        f"T={case.T} H={case.H} D={case.D}",
        f"{case.p_dtype}+{case.s_dtype}->{out}",
        f"P={case.P}",
        f"base={case.lse_base}",
        f"lse={case.lse_kind}"
        + (f"{case.lse_offset:+g}" if case.lse_offset else "")
        + (f",special={case.lse_special:g}" if case.lse_special else "")
        + (",all-empty" if case.all_empty else ""),
        f"layout p={case.p_layout} s={case.s_layout}"
        + (f" o={case.out_layout}" if case.api == "mas" else ""),
        f"lse p={case.p_lse_layout} s={case.s_lse_layout}",
        f"out_lse={case.out_lse or 'none'}",
        f"mag={case.p_mag:g}/{case.s_mag:g}",
    ]
    if case.row_special:
        parts.append(f"row-special={case.row_special:g}")
    if case.zero_weight_nan:
        parts.append("zero-weight-nan")
    if case.fp8_ties:
        parts.append("fp8-ties")
    if case.inplace:
        parts.append(f"in-place={case.inplace}")
    if case.invalid:
        parts.append(f"INVALID={case.invalid}")
    return " ".join(parts)


# ---------------------------------------------------------------------------
# Tensors: each argument is a view (shape, strides, offset) into a flat buffer.


@dataclass(frozen=True)
class View:
    buffer: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int

    def extent(self) -> int:
        """Elements of the buffer the view reaches (offset included)."""
        if any(n == 0 for n in self.shape):
            return self.offset
        reach = sum((n - 1) * s for n, s in zip(self.shape, self.strides, strict=True))
        return self.offset + reach + 1

    def of(self, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        return buffers[self.buffer].as_strided(self.shape, self.strides, self.offset)


def _split(layout: str) -> tuple[str, int, int]:
    body, _, offset = layout.partition("@")
    kind, _, param = body.partition("+")
    return kind, int(param or 0), int(offset or 0)


def partial_view(buffer: str, layout: str, dtype: torch.dtype, T: int, H: int, D: int) -> View:
    kind, k, offset = _split(layout)
    strides = {
        "contig": (H * D, D, 1),
        "padD": (H * (D + k), D + k, 1),
        "hmajor": (D, T * D, 1),
        "hmajorpad": (D + k, T * (D + k), 1),
        "tgap": ((H + k) * D, D, 1),
        "expT": (0, D, 1),
    }[kind]
    return View(buffer, dtype, (T, H, D), strides, offset)


def lse_view(buffer: str, layout: str, T: int, H: int) -> View:
    kind, k, offset = _split(layout)
    strides = {
        "ht": (T, 1),
        "th": (1, H),
        "htpad": (T + k, 1),
        "thpad": (1, H + k),
        "htstep": (2 * T, 2),
        "expH": (0, 1),
    }[kind]
    return View(buffer, torch.float32, (H, T), strides, offset)


def views_of(case: Case) -> dict[str, View]:
    """The case's argument views (before any ``invalid`` mutation)."""
    T, H, D = case.T, case.H, case.D
    views = {
        "prefix_output": partial_view("prefix", case.p_layout, DTYPES[case.p_dtype], T, H, D),
        "suffix_output": partial_view("suffix", case.s_layout, DTYPES[case.s_dtype], T, H, D),
        "prefix_lse": lse_view("prefix_lse", case.p_lse_layout, T, H),
        "suffix_lse": lse_view("suffix_lse", case.s_lse_layout, T, H),
    }
    if case.api == "mas":
        if case.inplace:
            views["output"] = views[f"{case.inplace}_output"]
        else:
            out_dtype = DTYPES[case.out_dtype]
            views["output"] = partial_view("output", case.out_layout, out_dtype, T, H, D)
        if case.out_lse in ("prefix", "suffix"):
            views["output_lse"] = views[f"{case.out_lse}_lse"]
        elif case.out_lse:
            views["output_lse"] = lse_view("output_lse", case.out_lse, T, H)
    if case.scale is not None:
        shape, offset = {"1": ((1,), 0), "0d": ((), 0), "view": ((1,), 5)}[case.scale_form]
        views["scale"] = View("scale", torch.float32, shape, (1,) * len(shape), offset)
    return views


# ---------------------------------------------------------------------------
# Data.


def _uniform(g: torch.Generator, shape, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=device) * (hi - lo) + lo


def _lse_values(case: Case, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical [H, T] float32 prefix and suffix LSEs."""
    shape = (case.H, case.T)
    n1 = torch.randn(shape, generator=g, device=device)
    n2 = torch.randn(shape, generator=g, device=device)
    kind, c = case.lse_kind, case.lse_offset
    if kind == "spread100":
        p, s = _uniform(g, shape, -100, 100, device), _uniform(g, shape, -100, 100, device)
    elif kind == "spread1000":
        p, s = _uniform(g, shape, -1000, 1000, device), _uniform(g, shape, -1000, 1000, device)
    elif kind == "equal":
        p = 3 * n1 + c
        s = p.clone()
    elif kind == "ulp":  # one ulp apart either way: the weights' rounding at ties
        p = 3 * n1 + c
        up = torch.rand(shape, generator=g, device=device) < 0.5
        s = torch.nextafter(p, torch.where(up, math.inf, -math.inf))
    elif kind == "gap":  # exp(gap) subnormal or zero: the weight-zero boundary
        lo, hi = (80.0, 110.0) if case.lse_base == "e" else (115.0, 160.0)
        gap = _uniform(g, shape, lo, hi, device)
        p = 3 * n1 + c
        swap = torch.rand(shape, generator=g, device=device) < 0.5
        s = torch.where(swap, p + gap, p - gap)
    elif kind == "huge":
        p = _uniform(g, shape, -3.3e38, 3.3e38, device)
        s = torch.where(n2 > 0, p * 0.999, _uniform(g, shape, -3.3e38, 3.3e38, device))
    else:
        p, s = 3 * n1 + c, 3 * n2 + c
    for x in (p, s):
        if case.all_empty:
            plus = torch.rand(shape, generator=g, device=device) < 0.5
            x.copy_(torch.where(plus, math.inf, -math.inf))
        elif case.lse_special:
            hit = torch.rand(shape, generator=g, device=device) < case.lse_special
            which = torch.randint(0, 5, shape, generator=g, device=device)
            special = torch.tensor([math.inf, math.inf, -math.inf, -math.inf, math.nan])
            x.copy_(torch.where(hit, special.to(device)[which], x))
    return p, s


def _partial_values(
    case: Case, mag: float, lse: torch.Tensor, other_lse: torch.Tensor, g, device
) -> torch.Tensor:
    """Logical [T, H, D] float32 partial output, with the case's special values."""
    T, H, D = case.T, case.H, case.D
    x = torch.randn((T, H, D), generator=g, device=device) * mag
    if case.fp8_ties and case.scale is not None:
        codes = torch.arange(0, 127, dtype=torch.uint8)  # the finite positive e4m3 values
        values = codes.view(torch.float8_e4m3fn).float()
        mids = ((values[:-1] + values[1:]) / 2).to(device)
        scale = case.scale if math.isfinite(case.scale) and case.scale > 0 else 1.0
        pick = torch.randint(0, mids.numel(), x.shape, generator=g, device=device)
        sign = torch.where(torch.rand(x.shape, generator=g, device=device) < 0.5, -1.0, 1.0)
        use = torch.rand(x.shape, generator=g, device=device) < 0.5
        x = torch.where(use, mids[pick] * sign * scale, x)
    rows = (T, H)
    cols = torch.arange(D, device=device)
    one_col = cols == torch.randint(0, max(D, 1), rows, generator=g, device=device)[..., None]
    if case.row_special:
        hit = (torch.rand(rows, generator=g, device=device) < case.row_special)[..., None]
        kind = torch.randint(0, 5, rows, generator=g, device=device)[..., None]
        x = torch.where(hit & (kind == 0), math.nan, x)
        x = torch.where(hit & (kind == 1) & one_col, math.nan, x)
        x = torch.where(hit & (kind == 2) & one_col, math.inf, x)
        x = torch.where(hit & (kind == 3) & one_col, -math.inf, x)
        x = torch.where(hit & (kind == 4), x * 1e37, x)
    if case.zero_weight_nan:
        # Rows this partial should not contribute to: empty, or far below the other.
        far = 80.0 if case.lse_base == "e" else 120.0
        lse_th, other_th = lse.t(), other_lse.t()
        unweighted = lse_th.isinf() | (lse_th < other_th - far)
        pick = torch.rand(rows, generator=g, device=device) < 0.6
        whole = (torch.rand(rows, generator=g, device=device) < 0.5)[..., None]
        bad = (unweighted & pick)[..., None] & (whole | one_col)
        x = torch.where(bad, math.nan, x)
    return x


def _random_bytes(numel: int, dtype: torch.dtype, g, device) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * size,), generator=g, device=device, dtype=torch.uint8)
    return raw.view(dtype)


def make_buffers(case: Case, views: dict[str, View], device) -> dict[str, torch.Tensor]:
    """The case's flat buffers: inputs hold their values (NaN in padding and where nothing
    may be read), outputs random bytes (so unwritten bytes are compared too)."""
    g = torch.Generator(device=device)
    g.manual_seed(case.seed)
    sizes: dict[str, int] = {}
    dtypes: dict[str, torch.dtype] = {}
    for v in views.values():
        sizes[v.buffer] = max(sizes.get(v.buffer, 1), v.extent())
        dtypes[v.buffer] = v.dtype
    buffers = {
        name: (
            torch.full((sizes[name],), math.nan, dtype=dtypes[name], device=device)
            if name != "output" and name != "output_lse"
            else _random_bytes(sizes[name], dtypes[name], g, device)
        )
        for name in sizes
    }
    p_lse, s_lse = _lse_values(case, g, device)
    prefix = _partial_values(case, case.p_mag, p_lse, s_lse, g, device)
    suffix = _partial_values(case, case.s_mag, s_lse, p_lse, g, device)
    if case.P is not None:  # not to be read: NaN there shows if it is
        prefix[case.P :] = math.nan
        p_lse[:, case.P :] = math.nan
    for name, values in (
        ("prefix_output", prefix),
        ("suffix_output", suffix),
        ("prefix_lse", p_lse),
        ("suffix_lse", s_lse),
    ):
        _write(views[name], buffers, values)
    if "scale" in views:
        _write(views["scale"], buffers, torch.full(views["scale"].shape, case.scale))
    return buffers


def _write(view: View, buffers: dict[str, torch.Tensor], values: torch.Tensor) -> None:
    """Store logical ``values`` through ``view``; a broadcast (stride-0) dimension takes
    its first index."""
    pairs = zip(view.shape, view.strides, strict=True)
    shape = tuple(1 if s == 0 and n > 0 else n for n, s in pairs)
    index = tuple(slice(0, n) for n in shape)
    target = buffers[view.buffer].as_strided(shape, view.strides, view.offset)
    target.copy_(values.to(target.device)[index].to(view.dtype))


# ---------------------------------------------------------------------------
# Calls.


def _call(pkg, case: Case, views: dict[str, View], buffers, backend: str):
    """Call ``pkg``'s public API for the case; returns merge's result (or None)."""
    t = {name: v.of(buffers) for name, v in views.items()}
    scale = t.get("scale")
    kwargs = {"lse_base": case.lse_base, "backend": backend}
    if case.api == "merge":
        quant = pkg.FP8Static(scale) if case.out_dtype == "fp8" else None
        out_dtype = None if case.out_dtype in ("fp8", "none") else DTYPES[case.out_dtype]
        return pkg.merge(
            [t["prefix_output"], t["suffix_output"]],
            [t["prefix_lse"], t["suffix_lse"]],
            quant=quant,
            out_dtype=out_dtype,
            return_lse=bool(case.out_lse),
            prefill_tokens_with_context=case.P,
            **kwargs,
        )
    args = [
        t["output"],
        t["prefix_output"],
        t["prefix_lse"],
        t["suffix_output"],
        t["suffix_lse"],
        t.get("output_lse"),
        case.P,
        scale,
    ]
    kind = case.invalid
    if kind == "no_scale":
        args[7] = None
    elif kind == "extra_scale":
        args[7] = torch.ones(1, device=args[0].device)
    elif kind == "scale_2_elements":
        args[7] = torch.ones(2, device=args[0].device)
    elif kind == "P_out_of_range":
        args[6] = case.T + 1
    elif kind == "lse_fp16":
        args[2] = args[2].half()
    elif kind == "partial_fp64":
        args[3] = args[3].double()
    elif kind == "alias_other_strides":
        # prefix_output's memory in head-major order: in place needs the very same view
        args[0] = args[1].as_strided(args[1].shape, (case.D, case.T * case.D, 1))
    elif kind == "output_overlaps_itself":
        args[0] = args[0][:1].expand(max(case.T, 2), *args[0].shape[1:])
    elif kind == "lse_as_TH":
        args[2] = args[2].t()
    elif kind == "lse_base_10":
        kwargs["lse_base"] = 10
    elif kind == "unknown_backend":
        kwargs["backend"] = "fastest"
    pkg.merge_attn_states(*args, **kwargs)
    return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as same-size integers, contiguous (no float arithmetic)."""
    return t.view(_BITS[t.element_size()]).contiguous()


@dataclass
class Outcome:
    """What one version's call did: its written state, or the exception it raised."""

    raised: str = ""  # exception type name
    message: str = ""
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    layouts: dict[str, tuple] = dataclasses.field(default_factory=dict)


def _fatal_device_error(e: BaseException) -> bool:
    text = str(e)
    return "CUDA error" in text or "illegal memory access" in text or "device-side" in text


def run_version(pkg, case: Case, views, buffers, backend: str, device) -> Outcome:
    """One version's call on fresh copies of the case's buffers."""
    mine = {name: b.clone() for name, b in buffers.items()}
    outcome = Outcome()
    try:
        with versions.use_interpreter_fix(pkg):
            result = _call(pkg, case, views, mine, backend)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # asynchronous errors belong to this call
    except Exception as e:
        if _fatal_device_error(e):
            raise
        outcome.raised, outcome.message = type(e).__name__, str(e).splitlines()[0][:200]
        result = None
    for name, b in mine.items():
        outcome.tensors[f"buffer {name}"] = _bits(b)
    if result is not None:
        for field in ("output", "lse"):
            value = getattr(result, field)
            key = f"result.{field}"
            if value is None:
                outcome.layouts[key] = None
                continue
            outcome.layouts[key] = (tuple(value.shape), value.stride(), str(value.dtype))
            outcome.tensors[key] = _bits(value)
    return outcome


NAN_ONLY = "(NaN vs NaN only: sign or payload)"


def _first_difference(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> str:
    if a.shape != b.shape:
        return f"sizes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a != b).flatten().nonzero().flatten()
    n = diff.numel()
    i = int(diff[0])
    x, y = a.flatten()[i], b.flatten()[i]
    mask = (1 << (8 * a.element_size())) - 1
    shown = f"{int(x) & mask:#x} vs {int(y) & mask:#x}"
    if dtype is not None and dtype.is_floating_point:
        with contextlib.suppress(RuntimeError, TypeError):  # a dtype torch cannot widen here
            shown += f" ({x.view(dtype).float().item()!r} vs {y.view(dtype).float().item()!r})"
            xs = a.flatten()[diff].view(dtype).float()
            ys = b.flatten()[diff].view(dtype).float()
            if bool((xs.isnan() & ys.isnan()).all()):
                shown += f" {NAN_ONLY}"
    return f"{n} elements differ, first at flat index {i}: {shown}"


def compare(base: Outcome, new: Outcome, views: dict[str, View]) -> list[str]:
    """The differences between two outcomes (empty: bit-identical)."""
    if base.raised != new.raised:
        return [f"base {'raised ' + base.raised if base.raised else 'returned'}, new "
                f"{'raised ' + new.raised if new.raised else 'returned'}"
                f" ({base.message or new.message})"]  # fmt: skip
    problems = []
    if base.layouts != new.layouts:
        problems.append(f"result layouts differ: {base.layouts} vs {new.layouts}")
    dtypes = {f"buffer {v.buffer}": v.dtype for v in views.values()}
    for key, a in base.tensors.items():
        b = new.tensors.get(key)
        if b is None:
            problems.append(f"{key}: missing in new")
        elif a.shape != b.shape or not torch.equal(a, b):
            dtype = dtypes.get(key)
            if key.startswith("result.") and base.layouts.get(key):
                dtype = getattr(torch, base.layouts[key][2].replace("torch.", ""))
            problems.append(f"{key}: {_first_difference(a, b, dtype)}")
    return problems


# ---------------------------------------------------------------------------
# Driver.


def parse_ids(text: str) -> list[int]:
    ids = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        ids.extend(range(int(lo), int(hi or lo) + 1))
    return ids


def select_cases(args) -> list[Case]:
    ids = parse_ids(args.case) if args.case else range(args.cases)
    index, count = args.shard
    ids = [i for i in ids if i % count == index]
    if args.worker:
        k, n = args.worker
        ids = ids[k::n]
    return [make_case(i, args.seed, args.profile) for i in ids]


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    index, count = int(index), int(count)
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard must be i/n with 0 <= i < n, got {text}")
    return index, count


def parse_args(argv=None) -> argparse.Namespace:
    has_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description="Compare attnmerge outputs bit for bit between two git revisions.",
    )
    p.add_argument("--cases", type=int, default=2000, help="corpus size (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--case", help="only these case ids, e.g. 17,40-45")
    p.add_argument("--shard", type=_shard, default=(0, 1), help="i/n: every n-th case from i")
    p.add_argument("--list", action="store_true", help="print the corpus and exit")
    p.add_argument(
        "--backends",
        default="torch,triton,cuda" if has_gpu else "torch,triton",
        help="comma-separated (default: torch,triton,cuda on a GPU, torch,triton on a CPU)",
    )
    p.add_argument("--device", default="cuda" if has_gpu else "cpu")
    p.add_argument(
        "--profile",
        choices=("cpu", "gpu"),
        help="corpus sizes (default: gpu on a CUDA device, else cpu)",
    )
    p.add_argument("--base-rev", default=versions.DEFAULT_BASE_REV, help="default c9a2f13")
    p.add_argument("--new-rev", help="a revision instead of the working tree")
    p.add_argument("--repo", default=str(versions.REPO_ROOT), help="git repository")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes (default: the CPU count on a CPU, min(8, CPUs / 2) on a GPU)",
    )
    p.add_argument(
        "--prebuild",
        choices=("auto", "yes", "no"),
        default="auto",
        help="compile both versions' CUDA kernels in parallel first (auto: when the cuda "
        "backend runs over more than 200 cases)",
    )
    p.add_argument("--report-json", help="write the results as JSON here")
    p.add_argument("--max-shown", type=int, default=20, help="mismatches printed per backend")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case")
    p.add_argument("--worker", type=_shard, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.profile = args.profile or ("gpu" if args.device.startswith("cuda") else "cpu")
    args.backends = [b for b in args.backends.split(",") if b]
    if args.jobs is None:
        cpus = os.cpu_count() or 1
        # On a GPU, workers mostly compile Triton kernels (a new one for most cases).
        args.jobs = max(1, min(8, cpus // 2)) if args.device.startswith("cuda") else cpus
    return args


def _prebuild(pkg, args, n_cases: int) -> None:
    """Fill the CUDA kernel cache for every dtype pair and head size of the corpus, in
    parallel (``attnmerge build``): one-by-one first-use builds would take minutes."""
    if args.prebuild == "no" or "cuda" not in args.backends:
        return
    if args.prebuild == "auto" and n_cases <= 200:
        return
    sizes = ",".join(map(str, HEAD_SIZES))
    start = time.perf_counter()
    try:
        code = pkg.cli.main(["build", "--mixed-dtypes", "--head-sizes", sizes])
    except (Exception, SystemExit) as e:  # the kernels then build on first use
        print(f"{pkg.__name__}: prebuild failed ({e}); kernels build on first use")
        return
    print(f"{pkg.__name__}: prebuild exit {code} in {time.perf_counter() - start:.0f} s")


def run_cases(args) -> dict:
    """Run the selected cases in this process; returns the report."""
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, args.jobs)))
    versions.capture_unpatched_interpreter()
    base = versions.load_base(args.base_rev, args.repo)
    new = versions.load_new(args.new_rev, args.repo)
    cases = select_cases(args)
    if not args.worker:
        _prebuild(base, args, len(cases))
        _prebuild(new, args, len(cases))
    report = {
        "base": versions.describe(base),
        "new": versions.describe(new),
        "backends": {
            b: {"cases": 0, "identical": 0, "raised": {}, "mismatches": [], "seconds": 0.0}
            for b in args.backends
        },
    }
    start = time.perf_counter()
    last = start
    for n, case in enumerate(cases, 1):
        views = views_of(case)
        try:
            buffers = make_buffers(case, views, device)
        except Exception as e:
            raise RuntimeError(f"building case {case.id} failed: {describe(case)}") from e
        for backend in args.backends:
            entry = report["backends"][backend]
            t0 = time.perf_counter()
            try:
                outcomes = [run_version(m, case, views, buffers, backend, device)
                            for m in (base, new)]  # fmt: skip
            except Exception as e:
                raise RuntimeError(
                    f"case {case.id} ({backend}) failed the device: {describe(case)}"
                ) from e
            entry["seconds"] += time.perf_counter() - t0
            entry["cases"] += 1
            problems = compare(*outcomes, views)
            if problems:
                entry["mismatches"].append(
                    {"id": case.id, "case": describe(case), "problems": problems}
                )
                print(f"MISMATCH {backend} {describe(case)}\n    " + "\n    ".join(problems))
            elif outcomes[0].raised:
                raised = entry["raised"]
                raised[outcomes[0].raised] = raised.get(outcomes[0].raised, 0) + 1
                if args.verbose:
                    print(f"  raised {backend} {outcomes[0].raised}: {outcomes[0].message}")
            else:
                entry["identical"] += 1
        if args.verbose:
            print(f"ok {describe(case)}")
        now = time.perf_counter()
        if now - last > 30 and not args.verbose:
            last = now
            where = f"worker {args.worker[0]}: " if args.worker else ""
            print(f"  {where}{n}/{len(cases)} cases, {now - start:.0f} s", flush=True)
    report["seconds"] = time.perf_counter() - start
    report["interpreter_fixes_identical"] = versions.interpreter_fixes_identical(base, new)
    return report


def run_workers(args, argv) -> dict:
    """Split the cases over ``args.jobs`` processes of this script; merge their reports."""
    with tempfile.TemporaryDirectory(prefix="compare_outputs-") as tmp:
        procs = []
        for k in range(args.jobs):
            path = Path(tmp) / f"worker{k}.json"
            cmd = [sys.executable, __file__, *argv, "--worker", f"{k}/{args.jobs}"]
            cmd += ["--report-json", str(path)]
            procs.append((subprocess.Popen(cmd), path))
        reports = []
        for k, (proc, path) in enumerate(procs):
            if proc.wait() != 0 or not path.exists():
                raise RuntimeError(f"worker {k} failed with exit {proc.returncode}")
            reports.append(json.loads(path.read_text()))
    merged = {key: reports[0][key] for key in ("base", "new", "interpreter_fixes_identical")}
    merged["seconds"] = max(r["seconds"] for r in reports)
    merged["backends"] = {}
    for name in args.backends:
        parts = [r["backends"][name] for r in reports]
        raised = Counter()
        for part in parts:
            raised.update(part["raised"])
        merged["backends"][name] = {
            "cases": sum(p["cases"] for p in parts),
            "identical": sum(p["identical"] for p in parts),
            "raised": dict(raised),
            "mismatches": sorted(
                (m for p in parts for m in p["mismatches"]), key=lambda m: m["id"]
            ),
            "seconds": sum(p["seconds"] for p in parts),
        }
    return merged


def print_summary(report: dict, args, wall: float) -> int:
    """Print the per-backend results; return the exit code."""
    print(f"\nbase: {report['base']}\nnew:  {report['new']}")
    print(
        f"corpus: seed {args.seed}, profile {args.profile}, {args.cases} cases, "
        f"shard {args.shard[0]}/{args.shard[1]}, device {args.device}, {args.jobs} job(s)"
    )
    if report.get("interpreter_fixes_identical") is False:
        print("note: the two versions' Triton interpreter fixes differ (each ran with its own)")
    failed = False
    for name, r in report["backends"].items():
        raised = ", ".join(f"{k} {v}" for k, v in sorted(r["raised"].items())) or "none"
        mismatches = r["mismatches"]
        failed |= bool(mismatches)
        nan_only = sum(all(NAN_ONLY in p for p in m["problems"]) for m in mismatches)
        print(
            f"{name:>7}: {r['cases']} cases, {r['identical']} bit-identical, raised alike "
            f"{sum(r['raised'].values())} ({raised}), MISMATCHES {len(mismatches)}"
            + (f" ({nan_only} of them NaN sign/payload only)" if nan_only else "")
            + f" [{r['seconds']:.0f} s]"
        )
        for m in mismatches[: args.max_shown]:
            print(f"    case {m['id']}: {m['case']}\n        " + "\n        ".join(m["problems"]))
        if len(mismatches) > args.max_shown:
            print(f"    ... {len(mismatches) - args.max_shown} more (--report-json has all)")
    print(f"wall time {wall:.0f} s")
    print("FAIL: outputs differ" if failed else "PASS: every output bit-identical")
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list:
        for case in select_cases(args):
            print(describe(case))
        return 0
    if args.device == "cpu" and "triton" in args.backends:
        # Before either version imports Triton (they do so on first use).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        print("warning: TRITON_INTERPRET=1 on a GPU run: Triton kernels run interpreted")
    # numpy's overflow warnings from inside Triton's interpreter (inf and NaN are inputs here)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
    start = time.perf_counter()
    if args.jobs > 1 and not args.worker:
        if "cuda" in args.backends:  # build once, here, rather than in every worker
            versions.capture_unpatched_interpreter()
            for pkg in (
                versions.load_base(args.base_rev, args.repo),
                versions.load_new(args.new_rev, args.repo),
            ):
                _prebuild(pkg, args, len(select_cases(args)))
        report = run_workers(args, argv)
    else:
        report = run_cases(args)
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(report, indent=1))
    if args.worker:
        return 0
    return print_summary(report, args, time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
