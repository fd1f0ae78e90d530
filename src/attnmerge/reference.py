"""The ``torch`` backend: the reference implementation of the merge contract.

Plain PyTorch, float32 math, any device. Every other backend is tested against
:func:`merge_states_reference`, and the tests check this function itself against
float64 math. The arithmetic is written in the same order as the GPU kernels
(weights first, then ``where(w != 0, w * O, 0)`` summed over the partials), so that
backends agree to the last bit except where the device's ``exp``/``log`` round
differently.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .call import CallSignature, MergeCall, PartialLayout
from .formats import FP8Static

__all__ = [
    "BACKEND",
    "merge_packed_reference",
    "merge_states_reference",
    "quantize_fp8_static",
]


def merge_states_reference(
    outputs: Sequence[torch.Tensor],
    lses: Sequence[torch.Tensor],
    *,
    lse_base_2: bool = False,
    prefill_tokens_with_context: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge K partial attention states in float32.

    Args:
        outputs: K tensors ``[T, H, D]`` (any float dtype, any strides), each partial
            output normalised over its own keys; or one ``[K, T, H, D]`` tensor.
        lses: K float32 tensors ``[H, T]`` (any strides), or one ``[K, H, T]`` tensor:
            each partial's log-sum-exp, natural log unless ``lse_base_2``. ``+inf`` and
            ``-inf`` both mean "empty".
        lse_base_2: the LSEs (inputs and the returned one) are base-2 logarithms.
        prefill_tokens_with_context: tokens ``t >= P`` take nothing from ``outputs[0]``
            (the prefix): its rows and LSEs there are not used. With two partials (vLLM's
            form) such a token's result is the second partial's row and LSE as they are
            (whatever its LSE holds: +inf and NaN included); with more, the merge of the
            others.

    Returns:
        ``(output, lse)``: float32 ``[T, H, D]`` and float32 ``[H, T]``. Rows whose
        partials are all empty are exactly 0 with LSE ``-inf``; a partial with zero
        weight contributes exactly 0 whatever its row holds; NaN LSEs and NaNs in
        weighted rows propagate.
    """
    lse = torch.stack([x.float() for x in lses])  # [K, H, T]
    P = prefill_tokens_with_context
    if P is None:
        return _merge(lse, lambda k: outputs[k], None, lse_base_2)
    lse[0, :, P:] = float("-inf")
    out, out_lse = _merge(lse, lambda k: outputs[k], None, lse_base_2)
    if len(lses) == 2:
        # The suffix copied: weight exactly 1 whatever its LSE, the prefix's term +0.
        out[P:] = outputs[1][P:].float() + 0.0
        out_lse[:, P:] = lses[1][:, P:].float() + 0.0
    return out, out_lse


def merge_packed_reference(
    outputs: torch.Tensor,
    lses: torch.Tensor,
    indptr: torch.Tensor,
    *,
    lse_base_2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a variable number of partials per token in float32: token ``t`` merges the
    packed rows ``indptr[t] <= n < indptr[t + 1]`` of ``outputs`` ``[N, H, D]`` and
    ``lses`` ``[H, N]``, in order; a token without rows gets 0 and LSE ``-inf``.
    ``indptr`` is clamped as the kernels clamp it (start into ``[0, N]``, end into
    ``[start, N]``). Reads ``indptr`` on the host. Returns what
    :func:`merge_states_reference` returns."""
    n = outputs.shape[0]
    bounds = indptr.to(device=outputs.device, dtype=torch.int64)
    start = bounds[:-1].clamp(0, n)
    count = torch.maximum(bounds[1:].clamp(max=n), start) - start  # [T]
    num_partials = int(count.max()) if count.numel() else 0
    tokens, heads = count.numel(), outputs.shape[1]
    if num_partials == 0:
        out = torch.zeros(tokens, heads, outputs.shape[2], device=outputs.device)
        return out, torch.full((heads, tokens), float("-inf"), device=outputs.device)
    rows = [(start + k).clamp(max=n - 1) for k in range(num_partials)]
    valid = torch.stack([k < count for k in range(num_partials)])  # [K, T]
    lse = torch.stack([lses.float()[:, r] for r in rows])  # [K, H, T]
    lse = torch.where(valid[:, None, :], lse, float("-inf"))
    return _merge(lse, lambda k: outputs[rows[k]], valid, lse_base_2)


def _merge(lse, partial, valid, lse_base_2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge of K partials with LSEs ``lse`` [K, H, T] and rows ``partial(k)``
    [T, H, D]; where ``valid`` [K, T] is False, partial ``k`` is absent (no term)."""
    lse = torch.where(lse == float("inf"), float("-inf"), lse)
    m = lse.amax(dim=0)  # amax propagates NaN, so a NaN LSE is never mistaken for "empty"
    empty = m == float("-inf")
    m = torch.where(empty, 0.0, m)
    exp, log = (torch.exp2, torch.log2) if lse_base_2 else (torch.exp, torch.log)
    e = exp(lse - m)
    total = e[0]
    for k in range(1, e.shape[0]):
        total = total + e[k]
    weights = torch.where(empty, 0.0, e / total)  # [K, H, T]
    out_lse = torch.where(empty, float("-inf"), m + log(total))

    out = None
    for k in range(e.shape[0]):
        w = weights[k].t().unsqueeze(-1)  # [T, H, 1]
        # Zero weight (empty partial, rows past P, or an underflowed exp) contributes
        # exactly 0, even where the partial's row holds NaN or inf.
        term = torch.where(w != 0, w * partial(k).float(), 0.0)
        if out is None:
            out = term
        elif valid is None:
            out = out + term
        else:
            out = torch.where(valid[k][:, None, None], out + term, out)
    return out, out_lse


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``e4m3fn(saturate(x * (1 / scale)))``, NaN preserved, round-to-nearest-even
    (:meth:`attnmerge.FP8Static.quantize_reference`)."""
    return FP8Static(scale).quantize_reference(x)


class TorchBackend:
    """The reference as a backend: any device, any number of partials, every format."""

    #: dispatch asks no output format whether this backend can store it
    stores_every_format = True

    def unsupported(self, signature: CallSignature) -> str | None:
        return None

    def run(self, call: MergeCall) -> None:
        """Merge and store. The whole result is computed before anything is written,
        so outputs may alias inputs."""
        tokens = call.output.shape[0]
        if call.signature.layout is PartialLayout.PACKED:
            out, lse = merge_packed_reference(
                call.partials[0], call.lses[0], call.indptr, lse_base_2=call.lse_base_2
            )
        else:
            stacked = call.signature.layout is PartialLayout.STACKED
            out, lse = merge_states_reference(
                call.partials[0] if stacked else call.partials,
                call.lses[0] if stacked else call.lses,
                lse_base_2=call.lse_base_2,
                prefill_tokens_with_context=(
                    None if call.tokens_with_first == tokens else call.tokens_with_first
                ),
            )
        call.output_format.store_reference(out, call.output)  # with its scales and amax
        if call.output_lse is not None:
            call.output_lse.copy_(lse)


BACKEND = TorchBackend()
