"""Test configuration.

Without a GPU, the Triton kernel runs under Triton's CPU interpreter: TRITON_INTERPRET=1
must be set before any Triton kernel is defined. attnmerge imports its kernel module
lazily (on the first Triton call), so setting it here, before the test modules import
anything, is early enough.
"""

from __future__ import annotations

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
from utils import BACKEND_DEVICES

import attnmerge.dispatch


def pytest_configure(config: pytest.Config) -> None:
    # The interpreter evaluates kernels with numpy, which warns on exp/log/division of
    # the special values the tests feed on purpose (inf - inf, log(0), 0 / 0).
    for message in ("divide by zero encountered", "invalid value encountered"):
        config.addinivalue_line(
            "filterwarnings", f"ignore:{message}:RuntimeWarning:triton\\.runtime\\.interpreter"
        )


def _backend_of(item: pytest.Item) -> str | None:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "backend" in params:
        return params["backend"]
    if "backend_device" in params:
        return params["backend_device"][0]
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_triton = pytest.mark.skip(reason="triton is not installed (CUDA builds of torch bring it)")
    has_gpu = torch.cuda.is_available()
    has_triton = importlib.util.find_spec("triton") is not None
    for item in items:
        if not has_gpu and item.get_closest_marker("gpu") is not None:
            item.add_marker(no_gpu)
        if not has_triton and _backend_of(item) == "triton":
            item.add_marker(no_triton)


@pytest.fixture(params=BACKEND_DEVICES, ids=lambda bd: f"{bd[0]}-{bd[1]}")
def backend_device(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(backend, device): on a CPU machine torch/cpu and triton/cpu (interpreter); with
    a GPU torch/cuda, triton/cuda and torch/cpu."""
    return request.param


@pytest.fixture
def clean_dispatch(monkeypatch: pytest.MonkeyPatch):
    """Forget attnmerge's cached backend decisions before and after the test, and run
    without ATTNMERGE_BACKEND unless the test sets it."""
    monkeypatch.delenv(attnmerge.dispatch.ENV_BACKEND, raising=False)
    attnmerge.dispatch.reset()
    yield
    monkeypatch.undo()
    attnmerge.dispatch.reset()
