"""torch.library registration: ``torch.ops.attnmerge.merge_attn_states``.

The op mutates ``output`` (and ``output_lse``) and returns nothing, so its fake
implementation has nothing to compute. ``torch.compile`` traces the public function
through this op (no graph break); eager calls of the public function skip the
dispatcher. Calling ``torch.ops.attnmerge.merge_attn_states`` directly is supported
and runs the same checks.
"""

from __future__ import annotations

import torch

from .api import _merge_attn_states_impl

__all__: list[str] = []


@torch.library.custom_op("attnmerge::merge_attn_states", mutates_args=("output", "output_lse"))
def _merge_attn_states_op(
    output: torch.Tensor,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    output_lse: torch.Tensor | None,
    prefill_tokens_with_context: int | None,
    output_scale: torch.Tensor | None,
    lse_base_2: bool,
    backend: str,
) -> None:
    _merge_attn_states_impl(
        output,
        prefix_output,
        prefix_lse,
        suffix_output,
        suffix_lse,
        output_lse,
        prefill_tokens_with_context,
        output_scale,
        2 if lse_base_2 else "e",
        backend,
    )


@_merge_attn_states_op.register_fake
def _(
    output,
    prefix_output,
    prefix_lse,
    suffix_output,
    suffix_lse,
    output_lse,
    prefill_tokens_with_context,
    output_scale,
    lse_base_2,
    backend,
) -> None:
    return None
