"""The Triton epilogue of each output format (named by ``OutputFormat.triton_epilogue``).

An epilogue turns a tile of merged float32 values into the values the kernel stores::

    values = epilogue(acc, operand_ptr, scale_ub_ptr, token_amax, tok, head, row_ok,
                      num_tokens, stride_t, stride_g, NUM_HEADS, HEAD_SIZE, BLOCK_D, GROUP,
                      UE8M0, UE8M0_PACKED, SCALE_UB)

``acc`` is ``[rows, BLOCK_D]`` (columns past ``HEAD_SIZE`` are not stored), ``tok`` and
``head`` the rows' token and head (``head`` may be one head for all rows), ``row_ok``
which rows exist, ``num_tokens`` the call's token count ``T``; ``operand_ptr`` is the
format's device tensor (:meth:`attnmerge.formats.OutputFormat.kernel_operand`; unused
without one), ``scale_ub_ptr`` the format's ``scale_ub`` (read only with the compile-time
``SCALE_UB``), ``stride_t`` and ``stride_g`` the element strides of the scales it writes
(:meth:`~attnmerge.formats.OutputFormat.epilogue_strides`), ``GROUP``, ``UE8M0`` and
``UE8M0_PACKED`` its compile-time options (``merge_kernel.format_constexprs``).
In token tiles (formats with ``whole_token_tiles``: every row of the tile is one token's,
its heads in order) ``token_amax`` is ``max |O|`` over all of that token's heads (NaN where
any is NaN); elsewhere it is 0 and unused. The kernel
converts the values to the output's element type (round to nearest even; FP8 saturating,
NaN kept) and stores them. It receives the function as a compile-time argument and
inlines it.

Besides the epilogue, both kernels reduce ``amax`` (docs/contract.md C39) with
:func:`reduce_amax` where the format has one (the compile-time ``AMAX``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..formats import FP8_E4M3_MAX, FP8_GROUP_EPS, FP8_MIN_TOKEN_SCALE

# Globals a @triton.jit function reads must be constexpr objects (compiled code only:
# the interpreter reads any global).
_FP8_MAX = tl.constexpr(FP8_E4M3_MAX)
_GROUP_EPS = tl.constexpr(FP8_GROUP_EPS)
_MIN_TOKEN_SCALE = tl.constexpr(FP8_MIN_TOKEN_SCALE)


@triton.jit
def _abs_bits(x):
    # The bits of |x| (the sign bit cleared), every NaN made 0x7FC00000, the contract's NaN,
    # whose bits order above +inf's: non-negative floats order like their bits, so an
    # integer maximum is max |x| with NaN winning, in one reduction.
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(bits > 0x7F800000, 0x7FC00000, bits)


@triton.jit
def absmax_bits(acc, ok):
    # The bits of max |O| over the tile where ok (0 where nothing is), NaN 0x7FC00000.
    return tl.max(tl.max(tl.where(ok, _abs_bits(acc), 0), axis=1), axis=0)


@triton.jit
def reduce_amax(acc, ok, amax_ptr):
    # max |O| of the tile where ok, into the float32 at amax_ptr (passed as int32).
    # One atomic per program, relaxed: a maximum needs no order (the launch path zeroed it).
    tl.atomic_max(amax_ptr, absmax_bits(acc, ok), sem="relaxed")


@triton.jit
def plain(
    acc,
    operand_ptr,
    scale_ub_ptr,
    token_amax,
    tok,
    head,
    row_ok,
    num_tokens,
    stride_t,
    stride_g,
    NUM_HEADS,
    HEAD_SIZE,
    BLOCK_D,
    GROUP,
    UE8M0,
    UE8M0_PACKED,
    SCALE_UB,
):
    return acc


@triton.jit
def fp8_static(
    acc,
    scale_ptr,
    scale_ub_ptr,
    token_amax,
    tok,
    head,
    row_ok,
    num_tokens,
    stride_t,
    stride_g,
    NUM_HEADS,
    HEAD_SIZE,
    BLOCK_D,
    GROUP,
    UE8M0,
    UE8M0_PACKED,
    SCALE_UB,
):
    # The reciprocal is an IEEE division, as in vLLM's static quantisation. The conversion
    # that follows saturates to +-448 and keeps NaN (cvt.rn.satfinite on sm_89+; torch's
    # cast under the interpreter), so no clamp is needed.
    inv_scale = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.load(scale_ptr).to(tl.float32))
    return acc * inv_scale


@triton.jit
def _store_ue8m0_packed(
    scales_ptr,
    scale,
    tok,
    head,
    row_ok,
    group,
    stored,
    num_tokens,
    stride_t,
    stride_g,
    NUM_HEADS: tl.constexpr,
    GROUPS: tl.constexpr,
):
    # "ue8m0_packed" (int32 [T, ceil(G / 4)]): byte j of element [t, c] is group 4c + j's
    # biased exponent. Each group's byte is a plain byte store, so programs writing other
    # bytes of one element never meet.
    byte_ptr = scales_ptr.to(tl.pointer_type(tl.uint8))
    # The scale is a power of two, +inf or NaN: its exponent field is the byte (0xFF for
    # +inf and NaN, as the reference's clamp to 255 gives).
    byte = ((scale.to(tl.int32, bitcast=True) >> 23) & 0xFF).to(tl.uint8)
    column = group // 4
    lane = group % 4
    tl.store(byte_ptr + (tok[:, None] * stride_t + column * stride_g) * 4 + lane, byte, stored)
    # Padding rows [T, round_up(T, 4)) of every column but the last are 0 (vLLM's packed
    # kernel writes them): zeroed, byte by byte, by the rows of token T - 1.
    pad = tl.arange(0, 4)
    # One token apart, after the T real ones (FP8PerTokenGroup._store_scales's view).
    pad_at = (column * stride_g + num_tokens)[:, :, None] + pad[None, None, :]
    last_token = stored & (tok[:, None] == num_tokens - 1) & (column < (GROUPS - 1) // 4)
    pad_ok = last_token[:, :, None] & (num_tokens + pad < stride_g)[None, None, :]
    tl.store(byte_ptr + pad_at * 4 + lane[:, :, None], tl.zeros(pad_at.shape, tl.uint8), pad_ok)
    if GROUPS % 4 != 0:
        # Bytes past G in the last column are 0: zeroed by the row of the token's last
        # group, whose (last) head is the token's last.
        tail_at = (tok * stride_t + (GROUPS // 4) * stride_g) * 4
        tail_ok = (row_ok & (head == NUM_HEADS - 1))[:, None] & (pad >= GROUPS % 4)[None, :]
        tail = tail_at[:, None] + pad[None, :]
        tl.store(byte_ptr + tail, tl.zeros(tail.shape, tl.uint8), tail_ok)


@triton.jit
def fp8_group(
    acc,
    scales_ptr,
    scale_ub_ptr,
    token_amax,
    tok,
    head,
    row_ok,
    num_tokens,
    stride_t,
    stride_g,
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    UE8M0_PACKED: tl.constexpr,
    SCALE_UB: tl.constexpr,
):
    # Per-token-group FP8 (FP8PerTokenGroup): per group of GROUP values, s = max(amax,
    # eps) / 448 (IEEE division), with UE8M0 rounded up to a power of two; q = x * (1 / s).
    # A NaN makes its group's amax and scale NaN. Groups lie within a head, or are whole
    # heads of a power-of-two HEAD_SIZE (BLOCK_D) in a token tile, whose heads go in order;
    # rows of part of a head (merge_kernel.segment_values) pass their tile as its groups,
    # one a row, as if a token were its groups as heads of GROUP values.
    ROWS: tl.constexpr = acc.shape[0]
    if GROUP > HEAD_SIZE:
        # Groups of SPAN heads: group rows of the tile, each group's token, last head and
        # index (its first head / SPAN); a group's heads all exist or none does.
        SPAN: tl.constexpr = GROUP // HEAD_SIZE
        NUM_GROUPS: tl.constexpr = 1
        x = tl.reshape(acc, (ROWS // SPAN, 1, GROUP))
        head = tl.max(tl.reshape(head + tl.zeros_like(tok), (ROWS // SPAN, SPAN)), axis=1)
        tok = tl.max(tl.reshape(tok, (ROWS // SPAN, SPAN)), axis=1)
        row_ok = head < NUM_HEADS
        group = (head // SPAN)[:, None]
        stored = row_ok[:, None]
    else:
        NUM_GROUPS: tl.constexpr = BLOCK_D // GROUP
        x = tl.reshape(acc, (ROWS, NUM_GROUPS, GROUP))
        col_group = tl.arange(0, NUM_GROUPS)
        first_group = head * (HEAD_SIZE // GROUP) + tl.zeros_like(tok)  # a row's or all's
        group = first_group[:, None] + col_group[None, :]
        stored = row_ok[:, None] & (col_group[None, :] * GROUP < HEAD_SIZE)
    # max |x| of each group, NaN where the group holds one: one reduction, on the bits.
    amax = tl.max(_abs_bits(x), axis=2).to(tl.float32, bitcast=True)
    amax = tl.where(amax != amax, amax, tl.maximum(amax, _GROUP_EPS))
    scale = tl.math.div_rn(amax, tl.full([], _FP8_MAX, tl.float32))
    if UE8M0:
        # 2^ceil(log2(max(s, eps))), exactly: the exponent up by one where the mantissa is
        # not 0 (+inf keeps its bits; NaN stays NaN).
        bits = tl.maximum(scale, _GROUP_EPS).to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        rounded = (tl.minimum(exponent, 255) << 23).to(tl.float32, bitcast=True)
        scale = tl.where(scale != scale, scale, rounded)
    inv_scale = tl.math.div_rn(tl.full([], 1.0, tl.float32), scale)
    if UE8M0_PACKED:
        _store_ue8m0_packed(
            scales_ptr,
            scale,
            tok,
            head,
            row_ok,
            group,
            stored,
            num_tokens,
            stride_t,
            stride_g,
            NUM_HEADS,
            NUM_HEADS * HEAD_SIZE // GROUP,
        )
    else:
        tl.store(scales_ptr + tok[:, None] * stride_t + group * stride_g, scale, mask=stored)
    return tl.reshape(x * inv_scale[:, :, None], (ROWS, BLOCK_D))


@triton.jit
def fp8_token(
    acc,
    scales_ptr,
    scale_ub_ptr,
    token_amax,
    tok,
    head,
    row_ok,
    num_tokens,
    stride_t,
    stride_g,
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    UE8M0_PACKED: tl.constexpr,
    SCALE_UB: tl.constexpr,
):
    # Per-token FP8 (FP8PerToken), in token tiles: every row is token tok's, and
    # token_amax is max |O| over all its heads (NaN where any is NaN).
    a = token_amax
    if SCALE_UB:
        # The bound clamps the absmax, not the scale; a NaN on either side stays NaN.
        bound = tl.load(scale_ub_ptr).to(tl.float32)
        a = tl.minimum(a, bound, propagate_nan=tl.PropagateNan.ALL)
    # IEEE division, then the floor 1 / (448 * 512) (NaN kept, as torch.clamp keeps it).
    scale = tl.math.div_rn(a, tl.full([], _FP8_MAX, tl.float32))
    scale = tl.maximum(scale, _MIN_TOKEN_SCALE, propagate_nan=tl.PropagateNan.ALL)
    # One store per token: the row of its head 0.
    ROWS: tl.constexpr = acc.shape[0]
    stored = row_ok & (head == 0)
    tl.store(scales_ptr + tok * stride_t, tl.full([ROWS], 0.0, tl.float32) + scale, mask=stored)
    # A division per element, as vLLM's per-token quantiser divides (no reciprocal).
    return tl.math.div_rn(acc, tl.zeros_like(acc) + scale)
