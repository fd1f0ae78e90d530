"""What separates the CUDA merge kernel from the CUDA stream yardstick at small shapes.

``attnmerge bench --providers stream-cuda`` times a kernel that moves the merge's bytes in
the merge kernel's layout with a select for its math; at T = 1 the merge takes about
0.25 us more (H200, git 4415683). This script times textual variants of the merge
kernel, each removing one part, next to both (bf16 -> FP8, D = 128, 16-byte chunks in
128-thread blocks, vLLM's bench inputs). None but ``default`` is a correct merge.

* ``no_select``: zero-weight rows are not cleared (NaN rows would leak);
* ``no_weights``: constant weights (scripts/weight_math_cost.py's variant);
* ``skeleton``: both of the above;
* ``fast_exp``: ``__expf`` instead of the accurate exponential;
* ``no_scale_div``: the FP8 scale multiplied instead of its reciprocal;
* ``no_prefix_P``: every token has a prefix (no ``prefill_tokens_with_context`` test);
* ``skeleton_select``: the skeleton with the combine replaced by a select between the two
  rows by their LSEs, as ``stream-cuda`` does: what is left is the merge kernel's
  addressing. (An earlier version selected by the skeleton's constant weights; the
  compiler then dropped the prefix row's loads, so it moved half the bytes.)
* ``contiguous``: the kernel with ``stream-cuda``'s addressing (row x head size, LSE
  ``[H, T]``, no strides), right only for contiguous tensors, as the bench's are: what the
  general strides cost.
* ``stream_like``: ``skeleton_select`` with contiguous addressing and no P test:
  ``stream-cuda``'s work in the merge kernel's code (the kernel's early exit for threads
  without a row is stream-cuda's too; with the 200-byte parameter struct of git 4415683
  this was slower than ``stream-cuda`` for the same sm_90a code: see the struct's comment);
* ``stream_like_no_scale_div``: the same without the scale's division, whose operand
  check and branch the compiler places before the select here and after it in
  ``stream-cuda``.

``--compare FILE [FILE ...]`` adds other kernel sources (named by the file's stem), e.g. a
candidate change; ``--rounds N`` times every column N times, in alternating order, and
prints the mean, so that a difference of a few hundredths of a microsecond can be told
from the order of measurement.

(The variants without the output-LSE code and without the loop over further column
chunks, which measured what code that never runs cost, are gone: the kernel no longer
compiles either into an instance that does not need it.)

Run on a GPU: ``python3 scripts/merge_cost.py``.
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
from attnmerge.cuda.stream import stream_two_states as stream_cuda

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_timing
import weight_math_cost

SHAPES = [(1, 4), (1, 128), (16, 128), (64, 128), (256, 128)]
_COMBINE = (
    "    acc[i] = __fadd_rn(__fmul_rn(wp, P::load(pk.get(i))), __fmul_rn(ws, S::load(sk.get(i))));"
)
_SELECT = "    acc[i] = wp > ws ? P::load(pk.get(i)) : S::load(sk.get(i));"
# the skeleton's weights, made the LSEs, so that the select above depends on them
_SELECT_WEIGHTS = "weights[r] = RowWeights{lp[r], ls[r], lp[r], ls[r], true, true};"
_NO_P = ("has_prefix[r] = row < p.rows_with_prefix;", "has_prefix[r] = true;")
_NO_SCALE_DIV = ("__fdiv_rn(1.0f, scale)", "scale")
# stride arithmetic -> contiguous offsets (the kernel's data threads)
_CONTIGUOUS = {
    "o_row[r] = offset_of(t, p.out_stride_t, h, p.out_stride_h);": (
        "o_row[r] = (i64)row_or_0 * p.head_size;"
    ),
    "offset_of(t, p.prefix_lse_stride_t, h, p.prefix_lse_stride_h)": (
        "(i64)h * p.prefix_lse_stride_h + t"
    ),
    "offset_of(t, p.suffix_lse_stride_t, h, p.suffix_lse_stride_h)": (
        "(i64)h * p.suffix_lse_stride_h + t"
    ),
    "offset_of(t, p.prefix_stride_t, h, p.prefix_stride_h) + col0": (
        "(i64)row_or_0 * p.head_size + col0"
    ),
    "offset_of(t, p.suffix_stride_t, h, p.suffix_stride_h) + col0": (
        "(i64)row_or_0 * p.head_size + col0"
    ),
}


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def variants(source: str) -> dict[str, str]:
    """Kernel sources by variant name (see the module doc)."""

    def contiguous(text: str) -> str:
        return functools.reduce(lambda t, edit: _replace(t, *edit), _CONTIGUOUS.items(), text)

    no_select = _replace(_replace(source, "po.kept(keep_p)", "po"), "so.kept(keep_s)", "so")
    skeleton = weight_math_cost.variants(no_select)["no_weights"]
    skeleton_select = _replace(
        _replace(no_select, weight_math_cost.ROW_WEIGHTS, _SELECT_WEIGHTS), _COMBINE, _SELECT
    )
    stream_like = _replace(contiguous(skeleton_select), *_NO_P)
    return {
        "default": source,
        "no_select": no_select,
        "no_weights": weight_math_cost.variants(source)["no_weights"],
        "skeleton": skeleton,
        "fast_exp": _replace(source, "base_2 ? exp2f(gap) : expf(gap)", "__expf(gap)"),
        "no_scale_div": _replace(source, *_NO_SCALE_DIV),
        "no_prefix_P": _replace(source, *_NO_P),
        "skeleton_select": skeleton_select,
        "contiguous": contiguous(source),
        "stream_like": stream_like,
        "stream_like_no_scale_div": _replace(stream_like, *_NO_SCALE_DIV),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    kernel_timing.add_compare_argument(parser)
    kernel_timing.add_rounds_and_shapes_arguments(parser, 1, SHAPES)
    parser.add_argument("--only", help="variants to time, comma-separated (default: all)")
    opts = parser.parse_args()
    sources = variants(cuda_backend.source())
    if opts.only:
        sources = {n: sources[n] for n in opts.only.split(",")}
    for path in opts.compare:
        sources[path.stem] = path.read_text()
    dev = torch.cuda.current_device()
    instance = cuda_backend.instance_for(
        torch.bfloat16, torch.bfloat16, torch.float8_e4m3fn, 128, 8
    )
    kernels = {
        name: kernel_timing.load_merge_variant(text, instance, name, dev, cuda_backend.DATA_THREADS)
        for name, text in sources.items()
    }
    print(f"{torch.cuda.get_device_name(dev)}, bf16 -> FP8, D = 128, median us")
    print(f"{'T x H':>10} {'cuda':>8} {'s-cuda':>8} " + " ".join(f"{n:>24}" for n in kernels))
    scale = torch.tensor([bench.FP8_SCALE], device="cuda")
    for T, H in opts.shapes:
        (s,) = bench.make_input_sets(bench.Case("bf16", True, False, 128, T, H, "cuda"), 1, "cuda")
        args = (
            s["output"], s["prefix_output"], s["prefix_lse"], s["suffix_output"], s["suffix_lse"]
        )  # fmt: skip
        calls = [
            lambda args=args: attnmerge.merge_attn_states(*args, None, None, scale, backend="cuda"),
            lambda args=args: stream_cuda(*args, scale),
        ]
        _, grid, params = cuda_backend.launch_arguments(
            *args, None, None, scale, False, chunk_bytes=16
        )
        calls += [kernel_timing.on_current_stream(k, grid, params) for k in kernels.values()]
        row = kernel_timing.mean_of_rounds(calls, opts.rounds)
        print(
            f"{f'{T} x {H}':>10} "
            + " ".join(f"{x:8.2f}" if i < 2 else f"{x:24.2f}" for i, x in enumerate(row)),
            flush=True,
        )


if __name__ == "__main__":
    main()
