"""Tests of the benchmark code, run apart from the product's suite:

    python -m pytest benchmarks/tests

Without a GPU, Triton kernels run in Triton's CPU interpreter, which must be switched on
before any kernel is defined.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
