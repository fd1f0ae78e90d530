"""Output quantisation specs: the small, closed set of formats a merge can store.

A merge either writes a plain floating-point output (``quant=None``) or quantises the
output in the store, in exactly one of the formats below. Each format is one frozen
class; a merge function accepts any of them through its ``quant=`` argument, so new
formats (dynamic per-token FP8, per-token-group FP8 with UE8M0 scales, MXFP8, NVFP4)
are added as new classes without changing any existing signature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FP8_E4M3_MAX", "FP8Static", "QuantSpec"]

#: Largest finite value of ``torch.float8_e4m3fn``; stores saturate to +-this.
FP8_E4M3_MAX = 448.0


class QuantSpec:
    """Base class of the output quantisation specs. Not instantiated directly."""

    __slots__ = ()

    #: dtype of the quantised output tensor.
    dtype: torch.dtype


@dataclass(frozen=True, eq=False)
class FP8Static(QuantSpec):
    """Static per-tensor FP8 (E4M3FN) output.

    Each output element is stored as
    ``e4m3fn(saturate(O * (1 / scale)))``: the reciprocal is taken once in float32,
    the product is rounded to nearest-even and saturated to +-448 (NaN stays NaN).
    This is bit-identical to
    ``(O_fp32 * scale.reciprocal()).clamp(-448, 448).to(torch.float8_e4m3fn)``.

    Args:
        scale: 1-element float32 tensor on the output's device (the dequantisation
            scale, as vLLM's static FP8 quantisation takes it). It is read on the device
            only; the host never synchronises on it.
    """

    scale: torch.Tensor
    dtype: torch.dtype = torch.float8_e4m3fn

    def __post_init__(self) -> None:
        if not isinstance(self.scale, torch.Tensor):
            raise TypeError(
                f"FP8Static: scale must be a torch.Tensor, got {type(self.scale).__name__}"
            )
        if self.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8Static: dtype must be torch.float8_e4m3fn, got {self.dtype}")
