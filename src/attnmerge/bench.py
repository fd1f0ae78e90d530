"""``attnmerge bench``: GPU benchmark of the merge (device time, bandwidth, host overhead).

Run as ``attnmerge bench`` (or ``python -m attnmerge.bench``) on a machine with a CUDA
GPU; without one it says so and exits with 2.

The default grid is vLLM's benchmark of ``merge_attn_states``: tokens T in {1, 16, 64,
256, 1024, 4096} x heads H in {128, 64, 32, 16, 8, 4} (128 heads divided by TP 1..32) x
head size D = 128 x fp32/fp16/bf16 partials, FP8 output with scale 0.1, no output LSE.
Partial rows are N(0, 1), LSEs N(0, 4^2) with 5% of them +inf (empty rows). Options
change the shapes, head sizes, dtypes, FP8 on/off, output LSE on/off and providers.

Providers:

* ``cuda``: attnmerge's CUDA C++ backend (fused FP8 store when FP8 is on);
* ``triton``: attnmerge's Triton backend (likewise);
* ``unfused``: the Triton merge into the partials' dtype, then a torch.compile'd static
  FP8 quantisation (:func:`attnmerge.reference.quantize_fp8_static`) as a separate kernel:
  what an engine does without the fusion. Only run with FP8 on (without FP8 it is the
  ``triton`` provider);
* ``torch``: attnmerge's reference backend (many small kernels; for scale only);
* ``vllm``: vLLM's own ``merge_attn_states`` (``vllm.v1.attention.ops.merge_attn_states``,
  its dispatcher: the CUDA kernel where it applies, else its Triton kernel), called with
  the same arguments, for a baseline from the same run; it needs vLLM importable (a case
  without it records the ImportError and the run goes on);
* ``vllm-triton``: vLLM's Triton merge kernel
  (``vllm.v1.attention.ops.triton_merge_attn_states``) likewise, what vLLM runs where its
  CUDA kernel does not apply;
* ``stream``: not a merge but a yardstick for its byte mix: a Triton kernel that reads
  both partials and LSEs and writes the output, with next to no arithmetic
  (:mod:`attnmerge.triton.stream_kernel`; a ceiling for 2-byte partials, not for fp32);
* ``stream-cuda``: the same yardstick as a CUDA kernel in the CUDA merge kernel's thread
  layout and chunk rule (:mod:`attnmerge.cuda.stream`): next to ``cuda``, what the
  merge's own arithmetic costs; next to ``stream``, how much of a yardstick is its
  compiler's;
* ``read``: the same kernel reading the merge's inputs and writing nothing: a lower bound
  on the time of any merge (its GB/s counts the merge's bytes, so its share of the
  datasheet bandwidth bounds every merge kernel's).

Every attnmerge provider goes through ``attnmerge.merge_attn_states(..., backend=...)``; a provider
that cannot serve a case (a missing compiler, an unsupported head size) is reported in
that case's ``error`` field and the run goes on.

Timing: ``triton.testing.do_bench_cudagraph`` (CUDA-graph replay of many back-to-back
calls, 10 replays), median with p20/p80 in microseconds. GB/s counts the minimal bytes
(two partials, two LSEs, the output and the output LSE when written) over the median;
"% of peak" compares it with the card's datasheet bandwidth (H100 SXM 3.35 TB/s, H100
PCIe 2.0, H200 4.8, B200 8.0), or for cards not in that table with the device-to-device
copy bandwidth measured in the same run, labelled as such. The copy bandwidth (read +
write) is always measured once per run; "floor" is the minimal bytes over it, so every
number in one table comes from one card. Below the floor is possible: reads are cheaper
than writes, and small cases sit in L2.

``--cold-l2`` rotates among enough distinct input and output sets that their inputs add
up to more than twice the L2 cache; one timed call runs every set once, and the time is
divided by the number of sets. Small shapes then need thousands of sets per timed call,
so this mode is much slower to run than the default (warm L2: one set, replayed).

The pure parts (option parsing, the case grid, byte counts, the bandwidth table, CSV,
table and plot writing) are functions of plain values and run on a CPU; :func:`run`
takes the timer and the device facts as parameters so that its whole flow can be
driven on CPU tensors with a fake timer.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import importlib
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from .reference import quantize_fp8_static

__all__ = [
    "Case",
    "Config",
    "DeviceInfo",
    "Record",
    "RunInfo",
    "add_arguments",
    "build_cases",
    "cold_l2_sets",
    "config_from_args",
    "datasheet_bandwidth",
    "format_table",
    "main",
    "min_bytes",
    "parse_args",
    "run",
    "write_csv",
    "write_plot",
]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP8 = torch.float8_e4m3fn
PROVIDERS = (
    "cuda",
    "triton",
    "unfused",
    "torch",
    "vllm",
    "vllm-triton",
    "stream",
    "stream-cuda",
    "read",
)

# vLLM's benchmark grid (benchmarks/kernels/benchmark_merge_attn_states.py at PR #36518).
DEFAULT_TOKENS = (1, 16, 64, 256, 1024, 4096)
DEFAULT_HEADS = (128, 64, 32, 16, 8, 4)
DEFAULT_HEAD_SIZES = (128,)
DEFAULT_DTYPES = ("fp32", "fp16", "bf16")
DEFAULT_PROVIDERS = ("cuda", "triton", "unfused")

FP8_SCALE = 0.1
EMPTY_FRACTION = 0.05  # share of +inf LSEs (empty partial rows)
# do_bench_cudagraph captures rep_ms worth of calls (estimated eagerly) and replays that
# graph 10 times. 100 ms keeps the default grid (324 cases) to a few minutes on an H100;
# the spread of the 10 replays (p20..p80) stays within ~1% at that length.
DEFAULT_REP_MS = 100
# Per-set buffers start on 256-byte boundaries, as separate allocations would, so the
# rotated views get the same kernel specialisations (16-byte alignment) as one set.
_SET_ALIGN_BYTES = 256

# Datasheet memory bandwidth, matched on torch.cuda.get_device_name(). Word boundaries
# keep "GH200" / "GB200" (other memory systems) from matching H200 / B200.
_DATASHEET = (
    (r"\bH200\b", "H200", 4.8e12),
    (r"\bB200\b", "B200", 8.0e12),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 2.0e12),
    (r"\bH100\b.*(\bSXM|\bHBM3\b)", "H100 SXM", 3.35e12),
)


# ---------------------------------------------------------------------------
# Configuration and the case grid


@dataclass(frozen=True)
class Config:
    """What one ``attnmerge bench`` run measures and where it writes."""

    tokens: tuple[int, ...] = DEFAULT_TOKENS
    heads: tuple[int, ...] = DEFAULT_HEADS
    # Explicit (T, H) pairs; when set they replace the tokens x heads product.
    shapes: tuple[tuple[int, int], ...] | None = None
    head_sizes: tuple[int, ...] = DEFAULT_HEAD_SIZES
    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    fp8: tuple[bool, ...] = (True,)
    output_lse: tuple[bool, ...] = (False,)
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    block_rows: tuple[int, ...] = ()  # extra providers "triton/rN": Triton rows per program
    cuda_rows: tuple[int, ...] = ()  # extra providers "cuda/rN": CUDA rows per thread team
    cuda_chunk_bytes: tuple[int, ...] = ()  # ... "cuda/rNcB" / "cuda/cB": B bytes per access
    cuda_block_threads: tuple[int, ...] = ()  # ... "cuda/bN": N data threads per block
    cuda_thread_weights: bool = False  # each CUDA variant also with weights per thread ("t")
    cuda_weight_warp: bool = False  # ... and with a weight warp ("w")
    cold_l2: bool = False
    rep_ms: int = DEFAULT_REP_MS
    host_overhead: bool = False
    csv: str | None = None
    plot: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class Case:
    """One measurement: a shape, dtypes, flags and a provider."""

    dtype: str  # partial dtype: "fp32" | "fp16" | "bf16"
    fp8: bool  # FP8 output (else the output has the partials' dtype)
    output_lse: bool  # the merge also writes the output LSE
    head_size: int
    tokens: int
    heads: int
    # one of PROVIDERS, "triton/rN" (N rows per Triton program), or a CUDA kernel variant
    # "cuda/[rN][cB][bT][t|w]": N rows per thread team, B-byte chunks, T data threads per
    # block, weights per thread (t) or by a weight warp (w); what is left out is the default
    provider: str

    @property
    def out_dtype(self) -> str:
        return "fp8" if self.fp8 else self.dtype

    @property
    def block_rows(self) -> int | None:
        m = re.fullmatch(r"triton/r(\d+)", self.provider)
        return int(m.group(1)) if m else None

    def _cuda_variant(self) -> tuple[int | None, int | None, int | None, str] | None:
        m = re.fullmatch(r"cuda/(?:r(\d+))?(?:c(\d+))?(?:b(\d+))?([tw]?)", self.provider)
        if m is None or (m.group(1) is m.group(2) is m.group(3) is None and not m.group(4)):
            return None
        rows, chunk, threads = (None if g is None else int(g) for g in m.groups()[:3])
        return rows, chunk, threads, m.group(4)

    @property
    def cuda_variant(self) -> bool:
        return self._cuda_variant() is not None

    @property
    def cuda_rows(self) -> int | None:
        v = self._cuda_variant()
        return v[0] if v else None

    @property
    def cuda_chunk_bytes(self) -> int | None:
        v = self._cuda_variant()
        return v[1] if v else None

    @property
    def cuda_block_threads(self) -> int | None:
        v = self._cuda_variant()
        return v[2] if v else None

    @property
    def cuda_weights(self) -> str:
        """The weights mode: "t" (per thread), "w" (a weight warp) or "" (the default)."""
        v = self._cuda_variant()
        return v[3] if v else ""

    def input_bytes(self) -> int:
        """Bytes of the two partial outputs and the two LSEs."""
        rows = self.tokens * self.heads
        return 2 * rows * self.head_size * DTYPES[self.dtype].itemsize + 2 * rows * 4

    def min_bytes(self) -> int:
        out = FP8 if self.fp8 else DTYPES[self.dtype]
        return min_bytes(
            self.tokens, self.heads, self.head_size, DTYPES[self.dtype], out, self.output_lse
        )


def min_bytes(
    tokens: int,
    heads: int,
    head_size: int,
    in_dtype: torch.dtype,
    out_dtype: torch.dtype,
    with_lse: bool,
) -> int:
    """Bytes a merge must move: two partials + two float32 LSEs read, output (+ LSE) written."""
    rows = tokens * heads
    in_bytes = 2 * rows * head_size * in_dtype.itemsize + 2 * rows * 4
    out_bytes = rows * head_size * out_dtype.itemsize + (rows * 4 if with_lse else 0)
    return in_bytes + out_bytes


def build_cases(config: Config) -> list[Case]:
    """The grid, in table order: dtype, FP8, output LSE, D, H, T, provider.

    ``unfused`` is left out where FP8 is off: without the quantisation it is the
    ``triton`` provider.
    """
    if config.shapes is not None:
        shapes = list(config.shapes)
    else:
        shapes = [(t, h) for h in config.heads for t in config.tokens]
    providers = list(config.providers) + [f"triton/r{n}" for n in config.block_rows]
    chunks = [""] + [f"c{b}" for b in config.cuda_chunk_bytes]
    threads = [""] + [f"b{n}" for n in config.cuda_block_threads]
    weights = [""] + ["t"] * config.cuda_thread_weights + ["w"] * config.cuda_weight_warp
    rows = [f"r{n}" for n in config.cuda_rows] or [""]
    variants = [f"{r}{c}{b}{w}" for w in weights for b in threads for c in chunks for r in rows]
    providers += [f"cuda/{v}" for v in variants if v]
    cases = []
    for dtype in config.dtypes:
        for fp8 in config.fp8:
            for lse in config.output_lse:
                for d in config.head_sizes:
                    for t, h in shapes:
                        for p in providers:
                            if p == "unfused" and not fp8:
                                continue
                            cases.append(Case(dtype, fp8, lse, d, t, h, p))
    return cases


def cold_l2_sets(input_bytes: int, l2_bytes: int) -> int:
    """Distinct input sets whose total input size exceeds twice the L2 cache."""
    return max(1, 2 * l2_bytes // max(1, input_bytes) + 1)


def datasheet_bandwidth(gpu_name: str) -> tuple[float, str] | None:
    """``(bytes/s, card)`` from the datasheet table for a device name, else None."""
    for pattern, card, bandwidth in _DATASHEET:
        if re.search(pattern, gpu_name, re.IGNORECASE):
            return bandwidth, card
    return None


# ---------------------------------------------------------------------------
# Argument parsing


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _shape_list(text: str) -> tuple[tuple[int, int], ...]:
    shapes = []
    for item in (s.strip() for s in text.split(",")):
        m = re.fullmatch(r"(\d+)x(\d+)", item)
        if not m or min(int(m.group(1)), int(m.group(2))) < 1:
            raise argparse.ArgumentTypeError(f"expected TxH pairs like 1024x32, got {item!r}")
        shapes.append((int(m.group(1)), int(m.group(2))))
    return tuple(shapes)


def _choice_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(choices)}, got {text!r}"
            )
        return tuple(dict.fromkeys(values))  # drop repeats, keep order

    return parse


_ON_OFF = {"on": (True,), "off": (False,), "both": (False, True)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to a parser."""
    c = Config()

    def csv_of(values: Iterable[object]) -> str:
        return ",".join(str(v) for v in values)

    g = parser.add_argument_group("cases")
    g.add_argument(
        "--tokens",
        type=_int_list,
        default=c.tokens,
        metavar="T,...",
        help=f"token counts ({csv_of(c.tokens)})",
    )
    g.add_argument(
        "--heads",
        type=_int_list,
        default=c.heads,
        metavar="H,...",
        help=f"head counts ({csv_of(c.heads)})",
    )
    g.add_argument(
        "--shapes",
        type=_shape_list,
        default=None,
        metavar="TxH,...",
        help="explicit (tokens, heads) pairs, e.g. 1x128,4096x8; replace --tokens x --heads",
    )
    g.add_argument(
        "--head-sizes",
        type=_int_list,
        default=c.head_sizes,
        metavar="D,...",
        help=f"head sizes, e.g. 64,128,192,256,512 ({csv_of(c.head_sizes)})",
    )
    g.add_argument(
        "--dtypes",
        type=_choice_list(tuple(DTYPES)),
        default=c.dtypes,
        metavar="DTYPE,...",
        help=f"partial dtypes, of {csv_of(DTYPES)} ({csv_of(c.dtypes)})",
    )
    g.add_argument(
        "--fp8",
        choices=sorted(_ON_OFF),
        default="on",
        help="on: FP8 output, scale 0.1; off: output in the partials' dtype; both (on)",
    )
    g.add_argument(
        "--output-lse",
        choices=sorted(_ON_OFF),
        default="off",
        help="on: the merge also writes the output LSE; off; both (off)",
    )
    g.add_argument(
        "--providers",
        type=_choice_list(PROVIDERS),
        default=c.providers,
        metavar="P,...",
        help=f"of {csv_of(PROVIDERS)} ({csv_of(c.providers)})",
    )
    g.add_argument(
        "--block-rows",
        type=_int_list,
        default=(),
        metavar="N,...",
        help="also time the Triton kernel with N rows per program (providers triton/rN)",
    )
    g.add_argument(
        "--cuda-rows",
        type=_int_list,
        default=(),
        metavar="N,...",
        help="also time the CUDA kernel with N rows per thread team (providers cuda/rN)",
    )
    g.add_argument(
        "--cuda-chunk-bytes",
        type=_int_list,
        default=(),
        metavar="B,...",
        help="also time the CUDA kernel reading B bytes per thread and row chunk (32, two "
        "16-byte accesses, is the default): providers cuda/cB, or cuda/rNcB with --cuda-rows",
    )
    g.add_argument(
        "--cuda-block-threads",
        type=_int_list,
        default=(),
        metavar="N,...",
        help="also time the CUDA kernel with blocks of N data threads (at least one row's "
        "team; providers cuda/bN, cuda/rNcBbN, ...)",
    )
    g.add_argument(
        "--cuda-thread-weights",
        action="store_true",
        help="also time each CUDA variant with the weights computed by every thread of a "
        "row (providers ending in t: cuda/t, cuda/rNt, cuda/rNcBt)",
    )
    g.add_argument(
        "--cuda-weight-warp",
        action="store_true",
        help="also time each CUDA variant with the weights computed by a separate warp "
        "(providers ending in w: cuda/w, cuda/rNw, cuda/rNcBw)",
    )
    g = parser.add_argument_group("timing")
    g.add_argument(
        "--cold-l2",
        action="store_true",
        help="rotate among input sets totalling over 2x the L2 cache (slow for small shapes)",
    )
    g.add_argument(
        "--rep-ms",
        type=_positive_int,
        default=c.rep_ms,
        help=f"milliseconds of calls captured per CUDA graph ({c.rep_ms})",
    )
    g.add_argument(
        "--host-overhead",
        action="store_true",
        help="also measure the host time per eager call, by layer",
    )
    g = parser.add_argument_group("output")
    g.add_argument("--csv", metavar="PATH", help="write one row per case to this CSV file")
    g.add_argument("--plot", metavar="PATH", help="write GB/s vs tokens to this PNG (matplotlib)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g.add_argument(
        "--from-csv",
        metavar="PATH",
        help="measure nothing: print the table of a CSV written by an earlier run (and "
        "write --plot from it); needs no GPU",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """The :class:`Config` of parsed ``bench`` options."""
    return Config(
        tokens=args.tokens,
        heads=args.heads,
        shapes=args.shapes,
        head_sizes=args.head_sizes,
        dtypes=args.dtypes,
        fp8=_ON_OFF[args.fp8],
        output_lse=_ON_OFF[args.output_lse],
        providers=args.providers,
        block_rows=args.block_rows,
        cuda_rows=args.cuda_rows,
        cuda_chunk_bytes=args.cuda_chunk_bytes,
        cuda_block_threads=args.cuda_block_threads,
        cuda_thread_weights=args.cuda_thread_weights,
        cuda_weight_warp=args.cuda_weight_warp,
        cold_l2=args.cold_l2,
        rep_ms=args.rep_ms,
        host_overhead=args.host_overhead,
        csv=args.csv,
        plot=args.plot,
        progress=not args.no_progress,
    )


def _parser(prog: str = "attnmerge bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark the merge on a CUDA GPU: time per call (CUDA-graph replay), "
        "GB/s and % of the card's peak bandwidth, per provider.",
        epilog="See the module docstring of attnmerge.bench for what is measured and how.",
    )
    add_arguments(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse ``bench`` options into a :class:`Config` (argparse exits on bad usage)."""
    return config_from_args(_parser().parse_args(argv))


# ---------------------------------------------------------------------------
# Results: records, CSV, table, plot


@dataclass(frozen=True)
class RunInfo:
    """What every row of one run shares: the card, versions, reference bandwidths."""

    gpu: str
    torch_version: str
    triton_version: str
    attnmerge_version: str
    git_sha: str
    peak_gbps: float  # datasheet, or the measured copy bandwidth (peak_source says which)
    peak_source: str
    copy_gbps: float  # measured device-to-device copy, read + write counted
    cold_l2: bool
    rep_ms: int


@dataclass(frozen=True)
class Record:
    """One (shape, dtype, provider) result. Times per merge call, in microseconds."""

    dtype: str
    out_dtype: str
    output_lse: bool
    head_size: int
    tokens: int
    heads: int
    provider: str
    sets: int  # input sets rotated per timed call (1 unless cold L2)
    median_us: float
    p20_us: float
    p80_us: float
    bytes: int  # minimal bytes moved
    gbps: float  # bytes / median
    pct_of_peak: float
    floor_us: float  # bytes / measured copy bandwidth
    error: str = ""  # why the provider could not run this case; times are NaN then


def make_record(
    case: Case,
    sets: int,
    times_us: tuple[float, float, float] | None,
    info: RunInfo,
    error: str = "",
) -> Record:
    """The record of a case from its (median, p20, p80) per call, or of its error."""
    nbytes = case.min_bytes()
    med, p20, p80 = times_us if times_us is not None else (math.nan,) * 3
    gbps = nbytes / (med * 1e-6) / 1e9 if med > 0 else math.nan
    return Record(
        dtype=case.dtype,
        out_dtype=case.out_dtype,
        output_lse=case.output_lse,
        head_size=case.head_size,
        tokens=case.tokens,
        heads=case.heads,
        provider=case.provider,
        sets=sets,
        median_us=med,
        p20_us=p20,
        p80_us=p80,
        bytes=nbytes,
        gbps=gbps,
        pct_of_peak=100 * gbps / info.peak_gbps,
        floor_us=nbytes / (info.copy_gbps * 1e9) * 1e6,
        error=error,
    )


def csv_fields() -> list[str]:
    """CSV header: the run's fields, then the record's."""
    return [f.name for f in dataclasses.fields(RunInfo)] + [
        f.name for f in dataclasses.fields(Record)
    ]


def write_csv(path: str | Path, records: Sequence[Record], info: RunInfo) -> None:
    """One row per record, each with the run's GPU, versions and git sha."""
    run_row = dataclasses.asdict(info)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=csv_fields())
        w.writeheader()
        for r in records:
            row = {**run_row, **dataclasses.asdict(r)}
            for k, v in row.items():
                if isinstance(v, float) and math.isfinite(v):
                    row[k] = f"{v:.6g}"
            w.writerow(row)


def read_csv(path: str | Path) -> tuple[list[Record], RunInfo]:
    """The records and run info of a CSV written by :func:`write_csv` (the run info of
    its first row; a CSV holds one run)."""

    def typed(cls: type, row: dict) -> dict:
        values = {}
        for f in dataclasses.fields(cls):
            raw = row[f.name]
            kind = {"int": int, "float": float, "bool": lambda v: v == "True"}.get(f.type, str)
            values[f.name] = kind(raw)
        return values

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    info = RunInfo(**typed(RunInfo, rows[0]))
    return [Record(**typed(Record, row)) for row in rows], info


def _variant(r: Record) -> tuple[str, str, bool, int]:
    return (r.dtype, r.out_dtype, r.output_lse, r.head_size)


def _providers(records: Sequence[Record]) -> list[str]:
    return list(dict.fromkeys(r.provider for r in records))


def _cell(r: Record | None) -> str:
    if r is None:
        return "-"
    if r.error:
        return "error"
    return f"{r.median_us:.2f} {r.gbps:.0f} {r.pct_of_peak:.0f}%"


def header_lines(info: RunInfo) -> list[str]:
    """The card, bandwidths and versions, as printed above the table."""
    l2 = "cold L2 (rotated input sets)" if info.cold_l2 else "warm L2"
    return [
        f"attnmerge bench on {info.gpu}: peak {info.peak_gbps:.0f} GB/s ({info.peak_source}), "
        f"copy {info.copy_gbps:.0f} GB/s (measured, read + write); {l2}",
        f"torch {info.torch_version}, triton {info.triton_version}, "
        f"attnmerge {info.attnmerge_version} (git {info.git_sha}); "
        f"do_bench_cudagraph median of 10 replays of {info.rep_ms} ms",
    ]


def format_table(records: Sequence[Record], info: RunInfo) -> str:
    """A compact table: one row per shape, one ``us GB/s %peak`` column per provider."""
    providers = _providers(records)
    show_lse = any(r.output_lse for r in records)
    key_names = ["dtype", "out", *(["lse"] if show_lse else []), "D", "T", "H"]
    rows: dict[tuple, dict[str, Record]] = {}
    floors: dict[tuple, float] = {}
    for r in records:
        key = (r.dtype, r.out_dtype, *(["yes" if r.output_lse else "no"] if show_lse else []))
        key = (*key, r.head_size, r.tokens, r.heads)
        rows.setdefault(key, {})[r.provider] = r
        floors[key] = r.floor_us
    header = [*key_names, *providers, "floor_us"]
    body = [
        [*(str(k) for k in key), *(_cell(cells.get(p)) for p in providers), f"{floors[key]:.2f}"]
        for key, cells in rows.items()
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    n_keys = len(key_names)

    def fmt(row: list[str]) -> str:
        parts = [
            v.ljust(w) if i < 2 else v.rjust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts[:n_keys]) + "  |  " + "  ".join(parts[n_keys:])

    lines = [
        *header_lines(info),
        "cells: median us, GB/s, % of peak; floor_us: minimal bytes / copy bandwidth",
        fmt(header),
        "-" * len(fmt(header)),
        *(fmt(row) for row in body),
    ]
    errors = dict.fromkeys(f"{r.provider}: {r.error}" for r in records if r.error)
    lines += [f"error: {e}" for e in errors]
    return "\n".join(lines)


_MAX_PLOT_ROWS = 12


def write_plot(path: str | Path, records: Sequence[Record], info: RunInfo) -> str | None:
    """GB/s vs tokens per provider, one panel per (dtype/output/D, heads) in a grid.

    Returns None when written, else why not (matplotlib missing, nothing to plot). At
    most the first 12 dtype/output/D combinations get a row of panels.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    ok = [r for r in records if not r.error and math.isfinite(r.gbps)]
    if not ok:
        return "no successful measurement to plot"
    variants = list(dict.fromkeys(_variant(r) for r in ok))[:_MAX_PLOT_ROWS]
    heads = list(dict.fromkeys(r.heads for r in ok))
    tokens = sorted({r.tokens for r in ok})
    providers = _providers(ok)
    fig = Figure(figsize=(3.2 * len(heads), 2.6 * len(variants) + 0.8), layout="constrained")
    axes = fig.subplots(len(variants), len(heads), squeeze=False, sharex=True)
    for i, variant in enumerate(variants):
        for j, h in enumerate(heads):
            ax = axes[i][j]
            for k, p in enumerate(providers):
                pts = sorted(
                    (r.tokens, r.gbps)
                    for r in ok
                    if _variant(r) == variant and r.heads == h and r.provider == p
                )
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, marker="o", markersize=3, label=p, color=f"C{k}")
            ax.axhline(info.peak_gbps, color="0.4", linestyle="--", linewidth=0.8)
            ax.axhline(info.copy_gbps, color="0.4", linestyle=":", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(tokens, labels=[str(t) for t in tokens])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            dtype, out, lse, d = variant
            ax.set_title(f"{dtype}->{out}{' +lse' if lse else ''} D={d} H={h}", fontsize=9)
            ax.tick_params(labelsize=7)
            if i == len(variants) - 1:
                ax.set_xlabel("tokens", fontsize=8)
            if j == 0:
                ax.set_ylabel("GB/s", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(providers), fontsize=8)
    l2 = "cold L2" if info.cold_l2 else "warm L2"
    fig.suptitle(
        f"attnmerge bench on {info.gpu} ({l2}; dashed: peak {info.peak_gbps:.0f} GB/s "
        f"{info.peak_source}, dotted: copy {info.copy_gbps:.0f} GB/s)",
        fontsize=10,
    )
    fig.savefig(path, dpi=100)
    return None


# ---------------------------------------------------------------------------
# Progress


class _Progress:
    """tqdm on a terminal if importable, else a one-line counter; on a log file (not a
    terminal), a plain line every ~10% so logs stay short."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total, self.done, self.enabled = total, 0, enabled and total > 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.enabled and self.stream.isatty()
        self.bar = None
        self._next_line = 0
        if self.tty:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, file=self.stream, unit="case", dynamic_ncols=True)

    def start(self, label: str) -> None:
        """Show the case about to run (so a hang names its case)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(label, refresh=True)
        elif self.tty:
            text = f"[{self.done + 1}/{self.total}] {label}"
            self.stream.write(f"\r{text:<70}")
            self.stream.flush()

    def advance(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        elif not self.tty and (self.done >= self._next_line or self.done == self.total):
            self.stream.write(f"bench: {self.done}/{self.total} cases\n")
            self.stream.flush()
            self._next_line = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------
# Inputs and the timed calls


def _views(n: int, shape: tuple[int, ...], dtype: torch.dtype, device, fill) -> list:
    """``n`` tensors of ``shape`` in one buffer, each starting on a 256-byte boundary."""
    numel = math.prod(shape)
    per = _SET_ALIGN_BYTES // dtype.itemsize
    stride = -(-numel // per) * per
    flat = torch.empty(n * stride, dtype=dtype, device=device)
    if fill is not None:
        fill(flat)
    return [flat[i * stride : i * stride + numel].view(shape) for i in range(n)]


def make_input_sets(case: Case, n_sets: int, device: torch.device | str) -> list[dict]:
    """``n_sets`` independent argument sets for one case (seeded; see the module doc)."""
    g = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[case.dtype]
    t, h, d = case.tokens, case.heads, case.head_size

    def normal(x: torch.Tensor) -> None:
        x.copy_(torch.randn(x.numel(), device=device, generator=g))

    def lse(x: torch.Tensor) -> None:
        v = torch.randn(x.numel(), device=device, generator=g) * 4
        empty = torch.rand(x.numel(), device=device, generator=g) < EMPTY_FRACTION
        x.copy_(v.masked_fill(empty, float("inf")))

    def views(shape, dt, fill=None):
        return _views(n_sets, shape, dt, device, fill)

    out_dtype = FP8 if case.fp8 else dtype
    columns = {
        "prefix_output": views((t, h, d), dtype, normal),
        "prefix_lse": views((h, t), torch.float32, lse),
        "suffix_output": views((t, h, d), dtype, normal),
        "suffix_lse": views((h, t), torch.float32, lse),
        "output": views((t, h, d), out_dtype),
        "output_lse": views((h, t), torch.float32) if case.output_lse else [None] * n_sets,
        # unfused: the merge's high-precision result, read back by the quantisation
        "tmp": views((t, h, d), dtype) if case.provider == "unfused" else [None] * n_sets,
    }
    return [{k: v[i] for k, v in columns.items()} for i in range(n_sets)]


def _quantize_into(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> None:
    out.copy_(quantize_fp8_static(x, scale))


@functools.cache
def _compiled_quantize_into() -> Callable[..., None]:
    # dynamic=True: one compile per dtype for the whole grid. Static shapes would compile
    # once per shape and hit dynamo's recompile limit (8) well inside the default grid,
    # after which calls silently run eagerly (three kernels instead of one).
    return torch.compile(_quantize_into, dynamic=True)


# The vLLM modules whose merge_attn_states the vllm providers call.
_VLLM_MODULES = {
    "vllm": "vllm.v1.attention.ops.merge_attn_states",
    "vllm-triton": "vllm.v1.attention.ops.triton_merge_attn_states",
}


def _vllm_merge_attn_states(provider: str = "vllm") -> Callable[..., None]:
    """vLLM's ``merge_attn_states`` of ``provider`` (same positional arguments as
    attnmerge's)."""
    module = _VLLM_MODULES[provider]
    try:
        return importlib.import_module(module).merge_attn_states
    except ImportError as e:
        raise ImportError(f"the {provider} provider needs vLLM ({module}): {e}") from e


def make_call(case: Case, sets: Sequence[dict], scale: torch.Tensor | None) -> Callable[[], None]:
    """The timed function: one merge per input set, in order."""
    import attnmerge

    def args(s: dict) -> tuple:
        return (s["prefix_output"], s["prefix_lse"], s["suffix_output"], s["suffix_lse"])

    if case.block_rows is not None:
        from .triton import load

        kernel = load().merge_two_states
        calls = [
            functools.partial(
                kernel, s["output"], *args(s), s["output_lse"], None, scale, False, case.block_rows
            )
            for s in sets
        ]
    elif case.cuda_variant:
        from .cuda import backend as cuda_backend

        calls = [
            functools.partial(
                cuda_backend.merge_two_states,
                s["output"],
                *args(s),
                s["output_lse"],
                None,
                scale,
                False,
                rows=case.cuda_rows,
                chunk_bytes=case.cuda_chunk_bytes,
                threads=case.cuda_block_threads,
                weights={
                    "t": cuda_backend.WEIGHTS_PER_THREAD,
                    "w": cuda_backend.WEIGHTS_WARP,
                }.get(case.cuda_weights),
            )
            for s in sets
        ]
    elif case.provider in ("cuda", "triton", "torch"):
        calls = [
            functools.partial(
                attnmerge.merge_attn_states,
                s["output"],
                *args(s),
                s["output_lse"],
                None,
                scale,
                backend=case.provider,
            )
            for s in sets
        ]
    elif case.provider in _VLLM_MODULES:
        merge = _vllm_merge_attn_states(case.provider)
        calls = [
            functools.partial(merge, s["output"], *args(s), s["output_lse"], None, scale)
            for s in sets
        ]
    elif case.provider in ("stream", "read"):
        from .triton import load

        load()  # Triton, with the interpreter's fixes when interpreting
        from .triton.stream_kernel import read_two_states, stream_two_states

        kernel = stream_two_states if case.provider == "stream" else read_two_states
        calls = [functools.partial(kernel, s["output"], *args(s), scale) for s in sets]
    elif case.provider == "stream-cuda":
        from .cuda.stream import stream_two_states as stream_cuda

        calls = [functools.partial(stream_cuda, s["output"], *args(s), scale) for s in sets]
    elif case.provider == "unfused":
        quant = _compiled_quantize_into()

        def unfused(s: dict) -> Callable[[], None]:
            def call() -> None:
                attnmerge.merge_attn_states(
                    s["tmp"], *args(s), s["output_lse"], None, None, backend="triton"
                )
                quant(s["output"], s["tmp"], scale)

            return call

        calls = [unfused(s) for s in sets]
    else:
        raise ValueError(f"unknown provider {case.provider!r}")
    if len(calls) == 1:
        return calls[0]

    def all_sets() -> None:
        for c in calls:
            c()

    return all_sets


Timer = Callable[[Callable[[], None]], tuple[float, float, float]]


def cudagraph_timer(rep_ms: int = DEFAULT_REP_MS) -> Timer:
    """(median, p20, p80) microseconds of ``fn``, by ``do_bench_cudagraph``.

    ``fn`` runs once eagerly first, so compiles and argument errors happen outside the
    graph capture.
    """

    def timer(fn: Callable[[], None]) -> tuple[float, float, float]:
        import triton.testing

        fn()
        torch.cuda.synchronize()
        p20, p50, p80 = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
        return p50 * 1e3, p20 * 1e3, p80 * 1e3

    return timer


# ---------------------------------------------------------------------------
# Device facts, versions


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    l2_bytes: int
    copy_bytes_per_s: float  # device-to-device copy, read + write counted


def copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    import triton.testing

    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return nbytes / (ms * 1e-3)


def probe_device(device: torch.device) -> DeviceInfo:
    """Name, L2 size and measured copy bandwidth of a CUDA device."""
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    return DeviceInfo(torch.cuda.get_device_name(device), l2_bytes, copy_bandwidth(str(device)))


def git_sha() -> str:
    """``git rev-parse --short HEAD`` of the checkout holding this file, with "-dirty"
    when its tracked files differ from HEAD (the numbers are then of uncommitted code),
    else "unknown"."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)

    try:
        out = git("rev-parse", "--short", "HEAD")
        sha = out.stdout.strip()
        if out.returncode != 0 or not sha:
            return "unknown"
        dirty = git("diff", "--quiet", "HEAD", "--").returncode == 1
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # a broken install may raise anything; the benchmark still reports
        return "not importable"
    return getattr(triton, "__version__", "unknown")


def run_info(dev: DeviceInfo, config: Config) -> RunInfo:
    import attnmerge

    sheet = datasheet_bandwidth(dev.name)
    copy_gbps = dev.copy_bytes_per_s / 1e9
    if sheet is not None:
        peak_gbps, source = sheet[0] / 1e9, f"datasheet {sheet[1]}"
    else:
        peak_gbps, source = copy_gbps, "measured copy (card not in the datasheet table)"
    return RunInfo(
        gpu=dev.name,
        torch_version=torch.__version__,
        triton_version=_triton_version(),
        attnmerge_version=attnmerge.__version__,
        git_sha=git_sha(),
        peak_gbps=peak_gbps,
        peak_source=source,
        copy_gbps=copy_gbps,
        cold_l2=config.cold_l2,
        rep_ms=config.rep_ms,
    )


# ---------------------------------------------------------------------------
# The run


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _check_writable(path: str | None, what: str) -> str | None:
    if path and not Path(path).resolve().parent.is_dir():
        return f"{what}: directory of {path} does not exist"
    return None


def run(
    config: Config,
    *,
    device: torch.device | str = "cuda",
    timer: Timer | None = None,
    device_info: DeviceInfo | None = None,
    out: TextIO | None = None,
) -> int:
    """Measure every case of ``config``, print the table, write the CSV and plot.

    ``device``, ``timer`` and ``device_info`` are for tests: with a fake timer and
    device facts, the whole flow runs on CPU tensors. Returns 0, or 2 when no GPU is
    visible (for a CUDA device) or an output path is unusable.
    """
    out = out if out is not None else sys.stdout
    device = torch.device(device)
    for problem in (_check_writable(config.csv, "--csv"), _check_writable(config.plot, "--plot")):
        if problem:
            print(f"attnmerge bench: {problem}", file=sys.stderr)
            return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(
            "attnmerge bench: needs a CUDA GPU, and none is visible "
            f"(torch {torch.__version__}, {build}; torch.cuda.is_available() is False)",
            file=sys.stderr,
        )
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    timer = timer if timer is not None else cudagraph_timer(config.rep_ms)
    dev = device_info if device_info is not None else probe_device(device)
    info = run_info(dev, config)
    cases = build_cases(config)
    print(
        f"attnmerge bench: {len(cases)} cases on {info.gpu} "
        f"(copy bandwidth {info.copy_gbps:.0f} GB/s)",
        file=out,
        flush=True,
    )
    scale = torch.tensor([FP8_SCALE], device=device)
    records = []
    progress = _Progress(len(cases), config.progress)
    try:
        for case in cases:
            progress.start(
                f"{case.dtype}->{case.out_dtype} D={case.head_size} T={case.tokens} "
                f"H={case.heads} {case.provider}"
            )
            n_sets = cold_l2_sets(case.input_bytes(), dev.l2_bytes) if config.cold_l2 else 1
            try:
                sets = make_input_sets(case, n_sets, device)
                fn = make_call(case, sets, scale if case.fp8 else None)
                med, p20, p80 = timer(fn)
                times = (med / n_sets, p20 / n_sets, p80 / n_sets)
                records.append(make_record(case, n_sets, times, info))
            except Exception as e:  # one provider failing a case must not end the run
                records.append(make_record(case, n_sets, None, info, error=_one_line(e)))
            finally:
                sets = fn = None  # free this case's buffers before the next one's
            progress.advance()
    finally:
        progress.close()

    print(format_table(records, info), file=out)
    if config.csv:
        write_csv(config.csv, records, info)
        print(f"wrote {config.csv} ({len(records)} rows)", file=out)
    if config.plot:
        skipped = write_plot(config.plot, records, info)
        print(f"plot skipped: {skipped}" if skipped else f"wrote {config.plot}", file=out)
    if config.host_overhead:
        print("host overhead per eager call (us), T=1 H=8 D=128 bf16 -> FP8:", file=out)
        for name, us in host_overhead_us(device).items():
            value = f"{us:7.2f}" if isinstance(us, float) else us
            print(f"{name:>45}: {value}", file=out)
    return 0


def host_overhead_us(device: torch.device | str = "cuda", calls: int = 2000) -> dict:
    """Host time per eager call (T=1, H=8, D=128 bf16 -> FP8), by layer.

    The kernels are tiny, so with the GPU idle the host is the bottleneck and the
    wall time per call over many back-to-back calls is the host overhead. A layer
    that cannot run here gets its error message instead of a number.
    """
    import attnmerge
    from attnmerge import api

    case = Case("bf16", True, False, 128, 1, 8, "triton")
    s = make_input_sets(case, 1, device)[0]
    scale = torch.tensor([FP8_SCALE], device=device)
    args = (s["output"], s["prefix_output"], s["prefix_lse"], s["suffix_output"], s["suffix_lse"])

    def cuda_launch() -> None:
        from attnmerge.cuda import backend as cuda_backend

        cuda_backend.merge_two_states(*args, None, None, scale, False)

    def driver_launch() -> Callable[[], None]:
        from attnmerge.cuda import backend as cuda_backend

        kernel, grid, params = cuda_backend.launch_arguments(*args, None, None, scale, False)
        stream = torch.cuda.current_stream(device).cuda_stream
        return lambda: kernel.launch(grid, stream, params)

    small = torch.ones(8, device=device)

    def triton_launch() -> None:
        from attnmerge.triton import load

        load().merge_two_states(*args, None, None, scale, False)

    cases = {
        "merge_attn_states (cuda, public API)": lambda: attnmerge.merge_attn_states(
            *args, None, None, scale, backend="cuda"
        ),
        "cuda launch only": cuda_launch,
        "  of which cuLaunchKernel (ctypes)": driver_launch,
        "merge_attn_states (triton, public API)": lambda: attnmerge.merge_attn_states(
            *args, None, None, scale, backend="triton"
        ),
        "argument checks only": lambda: api._validate(
            *args, None, None, scale, "e", "triton", True
        ),
        "Triton launch only": triton_launch,
        "torch.ops dispatcher path": lambda: torch.ops.attnmerge.merge_attn_states(
            *args, None, None, scale, False, "triton"
        ),
        "for scale: torch.add(out=), 8 floats": lambda: torch.add(small, small, out=small),
    }
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    result: dict[str, float | str] = {}
    for name, fn in cases.items():
        try:
            if fn is driver_launch:  # packs its arguments once, outside the timing
                fn = driver_launch()
            for _ in range(50):
                fn()
        except Exception as e:
            result[name] = _one_line(e)
            continue
        sync()
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls // 5):
                fn()
            sync()
            samples.append((time.perf_counter() - t0) / (calls // 5) * 1e6)
        result[name] = statistics.median(samples)
    return result


def replot(path: str, plot: str | None, out: TextIO | None = None) -> int:
    """Print the table of a CSV written by an earlier run; write ``plot`` from it."""
    out = out if out is not None else sys.stdout
    try:
        records, info = read_csv(path)
    except (OSError, KeyError, ValueError) as e:
        print(f"attnmerge bench: --from-csv {path}: {_one_line(e)}", file=sys.stderr)
        return 2
    print(format_table(records, info), file=out)
    if plot:
        problem = write_plot(plot, records, info)
        print(f"plot skipped: {problem}" if problem else f"wrote {plot}", file=out)
    return 0


def run_args(args: argparse.Namespace) -> int:
    """Run ``attnmerge bench`` from its parsed options."""
    if args.from_csv:
        return replot(args.from_csv, args.plot)
    return run(config_from_args(args))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m attnmerge.bench``: the same as ``attnmerge bench``."""
    try:
        args = _parser("python -m attnmerge.bench").parse_args(argv)
    except SystemExit as e:  # --help, usage errors
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    return run_args(args)


if __name__ == "__main__":
    raise SystemExit(main())
