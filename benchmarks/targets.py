"""The performance targets, read off one CSV of the whole benchmark grid.

Run after ``scripts/gpu_check.sh bench`` (which runs it on its CSV), or on any CSV of
``attnmerge bench`` or ``benchmarks.grid`` with the providers cuda and vllm; the targets
that need other providers (triton, stream, stream-cuda, read, vllm-triton) or large shapes
are reported where the CSV has them, so the output-LSE and non-FP8 grids
(``gpu_check.sh bench-lse bench-nofp8``) read too:

    python -m benchmarks.targets bench.csv

Targets: ``cuda`` at or below vLLM's CUDA kernel at every shape,
a geometric-mean speed-up of at least 1.3x, T = 1 in at most 1.3 us, at least 92% of
the datasheet bandwidth at T x H >= 131072 rows, ``triton`` within 1.1x of ``cuda``
there and at least 3x faster than vLLM's Triton kernel everywhere.

Two bounds say where a target is out of reach for any kernel on the card:

* HBM: the reads at the fastest read-only rate of the run (the ``read`` yardstick, which
  writes nothing, on inputs of at least 200 MB) and the writes at the rate the run's
  device-to-device copy implies once its reads are counted at that rate. Reads and
  writes share HBM's data bus, so a mix of them takes at least the sum; the bound is that
  sum's bandwidth.
* 3x vLLM Triton: a shape whose 3x time is below every yardstick's (``read``, ``stream``,
  ``stream-cuda``: kernels that move the merge's bytes, or only its reads, with no math).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

_LARGE_ROWS = 131072
_YARDSTICKS = ("read", "stream", "stream-cuda")
# The read-only rate is taken where the inputs are at least four times the L2 (50 MB on
# H100 and H200): a warm-L2 replay of a smaller shape reads part of them from L2.
_HBM_READ_MIN_BYTES = 200e6


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs))


def load(path: Path) -> tuple[dict, dict]:
    """Rows by (dtype, tokens, heads) then provider, and the run's first row. A CSV of
    both output-LSE cases gives the rows without one."""
    rows = []
    with path.open() as f:
        rows = [row for row in csv.DictReader(f) if not row["error"]]
    kinds = {row["output_lse"] for row in rows}
    kind = "False" if "False" in kinds else "True"
    by_shape: dict = defaultdict(dict)
    first: dict = {}
    for row in rows:
        if row["output_lse"] == kind:
            first = first or row
            by_shape[(row["dtype"], int(row["tokens"]), int(row["heads"]))][row["provider"]] = row
    return by_shape, first


def _have(us: dict, shapes: list, providers: tuple[str, ...]) -> bool:
    return bool(shapes) and all(p in us[s] for s in shapes for p in providers)


def _output_bytes(row: dict) -> int:
    itemsize = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}[row["out_dtype"]]
    return int(row["tokens"]) * int(row["heads"]) * int(row["head_size"]) * itemsize


def _input_bytes(row: dict) -> float:
    return float(row["bytes"]) - _output_bytes(row)


def hbm_bound(by_shape: dict, copy_gbps: float) -> tuple[float, float, dict]:
    """(read GB/s, write GB/s, {shape: bound GB/s}) of the HBM model in the module doc."""
    inputs = {s: _input_bytes(r["read"]) for s, r in by_shape.items()}
    read_gbps = max(
        inputs[s] / float(by_shape[s]["read"]["median_us"]) / 1e3
        for s in by_shape
        if inputs[s] >= _HBM_READ_MIN_BYTES
    )  # a grid without such a shape has no bound here (ValueError)
    # a copy of N bytes (read + write counted) reads N / 2 and writes N / 2
    write_gbps = 0.5 / (1.0 / copy_gbps - 0.5 / read_gbps)
    bounds = {}
    for shape, r in by_shape.items():
        total = float(r["cuda"]["bytes"])
        writes = _output_bytes(r["cuda"])
        bounds[shape] = total / ((total - writes) / read_gbps + writes / write_gbps)
    return read_gbps, write_gbps, bounds


def report(path: Path) -> str:
    by_shape, first = load(path)
    us = {s: {p: float(r["median_us"]) for p, r in rows.items()} for s, rows in by_shape.items()}
    shapes = sorted(us)
    if not _have(us, shapes, ("cuda", "vllm")):
        raise SystemExit(f"{path}: the targets need the providers cuda and vllm at every shape")
    peak = float(first["peak_gbps"])
    outputs = sorted({r["out_dtype"] for rows in by_shape.values() for r in rows.values()})
    lse = ", with output LSE" if first["output_lse"] == "True" else ""
    lines = [
        f"targets from {path.name}: {first['gpu']}, git {first['git_sha']}, "
        f"{len(shapes)} shapes, output {'/'.join(outputs)}{lse}, datasheet {peak:.0f} GB/s, "
        f"copy {float(first['copy_gbps']):.0f}"
    ]
    speedup = {s: us[s]["vllm"] / us[s]["cuda"] for s in shapes}
    lines.append(
        f"cuda <= vLLM CUDA: {sum(x >= 1 for x in speedup.values())} of {len(shapes)} "
        f"(speed-up {min(speedup.values()):.3f}x to {max(speedup.values()):.2f}x)"
    )
    lines.append(
        "geometric-mean speed-up over vLLM CUDA: "
        + ", ".join(
            f"{p} {_geomean([us[s]['vllm'] / us[s][p] for s in shapes]):.3f}x"
            for p in ("cuda", "triton", "stream-cuda")
            if _have(us, shapes, (p,))
        )
    )
    t1 = [us[s]["cuda"] for s in shapes if s[1] == 1]
    lines.append(
        f"T = 1 <= 1.3 us: {sum(x <= 1.3 for x in t1)} of {len(t1)} "
        f"(cuda {min(t1):.2f} to {max(t1):.2f} us)"
    )
    large = [s for s in shapes if s[1] * s[2] >= _LARGE_ROWS]
    big = [s for s in large if _input_bytes(by_shape[s]["cuda"]) >= _HBM_READ_MIN_BYTES]
    if big and _have(us, shapes, ("read", "stream-cuda")):
        lines += _hbm_lines(by_shape, first, large, peak)
    if _have(us, large, ("triton",)):
        ratio = [us[s]["triton"] / us[s]["cuda"] for s in large]
        lines.append(
            f"triton within 1.1x of cuda at >= {_LARGE_ROWS} rows: "
            f"{sum(x <= 1.1 for x in ratio)} of {len(large)} (at most {max(ratio):.3f}x)"
        )
    if _have(us, shapes, ("triton", "vllm-triton", *_YARDSTICKS)):
        lines += _triton_3x_lines(us, shapes)
    return "\n".join(lines)


def _hbm_lines(by_shape: dict, first: dict, large: list, peak: float) -> list[str]:
    read_gbps, write_gbps, bounds = hbm_bound(by_shape, float(first["copy_gbps"]))
    pct = {s: float(by_shape[s]["cuda"]["pct_of_peak"]) for s in large}
    lines = [
        f">= 92% of datasheet at >= {_LARGE_ROWS} rows: {sum(x >= 92 for x in pct.values())} "
        f"of {len(large)}; HBM bound from reads at {read_gbps:.0f} GB/s "
        f"({100 * read_gbps / peak:.1f}%) and writes at {write_gbps:.0f} GB/s "
        f"({100 * write_gbps / peak:.1f}%):"
    ]
    for s in large:
        stream_pct = float(by_shape[s]["stream-cuda"]["pct_of_peak"])
        lines.append(
            f"  {s[0]} {s[1]}x{s[2]}: cuda {pct[s]:.1f}%, stream-cuda {stream_pct:.1f}%, "
            f"bound {100 * bounds[s] / peak:.1f}%"
        )
    return lines


def _triton_3x_lines(us: dict, shapes: list) -> list[str]:
    missed = [s for s in shapes if us[s]["triton"] > us[s]["vllm-triton"] / 3]
    below = [s for s in missed if us[s]["vllm-triton"] / 3 < min(us[s][p] for p in _YARDSTICKS)]
    lines = [
        f"triton >= 3x vLLM Triton: {len(shapes) - len(missed)} of {len(shapes)}; of the "
        f"rest, {len(below)} need less time than every yardstick; the others:"
    ]
    for s in missed:
        if s not in below:
            lines.append(
                f"  {s[0]} {s[1]}x{s[2]}: 3x is {us[s]['vllm-triton'] / 3:.2f} us, triton "
                f"{us[s]['triton']:.2f}, cuda {us[s]['cuda']:.2f}, "
                + ", ".join(f"{p} {us[s][p]:.2f}" for p in _YARDSTICKS)
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path, help="an attnmerge bench CSV of the whole grid")
    print(report(parser.parse_args().csv))


if __name__ == "__main__":
    main()
