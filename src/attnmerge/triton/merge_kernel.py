"""Triton kernel: merge two partial attention states, optionally storing FP8.

One program handles ``BLOCK_ROWS`` consecutive (token, head) rows as a
``[BLOCK_ROWS, BLOCK_D]`` tile (or, for some output-LSE calls, consecutive tokens of one
head: head_major_programs), so a program moves a few KB per input with 16-byte vector
loads, and small batches still spread over several programs. Only per-model values are
compile-time constants (head count, head size, dtypes, flags); token counts and
``prefill_tokens_with_context`` are runtime values that Triton is told not to
specialise on, so a new batch size never triggers a recompile beyond the few instances
(small-grid tiles, program order) that the grid size picks among, each compiled once.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from . import interpreting

__all__ = ["merge_two_states"]

logger = logging.getLogger("attnmerge")

# Row offsets are int32 (token = row // heads); every memory offset is int64.
_MAX_ROWS = 2**31 - 4096

# Bytes of each partial input per program tile. Measured on an H200 (D = 128, FP8
# out, CUDA-graph medians): bf16 4096x128 took 79.3 us at 16 rows (4 KiB) against
# 90.5 us at 8 rows and 81.0 us at 32; fp32 1024x128 took 36.4 us at 8 rows
# (4 KiB) against 37.2 at 16. At 4 warps this is 32 bytes per thread per input.
_TILE_BYTES = 4096
_NUM_WARPS = 4
# A register cap, given so that the assembler schedules for latency. Without one, ptxas
# (Triton 3.6 and 3.7, sm_90a) fits these kernels in 32 registers, for full occupancy,
# by issuing a thread's row loads only after its LSEs have arrived and its weights are
# computed, or its second row's loads after its first row is merged: two memory latencies
# in a row. With any cap (40, 64 or 128 measured alike), every load goes out first, in
# 22 to 47 registers. On an H200 (D = 128, same run, means of 4 rounds of medians):
# fp32 -> FP8 256 x 64 3.85 -> 3.64 us, 1024 x 16 3.82 -> 3.61, 4096 x 4 3.84 -> 3.56;
# bf16 -> FP8 256 x 128 4.26 -> 4.00, 4096 x 128 79.02 -> 78.10; bf16 -> bf16 64 x 128
# 2.73 -> 2.20, 4096 x 128 101.16 -> 94.62; T = 1 unchanged. tests/test_ptx.py checks
# the order in the machine code.
_MAX_REGISTERS = 64


@triton.jit
def _exp2_keep_subnormals(x):
    # On the GPU, tl.exp2 flushes subnormal results to zero (seen on an H200 with
    # Triton 3.6: 2^-130 became 0), which would turn a tiny but non-zero weight into
    # "zero weight" and hide a NaN in its row, unlike the reference. tl.exp keeps
    # subnormals (e^-100 survived on the same card), so below 2^-120 the weight is
    # computed as e^(x ln 2); above, tl.exp2 is the more accurate path.
    LN2: tl.constexpr = 0.6931471805599453
    return tl.where(x < -120.0, tl.exp(x * LN2), tl.exp2(x))


# Compiled kernels divide the weights by Markstein's sequence on the approximate
# reciprocal (inline PTX); the CPU interpreter, which runs no PTX, by Triton's IEEE
# division: the same correctly rounded quotients (see _weights_of).
_RECIPROCAL_DIVISION = tl.constexpr(not interpreting())


@triton.jit
def _weights_of(e, total):
    # 1 / total and e / total, rounded to nearest even, for total = 1 + e with e in [0, 1]
    # (or NaN): the CUDA kernel's weight division (weight_reciprocal, reciprocal_weight
    # and divide_weight in csrc/merge_attn_states.cuh, where the proof is), correctly
    # rounded on these operands with no slow path. Triton's div_rn is the GPU's IEEE
    # division, which checks its operands and branches to a long exact routine where the
    # check fails (a zero numerator: an empty partial); keeping those rows off it still
    # cost two divisions' checks and branches on every row's critical path. On an H200
    # (bf16 -> FP8, D = 128, same run, means of 4 rounds) this took 1 x 128 from 1.54 to
    # 1.33 us, 16 x 128 from 1.81 to 1.73 and 256 x 128 from 4.89 to 4.41; fp32 1 x 128
    # from 1.50 to 1.32, fp32 256 x 64 from 3.85 to 3.92.
    if _RECIPROCAL_DIVISION:
        y0 = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [total], dtype=tl.float32, is_pure=True, pack=1
        )
        y = tl.fma(tl.fma(-total, y0, 1.0), y0, y0)
        w_hi = tl.fma(tl.fma(-total, y, 1.0), y, y)
        q = e * y
        w_lo = tl.fma(tl.fma(-total, q, e), y, q)
    else:
        w_hi = tl.math.div_rn(tl.full([], 1.0, tl.float32), total)
        w_lo = tl.math.div_rn(e, total)
    return w_hi, w_lo


@triton.jit(do_not_specialize=["num_rows", "num_tokens_with_prefix"])
def _merge_two_kernel(
    out_ptr,
    out_lse_ptr,
    prefix_ptr,
    prefix_lse_ptr,
    suffix_ptr,
    suffix_lse_ptr,
    scale_ptr,
    num_rows,
    num_tokens_with_prefix,
    out_stride_t,
    out_stride_h,
    prefix_stride_t,
    prefix_stride_h,
    suffix_stride_t,
    suffix_stride_h,
    prefix_lse_stride_h,
    prefix_lse_stride_t,
    suffix_lse_stride_h,
    suffix_lse_stride_t,
    out_lse_stride_h,
    out_lse_stride_t,
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    LSE_BASE_2: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    FP8_OUT: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    if HEAD_MAJOR:
        # Programs over (token block, head): a program's rows are consecutive tokens of
        # one head (head_major_programs), and num_rows holds the token count.
        tokens = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = tokens < num_rows
        tok = tokens.to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
    else:
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < num_rows
        # The head count is a compile-time constant (a per-model value, like the head
        # size): with a run-time one, // and % are a full integer division per row, which
        # cost bf16 16 x 128 1.61 -> 1.75 us, 64 x 128 2.26 -> 2.41 and fp32 256 x 64
        # 3.78 -> 3.90 on an H200 (same run; docs/performance.md).
        tok = (rows // NUM_HEADS).to(tl.int64)
        head = (rows % NUM_HEADS).to(tl.int64)
    # Tokens at or past P have no prefix: neither its row nor its LSE is read.
    has_prefix = row_ok & (tok < num_tokens_with_prefix)

    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_SIZE
    # All four loads are issued before any math, so their latencies overlap.
    p_lse = tl.load(
        prefix_lse_ptr + head * prefix_lse_stride_h + tok * prefix_lse_stride_t,
        mask=has_prefix,
        other=NEG_INF,
    )
    s_lse = tl.load(
        suffix_lse_ptr + head * suffix_lse_stride_h + tok * suffix_lse_stride_t,
        mask=row_ok,
        other=NEG_INF,
    )
    p_row = prefix_ptr + tok * prefix_stride_t + head * prefix_stride_h
    s_row = suffix_ptr + tok * suffix_stride_t + head * suffix_stride_h
    p_out = tl.load(
        p_row[:, None] + cols[None, :], mask=has_prefix[:, None] & col_ok[None, :], other=0.0
    ).to(tl.float32)
    s_out = tl.load(
        s_row[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
    ).to(tl.float32)

    # +inf (FlashAttention's empty row) means empty, like -inf.
    p_lse = tl.where(p_lse == float("inf"), NEG_INF, p_lse)
    s_lse = tl.where(s_lse == float("inf"), NEG_INF, s_lse)
    # NaN must win the max: otherwise NaN vs -inf would look like an empty row.
    m = tl.maximum(p_lse, s_lse, propagate_nan=tl.PropagateNan.ALL)
    empty = m == NEG_INF
    m = tl.where(empty, 0.0, m)
    # One exponential per row: the larger LSE's is exp(0) = 1, exactly, so the reference's
    # two exponentials are 1 and e = exp(lo - m) (NaN with m, 0 when one partial is
    # empty), and total = 1 + e (1 for an empty row, whose weights are forced to 0).
    gap = tl.minimum(p_lse, s_lse) - m
    if LSE_BASE_2:
        e = _exp2_keep_subnormals(gap)
    else:
        e = tl.exp(gap)
    total = 1.0 + e
    w_hi, w_lo = _weights_of(e, total)
    prefix_larger = p_lse >= s_lse  # either way for NaN: both weights are NaN then
    p_w = tl.where(empty, 0.0, tl.where(prefix_larger, w_hi, w_lo))
    s_w = tl.where(empty, 0.0, tl.where(prefix_larger, w_lo, w_hi))

    # A zero weight contributes exactly 0, whatever the row holds (NaN, inf).
    acc = tl.where(p_w[:, None] != 0, p_w[:, None] * p_out, 0.0) + tl.where(
        s_w[:, None] != 0, s_w[:, None] * s_out, 0.0
    )
    if FP8_OUT:
        one = tl.full([], 1.0, tl.float32)
        inv_scale = tl.math.div_rn(one, tl.load(scale_ptr).to(tl.float32))
        # The conversion saturates to +-448 and keeps NaN: on the GPU it is
        # cvt.rn.satfinite (sm_89+, the only GPUs where Triton has fp8e4nv), under the
        # interpreter torch's cast (interpreter_fix). A clamp before it changed no bits and
        # cost two NaN-propagating compares per element: bf16 64 x 128 took 2.42 us with
        # it, 2.33 without, 256 x 128 4.89 and 4.72 (H200, same run as above).
        acc = acc * inv_scale
    o_row = out_ptr + tok * out_stride_t + head * out_stride_h
    tl.store(
        o_row[:, None] + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
    if WRITE_LSE:
        # output_lse may alias prefix_lse, and the thread that stores a row's output LSE
        # is not one that loaded its LSEs for the weights: Triton loads the LSEs once per
        # layout, and stores from a 1-D layout whose threads 0..BLOCK_ROWS-1 (warp 0) hold
        # rows that other warps merge. Without a barrier, warp 0 could overwrite a prefix
        # LSE before another warp has read it: on an H200, in place, 39 of 3000 runs of
        # bf16 4096 x 128 and 1 of 1000 of fp32 2048 x 64 x 512 gave other outputs than
        # the same merge out of place (0 with the barrier). The block barrier orders every
        # thread's loads before the store; it cost 0 to 0.03 us (bf16 -> FP8 1 x 128
        # 1.34 -> 1.35 us, 64 x 128 2.62 -> 2.64, 4096 x 128 81.75 either way).
        tl.debug_barrier()
        if LSE_BASE_2:
            lse = m + tl.log2(total)
        else:
            lse = m + tl.log(total)
        lse = tl.where(empty, NEG_INF, lse)
        tl.store(out_lse_ptr + head * out_lse_stride_h + tok * out_lse_stride_t, lse, mask=row_ok)


# Small grids take fewer rows per program, which spreads them over more SMs:
# {at most this many rows in the grid: at most this many rows per program}, the first
# tier that holds the grid. On an H200 (D = 128, FP8 out, 5% of the LSEs +inf), 4 rows
# instead of 16 took bf16 1 x 128 from 1.64 to 1.56 us, 16 x 128 (2048 rows) from 2.00
# to 1.86 and 16 x 32 from 1.81 to 1.67. With every load issued first (_MAX_REGISTERS),
# 8 rows instead of 16 took bf16 64 x 128 (8192 rows) from 2.28 to 2.16 us, 256 x 32
# from 2.24 to 2.16 and 1024 x 8 from 2.26 to 2.14 (one run, the stream yardstick's
# tiles measured alongside); docs/performance.md has the grid.
_SMALL_GRID_BLOCK_ROWS = ((2048, 4), (8192, 8))


# Head-major programs only while one partial holds at most this many bytes (see
# head_major_programs).
HEAD_MAJOR_MAX_PARTIAL_BYTES = 16 << 20
_MAX_GRID_Y = 65535  # CUDA's limit on the grid's second dimension: the head count


def head_major_programs(
    output_lse_token_stride: int | None,
    num_tokens: int,
    num_heads: int,
    rows_per_program: int,
    partial_bytes: int,
) -> bool:
    """Whether a call's programs take the tokens of one head (a 2-D grid over token
    blocks and heads) rather than consecutive (token, head) rows.
    ``output_lse_token_stride`` is the output LSE's stride along tokens (None: no output
    LSE), ``partial_bytes`` the size of the wider partial (T x H x D x its element size).

    A program stores its rows' output LSEs from one 1-D layout: in vLLM's ``[H, T]``
    LSE layout, the heads of one token put each row's LSE in its own 32-byte sector,
    while the tokens of one head make them one contiguous store. Unlike a flat head-major
    row index, the 2-D grid needs no division by the run-time token count. On an H200
    (-> FP8 with the output LSE, D = 128, same run, bit-identical outputs, in place and
    with P = T / 2 too) this took bf16 64 x 32 from 1.89 to 1.71 us, 64 x 128 from 2.65
    to 2.52, 1024 x 8 from 2.79 to 2.51, 1024 x 64 (16 MiB a partial) from 8.98 to
    8.60, fp32 64 x 8 from 1.67 to 1.51 and 256 x 128 from 7.15 to 6.53 (fp32 16 x 128
    1.79 -> 1.82). Past 16 MiB a partial the CUDA kernel's head-major rows lost (bf16
    4096 x 128 80.14 -> 84.46 us, fp32 4096 x 128 139.35 -> 143.84), their rows a token
    stride apart once the partials stream from HBM; so not there. And not with fewer
    tokens than a program's rows, whose programs would be mostly idle.
    """
    return (
        output_lse_token_stride == 1
        and num_tokens >= rows_per_program
        and 1 < num_heads <= _MAX_GRID_Y
        and partial_bytes <= HEAD_MAJOR_MAX_PARTIAL_BYTES
    )


def block_rows_for(head_size: int, itemsize: int, num_rows: int | None = None) -> int:
    """Rows per program: fill ``_TILE_BYTES`` of the widest input, at least one row; in
    grids of up to a tier's rows, at most its rows per program
    (``_SMALL_GRID_BLOCK_ROWS``)."""
    rows = max(1, _TILE_BYTES // (triton.next_power_of_2(head_size) * itemsize))
    for last_row, tier_rows in _SMALL_GRID_BLOCK_ROWS if num_rows is not None else ():
        if num_rows <= last_row:
            return min(rows, tier_rows)
    return rows


# ---------------------------------------------------------------------------
# Launching. ``kernel[grid](...)`` costs ~50 us of host time per call on an H200
# host (Triton binds and specialises every argument in Python). The compiled
# kernel for a specialisation is therefore cached under our own key and launched
# directly (~10 us). The key is at least as fine as Triton's own specialisation:
# dtypes, constexprs, each pointer's 16-byte alignment and, for each specialised
# integer, whether it is 1, a multiple of 16, and whether it fits in 32 bits.
# The compiled kernel's runner takes every kernel argument, constexprs included, in
# Triton 3.4 to 3.7; should a Triton version disagree, the runner rejects the
# argument list before launching anything, and attnmerge falls back to Triton's own
# launch path for good (logged once).

_compiled: dict[tuple, object] = {}
# None until the first direct launch succeeds (then True), False once it failed.
_direct_launch: bool | None = None
_INTERPRETING = interpreting()
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _int_class(x: int) -> int:
    if not _INT32_MIN <= x <= _INT32_MAX:
        return 3
    return 2 if x == 1 else (x & 15) == 0


def merge_two_states(
    output: torch.Tensor,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    output_lse: torch.Tensor | None,
    prefill_tokens_with_context: int | None,
    output_scale: torch.Tensor | None,
    lse_base_2: bool,
    block_rows: int | None = None,
) -> None:
    """Launch the merge on the current stream. Arguments must already be validated."""
    num_tokens, num_heads, head_size = output.shape
    num_rows = num_tokens * num_heads
    if num_rows == 0 or head_size == 0:
        return
    if num_rows > _MAX_ROWS:
        raise ValueError(f"triton backend: tokens x heads = {num_rows} exceeds {_MAX_ROWS} rows")
    itemsize = max(prefix_output.itemsize, suffix_output.itemsize)
    rows_per_program = block_rows or block_rows_for(head_size, itemsize, num_rows)
    write_lse = output_lse is not None
    lse_out = output_lse if write_lse else suffix_lse  # never written when WRITE_LSE=False
    out_lse_strides = lse_out.stride()
    head_major = head_major_programs(
        out_lse_strides[1] if write_lse else None,
        num_tokens,
        num_heads,
        rows_per_program,
        num_rows * head_size * itemsize,
    )
    fp8 = output_scale is not None
    pointers = (
        output,
        lse_out,
        prefix_output,
        prefix_lse,
        suffix_output,
        suffix_lse,
        output_scale if fp8 else suffix_lse,
    )
    tokens_with_prefix = (
        num_tokens if prefill_tokens_with_context is None else prefill_tokens_with_context
    )
    strides = (
        *output.stride()[:2],
        *prefix_output.stride()[:2],
        *suffix_output.stride()[:2],
        *prefix_lse.stride(),
        *suffix_lse.stride(),
        *out_lse_strides,
    )
    constexprs = (
        num_heads,
        head_size,
        triton.next_power_of_2(head_size),
        rows_per_program,
        lse_base_2,
        write_lse,
        fp8,
        head_major,
    )
    # Head-major programs: the kernel's num_rows holds the token count.
    count = num_tokens if head_major else num_rows
    grid = (triton.cdiv(count, rows_per_program), num_heads if head_major else 1, 1)
    args = (*pointers, count, tokens_with_prefix, *strides)
    device = output.device
    if device.type != "cuda" or _INTERPRETING:  # no compiled kernels to cache
        _merge_two_kernel[grid](*args, *constexprs, num_warps=_NUM_WARPS, maxnreg=_MAX_REGISTERS)
        return

    key = (
        device.index,
        output.dtype,
        prefix_output.dtype,
        suffix_output.dtype,
        constexprs,
        tuple(t.data_ptr() & 15 for t in pointers),
        tuple(_int_class(x) for x in strides),
    )
    if torch.cuda.current_device() == device.index:
        _launch(key, grid, args, constexprs, device.index)
    else:  # Triton launches on the current device: make it the tensors' one
        with torch.cuda.device(device):
            _launch(key, grid, args, constexprs, device.index)


def _launch(key: tuple, grid: tuple, args: tuple, constexprs: tuple, device_index: int) -> None:
    global _direct_launch
    compiled = _compiled.get(key)
    if compiled is not None and _direct_launch is not False:
        # The compiled kernel's own launcher (it runs Triton's launch hooks, if any).
        stream = torch._C._cuda_getCurrentRawStream(device_index)
        if _direct_launch:
            compiled[grid](*args, *constexprs, stream=stream)
            return
        try:  # the first time: a runner that rejects the arguments launches nothing
            compiled[grid](*args, *constexprs, stream=stream)
            _direct_launch = True
            return
        except Exception as e:
            _direct_launch = False
            logger.warning(
                "attnmerge: direct launch of compiled Triton kernels is not supported by "
                "triton %s (%s); using Triton's launch path (slower on the host)",
                triton.__version__,
                e,
            )
    # Triton's own path: compiles (or finds) the kernel, then launches it.
    _compiled[key] = _merge_two_kernel[grid](
        *args, *constexprs, num_warps=_NUM_WARPS, maxnreg=_MAX_REGISTERS
    )
