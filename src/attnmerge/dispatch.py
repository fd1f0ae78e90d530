"""Backend selection: which implementation serves a call, and why not the others.

Every backend is an object with two methods (:class:`Backend`): ``unsupported``, which
returns None when it can serve a call signature and otherwise the reason in one line,
and ``run``, which executes a :class:`~attnmerge.call.MergeCall`; before a kernel
backend is asked, the call's output format says whether any kernel stores it yet
(``OutputFormat.kernel_gap``). ``backend="auto"``
takes the first backend in :data:`AUTO_ORDER` that can serve the call and logs, once per
distinct reason, why each earlier one was passed over. A backend named explicitly
(argument or ``ATTNMERGE_BACKEND``) that cannot serve the call raises
:class:`BackendError` with the reason. Decisions are cached per (request, signature),
so the eager path pays one dict look-up, not the checks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

import torch

from . import cuda, reference
from . import triton as triton_package
from .call import CallSignature, MergeCall
from .formats import Plain

__all__ = ["AUTO_ORDER", "BACKENDS", "Backend", "BackendError", "backend_status", "select"]

logger = logging.getLogger("attnmerge")

#: Implementations, fastest first; ``auto`` tries them in this order.
AUTO_ORDER = ("cuda", "triton", "torch")
BACKENDS = ("auto", *AUTO_ORDER)
ENV_BACKEND = "ATTNMERGE_BACKEND"


class BackendError(RuntimeError):
    """An explicitly requested backend cannot serve the call; the message says why."""


class Backend(Protocol):
    def unsupported(self, signature: CallSignature) -> str | None:
        """None if this backend can serve calls of ``signature``, else why not."""

    def run(self, call: MergeCall) -> None:
        """Execute a validated call (on the current stream, for GPU backends)."""


#: The backend objects by name.
REGISTRY: dict[str, Backend] = {
    "cuda": cuda.BACKEND,
    "triton": triton_package.BACKEND,
    "torch": reference.BACKEND,
}

RunFn = Callable[[MergeCall], None]
_selected: dict[tuple[str, CallSignature], RunFn] = {}
_logged: set[tuple[str, str]] = set()


# os.environ's own mapping of encoded names, where it has one: a plain dict look-up per
# call instead of os.environ.get's encoding (most of a microsecond).
_ENVIRON = getattr(os.environ, "_data", None)
_ENVIRON_KEY = os.environ.encodekey(ENV_BACKEND) if _ENVIRON is not None else None


def env_backend() -> str | None:
    """``$ATTNMERGE_BACKEND``, read now (it may change between calls)."""
    if _ENVIRON is None:
        return os.environ.get(ENV_BACKEND)
    value = _ENVIRON.get(_ENVIRON_KEY)
    return None if value is None else os.environ.decodevalue(value)


def _requested(backend: str) -> str:
    if backend != "auto":
        return backend
    env = env_backend()
    if not env:
        return "auto"
    if env not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={env!r} is not one of {', '.join(BACKENDS)}")
    return env


def _unsupported(name: str, signature: CallSignature) -> str | None:
    """Why backend ``name`` cannot serve ``signature``: first the output format's answer
    for the kernels (a format or its amax without a kernel epilogue yet), then the
    backend's own."""
    backend = REGISTRY[name]
    if not getattr(backend, "stores_every_format", False):
        key = signature.output_format
        reason = key.kind.kernel_gap(key, signature.head_size, name)
        if reason is not None:
            return reason
        if getattr(key.kind, f"{name}_epilogue", "") is None:
            return f"its kernels have no {key.kind.__name__} epilogue yet"
    return backend.unsupported(signature)


def select(backend: str, signature: CallSignature) -> RunFn:
    """The run function for calls of ``signature``, with ``backend`` one of
    :data:`BACKENDS` (already validated)."""
    name = _requested(backend)
    cache_key = (name, signature)
    fn = _selected.get(cache_key)
    if fn is not None:
        return fn
    if name == "auto":
        for candidate in AUTO_ORDER:
            reason = _unsupported(candidate, signature)
            if reason is None:
                fn = REGISTRY[candidate].run
                break
            if (candidate, reason) not in _logged:
                _logged.add((candidate, reason))
                logger.info("attnmerge: backend %r skipped: %s", candidate, reason)
    else:
        reason = _unsupported(name, signature)
        if reason is not None:
            raise BackendError(f"backend {name!r} cannot serve this call: {reason}")
        fn = REGISTRY[name].run
    _selected[cache_key] = fn
    return fn


def backend_status(device: torch.device) -> dict[str, str | None]:
    """Per backend: None if it can run on ``device`` (bf16 in and out), else why not."""
    signature = CallSignature(
        device=device,
        partial_dtypes=(torch.bfloat16, torch.bfloat16),
        head_size=128,
        output_format=Plain(torch.bfloat16).key,
        write_lse=False,
        lse_base_2=False,
    )
    return {name: REGISTRY[name].unsupported(signature) for name in AUTO_ORDER}


def reset() -> None:
    """Forget cached decisions and logged reasons (for tests and after env changes)."""
    _selected.clear()
    _logged.clear()
    for backend in REGISTRY.values():
        clear = getattr(backend, "clear_caches", None)
        if clear is not None:
            clear()
