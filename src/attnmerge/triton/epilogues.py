"""The Triton store of each output format (named by ``OutputFormat.triton_epilogue``).

An epilogue stores a tile of merged float32 values: ``store(ptrs, acc, mask, operand_ptr)``
with ``ptrs`` the output addresses of the tile and ``operand_ptr`` the format's device
operand (:meth:`attnmerge.formats.OutputFormat.kernel_operand`; unused without one). The
merge kernel receives the function as a compile-time argument and inlines it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_plain(ptrs, acc, mask, operand_ptr):
    tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def store_fp8_static(ptrs, acc, mask, scale_ptr):
    # The reciprocal is an IEEE division, as in vLLM's static quantisation. The conversion
    # saturates to +-448 and keeps NaN (cvt.rn.satfinite on sm_89+; torch's cast under the
    # interpreter), so no clamp is needed.
    inv_scale = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.load(scale_ptr).to(tl.float32))
    tl.store(ptrs, (acc * inv_scale).to(ptrs.dtype.element_ty), mask=mask)
