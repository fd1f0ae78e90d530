"""attnmerge: exact merging of partial attention states, with fused output quantisation.

Public API:

* :func:`merge_attn_states`: vLLM-compatible out-variant (drop-in replacement).
* :func:`merge`: functional form returning a :class:`MergeResult`.
* :class:`FP8Static`: static per-tensor FP8 output (``quant=`` argument); :class:`Plain`
  the unquantised output formats; :class:`FP8PerToken` and :class:`FP8PerTokenGroup`
  dynamic FP8 output with per-token or per-token-group scales (``MergeResult.scales``).
* :class:`BackendError`: an explicitly requested backend cannot serve a call.
* :mod:`attnmerge.compat`: FlashInfer's and SGLang's merge functions (same arguments).

Importing attnmerge never initialises CUDA and does not import Triton.
"""

from . import compat  # noqa: F401  (attnmerge.compat)
from . import ops as _ops  # noqa: F401  (registers torch.ops.attnmerge.*)
from .api import MergeResult, merge, merge_attn_states
from .dispatch import BackendError
from .formats import FP8PerToken, FP8PerTokenGroup, FP8Static, OutputFormat, Plain, QuantSpec
from .version import __version__

__all__ = [
    "BackendError",
    "FP8PerToken",
    "FP8PerTokenGroup",
    "FP8Static",
    "MergeResult",
    "OutputFormat",
    "Plain",
    "QuantSpec",
    "__version__",
    "merge",
    "merge_attn_states",
]
