"""Backend selection: which implementation serves a call, and why not the others.

Each backend states, per call, either nothing (it can serve it) or the reason it
cannot. ``backend="auto"`` takes the first backend in :data:`AUTO_ORDER` that can
serve the call and logs, once per distinct reason, why each earlier one was passed
over. A backend named explicitly (argument or ``ATTNMERGE_BACKEND``) that cannot
serve the call raises :class:`BackendError` with the reason. Decisions are cached
per call signature (device, dtypes, head size, FP8 or not), so the eager path pays a
dict look-up, not the checks.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

from . import reference
from . import triton as triton_backend

__all__ = ["AUTO_ORDER", "BACKENDS", "BackendError", "backend_status", "select"]

logger = logging.getLogger("attnmerge")

#: Implementations, fastest first; ``auto`` tries them in this order.
AUTO_ORDER = ("cuda", "triton", "torch")
BACKENDS = ("auto", *AUTO_ORDER)
ENV_BACKEND = "ATTNMERGE_BACKEND"

_FP8_MIN_CAPABILITY = (8, 9)


class BackendError(RuntimeError):
    """An explicitly requested backend cannot serve the call; the message says why."""


RunFn = Callable[..., None]


# ---------------------------------------------------------------------------
# Per-backend availability (per device) and support (per call signature).
# Each returns None when fine, else a one-line reason.


def _cuda_reason(device: torch.device, key: tuple) -> str | None:
    if device.type != "cuda":
        return f"the CUDA backend runs on NVIDIA GPUs only, not on {device.type!r}"
    reason = _cuda_device_reason(device)
    if reason is not None:
        return reason
    from .cuda import backend as cuda_backend
    from .cuda.driver import DriverError
    from .cuda.nvrtc import BuildError

    prefix_dtype, suffix_dtype, out_dtype, head_size, write_lse, lse_base_2, _ = key
    index = torch.cuda.current_device() if device.index is None else device.index
    try:  # once per call signature: decisions are cached
        cuda_backend.prepare(
            index, prefix_dtype, suffix_dtype, out_dtype, head_size, write_lse, lse_base_2
        )
    except (BuildError, DriverError) as e:
        return f"its kernel for this call could not be built or loaded: {e}"
    return None


@functools.cache
def _cuda_device_reason(device: torch.device) -> str | None:
    from .cuda import backend as cuda_backend

    reason = cuda_backend.unavailable_reason()
    if reason is not None:
        return reason
    cap = _capability(device)
    if cap < (8, 0):
        return f"the CUDA kernels need compute capability >= 8.0 (this GPU has {cap[0]}.{cap[1]})"
    return None


@functools.cache
def _triton_device_reason(device: torch.device) -> str | None:
    try:
        triton_backend.load()
    except ImportError as e:
        return f"triton is not importable ({e}); install it with `pip install attnmerge[triton]`"
    if device.type == "cpu":
        if triton_backend.interpreting():
            return None
        return "the tensors are on the CPU and TRITON_INTERPRET=1 was not set"
    if device.type != "cuda":
        return f"Triton kernels run on CUDA devices only, not on {device.type!r}"
    return None


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _triton_reason(device: torch.device, key: tuple) -> str | None:
    reason = _triton_device_reason(device)
    if reason is not None:
        return reason
    fp8 = key[-1]
    if fp8 and device.type == "cuda" and not triton_backend.interpreting():
        cap = _capability(device)
        if cap < _FP8_MIN_CAPABILITY:
            return (
                f"FP8 output needs compute capability >= 8.9 in Triton "
                f"(this GPU has {cap[0]}.{cap[1]})"
            )
    return None


def _torch_reason(device: torch.device, key: tuple) -> str | None:
    return None


# Runners are looked up once per call signature (select caches them), so the lazy
# imports below run only on the first call, not on the hot path.
def _cuda_runner() -> RunFn:
    from .cuda import backend as cuda_backend

    return cuda_backend.merge_two_states


def _triton_runner() -> RunFn:
    return triton_backend.load().merge_two_states


def _torch_runner() -> RunFn:
    return reference.run


_REASONS = {"cuda": _cuda_reason, "triton": _triton_reason, "torch": _torch_reason}
_RUNNERS: dict[str, Callable[[], RunFn]] = {
    "cuda": _cuda_runner,
    "triton": _triton_runner,
    "torch": _torch_runner,
}

# Backends that serve explicit requests but that ``auto`` does not pick yet, with why.


# ---------------------------------------------------------------------------
# Selection.

_selected: dict[tuple, RunFn] = {}
_logged: set[tuple[str, str]] = set()


def _requested(backend: str) -> str:
    if backend != "auto":
        return backend
    env = os.environ.get(ENV_BACKEND)
    if not env:
        return "auto"
    if env not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={env!r} is not one of {', '.join(BACKENDS)}")
    return env


def select(backend: str, device: torch.device, key: tuple) -> RunFn:
    """The run function for a call.

    Args:
        backend: one of :data:`BACKENDS` (already validated).
        device: device of the call's tensors.
        key: hashable call signature (partial and output dtypes, head size, output LSE
            written or not, LSE base 2 or not, FP8 output or not: see ``api._validate``).
    """
    name = _requested(backend)
    cache_key = (name, device, key)
    fn = _selected.get(cache_key)
    if fn is not None:
        return fn
    if name == "auto":
        for candidate in AUTO_ORDER:
            reason = _REASONS[candidate](device, key)
            if reason is None:
                fn = _RUNNERS[candidate]()
                break
            if (candidate, reason) not in _logged:
                _logged.add((candidate, reason))
                logger.info("attnmerge: backend %r skipped: %s", candidate, reason)
    else:
        reason = _REASONS[name](device, key)
        if reason is not None:
            raise BackendError(f"backend {name!r} cannot serve this call: {reason}")
        fn = _RUNNERS[name]()
    _selected[cache_key] = fn
    return fn


def backend_status(device: torch.device) -> dict[str, str | None]:
    """Per backend: None if it can run on ``device`` (bf16 in and out), else why not."""
    key = (torch.bfloat16, torch.bfloat16, torch.bfloat16, 128, False, False, False)
    return {name: _REASONS[name](device, key) for name in AUTO_ORDER}


def reset() -> None:
    """Forget cached decisions and logged reasons (for tests and after env changes)."""
    _selected.clear()
    _logged.clear()
    _triton_device_reason.cache_clear()
    _cuda_device_reason.cache_clear()
