"""The ``triton`` backend: portable GPU kernels, also runnable on a CPU under
Triton's interpreter (``TRITON_INTERPRET=1`` set before attnmerge first uses it).

Nothing here imports Triton at package import time: :func:`load` does, on first use,
so ``import attnmerge`` works without Triton and never initialises CUDA.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
