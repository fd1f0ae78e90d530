"""Facts about devices that more than one backend asks for, cached per device."""

from __future__ import annotations

import functools

import torch

__all__ = ["capability"]


@functools.cache
def capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA device (initialises CUDA)."""
    return torch.cuda.get_device_capability(device)
