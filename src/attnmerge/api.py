"""Public entry points: argument checks, allocation, dispatch.

Two forms of the same operation:

* :func:`merge_attn_states`: vLLM's out-variant, same positional order and meaning as
  ``vllm.v1.attention.ops.merge_attn_states``, so engines can swap it in;
* :func:`merge`: K partial states (a sequence, one stacked tensor, or packed rows with a
  per-token count) into a given or new output in any output format.

Eager calls go straight to the backend; only under ``torch.compile`` do they go
through the registered custom op (the dispatcher adds a few microseconds per call,
see docs/host-overhead.md). An eager ``merge_attn_states`` call shaped like an earlier
one that a GPU kernel backend (cuda or triton) served is launched by the compiled eager
launcher (:mod:`attnmerge.cuda.eager`) without the Python path.

Every check runs once, in ``_build_call``, which describes the call as a
:class:`~attnmerge.call.MergeCall` for the backend that dispatch selects. The checks
run before anything is written: a call that raises leaves its output tensors untouched.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import dispatch
from .call import CallSignature, MergeCall, PartialLayout
from .cuda import BACKEND as CUDA_BACKEND
from .cuda.eager import LAUNCHER as EAGER_LAUNCHER
from .formats import (
    FLOAT_DTYPES,
    FP8PerTokenGroup,
    FP8Static,
    OutputFormat,
    Plain,
    QuantSpec,
    dtype_names,
    strides_fit,
)
from .triton import BACKEND as TRITON_BACKEND

__all__ = ["MergeResult", "merge", "merge_attn_states"]

_PARTIAL_DTYPES = FLOAT_DTYPES
_OUTPUT_DTYPES = (*_PARTIAL_DTYPES, torch.float8_e4m3fn)
_FP8_DTYPES = (torch.float8_e4m3fn,)
_LSE_BASES = ("e", 2)
_INDPTR_DTYPES = (torch.int32, torch.int64)

# One plain format object per dtype: formats are immutable, and the eager path is host-bound.
_PLAIN = {dtype: Plain(dtype) for dtype in FLOAT_DTYPES}
#: (lse_base, requested backend) -> the number the eager launcher keys calls on (not for
#: the torch backend, which has no launch to plan).
_EAGER_CODES = {
    pair: code
    for code, pair in enumerate(itertools.product(_LSE_BASES, ("auto", "cuda", "triton")))
}


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
    if t.stride(-1) != 1 and t.shape[-1] > 1:
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


def _output_format(
    output: torch.Tensor, output_scale: object, output_name: str = "output"
) -> OutputFormat:
    """The format vLLM's arguments ask for: FP8 exactly when an ``output_scale`` is given.
    ``merge`` passes a format the ops' schemas do not carry as the format itself."""
    if isinstance(output_scale, OutputFormat):
        return output_scale
    fp8 = output.dtype in _FP8_DTYPES
    if output_scale is None:
        if fp8:
            raise ValueError(f"{output_name} is {output.dtype}: output_scale is required")
        return _PLAIN[output.dtype]
    _check_tensor("output_scale", output_scale)
    if not fp8:
        raise ValueError(
            f"output_scale was given but {output_name} is {output.dtype}; a scaled store "
            f"needs a float8_e4m3fn output"
        )
    return FP8Static(output_scale)


def _group_format(output, output_scale, block_scale, group_size, use_ue8m0) -> OutputFormat:
    """The per-token-group FP8 format of vLLM's ``output_block_scale`` and
    ``quant_group_size``; the scales' layout is read from the tensor (int32: UE8M0 packed;
    float32: row-major, column-major or TMA-aligned column-major, by its strides)."""
    if output_scale is not None:
        raise ValueError("output_scale must be None when output_block_scale is set")
    if block_scale is None or group_size is None:
        raise ValueError("output_block_scale and quant_group_size must be given together")
    _check_tensor("output_block_scale", block_scale)
    if block_scale.dtype == torch.int32 and use_ue8m0 is not True:
        raise ValueError("an int32 output_block_scale (packed UE8M0) needs use_ue8m0=True")
    tokens, groups = output.shape[0], FP8PerTokenGroup(group_size).groups(*output.shape[1:])
    layouts = ["row_major", "col_major", "col_major_tma"]
    layouts = ["ue8m0_packed"] if block_scale.dtype == torch.int32 else layouts
    fits = [
        layout for layout in layouts
        if strides_fit(block_scale, FP8PerTokenGroup(group_size, True, layout)
                       .scales_layout(tokens, groups)[1])
    ]  # fmt: skip
    fmt = FP8PerTokenGroup(group_size, use_ue8m0, (fits or layouts)[0], block_scale)
    fmt.check_scales(block_scale, output, "output_block_scale")
    return fmt


def _check_tokens_with_first(prefill_tokens_with_context: object, tokens: int) -> int:
    """``prefill_tokens_with_context`` checked: the number of tokens with a first partial."""
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
    return prefill_tokens_with_context


def _check_lse_base_and_backend(lse_base: object, backend: object) -> None:
    if lse_base not in _LSE_BASES:
        raise ValueError(f"lse_base must be 'e' or 2, got {lse_base!r}")
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(dispatch.BACKENDS)}, got {backend!r}")


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
    group: tuple | None = None,
) -> MergeCall:
    """Check every argument of vLLM's form and describe the call.

    ``real_tensors`` is False while tracing under torch.compile (fake tensors carry no
    memory, so the aliasing checks wait for the real call). ``group``: the arguments
    ``(output_block_scale, quant_group_size, use_ue8m0)`` of a per-token-group FP8 output.
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
    if group is None:
        output_format = _output_format(output, output_scale)
    else:
        output_format = _group_format(output, output_scale, *group)
    output_format.check(output)

    tokens_with_first = tokens
    if prefill_tokens_with_context is not None:
        tokens_with_first = _check_tokens_with_first(prefill_tokens_with_context, tokens)
    _check_lse_base_and_backend(lse_base, backend)

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


def _merge_attn_states_impl(
    args: tuple,
    lse_base: str | int,
    backend: str,
    group: tuple | None = None,
    eager_miss: object = None,
) -> None:
    """Validate on real tensors, select a backend, run. ``args`` are the op's tensor and
    size arguments in vLLM's order (output ... output_scale). Shared by the eager path
    and the custom op's implementation. ``eager_miss``: the eager launcher's key for this
    call, under which the plan of a kernel backend's launch is stored."""
    call = _build_call(*args, lse_base, backend, real_tensors=True, group=group)
    run = dispatch.select(backend, call.signature)
    run(call)
    _plan_eagerly(call, run, eager_miss)


def _plan_eagerly(call: MergeCall, run: Callable[[MergeCall], None], eager_miss: object) -> None:
    """After the Python path ran ``call`` with ``run``: store its plan under the eager
    launcher's key ``eager_miss`` where a kernel backend ran it; the first GPU call on a
    kernel backend builds the launcher."""
    first_gpu_call = EAGER_LAUNCHER.module is None and call.signature.device.type == "cuda"
    if isinstance(eager_miss, tuple) or first_gpu_call:
        kernels = next((b for b in (CUDA_BACKEND, TRITON_BACKEND) if run == b.run), None)
        if kernels is None:
            return  # the torch backend: no launch to plan
        if EAGER_LAUNCHER.module is not None:
            EAGER_LAUNCHER.remember(eager_miss, call, kernels.eager_plan)
        else:
            EAGER_LAUNCHER.load()


#: The eager implementations, never traced by torch.compile (calls reach them through a
#: graph break; ``fullgraph=True`` raises, naming them): the custom ops' schemas carry
#: neither the scales of dynamic FP8 formats nor amax yet, so such calls run eagerly.
#: (``torch._disable_dynamo`` imports torch._dynamo only when called.)
_merge_attn_states_eagerly = torch._disable_dynamo(_merge_attn_states_impl)


def _merge_pair(
    args: tuple,
    lse_base: str | int,
    backend: str,
    group: tuple | None = None,
    eager_miss: object = None,
):
    """The two-partial merge of vLLM's arguments ``args`` (a format object in the place
    of ``output_scale`` for formats the op's schema does not carry), eager or traced."""
    if torch.compiler.is_compiling():
        if group is not None or isinstance(args[7], OutputFormat):
            _merge_attn_states_eagerly(args, lse_base, backend, group)  # scales/amax: eagerly
            return
        # Checks at trace time (fake tensors: no aliasing checks), then the opaque op.
        _build_call(*args, lse_base, backend, real_tensors=False)
        torch.ops.attnmerge.merge_attn_states(*args, lse_base == 2, backend)
        return
    _merge_attn_states_impl(args, lse_base, backend, group, eager_miss)


def _eager_code(lse_base: object, backend: object) -> int | None:
    """The eager launcher's number for the LSE base and the backend the call resolves to
    (``ATTNMERGE_BACKEND`` read per call, as dispatch does); None: not for it."""
    if backend == "auto":
        backend = dispatch.env_backend() or "auto"
    try:
        return _EAGER_CODES.get((lse_base, backend))
    except TypeError:  # unhashable: the Python path says what is wrong
        return None


#: What :func:`_launch_planned` returns for a call it launched.
_LAUNCHED = object()


def _launch_planned(
    args: tuple, lse_base: object, backend: object, stacked: bool = False
) -> object:
    """Launch the merge of ``args`` (vLLM's arguments of a two-partial merge, or with
    ``stacked`` those of :func:`_merge_partials`) from the eager launcher's stored plan
    for this kind of call: ``_LAUNCHED`` if it did; else what the Python path passes on as
    ``eager_miss`` (the key to store this call's plan under, or anything else where the
    launcher is not for the call)."""
    launcher = EAGER_LAUNCHER.module
    if launcher is None or torch.compiler.is_compiling():
        return None
    code = _eager_code(lse_base, backend)
    if code is None:
        return None
    launch = launcher.merge_partials if stacked else launcher.merge_pair
    miss = launch(EAGER_LAUNCHER.plans, code, *args)
    return _LAUNCHED if miss is None else miss


def merge_attn_states(
    output: torch.Tensor,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    output_lse: torch.Tensor | None = None,
    prefill_tokens_with_context: int | None = None,
    output_scale: torch.Tensor | None = None,
    output_block_scale: torch.Tensor | None = None,
    quant_group_size: int | None = None,
    *,
    use_ue8m0: bool = False,
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
            rows and LSEs there are not read, and the output is the suffix row and the
            output LSE the suffix LSE, as they are (whatever that LSE holds: +inf and NaN
            included, as in vLLM). ``None`` means all ``T``.
        output_scale: 1-element float32 tensor on the output's device; required exactly
            when ``output`` is FP8. Stores ``e4m3fn(saturate(out * (1 / scale)))``,
            round-to-nearest-even, saturating at +-448, NaN kept.
        output_block_scale, quant_group_size: per-token-group FP8 output, the arguments
            of vLLM's pull request #40930: an FP8 ``output``, ``quant_group_size`` 64 or
            128, and the scales written into ``output_block_scale`` in any layout of
            :class:`attnmerge.FP8PerTokenGroup` (told apart by dtype and strides). Under
            ``torch.compile`` such a call runs eagerly (a graph break).
        use_ue8m0: with ``output_block_scale``, scales rounded up to powers of two (the
            argument of vLLM's ``per_token_group_quant_fp8``); needed for int32 scales.
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
            ``backend``, ``output_block_scale`` without ``quant_group_size``. Nothing is
            written when a check fails.
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
    group = None
    if output_block_scale is not None or quant_group_size is not None or use_ue8m0 is not False:
        group = (output_block_scale, quant_group_size, use_ue8m0)
    eager_miss = None
    if group is None:
        eager_miss = _launch_planned(args, lse_base, backend)
        if eager_miss is _LAUNCHED:
            return
    # The internal form merge() passes; checked past the launcher, which refuses it.
    if isinstance(output_scale, OutputFormat):
        raise TypeError(
            "output_scale must be a float32 tensor or None; pass an output format as "
            "attnmerge.merge(..., quant=...)"
        )
    _merge_pair(args, lse_base, backend, group, eager_miss)


def _check_indptr(indptr: object, device: torch.device) -> int:
    """Check ``indptr`` and return the token count it describes."""
    _check_tensor("indptr", indptr)
    if indptr.dtype not in _INDPTR_DTYPES:
        raise TypeError(f"indptr must be int32 or int64, got {indptr.dtype}")
    if indptr.dim() != 1 or indptr.numel() == 0:
        raise ValueError(
            f"indptr must be 1-D with T + 1 >= 1 elements, got shape {tuple(indptr.shape)}"
        )
    _check_device("indptr", indptr, device)
    return indptr.numel() - 1


def _check_lse_stack(name: str, t: object, shape: tuple, device: torch.device, hint: str) -> None:
    _check_tensor(name, t)
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} {hint}, got {tuple(t.shape)}")
    _check_device(name, t, device)


def _check_written_stack(
    name: str, t: torch.Tensor, stack_name: str, stack: torch.Tensor, packed: bool
) -> None:
    """As :func:`_check_written` for a tensor written by a stacked or packed merge: it may
    be the very view of a stacked partial (``stack[k]``), never start where packed rows do."""
    if t.numel() == 0:
        return
    if packed:
        _check_written(name, t, ())
        if t.data_ptr() == stack.data_ptr():
            raise ValueError(
                f"{name} aliases {stack_name}; packed partials cannot be merged in place"
            )
        return
    # where each partial starts, as the views stack[k] would
    start, step = stack.data_ptr(), stack.stride(0) * stack.itemsize
    offset = t.data_ptr() - start
    k = offset // step if step else 0
    if step and offset % step == 0 and 0 <= k < stack.shape[0]:
        _check_written(name, t, ((f"{stack_name}[{k}]", stack[k]),))
    else:
        _check_written(name, t, ((f"{stack_name}[0]", stack[0]),))


def _build_partials_call(
    out: object,
    out_lse: object,
    outputs: object,
    lses: object,
    indptr: object,
    prefill_tokens_with_context: object,
    output_scale: object,
    lse_base: object,
    backend: object,
    real_tensors: bool,
) -> MergeCall:
    """Check every argument of a stacked (``indptr`` None) or packed merge and describe
    the call; as :func:`_build_call` for the two-way form."""
    _check_tensor("outputs", outputs)
    device = outputs.device
    packed = indptr is not None
    if outputs.dim() != (3 if packed else 4):
        want = "[N, H, D] (packed rows)" if packed else "[K, T, H, D]"
        raise ValueError(f"outputs must be {want}, got shape {tuple(outputs.shape)}")
    if outputs.dtype not in _PARTIAL_DTYPES:
        raise TypeError(
            f"outputs must be one of {dtype_names(_PARTIAL_DTYPES)}, got {outputs.dtype}"
        )
    _check_last_dim("outputs", outputs)
    heads, head_size = outputs.shape[-2], outputs.shape[-1]
    if packed:
        tokens = _check_indptr(indptr, device)
        _check_lse_stack(
            "lses", lses, (heads, outputs.shape[0]), device, "[H, N] (for [N, H], pass lses.t())"
        )
    else:
        num_partials, tokens = outputs.shape[0], outputs.shape[1]
        if num_partials == 0:
            raise ValueError("outputs holds no partials (K = 0); at least one is needed")
        _check_lse_stack(
            "lses",
            lses,
            (num_partials, heads, tokens),
            device,
            "[K, H, T] (for FlashInfer's [T, K, H], pass s.permute(1, 2, 0))",
        )
    _check_tensor("out", out)
    if tuple(out.shape) != (tokens, heads, head_size):
        raise ValueError(
            f"out must have shape {(tokens, heads, head_size)} [T, H, D], got {tuple(out.shape)}"
        )
    if out.dtype not in _OUTPUT_DTYPES:
        raise TypeError(f"out must be one of {dtype_names(_OUTPUT_DTYPES)}, got {out.dtype}")
    _check_last_dim("out", out)
    _check_device("out", out, device)
    if out_lse is not None:
        _check_lse("out_lse", out_lse, heads, tokens, device)
    output_format = _output_format(out, output_scale, "out")
    output_format.check(out, "out")
    tokens_with_first = tokens
    if prefill_tokens_with_context is not None:
        if packed:
            raise ValueError("prefill_tokens_with_context cannot be combined with indptr")
        tokens_with_first = _check_tokens_with_first(prefill_tokens_with_context, tokens)
    _check_lse_base_and_backend(lse_base, backend)

    if real_tensors:
        _check_written_stack("out", out, "outputs", outputs, packed)
        if out_lse is not None:
            _check_written_stack("out_lse", out_lse, "lses", lses, packed)
    signature = CallSignature(
        device=device,
        partial_dtypes=(outputs.dtype,),
        head_size=head_size,
        output_format=output_format.key,
        write_lse=out_lse is not None,
        lse_base_2=lse_base == 2,
        layout=PartialLayout.PACKED if packed else PartialLayout.STACKED,
    )
    return MergeCall(
        output=out,
        output_lse=out_lse,
        partials=(outputs,),
        lses=(lses,),
        output_format=output_format,
        tokens_with_first=tokens_with_first,
        signature=signature,
        indptr=indptr,
    )


def _merge_partials_impl(
    args: tuple, lse_base: str | int, backend: str, eager_miss: object = None
) -> None:
    """As :func:`_merge_attn_states_impl`, for the stacked and packed forms: ``args`` are
    (out, out_lse, outputs, lses, indptr, prefill_tokens_with_context, output_scale)."""
    call = _build_partials_call(*args, lse_base, backend, real_tensors=True)
    run = dispatch.select(backend, call.signature)
    run(call)
    _plan_eagerly(call, run, eager_miss)


_merge_partials_eagerly = torch._disable_dynamo(_merge_partials_impl)  # as above


def _merge_partials(args: tuple, lse_base: str | int, backend: str) -> None:
    if torch.compiler.is_compiling():
        if isinstance(args[6], OutputFormat):
            _merge_partials_eagerly(args, lse_base, backend)  # scales/amax: eagerly
            return
        _build_partials_call(*args, lse_base, backend, real_tensors=False)
        torch.ops.attnmerge.merge_partials(*args, lse_base == 2, backend)
        return
    eager_miss = None
    if not isinstance(args[6], OutputFormat):  # (the launcher refuses it anyway)
        eager_miss = _launch_planned(args, lse_base, backend, stacked=True)
    if eager_miss is not _LAUNCHED:
        _merge_partials_impl(args, lse_base, backend, eager_miss)


def _evenly_spaced(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The tensors as one view with a leading partial axis, if they are views of one
    buffer with equal strides and dtypes at an even, non-negative spacing; else None."""
    first = tensors[0]
    if torch.compiler.is_compiling() or first.numel() == 0:
        return None  # (fake tensors have no memory)
    storage = first.untyped_storage().data_ptr()
    step = tensors[1].data_ptr() - first.data_ptr() if len(tensors) > 1 else 0
    for k, t in enumerate(tensors):
        if (
            t.dtype != first.dtype
            or t.stride() != first.stride()
            or t.untyped_storage().data_ptr() != storage
            or t.data_ptr() - first.data_ptr() != k * step
        ):
            return None
    if step < 0 or step % first.itemsize:
        return None
    return first.as_strided((len(tensors), *first.shape), (step // first.itemsize, *first.stride()))


def _stacked(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One ``[K, ...]`` tensor of the K tensors: a view where they are evenly spaced in
    one buffer, else a copy (in float32 where their dtypes differ)."""
    view = _evenly_spaced(tensors)
    if view is not None:
        return view
    dtypes = {t.dtype for t in tensors}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return torch.stack([t.to(dtype) for t in tensors])


class _MergeInputs(NamedTuple):
    """:func:`merge`'s partials, sorted out: two for the two-partial path (``pair``: prefix,
    its LSE, suffix, its LSE), or one stacked or packed tensor and its LSEs."""

    pair: tuple[torch.Tensor, ...] | None
    outputs: torch.Tensor | None
    lses: torch.Tensor | None
    tokens: int
    #: the partials' tensor whose last two sizes are H and D and whose dtype is the default
    first: torch.Tensor
    #: the LSE whose storage order a new output LSE takes
    first_lse: torch.Tensor


def _classify(outputs, lses, indptr, out, out_lse) -> _MergeInputs:
    """Check the form of ``merge``'s partials (the kernels' calls check the rest) and bring
    a sequence of other than two into one stacked tensor."""
    if indptr is not None or isinstance(outputs, torch.Tensor) or isinstance(lses, torch.Tensor):
        _check_tensor("outputs", outputs)
        _check_tensor("lses", lses)
        if indptr is not None:
            if outputs.dim() != 3:
                raise ValueError(
                    f"outputs must be [N, H, D] (packed rows), got {tuple(outputs.shape)}"
                )
            tokens = _check_indptr(indptr, outputs.device)
            return _MergeInputs(None, outputs, lses, tokens, outputs, lses)
        if outputs.dim() != 4 or outputs.shape[0] == 0:
            raise ValueError(
                f"outputs must be [K, T, H, D] with K >= 1, got {tuple(outputs.shape)}"
            )
        num_partials, tokens = outputs.shape[0], outputs.shape[1]
        first_lse = lses[0] if lses.dim() == 3 and lses.shape[0] == num_partials else lses
        pair = None
        if num_partials == 2:
            shape = (2, outputs.shape[2], tokens)
            _check_lse_stack("lses", lses, shape, outputs.device, "[K, H, T]")
            pair = (outputs[0], lses[0], outputs[1], lses[1])
        return _MergeInputs(pair, outputs, lses, tokens, outputs, first_lse)

    outputs, lses = tuple(outputs), tuple(lses)
    if len(outputs) != len(lses):
        raise ValueError(f"got {len(outputs)} outputs but {len(lses)} lses")
    if not outputs:
        raise ValueError("outputs holds no partials (K = 0); at least one is needed")
    first = _check_tensor("outputs[0]", outputs[0])
    first_lse = _check_tensor("lses[0]", lses[0])
    if first.dim() != 3:
        raise ValueError(
            f"outputs[0] must be 3-D [tokens, heads, head_size], got shape {tuple(first.shape)}"
        )
    tokens = first.shape[0]
    if len(outputs) == 2:
        return _MergeInputs((outputs[0], lses[0], outputs[1], lses[1]), None, None, tokens,
                            first, first_lse)  # fmt: skip
    for k in range(len(outputs)):
        _check_state(f"outputs[{k}]", outputs[k], first.shape, first.device)
        _check_lse(f"lses[{k}]", lses[k], first.shape[1], tokens, first.device)
    if not torch.compiler.is_compiling():  # (fake tensors have no memory to compare)
        # against the caller's tensors: the stacked ones may be a copy
        if isinstance(out, torch.Tensor):
            _check_written("out", out, tuple((f"outputs[{k}]", t) for k, t in enumerate(outputs)))
        if isinstance(out_lse, torch.Tensor):
            _check_written("out_lse", out_lse, tuple((f"lses[{k}]", t) for k, t in enumerate(lses)))
    return _MergeInputs(None, _stacked(outputs), _stacked(lses), tokens, first, first_lse)


class _EagerForm(NamedTuple):
    """A :func:`merge` call as the eager launcher takes it: the arguments of
    :func:`merge_attn_states`'s op, or with ``stacked`` those of :func:`_merge_partials`."""

    stacked: bool
    args: tuple


def _eager_form(outputs, lses, quant, out, out_lse, prefill, indptr) -> _EagerForm | None:
    """:func:`merge`'s arguments in the eager launcher's form, where the call takes the
    path that stores plans under that form (two partials in a sequence; a stacked tensor
    of other than two; packed rows) with a format the plans carry (none, or FP8Static
    without amax); else None."""
    if quant is None:
        scale = None
    elif type(quant) is FP8Static and quant.amax is None:
        scale = quant.scale
    else:
        return None
    if type(outputs) in (list, tuple):
        if indptr is None and len(outputs) == 2 and type(lses) in (list, tuple) and len(lses) == 2:
            return _EagerForm(False, (out, outputs[0], lses[0], outputs[1], lses[1], out_lse,
                                      prefill, scale))  # fmt: skip
        return None
    if isinstance(outputs, torch.Tensor) and (
        indptr is not None or (outputs.dim() == 4 and outputs.shape[0] != 2)
    ):
        return _EagerForm(True, (out, out_lse, outputs, lses, indptr, prefill, scale))
    return None


@dataclass(frozen=True, eq=False)
class MergeResult:
    """What :func:`merge` returns. Fields may be added (never removed) as formats grow.

    Attributes:
        output: ``[T, H, D]`` merged output, in ``out_dtype`` or the quantised dtype.
        lse: float32 ``[H, T]`` merged LSE (same base as the inputs), laid out like the
            first input LSE (a ``[T, H]``-stored input gives a ``[T, H]``-stored result);
            None unless ``return_lse=True`` or ``out_lse`` was given.
        scales: the scales of a dynamic FP8 format (:class:`attnmerge.FP8PerToken`,
            :class:`attnmerge.FP8PerTokenGroup`) in its layout: the format's ``scales``
            if given, else new ones; None for other formats.
    """

    output: torch.Tensor
    lse: torch.Tensor | None
    scales: torch.Tensor | None = None


def _output_dtype(quant: object, out_dtype: object, default: torch.dtype):
    """The output dtype and what ``merge``'s ``quant``/``out_dtype`` pass in the place of
    ``output_scale``: None (plain floats), the FP8 scale, or the format itself where the
    ops' schemas cannot carry it (dynamic FP8, amax)."""
    if quant is None:
        dtype = default if out_dtype is None else out_dtype
        if dtype in _FP8_DTYPES:
            raise ValueError("an FP8 output needs quant=attnmerge.FP8Static(scale), not out_dtype")
        scale = None
    elif isinstance(quant, OutputFormat):
        if out_dtype is not None and out_dtype != quant.dtype:
            raise ValueError(f"out_dtype={out_dtype} conflicts with quant dtype {quant.dtype}")
        dtype, scale = quant.dtype, quant
        if type(quant) in (Plain, FP8Static) and quant.amax is None:
            scale = quant.kernel_operand()  # the formats the ops' schemas carry
    else:
        raise TypeError(
            f"quant must be None or an attnmerge output format, got {type(quant).__name__}"
        )
    if not isinstance(dtype, torch.dtype) or dtype not in _OUTPUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {dtype_names(_OUTPUT_DTYPES)}, got {dtype}")
    return dtype, scale


def merge(
    outputs: Sequence[torch.Tensor] | torch.Tensor,
    lses: Sequence[torch.Tensor] | torch.Tensor,
    *,
    quant: QuantSpec | None = None,
    out_dtype: torch.dtype | None = None,
    lse_base: str | int = "e",
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
    return_lse: bool = False,
    indptr: torch.Tensor | None = None,
    prefill_tokens_with_context: int | None = None,
    backend: str = "auto",
) -> MergeResult:
    """Merge K >= 1 partial attention states.

    For each token ``t`` and head ``h``, with ``l_k`` the partials' LSEs (``+inf`` read as
    ``-inf``)::

        m     = max_k l_k
        w_k   = exp(l_k - m) / sum_j exp(l_j - m)
        out   = sum_k w_k * O_k[t, h]                    (float32, in order of k)
        lse   = m + log(sum_j exp(l_j - m))

    The partials come in one of three forms:

    * a sequence of K tensors ``[T, H, D]`` with a sequence of K float32 LSEs ``[H, T]``
      (any strides: an LSE stored ``[T, H]`` is passed as ``lse.t()``). K tensors that
      are not views of one buffer at an even spacing are first copied into one (a
      further pass over them); a stacked tensor avoids the copy;
    * one stacked tensor ``[K, T, H, D]`` with float32 LSEs ``[K, H, T]``, any strides
      (FlashInfer's ``v [T, K, H, D]``, ``s [T, K, H]``: ``v.transpose(0, 1)``,
      ``s.permute(1, 2, 0)``, no copies);
    * packed rows, a variable number per token (split-KV with per-request splits): with
      ``indptr`` (int32 or int64 ``[T + 1]`` on the partials' device), ``outputs`` is
      ``[N, H, D]`` and ``lses`` ``[H, N]`` (``[N, H]`` storage: ``lses.t()``); token
      ``t`` merges rows ``indptr[t] <= n < indptr[t + 1]`` in order, and a token without
      rows gets 0 and LSE ``-inf``. ``indptr`` is read on the device only; its values
      must be non-decreasing within ``[0, N]`` (GPU kernels clamp other values, so they
      never read outside ``outputs``, but the result is then undefined).

    Two partials in a sequence or stacked give results bit-identical to
    :func:`merge_attn_states`. The rules for empty partials, zero weights and NaN are those
    of the two-way merge for every K (docs/contract.md).

    Args:
        outputs, lses: the partial outputs (float32/float16/bfloat16, last dimension
            contiguous) and their float32 LSEs, in one of the forms above; natural
            logarithms unless ``lse_base=2``.
        quant: the output format: :class:`attnmerge.Plain`, :class:`attnmerge.FP8Static`,
            :class:`attnmerge.FP8PerToken` or :class:`attnmerge.FP8PerTokenGroup` (whose
            scales are returned in ``MergeResult.scales``), each optionally with an
            ``amax`` tensor to write ``max |O|`` into; None stores plain floats in
            ``out_dtype``. Under ``torch.compile``, dynamic FP8 formats and ``amax`` run
            eagerly (a graph break; ``fullgraph=True`` raises): the custom ops' schemas
            do not carry them yet.
        out_dtype: dtype of an unquantised output; defaults to ``out``'s dtype if given,
            else the partials'. Must be left None (or equal the format's dtype) when
            ``quant`` is given.
        lse_base: ``"e"`` or ``2``, for every LSE of the call.
        out: ``[T, H, D]`` tensor to write the output into instead of a new one. It may
            be the very view of a partial (``outputs[k]``), not of packed rows.
        out_lse: float32 ``[H, T]`` (any strides) to write the merged LSE into; may be the
            very view of a partial's LSE (``lses[k]``).
        return_lse: also return the merged LSE (in a new tensor unless ``out_lse``).
        indptr: the packed form's per-token row ranges, see above.
        prefill_tokens_with_context: ``P``; tokens ``t >= P`` take nothing from the first
            partial (its rows and LSEs there are not read); see :func:`merge_attn_states`.
            Not with ``indptr``.
        backend: as in :func:`merge_attn_states`.

    Returns:
        :class:`MergeResult` with ``output`` (``out`` if given), ``lse`` and ``scales``.

    Raises:
        TypeError, ValueError, BackendError: as :func:`merge_attn_states`, naming
        ``outputs``/``lses`` (``outputs[k]``/``lses[k]`` of a sequence; for two
        partials in a sequence, the prefix's and suffix's names of
        :func:`merge_attn_states`), ``indptr``, ``out``, ``out_lse``.
    """
    if out is not None and EAGER_LAUNCHER.module is not None and out_dtype is None:
        # A repeated call with its outputs given, as engines make them: straight to the
        # eager launcher, which launches only what the Python path below validated.
        form = _eager_form(outputs, lses, quant, out, out_lse, prefill_tokens_with_context, indptr)
        if (
            form is not None
            and (out_lse is not None or not return_lse)
            and _launch_planned(form.args, lse_base, backend, form.stacked) is _LAUNCHED
        ):
            return MergeResult(out, out_lse)
    inputs = _classify(outputs, lses, indptr, out, out_lse)
    first, tokens, first_lse = inputs.first, inputs.tokens, inputs.first_lse

    if out is not None:
        _check_tensor("out", out)
        if out.dim() != 3 or tuple(out.shape) != (tokens, *first.shape[-2:]):
            raise ValueError(
                f"out must have shape {(tokens, *first.shape[-2:])} [T, H, D], got "
                f"{tuple(out.shape)}"
            )
    dtype, scale = _output_dtype(quant, out_dtype, first.dtype if out is None else out.dtype)
    if out is not None and out.dtype != dtype:
        raise TypeError(f"out must be {dtype}, got {out.dtype}")
    heads, head_size = first.shape[-2], first.shape[-1]
    if out is None:
        out = torch.empty((tokens, heads, head_size), dtype=dtype, device=first.device)
    if out_lse is None and return_lse:
        # Keep the caller's LSE layout: [T, H]-stored inputs give a [T, H]-stored result.
        if first_lse.dim() == 2 and first_lse.stride(0) == 1 and first_lse.stride(1) != 1:
            out_lse = torch.empty(tokens, heads, dtype=torch.float32, device=first.device).t()
        else:
            out_lse = torch.empty(heads, tokens, dtype=torch.float32, device=first.device)
    if isinstance(scale, OutputFormat):
        scale = scale.with_scales(tokens, heads, head_size, out.device)
    if inputs.pair is not None:
        args = (out, *inputs.pair, out_lse, prefill_tokens_with_context, scale)
        eager_miss = None
        if not isinstance(scale, OutputFormat):  # (the launcher refuses it anyway)
            eager_miss = _launch_planned(args, lse_base, backend)
        if eager_miss is not _LAUNCHED:
            _merge_pair(args, lse_base, backend, eager_miss=eager_miss)
    else:
        args = (out, out_lse, inputs.outputs, inputs.lses, indptr)
        _merge_partials((*args, prefill_tokens_with_context, scale), lse_base, backend)
    return MergeResult(out, out_lse, getattr(scale, "scales", None))
