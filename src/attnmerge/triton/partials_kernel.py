"""Triton kernel: merge K stacked or packed partial states, K fixed or per token.

One program handles ``BLOCK_ROWS`` consecutive (token, head) rows as a
``[BLOCK_ROWS, BLOCK_D]`` tile and folds the partials into it in order: a first pass
over the LSEs finds the running maximum, a second sums the exponentials, a third adds
each weighted partial row into a float32 accumulator (a format with ``whole_token_tiles``:
a program holds all heads of one token, as in :mod:`.merge_kernel`; groups that span heads
unevenly: rows of part of a head, as there). The weights are C1's
formula for any K (docs/contract.md): ``exp(l_k - m)`` over the in-order sum, an IEEE
division, so two partials give the bits of the two-way kernel. The output format's epilogue
(:mod:`.epilogues`) is a compile-time argument; K, the token count and the packed row
count are run-time values.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..call import MergeCall, PartialLayout
from . import epilogues, merge_kernel
from .merge_kernel import (
    ROW_OPTIONS,
    TritonLaunch,
    amax_pointer,
    exp_in_base,
    format_constexprs,
    int_class,
    launch,
    scale_ub_pointer,
    segment_count,
    segment_rows,
    segment_tiles,
    segment_values,
    store_without_values,
    token_tiles,
    zero_amax,
)

__all__ = ["run"]

_MAX_ROWS = 2**31 - 4096
# Bytes of one partial per program tile: 16 bytes per thread per partial at 4 warps.
_TILE_BYTES = 2048


@triton.jit
def _partial_lse(lse_row, k, stride_k, valid):
    # A partial's LSE, +inf read as -inf (empty), -inf where the partial is absent.
    lse = tl.load(lse_row + k * stride_k, mask=valid, other=float("-inf"))
    return tl.where(lse == float("inf"), float("-inf"), lse)


@triton.jit
def _weighted_row(
    lse_row,
    lse_stride_k,
    partial_row,
    partial_stride_k,
    cols,
    col_ok,
    row_ok,
    count,
    first_ok,
    m,
    total,
    empty,
    k,
    LSE_BASE_2: tl.constexpr,
):
    # Partial k's weight, and its row where the weight is not 0 (0 elsewhere).
    kk = tl.zeros([], tl.int64) + k
    valid = row_ok & (k < count) & (first_ok | (k > 0))
    gap = _partial_lse(lse_row, kk, lse_stride_k, valid) - m
    e = exp_in_base(gap, LSE_BASE_2)
    w = tl.where(empty, 0.0, tl.math.div_rn(e, total))
    x = tl.load(
        partial_row[:, None] + kk * partial_stride_k + cols[None, :],
        mask=((w != 0) & valid)[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    return w, x


@triton.jit
def _add_term(acc, w, x, present):
    # acc + w x where the partial is present (k < its row's count), a zero weight's term
    # being exactly 0.
    term = tl.where(w[:, None] != 0, w[:, None] * x, 0.0)
    return tl.where(present[:, None], acc + term, acc)


@triton.jit
def _merge_partial_rows(
    tok,
    head,
    row_ok,
    num_partials,
    num_packed,
    tokens_with_first,
    partials_ptr,
    lses_ptr,
    indptr_ptr,
    partial_stride_k,
    partial_stride_t,
    partial_stride_h,
    lse_stride_k,
    lse_stride_h,
    lse_stride_t,
    cols,
    col_ok,
    BLOCK_ROWS: tl.constexpr,
    LSE_BASE_2: tl.constexpr,
    PACKED: tl.constexpr,
):
    # The merged float32 tile of rows (tok, head) where row_ok, and what the output LSE
    # needs: (acc, m, total, empty).
    NEG_INF: tl.constexpr = float("-inf")
    if PACKED:
        # Token t's partials are the packed rows [indptr[t], indptr[t + 1]), clamped into
        # [0, num_packed] so that no bad indptr makes the kernel read outside them.
        start = tl.load(indptr_ptr + tok, mask=row_ok, other=0).to(tl.int64)
        end = tl.load(indptr_ptr + tok + 1, mask=row_ok, other=0).to(tl.int64)
        start = tl.minimum(tl.maximum(start, 0), num_packed)
        end = tl.minimum(tl.maximum(end, start), num_packed)
        count = end - start
        partial_row = partials_ptr + start * partial_stride_k + head * partial_stride_h
        lse_row = lses_ptr + start * lse_stride_k + head * lse_stride_h
        k_end = tl.max(count, axis=0)
        first_ok = row_ok
    else:
        count = tl.full([BLOCK_ROWS], 0, tl.int64) + num_partials
        partial_row = partials_ptr + tok * partial_stride_t + head * partial_stride_h
        lse_row = lses_ptr + tok * lse_stride_t + head * lse_stride_h
        k_end = num_partials
        # Tokens at or past tokens_with_first have no first partial: nothing of it is read.
        first_ok = tok < tokens_with_first

    # The running maximum; NaN wins it, so a NaN LSE is never taken for an empty row.
    m = tl.full([BLOCK_ROWS], NEG_INF, tl.float32)
    for k in range(0, k_end):
        valid = row_ok & (k < count) & (first_ok | (k > 0))
        lse = _partial_lse(lse_row, tl.zeros([], tl.int64) + k, lse_stride_k, valid)
        m = tl.maximum(m, lse, propagate_nan=tl.PropagateNan.ALL)
    empty = m == NEG_INF
    m = tl.where(empty, 0.0, m)
    # The sum of the exponentials, in order of k (the largest one is exp(0) = 1 exactly).
    total = tl.zeros([BLOCK_ROWS], tl.float32)
    for k in range(0, k_end):
        valid = row_ok & (k < count) & (first_ok | (k > 0))
        gap = _partial_lse(lse_row, tl.zeros([], tl.int64) + k, lse_stride_k, valid) - m
        total += exp_in_base(gap, LSE_BASE_2)
    # The weighted rows, added in order of k: the first term, then four partials' rows
    # loaded at a time (so that four loads are in flight) and added in order. A zero
    # weight adds exactly 0 and its row is not read; a packed row's partials past its
    # count add nothing at all.
    w, x = _weighted_row(
        lse_row,
        lse_stride_k,
        partial_row,
        partial_stride_k,
        cols,
        col_ok,
        row_ok,
        count,
        first_ok,
        m,
        total,
        empty,
        0,
        LSE_BASE_2,
    )
    acc = tl.where(w[:, None] != 0, w[:, None] * x, 0.0)
    for k in range(1, k_end, 4):
        w0, x0 = _weighted_row(
            lse_row,
            lse_stride_k,
            partial_row,
            partial_stride_k,
            cols,
            col_ok,
            row_ok,
            count,
            first_ok,
            m,
            total,
            empty,
            k,
            LSE_BASE_2,
        )
        w1, x1 = _weighted_row(
            lse_row,
            lse_stride_k,
            partial_row,
            partial_stride_k,
            cols,
            col_ok,
            row_ok,
            count,
            first_ok,
            m,
            total,
            empty,
            k + 1,
            LSE_BASE_2,
        )
        w2, x2 = _weighted_row(
            lse_row,
            lse_stride_k,
            partial_row,
            partial_stride_k,
            cols,
            col_ok,
            row_ok,
            count,
            first_ok,
            m,
            total,
            empty,
            k + 2,
            LSE_BASE_2,
        )
        w3, x3 = _weighted_row(
            lse_row,
            lse_stride_k,
            partial_row,
            partial_stride_k,
            cols,
            col_ok,
            row_ok,
            count,
            first_ok,
            m,
            total,
            empty,
            k + 3,
            LSE_BASE_2,
        )
        acc = _add_term(acc, w0, x0, k < count)
        acc = _add_term(acc, w1, x1, k + 1 < count)
        acc = _add_term(acc, w2, x2, k + 2 < count)
        acc = _add_term(acc, w3, x3, k + 3 < count)
    # A row without partials (packed) is 0, as in the reference.
    acc = tl.where(empty[:, None], 0.0, acc)
    return acc, m, total, empty


@triton.jit
def _store_partial_rows(
    out_ptr,
    out_lse_ptr,
    values,
    m,
    total,
    empty,
    tok,
    head,
    row_ok,
    lse_ok,
    cols,
    col_ok,
    out_stride_t,
    out_stride_h,
    out_lse_stride_h,
    out_lse_stride_t,
    LSE_BASE_2: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    # Store the epilogue's values of the rows, and with WRITE_LSE the output LSEs of the
    # rows where lse_ok (row_ok, or a head's first segment row).
    o_row = out_ptr + tok * out_stride_t + head * out_stride_h
    tl.store(
        o_row[:, None] + cols[None, :],
        values.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
    if WRITE_LSE:
        # out_lse may be the first partial's LSE: every LSE load comes before the store.
        tl.debug_barrier()
        if LSE_BASE_2:
            lse_out = m + tl.log2(total)
        else:
            lse_out = m + tl.log(total)
        lse_out = tl.where(empty, float("-inf"), lse_out)
        tl.store(
            out_lse_ptr + head * out_lse_stride_h + tok * out_lse_stride_t, lse_out, mask=lse_ok
        )


@triton.jit(do_not_specialize=["num_rows", "num_partials", "num_packed", "tokens_with_first"])
def _merge_partials_kernel(
    out_ptr,
    out_lse_ptr,
    partials_ptr,
    lses_ptr,
    indptr_ptr,
    operand_ptr,
    amax_ptr,
    scale_ub_ptr,
    num_rows,
    num_partials,
    num_packed,
    tokens_with_first,
    out_stride_t,
    out_stride_h,
    partial_stride_k,
    partial_stride_t,
    partial_stride_h,
    lse_stride_k,
    lse_stride_h,
    lse_stride_t,
    out_lse_stride_h,
    out_lse_stride_t,
    scales_stride_t,
    scales_stride_g,
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    LSE_BASE_2: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    EPILOGUE: tl.constexpr,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    UE8M0_PACKED: tl.constexpr,
    SCALE_UB: tl.constexpr,
    AMAX: tl.constexpr,
    PACKED: tl.constexpr,
    TOKEN_CHUNKS: tl.constexpr,
    SEGMENT: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_SIZE
    num_tokens = num_rows // NUM_HEADS
    if SEGMENT > 0:
        # Groups that span heads unevenly: rows of SEGMENT (BLOCK_D) values of a head
        # (merge_kernel.segment_rows), stored as segment_values makes them.
        tok, head, first_col, row_ok, lse_ok = segment_rows(
            num_rows, NUM_HEADS, HEAD_SIZE, BLOCK_ROWS, SEGMENT, GROUP
        )
        acc, m, total, empty = _merge_partial_rows(
            tok, head, row_ok, num_partials, num_packed, tokens_with_first,
            partials_ptr + first_col, lses_ptr, indptr_ptr,
            partial_stride_k, partial_stride_t, partial_stride_h,
            lse_stride_k, lse_stride_h, lse_stride_t,
            cols, col_ok, BLOCK_ROWS, LSE_BASE_2, PACKED,
        )  # fmt: skip
        values = segment_values(
            acc, row_ok, col_ok, num_rows, operand_ptr, amax_ptr, scale_ub_ptr,
            scales_stride_t, scales_stride_g, EPILOGUE, NUM_HEADS, HEAD_SIZE, BLOCK_ROWS,
            SEGMENT, GROUP, UE8M0, UE8M0_PACKED, SCALE_UB, AMAX,
        )  # fmt: skip
        _store_partial_rows(
            out_ptr + first_col, out_lse_ptr, values,
            m, total, empty, tok, head, row_ok, lse_ok, cols, col_ok,
            out_stride_t, out_stride_h, out_lse_stride_h, out_lse_stride_t,
            LSE_BASE_2, WRITE_LSE,
        )  # fmt: skip
    elif TOKEN_CHUNKS == 0:
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < num_rows
        tok = (rows // NUM_HEADS).to(tl.int64)
        head = (rows % NUM_HEADS).to(tl.int64)
        acc, m, total, empty = _merge_partial_rows(
            tok, head, row_ok, num_partials, num_packed, tokens_with_first,
            partials_ptr, lses_ptr, indptr_ptr,
            partial_stride_k, partial_stride_t, partial_stride_h,
            lse_stride_k, lse_stride_h, lse_stride_t,
            cols, col_ok, BLOCK_ROWS, LSE_BASE_2, PACKED,
        )  # fmt: skip
        if AMAX:
            epilogues.reduce_amax(acc, row_ok[:, None] & col_ok[None, :], amax_ptr)
        values = EPILOGUE(
            acc, operand_ptr, scale_ub_ptr, 0.0, tok, head, row_ok, num_tokens,
            scales_stride_t, scales_stride_g,
            NUM_HEADS, HEAD_SIZE, BLOCK_D, GROUP, UE8M0, UE8M0_PACKED, SCALE_UB,
        )  # fmt: skip
        _store_partial_rows(
            out_ptr, out_lse_ptr, values, m, total, empty, tok, head, row_ok, row_ok,
            cols, col_ok,
            out_stride_t, out_stride_h, out_lse_stride_h, out_lse_stride_t,
            LSE_BASE_2, WRITE_LSE,
        )  # fmt: skip
    else:
        # Token tiles (formats with whole_token_tiles): program t holds token t's heads,
        # BLOCK_ROWS at a time, in TOKEN_CHUNKS chunks.
        tok = tl.zeros([BLOCK_ROWS], tl.int64) + tl.program_id(0)
        if TOKEN_CHUNKS == 1:
            head = tl.arange(0, BLOCK_ROWS).to(tl.int64)
            row_ok = head < NUM_HEADS
            acc, m, total, empty = _merge_partial_rows(
                tok, head, row_ok, num_partials, num_packed, tokens_with_first,
                partials_ptr, lses_ptr, indptr_ptr,
                partial_stride_k, partial_stride_t, partial_stride_h,
                lse_stride_k, lse_stride_h, lse_stride_t,
                cols, col_ok, BLOCK_ROWS, LSE_BASE_2, PACKED,
            )  # fmt: skip
            bits = epilogues.absmax_bits(acc, row_ok[:, None] & col_ok[None, :])
            if AMAX:
                tl.atomic_max(amax_ptr, bits, sem="relaxed")
            values = EPILOGUE(
                acc, operand_ptr, scale_ub_ptr, bits.to(tl.float32, bitcast=True),
                tok, head, row_ok, num_tokens, scales_stride_t, scales_stride_g,
                NUM_HEADS, HEAD_SIZE, BLOCK_D, GROUP, UE8M0, UE8M0_PACKED, SCALE_UB,
            )  # fmt: skip
            _store_partial_rows(
                out_ptr, out_lse_ptr, values, m, total, empty, tok, head, row_ok, row_ok,
            cols, col_ok,
                out_stride_t, out_stride_h, out_lse_stride_h, out_lse_stride_t,
                LSE_BASE_2, WRITE_LSE,
            )  # fmt: skip
        else:
            # A token too wide for one tile: a first pass merges its chunks for the
            # token's absmax only, a second merges them again (the same bits) and stores.
            bits = tl.zeros([], tl.int32)
            for c in range(0, TOKEN_CHUNKS):
                head = (c * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
                row_ok = head < NUM_HEADS
                acc, m, total, empty = _merge_partial_rows(
                    tok, head, row_ok, num_partials, num_packed, tokens_with_first,
                    partials_ptr, lses_ptr, indptr_ptr,
                    partial_stride_k, partial_stride_t, partial_stride_h,
                    lse_stride_k, lse_stride_h, lse_stride_t,
                    cols, col_ok, BLOCK_ROWS, LSE_BASE_2, PACKED,
                )  # fmt: skip
                ok = row_ok[:, None] & col_ok[None, :]
                bits = tl.maximum(bits, epilogues.absmax_bits(acc, ok))
            if AMAX:
                tl.atomic_max(amax_ptr, bits, sem="relaxed")
            for c in range(0, TOKEN_CHUNKS):
                head = (c * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
                row_ok = head < NUM_HEADS
                acc, m, total, empty = _merge_partial_rows(
                    tok, head, row_ok, num_partials, num_packed, tokens_with_first,
                    partials_ptr, lses_ptr, indptr_ptr,
                    partial_stride_k, partial_stride_t, partial_stride_h,
                    lse_stride_k, lse_stride_h, lse_stride_t,
                    cols, col_ok, BLOCK_ROWS, LSE_BASE_2, PACKED,
                )  # fmt: skip
                values = EPILOGUE(
                    acc, operand_ptr, scale_ub_ptr, bits.to(tl.float32, bitcast=True),
                    tok, head, row_ok, num_tokens, scales_stride_t, scales_stride_g,
                    NUM_HEADS, HEAD_SIZE, BLOCK_D, GROUP, UE8M0, UE8M0_PACKED, SCALE_UB,
                )  # fmt: skip
                _store_partial_rows(
                    out_ptr, out_lse_ptr, values, m, total, empty, tok, head, row_ok,
                    row_ok, cols, col_ok, out_stride_t, out_stride_h, out_lse_stride_h,
                    out_lse_stride_t, LSE_BASE_2, WRITE_LSE,
                )  # fmt: skip


def run(call: MergeCall) -> None:
    """Launch the merge of a stacked or packed ``call`` on the current stream."""
    zero_amax(call.output_format)
    launch_ = launch_arguments(call)
    if launch_ is None:
        store_without_values(call)
        return
    kernel, key, grid, args, constexprs = launch_[:5]
    if key is None:  # the interpreter: no compiled kernels to cache
        kernel[grid](*args, *constexprs, **launch_.options)
        return
    launch(kernel, key, grid, args, constexprs, launch_.device_index, launch_.options)


def runner_plan(key: bytes, call: MergeCall) -> tuple | None:
    """The eager launcher's plan for a stacked or packed ``call`` (merge_kernel.runner_plan)."""
    return merge_kernel.runner_plan(key, call, launch_arguments)


def launch_arguments(call: MergeCall) -> TritonLaunch | None:
    """The launch of a stacked or packed ``call`` (None: nothing to do)."""
    output, output_lse = call.output, call.output_lse
    (partials,), (lses,) = call.partials, call.lses
    num_tokens, num_heads, head_size = output.shape
    num_rows = num_tokens * num_heads
    if num_rows == 0 or head_size == 0:
        return None
    if num_rows > _MAX_ROWS:
        raise ValueError(f"triton backend: tokens x heads = {num_rows} exceeds {_MAX_ROWS} rows")
    packed = call.signature.layout is PartialLayout.PACKED
    block_d = triton.next_power_of_2(head_size)
    token_chunks, options = 0, ROW_OPTIONS
    segment = call.output_format.segment_size(head_size)
    count = num_rows
    if segment:
        # Rows of `segment` values, programs of whole heads and groups (segment_rows).
        group_size = call.output_format.group_size
        tile_values = max(block_d, _TILE_BYTES // partials.itemsize)
        tiles = segment_tiles(head_size, group_size, segment, tile_values)
        rows_per_program, options = tiles.block_rows, tiles.options
        count, block_d = segment_count(num_rows, head_size, tiles), segment
    elif call.output_format.token_tiles(head_size):
        # Program t: token t's heads (a per-token scale, or groups of several heads).
        rows_per_program, token_chunks, options = token_tiles(num_heads, head_size)
    else:
        rows_per_program = max(1, _TILE_BYTES // (block_d * partials.itemsize))
    write_lse = output_lse is not None
    lse_out = output_lse if write_lse else lses  # never written when WRITE_LSE=False
    operand = call.output_format.kernel_operand()
    if packed:
        # packed rows: the partial axis is the row axis, and there is no token axis
        num_partials, num_packed = 0, partials.shape[0]
        partial_strides = (partials.stride(0), 0, partials.stride(1))
        lse_strides = (lses.stride(1), lses.stride(0), 0)
    else:
        num_partials, num_packed = partials.shape[0], 0
        partial_strides = partials.stride()[:3]
        lse_strides = lses.stride()
    pointers = (
        output,
        lse_out,
        partials,
        lses,
        call.indptr if packed else lses,  # never read unless packed
        lses if operand is None else operand,  # never read without an operand
        amax_pointer(call.output_format, lses),
        scale_ub_pointer(call.output_format, lses),
    )
    out_lse_strides = output_lse.stride() if write_lse else (0, 0)
    strides = (
        *output.stride()[:2],
        *partial_strides,
        *lse_strides,
        *out_lse_strides,
        *call.output_format.epilogue_strides(),
    )
    constexprs = (
        num_heads,
        head_size,
        block_d,
        rows_per_program,
        call.lse_base_2,
        write_lse,
        *format_constexprs(call.output_format),
        packed,
        token_chunks,
        segment,
    )
    if token_chunks:
        grid = (num_tokens, 1, 1)
    else:  # (segment rows: a program takes tiles.program_rows of its rows)
        grid = (triton.cdiv(count, tiles.program_rows if segment else rows_per_program), 1, 1)
    sizes = (count, num_partials, num_packed, call.tokens_with_first)
    args = (*pointers, *sizes, *strides)
    first_at = len(pointers) + len(sizes) - 1
    device = output.device
    if device.type != "cuda":  # the interpreter: no compiled kernels to cache
        return TritonLaunch(
            _merge_partials_kernel, None, grid, args, constexprs, device.index, first_at, options
        )
    key = (
        _merge_partials_kernel,
        device.index,
        output.dtype,
        partials.dtype,
        None if call.indptr is None else call.indptr.dtype,
        constexprs,
        tuple(t.data_ptr() & 15 for t in pointers),
        tuple(int_class(x) for x in strides),
    )
    return TritonLaunch(
        _merge_partials_kernel, key, grid, args, constexprs, device.index, first_at, options
    )
