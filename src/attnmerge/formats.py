"""Output formats: how a merge stores its result.

A merge writes its float32 result in exactly one output format. Each format is one
class that owns everything about itself:

* ``key``: the format without its tensors (:class:`FormatKey`), which dispatch and the
  kernel caches key on;
* ``check``: validation of the output tensor and the format's own operands;
* ``quantize_reference``: the torch reference quantiser (what the torch backend stores and
  what the kernels are tested against, bit for bit);
* ``triton_epilogue`` / ``cuda_epilogue``: the name of its epilogue in each kernel language
  (a ``@triton.jit`` function in :mod:`attnmerge.triton.epilogues`, a store functor in
  ``cuda/csrc/epilogues.cuh``) and ``kernel_operand``, the device tensor it reads;
* ``whole_token_tiles``: whether its store needs all heads of a token in one program (a
  per-token scale does); backends that tile by rows refuse such formats with a reason.

:class:`Plain` and :class:`FP8Static` are the formats today; adding one is a new class
here, one epilogue per kernel language and its tests (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "FLOAT_DTYPES",
    "FP8_E4M3_MAX",
    "FP8Static",
    "FormatKey",
    "OutputFormat",
    "Plain",
    "QuantSpec",
]

#: Largest finite value of ``torch.float8_e4m3fn``; stores saturate to +-this.
FP8_E4M3_MAX = 448.0
#: dtypes of partial outputs, and of plain (unquantised) outputs.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_device_scalar(name: str, t: object, device: torch.device) -> None:
    """A 1-element float32 tensor on ``device`` (a scale read on the device only)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a 1-element float32 tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be a 1-element float32 tensor, got {t.dtype}")
    if t.numel() != 1:
        raise ValueError(f"{name} must be a 1-element float32 tensor, got {t.numel()} elements")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of output)")


class FormatKey(NamedTuple):
    """An output format without its tensors: what selects kernels."""

    kind: type[OutputFormat]
    dtype: torch.dtype
    #: the format's further configuration (group size, scale layout...), hashable
    options: tuple[Hashable, ...] = ()


class OutputFormat:
    """Base class of the output formats. Not instantiated directly."""

    __slots__ = ()

    #: dtype of the output tensor.
    dtype: torch.dtype
    #: name of the epilogue in attnmerge.triton.epilogues and in cuda/csrc/epilogues.cuh
    triton_epilogue: str
    cuda_epilogue: str
    #: the store needs every head of a token in one program (per-token scales)
    whole_token_tiles: bool = False

    @property
    def key(self) -> FormatKey:
        """Equal keys mean the same kernels serve both formats."""
        return FormatKey(type(self), self.dtype)

    def check(self, output: torch.Tensor, output_name: str = "output") -> None:
        """Raise TypeError/ValueError unless ``output`` and the format's operands fit."""
        raise NotImplementedError

    def quantize_reference(self, merged: torch.Tensor) -> torch.Tensor:
        """What the torch backend copies into the output for the float32 ``merged`` result
        (``output.copy_`` of it gives the stored bits)."""
        raise NotImplementedError

    def kernel_operand(self) -> torch.Tensor | None:
        """The one device tensor the kernel's store reads (None: none)."""
        return None


#: Formats that quantise (the ``quant=`` argument of :func:`attnmerge.merge`).
QuantSpec = OutputFormat


@dataclass(frozen=True, eq=False)
class Plain(OutputFormat):
    """Unquantised output in float32, float16 or bfloat16, rounded to nearest even."""

    dtype: torch.dtype
    triton_epilogue = "plain"
    cuda_epilogue = "PlainStore"

    def check(self, output: torch.Tensor, output_name: str = "output") -> None:
        if output.dtype != self.dtype:
            raise TypeError(f"{output_name} must be {self.dtype}, got {output.dtype}")

    def quantize_reference(self, merged: torch.Tensor) -> torch.Tensor:
        # The copy into the output rounds to nearest even; converting here first would store
        # NaNs with another bit pattern (torch's vectorised bf16 cast).
        return merged


@dataclass(frozen=True, eq=False)
class FP8Static(OutputFormat):
    """Static per-tensor FP8 (E4M3FN) output.

    Each output element is stored as ``e4m3fn(saturate(O * (1 / scale)))``: the reciprocal
    is taken once in float32, the product is rounded to nearest even and saturated to
    +-448 (NaN stays NaN), as vLLM's static FP8 quantisation does. This is bit-identical to
    ``(O_fp32 * scale.reciprocal()).clamp(-448, 448).to(torch.float8_e4m3fn)``
    (docs/contract.md).

    Args:
        scale: 1-element float32 tensor on the output's device (the dequantisation
            scale). It is read on the device only; the host never synchronises on it.
    """

    scale: torch.Tensor
    dtype: torch.dtype = torch.float8_e4m3fn
    triton_epilogue = "fp8_static"
    cuda_epilogue = "FP8StaticStore"

    def __post_init__(self) -> None:
        if not isinstance(self.scale, torch.Tensor):
            raise TypeError(
                f"FP8Static: scale must be a torch.Tensor, got {type(self.scale).__name__}"
            )
        if self.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8Static: dtype must be torch.float8_e4m3fn, got {self.dtype}")

    def check(self, output: torch.Tensor, output_name: str = "output") -> None:
        if output.dtype != self.dtype:
            raise TypeError(f"{output_name} must be {self.dtype} for FP8Static, got {output.dtype}")
        check_device_scalar("output_scale", self.scale, output.device)

    def quantize_reference(self, merged: torch.Tensor) -> torch.Tensor:
        # The clamp makes the result independent of how a torch build casts out-of-range
        # values (some saturate, older CUDA builds give NaN).
        y = merged.float() * self.scale.float().reciprocal()
        return y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)

    def kernel_operand(self) -> torch.Tensor | None:
        return self.scale
