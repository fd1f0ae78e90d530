"""What the upstream tests in this directory need besides the functions under test.

This module is ours, not upstream code (README.md lists what each test takes from it):

* ``DEVICE``: ``"cuda"`` where a GPU is present, else ``"cpu"`` (the tests name ``"cuda"``
  or ``"cuda:0"``);
* ``device_api``: ``torch.cuda`` on a GPU; on a CPU a stand-in with the calls the tests
  make (``is_available``, ``get_device_name``, ``synchronize``, ``Event`` timing with
  ``time.perf_counter``);
* ``FULL_GRID``: the upstream parameter grids, on a GPU or with
  ``ATTNMERGE_UPSTREAM_FULL_GRID=1``; otherwise smaller grids, for CPU test times;
* ``flashinfer``: the names the FlashInfer tests use. ``merge_state``,
  ``merge_state_in_place`` and ``merge_states`` are ``attnmerge.compat``'s (under test);
  ``triton.cascade`` (FlashInfer's Triton implementation, the tests' second opinion) is
  replaced by the plain torch equivalents below;
* ``skip_on_gpu_arch_error``: FlashInfer's test decorator skips a test when a FlashInfer
  kernel raises its ``GPUArchitectureError``; attnmerge has no such error, so it is the
  identity.
"""

from __future__ import annotations

import itertools
import os
import time
import types

import torch

import attnmerge.compat

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
FULL_GRID = ON_GPU or os.environ.get("ATTNMERGE_UPSTREAM_FULL_GRID") == "1"


class _CpuEvent:
    """``torch.cuda.Event(enable_timing=True)`` on the host clock."""

    def __init__(self, enable_timing: bool = False) -> None:
        self._t = 0.0

    def record(self, stream: object = None) -> None:
        self._t = time.perf_counter()

    def elapsed_time(self, end: _CpuEvent) -> float:
        return (end._t - self._t) * 1e3  # milliseconds, as torch.cuda.Event


device_api = (
    torch.cuda
    if ON_GPU
    else types.SimpleNamespace(
        is_available=lambda: True,
        get_device_name=lambda: "CPU",
        synchronize=lambda: None,
        Event=_CpuEvent,
    )
)


def skip_on_gpu_arch_error(func):
    return func


# Torch equivalents of flashinfer.triton.cascade (base-2 LSEs, [seq_len, ...] layouts).


def _merge(v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge v [T, K, H, D] with base-2 LSEs s [T, K, H] over K, in float32."""
    s = s.float()
    m = s.amax(dim=1, keepdim=True)
    w = torch.exp2(s - m)
    d = w.sum(dim=1)
    out = (w.unsqueeze(-1) * v.float()).sum(dim=1) / d.unsqueeze(-1)
    return out.to(v.dtype), m.squeeze(1) + torch.log2(d)


def _merge_state(v_a, s_a, v_b, s_b):
    return _merge(torch.stack([v_a, v_b], dim=1), torch.stack([s_a, s_b], dim=1))


def _merge_state_in_place(v, s, v_other, s_other, mask=None):
    out, lse = _merge_state(v, s, v_other, s_other)
    if mask is not None:
        out = torch.where(mask[:, None, None], out, v)
        lse = torch.where(mask[:, None], lse, s)
    v.copy_(out)
    s.copy_(lse)


def _variable_length_merge_states(v, s, indptr):
    pairs = itertools.pairwise(indptr.tolist())
    parts = [_merge(v[a:b].unsqueeze(0), s[a:b].unsqueeze(0)) for a, b in pairs]
    return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])


flashinfer = types.SimpleNamespace(
    merge_state=attnmerge.compat.merge_state,
    merge_state_in_place=attnmerge.compat.merge_state_in_place,
    merge_states=attnmerge.compat.merge_states,
    triton=types.SimpleNamespace(
        cascade=types.SimpleNamespace(
            merge_state=_merge_state,
            merge_state_in_place=_merge_state_in_place,
            merge_states=_merge,
            variable_length_merge_states=_variable_length_merge_states,
        )
    ),
)
