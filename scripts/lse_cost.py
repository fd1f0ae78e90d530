"""What writing the output LSE costs the CUDA merge kernel at small shapes.

With an output LSE the CUDA merge takes longer than without (H200, bf16 -> FP8, git
c8798b8: 1.34 against 1.24 us at 1 x 64, 2.45 against 2.08 at 64 x 128). This script
times textual variants of the output-LSE instance, each removing one part, next to the
public call with and without the output LSE (bf16 -> FP8, D = 128, the instance and
launch the call itself takes, vLLM's bench inputs). None but ``default`` is a correct
in-place merge.

* ``no_sync``: no team barrier before the LSE store (an in-place LSE could race);
* ``no_store``: the LSE and its address computed (pinned by the kernel's compute_here)
  but not stored;
* ``no_log``: the LSE without its logarithm (max + total);
* ``no_sync_store``: neither barrier nor store: the instance without the output LSE,
  but compiled from the output-LSE path;
* ``all_lanes_store``: no barrier, and every lane of the team stores the row's LSE.

``--compare FILE [FILE ...]`` adds other kernel sources (named by the file's stem);
``--rounds N`` times every column N times in alternating order and prints the mean.

Run on a GPU: ``python3 scripts/lse_cost.py`` (``scripts/gpu_check.sh lse-cost``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import attnmerge
from attnmerge import bench
from attnmerge.cuda import backend as cuda_backend
from attnmerge.cuda import driver, nvrtc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_timing

SHAPES = [(1, 64), (1, 128), (16, 128), (64, 128), (64, 32)]
_SYNC = "      __syncwarp(mask << (threadIdx.x % kWarpSize / TEAM * TEAM));\n"
_STORE = "        if (row_ok[r]) store_words<1>(out_lse_at[r], {float_bits(out_lse[r])});\n"
_LOG = "  return __fadd_rn(w.max, base_2 ? log2f(w.total) : logf(w.total));"
_FIRST_LANE = "    if (lane == 0) {\n"


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def variants(source: str) -> dict[str, str]:
    """Kernel sources by variant name (see the module doc)."""
    no_sync = _replace(source, _SYNC, "")
    return {
        "default": source,
        "no_sync": no_sync,
        "no_store": _replace(source, _STORE, ""),
        "no_log": _replace(source, _LOG, "  return __fadd_rn(w.max, w.total);"),
        "no_sync_store": _replace(no_sync, _STORE, ""),
        "all_lanes_store": _replace(no_sync, _FIRST_LANE, "    {\n"),
    }


def instance_of(num_rows: int) -> cuda_backend.Instance:
    """The output-LSE instance a bf16 -> FP8 call at D = 128 with aligned tensors takes."""
    chunk = cuda_backend.chunk_bytes_for(num_rows, 2, 1)
    return cuda_backend.instance_for(
        torch.bfloat16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        128,
        cuda_backend.vector_width(128, 2, chunk),
        cuda_backend.rows_per_team(num_rows),
        cuda_backend.WEIGHTS,
        cuda_backend.data_threads(num_rows),
        write_lse=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    kernel_timing.add_compare_argument(parser)
    parser.add_argument("--rounds", type=int, default=4, help="times per column (mean)")
    parser.add_argument(
        "--shapes",
        type=bench._shape_list,
        default=SHAPES,
        help="TxH,... (default: 1x64,1x128,16x128,64x128,64x32)",
    )
    opts = parser.parse_args()
    sources = variants(cuda_backend.source())
    for path in opts.compare:
        sources[path.stem] = path.read_text()
    dev = torch.cuda.current_device()
    arch = cuda_backend.arch_of(torch.cuda.get_device_capability(dev))
    scale = torch.tensor([bench.FP8_SCALE], device="cuda")
    print(f"{torch.cuda.get_device_name(dev)}, bf16 -> FP8 with output LSE, D = 128, us")
    print(f"{'T x H':>10} {'no LSE':>8} {'LSE':>8} " + " ".join(f"{n:>15}" for n in sources))
    for T, H in opts.shapes:
        (s,) = bench.make_input_sets(bench.Case("bf16", True, True, 128, T, H, "cuda"), 1, "cuda")
        args = (
            s["output"], s["prefix_output"], s["prefix_lse"], s["suffix_output"], s["suffix_lse"]
        )  # fmt: skip
        out_lse = s["output_lse"]
        kernel, grid, params = cuda_backend.launch_arguments(*args, out_lse, None, scale, False)
        instance = instance_of(T * H)
        define = (
            f"#define ATTNMERGE_MERGE_TWO_INSTANCE {cuda_backend.template_arguments(instance)}\n"
        )
        calls = [
            lambda args=args: attnmerge.merge_attn_states(*args, None, None, scale, backend="cuda"),
            lambda args=args, out_lse=out_lse: attnmerge.merge_attn_states(
                *args, out_lse, None, scale, backend="cuda"
            ),
        ]
        for name, text in sources.items():
            variant = driver.load_kernel(
                nvrtc.compile_cubin(define + text, name=f"{name}.cu", arch=arch).cubin,
                cuda_backend.KERNEL_NAME,
                dev,
                kernel.block,
            )

            def launch(variant=variant, grid=grid, params=params) -> None:
                # the current stream: do_bench_cudagraph captures on a side stream
                variant.launch(grid, torch.cuda.current_stream().cuda_stream, params)

            calls.append(launch)
        row = kernel_timing.mean_of_rounds(calls, opts.rounds)
        print(
            f"{f'{T} x {H}':>10} "
            + " ".join(f"{x:8.2f}" if i < 2 else f"{x:15.2f}" for i, x in enumerate(row)),
            flush=True,
        )


if __name__ == "__main__":
    main()
