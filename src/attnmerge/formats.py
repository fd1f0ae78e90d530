"""Output formats: how a merge stores its result.

A merge writes its float32 result in exactly one output format. Each format is one
class that owns everything about itself:

* ``key``: the format without its tensors (:class:`FormatKey`), which dispatch and the
  kernel caches key on;
* ``check``: validation of the output tensor and the format's own operands and outputs;
* ``quantize_reference`` / ``store_reference``: the torch reference quantiser (what the
  torch backend stores, scales and amax included, and what the kernels are tested
  against, bit for bit); ``with_scales``: the format with its scales allocated;
* ``triton_epilogue`` / ``cuda_epilogue``: the name of its epilogue in each kernel language
  (a ``@triton.jit`` function in :mod:`attnmerge.triton.epilogues`, a store functor in
  ``cuda/csrc/epilogues.cuh``) and ``kernel_operand``, the device tensor it reads;
  ``kernel_gap``: why no kernel stores it yet (dispatch then serves it with torch);
* ``whole_token_tiles``: whether its store needs all heads of a token in one program (a
  per-token scale does); backends that tile by rows refuse such formats with a reason.

:class:`Plain`, :class:`FP8Static` (both in every backend), :class:`FP8PerToken` and
:class:`FP8PerTokenGroup` are the formats today; adding one is a new class here, one
epilogue per kernel language and its tests (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "FLOAT_DTYPES",
    "FP8_E4M3_MAX",
    "FP8PerToken",
    "FP8PerTokenGroup",
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
#: The smallest per-token scale, ``1 / (448 * 512)`` rounded to float32 (vLLM 0.34.0,
#: ``min_scaling_factor<Float8_e4m3fn>`` in csrc/quantization/utils.cuh).
FP8_MIN_TOKEN_SCALE = float(torch.tensor(1.0 / (448.0 * 512.0), dtype=torch.float32))
#: The per-token-group absmax floor, ``eps = 1e-10`` in float32 (vLLM's default ``eps`` of
#: ``per_token_group_quant_fp8``), also the floor of a UE8M0 scale before rounding up.
FP8_GROUP_EPS = float(torch.tensor(1e-10, dtype=torch.float32))


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


def strides_fit(t: torch.Tensor, strides: tuple[int, ...]) -> bool:
    """``t`` has ``strides`` in every dimension of more than one element."""
    return all(n <= 1 or s == e for n, s, e in zip(t.shape, t.stride(), strides, strict=False))


def check_scales(name: str, t: object, shapes, dtype, device, strides=None) -> None:
    """A scales tensor of one of ``shapes``, ``dtype``, on ``device``, with ``strides``
    (compared on dimensions of more than one element), without overlapping elements."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) not in shapes:
        want = " or ".join(str(s) for s in shapes)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of output)")
    if t.numel() == 0:
        return
    if strides is not None and not strides_fit(t, strides):
        raise ValueError(f"{name} must have strides {strides}, got {tuple(t.stride())}")
    if torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(f"{name} has overlapping elements (e.g. an expanded view)")


def amax_reference(merged: torch.Tensor) -> torch.Tensor:
    """The ``amax`` output of every format (docs/contract.md C39): ``max |O|`` over every
    element of the float32 merge result before it is rounded or quantised, 0-dim; 0 for
    ``T = 0``; NaN (0x7FC00000) where any element is NaN. It is a field of the format
    (``Plain(dtype, amax=t)``, ``FP8Static(scale, amax=t)``, ...), not an argument of each
    entry point: like scales, it is an extra output of the store, computed from the
    values the store sees, and it changes the kernel (it is part of ``key``)."""
    if merged.numel() == 0:
        return merged.new_zeros((), dtype=torch.float32)
    a = merged.float().abs().amax()
    return torch.where(a.isnan(), float("nan"), a)


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturate to +-448 and round to e4m3fn to nearest even; NaN stays NaN."""
    return x.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    # A 0-dim tensor on the device, not a Python scalar: CUDA divides by a host scalar
    # through its reciprocal, which is not IEEE division.
    return torch.full((), value, dtype=torch.float32, device=like.device)


class FormatKey(NamedTuple):
    """An output format without its tensors: what selects kernels."""

    kind: type[OutputFormat]
    dtype: torch.dtype
    #: the format's further configuration (group size, scale layout, "amax"...), hashable
    options: tuple[Hashable, ...] = ()


class OutputFormat:
    """Base class of the output formats. Not instantiated directly."""

    __slots__ = ()

    #: dtype of the output tensor.
    dtype: torch.dtype
    #: name of the epilogue in attnmerge.triton.epilogues and in cuda/csrc/epilogues.cuh
    #: (None: the kernels do not store this format yet, see kernel_gap)
    triton_epilogue: str | None
    cuda_epilogue: str | None
    #: the store needs every head of a token in one program (per-token scales)
    whole_token_tiles: bool = False

    @property
    def key(self) -> FormatKey:
        """Equal keys mean the same kernels serve both formats."""
        return self._key

    def __post_init__(self) -> None:
        # The key, computed once (formats are immutable; the eager path is host-bound).
        amax = ("amax",) if getattr(self, "amax", None) is not None else ()
        object.__setattr__(
            self, "_key", FormatKey(type(self), self.dtype, (*self._options(), *amax))
        )

    def _options(self) -> tuple[Hashable, ...]:
        return ()

    @classmethod
    def kernel_gap(cls, key: FormatKey, head_size: int, backend: str) -> str | None:
        """Why the kernels of ``backend`` ("cuda" or "triton") cannot store formats of
        ``key`` at ``head_size`` yet (None: they can). Dispatch asks it for every backend
        but the torch reference, which stores all, and then whether the backend has the
        format's epilogue."""
        return None

    def token_tiles(self, head_size: int) -> bool:
        """Whether a Triton program of this format's store holds whole tokens at
        ``head_size`` (``whole_token_tiles``, or groups of whole heads)."""
        return self.whole_token_tiles

    def segment_size(self, head_size: int) -> int:
        """Values of one head per row of a Triton tile where the store's groups span heads
        of ``head_size`` unevenly (a group is then whole rows); 0 where rows are heads."""
        return 0

    def epilogue_strides(self) -> tuple[int, int]:
        """Run-time arguments of the epilogue besides ``kernel_operand``: the element
        strides (per token, per group) of the scales a format writes, (0, 0) without."""
        return (0, 0)

    def epilogue_constants(self) -> tuple[int, bool]:
        """Compile-time options of the epilogue: (group size, UE8M0 scales), (0, False)
        for formats without groups."""
        return (0, False)

    def check(self, output: torch.Tensor, output_name: str = "output") -> None:
        """Raise TypeError/ValueError unless ``output`` and the format's operands fit."""
        raise NotImplementedError

    def quantize_reference(self, merged: torch.Tensor) -> torch.Tensor:
        """What the torch backend copies into the output for the float32 ``merged`` result
        (``output.copy_`` of it gives the stored bits)."""
        raise NotImplementedError

    def quantize_with_scales(self, merged: torch.Tensor):
        """``(q, scales)``: ``quantize_reference``'s result and the scales as the format
        stores them (None: it has none)."""
        return self.quantize_reference(merged), None

    def store_reference(self, merged: torch.Tensor, output: torch.Tensor) -> None:
        """Store the float32 ``merged`` result ``[T, H, D]``: the output and the format's
        extra outputs (scales, amax), all computed before anything is written."""
        q, scales = self.quantize_with_scales(merged)
        amax = getattr(self, "amax", None)
        a = None if amax is None else amax_reference(merged)
        output.copy_(q)
        if scales is not None:
            self._store_scales(scales)
        if amax is not None:
            amax.copy_(a)

    def _store_scales(self, scales: torch.Tensor) -> None:
        self.scales.copy_(scales.reshape(self.scales.shape))

    def with_scales(self, tokens: int, heads: int, head_size: int, device) -> OutputFormat:
        """This format with newly allocated scales where it stores some and was given
        none (what :func:`attnmerge.merge` stores into); else itself."""
        return self

    def kernel_operand(self) -> torch.Tensor | None:
        """The one device tensor the kernel's store reads (None: none)."""
        return None


#: Formats that quantise (the ``quant=`` argument of :func:`attnmerge.merge`).
QuantSpec = OutputFormat


@dataclass(frozen=True, eq=False)
class Plain(OutputFormat):
    """Unquantised output in float32, float16 or bfloat16, rounded to nearest even.

    Args:
        dtype: the output dtype.
        amax: optional 1-element float32 tensor on the output's device that receives
            ``max |O|`` of the float32 result (:func:`amax_reference`).
    """

    dtype: torch.dtype
    amax: torch.Tensor | None = None
    triton_epilogue = "plain"
    cuda_epilogue = "PlainStore"

    def __post_init__(self) -> None:
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"Plain: dtype must be one of {dtype_names(FLOAT_DTYPES)}")
        super().__post_init__()

    def check(self, output: torch.Tensor, output_name: str = "output") -> None:
        if output.dtype != self.dtype:
            raise TypeError(f"{output_name} must be {self.dtype}, got {output.dtype}")
        if self.amax is not None:
            check_device_scalar("amax", self.amax, output.device)

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
        amax: optional 1-element float32 tensor on the output's device that receives
            ``max |O|`` of the float32 result (:func:`amax_reference`).
    """

    scale: torch.Tensor
    dtype: torch.dtype = torch.float8_e4m3fn
    amax: torch.Tensor | None = None
    triton_epilogue = "fp8_static"
    cuda_epilogue = "FP8StaticStore"

    def __post_init__(self) -> None:
        if not isinstance(self.scale, torch.Tensor):
            raise TypeError(
                f"FP8Static: scale must be a torch.Tensor, got {type(self.scale).__name__}"
            )
        if self.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8Static: dtype must be torch.float8_e4m3fn, got {self.dtype}")
        super().__post_init__()

    def check(self, output: torch.Tensor, output_name: str = "output") -> None:
        if output.dtype != self.dtype:
            raise TypeError(f"{output_name} must be {self.dtype} for FP8Static, got {output.dtype}")
        check_device_scalar("output_scale", self.scale, output.device)
        if self.amax is not None:
            check_device_scalar("amax", self.amax, output.device)

    def quantize_reference(self, merged: torch.Tensor) -> torch.Tensor:
        # The clamp makes the result independent of how a torch build casts out-of-range
        # values (some saturate, older CUDA builds give NaN).
        return _e4m3(merged.float() * self.scale.float().reciprocal())

    def kernel_operand(self) -> torch.Tensor | None:
        return self.scale


def spans_whole_heads(head_size: int, group_size: int) -> bool:
    """Whether each group of ``group_size`` is whole heads of ``head_size``, a power of
    two: the kernels' stores then find a group's heads in consecutive rows or tile rows."""
    return head_size & (head_size - 1) == 0 and group_size % head_size == 0


class _DynamicFP8(OutputFormat):
    """What the dynamic FP8 formats share: an FP8 output, scales computed by the store
    (``scales``, allocated by ``with_scales`` where None), a store that needs whole
    tokens unless a subclass says otherwise."""

    __slots__ = ()
    dtype = torch.float8_e4m3fn
    triton_epilogue = cuda_epilogue = None
    whole_token_tiles = True
    scales: torch.Tensor | None
    amax: torch.Tensor | None

    @classmethod
    def kernel_gap(cls, key: FormatKey, head_size: int, backend: str) -> str | None:
        if cls.triton_epilogue is None and cls.cuda_epilogue is None:
            return f"its kernels have no {cls.__name__} epilogue yet; the torch backend stores it"
        return super().kernel_gap(key, head_size, backend)

    def check(self, output: torch.Tensor, output_name: str = "output") -> None:
        if output.dtype != self.dtype:
            name = type(self).__name__
            raise TypeError(f"{output_name} must be {self.dtype} for {name}, got {output.dtype}")
        if self.amax is not None:
            check_device_scalar("amax", self.amax, output.device)
        if self.scales is not None:
            self.check_scales(self.scales, output, "scales")

    def check_scales(self, scales: object, output: torch.Tensor, name: str) -> None:
        """Raise TypeError/ValueError naming ``name`` unless ``scales`` fits ``output``."""
        raise NotImplementedError

    def quantize_reference(self, merged: torch.Tensor) -> torch.Tensor:
        return self.quantize_with_scales(merged)[0]


@dataclass(frozen=True, eq=False)
class FP8PerToken(_DynamicFP8):
    """Dynamic per-token FP8 (E4M3FN) output: one float32 scale per token over its
    ``H * D`` values, as vLLM 0.34.0's ``scaled_fp8_quant(use_per_token_if_dynamic=True)``
    computes it (``dynamic_per_token_scaled_fp8_quant_kernel_strided``,
    csrc/quantization/w8a8/fp8/common.cu; ``min_scaling_factor``,
    csrc/quantization/utils.cuh; ``ref_dynamic_per_token_quant``,
    tests/kernels/quant_utils.py). Per token, on the float32 merge result ``O[t]``::

        scale = max(min(max |O[t]|, scale_ub) / 448, 1 / (448 * 512))
        q     = e4m3fn(saturate(O[t] / scale))

    ``scale_ub`` bounds the absmax, not the scale; ``/ 448`` and ``O[t] / scale`` are IEEE
    float32 divisions (vLLM's kernel divides, it takes no reciprocal); the constant is
    rounded to float32 (``FP8_MIN_TOKEN_SCALE``). A NaN, which vLLM's ``fmaxf`` drops,
    gives the token scale NaN and NaN codes in its row (docs/contract.md C36, C38).

    Args:
        scale_ub: optional 1-element float32 tensor on the output's device.
        scales: optional float32 ``[T]`` or ``[T, 1]`` (any stride) to write the scales
            into (CUDA-graph capture); None: :func:`attnmerge.merge` allocates ``[T, 1]``,
            vLLM's shape, and returns it as ``MergeResult.scales``.
        amax: optional 1-element float32 tensor on the output's device that receives
            ``max |O|`` of the float32 result (:func:`amax_reference`).
    """

    scale_ub: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    amax: torch.Tensor | None = None
    # One program holds a token's H heads (whole_token_tiles); scale_ub is read through
    # the format's field, as amax is.
    triton_epilogue = "fp8_token"
    # The cuda backend's token-tile kernel: a block holds a token (any H * D).
    cuda_epilogue = "FP8TokenStore"

    def _options(self) -> tuple[Hashable, ...]:
        return ("scale_ub",) if self.scale_ub is not None else ()

    def kernel_operand(self) -> torch.Tensor | None:
        return self.scales  # written by the store, one float32 per token

    def epilogue_strides(self) -> tuple[int, int]:
        return (self.scales.stride(0), 0)

    def check(self, output: torch.Tensor, output_name: str = "output") -> None:
        super().check(output, output_name)
        if self.scale_ub is not None:
            check_device_scalar("scale_ub", self.scale_ub, output.device)

    def check_scales(self, scales: object, output: torch.Tensor, name: str) -> None:
        tokens = output.shape[0]
        check_scales(name, scales, ((tokens,), (tokens, 1)), torch.float32, output.device)

    def with_scales(self, tokens: int, heads: int, head_size: int, device) -> OutputFormat:
        if self.scales is not None:
            return self
        return dataclasses.replace(self, scales=torch.empty(tokens, 1, device=device))

    def quantize_with_scales(self, merged: torch.Tensor):
        x = merged.float().flatten(1)  # [T, H * D]
        a = x.abs().amax(dim=1) if x.shape[1] else x.new_zeros(len(x))  # NaN propagates
        if self.scale_ub is not None:
            a = torch.minimum(a, self.scale_ub.float().reshape(()))
        scale = torch.clamp(a / _f32(FP8_E4M3_MAX, x), min=FP8_MIN_TOKEN_SCALE)
        return _e4m3(x / scale[:, None]).reshape(merged.shape), scale


_GROUP_LAYOUTS = ("row_major", "col_major", "col_major_tma", "ue8m0_packed")
# Where groups span heads unevenly, a Triton program takes whole units of lcm(head size,
# group size) values (merge_kernel.segment_tiles): at most this many, 32 a thread at 16 warps.
_TRITON_MAX_UNIT = 16384


@dataclass(frozen=True, eq=False)
class FP8PerTokenGroup(_DynamicFP8):
    """Dynamic per-token-group FP8 (E4M3FN) output, bit-identical to what vLLM 0.34.0's
    ``per_token_group_quant_fp8`` (vllm/model_executor/layers/quantization/utils/
    fp8_utils.py; ``..._packed_for_deepgemm`` for ``"ue8m0_packed"``) writes through its
    CUDA kernels (csrc/quantization/w8a8/fp8/per_token_group_quant.cu) for the float32
    merge result viewed ``[T, H * D]``. A group is ``group_size`` consecutive values of
    one token's ``H * D`` (it may span heads, never tokens). Per group ``x``::

        s = max(max |x|, 1e-10) / 448          IEEE division; eps = 1e-10 in float32
        s = 2 ** ceil(log2(max(s, 1e-10)))     with ue8m0, exactly (exponent + 1 where
                                               the mantissa is not 0)
        q = e4m3fn(saturate(x * (1 / s)))      one IEEE reciprocal per group

    A NaN, which vLLM's ``fmaxf`` drops, gives the group scale NaN (packed: 0xFF) and NaN
    codes (docs/contract.md C37, C38). Scale layouts, ``G = H * D / group_size``:
    ``"row_major"`` float32 ``[T, G]``; ``"col_major"`` the ``[T, G]`` view of a float32
    ``[G, T]`` tensor (``column_major_scales=True``); ``"col_major_tma"`` strides
    ``(1, round_up(T, 4))`` (``tma_aligned_scales=True``, padding not written);
    ``"ue8m0_packed"`` int32 ``[T, ceil(G / 4)]``, strides ``(1, round_up(T, 4))``, byte
    ``j`` of ``[t, c]`` the biased exponent of group ``4c + j`` (DeepGEMM's Blackwell
    layout; 0 past ``G`` and in the padding rows of all columns but the last).

    Args:
        group_size: 64 or 128; ``H * D`` must be a multiple of it.
        ue8m0: round each scale up to a power of two (needed by ``"ue8m0_packed"``).
        layout: one of the layouts above.
        scales: optional tensor in ``layout`` (a dimension of one element may have any
            stride) to write the scales into (CUDA-graph capture); None:
            :func:`attnmerge.merge` allocates it and returns it as ``MergeResult.scales``.
        amax: optional 1-element float32 tensor on the output's device that receives
            ``max |O|`` of the float32 result (:func:`amax_reference`).
    """

    group_size: int = 128
    ue8m0: bool = False
    layout: str = "row_major"
    scales: torch.Tensor | None = None
    amax: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.group_size, bool) or self.group_size not in (64, 128):
            raise ValueError(
                f"FP8PerTokenGroup: group_size must be 64 or 128, got {self.group_size}"
            )
        if not isinstance(self.ue8m0, bool):
            raise TypeError(f"FP8PerTokenGroup: ue8m0 must be a bool, got {self.ue8m0!r}")
        if self.layout not in _GROUP_LAYOUTS or (self.layout == "ue8m0_packed") > self.ue8m0:
            raise ValueError(
                f"FP8PerTokenGroup: layout must be one of {', '.join(_GROUP_LAYOUTS)} (the last "
                f"with ue8m0=True), got {self.layout!r}"
            )
        super().__post_init__()

    # Groups within one head: each row's store computes its own groups' scales; groups of
    # whole heads: consecutive rows (cuda) or token tiles (Triton, token_tiles); groups
    # that span heads unevenly: token tiles (cuda) or rows of part of a head (Triton,
    # segment_size).
    triton_epilogue = "fp8_group"
    cuda_epilogue = "FP8GroupStore"
    whole_token_tiles = False

    def _options(self) -> tuple[Hashable, ...]:
        return (self.group_size, self.ue8m0, self.layout)

    @classmethod
    def kernel_gap(cls, key: FormatKey, head_size: int, backend: str) -> str | None:
        group_size = key.options[0]
        unit = math.lcm(head_size, group_size)
        if backend == "triton" and unit > _TRITON_MAX_UNIT:
            return (
                f"groups of {group_size} span heads of {head_size}: its triton kernels take "
                f"whole heads and groups, lcm({head_size}, {group_size}) = {unit} values, "
                f"and at most {_TRITON_MAX_UNIT} a program; the cuda and torch "
                f"backends store them"
            )
        return super().kernel_gap(key, head_size, backend)

    def spans_heads(self, head_size: int) -> bool:
        """Whether a group holds values of several heads of ``head_size``: the kernels
        then keep a group's heads together."""
        return head_size % self.group_size != 0

    def token_tiles(self, head_size: int) -> bool:
        # Groups of whole heads: a Triton program holds the token's heads.
        return self.spans_heads(head_size) and spans_whole_heads(head_size, self.group_size)

    def segment_size(self, head_size: int) -> int:
        # Groups that span heads unevenly: rows of gcd(head size, group size) values.
        if not self.spans_heads(head_size) or spans_whole_heads(head_size, self.group_size):
            return 0
        return math.gcd(head_size, self.group_size)

    def kernel_operand(self) -> torch.Tensor | None:
        return self.scales  # written by the store

    def epilogue_strides(self) -> tuple[int, int]:
        return tuple(self.scales.stride())

    def epilogue_constants(self) -> tuple[int, bool]:
        return (self.group_size, self.ue8m0)

    def groups(self, heads: int, head_size: int) -> int:
        """``G``; ValueError unless ``H * D`` is a multiple of ``group_size``."""
        if (heads * head_size) % self.group_size:
            raise ValueError(
                f"FP8PerTokenGroup: heads * head_size = {heads} * {head_size} must be a "
                f"multiple of group_size = {self.group_size}"
            )
        return heads * head_size // self.group_size

    def scales_layout(self, tokens: int, groups: int):
        """``(shape, strides, dtype)`` of the scales of ``tokens`` tokens in ``layout``."""
        padded = -(-tokens // 4) * 4
        return {
            "row_major": ((tokens, groups), (groups, 1), torch.float32),
            "col_major": ((tokens, groups), (1, tokens), torch.float32),
            "col_major_tma": ((tokens, groups), (1, padded), torch.float32),
            "ue8m0_packed": ((tokens, -(-groups // 4)), (1, padded), torch.int32),
        }[self.layout]

    def check(self, output: torch.Tensor, output_name: str = "output") -> None:
        self.groups(output.shape[1], output.shape[2])
        super().check(output, output_name)

    def check_scales(self, scales: object, output: torch.Tensor, name: str) -> None:
        groups = self.groups(output.shape[1], output.shape[2])
        shape, strides, dtype = self.scales_layout(output.shape[0], groups)
        check_scales(name, scales, (shape,), dtype, output.device, strides)

    def with_scales(self, tokens: int, heads: int, head_size: int, device) -> OutputFormat:
        groups = self.groups(heads, head_size)
        if self.scales is not None:
            return self
        shape, strides, dtype = self.scales_layout(tokens, groups)
        scales = torch.empty_strided(shape, strides, dtype=dtype, device=device)
        return dataclasses.replace(self, scales=scales)

    def quantize_with_scales(self, merged: torch.Tensor):
        tokens = merged.shape[0]
        groups = self.groups(merged.shape[1], merged.shape[2])
        x = merged.float().reshape(tokens, groups, self.group_size)
        a = torch.clamp(x.abs().amax(dim=2), min=FP8_GROUP_EPS)  # NaN propagates
        s = a / _f32(FP8_E4M3_MAX, x)
        if self.ue8m0:  # NaN and +inf: exponent 255, UE8M0's NaN byte
            bits = torch.clamp(s, min=FP8_GROUP_EPS).view(torch.int32)
            exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
            exponent = exponent.clamp(max=255)
            s = torch.where(s.isnan(), s, (exponent << 23).view(torch.float32))
        q = _e4m3(x * s.reciprocal()[:, :, None]).reshape(merged.shape)
        if self.layout != "ue8m0_packed":
            return q, s
        packed = exponent.new_zeros(tokens, -(-groups // 4), 4, dtype=torch.uint8)
        packed.flatten(1)[:, :groups] = exponent
        return q, packed.view(torch.int32)[..., 0]  # little-endian: group 4c + j in byte j

    def _store_scales(self, scales: torch.Tensor) -> None:
        super()._store_scales(scales)
        tokens, columns = self.scales.shape
        if self.layout == "ue8m0_packed" and columns > 1 and self.scales.stride(1) > tokens:
            padded = self.scales.stride(1)  # zero the padding rows of all columns but the last
            offset = self.scales.storage_offset() + tokens
            self.scales.as_strided((columns - 1, padded - tokens), (padded, 1), offset).zero_()
