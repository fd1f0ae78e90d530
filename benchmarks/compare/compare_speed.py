#!/usr/bin/env python
"""GPU device time of two versions of attnmerge, shape by shape, on vLLM's grid.

For every shape of vLLM's ``merge_attn_states`` benchmark (tokens {1, 16, 64, 256, 1024,
4096} x heads {128, 64, 32, 16, 8, 4} x D = 128 x fp32/fp16/bf16 partials, FP8 output with
a 1-element scale, 5% of the LSEs +inf) and each backend (cuda, triton), the base
revision's ``merge_attn_states`` (``attnmerge_base``, see ``versions.py``) and the working
tree's (or ``--new-rev``'s) are timed on the same input sets:

* one CUDA graph per version holds many calls, rotating over input sets whose footprint,
  between two uses of one set, exceeds twice the L2 cache;
* before each timed replay a read of twice the L2 size evicts everything, so every call
  of the replay starts from cold L2 (the read is outside the timed events);
* replays of the two versions alternate (base, new, new, base, ...) over several rounds,
  so clock and thermal drift fall on both alike; a sleep kernel at the start of each round
  keeps the GPU busy while the host queues the round, so no host gap is timed;
* per version the median over all replays of (replay time / calls per replay) is the
  time of one call, in microseconds.

A shape whose ratio new/base is off by more than ``--tolerance`` is measured once more
(twice the rounds) and judged on that measurement. The exit status is 1 if any shape is
still off, else 0 (2 without a GPU). A CSV with the GPU name, torch/Triton/CUDA versions
and both revisions is written to ``--csv``.

Run from the repository root::

    .venv/bin/python benchmarks/compare/compare_speed.py [--output-lse] [--out bf16]
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import versions  # the directory above is not a package: found through sys.path

TOKENS = (1, 16, 64, 256, 1024, 4096)
HEADS = (128, 64, 32, 16, 8, 4)
HEAD_SIZE = 128
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OUT_DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}
FP8_SCALE = 0.1
EMPTY_FRACTION = 0.05  # share of +inf LSEs (empty partial rows), as vLLM's benchmark
# Rough bandwidth for sizing a graph: calls per replay ~ target time / estimated call.
_EST_BYTES_PER_US = 2.5e6
_MIN_CALL_US = 2.0
_MAX_CALLS = 512


@dataclass(frozen=True)
class Shape:
    tokens: int
    heads: int
    dtype: str

    def label(self) -> str:
        return f"{self.dtype} {self.tokens}x{self.heads}"


@dataclass
class Timing:
    """Per-call microseconds of one version at one shape: median and spread."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quantile(self, q: float) -> float:
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(q * len(s)))]


class InputSets:
    """Distinct input/output sets of one shape, shared by both versions and backends."""

    def __init__(self, shape: Shape, out_dtype: torch.dtype, output_lse: bool, l2: int, calls):
        T, H, D = shape.tokens, shape.heads, HEAD_SIZE
        dtype = DTYPES[shape.dtype]
        itemsize = torch.empty((), dtype=dtype).element_size()
        out_size = torch.empty((), dtype=out_dtype).element_size()
        self.bytes_per_set = T * H * D * (2 * itemsize + out_size) + T * H * 4 * (2 + output_lse)
        # Between two uses of a set, more than twice the L2 of other sets' traffic.
        count = max(1, math.ceil(2 * l2 / self.bytes_per_set) + 1)
        self.count = min(count, calls)
        g = torch.Generator(device="cuda")
        g.manual_seed(T * 1000 + H)
        self.sets = []
        for _ in range(self.count):
            lses = []
            for _ in range(2):
                lse = torch.randn(H, T, device="cuda", generator=g) * 4
                empty = torch.rand(H, T, device="cuda", generator=g) < EMPTY_FRACTION
                lses.append(lse.masked_fill_(empty, math.inf))
            self.sets.append(
                (
                    torch.empty(T, H, D, device="cuda", dtype=out_dtype),
                    torch.randn(T, H, D, device="cuda", generator=g).to(dtype),
                    lses[0],
                    torch.randn(T, H, D, device="cuda", generator=g).to(dtype),
                    lses[1],
                    torch.empty(H, T, device="cuda") if output_lse else None,
                )
            )
        fp8 = out_dtype == torch.float8_e4m3fn
        self.scale = torch.tensor([FP8_SCALE], device="cuda") if fp8 else None


def calls_per_graph(shape: Shape, out_dtype: torch.dtype, target_us: float) -> int:
    """Calls in one graph so that a replay takes about ``target_us``."""
    itemsize = DTYPES[shape.dtype].itemsize
    nbytes = shape.tokens * shape.heads * HEAD_SIZE * (2 * itemsize + out_dtype.itemsize)
    est = max(_MIN_CALL_US, nbytes / _EST_BYTES_PER_US)
    return max(2, min(_MAX_CALLS, round(target_us / est)))


def capture(pkg, backend: str, inputs: InputSets, calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` merges through ``pkg``'s public API, rotating sets."""

    def call(s):
        out, p, pl, sfx, sl, ol = s
        pkg.merge_attn_states(out, p, pl, sfx, sl, ol, None, inputs.scale, backend=backend)

    # Outside the capture: kernel builds, loads and the launch path's first-call checks.
    for s in inputs.sets[:2] * 2:
        call(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(inputs.sets[i % inputs.count])
    torch.cuda.synchronize()
    return graph


class Timer:
    """Times graph replays from cold L2, alternating between graphs."""

    def __init__(self, l2: int):
        self.flush = torch.empty(max(2 * l2, 1 << 20) // 4, device="cuda").normal_()
        self.sink = torch.empty((), device="cuda")

    def run(self, graphs: list, calls: int, rounds: int, reps: int) -> list[Timing]:
        samples: list[list[float]] = [[] for _ in graphs]
        for r in range(rounds):
            torch.cuda._sleep(2_000_000)  # ~1 ms: the host queues the round meanwhile
            events = []
            for k in range(reps):
                order = range(len(graphs)) if (r + k) % 2 == 0 else reversed(range(len(graphs)))
                for i in order:
                    torch.sum(self.flush, dim=0, out=self.sink)  # a read: leaves L2 clean
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    graphs[i].replay()
                    end.record()
                    events.append((i, start, end))
            torch.cuda.synchronize()
            for i, start, end in events:
                samples[i].append(start.elapsed_time(end) * 1e3 / calls)
        return [Timing(s) for s in samples]


def measure(pkgs, backend: str, inputs: InputSets, calls: int, timer: Timer, rounds, reps):
    graphs = [capture(pkg, backend, inputs, calls) for pkg in pkgs]
    try:
        return timer.run(graphs, calls, rounds, reps)
    finally:
        del graphs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Device time of two attnmerge revisions.")
    p.add_argument("--base-rev", default=versions.DEFAULT_BASE_REV, help="default c9a2f13")
    p.add_argument("--new-rev", help="a revision instead of the working tree")
    p.add_argument("--repo", default=str(versions.REPO_ROOT), help="git repository")
    p.add_argument("--backends", default="cuda,triton", help="comma-separated")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--heads", default=",".join(map(str, HEADS)))
    p.add_argument("--dtypes", default=",".join(DTYPES), help="partial dtypes")
    p.add_argument("--out", choices=tuple(OUT_DTYPES), default="fp8", help="output dtype")
    p.add_argument("--output-lse", action="store_true", help="also write the output LSE")
    p.add_argument("--tolerance", type=float, default=0.02, help="max |new/base - 1|")
    p.add_argument("--rounds", type=int, default=6, help="rounds of alternating replays")
    p.add_argument("--reps", type=int, default=8, help="replays per version per round")
    p.add_argument("--target-us", type=float, default=400.0, help="device time per replay")
    p.add_argument("--csv", default="compare_speed.csv", help="CSV output path")
    return p.parse_args(argv)


def _versions_line() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton_version,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("compare_speed: needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    base = versions.load_base(args.base_rev, args.repo)
    new = versions.load_new(args.new_rev, args.repo)
    meta = _versions_line()
    meta["base_rev"] = base.__git_revision__
    meta["new_rev"] = new.__git_revision__
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    out_dtype = OUT_DTYPES[args.out]
    backends = [b for b in args.backends.split(",") if b]
    shapes = [
        Shape(t, h, d)
        for d in args.dtypes.split(",")
        for t in map(int, args.tokens.split(","))
        for h in map(int, args.heads.split(","))
    ]
    print(f"base: {versions.describe(base)}\nnew:  {versions.describe(new)}")
    print(
        f"{meta['gpu']} (L2 {l2 >> 20} MiB), torch {meta['torch']}, CUDA {meta['cuda']}, "
        f"triton {meta['triton']}; D={HEAD_SIZE}, out {args.out}, output LSE "
        f"{'on' if args.output_lse else 'off'}; {len(shapes)} shapes x {backends}"
    )
    timer = Timer(l2)
    rows = []
    errors: list[str] = []
    header = f"{'backend':>7} {'shape':>15} {'calls':>5} {'sets':>4} {'base us':>9} {'new us':>9}"
    print(header + f" {'ratio':>7}")
    for shape in shapes:
        calls = calls_per_graph(shape, out_dtype, args.target_us)
        inputs = InputSets(shape, out_dtype, args.output_lse, l2, calls)
        for backend in backends:
            try:
                timings = measure(
                    (base, new), backend, inputs, calls, timer, args.rounds, args.reps
                )
            except Exception as e:  # e.g. a backend that cannot serve the shape
                errors.append(f"{backend} {shape.label()}: {type(e).__name__}: {e}")
                print(f"{backend:>7} {shape.label():>15} ERROR {errors[-1]}", flush=True)
                torch.cuda.synchronize()
                continue
            first = timings[1].median / timings[0].median
            remeasured = abs(first - 1) > args.tolerance
            if remeasured:
                timings = measure(
                    (base, new), backend, inputs, calls, timer, 2 * args.rounds, args.reps
                )
            ratio = timings[1].median / timings[0].median
            off = abs(ratio - 1) > args.tolerance
            note = f"  (first {first:.3f}, re-measured)" if remeasured else ""
            print(
                f"{backend:>7} {shape.label():>15} {calls:>5} {inputs.count:>4} "
                f"{timings[0].median:9.2f} {timings[1].median:9.2f} {ratio:7.3f}"
                f"{' OFF' if off else ''}{note}",
                flush=True,
            )
            rows.append(
                {
                    **meta,
                    "backend": backend,
                    "dtype": shape.dtype,
                    "tokens": shape.tokens,
                    "heads": shape.heads,
                    "head_size": HEAD_SIZE,
                    "out_dtype": args.out,
                    "output_lse": int(args.output_lse),
                    "calls_per_graph": calls,
                    "input_sets": inputs.count,
                    "base_us": f"{timings[0].median:.4f}",
                    "new_us": f"{timings[1].median:.4f}",
                    "ratio": f"{ratio:.5f}",
                    "base_p20_us": f"{timings[0].quantile(0.2):.4f}",
                    "base_p80_us": f"{timings[0].quantile(0.8):.4f}",
                    "new_p20_us": f"{timings[1].quantile(0.2):.4f}",
                    "new_p80_us": f"{timings[1].quantile(0.8):.4f}",
                    "samples": len(timings[0].samples),
                    "first_ratio": f"{first:.5f}",
                    "remeasured": int(remeasured),
                    "off": int(off),
                }
            )
        del inputs
        torch.cuda.empty_cache()

    if not rows:
        print("no shape was measured", file=sys.stderr)
        return 1
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nCSV: {args.csv}")
    failed = False
    for backend in [*backends, "all"]:
        ratios = [float(r["ratio"]) for r in rows if backend in ("all", r["backend"])]
        worst = max(ratios, key=lambda x: abs(x - 1))
        geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        off = sum(abs(x - 1) > args.tolerance for x in ratios)
        again = sum(r["remeasured"] for r in rows if backend in ("all", r["backend"]))
        print(
            f"{backend:>7}: {len(ratios)} shapes, max |ratio-1| {abs(worst - 1):.4f} "
            f"(ratio {worst:.3f}), geometric mean {geo:.4f}, re-measured {again}, "
            f"beyond {args.tolerance:.1%}: {off}"
        )
        failed |= backend == "all" and off > 0
    for error in errors:
        print(f"ERROR {error}")
    failed |= bool(errors)
    print(f"wall time {time.perf_counter() - started:.0f} s")
    print("FAIL: speed differs" if failed else f"PASS: every shape within {args.tolerance:.1%}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
