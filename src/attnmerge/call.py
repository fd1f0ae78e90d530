"""The validated description of one merge, as every backend receives it.

:func:`attnmerge.api` checks a call's arguments once and builds a :class:`MergeCall`;
its :class:`CallSignature` (everything about the call that selects code, no tensors)
keys backend selection and kernel choice. Backends receive the call object, never a
list of positional arguments.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .formats import FormatKey, OutputFormat

__all__ = ["CallSignature", "MergeCall"]


class CallSignature(NamedTuple):
    """What selects a backend and its kernels: hashable, no tensors, no sizes that vary
    per batch."""

    device: torch.device
    #: dtypes of the partial outputs, one per partial (their number is K)
    partial_dtypes: tuple[torch.dtype, ...]
    head_size: int
    output_format: FormatKey
    write_lse: bool
    #: every LSE of the call is a base-2 logarithm (else natural)
    lse_base_2: bool

    @property
    def num_partials(self) -> int:
        return len(self.partial_dtypes)

    @property
    def output_dtype(self) -> torch.dtype:
        return self.output_format.dtype


class MergeCall(NamedTuple):
    """One validated merge: read ``partials`` and ``lses``, write ``output`` (and
    ``output_lse``) in ``output_format``.

    Shapes: ``output`` and each partial ``[T, H, D]`` (last dimension contiguous, other
    strides free), each LSE and ``output_lse`` float32 ``[H, T]`` (any strides). Tokens
    ``t >= tokens_with_first`` have no first partial: its rows and LSEs there are never
    read (vLLM's ``prefill_tokens_with_context``; ``T`` when every token has it).
    ``output`` may be the very tensor of a partial, ``output_lse`` that of an LSE.
    """

    output: torch.Tensor
    output_lse: torch.Tensor | None
    partials: tuple[torch.Tensor, ...]
    lses: tuple[torch.Tensor, ...]
    output_format: OutputFormat
    tokens_with_first: int
    signature: CallSignature

    @property
    def lse_base_2(self) -> bool:
        return self.signature.lse_base_2
