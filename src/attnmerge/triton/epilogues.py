"""The Triton epilogue of each output format (named by ``OutputFormat.triton_epilogue``).

An epilogue turns a tile of merged float32 values into the values the kernel stores:
``values = epilogue(acc, operand_ptr)``, with ``operand_ptr`` the format's device operand
(:meth:`attnmerge.formats.OutputFormat.kernel_operand`; unused without one). The kernel
converts them to the output's element type (round to nearest even; FP8 saturating, NaN
kept) and stores them. It receives the function as a compile-time argument and inlines it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def plain(acc, operand_ptr):
    return acc


@triton.jit
def fp8_static(acc, scale_ptr):
    # The reciprocal is an IEEE division, as in vLLM's static quantisation. The conversion
    # that follows saturates to +-448 and keeps NaN (cvt.rn.satfinite on sm_89+; torch's
    # cast under the interpreter), so no clamp is needed.
    inv_scale = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.load(scale_ptr).to(tl.float32))
    return acc * inv_scale
