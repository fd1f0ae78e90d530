"""The Triton stream yardstick: a merge's bytes with next to no arithmetic.

``stream_two_states`` reads both partials and both LSEs and writes an output of the
merge's dtype, as the merge does, but each output element is only the partial of the
larger LSE, scaled (no exp, log or division): a yardstick for this byte mix on the card at
hand. Its tile suits 2-byte partials; with fp32 partials the merge kernels can beat it.

``read_two_states`` reads the same inputs and writes nothing (its store is masked by a
run-time comparison that never holds, which keeps the loads): no merge can take less time
than reading its inputs.

Contiguous ``[T, H, D]`` partials and ``[H, T]`` LSEs only. Under Triton's CPU interpreter
the float conversions of bf16 and FP8 outputs round differently from a GPU's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max

__all__ = ["read_two_states", "stream_two_states"]

# A [rows, head size] tile of 2048 elements at 4 warps: 16 elements per thread.
_TILE = 2048
_NUM_WARPS = 4


@triton.jit(do_not_specialize=["num_rows", "num_tokens"])
def _stream_kernel(
    out_ptr,
    prefix_ptr,
    prefix_lse_ptr,
    suffix_ptr,
    suffix_lse_ptr,
    scale_ptr,
    num_rows,
    num_tokens,
    never,  # read only: a value no loaded element equals (NaN), unknown to the compiler
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    FP8_OUT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    READ_ONLY: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    cols = tl.arange(0, BLOCK_D)
    lse_offs = (rows % NUM_HEADS) * num_tokens + rows // NUM_HEADS  # [H, T] storage
    p_lse = tl.load(prefix_lse_ptr + lse_offs, mask=row_ok, other=0.0)
    s_lse = tl.load(suffix_lse_ptr + lse_offs, mask=row_ok, other=0.0)
    offs = rows[:, None] * HEAD_SIZE + cols[None, :]
    ok = row_ok[:, None] & (cols < HEAD_SIZE)[None, :]
    p = tl.load(prefix_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(suffix_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    x = tl.where((p_lse > s_lse)[:, None], p, s)
    if READ_ONLY:
        ok = ok & (x == never)  # false everywhere: nothing is written
    if FP8_OUT:
        x = tl.clamp(x * (1.0 / tl.load(scale_ptr)), -FP8_MAX, FP8_MAX)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=ok)


def read_two_states(
    output: torch.Tensor,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    output_scale: torch.Tensor | None,
) -> None:
    """Read what a merge reads and write nothing (see the module doc)."""
    stream_two_states(
        output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_scale, True
    )


def stream_two_states(
    output: torch.Tensor,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    output_scale: torch.Tensor | None,
    read_only: bool = False,
) -> None:
    """Read what a merge reads, write what it writes (see the module doc)."""
    tensors = (output, prefix_output, suffix_output, prefix_lse, suffix_lse)
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("the stream kernel takes contiguous tensors only")
    num_tokens, num_heads, head_size = output.shape
    num_rows = num_tokens * num_heads
    if num_rows == 0 or head_size == 0:
        return
    fp8 = output_scale is not None
    block_d = triton.next_power_of_2(head_size)
    block_rows = max(1, _TILE // block_d)
    _stream_kernel[(triton.cdiv(num_rows, block_rows),)](
        output,
        prefix_output,
        prefix_lse,
        suffix_output,
        suffix_lse,
        output_scale if fp8 else prefix_lse,
        num_rows,
        num_tokens,
        float("nan"),
        NUM_HEADS=num_heads,
        HEAD_SIZE=head_size,
        BLOCK_D=block_d,
        BLOCK_ROWS=block_rows,
        FP8_OUT=fp8,
        FP8_MAX=FP8_E4M3_MAX,
        READ_ONLY=read_only,
        num_warps=_NUM_WARPS,
    )
