"""Engine-compatible entry points: FlashInfer's and SGLang's merge functions on attnmerge.

Each function takes the arguments of the engine function it is named after, in the same
order and with the same meaning, and returns what that function returns, so that a call
site can switch by changing an import. Each is one call of :func:`attnmerge.merge` or
:func:`attnmerge.merge_attn_states` on views of the caller's tensors; no input is copied
(an LSE that is not float32 is converted, as the engines do):

* ``merge_state(v_a, s_a, v_b, s_b)`` (``flashinfer.merge_state``):
  ``merge([v_a, v_b], [s_a.t(), s_b.t()], lse_base=2, return_lse=True)``;
* ``merge_state_in_place(v, s, v_other, s_other, mask=None)``
  (``flashinfer.merge_state_in_place``):
  ``merge_attn_states(v, v, s.t(), v_other, s_other.t(), s.t(), lse_base=2)``;
* ``merge_states(v, s)`` (``flashinfer.merge_states``):
  ``merge(v.transpose(0, 1), s.permute(1, 2, 0), lse_base=2, return_lse=True)``;
* ``merge_state_v2(v_a, s_a, v_b, s_b, v_merged=None, s_merged=None)``
  (``sgl_kernel.merge_state_v2``):
  ``merge_attn_states(v_merged, v_a, s_a.t(), v_b, s_b.t(), s_merged.t())``. SGLang's
  ``merge_state(prefix_output, prefix_lse, suffix_output, suffix_lse, output,
  output_lse)`` (``sglang.srt.layers.attention.merge_state``) passes its arguments to
  ``merge_state_v2`` in this order, so this function serves calls of both.

Layouts, as upstream: partial outputs ``[seq_len, num_heads, head_dim]``, LSEs float32
``[seq_len, num_heads]`` (attnmerge takes ``[heads, tokens]``, so the functions pass the
transposed views), base 2 for FlashInfer and natural log for SGLang; ``merge_states``
takes ``v [seq_len, num_states, num_heads, head_dim]`` and ``s [seq_len, num_states,
num_heads]``. Returned LSEs are float32 ``[seq_len, num_heads]``, contiguous; returned
outputs have the dtype of ``v_a``/``v`` (``merge_state_v2``: of ``v_merged`` if given).
``merge_state_v2`` always returns the LSE too, as upstream. Every function also takes a
keyword-only ``backend`` (as :func:`attnmerge.merge`).

``merge_state_in_place`` updates ``v`` and ``s`` and returns None. Without ``mask`` it
is attnmerge's in-place merge, bit-identical to the out-of-place result (docs/contract.md
C16). With ``mask`` (``[seq_len]``, bool or integer, non-zero: merge this token), the
tokens whose mask is 0 keep their bytes exactly and the others get the merged values; the
merge then goes through temporary tensors (extra passes over ``v``) and reads the mask
on the device only (no host synchronisation). ``s`` must be float32 (a ``TypeError``
otherwise): FlashInfer converts another dtype to a temporary and loses the update.

Differences from the upstream kernels, as read in FlashInfer 0.6.18 (commit fb28d72,
``include/flashinfer/attention/cascade.cuh`` and ``state.cuh``) and sgl-kernel
0.4.1.post1 (sglang commit db84a8e, ``sgl-kernel/csrc/attention/merge_attn_states.cu``).
The results here follow attnmerge's contract (docs/contract.md), per token and head:

* both LSEs ``-inf`` (both states empty): the row is exactly 0 and the LSE ``-inf``
  (C5). FlashInfer gives ``0 * v`` (NaN where a row holds NaN or inf) and ``-inf``;
  SGLang gives NaN for the row and the LSE (``-inf - -inf``);
* an LSE ``+inf`` means an empty state, like ``-inf`` (C4): the result is the other
  state's. FlashInfer gives both weights 0: ``0 * v`` and LSE NaN (``-inf + inf``);
  SGLang reads ``±inf`` as ``-inf``, as here;
* an LSE NaN gives a NaN row and LSE (C7), as in SGLang. FlashInfer drops that state
  silently (``fmaxf`` ignores NaN) and returns the other state's row and LSE;
* a state of weight 0 adds exactly 0, even where its row holds NaN or inf (C6); both
  kernels give ``0 * NaN = NaN`` there;
* ``merge_states`` with one state applies the same rules (finite LSE: the row and LSE
  as they are; ``±inf``: 0 and ``-inf``; NaN: NaN); FlashInfer copies ``v`` and ``s``
  as they are whatever the LSE (when ``seq_len > 1``; otherwise its kernel for many
  states merges). With no state both give zeros and ``-inf``.

Finite results agree with the engines' within float32 rounding, not bit for bit:
FlashInfer computes with approximate ``exp2``/``log2`` (and, in ``merge_states``, an
approximate division), attnmerge with IEEE operations (C2, C23). Beyond what the engines
accept, the functions take float32 partials for FlashInfer (which takes fp16/bf16), any
head size (FlashInfer: 64, 128, 256 or 512; sgl-kernel: a multiple of 8, or of 4 in
float32), partials and outputs of different dtypes, and free token and head strides (both
engines require contiguous tensors).
"""

from __future__ import annotations

import torch

from .api import merge, merge_attn_states

__all__ = ["merge_state", "merge_state_in_place", "merge_state_v2", "merge_states"]


def _lse(name: str, s: object, shape: tuple[int, ...] | None, dims: int) -> torch.Tensor:
    """An engine LSE as float32 (a float32 LSE is returned as is), checked against the
    sizes its partial implies (``shape``; None when the partial itself is invalid, which
    merge then reports)."""
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    if shape is None and s.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(s.shape)}")
    if shape is not None and tuple(s.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(s.shape)}")
    return s.to(torch.float32)


def _lead(v: object, dims: int) -> tuple[int, ...] | None:
    """The sizes of a ``dims``-D partial without its last (head_dim), or None when it is
    not one."""
    return tuple(v.shape[:-1]) if isinstance(v, torch.Tensor) and v.dim() == dims else None


def merge_state(
    v_a: torch.Tensor,
    s_a: torch.Tensor,
    v_b: torch.Tensor,
    s_b: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer's ``merge_state``: merge two states into new tensors.

    Args:
        v_a, v_b: ``[seq_len, num_heads, head_dim]`` partial outputs.
        s_a, s_b: their LSEs, ``[seq_len, num_heads]``, base 2.

    Returns:
        ``(v_merged, s_merged)``: ``[seq_len, num_heads, head_dim]`` in ``v_a``'s dtype,
        and the float32 ``[seq_len, num_heads]`` base-2 LSE.
    """
    shape = _lead(v_a, 3)
    s_a, s_b = _lse("s_a", s_a, shape, 2), _lse("s_b", s_b, shape, 2)
    res = merge([v_a, v_b], [s_a.t(), s_b.t()], lse_base=2, return_lse=True, backend=backend)
    return res.output, res.lse.t()


def merge_state_in_place(
    v: torch.Tensor,
    s: torch.Tensor,
    v_other: torch.Tensor,
    s_other: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> None:
    """FlashInfer's ``merge_state_in_place``: merge ``(v_other, s_other)`` into
    ``(v, s)``.

    Args:
        v: ``[seq_len, num_heads, head_dim]``, updated in place.
        s: float32 ``[seq_len, num_heads]`` base-2 LSE of ``v``, updated in place.
        v_other, s_other: the state merged in, same shapes.
        mask: optional ``[seq_len]`` bool (or integer) tensor on ``v``'s device: only
            tokens whose mask is non-zero are merged; the others keep their bytes.
    """
    shape = _lead(v, 3)
    if isinstance(s, torch.Tensor) and s.dtype != torch.float32:
        raise TypeError(f"s must be float32 (it is updated in place), got {s.dtype}")
    s = _lse("s", s, shape, 2)
    s_other = _lse("s_other", s_other, shape, 2)
    if mask is None:
        merge_attn_states(v, v, s.t(), v_other, s_other.t(), s.t(), lse_base=2, backend=backend)
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.shape != s.shape[:1] or mask.device != s.device:
        raise ValueError(
            f"mask must have shape ({s.shape[0]},) [seq_len] on {s.device}, got "
            f"{tuple(mask.shape)} on {mask.device}"
        )
    keep = mask if mask.dtype == torch.bool else mask != 0
    res = merge([v, v_other], [s.t(), s_other.t()], lse_base=2, return_lse=True, backend=backend)
    v.copy_(torch.where(keep[:, None, None], res.output, v))
    s.copy_(torch.where(keep[:, None], res.lse.t(), s))


def merge_states(
    v: torch.Tensor, s: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer's ``merge_states``: merge ``num_states`` states per token.

    Args:
        v: ``[seq_len, num_states, num_heads, head_dim]`` partial outputs.
        s: their LSEs, ``[seq_len, num_states, num_heads]``, base 2.

    Returns:
        ``(v_merged, s_merged)``: ``[seq_len, num_heads, head_dim]`` in ``v``'s dtype, and
        the float32 ``[seq_len, num_heads]`` base-2 LSE.
    """
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 4:
        raise ValueError(
            f"v must be 4-D [seq_len, num_states, num_heads, head_dim], got {tuple(v.shape)}"
        )
    shape = _lead(v, 4)
    s = _lse("s", s, shape, 3)
    tokens, states, heads = shape
    if states == 0:  # no states: every token is empty (FlashInfer: zeros and -inf)
        out = torch.zeros(tokens, heads, v.shape[3], dtype=v.dtype, device=v.device)
        return out, torch.full((tokens, heads), -torch.inf, device=v.device)
    res = merge(v.transpose(0, 1), s.permute(1, 2, 0), lse_base=2, return_lse=True, backend=backend)
    return res.output, res.lse.t()


def merge_state_v2(
    v_a: torch.Tensor,
    s_a: torch.Tensor,
    v_b: torch.Tensor,
    s_b: torch.Tensor,
    v_merged: torch.Tensor | None = None,
    s_merged: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang's ``sgl_kernel.merge_state_v2``: merge two states (natural-log LSEs).

    Args:
        v_a, v_b: ``[seq_len, num_heads, head_dim]`` partial outputs (prefix, suffix).
        s_a, s_b: their LSEs, ``[seq_len, num_heads]``, natural log.
        v_merged: optional output ``[seq_len, num_heads, head_dim]``; allocated like
            ``v_a`` when None. May be ``v_a`` or ``v_b`` itself (in place).
        s_merged: optional float32 ``[seq_len, num_heads]`` output LSE; allocated like
            ``s_a`` when None. May be ``s_a`` or ``s_b`` itself.

    Returns:
        ``(v_merged, s_merged)``; the LSE is always computed, as upstream.
    """
    shape = _lead(v_a, 3)
    s_a, s_b = _lse("s_a", s_a, shape, 2), _lse("s_b", s_b, shape, 2)
    if v_merged is None:
        v_merged = torch.empty_like(v_a)
    if s_merged is None:
        s_merged = torch.empty_like(s_a)
    else:
        _lse("s_merged", s_merged, tuple(s_a.shape), 2)  # type, shape (its dtype: below)
    merge_attn_states(v_merged, v_a, s_a.t(), v_b, s_b.t(), s_merged.t(), backend=backend)
    return v_merged, s_merged
