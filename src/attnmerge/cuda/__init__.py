"""The ``cuda`` backend: CUDA C++ kernels built on first use with NVRTC, launched through
the driver API (:mod:`.backend`). Nothing here loads a CUDA library at import time."""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from ..call import CallSignature, MergeCall, PartialLayout
from ..devices import capability

__all__ = ["BACKEND"]


@functools.cache
def _launcher() -> ModuleType:
    from . import backend

    return backend


class CudaBackend:
    """NVIDIA GPUs of compute capability 8.0 and later."""

    def unsupported(self, signature: CallSignature) -> str | None:
        device = signature.device
        if device.type != "cuda":
            return f"the CUDA backend runs on NVIDIA GPUs only, not on {device.type!r}"
        reason = self._device_reason(device)
        if reason is not None:
            return reason
        if signature.layout is PartialLayout.SEPARATE and signature.num_partials != 2:
            return f"it merges 2 separate partials, or stacked ones, not {signature.num_partials}"
        kind = signature.output_format.kind
        if kind.whole_token_tiles:
            from .backend import TOKEN_TILE_EPILOGUES

            if kind.cuda_epilogue not in TOKEN_TILE_EPILOGUES:
                return "its blocks tile by rows, and this output format needs whole tokens"
        from .driver import DriverError
        from .nvrtc import BuildError

        index = torch.cuda.current_device() if device.index is None else device.index
        try:  # once per call signature: dispatch caches its decisions
            _launcher().prepare(index, signature)
        except (BuildError, DriverError) as e:
            return f"its kernel for this call could not be built or loaded: {e}"
        return None

    @staticmethod
    @functools.cache
    def _device_reason(device: torch.device) -> str | None:
        reason = _launcher().unavailable_reason()
        if reason is not None:
            return reason
        cap = capability(device)
        if cap < (8, 0):
            return (
                f"the CUDA kernels need compute capability >= 8.0 (this GPU has {cap[0]}.{cap[1]})"
            )
        return None

    def run(self, call: MergeCall) -> None:
        _launcher().run(call)

    def eager_plan(self, key: bytes, call: MergeCall) -> bytes | None:
        """The eager launcher's plan for ``call``, which it keyed ``key``; none for a format
        with amax, whose output the launch path zeroes first (backend.run) and the eager
        launcher does not, and none for a token tile (a per-token scale, or groups that
        span heads unevenly), whose launch has a block a token and may hold a scale bound's
        address the plan would not patch."""
        from .backend import whole_tokens
        from .eager import cuda_plan

        if getattr(call.output_format, "amax", None) is not None:
            return None
        if whole_tokens(call.output_format.key, call.output.shape[-1]):
            return None
        return cuda_plan(key, call)

    def clear_caches(self) -> None:
        from .eager import LAUNCHER

        self._device_reason.cache_clear()
        LAUNCHER.plans.clear()  # plans name loaded kernels and decisions just forgotten


BACKEND = CudaBackend()
