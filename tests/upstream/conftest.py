"""The upstream tests run against attnmerge.compat with the backend ``auto`` picks on a
GPU, and with the ``torch`` backend on a CPU (the Triton interpreter would take minutes at
their sizes)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_backend_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("ATTNMERGE_BACKEND", "torch")
