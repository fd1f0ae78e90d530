"""What writing the output LSE costs the CUDA merge kernel at small shapes.

With an output LSE the CUDA merge takes longer than without (H200, bf16 -> FP8, git
c8798b8: 1.34 against 1.24 us at 1 x 64, 2.45 against 2.08 at 64 x 128). This script
times textual variants of the output-LSE instance, each removing one part, next to the
public call with and without the output LSE (bf16 -> FP8, D = 128, the instance and
launch the call itself takes, vLLM's bench inputs). Only ``default`` and ``head_major``
are correct merges (``head_major`` without ``prefill_tokens_with_context``).

* ``no_sync``: no team barrier before the LSE store (an in-place LSE could race);
* ``no_store``: the LSE and its address computed (pinned by the kernel's compute_here)
  but not stored;
* ``no_log``: the LSE without its logarithm (max + total);
* ``no_sync_store``: neither barrier nor store: the instance without the output LSE,
  but compiled from the output-LSE path;
* ``all_lanes_store``: no barrier, and every lane of the team stores the row's LSE;
* ``head_major``: a correct merge whose consecutive rows are the tokens of one head, not
  the heads of one token, so that a block's ``[H, T]`` LSEs (vLLM's layout, the bench's)
  are contiguous: the row's head by the multiply and shift of the token divisor, launched
  with T in the place of H (right only without ``prefill_tokens_with_context``, as here);
  ``head_major no LSE`` is the same for the instance without the output LSE, next to the
  public call without it. Both are compared bit for bit with the public calls.

``--compare FILE [FILE ...]`` adds other kernel sources (named by the file's stem);
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
_SYNC = "      __syncwarp(mask << (threadIdx.x % kWarpSize / TEAM * TEAM));\n"
_STORE = "        if (row_ok[r]) store_words<1>(out_lse_at[r], {float_bits(out_lse[r])});\n"
_LOG = "  return __fadd_rn(w.max, base_2 ? log2f(w.total) : logf(w.total));"
_FIRST_LANE = "    if (lane == 0) {\n"
_TOKEN_MAJOR = (
    "    const u32 t = token_of(row_or_0, p.heads_multiplier, p.heads_shift);\n"
    "    const u32 h = row_or_0 - t * heads;\n"
)
_HEAD_MAJOR = (
    "    const u32 h = token_of(row_or_0, p.heads_multiplier, p.heads_shift);\n"
    "    const u32 t = row_or_0 - h * heads;\n"
)
_ROW_PREFIX = (
    "has_prefix[r] = row < p.rows_with_prefix;",
    "has_prefix[r] = t < p.rows_with_prefix;",
)


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
        "head_major": head_major(source),
    }


def head_major(source: str) -> str:
    """The kernel with its rows in head-major order (see the module doc)."""
    return _replace(_replace(source, _TOKEN_MAJOR, _HEAD_MAJOR), *_ROW_PREFIX)


def head_major_params(params: bytes, num_tokens: int) -> bytes:
    """The packed parameters of a call without prefill_tokens_with_context, for the
    head-major kernel: T where the kernel reads H, and T's divisor for H's."""
    fields = list(cuda_backend._PARAMS.unpack(params))
    # MergeParams: 6 pointers, then num_rows, num_heads, head_size, rows_with_prefix,
    # heads_multiplier, heads_shift, ...
    fields[7] = fields[9] = num_tokens
    fields[10], fields[11] = cuda_backend.head_divisor(num_tokens)
    return cuda_backend._PARAMS.pack(*fields)


def instance_of(num_rows: int, write_lse: bool = True) -> cuda_backend.Instance:
    """The instance a bf16 -> FP8 call at D = 128 with aligned tensors takes."""
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
        write_lse=write_lse,
    )


def _same_bits(call, reference, tensors: list[torch.Tensor]) -> bool:
    """Whether ``call`` writes the same bits into ``tensors`` as ``reference`` does."""
    reference()
    want = [x.view(torch.uint8).clone() for x in tensors]
    for x in tensors:
        x.view(torch.uint8).zero_()
    call()
    return all(torch.equal(x.view(torch.uint8), w) for x, w in zip(tensors, want, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    kernel_timing.add_compare_argument(parser)
    kernel_timing.add_rounds_and_shapes_arguments(parser, 4, SHAPES)
    opts = parser.parse_args()
    source = cuda_backend.source()
    sources = variants(source)
    for path in opts.compare:
        sources[path.stem] = path.read_text()
    dev = torch.cuda.current_device()
    scale = torch.tensor([bench.FP8_SCALE], device="cuda")
    names = ["no LSE", "LSE", *sources, "head_major no LSE"]
    print(f"{torch.cuda.get_device_name(dev)}, bf16 -> FP8, D = 128, mean of medians, us")
    print(f"{'T x H':>10} " + " ".join(f"{n:>17}" for n in names))
    for T, H in opts.shapes:
        (s,) = bench.make_input_sets(bench.Case("bf16", True, True, 128, T, H, "cuda"), 1, "cuda")
        args = (
            s["output"], s["prefix_output"], s["prefix_lse"], s["suffix_output"], s["suffix_lse"]
        )  # fmt: skip
        out, out_lse = s["output"], s["output_lse"]
        kernel, grid, params = cuda_backend.launch_arguments(*args, out_lse, None, scale, False)
        plain, plain_grid, plain_params = cuda_backend.launch_arguments(
            *args, None, None, scale, False
        )
        merge = functools.partial(attnmerge.merge_attn_states, backend="cuda")
        public_plain = functools.partial(merge, *args, None, None, scale)
        public_lse = functools.partial(merge, *args, out_lse, None, scale)
        calls = [public_plain, public_lse]
        for name, text in sources.items():
            variant = kernel_timing.load_merge_variant(
                text, instance_of(T * H), name, dev, kernel.block
            )
            major = head_major_params(params, T) if name == "head_major" else params
            calls.append(kernel_timing.on_current_stream(variant, grid, major))
        variant = kernel_timing.load_merge_variant(
            head_major(source), instance_of(T * H, False), "hm", dev, plain.block
        )
        calls.append(
            kernel_timing.on_current_stream(variant, plain_grid, head_major_params(plain_params, T))
        )
        checks = {
            "head_major": _same_bits(calls[names.index("head_major")], public_lse, [out, out_lse]),
            "head_major no LSE": _same_bits(calls[-1], public_plain, [out]),
        }
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
