"""What writing the output LSE costs the CUDA merge kernel at small shapes.

With an output LSE the CUDA merge takes longer than without (H200, bf16 -> FP8, git
c8798b8: 1.34 against 1.24 us at 1 x 64, 2.45 against 2.08 at 64 x 128). This script
times textual variants of the output-LSE instance, each removing one part, next to the
public call with and without the output LSE (bf16 -> FP8, or ``--dtype``'s partials;
D = 128, the instance and launch the call itself takes, vLLM's bench inputs). Only
``default``, ``token_major`` and ``head_major no LSE`` are correct merges. From T = 2 up
the public call takes its rows in head-major order here (``[H, T]`` output LSEs: cuda
backend ``head_major_rows``), and so do the variants.

* ``no_sync``: no team barrier before the LSE store (an in-place LSE could race);
* ``no_store``: the LSE and its address computed (pinned by the kernel's compute_here)
  but not stored;
* ``no_log``: the LSE without its logarithm (max + total);
* ``no_sync_store``: neither barrier nor store: the instance without the output LSE,
  but compiled from the output-LSE path;
* ``all_lanes_store``: no barrier, and every lane of the team stores the row's LSE;
* ``token_major``: the public call's kernel with its rows in token-major order (the
  heads of one token consecutive), which puts each row's LSE store in its own sector;
  ``head_major no LSE``: the call without the output LSE, whose rows are token-major,
  launched head-major. Both are compared bit for bit with the public calls.

``--compare FILE [FILE ...]`` adds other kernel sources (named by the file's stem),
compared bit for bit with the public call;
``--rounds N`` times every column N times in alternating order and prints the mean.

Run on a GPU: ``python3 scripts/lse_cost.py`` (``scripts/gpu_check.sh lse-cost``).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

import attnmerge
from attnmerge import bench
from attnmerge.cuda import backend as cuda_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_timing

SHAPES = [(1, 64), (1, 128), (16, 128), (64, 128), (64, 32)]
_SYNC = "    __syncwarp(mask << (threadIdx.x % kWarpSize / TEAM * TEAM));\n"
_STORE = "      if (row_ok[r]) store_words<1>(at[r], {float_bits(lse[r])});\n"
_LOG = "  return __fadd_rn(w.max, base_2 ? log2f(w.total) : logf(w.total));"
_FIRST_LANE = "  if (lane == 0) {\n"


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
        "all_lanes_store": _replace(no_sync, _FIRST_LANE, "  {\n"),
    }


def instance_of(num_rows: int, dtype: torch.dtype = torch.bfloat16) -> cuda_backend.Instance:
    """The instance a ``dtype`` -> FP8 call at D = 128 with aligned tensors and an output
    LSE takes."""
    chunk = cuda_backend.chunk_bytes_for(num_rows, dtype.itemsize, 1, write_lse=True)
    return cuda_backend.instance_for(
        dtype,
        dtype,
        torch.float8_e4m3fn,
        128,
        cuda_backend.vector_width(128, dtype.itemsize, chunk),
        cuda_backend.rows_per_team(num_rows),
        cuda_backend.WEIGHTS,
        cuda_backend.data_threads(num_rows),
        write_lse=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    kernel_timing.add_compare_argument(parser)
    kernel_timing.add_rounds_and_shapes_arguments(parser, 4, SHAPES)
    parser.add_argument(
        "--dtype", choices=sorted(bench.DTYPES), default="bf16", help="partials (bf16)"
    )
    opts = parser.parse_args()
    dtype = bench.DTYPES[opts.dtype]
    source = cuda_backend.source()
    sources = variants(source)
    compared = {path.stem for path in opts.compare}
    for path in opts.compare:
        sources[path.stem] = path.read_text()
    dev = torch.cuda.current_device()
    scale = torch.tensor([bench.FP8_SCALE], device="cuda")
    names = ["no LSE", "LSE", *sources, "token_major", "head_major no LSE"]
    print(f"{torch.cuda.get_device_name(dev)}, {opts.dtype} -> FP8, D = 128, mean of medians, us")
    print(f"{'T x H':>10} " + " ".join(f"{n:>17}" for n in names))
    for T, H in opts.shapes:
        (s,) = bench.make_input_sets(
            bench.Case(opts.dtype, True, True, 128, T, H, "cuda"), 1, "cuda"
        )
        args = (
            s["output"], s["prefix_output"], s["prefix_lse"], s["suffix_output"], s["suffix_lse"]
        )  # fmt: skip
        out, out_lse = s["output"], s["output_lse"]
        kernel, grid, params = cuda_backend.launch_arguments(*args, out_lse, None, scale, False)
        plain, plain_grid, plain_params = cuda_backend.launch_arguments(
            *args, None, None, scale, False, head_major=True
        )
        _, _, token_major_params = cuda_backend.launch_arguments(
            *args, out_lse, None, scale, False, head_major=False
        )
        merge = functools.partial(attnmerge.merge_attn_states, backend="cuda")
        public_plain = functools.partial(merge, *args, None, None, scale)
        public_lse = functools.partial(merge, *args, out_lse, None, scale)
        calls = [public_plain, public_lse]
        checks = {}
        for name, text in sources.items():
            variant = kernel_timing.load_merge_variant(
                text, instance_of(T * H, dtype), name, dev, kernel.block
            )
            calls.append(kernel_timing.on_current_stream(variant, grid, params))
            if name in compared:  # other sources are meant to be correct merges
                checks[name] = kernel_timing.same_bits(calls[-1], public_lse, [out, out_lse])
        calls.append(kernel_timing.on_current_stream(kernel, grid, token_major_params))
        calls.append(kernel_timing.on_current_stream(plain, plain_grid, plain_params))
        checks["token_major"] = kernel_timing.same_bits(calls[-2], public_lse, [out, out_lse])
        checks["head_major no LSE"] = kernel_timing.same_bits(calls[-1], public_plain, [out])
        row = kernel_timing.mean_of_rounds(calls, opts.rounds)
        bad = [name for name, ok in checks.items() if not ok]
        print(
            f"{f'{T} x {H}':>10} "
            + " ".join(f"{x:17.2f}" for x in row)
            + (f"  MISMATCH: {', '.join(bad)}" if bad else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
