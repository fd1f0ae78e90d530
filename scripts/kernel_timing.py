"""Timing helpers shared by the kernel-variant scripts (weight_math_cost.py,
merge_cost.py, param_block_cost.py): CUDA-graph replay medians, the ``--compare``
option, and means over rounds in alternating order."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import triton.testing


def median_us(fn: Callable[[], None]) -> float:
    """Median time of ``fn`` by CUDA-graph replay, in microseconds."""
    return triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=[0.5]) * 1e3


def add_compare_argument(parser: argparse.ArgumentParser) -> None:
    """``--compare FILE [FILE ...]``: other kernel sources to time, named by their stems."""
    parser.add_argument(
        "--compare", type=Path, nargs="+", default=[], help="other kernel sources to time"
    )


def mean_of_rounds(calls: Sequence[Callable[[], None]], rounds: int) -> list[float]:
    """The mean over ``rounds`` of each call's median time (us), every other round in
    reverse order, so that a difference of a few hundredths of a microsecond can be told
    from the order of measurement."""
    times = [0.0] * len(calls)
    for round_ in range(rounds):
        order = range(len(calls)) if round_ % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            times[i] += median_us(calls[i]) / rounds
    return times
