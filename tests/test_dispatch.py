"""Backend selection: "auto", the ATTNMERGE_BACKEND override, logging of fallbacks.

Which backend ran is observed by wrapping the backend objects of ``dispatch.REGISTRY``
(the table ``select`` picks from); every test starts and ends with
``dispatch.reset()`` (the ``clean_dispatch`` fixture) so cached decisions and logged
reasons do not leak between tests.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from utils import ON_GPU, make_case, run_and_check

import attnmerge
from attnmerge import dispatch
from attnmerge.call import CallSignature
from attnmerge.formats import Plain

DEVICE = "cuda" if ON_GPU else "cpu"


class _Spy:
    """A backend that records the calls it runs and the signatures it is asked about."""

    def __init__(self, name: str, backend, calls: list[str], asked: list[str]) -> None:
        self.name, self.backend, self.calls, self.asked = name, backend, calls, asked

    def unsupported(self, signature):
        self.asked.append(self.name)
        return self.backend.unsupported(signature)

    def run(self, call) -> None:
        self.calls.append(self.name)
        self.backend.run(call)


@pytest.fixture
def spied(monkeypatch, clean_dispatch):
    """Wrap every backend; returns (backends run, backends asked), in order."""
    calls: list[str] = []
    asked: list[str] = []
    for name, backend in list(dispatch.REGISTRY.items()):
        monkeypatch.setitem(dispatch.REGISTRY, name, _Spy(name, backend, calls, asked))
    dispatch.reset()
    return calls, asked


@pytest.fixture
def spies(spied):
    """The list of backend names called, in order."""
    return spied[0]


def _first_available(device) -> str:
    status = dispatch.backend_status(torch.device(device))
    return next(name for name in dispatch.AUTO_ORDER if status[name] is None)


def test_auto_picks_the_first_backend_that_can_serve(spies):
    case = make_case(9, 2, 32, dtype=torch.bfloat16, device=DEVICE, lse_pattern="mixed")
    run_and_check(case, "auto")
    expected = _first_available(DEVICE)
    assert spies == [expected]
    if ON_GPU:  # the GPU image has NVRTC and a driver: the CUDA C++ backend comes first
        assert expected == "cuda"
    elif importlib.util.find_spec("triton") is not None:
        # CPU: the interpreter serves Triton, which auto prefers to torch
        assert expected == "triton"


def test_auto_logs_each_skipped_backend_once(spies, caplog):
    caplog.set_level(logging.INFO, logger="attnmerge")
    for seed, dtype in enumerate([torch.bfloat16, torch.bfloat16, torch.float16, torch.float32]):
        case = make_case(3, 2, 16, dtype=dtype, device=DEVICE, seed=seed)
        run_and_check(case, "auto")
    skipped = [r for r in caplog.records if r.name == "attnmerge" and "skipped" in r.message]
    assert len(spies) == 4
    if ON_GPU:  # cuda serves every one of these calls: nothing is skipped
        assert skipped == []
        return
    assert len(skipped) == 1, [r.message for r in skipped]
    assert "'cuda'" in skipped[0].getMessage()
    assert "runs on NVIDIA GPUs only" in skipped[0].getMessage()
    assert skipped[0].levelno == logging.INFO


def test_reset_logs_again(spies, caplog):
    """A reason is logged once, and once more after ``dispatch.reset()``. CPU tensors,
    so that something is skipped on every machine (the cuda backend, at least)."""
    caplog.set_level(logging.INFO, logger="attnmerge")

    def skipped() -> list[str]:
        messages = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        caplog.clear()
        return messages

    make_case(2, 1, 8, device="cpu").run("auto")
    first = skipped()
    assert any("'cuda'" in m for m in first), first
    make_case(2, 1, 8, device="cpu").run("auto")
    assert skipped() == []
    dispatch.reset()
    make_case(2, 1, 8, device="cpu").run("auto")
    assert skipped() == first


@pytest.mark.parametrize("forced", ["torch", "triton"])
def test_env_forces_backend(spies, monkeypatch, forced):
    monkeypatch.setenv("ATTNMERGE_BACKEND", forced)
    dispatch.reset()
    case = make_case(5, 2, 24, device=DEVICE, lse_pattern="mixed")
    run_and_check(case, "auto")
    assert spies == [forced]


def test_env_auto_is_auto(spies, monkeypatch):
    monkeypatch.setenv("ATTNMERGE_BACKEND", "auto")
    dispatch.reset()
    make_case(3, 1, 8, device=DEVICE).run("auto")
    assert spies == [_first_available(DEVICE)]


@pytest.mark.parametrize(
    ("env", "explicit"),
    [("torch", "triton"), ("triton", "torch"), ("cuda", "torch"), ("nonsense", "torch")],
)
def test_explicit_backend_overrides_env(spies, monkeypatch, env, explicit):
    monkeypatch.setenv("ATTNMERGE_BACKEND", env)
    dispatch.reset()
    case = make_case(5, 2, 24, device=DEVICE)
    run_and_check(case, explicit)
    assert spies == [explicit]


@pytest.mark.skipif(ON_GPU, reason="on a GPU the cuda backend serves the call")
def test_env_naming_cuda_raises_backend_error(spies, monkeypatch):
    monkeypatch.setenv("ATTNMERGE_BACKEND", "cuda")
    dispatch.reset()
    case = make_case(2, 1, 8, device=DEVICE)
    with pytest.raises(attnmerge.BackendError, match="cuda"):
        case.run("auto")
    assert spies == []


def test_backend_status_reports_reasons(clean_dispatch):
    status = dispatch.backend_status(torch.device(DEVICE))
    assert set(status) == set(dispatch.AUTO_ORDER)
    assert status["torch"] is None
    if importlib.util.find_spec("triton") is not None:
        assert status["triton"] is None  # CPU: under the interpreter the conftest sets
    else:
        assert "triton" in status["triton"]
    if not ON_GPU:
        assert "NVIDIA GPUs only" in status["cuda"]


@pytest.mark.skipif(ON_GPU, reason="CPU-only: the Triton interpreter switch")
def test_cpu_without_interpreter_falls_back_to_torch(spies, monkeypatch, caplog):
    # On a CPU, Triton needs TRITON_INTERPRET=1. Without it, auto takes torch and says
    # why; naming triton explicitly raises with the reason.
    caplog.set_level(logging.INFO, logger="attnmerge")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    dispatch.reset()
    case = make_case(4, 2, 16, device="cpu")
    run_and_check(case, "auto")
    assert spies == ["torch"]
    assert any(
        "'triton'" in r.getMessage() and "TRITON_INTERPRET" in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(attnmerge.BackendError, match="TRITON_INTERPRET"):
        make_case(4, 2, 16, device="cpu").run("triton")


@pytest.mark.gpu
def test_gpu_auto_for_cpu_tensors_uses_torch(spies, monkeypatch):
    # A GPU machine runs Triton natively (no interpreter): CPU tensors go to torch.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dispatch.reset()
    case = make_case(4, 2, 16, device="cpu")
    run_and_check(case, "auto")
    assert spies == ["torch"]


def test_decision_is_cached_per_signature(spied):
    # After the first call, a second one with the same signature does not ask the
    # backends again (the reasons are not re-evaluated).
    calls, asked = spied
    make_case(3, 1, 8, device=DEVICE).run("auto")
    assert asked
    asked.clear()
    make_case(3, 1, 8, device=DEVICE, seed=1).run("auto")
    assert asked == []
    assert len(calls) == 2


def _signature(**changes) -> CallSignature:
    fields = {
        "device": torch.device(DEVICE),
        "partial_dtypes": (torch.float32, torch.float32),
        "head_size": 64,
        "output_format": Plain(torch.float32).key,
        "write_lse": False,
        "lse_base_2": False,
    }
    return CallSignature(**(fields | changes))


class _WholeTokenFormat(Plain):
    """A format whose store needs every head of a token in one program."""

    whole_token_tiles = True


def test_backends_say_why_they_cannot_serve_a_signature(clean_dispatch):
    # The kernels merge two separate partials (or stacked ones) and tile by rows; the
    # reference serves anything.
    three = _signature(partial_dtypes=(torch.float32,) * 3)
    whole = _signature(output_format=_WholeTokenFormat(torch.float32).key)
    assert dispatch.REGISTRY["torch"].unsupported(three) is None
    assert dispatch.REGISTRY["torch"].unsupported(whole) is None
    for name in ("cuda", "triton"):
        if dispatch.REGISTRY[name].unsupported(_signature()) is not None:
            continue  # not available here at all (cuda on a CPU)
        assert "2 separate partials" in dispatch.REGISTRY[name].unsupported(three)
        assert "whole tokens" in dispatch.REGISTRY[name].unsupported(whole)
    with pytest.raises(attnmerge.BackendError, match="whole tokens"):
        dispatch.select("triton", whole)
    assert dispatch.select("auto", whole) == dispatch.REGISTRY["torch"].run
