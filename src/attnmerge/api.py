"""Public entry points: argument checks, allocation, dispatch.

Two forms of the same operation:

* :func:`merge_attn_states`: vLLM's out-variant, same positional order and meaning as
  ``vllm.v1.attention.ops.merge_attn_states``, so engines can swap it in;
* :func:`merge`: functional and allocating, taking a sequence of partial states and
  a quantisation spec, the form that grows to K-way merges and more output formats.

Eager calls go straight to the backend; only under ``torch.compile`` do they go
through the registered custom op (the dispatcher adds a few microseconds per call,
see docs/host-overhead.md).

Every check runs once, in ``_build_call``, which describes the call as a
:class:`~attnmerge.call.MergeCall` for the backend that dispatch selects. The checks
run before anything is written: a call that raises leaves its output tensors untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import dispatch
from .call import CallSignature, MergeCall
from .formats import FLOAT_DTYPES, FP8Static, OutputFormat, Plain, QuantSpec, dtype_names

__all__ = ["MergeResult", "merge", "merge_attn_states"]

_PARTIAL_DTYPES = FLOAT_DTYPES
_OUTPUT_DTYPES = (*_PARTIAL_DTYPES, torch.float8_e4m3fn)
_FP8_DTYPES = (torch.float8_e4m3fn,)
_LSE_BASES = ("e", 2)

# One plain format object per dtype: formats are immutable, and the eager path is host-bound.
_PLAIN = {dtype: Plain(dtype) for dtype in FLOAT_DTYPES}


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_state(name: str, t: object, shape: torch.Size, device: torch.device) -> None:
    _check_tensor(name, t)
    if t.shape != shape:
        raise ValueError(
            f"{name} must have shape {tuple(shape)} [tokens, heads, head_size] like output, "
            f"got {tuple(t.shape)}"
        )
    if t.dtype not in _PARTIAL_DTYPES:
        raise TypeError(f"{name} must be one of {dtype_names(_PARTIAL_DTYPES)}, got {t.dtype}")
    _check_last_dim(name, t)
    _check_device(name, t, device)


def _check_last_dim(name: str, t: torch.Tensor) -> None:
    if t.stride(2) != 1 and t.shape[2] > 1:
        raise ValueError(
            f"{name} must be contiguous in its last (head_size) dimension, got strides "
            f"{tuple(t.stride())}"
        )


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of output)")


def _check_lse(name: str, t: object, heads: int, tokens: int, device: torch.device) -> None:
    _check_tensor(name, t)
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if t.dim() != 2 or t.shape[0] != heads or t.shape[1] != tokens:
        hint = ""
        if tuple(t.shape) == (tokens, heads):
            hint = " (for an LSE stored [tokens, heads], pass its transpose, e.g. lse.t())"
        raise ValueError(
            f"{name} must have shape ({heads}, {tokens}) [heads, tokens], got "
            f"{tuple(t.shape)}{hint}"
        )
    _check_device(name, t, device)


def _check_written(name: str, t: torch.Tensor, reads: Sequence[tuple[str, torch.Tensor]]) -> None:
    """A written tensor must not overlap itself, and may share memory with an input
    only as the very same view (in-place merge)."""
    if t.numel() == 0:  # nothing is written (and empty tensors may share a null pointer)
        return
    if torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(f"{name} has overlapping elements (e.g. an expanded view)")
    ptr = t.data_ptr()
    for other_name, other in reads:
        if other.data_ptr() == ptr and (other.stride() != t.stride() or other.dtype != t.dtype):
            raise ValueError(
                f"{name} aliases {other_name} with different strides or dtype; in-place "
                f"merging needs the very same view"
            )


def _output_format(output: torch.Tensor, output_scale: object) -> OutputFormat:
    """The format vLLM's arguments ask for: FP8 exactly when an ``output_scale`` is given."""
    fp8 = output.dtype in _FP8_DTYPES
    if output_scale is None:
        if fp8:
            raise ValueError(f"output is {output.dtype}: output_scale is required")
        return _PLAIN[output.dtype]
    _check_tensor("output_scale", output_scale)
    if not fp8:
        raise ValueError(
            f"output_scale was given but output is {output.dtype}; a scaled store needs "
            f"a float8_e4m3fn output"
        )
    return FP8Static(output_scale)


def _build_call(
    output: object,
    prefix_output: object,
    prefix_lse: object,
    suffix_output: object,
    suffix_lse: object,
    output_lse: object,
    prefill_tokens_with_context: object,
    output_scale: object,
    lse_base: object,
    backend: object,
    real_tensors: bool,
) -> MergeCall:
    """Check every argument of vLLM's form and describe the call.

    ``real_tensors`` is False while tracing under torch.compile (fake tensors carry no
    memory, so the aliasing checks wait for the real call).
    """
    _check_tensor("output", output)
    if output.dim() != 3:
        raise ValueError(
            f"output must be 3-D [tokens, heads, head_size], got shape {tuple(output.shape)}"
        )
    if output.dtype not in _OUTPUT_DTYPES:
        raise TypeError(f"output must be one of {dtype_names(_OUTPUT_DTYPES)}, got {output.dtype}")
    _check_last_dim("output", output)
    shape, device = output.shape, output.device
    tokens, heads = shape[0], shape[1]
    _check_state("prefix_output", prefix_output, shape, device)
    _check_state("suffix_output", suffix_output, shape, device)
    _check_lse("prefix_lse", prefix_lse, heads, tokens, device)
    _check_lse("suffix_lse", suffix_lse, heads, tokens, device)
    if output_lse is not None:
        _check_lse("output_lse", output_lse, heads, tokens, device)
    output_format = _output_format(output, output_scale)
    output_format.check(output)

    tokens_with_first = tokens
    if prefill_tokens_with_context is not None:
        if isinstance(prefill_tokens_with_context, bool) or not isinstance(
            prefill_tokens_with_context, (int, torch.SymInt)
        ):
            raise TypeError(
                f"prefill_tokens_with_context must be an int or None, got "
                f"{type(prefill_tokens_with_context).__name__}"
            )
        if not 0 <= prefill_tokens_with_context <= tokens:
            raise ValueError(
                f"prefill_tokens_with_context must be in [0, {tokens}] (the number of "
                f"tokens), got {prefill_tokens_with_context}"
            )
        tokens_with_first = prefill_tokens_with_context
    if lse_base not in _LSE_BASES:
        raise ValueError(f"lse_base must be 'e' or 2, got {lse_base!r}")
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(dispatch.BACKENDS)}, got {backend!r}")

    if real_tensors:
        reads = (("prefix_output", prefix_output), ("suffix_output", suffix_output))
        _check_written("output", output, reads)
        if output_lse is not None:
            lse_reads = (("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse))
            _check_written("output_lse", output_lse, lse_reads)
    signature = CallSignature(
        device=device,
        partial_dtypes=(prefix_output.dtype, suffix_output.dtype),
        head_size=shape[2],
        output_format=output_format.key,
        write_lse=output_lse is not None,
        lse_base_2=lse_base == 2,
    )
    return MergeCall(
        output=output,
        output_lse=output_lse,
        partials=(prefix_output, suffix_output),
        lses=(prefix_lse, suffix_lse),
        output_format=output_format,
        tokens_with_first=tokens_with_first,
        signature=signature,
    )


def _merge_attn_states_impl(args: tuple, lse_base: str | int, backend: str) -> None:
    """Validate on real tensors, select a backend, run. ``args`` are the op's tensor and
    size arguments in vLLM's order (output ... output_scale). Shared by the eager path
    and the custom op's implementation."""
    call = _build_call(*args, lse_base, backend, real_tensors=True)
    dispatch.select(backend, call.signature)(call)


def merge_attn_states(
    output: torch.Tensor,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    output_lse: torch.Tensor | None = None,
    prefill_tokens_with_context: int | None = None,
    output_scale: torch.Tensor | None = None,
    *,
    lse_base: str | int = "e",
    backend: str = "auto",
) -> None:
    """Merge a prefix and a suffix partial attention state into ``output`` (in place).

    Drop-in for vLLM's ``merge_attn_states`` (same positional arguments and meaning).
    For each token ``t`` and head ``h``, with ``l_p, l_s`` the two LSEs::

        m   = max(l_p, l_s)
        w_i = exp(l_i - m) / (exp(l_p - m) + exp(l_s - m))
        out = w_p * prefix_output[t, h] + w_s * suffix_output[t, h]      (float32)
        lse = m + log(exp(l_p - m) + exp(l_s - m))

    Args:
        output: ``[T, H, D]`` float32/float16/bfloat16, or float8_e4m3fn with
            ``output_scale``. Written. May be the very same tensor as ``prefix_output``
            or ``suffix_output`` (in-place merge); other overlaps with inputs are
            undefined.
        prefix_output, suffix_output: ``[T, H, D]`` float32/float16/bfloat16 partial
            outputs (dtypes may differ from each other and from ``output``). Token and
            head strides are free and independent per tensor; the last dimension must
            be contiguous.
        prefix_lse, suffix_lse: float32 ``[H, T]`` log-sum-exps, natural log unless
            ``lse_base=2``. Any strides: an LSE stored ``[T, H]`` (FlashInfer, SGLang) is
            passed as its transposed view ``lse.t()``, without a copy. ``+inf`` and
            ``-inf`` both mark an empty partial.
        output_lse: optional float32 ``[H, T]`` (any strides), written with the merged
            LSE in the same base. May be the very same tensor as ``prefix_lse`` or
            ``suffix_lse``.
        prefill_tokens_with_context: ``P``; tokens ``t >= P`` have no prefix: the prefix
            rows and LSEs there are not read, and the output is the suffix row (and the
            suffix LSE) whenever the suffix is not empty. ``None`` means all ``T``.
        output_scale: 1-element float32 tensor on the output's device; required exactly
            when ``output`` is FP8. Stores ``e4m3fn(saturate(out * (1 / scale)))``,
            round-to-nearest-even, saturating at +-448, NaN kept.
        lse_base: ``"e"`` (default; vLLM, FlashAttention) or ``2`` (FlashInfer,
            TensorRT-LLM) for every LSE of the call, inputs and ``output_lse``.
        backend: ``"auto"`` (default; fastest backend that can serve the call, or the
            ``ATTNMERGE_BACKEND`` environment variable), ``"cuda"``, ``"triton"`` or
            ``"torch"``.

    Special values (docs/contract.md C4-C7): rows where both partials are empty are
    exactly 0 with LSE ``-inf`` (never NaN); a partial with zero weight contributes
    exactly 0 even if its row holds NaN or inf; a NaN LSE, or a NaN in a partial with
    non-zero weight, gives NaN (the FP8 NaN code), never a finite value.

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: shapes, strides, devices, a missing or superfluous ``output_scale``,
            ``prefill_tokens_with_context`` out of range, unknown ``lse_base`` or
            ``backend``. Nothing is written when a check fails.
        BackendError: an explicitly named backend cannot serve the call (the message
            says why).

    Example::

        >>> T, H, D = 4, 2, 8
        >>> o1, o2 = torch.randn(T, H, D), torch.randn(T, H, D)
        >>> l1, l2 = torch.randn(H, T), torch.randn(H, T)
        >>> out = torch.empty(T, H, D)
        >>> attnmerge.merge_attn_states(out, o1, l1, o2, l2)
    """
    args = (
        output,
        prefix_output,
        prefix_lse,
        suffix_output,
        suffix_lse,
        output_lse,
        prefill_tokens_with_context,
        output_scale,
    )
    if torch.compiler.is_compiling():
        # Checks at trace time (fake tensors: no aliasing checks), then the opaque op.
        _build_call(*args, lse_base, backend, real_tensors=False)
        torch.ops.attnmerge.merge_attn_states(*args, lse_base == 2, backend)
        return
    _merge_attn_states_impl(args, lse_base, backend)


@dataclass(frozen=True, eq=False)
class MergeResult:
    """What :func:`merge` returns. Fields may be added (never removed) as formats grow.

    Attributes:
        output: ``[T, H, D]`` merged output, in ``out_dtype`` or the quantised dtype.
        lse: float32 ``[H, T]`` merged LSE (same base as the inputs), laid out like the
            first input LSE (a ``[T, H]``-stored input gives a ``[T, H]``-stored result);
            None when ``return_lse=False``.
    """

    output: torch.Tensor
    lse: torch.Tensor | None


def merge(
    outputs: Sequence[torch.Tensor],
    lses: Sequence[torch.Tensor],
    *,
    quant: QuantSpec | None = None,
    out_dtype: torch.dtype | None = None,
    lse_base: str | int = "e",
    return_lse: bool = True,
    prefill_tokens_with_context: int | None = None,
    backend: str = "auto",
) -> MergeResult:
    """Merge partial attention states into new tensors.

    Args:
        outputs: the partial outputs, each ``[T, H, D]`` float32/float16/bfloat16 with
            a contiguous last dimension. Exactly 2 for now (prefix, suffix); K-way
            merges will take longer sequences with the same meaning.
        lses: their float32 LSEs, each ``[H, T]`` with any strides (see
            :func:`merge_attn_states`), natural log unless ``lse_base=2``.
        quant: the output format, :class:`attnmerge.FP8Static` or :class:`attnmerge.Plain`;
            None stores plain floats in ``out_dtype``.
        out_dtype: dtype of an unquantised output; defaults to ``outputs[0].dtype``.
            Must be left None (or equal the spec's dtype) when ``quant`` is given.
        lse_base: ``"e"`` or ``2``, for the input and returned LSEs.
        return_lse: also compute and return the merged LSE.
        prefill_tokens_with_context: tokens ``t >= P`` take nothing from ``outputs[0]``;
            see :func:`merge_attn_states`.
        backend: as in :func:`merge_attn_states`.

    Returns:
        :class:`MergeResult` with the new ``output`` (and ``lse``).

    Raises:
        TypeError, ValueError, BackendError: as :func:`merge_attn_states` (whose messages
        call ``outputs[0]``/``lses[0]`` the prefix and ``outputs[1]``/``lses[1]`` the
        suffix), plus a wrong number of states or an unknown ``quant``.
    """
    if isinstance(outputs, torch.Tensor) or isinstance(lses, torch.Tensor):
        raise TypeError("outputs and lses must be sequences of tensors (one per partial state)")
    outputs, lses = tuple(outputs), tuple(lses)
    if len(outputs) != len(lses):
        raise ValueError(f"got {len(outputs)} outputs but {len(lses)} lses")
    if len(outputs) != 2:
        raise ValueError(
            f"merge takes exactly 2 partial states for now (prefix, suffix), got {len(outputs)}"
        )
    first = _check_tensor("outputs[0]", outputs[0])
    _check_tensor("lses[0]", lses[0])
    if first.dim() != 3:
        raise ValueError(
            f"outputs[0] must be 3-D [tokens, heads, head_size], got shape {tuple(first.shape)}"
        )

    scale = None
    if quant is None:
        dtype = first.dtype if out_dtype is None else out_dtype
        if dtype in _FP8_DTYPES:
            raise ValueError("an FP8 output needs quant=attnmerge.FP8Static(scale), not out_dtype")
    elif isinstance(quant, (Plain, FP8Static)):  # the formats the op's schema carries
        if out_dtype is not None and out_dtype != quant.dtype:
            raise ValueError(f"out_dtype={out_dtype} conflicts with quant dtype {quant.dtype}")
        dtype, scale = quant.dtype, quant.kernel_operand()
    else:
        raise TypeError(
            f"quant must be None or an attnmerge quant spec, got {type(quant).__name__}"
        )
    if not isinstance(dtype, torch.dtype) or dtype not in _OUTPUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {dtype_names(_OUTPUT_DTYPES)}, got {dtype}")

    tokens, heads, _ = first.shape
    output = torch.empty(first.shape, dtype=dtype, device=first.device)
    lse = None
    if return_lse:
        # Keep the caller's LSE layout: [T, H]-stored inputs give a [T, H]-stored result.
        if lses[0].dim() == 2 and lses[0].stride(0) == 1 and lses[0].stride(1) != 1:
            lse = torch.empty(tokens, heads, dtype=torch.float32, device=first.device).t()
        else:
            lse = torch.empty(heads, tokens, dtype=torch.float32, device=first.device)
    merge_attn_states(
        output,
        outputs[0],
        lses[0],
        outputs[1],
        lses[1],
        lse,
        prefill_tokens_with_context,
        scale,
        lse_base=lse_base,
        backend=backend,
    )
    return MergeResult(output, lse)
