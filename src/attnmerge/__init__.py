"""attnmerge: exact merging of partial attention states, with fused output quantisation.

Public API:

* :func:`merge_attn_states`: vLLM-compatible out-variant (drop-in replacement).
* :func:`merge`: functional form returning a :class:`MergeResult`.
* :class:`FP8Static`: static per-tensor FP8 output spec (``quant=`` argument).
* :class:`BackendError`: an explicitly requested backend cannot serve a call.

Importing attnmerge never initialises CUDA and does not import Triton.
"""

from . import ops as _ops  # noqa: F401  (registers torch.ops.attnmerge.*)
from .api import MergeResult, merge, merge_attn_states
from .dispatch import BackendError
from .quant import FP8Static, QuantSpec

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "FP8Static",
    "MergeResult",
    "QuantSpec",
    "__version__",
    "merge",
    "merge_attn_states",
]
