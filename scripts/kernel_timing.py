"""Timing helpers shared by the kernel-variant scripts (weight_math_cost.py,
merge_cost.py, lse_cost.py, param_block_cost.py): CUDA-graph replay medians, the
``--compare``, ``--rounds`` and ``--shapes`` options, means over rounds in alternating
order, the build and launch of a merge-kernel variant, and a bit-for-bit comparison of two
calls."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import triton.testing

from attnmerge import bench
from attnmerge.cuda import backend as cuda_backend
from attnmerge.cuda import driver, nvrtc


def median_us(fn: Callable[[], None]) -> float:
    """Median time of ``fn`` by CUDA-graph replay, in microseconds."""
    return triton.testing.do_bench_cudagraph(fn, rep=20, quantiles=[0.5]) * 1e3


def add_compare_argument(parser: argparse.ArgumentParser) -> None:
    """``--compare FILE [FILE ...]``: other kernel sources to time, named by their stems."""
    parser.add_argument(
        "--compare", type=Path, nargs="+", default=[], help="other kernel sources to time"
    )


def add_rounds_and_shapes_arguments(
    parser: argparse.ArgumentParser, rounds: int, shapes: Sequence[tuple[int, int]]
) -> None:
    """``--rounds N`` (times per column, their mean) and ``--shapes TxH,...``."""
    parser.add_argument("--rounds", type=int, default=rounds, help="times per column (mean)")
    listed = ",".join(f"{t}x{h}" for t, h in shapes)
    parser.add_argument(
        "--shapes", type=bench._shape_list, default=shapes, help=f"TxH,... (default: {listed})"
    )


def load_merge_variant(
    text: str, instance: cuda_backend.Instance, name: str, device_index: int, block: int
) -> driver.Kernel:
    """A merge-kernel source (the kernel's or a variant's) built for ``instance`` on the
    device's architecture and loaded, with ``block`` threads per block."""
    define = f"#define ATTNMERGE_MERGE_TWO_INSTANCE {cuda_backend.template_arguments(instance)}\n"
    arch = cuda_backend.arch_of(torch.cuda.get_device_capability(device_index))
    cubin = nvrtc.compile_cubin(define + text, name=f"{name}.cu", arch=arch).cubin
    return driver.load_kernel(cubin, cuda_backend.KERNEL_NAME, device_index, block)


def on_current_stream(kernel: driver.Kernel, grid: int, params: bytes) -> Callable[[], None]:
    """A call that launches ``kernel`` on the current stream (do_bench_cudagraph captures
    on a side stream)."""

    def launch() -> None:
        kernel.launch(grid, torch.cuda.current_stream().cuda_stream, params)

    return launch


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


def same_bits(
    call: Callable[[], None], reference: Callable[[], None], tensors: list[torch.Tensor]
) -> bool:
    """Whether ``call`` writes the same bits into ``tensors`` as ``reference`` does."""
    reference()
    want = [x.view(torch.uint8).clone() for x in tensors]
    for x in tensors:
        x.view(torch.uint8).zero_()
    call()
    return all(torch.equal(x.view(torch.uint8), w) for x, w in zip(tensors, want, strict=True))
