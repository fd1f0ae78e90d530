"""Dynamic FP8 output formats fused into the merge, against the same merge followed by a
separate quantisation kernel and against the static FP8 store.

DeepSeek-like shapes by default: H in 128/64/32/16 heads x D = 128 x T in 1..8192 tokens,
bf16 partials; K = 2 as two partials in a list (attnmerge's two-partial kernel), K = 4
and 8 stacked ``[K, T, H, D]`` with LSEs ``[K, H, T]``. The output formats (``--formats``):

* ``group-row``: ``FP8PerTokenGroup(128)``, float32 scales ``[T, G]`` row-major;
* ``group-tma``: ``FP8PerTokenGroup(128, layout="col_major_tma")``;
* ``ue8m0-tma``: ``FP8PerTokenGroup(128, ue8m0=True, layout="col_major_tma")``;
* ``ue8m0-packed``: ``FP8PerTokenGroup(128, ue8m0=True, layout="ue8m0_packed")``;
* ``token``: ``FP8PerToken()``, one float32 scale per token.

Providers (``--providers``), each a row ``provider:format`` of the CSV; every format's
scales are allocated before timing, so that each call can be captured in a CUDA graph:

* ``cuda``, ``triton``: ``attnmerge.merge(..., quant=format, backend=...)``, the fused
  store. A backend that cannot store a format raises ``BackendError``, and the row keeps
  that error instead of a time (an explicit backend never falls back to torch);
* ``cuda+quant``: the ``cuda`` merge into the partials' dtype, then this module's Triton
  quantiser (:func:`quantize_into`: one program per token group, per token for
  ``token``), bit-identical to the format's torch reference quantiser of that result;
* ``cuda+compiled``: the same merge, then the format's torch reference quantiser
  compiled by ``torch.compile`` (not a default: Inductor compiles it per format and again
  for T = 1, time the default grid does not have);
* ``static``: the ``cuda`` merge into ``FP8Static(0.1)`` at the same shape (row
  ``static``), the yardstick.

Inputs, timing (CUDA graphs of ``--rep-ms`` of calls, 2 here, replayed 10 times), bytes
(the scales not counted: at most 1/32 of the output), the table and the CSV (rewritten at
each tenth of the cases, so a time limit keeps what was measured) are ``attnmerge
bench``'s (:mod:`attnmerge.bench`). Before the run: which backend serves each format
(:func:`served`); after it, the summary (:func:`summary`): per format, the geometric mean
speed-up of the fused ``cuda`` store over the merge + separate quantisation (the faster of
``cuda+quant`` and ``cuda+compiled`` per shape; target >= 1.3x) and the fused time over
``static``'s per shape (target: group formats within 10% at every shape, ``token`` within
25% at T x H >= 32768), with the shapes that miss. From the repository root, on a GPU::

    python -m benchmarks.formats --csv formats.csv
    python -m benchmarks.formats --formats token,ue8m0-packed --partials 2 --tokens 1,8192
    python -m benchmarks.formats --summary formats.csv      # no GPU needed
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import textwrap
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from attnmerge import FP8PerToken, FP8PerTokenGroup, FP8Static, bench, dispatch, merge
from attnmerge.formats import FP8_E4M3_MAX, FP8_GROUP_EPS, FP8_MIN_TOKEN_SCALE, OutputFormat

try:
    import triton
    import triton.language as tl
except ImportError:  # --summary reads a CSV without Triton
    triton = None

#: The formats by name: templates without tensors (each case allocates its scales).
FORMATS: dict[str, OutputFormat] = {
    "group-row": FP8PerTokenGroup(128),
    "group-tma": FP8PerTokenGroup(128, layout="col_major_tma"),
    "ue8m0-tma": FP8PerTokenGroup(128, ue8m0=True, layout="col_major_tma"),
    "ue8m0-packed": FP8PerTokenGroup(128, ue8m0=True, layout="ue8m0_packed"),
    "token": FP8PerToken(),
}
PROVIDERS = ("static", "cuda", "triton", "cuda+quant", "cuda+compiled")
DEFAULT_PROVIDERS = PROVIDERS[:-1]
SEPARATE = ("cuda+quant", "cuda+compiled")  # the merge, then a quantisation kernel
BACKEND = "cuda"  # of the static and separate providers' merges (tests use torch)
# The default grid: 96 shapes x 16 cases, meant to take about 4 minutes on an H100.
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 8192)
HEADS = (128, 64, 32, 16)
PARTIALS = (2, 4, 8)
REP_MS = 2
# The targets of the summary.
SPEEDUP_TARGET = 1.3  # geometric mean, fused cuda over the merge + separate quantisation
GROUP_STATIC_TARGET = 1.10  # group formats' time / static's, at every shape
TOKEN_STATIC_TARGET = 1.25  # per-token's time / static's, at T x H >= TOKEN_LARGE_ROWS
TOKEN_LARGE_ROWS = 32768
#: Token groups per program of the group quantiser (packed UE8M0 scales always take 4,
#: the four bytes of one int32 word).
GROUPS_PER_PROGRAM = 8
#: Values per step of the per-token quantiser's loops over a token's H * D values.
TOKEN_BLOCK = 4096


# ---------------------------------------------------------------------------
# The separate quantisers.

if triton is not None:
    # Globals a @triton.jit function reads must be constexpr objects.
    _FP8_MAX = tl.constexpr(FP8_E4M3_MAX)
    _GROUP_EPS = tl.constexpr(FP8_GROUP_EPS)
    _MIN_TOKEN_SCALE = tl.constexpr(FP8_MIN_TOKEN_SCALE)

    @triton.jit
    def _bit_or(a, b):
        return a | b

    @triton.jit
    def _group_quant_kernel(
        x_ptr,
        q_ptr,
        scales_ptr,
        num_tokens,
        stride_x,
        stride_q,
        stride_t,
        stride_g,
        GROUPS: tl.constexpr,
        GROUP: tl.constexpr,
        PER_PROGRAM: tl.constexpr,
        UE8M0: tl.constexpr,
        PACKED: tl.constexpr,
    ):
        # Program (t, c): groups c * PER_PROGRAM ... of token t, one row of GROUP values
        # each; rows t >= num_tokens only zero the padding of packed scales.
        tok = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        group = block * PER_PROGRAM + tl.arange(0, PER_PROGRAM)
        ok = (group < GROUPS) & (tok < num_tokens)
        offs = group[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        x = tl.load(x_ptr + tok * stride_x + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        # A NaN makes its group's absmax NaN (the GPU's maximum drops NaN: a flag instead).
        has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
        amax = tl.where(has_nan, float("nan"), tl.maximum(tl.max(tl.abs(x), axis=1), _GROUP_EPS))
        # IEEE divisions, as the reference's (Triton's "/" is an approximation).
        scale = tl.math.div_rn(amax, tl.full([], _FP8_MAX, tl.float32))
        if UE8M0:
            # 2^ceil(log2(max(s, eps))), exactly: the exponent up by one where the mantissa
            # is not 0 (+inf keeps its bits; NaN stays NaN).
            bits = tl.maximum(scale, _GROUP_EPS).to(tl.int32, bitcast=True)
            exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
            rounded = (tl.minimum(exponent, 255) << 23).to(tl.float32, bitcast=True)
            scale = tl.where(scale != scale, scale, rounded)
        inv_scale = tl.math.div_rn(tl.full([], 1.0, tl.float32), scale)
        # The conversion rounds to nearest even, saturates to +-448 and keeps NaN.
        q = (x * inv_scale[:, None]).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + tok * stride_q + offs, q, mask=ok[:, None])
        if PACKED:
            # Byte j of word [t, c] is group 4c + j's biased exponent: the scale's exponent
            # field (0xFF for +inf and NaN), 0 past GROUPS and in the padding rows.
            byte = tl.where(ok, (scale.to(tl.int32, bitcast=True) >> 23) & 0xFF, 0)
            word = tl.reduce(byte << (8 * (group % 4)), 0, _bit_or)
            # Padding rows of every column but the last are 0, as the reference stores them.
            store = (tok < num_tokens) | (block < (GROUPS - 1) // 4)
            tl.store(scales_ptr + tok * stride_t + block * stride_g, word, mask=store)
        else:
            tl.store(scales_ptr + tok * stride_t + group * stride_g, scale, mask=ok)

    @triton.jit
    def _token_quant_kernel(
        x_ptr,
        q_ptr,
        scales_ptr,
        ub_ptr,
        stride_x,
        stride_q,
        stride_s,
        WIDTH: tl.constexpr,
        BLOCK: tl.constexpr,
        HAS_UB: tl.constexpr,
    ):
        # Program t: the absmax of token t's WIDTH values, then their quantisation (a
        # second read, mostly from L2).
        tok = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        x_row = x_ptr + tok * stride_x
        amax = tl.zeros([BLOCK], tl.float32)
        nan = tl.zeros([BLOCK], tl.int32)
        for start in range(0, WIDTH, BLOCK):
            x = tl.load(x_row + start + cols, mask=start + cols < WIDTH, other=0.0)
            x = x.to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
            nan = nan | (x != x).to(tl.int32)
        # A NaN makes the absmax NaN (the GPU's maximum drops NaN: a flag instead).
        a = tl.where(tl.max(nan, axis=0) > 0, float("nan"), tl.max(amax, axis=0))
        if HAS_UB:
            # torch.minimum: NaN if either is NaN.
            ub = tl.load(ub_ptr).to(tl.float32)
            a = tl.where(a != a, a, tl.where(ub != ub, ub, tl.minimum(a, ub)))
        scale = tl.math.div_rn(a, tl.full([], _FP8_MAX, tl.float32))
        scale = tl.where(scale != scale, scale, tl.maximum(scale, _MIN_TOKEN_SCALE))
        tl.store(scales_ptr + tok * stride_s, scale)
        q_row = q_ptr + tok * stride_q
        for start in range(0, WIDTH, BLOCK):
            ok = start + cols < WIDTH
            x = tl.load(x_row + start + cols, mask=ok, other=0.0).to(tl.float32)
            # An IEEE division per value, as the reference's (no reciprocal).
            q = tl.math.div_rn(x, tl.zeros([BLOCK], tl.float32) + scale)
            tl.store(q_row + start + cols, q.to(q_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _prepare_triton() -> None:
    if triton is None:
        raise ImportError("the Triton quantiser needs triton")
    from attnmerge.triton import interpreter_fix, interpreting

    if interpreting():  # the interpreter's own float8 conversion rounds ties wrongly
        interpreter_fix.install()


def _rows(t: torch.Tensor, name: str) -> int:
    """The token stride of ``t [T, H, D]``, whose H * D values per token are contiguous."""
    _, h, d = t.shape
    if (d > 1 and t.stride(2) != 1) or (h > 1 and t.stride(1) != d):
        raise ValueError(f"{name} must be contiguous in its last two dimensions")
    return t.stride(0)


def quantize_into(
    fmt: OutputFormat, x: torch.Tensor, out: torch.Tensor, groups_per_program: int | None = None
) -> None:
    """Store ``x [T, H, D]`` in ``fmt`` with the Triton quantiser: the FP8 values into
    ``out`` and the scales into ``fmt.scales`` (padding of packed scales included), the
    same bits as ``fmt.store_reference(x, out)`` stores. ``x`` and ``out`` are contiguous
    per token; ``fmt`` is a ``FP8PerTokenGroup`` or ``FP8PerToken`` with scales and no
    amax."""
    _prepare_triton()
    if not isinstance(fmt, (FP8PerTokenGroup, FP8PerToken)):
        raise TypeError(f"no Triton quantiser for {type(fmt).__name__}")
    if fmt.scales is None or fmt.amax is not None:
        raise ValueError("the Triton quantiser stores formats with scales and without amax")
    tokens, heads, head_size = x.shape
    if out.shape != x.shape or out.dtype != fmt.dtype:
        raise ValueError(f"out must be {fmt.dtype} {tuple(x.shape)}")
    fmt.check(out)
    stride_x, stride_q = _rows(x, "x"), _rows(out, "out")
    if tokens == 0:
        return
    scales = fmt.scales
    if isinstance(fmt, FP8PerTokenGroup):
        groups = fmt.groups(heads, head_size)
        packed = fmt.layout == "ue8m0_packed"
        per = 4 if packed else groups_per_program or GROUPS_PER_PROGRAM
        if per & (per - 1):
            raise ValueError(f"groups_per_program must be a power of two, got {per}")
        # Packed: one program per int32 word, and per padding row of its column.
        rows = max(tokens, scales.stride(1)) if packed and scales.shape[1] > 1 else tokens
        _group_quant_kernel[(rows, triton.cdiv(groups, per))](
            x,
            out,
            scales,
            tokens,
            stride_x,
            stride_q,
            *scales.stride(),
            GROUPS=groups,
            GROUP=fmt.group_size,
            PER_PROGRAM=per,
            UE8M0=fmt.ue8m0,
            PACKED=packed,
            num_warps=min(max(per * fmt.group_size // 256, 1), 8),
        )
    else:
        width = heads * head_size
        block = min(triton.next_power_of_2(width), TOKEN_BLOCK)
        ub = fmt.scale_ub
        _token_quant_kernel[(tokens,)](
            x,
            out,
            scales,
            scales if ub is None else ub,
            stride_x,
            stride_q,
            scales.stride(0),
            WIDTH=width,
            BLOCK=block,
            HAS_UB=ub is not None,
            num_warps=min(max(block // 256, 1), 8),
        )


def reference_store(template: OutputFormat, out: torch.Tensor, scales: torch.Tensor, x):
    """The format's torch reference quantiser of ``x`` into ``out`` and ``scales`` (their
    padding, if any, left as it is)."""
    q, s = template.quantize_with_scales(x)
    out.copy_(q)
    scales.copy_(s.reshape(scales.shape))


@functools.cache
def _compiled_store(name: str) -> Callable[..., None]:
    # Every format's compiles count against one limit (one function): room for them all.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 16 * len(FORMATS))
    # dynamic: one compile per format and T = 1, not one per shape
    compiled = torch.compile(reference_store, dynamic=True)
    return functools.partial(compiled, FORMATS[name])


# ---------------------------------------------------------------------------
# The providers.


def _partials(s: dict) -> tuple:
    """``merge``'s partials of an input set: two in a list, or stacked or packed."""
    if "outputs" in s:
        return s["outputs"], s["lses"], s["indptr"]
    return [s["prefix_output"], s["suffix_output"]], [s["prefix_lse"], s["suffix_lse"]], None


def merge_call(s: dict, out: torch.Tensor, quant, backend: str) -> Callable[[], object]:
    """One ``attnmerge.merge`` of input set ``s`` into ``out`` (and its output LSE)."""
    outputs, lses, indptr = _partials(s)
    kwargs = {"quant": quant, "out": out, "out_lse": s["output_lse"], "indptr": indptr}
    return functools.partial(merge, outputs, lses, backend=backend, **kwargs)


def with_scales(name: str, out: torch.Tensor) -> OutputFormat:
    """Format ``name`` with scales allocated for ``out [T, H, D]``."""
    return FORMATS[name].with_scales(*out.shape, out.device)


def _static(s: dict, scale: torch.Tensor):
    return merge_call(s, s["output"], FP8Static(scale), BACKEND)


def _fused(backend: str, name: str):
    def make(s: dict, scale):
        return merge_call(s, s["output"], with_scales(name, s["output"]), backend)

    return make


def _separate(provider: str, name: str):
    def make(s: dict, scale):
        out = s["output"]
        fmt = with_scales(name, out)
        tmp = torch.empty(out.shape, dtype=_partials(s)[0][0].dtype, device=out.device)
        first = merge_call(s, tmp, None, BACKEND)
        if provider == "cuda+quant":
            second = functools.partial(quantize_into, fmt, tmp, out)
        else:
            fmt.scales.untyped_storage().fill_(0)  # packed: zero padding, as the quantisers
            second = functools.partial(_compiled_store(name), out, fmt.scales, tmp)

        def call() -> None:
            first()
            second()

        return call

    return make


def providers() -> dict[str, bench.CallFactory]:
    """The call factories of every ``provider:format`` row (and ``static``)."""
    calls: dict[str, bench.CallFactory] = {"static": _static}
    for name in FORMATS:
        for backend in ("cuda", "triton"):
            calls[f"{backend}:{name}"] = _fused(backend, name)
        for provider in SEPARATE:
            calls[f"{provider}:{name}"] = _separate(provider, name)
    return calls


def build_cases(args: argparse.Namespace) -> list[bench.Case]:
    """``attnmerge bench``'s grid of the options (FP8 out), K = 2 as two separate partials;
    per shape ``static``, then each format's providers."""
    options = {**vars(args), "providers": ("static",), "fp8": "on"}
    shapes = bench.build_cases(argparse.Namespace(**options))
    cases = []
    for shape in shapes:
        if shape.partials == 2 and not shape.variable:
            shape = dataclasses.replace(shape, partials=None)
        cases += [shape] if "static" in args.providers else []
        cases += [
            dataclasses.replace(shape, provider=f"{provider}:{name}")
            for name in args.formats
            for provider in args.providers
            if provider != "static"
        ]
    return cases


def served(
    names: Sequence[str],
    forms: Sequence[tuple[int | None, bool]],
    head_size: int = 128,
    device: torch.device | str = "cuda",
) -> dict[tuple[str, int | None, bool], dict[str, str | None]]:
    """Per format and form (K, None for two separate partials; variable K), per backend
    in ``auto``'s order: None where it stores the format (a small merge ran), else why not
    ("unsupported: " and dispatch's reason, or "failed: " and the error)."""
    result = {}
    for name in names:
        for k, variable in forms:
            case = bench.Case("bf16", True, False, head_size, 4, 2, "probe", k, variable)
            (s,) = bench.make_input_sets(case, 1, device)
            reasons: dict[str, str | None] = {}
            for backend in dispatch.AUTO_ORDER:
                try:
                    merge_call(s, s["output"], with_scales(name, s["output"]), backend)()
                    reasons[backend] = None
                except dispatch.BackendError as e:
                    reasons[backend] = "unsupported: " + str(e).partition(": ")[2]
                except Exception as e:  # the run records it too, at every case
                    reasons[backend] = f"failed: {type(e).__name__}: {e}".splitlines()[0]
            result[name, k, variable] = reasons
    return result


def served_report(table: dict) -> str:
    """Which backend ``auto`` takes for each format and K, and why not the others."""
    lines = ["backends per format (auto takes the first that stores it):"]
    for (name, k, variable), reasons in table.items():
        auto = next((b for b, why in reasons.items() if why is None), "none")
        form = "K=2 (two partials)" if k is None else f"K={k}{' variable' if variable else ''}"
        lines.append(f"  {name:<13} {form:<18} auto -> {auto}")
        lines += [f"      {b}: {why}" for b, why in reasons.items() if why is not None]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The summary.


@dataclasses.dataclass
class Results:
    """A CSV's times by (provider, format) then shape (dtype, D, variable, output LSE, K,
    T, H), its errors by (provider, format), and its run info."""

    times: dict
    errors: dict
    info: bench.RunInfo


def load(path: str | Path) -> Results:
    records, info = bench.read_csv(path)
    times: dict = defaultdict(dict)
    errors: dict = defaultdict(list)
    for r in records:
        provider, _, name = r.provider.partition(":")
        shape = (r.dtype, r.head_size, r.variable, r.output_lse, r.partials or 2)
        shape += (r.tokens, r.heads)
        if r.error or not r.median_us > 0:
            errors[provider, name].append(r.error or "no time")
        else:
            times[provider, name][shape] = r.median_us
    return Results(dict(times), dict(errors), info)


def geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(map(math.log, xs)) / len(xs))


def _label(shape: tuple, varying: set[int]) -> str:
    names = ("", "D=", "var=", "lse=", "K=", "T=", "H=")
    return ",".join(f"{names[i]}{shape[i]}" for i in sorted(varying | {4, 5, 6}))


def _shapes_line(label: str, ratios: dict, varying: set[int], highest_first: bool) -> list[str]:
    """``label`` and the shapes of ``ratios`` with their ratios, worst first, wrapped."""
    order = sorted(ratios.items(), key=lambda kv: (-kv[1] if highest_first else kv[1], kv[0]))
    text = " ".join(f"{_label(k, varying)}:{v:.2f}" for k, v in order)
    return textwrap.wrap(f"{label} {text}", 100, initial_indent="    ", subsequent_indent="      ")


def _ratios(num: dict, den: dict) -> dict:
    return {k: num[k] / den[k] for k in num if k in den}


def _errors_line(provider: str, errors: list[str]) -> str:
    kind = "unsupported" if all(e.startswith("BackendError") for e in errors) else "failed"
    return f"  {provider}: {kind} at {len(errors)} shapes: {errors[0]}"


def separate_times(res: Results, name: str) -> tuple[dict, dict]:
    """Per shape, the faster of the separate providers' times for format ``name``, and how
    many shapes each provider was the faster at."""
    best: dict = {}
    for provider in SEPARATE:
        for shape, us in res.times.get((provider, name), {}).items():
            if shape not in best or us < best[shape][0]:
                best[shape] = (us, provider)
    counts = defaultdict(int)
    for _, provider in best.values():
        counts[provider] += 1
    return {shape: us for shape, (us, _) in best.items()}, dict(counts)


def static_target(name: str) -> tuple[float, Callable[[tuple], bool], str]:
    """The fused / static target of format ``name``, the shapes it applies to, and those
    in words."""
    if isinstance(FORMATS.get(name), FP8PerToken):
        return (
            TOKEN_STATIC_TARGET,
            lambda k: k[5] * k[6] >= TOKEN_LARGE_ROWS,
            (f"T x H >= {TOKEN_LARGE_ROWS}"),
        )
    return GROUP_STATIC_TARGET, lambda k: True, "every shape"


def summary(path: str | Path) -> str:
    """The summary of a CSV of this benchmark (see the module's docstring); its last line
    names the targets missed."""
    res = load(path)
    static = res.times.get(("static", ""), {})
    every = {shape for rows in res.times.values() for shape in rows}
    # dtype, D, variable K or output LSE where they vary; K, T, H always
    varying = {i for i in range(4) if len({shape[i] for shape in every}) > 1}
    info = res.info
    lines = [
        f"formats summary of {Path(path).name}: {info.gpu}, git {info.git_sha}, "
        f"{len(every)} shapes; times are medians of CUDA-graph replays",
        f"targets: fused cuda >= {SPEEDUP_TARGET}x faster than the merge + separate "
        f"quantisation (geometric mean); fused / static <= {GROUP_STATIC_TARGET} at every "
        f"shape (group formats), <= {TOKEN_STATIC_TARGET} at T x H >= {TOKEN_LARGE_ROWS} "
        "(token)",
    ]
    if ("static", "") in res.errors:
        lines.append(_errors_line("static", res.errors["static", ""]))
    seen = {key[1] for key in (*res.times, *res.errors)} - {""}
    names = [n for n in FORMATS if n in seen] + sorted(seen - set(FORMATS))
    missed = []
    for name in names:
        lines.append(f"{name}:")
        lines += [
            _errors_line(p, res.errors[p, name]) for p in PROVIDERS if (p, name) in res.errors
        ]
        separate, faster = separate_times(res, name)
        if not res.times.get(("cuda", name)):
            missed.append(f"{name} (no cuda times)")
        for provider in ("cuda", "triton"):
            fused = res.times.get((provider, name), {})
            speedups = _ratios(separate, fused)
            if speedups:
                mean = geomean(speedups.values())
                counts = ", ".join(f"{p} at {n}" for p, n in faster.items())
                line = (
                    f"  {provider} vs separate quant: {mean:.2f}x geometric mean over "
                    f"{len(speedups)} shapes ({min(speedups.values()):.2f}x to "
                    f"{max(speedups.values()):.2f}x; separate quant: the faster of {counts})"
                )
                if provider == "cuda":
                    ok = mean >= SPEEDUP_TARGET
                    line += f"; target {SPEEDUP_TARGET}x: {'met' if ok else 'MISSED'}"
                    missed += [] if ok else [f"{name} speed-up {mean:.2f}x"]
                lines.append(line)
                below = {k: v for k, v in speedups.items() if v < SPEEDUP_TARGET}
                if provider == "cuda" and below:
                    label = f"below {SPEEDUP_TARGET}x at {len(below)}:"
                    lines += _shapes_line(label, below, varying, highest_first=False)
            ratios = _ratios(fused, static)
            if not ratios:
                continue
            line = (
                f"  {provider} / static: {geomean(ratios.values()):.3f} geometric mean, "
                f"{min(ratios.values()):.3f} to {max(ratios.values()):.3f}"
            )
            if provider != "cuda":
                lines.append(line)
                continue
            target, applies, where = static_target(name)
            judged = {k: v for k, v in ratios.items() if applies(k)}
            over = {k: v for k, v in judged.items() if v > target}
            line += f"; target <= {target} at {where} ({len(judged)} shapes): "
            lines.append(line + (f"MISSED at {len(over)}" if over else "met" if judged else "-"))
            if over:
                missed.append(f"{name} / static at {len(over)} shapes")
                lines += _shapes_line(f"over {target}:", over, varying, highest_first=True)
    lines.append("targets missed: " + ("; ".join(missed) if missed else "none"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The command line.


def parser() -> argparse.ArgumentParser:
    """``attnmerge bench``'s options with this module's providers, ``--formats`` and
    ``--summary``; the DeepSeek-like grid by default."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.formats", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    bench.add_arguments(p, PROVIDERS)
    names = ",".join(FORMATS)
    p.add_argument(
        "--formats",
        type=bench.items(f"a comma-separated subset of {names}", tuple(FORMATS)),
        default=tuple(FORMATS),
        metavar="F,...",
        help=f"of {names} (all)",
    )
    p.add_argument("--summary", metavar="CSV", help="print the summary of a CSV and exit")
    p.set_defaults(
        tokens=TOKENS,
        heads=HEADS,
        partials=PARTIALS,
        dtypes=("bf16",),
        providers=DEFAULT_PROVIDERS,
        rep_ms=REP_MS,
    )
    return p


def main(argv: Sequence[str] | None = None, **run_options) -> int:
    """Run the grid, then print the summary (with ``--csv``); ``run_options`` go to
    :func:`attnmerge.bench.run` (tests use them)."""
    args = parser().parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    if args.eager:
        raise SystemExit("benchmarks.formats times CUDA graphs; for --eager use attnmerge bench")
    cases = build_cases(args)
    device = torch.device(run_options.get("device", "cuda"))
    if cases and (device.type != "cuda" or torch.cuda.is_available()):
        forms = sorted({(c.partials, c.variable) for c in cases}, key=lambda f: (f[0] or 2, f[1]))
        table = served(args.formats, forms, args.head_sizes[0], device)
        print(served_report(table), flush=True)
    code = bench.run(args, extra=providers(), cases=cases, **run_options)
    if code == 0 and args.csv:
        print(summary(args.csv))
    return code


if __name__ == "__main__":
    sys.exit(main())
