"""torch.library registration: ``torch.ops.attnmerge.merge_attn_states`` (two partials,
vLLM's form) and ``torch.ops.attnmerge.merge_partials`` (stacked or packed partials).

Each op mutates its outputs and returns nothing, so its fake implementation has nothing
to compute. ``torch.compile`` traces the public functions through these ops (no graph
break); eager calls of the public functions skip the dispatcher. Calling the ops
directly is supported and runs the same checks.

The ops are declared with a plain ``torch.library.Library`` schema rather than
``torch.library.custom_op``, whose Python wrapper costs compiled graphs several times the
host time of a plain schema on every call (docs/host-overhead.md).
"""

from __future__ import annotations

import torch

from .api import _merge_attn_states_impl, _merge_partials_impl

__all__: list[str] = []

_lib = torch.library.Library("attnmerge", "DEF")
_lib.define(
    "merge_attn_states(Tensor(a!) output, Tensor prefix_output, Tensor prefix_lse, "
    "Tensor suffix_output, Tensor suffix_lse, Tensor(b!)? output_lse, "
    "SymInt? prefill_tokens_with_context, Tensor? output_scale, bool lse_base_2, "
    "str backend) -> ()"
)


def _merge_attn_states_op(*args) -> None:
    """The op's arguments: vLLM's eight (output ... output_scale), lse_base_2, backend."""
    *merge_args, lse_base_2, backend = args
    _merge_attn_states_impl(tuple(merge_args), 2 if lse_base_2 else "e", backend)


_lib.impl("merge_attn_states", _merge_attn_states_op, "CompositeExplicitAutograd")


@torch.library.register_fake("attnmerge::merge_attn_states", lib=_lib)
def _merge_attn_states_fake(*args) -> None:
    return None  # the op only writes into its outputs


_lib.define(
    "merge_partials(Tensor(a!) out, Tensor(b!)? out_lse, Tensor outputs, Tensor lses, "
    "Tensor? indptr, SymInt? prefill_tokens_with_context, Tensor? output_scale, "
    "bool lse_base_2, str backend) -> ()"
)


def _merge_partials_op(*args) -> None:
    """The op's arguments: out, out_lse, outputs, lses, indptr, prefill_tokens_with_context,
    output_scale, lse_base_2, backend."""
    *merge_args, lse_base_2, backend = args
    _merge_partials_impl(tuple(merge_args), 2 if lse_base_2 else "e", backend)


_lib.impl("merge_partials", _merge_partials_op, "CompositeExplicitAutograd")


@torch.library.register_fake("attnmerge::merge_partials", lib=_lib)
def _merge_partials_fake(*args) -> None:
    return None
