"""attnmerge against a baseline, from ``attnmerge bench`` CSVs: a summary table and one plot.

    python -m benchmarks.speedup docs/results/bench-h100.csv docs/results/bench-h200.csv \\
        --plot docs/results/speedup.png

For each CSV (one card each) and each partial dtype: the geometric mean and the range of
the baseline's time over attnmerge's at the shapes both measured, how many shapes
attnmerge is faster at, and both times at T = 1. The plot has one panel per card (its
``gpu`` column): the speed-up at each shape against the rows merged (tokens x heads), a
dot per shape and, per partial dtype, a line through the geometric mean at each row
count. Defaults: ``--provider cuda --baseline vllm``, the FP8 output without the output
LSE. Needs matplotlib for ``--plot``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from attnmerge import bench


@dataclass(frozen=True)
class Point:
    """One shape both providers measured."""

    dtype: str
    tokens: int
    heads: int
    ours_us: float
    baseline_us: float

    @property
    def speedup(self) -> float:
        return self.baseline_us / self.ours_us


def points(path: str, provider: str, baseline: str, out_dtype: str, output_lse: bool):
    """The card's name and the shapes of one CSV that both providers measured."""
    records, info = bench.read_csv(path)
    times: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r.error or not math.isfinite(r.median_us) or r.provider not in (provider, baseline):
            continue
        if r.out_dtype != out_dtype or r.output_lse != output_lse:
            continue
        times.setdefault((r.dtype, r.tokens, r.heads), {})[r.provider] = r.median_us
    found = [
        Point(dtype, tokens, heads, t[provider], t[baseline])
        for (dtype, tokens, heads), t in times.items()
        if provider in t and baseline in t
    ]
    return info.gpu, found


def summary_lines(gpu: str, pts: Sequence[Point], provider: str, baseline: str) -> list[str]:
    lines = []
    for dtype in [*sorted({p.dtype for p in pts}), "all"]:
        sel = [p for p in pts if dtype in ("all", p.dtype)]
        speedups = [p.speedup for p in sel]
        gm = math.exp(sum(map(math.log, speedups)) / len(speedups))
        faster = sum(s > 1 for s in speedups)
        t1 = [p for p in sel if p.tokens == 1]
        t1_text = ""
        if t1:
            ours = f"{min(p.ours_us for p in t1):.2f}-{max(p.ours_us for p in t1):.2f}"
            theirs = f"{min(p.baseline_us for p in t1):.2f}-{max(p.baseline_us for p in t1):.2f}"
            t1_text = f"; T=1: {ours} us vs {theirs} us"
        lines.append(
            f"{gpu} {dtype}: {provider} vs {baseline} {gm:.3f}x geometric mean "
            f"({min(speedups):.2f}x to {max(speedups):.2f}x), faster at {faster} of "
            f"{len(sel)}{t1_text}"
        )
    return lines


def write_plot(path: str, cards: Sequence[tuple[str, Sequence[Point]]], provider, baseline):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(cards), 3.6), layout="constrained")
    axes = fig.subplots(1, len(cards), squeeze=False, sharey=True)[0]
    for ax, (gpu, pts) in zip(axes, cards, strict=True):
        for i, dtype in enumerate(sorted({p.dtype for p in pts})):
            sel = [p for p in pts if p.dtype == dtype]
            ax.scatter(
                [p.tokens * p.heads for p in sel],
                [p.speedup for p in sel],
                s=6,
                color=f"C{i}",
                alpha=0.45,
                linewidths=0,
            )
            by_rows: dict[int, list[float]] = {}
            for p in sel:
                by_rows.setdefault(p.tokens * p.heads, []).append(math.log(p.speedup))
            xs = sorted(by_rows)
            ys = [math.exp(sum(by_rows[x]) / len(by_rows[x])) for x in xs]
            ax.plot(xs, ys, color=f"C{i}", linewidth=1.2, label=f"{dtype} partials")
        ax.axhline(1.0, color="0.3", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rows merged (tokens x heads)", fontsize=8)
        ax.set_title(gpu, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"speed-up of {provider} over {baseline}", fontsize=8)
    axes[0].set_ylim(bottom=0.8)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[0].legend(handles, labels, loc="lower left", fontsize=7)
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.speedup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("csvs", nargs="+", help="CSVs of attnmerge bench, one card each")
    p.add_argument("--provider", default="cuda")
    p.add_argument("--baseline", default="vllm")
    p.add_argument("--out-dtype", default="fp8", help="the output dtype compared (fp8)")
    p.add_argument("--output-lse", action="store_true", help="the cases with the output LSE")
    p.add_argument("--plot", metavar="PNG", help="also write the plot")
    args = p.parse_args(argv)
    cards = []
    for path in args.csvs:
        gpu, pts = points(path, args.provider, args.baseline, args.out_dtype, args.output_lse)
        if not pts:
            print(f"{path}: no shape measured by both {args.provider} and {args.baseline}")
            return 1
        cards.append((gpu, pts))
        print("\n".join(summary_lines(gpu, pts, args.provider, args.baseline)))
    if args.plot:
        write_plot(args.plot, cards, args.provider, args.baseline)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
