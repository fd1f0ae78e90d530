"""GB/s against tokens from an ``attnmerge bench`` (or ``benchmarks.grid``) CSV.

    python -m benchmarks.plot results.csv results.png

prints the CSV's table and writes one panel per (dtype, output, D) and head count, one
line per provider, with the datasheet (dashed) and copy (dotted) bandwidths; at most the
first 12 dtype/output/D combinations get a row of panels. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from attnmerge import bench

_MAX_ROWS = 12


def write_plot(path: str | Path, records: Sequence, info) -> str | None:
    """Write the PNG; None when written, else why not (no matplotlib, nothing to plot)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    ok = [r for r in records if not r.error and math.isfinite(r.gbps)]
    if not ok:
        return "no successful measurement to plot"

    def variant(r) -> tuple:
        return r.dtype, r.out_dtype, r.output_lse, r.head_size

    variants = list(dict.fromkeys(map(variant, ok)))[:_MAX_ROWS]
    heads = list(dict.fromkeys(r.heads for r in ok))
    tokens = sorted({r.tokens for r in ok})
    providers = list(dict.fromkeys(r.provider for r in ok))
    fig = Figure(figsize=(3.2 * len(heads), 2.6 * len(variants) + 0.8), layout="constrained")
    axes = fig.subplots(len(variants), len(heads), squeeze=False, sharex=True)
    for i, v in enumerate(variants):
        for j, h in enumerate(heads):
            ax = axes[i][j]
            for k, p in enumerate(providers):
                pts = sorted(
                    (r.tokens, r.gbps)
                    for r in ok
                    if variant(r) == v and r.heads == h and r.provider == p
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
            dtype, out, lse, d = v
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


def main(argv: Sequence[str] | None = None) -> int:
    """Print a CSV's table and write its plot."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__)
    p.add_argument("csv", help="a CSV written by attnmerge bench --csv")
    p.add_argument("png", nargs="?", help="where to write the plot (none: the table only)")
    args = p.parse_args(argv)
    records, info = bench.read_csv(args.csv)
    print(bench.format_table(records, info))
    if args.png:
        problem = write_plot(args.png, records, info)
        print(f"plot skipped: {problem}" if problem else f"wrote {args.png}")
        return 1 if problem else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
