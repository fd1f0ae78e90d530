"""The Triton epilogue of each output format (named by ``OutputFormat.triton_epilogue``).

An epilogue turns a tile of merged float32 values into the values the kernel stores::

    values = epilogue(acc, operand_ptr, tok, head, row_ok, stride_t, stride_g,
                      HEAD_SIZE, BLOCK_D, GROUP, UE8M0)

``acc`` is ``[rows, BLOCK_D]`` (columns past ``HEAD_SIZE`` hold 0), ``tok`` and ``head``
the rows' token and head (``head`` may be one head for all rows), ``row_ok`` which rows
exist; ``operand_ptr`` is the format's device tensor
(:meth:`attnmerge.formats.OutputFormat.kernel_operand`; unused without one), ``stride_t``
and ``stride_g`` the strides of the scales it writes
(:meth:`~attnmerge.formats.OutputFormat.epilogue_strides`), ``GROUP`` and ``UE8M0`` its
compile-time options. The kernel converts the values to the output's element type (round
to nearest even; FP8 saturating, NaN kept) and stores them. It receives the function as a
compile-time argument and inlines it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..formats import FP8_E4M3_MAX, FP8_GROUP_EPS

# Globals a @triton.jit function reads must be constexpr objects (compiled code only:
# the interpreter reads any global).
_FP8_MAX = tl.constexpr(FP8_E4M3_MAX)
_GROUP_EPS = tl.constexpr(FP8_GROUP_EPS)


@triton.jit
def plain(
    acc, operand_ptr, tok, head, row_ok, stride_t, stride_g, HEAD_SIZE, BLOCK_D, GROUP, UE8M0
):
    return acc


@triton.jit
def fp8_static(
    acc, scale_ptr, tok, head, row_ok, stride_t, stride_g, HEAD_SIZE, BLOCK_D, GROUP, UE8M0
):
    # The reciprocal is an IEEE division, as in vLLM's static quantisation. The conversion
    # that follows saturates to +-448 and keeps NaN (cvt.rn.satfinite on sm_89+; torch's
    # cast under the interpreter), so no clamp is needed.
    inv_scale = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.load(scale_ptr).to(tl.float32))
    return acc * inv_scale


@triton.jit
def fp8_group(
    acc,
    scales_ptr,
    tok,
    head,
    row_ok,
    stride_t,
    stride_g,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
):
    # Per-token-group FP8 (FP8PerTokenGroup, groups within a head): per group of GROUP
    # columns, s = max(amax, eps) / 448 (IEEE division), with UE8M0 rounded up to a power
    # of two; q = x * (1 / s). A NaN makes its group's amax and scale NaN.
    ROWS: tl.constexpr = acc.shape[0]
    NUM_GROUPS: tl.constexpr = BLOCK_D // GROUP
    x = tl.reshape(acc, (ROWS, NUM_GROUPS, GROUP))
    amax = tl.max(tl.abs(x), axis=2)
    has_nan = tl.max((x != x).to(tl.int32), axis=2) > 0
    amax = tl.where(has_nan, float("nan"), tl.maximum(amax, _GROUP_EPS))
    scale = tl.math.div_rn(amax, tl.full([], _FP8_MAX, tl.float32))
    if UE8M0:
        # 2^ceil(log2(max(s, eps))), exactly: the exponent up by one where the mantissa is
        # not 0 (+inf keeps its bits; NaN stays NaN).
        bits = tl.maximum(scale, _GROUP_EPS).to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        rounded = (tl.minimum(exponent, 255) << 23).to(tl.float32, bitcast=True)
        scale = tl.where(scale != scale, scale, rounded)
    inv_scale = tl.math.div_rn(tl.full([], 1.0, tl.float32), scale)
    col_group = tl.arange(0, NUM_GROUPS)
    first_group = head * (HEAD_SIZE // GROUP) + tl.zeros_like(tok)  # head: a row's or all's
    group = first_group[:, None] + col_group[None, :]
    where = scales_ptr + tok[:, None] * stride_t + group * stride_g
    tl.store(where, scale, mask=row_ok[:, None] & (col_group[None, :] * GROUP < HEAD_SIZE))
    return tl.reshape(x * inv_scale[:, :, None], (ROWS, BLOCK_D))
