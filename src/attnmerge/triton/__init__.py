"""The ``triton`` backend: portable GPU kernels, also runnable on a CPU under
Triton's interpreter (``TRITON_INTERPRET=1`` set before attnmerge first uses it).

Nothing here imports Triton at package import time: :func:`load` does, on first use,
so ``import attnmerge`` works without Triton and never initialises CUDA.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from ..call import CallSignature, MergeCall, PartialLayout
from ..devices import capability

__all__ = ["BACKEND", "interpreting", "load"]

# Triton's fp8e4nv type (the FP8 stores) exists from sm_89 on.
_FP8_MIN_CAPABILITY = (8, 9)
# Epilogues written for token tiles (a program holds every head of a token): the formats
# with whole_token_tiles the kernels store (merge_kernel.token_tiles).
_TOKEN_TILE_EPILOGUES = frozenset({"fp8_token"})


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def load_partials() -> ModuleType:
    """Import the stacked/packed kernel module (after :func:`load`)."""
    load()
    from . import partials_kernel

    return partials_kernel


@functools.cache
def load() -> ModuleType:
    """Import the kernel module (raises ImportError without Triton).

    Under the interpreter, Triton's float conversions are first fixed to match the
    GPU's (see :mod:`.interpreter_fix`).
    """
    import triton  # noqa: F401  (fails here, with a clear ImportError, if missing)

    if interpreting():
        from . import interpreter_fix

        interpreter_fix.install()
    from . import merge_kernel

    return merge_kernel


class TritonBackend:
    """Triton kernels on CUDA devices, or on the CPU under the interpreter."""

    def unsupported(self, signature: CallSignature) -> str | None:
        device = signature.device
        reason = self._device_reason(device)
        if reason is not None:
            return reason
        if signature.layout is PartialLayout.SEPARATE and signature.num_partials != 2:
            return f"it merges 2 separate partials, or stacked ones, not {signature.num_partials}"
        kind = signature.output_format.kind
        if kind.whole_token_tiles and kind.triton_epilogue not in _TOKEN_TILE_EPILOGUES:
            return "its programs tile by rows, and this output format needs whole tokens"
        fp8 = signature.output_dtype == torch.float8_e4m3fn
        if fp8 and device.type == "cuda" and not interpreting():
            cap = capability(device)
            if cap < _FP8_MIN_CAPABILITY:
                return (
                    f"FP8 output needs compute capability >= 8.9 in Triton "
                    f"(this GPU has {cap[0]}.{cap[1]})"
                )
        return None

    @staticmethod
    @functools.cache
    def _device_reason(device: torch.device) -> str | None:
        try:
            load()
        except ImportError as e:
            if (e.name or "").partition(".")[0] == "numpy":
                return (
                    f"numpy is not importable ({e}), and Triton's CPU interpreter needs it; "
                    "install it with `pip install 'attnmerge[triton]'`"
                )
            return (
                f"triton is not importable ({e}); CUDA builds of torch on Linux x86_64 bring "
                "it, and attnmerge never installs it (with a CPU build of torch, "
                "`pip install triton` for its interpreter)"
            )
        if device.type == "cpu":
            if interpreting():
                return None
            return "the tensors are on the CPU and TRITON_INTERPRET=1 was not set"
        if device.type != "cuda":
            return f"Triton kernels run on CUDA devices only, not on {device.type!r}"
        return None

    def run(self, call: MergeCall) -> None:
        if call.signature.layout is PartialLayout.SEPARATE:
            load().run(call)
        else:
            load_partials().run(call)

    def eager_plan(self, key: bytes, call: MergeCall) -> tuple | None:
        """The eager launcher's plan for ``call``, which it keyed ``key``."""
        if call.signature.layout is PartialLayout.SEPARATE:
            return load().runner_plan(key, call)
        return load_partials().runner_plan(key, call)

    def clear_caches(self) -> None:
        self._device_reason.cache_clear()


BACKEND = TritonBackend()
