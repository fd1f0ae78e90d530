"""``attnmerge bench``: time the merge on a CUDA GPU (device time, bandwidth, host overhead).

The default grid is vLLM's: T in 1..4096 tokens x H in 128..4 heads x D = 128 x
fp32/fp16/bf16 partials into FP8 (scale 0.1); partial rows N(0, 1), LSEs N(0, 4^2) with 5%
+inf (empty rows). Providers: attnmerge's backends ``cuda``, ``triton`` and ``torch``
through the public ``merge_attn_states``; ``unfused``, a triton merge into the partials'
dtype and then a torch.compile'd FP8 quantisation (an engine without the fused store);
``vllm``, vLLM's own ``merge_attn_states`` (a default where vLLM is installed). Each case
is timed as a CUDA graph of about ``--rep-ms`` of back-to-back calls, replayed 10 times;
``--cold-l2`` rotates among input sets over twice the L2 together, so that inputs come
from HBM; ``--eager`` measures the host time per eager call instead. The repository's
``benchmarks/grid.py`` runs this harness with yardstick kernels as further providers.

K-way merges (``--partials K,...``, or ``--kway`` for K in 2..32 x T in 1..4096 x H in
128/32/8, bf16 into bf16 and FP8, fixed and variable K) go through ``attnmerge.merge``
with a preallocated ``out``: fixed K as one stacked ``[K, T, H, D]`` tensor with ``[K, H,
T]`` LSEs; variable K (``--variable``) as packed rows ``[N, H, D]``, LSEs ``[H, N]`` and an
int32 ``indptr``, token t taking ``partial_counts(T, K)[t]`` rows: the counts 1 to 2K - 1
spread evenly over the tokens (a ramp) in a seeded random order, so that their mean is K
within rounding (K itself at T = 1). Their bytes: every partial row and LSE read once
(and ``indptr``), the output (and its LSE) written once. ``unfused`` and ``vllm`` are
two-way only.
"""

from __future__ import annotations

import argparse
import collections
import csv
import functools
import importlib
import importlib.util
import math
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TextIO

import torch

from attnmerge.api import merge, merge_attn_states
from attnmerge.formats import FP8Static
from attnmerge.reference import quantize_fp8_static
from attnmerge.version import __version__

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP8 = torch.float8_e4m3fn
PROVIDERS = ("cuda", "triton", "unfused", "torch", "vllm")
TWO_WAY_ONLY = ("unfused", "vllm")
# --kway: the K-way grid's options
KWAY = {"partials": (2, 4, 8, 16, 32), "heads": (128, 32, 8), "dtypes": ("bf16",)}
KWAY |= {"fp8": "both", "variable": "both"}
# --eager: the host-time grid's options (small grids, where the host sets the pace)
EAGER = {"tokens": (1, 16, 64, 256), "heads": (128, 32, 8), "dtypes": ("bf16",)}
EAGER |= {"fp8": "both", "output_lse": "both", "eager": True}
FP8_SCALE = 0.1
EMPTY_FRACTION = 0.05  # share of +inf LSEs (empty partial rows)
REPLAYS = 10
VLLM_MODULE = "vllm.v1.attention.ops.merge_attn_states"
# Word boundaries keep GH200 / GB200 (other memory systems) from matching H200 / B200.
_DATASHEET = (
    (r"\bH200\b", "H200", 4.8e12),
    (r"\bB200\b", "B200", 8.0e12),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 2.0e12),
    (r"\bH100\b.*(\bSXM|\bHBM3\b)", "H100 SXM", 3.35e12),
)
_ON_OFF = {"on": (True,), "off": (False,), "both": (False, True)}

# The CSV columns: the run's, then the case's (times in us; error empty unless it failed).
RunInfo = collections.namedtuple(
    "RunInfo",
    "gpu torch_version triton_version attnmerge_version git_sha peak_gbps peak_source "
    "copy_gbps cold_l2 rep_ms",
)
Record = collections.namedtuple(
    "Record",
    "dtype out_dtype output_lse head_size tokens heads partials variable provider sets "
    "median_us p20_us p80_us bytes gbps pct_of_peak floor_us error",
)
DeviceInfo = collections.namedtuple("DeviceInfo", "name l2_bytes copy_bytes_per_s")
_INTS = {"head_size", "tokens", "heads", "sets", "bytes", "rep_ms"}
_FLOATS = {f for f in RunInfo._fields + Record._fields if f.endswith(("_us", "gbps", "peak"))}


@dataclass(frozen=True)
class Case:
    """One measurement: partial dtype, FP8 output, output LSE, D, T, H, provider, and for
    a K-way merge K (None: two-way ``merge_attn_states``) and whether K varies per token."""

    dtype: str
    fp8: bool
    output_lse: bool
    head_size: int
    tokens: int
    heads: int
    provider: str
    partials: int | None = None
    variable: bool = False

    def min_bytes(self) -> int:
        """Bytes a merge must move: the partials and their float32 LSEs (and ``indptr``)
        read, the output (and its LSE) written."""
        out = (FP8 if self.fp8 else DTYPES[self.dtype]).itemsize
        t, h, d = self.tokens, self.heads, self.head_size
        index = 4 * (t + 1) if self.variable else 0  # int32 indptr
        n = sum(partial_counts(t, self.partials)) if self.variable else t * (self.partials or 2)
        read = n * h * (d * DTYPES[self.dtype].itemsize + 4) + index
        return read + t * h * (d * out + 4 * self.output_lse)


@functools.cache
def partial_counts(tokens: int, k: int) -> tuple[int, ...]:
    """Partials per token of a variable-K case: 1 to 2K - 1 spread evenly over the tokens
    (mean K within rounding; K at T = 1), in a seeded random order."""
    if tokens == 1:
        return (k,)
    counts = [1 + round(i * (2 * k - 2) / (tokens - 1)) for i in range(tokens)]
    random.Random(tokens * 1009 + k).shuffle(counts)
    return tuple(counts)


def build_cases(args: argparse.Namespace) -> list[Case]:
    """The grid of parsed options in table order (dtype, FP8, output LSE, D, variable K, K,
    H, T, provider); ``unfused`` only with FP8 (without the quantisation it is the triton
    provider), and neither it nor ``vllm`` in K-way grids."""
    shapes = getattr(args, "shapes", None) or [(t, h) for h in args.heads for t in args.tokens]
    providers = args.providers or ("cuda", "triton", "unfused")
    providers += ("vllm",) if not args.providers and importlib.util.find_spec("vllm") else ()
    ks = args.partials or (None,)
    return [
        Case(dtype, fp8, lse, d, t, h, p, k, var)
        for dtype in args.dtypes
        for fp8 in _ON_OFF[args.fp8]
        for lse in _ON_OFF[args.output_lse]
        for d in args.head_sizes
        for var in (_ON_OFF[args.variable] if args.partials else (False,))
        for k in ks
        for t, h in shapes
        for p in providers
        if (fp8 or p != "unfused") and (k is None or p not in TWO_WAY_ONLY)
    ]


def cold_l2_sets(case_bytes: int, l2_bytes: int) -> int:
    """How many distinct argument sets it takes to exceed twice the L2 together."""
    return max(1, 2 * l2_bytes // max(1, case_bytes) + 1)


def items(what: str, choices: Sequence[str] = ()) -> Callable[[str], tuple]:
    """An argparse type: comma-separated positive integers, or names out of ``choices``."""

    def parse(text: str) -> tuple:
        values = [v.strip() for v in text.split(",") if v.strip()]
        ok = all(v in choices if choices else v.isdigit() and int(v) > 0 for v in values)
        if not values or not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return tuple(dict.fromkeys(values if choices else map(int, values)))

    return parse


class _Preset(argparse.Action):
    """``--kway`` or ``--eager``: set the options of a grid (``const``: :data:`KWAY`,
    :data:`EAGER`); options after it override."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for name, value in self.const.items():
            setattr(namespace, name, value)


def add_arguments(parser: argparse.ArgumentParser, providers: Sequence[str] = PROVIDERS) -> None:
    """Add the ``bench`` options to ``parser``; ``--providers`` accepts ``providers``."""
    ints = items("comma-separated positive integers")
    add = parser.add_argument
    add("--tokens", type=ints, default=(1, 16, 64, 256, 1024, 4096), metavar="T,...")
    add("--heads", type=ints, default=(128, 64, 32, 16, 8, 4), metavar="H,...")
    add("--head-sizes", type=ints, default=(128,), metavar="D,...")
    dtypes = items(f"a comma-separated subset of {','.join(DTYPES)}", tuple(DTYPES))
    add("--dtypes", type=dtypes, default=tuple(DTYPES), metavar="DTYPE,...")
    add("--fp8", choices=_ON_OFF, default="on", help="FP8 output, scale 0.1 (on)")
    add("--output-lse", choices=_ON_OFF, default="off", help="also write the output LSE (off)")
    add("--partials", type=ints, metavar="K,...", help="K-way merges (attnmerge.merge)")
    add("--variable", choices=_ON_OFF, default="off", help="K-way: K varies per token (off)")
    kway = " ".join(
        f"--{k} {','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in KWAY.items()
    )
    add(
        "--kway",
        action=_Preset,
        const=KWAY,
        help=f"the K-way grid: {kway} (later options override)",
    )
    names = ",".join(providers)
    providers = items(f"a comma-separated subset of {names}", providers)
    add("--providers", type=providers, metavar="P,...", help=f"of {names}")
    add("--cold-l2", action="store_true", help="rotate among input sets over twice the L2")
    add("--rep-ms", type=int, default=100, help="milliseconds of calls per CUDA graph (100)")
    eager = " ".join(
        f"--{k} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
        for k, v in EAGER.items()
        if k != "eager"
    )
    add(
        "--eager",
        action=_Preset,
        const=EAGER,
        default=False,
        help=f"measure the host time per eager call instead, over {eager} (later options override)",
    )
    add("--csv", metavar="PATH", help="also write one row per case to this CSV file")


def make_record(case: Case, sets: int, times_us, info: RunInfo, error: str = "") -> Record:
    """The record of a case from its (median, p20, p80) us per call, or None and an error."""
    nbytes = case.min_bytes()
    med, p20, p80 = times_us if times_us is not None else (math.nan,) * 3
    gbps = nbytes / med / 1e3 if med > 0 else math.nan
    out_dtype = "fp8" if case.fp8 else case.dtype
    shape = (case.dtype, out_dtype, case.output_lse, case.head_size, case.tokens, case.heads)
    shape += (case.partials, case.variable)
    pct, floor_us = 100 * gbps / info.peak_gbps, nbytes / info.copy_gbps / 1e3
    return Record(*shape, case.provider, sets, med, p20, p80, nbytes, gbps, pct, floor_us, error)


def write_csv(path: str | Path, records: Sequence[Record], info: RunInfo) -> None:
    """One row per record, each with the run's GPU, versions and git sha."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RunInfo._fields + Record._fields)
        for r in records:
            # (None, the two-way form's K, is written as an empty field)
            w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in (*info, *r)])


def read_csv(path: str | Path) -> tuple[list[Record], RunInfo]:
    """The records of a CSV written by :func:`write_csv`, and the run info of its first row."""
    kinds = {**dict.fromkeys(_INTS, int), **dict.fromkeys(_FLOATS, float)}
    kinds |= dict.fromkeys(("output_lse", "cold_l2", "variable"), lambda v: v == "True")
    kinds["partials"] = lambda v: int(v) if v else None  # empty or absent: two-way
    fields = RunInfo._fields + Record._fields
    with open(path, newline="") as f:
        rows = [[kinds.get(k, str)(row.get(k, "")) for k in fields] for row in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"{path}: no rows")
    n = len(RunInfo._fields)
    return [Record(*row[n:]) for row in rows], RunInfo(*rows[0][:n])


def format_table(records: Sequence[Record], info: RunInfo) -> str:
    """One row per shape, one ``median us, GB/s, % of peak`` column per provider."""
    providers = list(dict.fromkeys(r.provider for r in records))
    kway = any(r.partials is not None for r in records)
    rows: dict[tuple, dict[str, str]] = {}
    for r in records:
        lse, var = ("yes" if x else "no" for x in (r.output_lse, r.variable))
        key = (r.dtype, r.out_dtype, lse, r.head_size, *((r.partials, var) if kway else ()))
        key += (r.tokens, r.heads, f"{r.floor_us:.2f}")
        cell = "error" if r.error else f"{r.median_us:.2f} {r.gbps:.0f} {r.pct_of_peak:.0f}%"
        rows.setdefault(key, dict.fromkeys(providers, "-"))[r.provider] = cell
    table = [["dtype", "out", "lse", "D", *(("K", "var") if kway else ()), "T", "H", "floor_us"]]
    table[0] += providers
    table += [[*map(str, key), *cells.values()] for key, cells in rows.items()]
    widths = [max(map(len, column)) for column in zip(*table, strict=True)]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in table]
    l2 = "cold L2 (rotated input sets)" if info.cold_l2 else "warm L2"
    head = [
        f"attnmerge bench on {info.gpu}: peak {info.peak_gbps:.0f} GB/s ({info.peak_source}), "
        f"copy {info.copy_gbps:.0f} GB/s (measured); {l2}",
        f"torch {info.torch_version}, triton {info.triton_version}, attnmerge "
        f"{info.attnmerge_version} (git {info.git_sha}); CUDA graphs of {info.rep_ms} ms",
        "cells: median us, GB/s, % of peak; floor_us: bytes moved / copy bandwidth"
        + ("; K: partials per token (var yes: their mean)" if kway else ""),
    ]
    errors = dict.fromkeys(f"error: {r.provider}: {r.error}" for r in records if r.error)
    return "\n".join([*head, lines[0], "-" * len(lines[0]), *lines[1:], *errors])


def make_input_sets(case: Case, n_sets: int, device: torch.device | str) -> list[dict]:
    """``n_sets`` seeded argument sets of one case, each tensor its own allocation: the
    two-way form's four inputs, or a K-way case's ``outputs``, ``lses`` and ``indptr``."""
    g = torch.Generator(device=device).manual_seed(0)
    t, h, d, dtype, k = case.tokens, case.heads, case.head_size, DTYPES[case.dtype], case.partials

    def lse(shape: tuple = (h, t)) -> torch.Tensor:
        empty = torch.rand(shape, device=device, generator=g) < EMPTY_FRACTION
        return (torch.randn(shape, device=device, generator=g) * 4).masked_fill(empty, math.inf)

    def partial(shape: tuple = (t, h, d)) -> torch.Tensor:
        return torch.randn(shape, device=device, generator=g).to(dtype)

    def inputs() -> dict:
        if k is None:
            prefix = {"prefix_output": partial(), "prefix_lse": lse()}
            return prefix | {"suffix_output": partial(), "suffix_lse": lse()}
        if not case.variable:
            return {"outputs": partial((k, t, h, d)), "lses": lse((k, h, t)), "indptr": None}
        indptr = torch.tensor((0, *partial_counts(t, k))).cumsum(0).to(device, torch.int32)
        n = int(indptr[-1])
        return {"outputs": partial((n, h, d)), "lses": lse((h, n)), "indptr": indptr}

    return [
        inputs()
        | {
            "output": torch.empty(t, h, d, dtype=FP8 if case.fp8 else dtype, device=device),
            "output_lse": torch.empty(h, t, device=device) if case.output_lse else None,
        }
        for _ in range(n_sets)
    ]


def inputs(s: dict) -> tuple:
    """The four merge inputs of an input set, in ``merge_attn_states`` order."""
    return s["prefix_output"], s["prefix_lse"], s["suffix_output"], s["suffix_lse"]


@functools.cache
def _compiled_quantize_into() -> Callable[..., None]:
    def quantize_into(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> None:
        out.copy_(quantize_fp8_static(x, scale))

    # dynamic: one compile per dtype, where static shapes would hit dynamo's recompile limit
    return torch.compile(quantize_into, dynamic=True)


def provider_call(provider: str, s: dict, scale: torch.Tensor | None) -> Callable[[], None]:
    """One call of an attnmerge or vLLM provider on input set ``s``."""
    if provider in ("cuda", "triton", "torch") and "outputs" in s:  # K-way
        quant = None if scale is None else FP8Static(scale)
        kwargs = {"quant": quant, "out": s["output"], "out_lse": s["output_lse"]}
        kwargs |= {"indptr": s["indptr"], "backend": provider}
        return functools.partial(merge, s["outputs"], s["lses"], **kwargs)
    if provider in ("cuda", "triton", "torch"):
        args = (s["output"], *inputs(s), s["output_lse"], None, scale)
        return functools.partial(merge_attn_states, *args, backend=provider)
    if provider == "vllm":
        try:
            vllm_merge = importlib.import_module(VLLM_MODULE).merge_attn_states
        except ImportError as e:
            raise ImportError(f"the vllm provider needs vLLM ({VLLM_MODULE}): {e}") from e
        args = (s["output"], *inputs(s), s["output_lse"], None, scale)
        return functools.partial(vllm_merge, *args)
    if provider != "unfused":
        raise ValueError(f"unknown provider {provider!r}")
    quantize, tmp = _compiled_quantize_into(), torch.empty_like(s["prefix_output"])

    def unfused() -> None:
        merge_attn_states(tmp, *inputs(s), s["output_lse"], backend="triton")
        quantize(s["output"], tmp, scale)

    return unfused


CallFactory = Callable[[dict, "torch.Tensor | None"], Callable[[], None]]


def make_call(case: Case, sets: Sequence[dict], scale, extra: Mapping | None = None):
    """The timed function: one call of ``case.provider`` per input set, in order;
    ``extra`` maps further provider names to functions ``(input set, scale) -> call``."""
    make = (extra or {}).get(case.provider, functools.partial(provider_call, case.provider))
    calls = [make(s, scale) for s in sets]

    def every_set() -> None:
        for call in calls:
            call()

    return calls[0] if len(calls) == 1 else every_set


Timer = Callable[[Callable[[], None]], tuple[float, float, float]]


def _event_ms(fn: Callable[[], object], n: int) -> list[float]:
    events = [[torch.cuda.Event(enable_timing=True) for _ in "se"] for _ in range(n)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def graph_timer(rep_ms: int) -> Timer:
    """(median, p20, p80) us per call of ``fn`` over 10 replays of a CUDA graph of about
    ``rep_ms`` of calls; ``fn`` first runs eagerly, so builds and errors are not captured."""

    def graph(fn: Callable[[], None], calls: int) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        return g

    def timer(fn: Callable[[], None]) -> tuple[float, float, float]:
        fn()
        torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()):
            calls = max(1, int(rep_ms / max(min(_event_ms(graph(fn, 1).replay, 3)), 1e-6)))
            ms = torch.tensor(_event_ms(graph(fn, calls).replay, REPLAYS), dtype=torch.float64)
        q = torch.quantile(ms * (1e3 / calls), torch.tensor([0.5, 0.2, 0.8], dtype=ms.dtype))
        return tuple(q.tolist())

    return timer


def probe_device(device: torch.device) -> DeviceInfo:
    """Name, L2 size and measured copy bandwidth (bytes/s, read + write) of a CUDA device."""
    src = torch.empty(1 << 29, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(_event_ms(lambda: dst.copy_(src), 20))
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return DeviceInfo(torch.cuda.get_device_name(device), l2, 2 * src.numel() / ms * 1e3)


def run_info(dev: DeviceInfo, args: argparse.Namespace) -> RunInfo:
    """The facts every row of a run shares: card, versions, git sha, bandwidths, timing."""
    copy_gbps = dev.copy_bytes_per_s / 1e9
    sheet = next((s for s in _DATASHEET if re.search(s[0], dev.name, re.IGNORECASE)), None)
    peak = (sheet[2] / 1e9, f"datasheet {sheet[1]}") if sheet else (copy_gbps, "measured copy")
    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = "not installed"
    git = ["git", "-C", str(Path(__file__).parent), "describe", "--always", "--dirty"]
    try:  # the checkout holding this file; --match of no tag gives the commit's short sha
        sha = subprocess.run([*git, "--match=-"], capture_output=True, text=True, timeout=10)
        sha = sha.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
    versions = (torch.__version__, triton_version, __version__, sha)
    return RunInfo(dev.name, *versions, *peak, copy_gbps, args.cold_l2, args.rep_ms)


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


def run(
    args: argparse.Namespace,
    *,
    device: torch.device | str = "cuda",
    timer: Timer | None = None,
    device_info: DeviceInfo | None = None,
    extra: Mapping[str, CallFactory] | None = None,
    out: TextIO | None = None,
    cases: Sequence[Case] | None = None,
) -> int:
    """Run ``attnmerge bench`` from parsed options: print the table, write the CSV.

    ``timer`` and ``device_info`` stand in for the GPU's (tests run the whole flow on CPU
    tensors); ``extra`` adds providers as in :func:`make_call`; ``cases`` replaces the
    grid of the options. Returns 0, or 2 when no GPU is visible or the CSV's directory
    does not exist. The CSV is also written at each tenth of the cases (a run stopped
    early keeps what it measured).
    """
    out, device, problem = out or sys.stdout, torch.device(device), None
    if args.csv and not Path(args.csv).resolve().parent.is_dir():
        problem = f"--csv: directory of {args.csv} does not exist"
    elif device.type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        problem = f"needs a CUDA GPU, and none is visible (torch {torch.__version__}, {build})"
    if problem:
        print(f"attnmerge bench: {problem}", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.eager:
        write_eager_table(device, args, out)
        return 0
    dev = device_info or probe_device(device)
    info, timer = run_info(dev, args), timer or graph_timer(args.rep_ms)
    cases = build_cases(args) if cases is None else list(cases)
    print(f"attnmerge bench: {len(cases)} cases on {info.gpu}", file=out, flush=True)
    scale, records = torch.tensor([FP8_SCALE], device=device), []
    for i, case in enumerate(cases):
        if i % max(1, len(cases) // 10) == 0:  # a few lines, and a hang names its case
            print(f"bench: case {i + 1}/{len(cases)}: {case}", file=sys.stderr, flush=True)
            if args.csv and records:
                write_csv(args.csv, records, info)
        n = cold_l2_sets(case.min_bytes(), dev.l2_bytes) if args.cold_l2 else 1
        try:
            sets = make_input_sets(case, n, device)
            times = timer(make_call(case, sets, scale if case.fp8 else None, extra))
            records.append(make_record(case, n, [t / n for t in times], info))
        except Exception as e:  # a provider failing one case must not end the run
            records.append(make_record(case, n, None, info, _one_line(e)))
        sets = None  # free this case's buffers before the next one's
    print(format_table(records, info), file=out)
    if args.csv:
        write_csv(args.csv, records, info)
        print(f"wrote {args.csv} ({len(records)} rows)", file=out)
    return 0


#: The columns of ``attnmerge bench --eager``: merge_attn_states per backend, merge() (auto,
#: ``out`` given) with the two partials in a list and with four stacked ``[4, T, H, D]``,
#: vLLM's op, a tiny torch op for scale. (ATTNMERGE_EAGER_LAUNCHER=0 measures the Python
#: launch.)
EAGER_COLUMNS = ("cuda", "auto", "triton", "merge", "merge-k4", "vllm", "torch.add")


def eager_us(
    device: torch.device | str,
    calls: int = 1000,
    case: Case | None = None,
    columns: Sequence[str] = EAGER_COLUMNS,
) -> dict[str, float | str]:
    """Host time per eager call of ``case`` (default T=1, H=8, D=128, bf16 -> FP8), in us
    per column (an error message where one fails; vLLM only where it imports): kernels
    this small leave the GPU waiting on the host, so the wall time per back-to-back call,
    median of 5 rounds of ``calls / 5`` (the columns take turns in each round), is the
    host's."""
    case = case or Case("bf16", True, False, 128, 1, 8, "cuda")
    (s,) = make_input_sets(case, 1, device)
    scale = torch.tensor([FP8_SCALE], device=device) if case.fp8 else None
    small = torch.ones(8, device=device)
    args = (s["output"], *inputs(s), s["output_lse"], None, scale)
    makers: dict[str, Callable[[], Callable[[], object]]] = {
        "cuda": lambda: functools.partial(merge_attn_states, *args, backend="cuda"),
        "auto": lambda: functools.partial(merge_attn_states, *args),
        "triton": lambda: functools.partial(merge_attn_states, *args, backend="triton"),
        "torch": lambda: functools.partial(merge_attn_states, *args, backend="torch"),
        "merge": lambda: functools.partial(
            merge,
            [args[1], args[3]],
            [args[2], args[4]],
            quant=None if scale is None else FP8Static(scale),
            out=args[0],
            out_lse=args[5],
        ),
        "merge-k4": lambda: functools.partial(
            merge,
            torch.stack([args[1], args[3]] * 2),
            torch.stack([args[2], args[4]] * 2),
            quant=None if scale is None else FP8Static(scale),
            out=args[0],
            out_lse=args[5],
        ),
        "torch.add": lambda: functools.partial(torch.add, small, small, out=small),
    }
    if importlib.util.find_spec("vllm"):
        makers["vllm"] = functools.partial(provider_call, "vllm", s, scale)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None

    def wall_us(fn: Callable[[], object], n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n * 1e6

    fns: dict[str, Callable[[], object]] = {}
    result: dict[str, float | str] = {}
    for name in (c for c in columns if c in makers):
        try:
            fn = makers[name]()
            wall_us(fn, 50)  # warm-up: builds, caches, the eager launcher's plan
            fns[name] = fn
        except Exception as e:
            result[name] = _one_line(e)
    # Round-robin rounds: a host that changes speed during the run slows every column alike.
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(5):
        for name, fn in fns.items():
            rounds[name].append(wall_us(fn, max(1, calls // 5)))
    result |= {name: statistics.median(times) for name, times in rounds.items()}
    return {name: result[name] for name in columns if name in result}


#: A row of ``attnmerge bench --eager --csv``: one shape and column, its host time per call
#: in us (empty with the error where the column failed).
EagerRecord = collections.namedtuple(
    "EagerRecord",
    "gpu dtype out_dtype output_lse head_size tokens heads column host_us error",
)


def read_eager_csv(path: str | Path) -> list[EagerRecord]:
    """The rows of a CSV written by ``attnmerge bench --eager --csv``."""
    with open(path, newline="") as f:
        return [
            EagerRecord(
                **row
                | {
                    "output_lse": row["output_lse"] == "True",
                    "head_size": int(row["head_size"]),
                    "tokens": int(row["tokens"]),
                    "heads": int(row["heads"]),
                    "host_us": float(row["host_us"]) if row["host_us"] else math.nan,
                }
            )
            for row in csv.DictReader(f)
        ]


def write_eager_table(device: torch.device, args: argparse.Namespace, out: TextIO) -> None:
    """``attnmerge bench --eager``: one row per shape of the options' grid, one column per
    :data:`EAGER_COLUMNS` entry; the CSV (``--csv``) has one row per shape and column."""
    print(
        f"host time per eager call (us), median of 5 rounds of 200 back-to-back calls, D = "
        f"{','.join(map(str, args.head_sizes))}, on {torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else "host time per eager call (us)",
        file=out,
    )
    header = f"{'dtype':>5} {'out':>5} {'lse':>3} {'T':>5} {'H':>4}"
    print(header + "".join(f" {c:>9}" for c in EAGER_COLUMNS), file=out, flush=True)
    rows = []
    for case in build_cases(argparse.Namespace(**{**vars(args), "providers": ("cuda",)})):
        result = eager_us(device, case=case)
        out_dtype = "fp8" if case.fp8 else case.dtype
        cells = [result.get(c, "") for c in EAGER_COLUMNS]
        line = f"{case.dtype:>5} {out_dtype:>5} {'yes' if case.output_lse else 'no':>3}"
        line += f" {case.tokens:>5} {case.heads:>4}"
        line += "".join(f" {v:9.2f}" if isinstance(v, float) else f" {'-':>9}" for v in cells)
        print(line, file=out, flush=True)
        rows += [(case, column, value) for column, value in zip(EAGER_COLUMNS, cells, strict=True)]
    if args.csv:
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(EagerRecord._fields)
            for case, column, value in rows:
                us, error = (f"{value:.4g}", "") if isinstance(value, float) else ("", value)
                out_dtype = "fp8" if case.fp8 else case.dtype
                shape = (case.dtype, out_dtype, case.output_lse, case.head_size, case.tokens)
                w.writerow((gpu, *shape, case.heads, column, us, error))
        print(f"wrote {args.csv} ({len(rows)} rows)", file=out)
