"""What the weight math costs the CUDA kernel at small and medium shapes.

Builds textual variants of the kernel source with NVRTC and times them by CUDA-graph
replay (median us) next to the public backends and the stream/read yardsticks, on vLLM's
bench inputs (bf16 -> FP8, D = 128, 5% of the LSEs +inf):

* ``default``: the kernel as shipped;
* ``ieee_div``: the weights divided by ``__fdiv_rn`` (IEEE division with its operand
  check and slow path), as before ``divide_weight``;
* ``FILE`` (with ``--compare FILE [FILE ...]``, named by the file's stem): other versions
  of the kernel source, e.g. the previous commit's (``git show
  HEAD~1:src/attnmerge/cuda/csrc/merge_attn_states.cuh``), to time a change against what
  it replaces, or candidates against each other, in the same run;
* ``approx_div``: ``__fdividef`` (not exact: a bound on what any division can save);
* ``no_weights``: constant weights, no exp, division or zero-weight selects (not a
  merge: what the kernel costs without its weight math).

Only ``default`` is a correct merge; the others exist to measure. Each variant runs in
the two layouts the chunk rule picks for bf16: 32-byte and 16-byte chunks (small grids),
in 128-thread blocks. Run on a GPU:
``python3 scripts/weight_math_cost.py`` (``scripts/gpu_check.sh weight-math``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import attnmerge
from attnmerge import bench
from attnmerge.cuda import backend as cuda_backend
from attnmerge.triton.stream_kernel import read_two_states, stream_two_states

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_timing

SHAPES = [(1, 4), (1, 128), (16, 32), (16, 128), (64, 128), (256, 128), (4096, 128)]
ROW_WEIGHTS = "weights[r] = row_weights(lp[r], ls[r], base_2);"
# the two weight divisions, by numerator
_WEIGHT_DIVISIONS = {"1.0f": "reciprocal_weight(total, y)", "e": "divide_weight(e, total, y)"}


def variants(source: str) -> dict[str, str]:
    """Kernel sources by variant name (see the module doc)."""
    assert ROW_WEIGHTS in source and all(d in source for d in _WEIGHT_DIVISIONS.values())

    def divisions(fn: str) -> str:
        out = source
        for numerator, d in _WEIGHT_DIVISIONS.items():
            out = out.replace(d, f"{fn}({numerator}, total)")
        return out

    return {
        "default": source,
        "ieee_div": divisions("__fdiv_rn"),
        "approx_div": divisions("__fdividef"),
        "no_weights": source.replace(
            ROW_WEIGHTS, "weights[r] = RowWeights{0.5f, 0.5f, lp[r], ls[r], true, true};"
        ),
    }


# layout name: (chunk bytes, data threads per block)
LAYOUTS = {"c32b128": (32, 128), "c16b128": (16, 128)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    kernel_timing.add_compare_argument(parser)
    args = parser.parse_args()
    dev = torch.cuda.current_device()
    sources = variants(cuda_backend.source())
    for path in args.compare:
        sources[path.stem] = path.read_text()
    kernels = {}
    for layout, (chunk, threads) in LAYOUTS.items():
        vec = cuda_backend.vector_width(128, 2, chunk)
        instance = cuda_backend.instance_for(
            torch.bfloat16, torch.bfloat16, torch.float8_e4m3fn, 128, vec, threads=threads
        )
        for name, text in sources.items():
            kernels[name, layout] = kernel_timing.load_merge_variant(
                text, instance, name, dev, cuda_backend.block_threads(1, threads)
            )
    columns = ["triton", "cuda", "stream", "read"] + [
        f"{n}/{lay}" for lay in LAYOUTS for n in sources
    ]
    print(f"{torch.cuda.get_device_name(dev)}, bf16 -> FP8, D = 128, median us")
    print(f"{'T x H':>10} " + " ".join(f"{c:>18}" for c in columns))
    for T, H in SHAPES:
        times = _times(T, H, kernels, list(sources))
        print(f"{f'{T} x {H}':>10} " + " ".join(f"{t:18.2f}" for t in times), flush=True)


def _times(T: int, H: int, kernels: dict, names: list[str]) -> list[float]:
    scale = torch.tensor([bench.FP8_SCALE], device="cuda")
    case = bench.Case("bf16", True, False, 128, T, H, "cuda")
    (s,) = bench.make_input_sets(case, 1, "cuda")
    args = (s["output"], s["prefix_output"], s["prefix_lse"], s["suffix_output"], s["suffix_lse"])
    times = [
        kernel_timing.median_us(
            lambda b=b: attnmerge.merge_attn_states(*args, None, None, scale, backend=b)
        )
        for b in ("triton", "cuda")
    ]
    times += [
        kernel_timing.median_us(lambda k=k: k(*args, scale))
        for k in (stream_two_states, read_two_states)
    ]
    for layout, (chunk, threads) in LAYOUTS.items():
        _, grid, params = cuda_backend.launch_arguments(
            *args, None, None, scale, False, chunk_bytes=chunk, threads=threads
        )
        for name in names:
            launch = kernel_timing.on_current_stream(kernels[name, layout], grid, params)
            times.append(kernel_timing.median_us(launch))
    return times


if __name__ == "__main__":
    main()
