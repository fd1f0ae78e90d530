"""Triton kernel: merge two partial attention states and store them in an output format.

One program handles ``BLOCK_ROWS`` (token, head) rows as a ``[BLOCK_ROWS, BLOCK_D]`` tile:
consecutive rows, or, for some calls that write the output LSE, consecutive tokens of one
head (:func:`head_major_programs`); for a format with ``whole_token_tiles`` (per-token
scales), all heads of one token, in chunks where they exceed a tile (:func:`token_tiles`);
for groups that span heads unevenly, rows of part of a head (:func:`segment_rows`).
The output format's epilogue (:mod:`.epilogues`) is a compile-time argument. Only
per-model values are compile-time constants (head count, head size, dtypes, flags); token
counts and the first partial's token count are run-time values Triton does not specialise
on, so a new batch size never triggers a recompile beyond the few tile instances the grid
size picks among. Tile choices and their
measurements: docs/triton-kernel.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..call import MergeCall
from ..formats import OutputFormat
from . import epilogues, interpreting

__all__ = [
    "ROW_OPTIONS",
    "TOKEN_TILE_ELEMENTS",
    "SegmentTiles",
    "TritonLaunch",
    "amax_pointer",
    "block_rows_for",
    "direct_runner",
    "exp_in_base",
    "format_constexprs",
    "head_major_programs",
    "int_class",
    "launch",
    "launch_arguments",
    "run",
    "runner_plan",
    "scale_ub_pointer",
    "segment_count",
    "segment_rows",
    "segment_tiles",
    "segment_values",
    "store_without_values",
    "token_tiles",
    "zero_amax",
]

logger = logging.getLogger("attnmerge")

# Row offsets are int32 (token = row // heads); every memory offset is int64.
_MAX_ROWS = 2**31 - 4096
_MAX_INT32 = 2**31 - 1

# Bytes of each partial per program tile: 32 bytes per thread per input at 4 warps.
_TILE_BYTES = 4096
_NUM_WARPS = 4
# Any register cap makes ptxas issue every load before the math, instead of packing the
# kernel into 32 registers with two memory latencies in a row (docs/triton-kernel.md);
# tests/test_ptx.py checks the order in the machine code.
_MAX_REGISTERS = 64
#: Launch options of row tiles.
ROW_OPTIONS = {"num_warps": _NUM_WARPS, "maxnreg": _MAX_REGISTERS}

# Token tiles (formats with whole_token_tiles): at most this many elements (BLOCK_H *
# BLOCK_D, padded) per pass, 32 float32 values per thread at 16 warps; wider tokens take
# several chunks of heads and two passes (docs/triton-kernel.md).
TOKEN_TILE_ELEMENTS = 16384
# Elements per thread that pick a token tile's warps (4 to 16).
_TOKEN_TILE_PER_THREAD = 32


@triton.jit
def _exp2_keep_subnormals(x):
    # tl.exp2 flushes subnormal results to zero on the GPU, which would turn a tiny weight
    # into "zero weight" and hide a NaN in its row; tl.exp keeps them, so below 2^-120
    # the weight is computed as e^(x ln 2).
    LN2: tl.constexpr = 0.6931471805599453
    return tl.where(x < -120.0, tl.exp(x * LN2), tl.exp2(x))


@triton.jit
def exp_in_base(x, BASE_2: tl.constexpr):
    # e^x, or 2^x for base-2 LSEs (subnormal results kept in both).
    if BASE_2:
        return _exp2_keep_subnormals(x)
    else:
        return tl.exp(x)


# Compiled kernels divide the weights by Markstein's sequence on the approximate
# reciprocal (inline PTX); the CPU interpreter, which runs no PTX, by IEEE division: the
# same correctly rounded quotients (see _weights_of).
_RECIPROCAL_DIVISION = tl.constexpr(not interpreting())


@triton.jit
def _weights_of(e, total):
    # 1 / total and e / total, correctly rounded, for total = 1 + e with e in [0, 1] (or
    # NaN): the CUDA kernel's weight division (divide_weight in csrc/merge.cuh holds the
    # proof), without the operand checks and slow-path branch of an IEEE division.
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


@triton.jit
def _merge_two_rows(
    tok,
    head,
    row_ok,
    tokens_with_first,
    partial0_ptr,
    lse0_ptr,
    partial1_ptr,
    lse1_ptr,
    partial0_stride_t,
    partial0_stride_h,
    partial1_stride_t,
    partial1_stride_h,
    lse0_stride_h,
    lse0_stride_t,
    lse1_stride_h,
    lse1_stride_t,
    cols,
    col_ok,
    LSE_BASE_2: tl.constexpr,
):
    # The merged float32 tile of rows (tok, head) where row_ok, and what the output LSE
    # needs: (acc, m, total, empty, has_first, l1_given).
    NEG_INF: tl.constexpr = float("-inf")
    # Tokens at or past tokens_with_first have no first partial: nothing of it is read.
    has_first = row_ok & (tok < tokens_with_first)
    # All four loads are issued before any math, so their latencies overlap.
    l0 = tl.load(
        lse0_ptr + head * lse0_stride_h + tok * lse0_stride_t, mask=has_first, other=NEG_INF
    )
    l1 = tl.load(lse1_ptr + head * lse1_stride_h + tok * lse1_stride_t, mask=row_ok, other=NEG_INF)
    row0 = partial0_ptr + tok * partial0_stride_t + head * partial0_stride_h
    row1 = partial1_ptr + tok * partial1_stride_t + head * partial1_stride_h
    o0 = tl.load(
        row0[:, None] + cols[None, :], mask=has_first[:, None] & col_ok[None, :], other=0.0
    ).to(tl.float32)
    o1 = tl.load(
        row1[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
    ).to(tl.float32)

    # A token without a first partial is the second copied, whatever its LSE: merged as if
    # that LSE were 0 (weights 0 and 1), its own LSE stored as it is.
    l1_given = l1
    l1 = tl.where(has_first, l1, 0.0)
    # +inf (FlashAttention's empty row) means empty, like -inf.
    l0 = tl.where(l0 == float("inf"), NEG_INF, l0)
    l1 = tl.where(l1 == float("inf"), NEG_INF, l1)
    # NaN must win the max: otherwise NaN vs -inf would look like an empty row.
    m = tl.maximum(l0, l1, propagate_nan=tl.PropagateNan.ALL)
    empty = m == NEG_INF
    m = tl.where(empty, 0.0, m)
    # The merge state of two partials: the larger LSE's exponential is exp(0) = 1 exactly,
    # the other e = exp(lo - m) (NaN with m, 0 when a partial is empty), the sum 1 + e (1
    # for an empty row, whose weights are forced to 0).
    gap = tl.minimum(l0, l1) - m
    e = exp_in_base(gap, LSE_BASE_2)
    total = 1.0 + e
    w_hi, w_lo = _weights_of(e, total)
    first_larger = l0 >= l1  # either way for NaN: both weights are NaN then
    w0 = tl.where(empty, 0.0, tl.where(first_larger, w_hi, w_lo))
    w1 = tl.where(empty, 0.0, tl.where(first_larger, w_lo, w_hi))

    # A zero weight contributes exactly 0, whatever the row holds (NaN, inf).
    acc = tl.where(w0[:, None] != 0, w0[:, None] * o0, 0.0) + tl.where(
        w1[:, None] != 0, w1[:, None] * o1, 0.0
    )
    return acc, m, total, empty, has_first, l1_given


@triton.jit
def _store_two_rows(
    out_ptr,
    out_lse_ptr,
    values,
    m,
    total,
    empty,
    has_first,
    l1_given,
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
        # output_lse may alias an input LSE, and the threads that store the output LSEs
        # (warp 0, from a 1-D layout) are not those that loaded every row's LSEs: the
        # barrier orders all loads before the store (a race seen on an H200 without it).
        tl.debug_barrier()
        if LSE_BASE_2:
            lse = m + tl.log2(total)
        else:
            lse = m + tl.log(total)
        lse = tl.where(empty, float("-inf"), lse)
        lse = tl.where(has_first, lse, l1_given + 0.0)  # the second's LSE as given
        tl.store(out_lse_ptr + head * out_lse_stride_h + tok * out_lse_stride_t, lse, mask=lse_ok)


@triton.jit
def segment_rows(
    num_rows,
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    SEGMENT: tl.constexpr,
    GROUP: tl.constexpr,
):
    # The rows of a program where groups span heads unevenly (segment_tiles): a row is
    # SEGMENT values of one head, a token's rows in order, num_rows rows in all. A program
    # takes whole units of lcm(HEAD_SIZE, GROUP) values, so every group and head it touches
    # is its own: a head's output LSE, stored by the head's first row, may alias an input
    # LSE that no other program reads. (tok, head, first column, row_ok, lse_ok)
    UNIT_ROWS: tl.constexpr = HEAD_SIZE * GROUP // (SEGMENT * SEGMENT)
    PROGRAM_ROWS: tl.constexpr = BLOCK_ROWS // UNIT_ROWS * UNIT_ROWS
    HEAD_ROWS: tl.constexpr = HEAD_SIZE // SEGMENT
    TOKEN_ROWS: tl.constexpr = NUM_HEADS * HEAD_ROWS
    lanes = tl.arange(0, BLOCK_ROWS)
    rows = tl.program_id(0) * PROGRAM_ROWS + lanes
    row_ok = (lanes < PROGRAM_ROWS) & (rows < num_rows)
    in_token = rows % TOKEN_ROWS
    in_head = in_token % HEAD_ROWS
    tok = (rows // TOKEN_ROWS).to(tl.int64)
    head = (in_token // HEAD_ROWS).to(tl.int64)
    return tok, head, in_head * SEGMENT, row_ok, row_ok & (in_head == 0)


@triton.jit
def segment_values(
    acc,
    row_ok,
    col_ok,
    num_rows,
    operand_ptr,
    amax_ptr,
    scale_ub_ptr,
    scales_stride_t,
    scales_stride_g,
    EPILOGUE: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    SEGMENT: tl.constexpr,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    UE8M0_PACKED: tl.constexpr,
    SCALE_UB: tl.constexpr,
    AMAX: tl.constexpr,
):
    # The values to store of segment_rows' merged tile, and its amax with AMAX: the
    # epilogue sees the tile as its [groups, GROUP] values, each group's token and index
    # within the token, as if a token were its groups as heads of GROUP values.
    if AMAX:
        epilogues.reduce_amax(acc, row_ok[:, None] & col_ok[None, :], amax_ptr)
    GROUP_ROWS: tl.constexpr = GROUP // SEGMENT
    UNIT_ROWS: tl.constexpr = HEAD_SIZE * GROUP // (SEGMENT * SEGMENT)
    PROGRAM_GROUPS: tl.constexpr = BLOCK_ROWS // UNIT_ROWS * UNIT_ROWS // GROUP_ROWS
    TOKEN_GROUPS: tl.constexpr = NUM_HEADS * HEAD_SIZE // GROUP
    lanes = tl.arange(0, BLOCK_ROWS // GROUP_ROWS)
    groups = tl.program_id(0) * PROGRAM_GROUPS + lanes
    ok = (lanes < PROGRAM_GROUPS) & (groups < num_rows // GROUP_ROWS)
    values = EPILOGUE(
        tl.reshape(acc, (BLOCK_ROWS // GROUP_ROWS, GROUP)), operand_ptr, scale_ub_ptr, 0.0,
        (groups // TOKEN_GROUPS).to(tl.int64), (groups % TOKEN_GROUPS).to(tl.int64), ok,
        num_rows // (TOKEN_GROUPS * GROUP_ROWS), scales_stride_t, scales_stride_g,
        TOKEN_GROUPS, GROUP, GROUP, GROUP, UE8M0, UE8M0_PACKED, SCALE_UB,
    )  # fmt: skip
    return tl.reshape(values, (BLOCK_ROWS, SEGMENT))


@triton.jit(do_not_specialize=["num_rows", "tokens_with_first"])
def _merge_two_kernel(
    out_ptr,
    out_lse_ptr,
    partial0_ptr,
    lse0_ptr,
    partial1_ptr,
    lse1_ptr,
    operand_ptr,
    amax_ptr,
    scale_ub_ptr,
    num_rows,
    tokens_with_first,
    out_stride_t,
    out_stride_h,
    partial0_stride_t,
    partial0_stride_h,
    partial1_stride_t,
    partial1_stride_h,
    lse0_stride_h,
    lse0_stride_t,
    lse1_stride_h,
    lse1_stride_t,
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
    HEAD_MAJOR: tl.constexpr,
    TOKEN_CHUNKS: tl.constexpr,
    SEGMENT: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_SIZE
    if SEGMENT > 0:
        # Groups that span heads unevenly: rows of SEGMENT (BLOCK_D) values of a head
        # (segment_rows), stored as segment_values makes them.
        tok, head, first_col, row_ok, lse_ok = segment_rows(
            num_rows, NUM_HEADS, HEAD_SIZE, BLOCK_ROWS, SEGMENT, GROUP
        )
        acc, m, total, empty, has_first, l1_given = _merge_two_rows(
            tok, head, row_ok, tokens_with_first,
            partial0_ptr + first_col, lse0_ptr, partial1_ptr + first_col, lse1_ptr,
            partial0_stride_t, partial0_stride_h, partial1_stride_t, partial1_stride_h,
            lse0_stride_h, lse0_stride_t, lse1_stride_h, lse1_stride_t,
            cols, col_ok, LSE_BASE_2,
        )  # fmt: skip
        values = segment_values(
            acc, row_ok, col_ok, num_rows, operand_ptr, amax_ptr, scale_ub_ptr,
            scales_stride_t, scales_stride_g, EPILOGUE, NUM_HEADS, HEAD_SIZE, BLOCK_ROWS,
            SEGMENT, GROUP, UE8M0, UE8M0_PACKED, SCALE_UB, AMAX,
        )  # fmt: skip
        _store_two_rows(
            out_ptr + first_col, out_lse_ptr, values,
            m, total, empty, has_first, l1_given, tok, head, row_ok, lse_ok, cols, col_ok,
            out_stride_t, out_stride_h, out_lse_stride_h, out_lse_stride_t,
            LSE_BASE_2, WRITE_LSE,
        )  # fmt: skip
    elif TOKEN_CHUNKS == 0:
        if HEAD_MAJOR:
            # Programs over (token block, head); num_rows holds the token count.
            tokens = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            row_ok = tokens < num_rows
            tok = tokens.to(tl.int64)
            head = tl.program_id(1).to(tl.int64)
            num_tokens = num_rows
        else:
            rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
            row_ok = rows < num_rows
            # A compile-time head count makes // and % a multiply and shift, not a division.
            tok = (rows // NUM_HEADS).to(tl.int64)
            head = (rows % NUM_HEADS).to(tl.int64)
            num_tokens = num_rows // NUM_HEADS
        acc, m, total, empty, has_first, l1_given = _merge_two_rows(
            tok, head, row_ok, tokens_with_first,
            partial0_ptr, lse0_ptr, partial1_ptr, lse1_ptr,
            partial0_stride_t, partial0_stride_h, partial1_stride_t, partial1_stride_h,
            lse0_stride_h, lse0_stride_t, lse1_stride_h, lse1_stride_t,
            cols, col_ok, LSE_BASE_2,
        )  # fmt: skip
        if AMAX:
            epilogues.reduce_amax(acc, row_ok[:, None] & col_ok[None, :], amax_ptr)
        values = EPILOGUE(
            acc, operand_ptr, scale_ub_ptr, 0.0, tok, head, row_ok, num_tokens,
            scales_stride_t, scales_stride_g,
            NUM_HEADS, HEAD_SIZE, BLOCK_D, GROUP, UE8M0, UE8M0_PACKED, SCALE_UB,
        )  # fmt: skip
        _store_two_rows(
            out_ptr, out_lse_ptr, values, m, total, empty, has_first, l1_given,
            tok, head, row_ok, row_ok, cols, col_ok,
            out_stride_t, out_stride_h, out_lse_stride_h, out_lse_stride_t,
            LSE_BASE_2, WRITE_LSE,
        )  # fmt: skip
    else:
        # Token tiles (formats with whole_token_tiles): program t holds token t's heads,
        # BLOCK_ROWS at a time, in TOKEN_CHUNKS chunks.
        tok = tl.zeros([BLOCK_ROWS], tl.int64) + tl.program_id(0)
        num_tokens = num_rows // NUM_HEADS
        if TOKEN_CHUNKS == 1:
            head = tl.arange(0, BLOCK_ROWS).to(tl.int64)
            row_ok = head < NUM_HEADS
            acc, m, total, empty, has_first, l1_given = _merge_two_rows(
                tok, head, row_ok, tokens_with_first,
                partial0_ptr, lse0_ptr, partial1_ptr, lse1_ptr,
                partial0_stride_t, partial0_stride_h, partial1_stride_t, partial1_stride_h,
                lse0_stride_h, lse0_stride_t, lse1_stride_h, lse1_stride_t,
                cols, col_ok, LSE_BASE_2,
            )  # fmt: skip
            bits = epilogues.absmax_bits(acc, row_ok[:, None] & col_ok[None, :])
            if AMAX:
                tl.atomic_max(amax_ptr, bits, sem="relaxed")
            values = EPILOGUE(
                acc, operand_ptr, scale_ub_ptr, bits.to(tl.float32, bitcast=True),
                tok, head, row_ok, num_tokens, scales_stride_t, scales_stride_g,
                NUM_HEADS, HEAD_SIZE, BLOCK_D, GROUP, UE8M0, UE8M0_PACKED, SCALE_UB,
            )  # fmt: skip
            _store_two_rows(
                out_ptr, out_lse_ptr, values, m, total, empty, has_first, l1_given,
                tok, head, row_ok, row_ok, cols, col_ok,
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
                acc, m, total, empty, has_first, l1_given = _merge_two_rows(
                    tok, head, row_ok, tokens_with_first,
                    partial0_ptr, lse0_ptr, partial1_ptr, lse1_ptr,
                    partial0_stride_t, partial0_stride_h, partial1_stride_t, partial1_stride_h,
                    lse0_stride_h, lse0_stride_t, lse1_stride_h, lse1_stride_t,
                    cols, col_ok, LSE_BASE_2,
                )  # fmt: skip
                ok = row_ok[:, None] & col_ok[None, :]
                bits = tl.maximum(bits, epilogues.absmax_bits(acc, ok))
            if AMAX:
                tl.atomic_max(amax_ptr, bits, sem="relaxed")
            for c in range(0, TOKEN_CHUNKS):
                head = (c * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
                row_ok = head < NUM_HEADS
                acc, m, total, empty, has_first, l1_given = _merge_two_rows(
                    tok, head, row_ok, tokens_with_first,
                    partial0_ptr, lse0_ptr, partial1_ptr, lse1_ptr,
                    partial0_stride_t, partial0_stride_h, partial1_stride_t, partial1_stride_h,
                    lse0_stride_h, lse0_stride_t, lse1_stride_h, lse1_stride_t,
                    cols, col_ok, LSE_BASE_2,
                )  # fmt: skip
                values = EPILOGUE(
                    acc, operand_ptr, scale_ub_ptr, bits.to(tl.float32, bitcast=True),
                    tok, head, row_ok, num_tokens, scales_stride_t, scales_stride_g,
                    NUM_HEADS, HEAD_SIZE, BLOCK_D, GROUP, UE8M0, UE8M0_PACKED, SCALE_UB,
                )  # fmt: skip
                _store_two_rows(
                    out_ptr, out_lse_ptr, values, m, total, empty, has_first, l1_given,
                    tok, head, row_ok, row_ok, cols, col_ok,
                    out_stride_t, out_stride_h, out_lse_stride_h, out_lse_stride_t,
                    LSE_BASE_2, WRITE_LSE,
                )  # fmt: skip


# Small grids take fewer rows per program, spreading them over more SMs: ((at most this
# many rows in the grid, at most this many rows per program), ...), the first tier that
# holds the grid (docs/triton-kernel.md).
_SMALL_GRID_BLOCK_ROWS = ((2048, 4), (8192, 8))

# Head-major programs only while one partial holds at most this many bytes: past it the
# rows, a token stride apart, stream worse from HBM (docs/triton-kernel.md).
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
    LSE), ``partial_bytes`` the size of the wider partial.

    With the output LSE stored ``[H, T]``, a program's output LSEs are then one
    contiguous store instead of one 32-byte sector per row. Not with fewer tokens than a
    program's rows, whose programs would be mostly idle.
    """
    return (
        output_lse_token_stride == 1
        and num_tokens >= rows_per_program
        and 1 < num_heads <= _MAX_GRID_Y
        and partial_bytes <= HEAD_MAJOR_MAX_PARTIAL_BYTES
    )


def token_tiles(num_heads: int, head_size: int) -> tuple[int, int, dict]:
    """A token tile's heads per chunk (``BLOCK_H``, a power of two), its chunks per token
    (``TOKEN_CHUNKS``) and its launch options: all heads in one ``[BLOCK_H, BLOCK_D]`` tile
    up to ``TOKEN_TILE_ELEMENTS``, else chunks of that many elements; warps for
    ``_TOKEN_TILE_PER_THREAD`` values per thread, 4 to 16; no register cap (the row
    tiles' cap of 64 would spill these)."""
    block_d = triton.next_power_of_2(head_size)
    block_h = min(triton.next_power_of_2(num_heads), max(1, TOKEN_TILE_ELEMENTS // block_d))
    warps = block_h * block_d // (32 * _TOKEN_TILE_PER_THREAD)
    options = {"num_warps": min(16, max(4, triton.next_power_of_2(max(1, warps))))}
    return block_h, triton.cdiv(num_heads, block_h), options


class SegmentTiles(NamedTuple):
    """The tiles of a call whose groups span heads unevenly (``segment_size``)."""

    #: values of one head per row (``segment_size``)
    segment: int
    #: rows of a tile (a power of two)
    block_rows: int
    #: the tile's rows a program takes: whole units of lcm(head size, group size) values
    program_rows: int
    #: Triton's launch options
    options: dict


def segment_tiles(head_size: int, group_size: int, segment: int, tile_values: int) -> SegmentTiles:
    """The tiles of a call whose groups of ``group_size`` span heads of ``head_size``
    unevenly, in rows of ``segment`` values: ``tile_values`` values per tile (what a
    row tile of whole heads would hold) and at least one unit of lcm(head size, group
    size) values; launched as row tiles, or, where a unit exceeds a row tile's bytes, as
    token tiles are (``_TOKEN_TILE_PER_THREAD`` values per thread)."""
    unit_rows = head_size * group_size // (segment * segment)
    rows = max(tile_values // segment, triton.next_power_of_2(unit_rows))
    options = ROW_OPTIONS
    if rows * segment > tile_values:
        warps = triton.next_power_of_2(max(1, rows * segment // (32 * _TOKEN_TILE_PER_THREAD)))
        options = {"num_warps": min(16, max(4, warps))}
    return SegmentTiles(segment, rows, rows // unit_rows * unit_rows, options)


def segment_count(num_rows: int, head_size: int, tiles: SegmentTiles) -> int:
    """The segment rows of ``num_rows`` rows of ``head_size`` values; ValueError where a
    program's int32 row index could pass 2^31 - 1."""
    count = num_rows * (head_size // tiles.segment)
    if count > _MAX_INT32 - tiles.block_rows:
        raise ValueError(
            f"triton backend: tokens x heads x head_size / {tiles.segment} = {count} exceeds "
            f"{_MAX_INT32 - tiles.block_rows} rows"
        )
    return count


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
# Launching. ``kernel[grid](...)`` binds and specialises every argument in Python, which
# costs several times a launch; the compiled kernel of a specialisation is therefore
# cached under attnmerge's own key and launched directly. The key is at least as fine as
# Triton's own specialisation: dtypes, constexprs, each pointer's 16-byte alignment and,
# for each specialised integer, whether it is 1, a multiple of 16, and whether it fits
# in 32 bits. Should a Triton version's compiled-kernel runner reject the argument list,
# it does so before launching, and attnmerge falls back to Triton's launch path for good
# (logged once).

_compiled: dict[tuple, object] = {}
# None until the first direct launch succeeds (then True), False once it failed.
_direct_launch: bool | None = None
_INTERPRETING = interpreting()
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def int_class(x: int) -> int:
    if not _INT32_MIN <= x <= _INT32_MAX:
        return 3
    return 2 if x == 1 else (x & 15) == 0


class TritonLaunch(NamedTuple):
    """One launch of a Triton kernel: the kernel, the key of its compiled specialisation
    (None where nothing is compiled: Triton's interpreter, a CPU), the grid, the run-time
    arguments and the compile-time ones, the device, and where in ``args`` the number of
    tokens with a first partial is (a value Triton does not specialise on)."""

    kernel: object
    key: tuple | None
    grid: tuple[int, int, int]
    args: tuple
    constexprs: tuple
    device_index: int | None
    tokens_with_first_at: int
    #: Triton's launch options (warps, register cap)
    options: dict = ROW_OPTIONS


def format_constexprs(output_format: OutputFormat) -> tuple:
    """The kernels' compile-time arguments for ``output_format``: ``EPILOGUE``, then
    ``GROUP`` and ``UE8M0`` (its ``epilogue_constants``), ``UE8M0_PACKED`` (scales in the
    ``"ue8m0_packed"`` layout), ``SCALE_UB`` (it has a ``scale_ub``) and ``AMAX`` (it
    writes ``amax``)."""
    group, ue8m0 = output_format.epilogue_constants()
    return (
        getattr(epilogues, output_format.triton_epilogue),
        group,
        ue8m0,
        getattr(output_format, "layout", None) == "ue8m0_packed",
        getattr(output_format, "scale_ub", None) is not None,
        getattr(output_format, "amax", None) is not None,
    )


def scale_ub_pointer(output_format: OutputFormat, fallback: torch.Tensor) -> torch.Tensor:
    """The kernels' ``scale_ub_ptr``: the format's ``scale_ub`` (read by its epilogue
    with ``SCALE_UB``), else ``fallback``, which the kernel never touches."""
    scale_ub = getattr(output_format, "scale_ub", None)
    return fallback if scale_ub is None else scale_ub


def store_without_values(call: MergeCall) -> None:
    """A call with tokens but no values (``H = 0`` or ``D = 0``) launches nothing; the
    format's extra outputs of such tokens (per-token scales: the smallest scale) are what
    its reference store makes of them, written on the device."""
    output = call.output
    if output.shape[0] and not output.numel():
        merged = torch.empty(output.shape, dtype=torch.float32, device=output.device)
        call.output_format.store_reference(merged, output)


def amax_pointer(output_format: OutputFormat, fallback: torch.Tensor) -> torch.Tensor:
    """The kernels' ``amax_ptr``: the format's ``amax`` viewed as int32 (the programs
    take an atomic maximum of its bits), else ``fallback``, which the kernel never
    touches."""
    amax = getattr(output_format, "amax", None)
    return fallback if amax is None else amax.view(torch.int32)


def zero_amax(output_format: OutputFormat) -> None:
    """Zero the format's ``amax`` on the current stream, before a launch: the programs'
    atomic maxima start from it, and a call with nothing to merge (T = 0) leaves 0."""
    amax = getattr(output_format, "amax", None)
    if amax is not None:
        amax.zero_()


def run(call: MergeCall, block_rows: int | None = None) -> None:
    """Launch the merge of ``call`` on the current stream (``block_rows`` overrides
    :func:`block_rows_for`)."""
    zero_amax(call.output_format)
    launch_ = launch_arguments(call, block_rows)
    if launch_ is None:
        store_without_values(call)
        return
    kernel, key, grid, args, constexprs = launch_[:5]
    if key is None:  # no compiled kernels to cache
        kernel[grid](*args, *constexprs, **launch_.options)
        return
    launch(kernel, key, grid, args, constexprs, launch_.device_index, launch_.options)


def launch_arguments(call: MergeCall, block_rows: int | None = None) -> TritonLaunch | None:
    """The launch of ``call`` (None: nothing to do)."""
    output, output_lse = call.output, call.output_lse
    partial0, partial1 = call.partials
    lse0, lse1 = call.lses
    num_tokens, num_heads, head_size = output.shape
    num_rows = num_tokens * num_heads
    if num_rows == 0 or head_size == 0:
        return None
    if num_rows > _MAX_ROWS:
        raise ValueError(f"triton backend: tokens x heads = {num_rows} exceeds {_MAX_ROWS} rows")
    itemsize = max(partial0.itemsize, partial1.itemsize)
    write_lse = output_lse is not None
    lse_out = output_lse if write_lse else lse1  # never written when WRITE_LSE=False
    out_lse_strides = lse_out.stride()
    token_chunks, options = 0, ROW_OPTIONS
    block_d = triton.next_power_of_2(head_size)
    segment = call.output_format.segment_size(head_size)
    if segment:
        # Rows of `segment` values, programs of whole heads and groups (segment_rows).
        group_size = call.output_format.group_size
        tile_values = block_rows_for(head_size, itemsize, num_rows) * block_d
        tiles = segment_tiles(head_size, group_size, segment, tile_values)
        rows_per_program, options = tiles.block_rows, tiles.options
        block_d, head_major = segment, False
    elif call.output_format.token_tiles(head_size):
        # Program t: token t's heads (a per-token scale, or groups of several heads).
        rows_per_program, token_chunks, options = token_tiles(num_heads, head_size)
        head_major = False
    else:
        rows_per_program = block_rows or block_rows_for(head_size, itemsize, num_rows)
        head_major = head_major_programs(
            out_lse_strides[1] if write_lse else None,
            num_tokens,
            num_heads,
            rows_per_program,
            num_rows * head_size * itemsize,
        )
    operand = call.output_format.kernel_operand()
    pointers = (
        output,
        lse_out,
        partial0,
        lse0,
        partial1,
        lse1,
        lse1 if operand is None else operand,  # never read without an operand
        amax_pointer(call.output_format, lse1),
        scale_ub_pointer(call.output_format, lse1),
    )
    strides = (
        *output.stride()[:2],
        *partial0.stride()[:2],
        *partial1.stride()[:2],
        *lse0.stride(),
        *lse1.stride(),
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
        head_major,
        token_chunks,
        segment,
    )
    # Head-major programs: the kernel's num_rows holds the token count; segment rows:
    # the segment count.
    count = num_tokens if head_major else num_rows
    if token_chunks:
        grid = (num_tokens, 1, 1)
    elif segment:
        count = segment_count(num_rows, head_size, tiles)
        grid = (triton.cdiv(count, tiles.program_rows), 1, 1)
    else:
        grid = (triton.cdiv(count, rows_per_program), num_heads if head_major else 1, 1)
    args = (*pointers, count, call.tokens_with_first, *strides)
    first_at = len(pointers) + 1
    device = output.device
    if device.type != "cuda" or _INTERPRETING:
        return TritonLaunch(
            _merge_two_kernel, None, grid, args, constexprs, device.index, first_at, options
        )

    key = (
        _merge_two_kernel,
        device.index,
        output.dtype,
        partial0.dtype,
        partial1.dtype,
        constexprs,
        tuple(t.data_ptr() & 15 for t in pointers),
        tuple(int_class(x) for x in strides),
    )
    return TritonLaunch(
        _merge_two_kernel, key, grid, args, constexprs, device.index, first_at, options
    )


def launch(
    kernel,
    key: tuple,
    grid: tuple,
    args: tuple,
    constexprs: tuple,
    device_index: int,
    options: dict = ROW_OPTIONS,
):
    """Launch ``kernel`` (a ``@triton.jit`` function) on ``device_index``'s current stream,
    its compiled specialisation cached under ``key`` (the kernel and everything its
    specialisation depends on, as described above; ``options``, Triton's launch options,
    follow from its compile-time arguments)."""
    if torch.cuda.current_device() == device_index:
        _launch(kernel, key, grid, args, constexprs, device_index, options)
    else:  # Triton launches on the current device: make it the tensors' one
        with torch.cuda.device(device_index):
            _launch(kernel, key, grid, args, constexprs, device_index, options)


def direct_runner(launch_: TritonLaunch):
    """The compiled kernel's own runner for ``launch_``'s grid, to be called with its
    arguments, its compile-time arguments and ``stream=``; None until a direct launch of
    it succeeded (the eager launcher then reuses it)."""
    compiled = _compiled.get(launch_.key) if launch_.key is not None else None
    return compiled[launch_.grid] if compiled is not None and _direct_launch else None


def runner_plan(
    key: bytes,
    call: MergeCall,
    launch_arguments_of: Callable[[MergeCall], TritonLaunch | None] | None = None,
) -> tuple | None:
    """The eager launcher's plan for ``call`` (run_runner_plan in attnmerge/cuda/csrc/eager.c):
    ``(key, device index, runner, arguments, slots, first_at)``, the runner None where
    there is nothing to launch; None while the kernel has no direct runner, for a format
    with ``amax``, which must be zeroed before each launch (:func:`run`), and for one with
    scales or ``scale_ub``, tensors the launcher's call does not pass.
    ``launch_arguments_of``: the kernel's launch (default: this module's two-partial one)."""
    fmt = call.output_format
    if any(getattr(fmt, name, None) is not None for name in ("amax", "scales", "scale_ub")):
        return None
    launch_ = (launch_arguments_of or launch_arguments)(call)
    if launch_ is None:
        return (key, -1, None, (), (), -1)
    runner = direct_runner(launch_)
    if runner is None:
        return None
    tensors = call.launcher_tensors()
    slots: list[int] = []
    for at, argument in enumerate(launch_.args):
        if isinstance(argument, torch.Tensor):
            which = [i for i, t in enumerate(tensors) if t is argument]
            if not which:
                return None  # a tensor the call does not pass: nothing to patch it from
            slots += (at, which[0])
    device = -1 if launch_.device_index is None else launch_.device_index  # (-1: host tests)
    arguments = (*launch_.args, *launch_.constexprs)
    return (key, device, runner, arguments, tuple(slots), launch_.tokens_with_first_at)


def _launch(
    kernel, key: tuple, grid: tuple, args: tuple, constexprs: tuple, device_index: int, options
):
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
    _compiled[key] = kernel[grid](*args, *constexprs, **options)
