"""The benchmark grid of ``attnmerge bench`` with yardsticks and vLLM's Triton kernel.

Runs the product's harness (:func:`attnmerge.bench.run`: the same grid, options, timing,
table and CSV) with further providers:

* ``stream``: the Triton stream yardstick (``yardsticks/stream_triton.py``), a merge's
  bytes with next to no arithmetic;
* ``stream-cuda``: the same as a CUDA kernel (``yardsticks/stream_two.cu``);
* ``read``: the Triton kernel reading a merge's inputs and writing nothing, a lower bound
  on any merge's time (its GB/s still counts the merge's bytes);
* ``vllm-triton``: vLLM's Triton merge kernel, what vLLM runs where its CUDA kernel does
  not apply (``vllm`` is its dispatcher).

``--shapes`` replaces the tokens x heads product by explicit pairs; ``--plot`` also draws
GB/s against tokens (``plot.py``), from the CSV (written next to the PNG if ``--csv`` is
not given). Run from the repository root::

    python -m benchmarks.grid --providers cuda,triton,stream,stream-cuda,read --plot grid.png
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from attnmerge import bench

VLLM_TRITON_MODULE = "vllm.v1.attention.ops.triton_merge_attn_states"
PROVIDERS = (*bench.PROVIDERS, "vllm-triton", "stream", "stream-cuda", "read")


def _yardstick(module: str, function: str) -> bench.CallFactory:
    def make(s: dict, scale):
        kernel = getattr(importlib.import_module(f"benchmarks.yardsticks.{module}"), function)
        return functools.partial(kernel, s["output"], *bench.inputs(s), scale)

    return make


def _vllm_triton(s: dict, scale):
    try:
        merge = importlib.import_module(VLLM_TRITON_MODULE).merge_attn_states
    except ImportError as e:
        raise ImportError(f"the vllm-triton provider needs vLLM ({VLLM_TRITON_MODULE}): {e}") from e
    return functools.partial(merge, s["output"], *bench.inputs(s), s["output_lse"], None, scale)


EXTRA = {
    "stream": _yardstick("stream_triton", "stream_two_states"),
    "read": _yardstick("stream_triton", "read_two_states"),
    "stream-cuda": _yardstick("stream_cuda", "stream_two_states"),
    "vllm-triton": _vllm_triton,
}


def shape_pairs(text: str) -> tuple[tuple[int, int], ...]:
    """An argparse type: comma-separated (tokens, heads) pairs such as ``1x128,4096x8``."""
    pairs = [re.fullmatch(r"([1-9]\d*)x([1-9]\d*)", s.strip()) for s in text.split(",")]
    if not all(pairs):
        raise argparse.ArgumentTypeError(f"expected TxH pairs such as 1024x32, got {text!r}")
    return tuple((int(m[1]), int(m[2])) for m in pairs)


def parser() -> argparse.ArgumentParser:
    """``attnmerge bench``'s options with this grid's providers, ``--shapes`` and ``--plot``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.grid", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    bench.add_arguments(p, PROVIDERS)
    p.add_argument("--shapes", type=shape_pairs, metavar="TxH,...", help="instead of T x H")
    p.add_argument("--plot", metavar="PNG", help="also plot GB/s against tokens")
    return p


def main(argv: Sequence[str] | None = None, **run_options) -> int:
    """Run the grid; ``run_options`` go to :func:`attnmerge.bench.run` (tests use them)."""
    args = parser().parse_args(argv)
    if args.plot and not args.csv:
        args.csv = str(Path(args.plot).with_suffix(".csv"))
    code = bench.run(args, extra=EXTRA, **run_options)
    if code == 0 and args.plot and not args.eager:
        from benchmarks import plot

        problem = plot.write_plot(args.plot, *bench.read_csv(args.csv))
        print(f"plot skipped: {problem}" if problem else f"wrote {args.plot}")
    return code


if __name__ == "__main__":
    sys.exit(main())
