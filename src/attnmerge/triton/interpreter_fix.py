"""Correct float conversions for Triton's CPU interpreter (``TRITON_INTERPRET=1``).

Triton's interpreter (3.5 to 3.9 at least) converts floats with its own bit
manipulation, which rounds float32 -> float8 ties away from zero, drops the mantissa
carry (1.996 -> 1.0), garbles special values and truncates float32 -> bfloat16
instead of rounding (triton-lang/triton issue #8322). A GPU rounds to nearest-even
with saturation. Under the interpreter, attnmerge's kernels would therefore store
different bits than on a GPU, and no test of FP8 or bf16 output could pass on a CPU.

:func:`install` reroutes the interpreter's conversion function through torch's own
casts, which round to nearest-even as the GPU's ``cvt`` does. Float8 e4m3 values are
clamped to +-448 first (NaN stays NaN), so that they saturate like ``cvt.rn.satfinite``
whatever the torch release (torch 2.13 saturates on its own; torch 2.6 casts a value
beyond 464 to NaN). It touches nothing but the interpreter, and only the float formats
torch knows; anything else still goes to Triton's own code.

Two gaps of older interpreters are filled as later releases fill them. Up to Triton 3.4
at least, a scalar used as a Python integer (a loop bound) goes through ``int()`` of a
one-element array, which NumPy 2.4 refuses: the array is squeezed first. Triton 3.2's
builder has no ``get_int1_ty``, which a Python bool combined with a boolean block needs.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

# The largest finite float8 e4m3fn value.
_E4M3_MAX = 448.0

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
        if dst == torch.float8_e4m3fn:
            values = values.clamp(-_E4M3_MAX, _E4M3_MAX)  # NaN stays NaN
        out = values.to(dst).view(dst_int).numpy()
        # The caller views the result with the output's unsigned storage type.
        return out.view(getattr(np, f"uint{output_dtype.primitive_bitwidth}")).reshape(input.shape)

    convert_float._attnmerge_fixed = True
    interpreter._convert_float = convert_float
    _fix_scalar_index(interpreter)
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is not None and not hasattr(builder, "get_int1_ty"):
        import triton.language as tl

        builder.get_int1_ty = lambda self: tl.int1
    return True


def _fix_scalar_index(interpreter) -> None:
    """Where the interpreter sets ``tensor.__index__`` to ``int(data)`` (Triton releases
    whose ``_patch_lang_tensor`` takes the tensor class alone), squeeze ``data`` first."""
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_attnmerge_fixed", False):
        return
    if len(inspect.signature(patch).parameters) != 1:
        return  # later releases squeeze already (and restore what they patch)

    def patch_lang_tensor(tensor):
        patch(tensor)
        tensor.__index__ = lambda self: int(np.asarray(self.handle.data).squeeze())

    patch_lang_tensor._attnmerge_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
