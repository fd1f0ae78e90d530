"""The K-way figures, read off a CSV of ``benchmarks.kway`` (or ``attnmerge bench --kway``).

    python -m benchmarks.kway_summary kway.csv

No GPU needed. Speed-ups are the other provider's median time over attnmerge ``cuda``'s
at the same shape (above 1: ``cuda`` is faster), geometric means over the shapes where
both ran; a provider's failures are counted and its first error quoted. Printed, where
the CSV has the providers:

* ``cuda`` against ``flashinfer`` (bf16 out), fixed and variable K: the geometric mean,
  range and count, and a table of the speed-up per shape (rows K x H, columns T); the
  same for ``cuda-tkhd`` (``cuda`` on FlashInfer's layout);
* FP8 out: ``cuda`` against ``flashinfer+quant`` (and ``unfused``, ``chained``);
  bf16 out: against ``chained``;
* ``cuda``'s GB/s as a percentage of ``copy``'s (a copy moving as many bytes) at T x H >=
  131072 rows, for every K: the range over those shapes per output and fixed/variable K;
* T = 1, K = 16: ``cuda``'s time (and ``flashinfer``'s) per H.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

from attnmerge import bench

LARGE_ROWS = 131072
VARIANTS = ((False, "fixed K"), (True, "variable K"))


def geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs))


def load(path: str | Path) -> tuple[dict, dict, bench.RunInfo]:
    """Successful records by (variable, out dtype, K, T, H) then provider; failures by
    provider: (first error, the keys where it failed); the run info."""
    records, info = bench.read_csv(path)
    by_shape: dict = defaultdict(dict)
    failed: dict = {}
    for r in records:
        if r.partials is None:
            continue  # a two-way row
        key = (r.variable, r.out_dtype, r.partials, r.tokens, r.heads)
        if r.error or not r.median_us > 0:
            failed.setdefault(r.provider, (r.error or "no time", set()))[1].add(key)
        else:
            by_shape[key][r.provider] = r
    return dict(by_shape), failed, info


def speedups(by_shape: dict, other: str, out: str, variable: bool, base: str = "cuda") -> dict:
    """{(K, T, H): other's time / base's} at the shapes of one output and variant."""
    return {
        key[2:]: rows[other].median_us / rows[base].median_us
        for key, rows in by_shape.items()
        if key[:2] == (variable, out) and other in rows and base in rows
    }


def _speedup_line(label: str, ratios: dict, base: str = "cuda") -> str:
    xs = list(ratios.values())
    return (
        f"{label}: {geomean(xs):.3f}x geometric mean over {len(xs)} shapes "
        f"({min(xs):.2f}x to {max(xs):.2f}x; {base} faster at {sum(x > 1 for x in xs)})"
    )


def _matrix(ratios: dict, failed: set = frozenset()) -> list[str]:
    """Rows K x H, columns T, cells the speed-up: 'failed' where a shape's key (K, T, H) is
    in ``failed``, '-' where a provider has no time."""
    shapes = set(ratios) | set(failed)
    tokens = sorted({t for _, t, _ in shapes})
    rows = sorted({(k, h) for k, _, h in shapes}, key=lambda kh: (kh[0], -kh[1]))
    lines = ["     K    H" + "".join(f"{f'T={t}':>9}" for t in tokens)]
    for k, h in rows:
        cells = [
            f"{ratios[k, t, h]:.2f}x" if (k, t, h) in ratios else "failed" * ((k, t, h) in failed)
            for t in tokens
        ]
        lines.append(f"  {k:>4} {h:>4}" + "".join(f"{c or '-':>9}" for c in cells))
    return lines


def _range(xs: list[float]) -> str:
    low, high = f"{min(xs):.1f}", f"{max(xs):.1f}"
    return f"{low}%" if low == high else f"{low}-{high}%"


def copy_shares(by_shape: dict, out: str, variable: bool) -> dict:
    """{K: [cuda GB/s / copy GB/s in %]} at T x H >= LARGE_ROWS."""
    shares: dict = defaultdict(list)
    for (var, o, k, t, h), rows in sorted(by_shape.items()):
        if (var, o) == (variable, out) and t * h >= LARGE_ROWS and {"cuda", "copy"} <= set(rows):
            shares[k].append(100 * rows["cuda"].gbps / rows["copy"].gbps)
    return dict(shares)


def report(path: str | Path) -> str:
    by_shape, failed, info = load(path)
    if not by_shape:
        raise SystemExit(f"{path}: no K-way measurements")
    outs = sorted({key[1] for key in by_shape})
    lines = [
        f"K-way summary of {Path(path).name}: {info.gpu}, git {info.git_sha}, "
        f"{len({(v, *rest) for v, _, *rest in by_shape})} shapes (K, T, H, fixed or variable K) "
        f"x output {'/'.join(outs)}, copy {info.copy_gbps:.0f} GB/s "
        "(measured); speed-up = other's time / cuda's"
    ]
    for name, (error, keys) in sorted(failed.items()):
        lines.append(f"{name} failed at {len(keys)} cases, first: {error}")
    for base in ("cuda", "cuda-tkhd"):  # cuda-tkhd: on FlashInfer's own inputs
        for variable, label in VARIANTS:
            ratios = speedups(by_shape, "flashinfer", "bf16", variable, base=base)
            if ratios:
                lines.append(
                    _speedup_line(f"{base} vs flashinfer, bf16 out, {label}", ratios, base)
                )
            if ratios and base == "cuda":
                fails = failed.get("flashinfer", ("", set()))[1]
                fails = {key[2:] for key in fails if key[:2] == (variable, "bf16")}
                lines += _matrix(ratios, fails)
    fp8 = ("flashinfer+quant", "unfused", "chained")
    for out, others in (("fp8", fp8), ("bf16", ("chained",))):
        for other in others:
            for variable, label in VARIANTS:
                ratios = speedups(by_shape, other, out, variable)
                if ratios:
                    lines.append(_speedup_line(f"cuda vs {other}, {out} out, {label}", ratios))
    for out in outs:
        for variable, label in VARIANTS:
            shares = copy_shares(by_shape, out, variable)
            if shares:
                lines.append(
                    f"cuda % of copy rate at T x H >= {LARGE_ROWS}, {out} out, {label}: "
                    + ", ".join(f"K={k} {_range(x)}" for k, x in shares.items())
                )
    t1 = [(key, rows) for key, rows in by_shape.items() if key[2:4] == (16, 1) and "cuda" in rows]
    for (variable, out, _, _, h), rows in sorted(t1, key=lambda kv: (*kv[0][:2], -kv[0][4])):
        peers = [
            f"{p} {rows[p].median_us:.2f}" for p in ("flashinfer", "flashinfer+quant") if p in rows
        ]
        lines.append(
            f"T = 1, K = 16, H = {h}, {out} out, {VARIANTS[variable][1]}: cuda "
            f"{rows['cuda'].median_us:.2f} us" + (f" ({', '.join(peers)})" if peers else "")
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path, help="a CSV of benchmarks.kway")
    print(report(parser.parse_args().csv))


if __name__ == "__main__":
    main()
