"""The validated description of one merge, as every backend receives it.

:func:`attnmerge.api` checks a call's arguments once and builds a :class:`MergeCall`;
its :class:`CallSignature` (everything about the call that selects code, no tensors)
keys backend selection and kernel choice. Backends receive the call object, never a
list of positional arguments.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch

from .formats import FormatKey, OutputFormat

__all__ = ["CallSignature", "MergeCall", "PartialLayout"]


class PartialLayout(enum.Enum):
    """How a call's partials are laid out in memory."""

    #: one ``[T, H, D]`` tensor and one ``[H, T]`` LSE per partial (the two-way form)
    SEPARATE = "separate"
    #: one ``[K, T, H, D]`` tensor and one ``[K, H, T]`` LSE tensor, any strides
    STACKED = "stacked"
    #: packed rows ``[N, H, D]`` and LSEs ``[H, N]``; token ``t`` merges rows
    #: ``indptr[t] <= n < indptr[t + 1]``
    PACKED = "packed"


class CallSignature(NamedTuple):
    """What selects a backend and its kernels: hashable, no tensors, no sizes that vary
    per batch (the number of stacked or packed partials is not part of it)."""

    device: torch.device
    #: dtypes of the partial outputs: one per partial (SEPARATE, so their number is K),
    #: or the one dtype of the stacked or packed tensor
    partial_dtypes: tuple[torch.dtype, ...]
    head_size: int
    output_format: FormatKey
    write_lse: bool
    #: every LSE of the call is a base-2 logarithm (else natural)
    lse_base_2: bool
    layout: PartialLayout = PartialLayout.SEPARATE

    @property
    def num_partials(self) -> int | None:
        """K for separate partials; None where the signature does not fix it."""
        return len(self.partial_dtypes) if self.layout is PartialLayout.SEPARATE else None

    @property
    def output_dtype(self) -> torch.dtype:
        return self.output_format.dtype


class MergeCall(NamedTuple):
    """One validated merge: read ``partials`` and ``lses``, write ``output`` (and
    ``output_lse``) in ``output_format``.

    ``output`` is ``[T, H, D]`` and ``output_lse`` float32 ``[H, T]`` (last dimension of
    ``output`` contiguous, every other stride free). The partials, by
    ``signature.layout``:

    * SEPARATE: ``partials`` holds K tensors ``[T, H, D]``, ``lses`` K tensors ``[H, T]``;
    * STACKED: ``partials`` holds one ``[K, T, H, D]`` tensor, ``lses`` one ``[K, H, T]``;
    * PACKED: ``partials`` holds one ``[N, H, D]`` tensor, ``lses`` one ``[H, N]``, and
      ``indptr`` (int32 or int64, ``[T + 1]``) says which rows each token merges.

    Tokens ``t >= tokens_with_first`` have no first partial: its rows and LSEs there are
    never read (vLLM's ``prefill_tokens_with_context``; ``T`` when every token has it).
    ``output`` may be the very view of the first partial, ``output_lse`` that of its LSE.
    """

    output: torch.Tensor
    output_lse: torch.Tensor | None
    partials: tuple[torch.Tensor, ...]
    lses: tuple[torch.Tensor, ...]
    output_format: OutputFormat
    tokens_with_first: int
    signature: CallSignature
    indptr: torch.Tensor | None = None

    @property
    def lse_base_2(self) -> bool:
        return self.signature.lse_base_2

    def launcher_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The call's tensors in the order the eager launcher reads them (csrc/eager.c in
        attnmerge.cuda), None where absent. Two separate partials: output, first partial
        and its LSE, second partial and its LSE, output LSE, the format's device operand;
        stacked or packed: output, partials, LSEs, indptr, output LSE, operand."""
        operand = self.output_format.kernel_operand()
        if self.signature.layout is PartialLayout.SEPARATE:
            (first, second), (first_lse, second_lse) = self.partials, self.lses
            return (self.output, first, first_lse, second, second_lse, self.output_lse, operand)
        (partials,), (lses,) = self.partials, self.lses
        return (self.output, partials, lses, self.indptr, self.output_lse, operand)
