"""Correct float conversions for Triton's CPU interpreter (``TRITON_INTERPRET=1``).

Triton's interpreter (3.5 to 3.9 at least) converts floats with its own bit
manipulation, which rounds float32 -> float8 ties away from zero, drops the mantissa
carry (1.996 -> 1.0), garbles special values and truncates float32 -> bfloat16
instead of rounding (triton-lang/triton issue #8322). A GPU rounds to nearest-even
with saturation. Under the interpreter, attnmerge's kernels would therefore store
different bits than on a GPU, and no test of FP8 or bf16 output could pass on a CPU.

:func:`install` reroutes the interpreter's conversion function through torch's own
casts, which round to nearest-even and saturate exactly as the GPU's ``cvt`` does.
It touches nothing but the interpreter, and only the float formats torch knows;
anything else still goes to Triton's own code.
"""

from __future__ import annotations

import numpy as np
import torch

# Same-width integer views used to move raw bits between numpy and torch.
_INT_VIEW = {8: (np.uint8, torch.uint8), 16: (np.int16, torch.int16), 32: (np.int32, torch.int32)}


def _torch_float_dtypes() -> dict[str, torch.dtype]:
    return {
        "fp32": torch.float32,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
        "fp8e4nv": torch.float8_e4m3fn,
        "fp8e5": torch.float8_e5m2,
    }


def install() -> bool:
    """Patch the interpreter once; returns True if the patch is (now) in place."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_convert_float", None)
    if original is None:
        return False
    if getattr(original, "_attnmerge_fixed", False):
        return True
    rtne = interpreter._ir.ROUNDING_MODE.RTNE
    dtypes = _torch_float_dtypes()

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        src = dtypes.get(input_dtype.name)
        dst = dtypes.get(output_dtype.name)
        if src is None or dst is None or rounding_mode not in (None, rtne):
            return original(input, input_dtype, output_dtype, rounding_mode)
        src_np, src_int = _INT_VIEW[input_dtype.primitive_bitwidth]
        dst_int = _INT_VIEW[output_dtype.primitive_bitwidth][1]
        bits = np.ascontiguousarray(input).view(src_np)
        values = torch.from_numpy(bits).view(src_int).view(src)
        out = values.to(dst).view(dst_int).numpy()
        # The caller views the result with the output's unsigned storage type.
        return out.view(getattr(np, f"uint{output_dtype.primitive_bitwidth}")).reshape(input.shape)

    convert_float._attnmerge_fixed = True
    interpreter._convert_float = convert_float
    return True
