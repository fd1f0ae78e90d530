"""What the row order does to the CUDA merge with an output LSE, over vLLM's grid.

The cuda backend hands rows to its kernel head-major (the tokens of one head
consecutive) where the output LSE is stored ``[H, T]`` and the partials are small
(``head_major_rows`` in attnmerge/cuda/backend.py). This times, for every shape of the
grid, the call as the backend makes it next to the same kernel launched with token-major
rows (the heads of one token consecutive), in one run, and checks that both write the
same bits: vLLM's bench inputs, D = 128, FP8 output, ``[H, T]`` LSEs, no
``prefill_tokens_with_context``. The ratio is the first column's time over the second's.

Run on a GPU: ``python3 scripts/row_order_cost.py`` (``scripts/gpu_check.sh row-order``);
``--rounds N`` times each column N times in alternating order and prints the mean;
``--head-major`` times head-major rows, not the backend's choice, in the first column.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
from pathlib import Path

import torch

import attnmerge
from attnmerge import bench
from attnmerge.cuda import backend as cuda_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_timing

SHAPES = list(itertools.product(bench.DEFAULT_TOKENS, bench.DEFAULT_HEADS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    kernel_timing.add_rounds_and_shapes_arguments(parser, 2, SHAPES)
    parser.add_argument(
        "--dtypes", default="bf16,fp32", help="partial dtypes (default: %(default)s)"
    )
    parser.add_argument("--head-major", action="store_true", help="head-major rows at every shape")
    opts = parser.parse_args()
    scale = torch.tensor([bench.FP8_SCALE], device="cuda")
    print(f"{torch.cuda.get_device_name()}, -> FP8 with output LSE, D = 128, mean of medians, us")
    first_name = "head-major" if opts.head_major else "backend"
    print(f"{'dtype':>5} {'T x H':>10} {first_name:>10} {'token-major':>11} {'ratio':>6}")
    ratios = {}
    for dtype in opts.dtypes.split(","):
        for T, H in opts.shapes:
            case = bench.Case(dtype, True, True, 128, T, H, "cuda")
            (s,) = bench.make_input_sets(case, 1, "cuda")
            args = (s["prefix_output"], s["prefix_lse"], s["suffix_output"], s["suffix_lse"])
            out, out_lse = s["output"], s["output_lse"]
            public = functools.partial(
                attnmerge.merge_attn_states, out, *args, out_lse, None, scale, backend="cuda"
            )
            token_major, head_major = (
                kernel_timing.on_current_stream(
                    *cuda_backend.launch_arguments(
                        out, *args, out_lse, None, scale, False, head_major=order
                    )
                )
                for order in (False, True)
            )
            first = head_major if opts.head_major else public
            same = kernel_timing.same_bits(token_major, first, [out, out_lse])
            backend_us, token_us = kernel_timing.mean_of_rounds([first, token_major], opts.rounds)
            ratios.setdefault(dtype, []).append(backend_us / token_us)
            partial_bytes = s["prefix_output"].numel() * s["prefix_output"].itemsize
            chosen = cuda_backend.head_major_rows(out_lse.stride(1), T, H, None, partial_bytes)
            order = "h" if opts.head_major or chosen else "t"
            print(
                f"{dtype:>5} {f'{T} x {H}':>10} {backend_us:9.2f}{order} {token_us:11.2f} "
                f"{backend_us / token_us:6.3f}" + ("" if same else "  MISMATCH"),
                flush=True,
            )
    for dtype, r in ratios.items():
        mean = math.exp(sum(map(math.log, r)) / len(r))
        print(
            f"{dtype}: {first_name} / token-major time, geometric mean {mean:.3f}, "
            f"range {min(r):.3f}-{max(r):.3f} ({len(r)} shapes)"
        )


if __name__ == "__main__":
    main()
