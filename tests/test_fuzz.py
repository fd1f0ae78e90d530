"""Hypothesis fuzzing: random shapes, dtypes, strides, layouts, special LSE values and
aliasing, every (backend, device) against the reference through the shared tolerance.

ATTNMERGE_FUZZ_EXAMPLES sets the number of cases per (backend, device) (default 100;
the GPU script runs 10,000). They are split into shards, one test each, so that
``pytest -n`` spreads them over its workers. Every shard runs from a fixed seed, so CI
is reproducible. Shapes stay tiny on a CPU, where the Triton interpreter costs ~1 ms
per program.

On a GPU a hypothesis example is a batch of ``GPU_BATCH`` cases, built and checked on
the CPU against the CPU reference and run on the GPU with two copies per batch
(:func:`utils.run_batch_and_check`): per-case checks on the GPU synchronise dozens of
times, and with several test workers every synchronisation waits for the other
workers' CUDA contexts (a 10,000-case run of that kind did not finish 625 cases per
worker in 110 s). What remains is CPU work and, for Triton, compiling the kernel
specialisations the cases ask for: about one case in two needs a new one (dtypes, head
size, flags, and the 16-byte alignment class of every pointer and stride).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from utils import (
    FLOAT_DTYPES,
    FP8,
    FUZZ_EXAMPLES,
    LSE_CATEGORIES,
    ON_GPU,
    make_case,
    run_and_check,
    run_batch_and_check,
)

MAX_T, MAX_H = (300, 16) if ON_GPU else (12, 4)
HEAD_SIZES = (
    # fewer sizes on a GPU: each distinct size is another kernel compilation
    [1, 3, 8, 13, 40, 72, 80, 96, 128, 130, 192, 256, 512, 576]
    if ON_GPU
    else [1, 2, 3, 5, 8, 13, 16, 40, 72, 80, 96, 128, 192]
)

# On a GPU, 48 shards keep 12 workers busy until the end (shards differ in how many
# Triton specialisations they compile).
SHARDS = 48 if ON_GPU else 2
# Cases per hypothesis example on a GPU (one host-device round trip each).
GPU_BATCH = 25
CASES_PER_EXAMPLE = GPU_BATCH if ON_GPU else 1

FUZZ = settings(
    max_examples=math.ceil(FUZZ_EXAMPLES / (SHARDS * CASES_PER_EXAMPLE)),
    deadline=None,
    # On a GPU every shrinking step may compile a new kernel variant (seconds each):
    # report the first failing example as drawn instead.
    phases=[p for p in Phase if p != Phase.shrink or not ON_GPU],
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


@st.composite
def cases(draw, device: str):
    T = draw(st.integers(1, MAX_T))  # T = 0 has its own tests (test_contract.py)
    H = draw(st.integers(1, MAX_H))
    D = draw(st.sampled_from(HEAD_SIZES))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    suffix_dtype = draw(st.sampled_from(FLOAT_DTYPES)) if draw(st.booleans()) else dtype
    alias = draw(
        st.sampled_from([None, None, None, "prefix", "suffix", "lse_prefix", "lse_suffix"])
    )
    if alias in ("prefix", "suffix"):
        out_dtype, scale = None, None
    else:
        out_dtype = draw(st.sampled_from([*FLOAT_DTYPES, FP8, FP8]))
        # scales from 1e-3 (|O| > 0.45 saturates) to 10
        scale = (10 ** draw(st.floats(-3, 1, allow_nan=False))) if out_dtype == FP8 else None

    def strides():
        if not draw(st.booleans()):
            return None
        head_pad = draw(st.sampled_from([0, 1, 8, 64]))
        token_pad = draw(st.sampled_from([0, 3, 16]))
        return ((D + head_pad) * H + token_pad, D + head_pad)

    categories = draw(st.sets(st.sampled_from(LSE_CATEGORIES), min_size=1))
    return dict(
        T=T,
        H=H,
        D=D,
        dtype=dtype,
        suffix_dtype=suffix_dtype,
        out_dtype=out_dtype,
        scale=scale,
        device=device,
        lse_base=draw(st.sampled_from(["e", 2])),
        P=draw(st.none() | st.integers(0, T)),
        with_lse=draw(st.booleans()) or alias in ("lse_prefix", "lse_suffix"),
        prefix_strides=strides(),
        suffix_strides=strides(),
        out_strides=strides(),
        offsets=tuple(draw(st.sampled_from([0, 0, 1, 5])) for _ in range(3)),
        lse_layouts=tuple(draw(st.sampled_from(["ht", "th"])) for _ in range(3)),
        lse_pads=tuple(draw(st.sampled_from([0, 0, 2])) for _ in range(3)),
        # per-element LSE values drawn from these categories (finite normal, +-inf,
        # NaN, +-1e30, gaps of 1e4, exp-underflow gaps, large offsets)
        lse_pattern=tuple(sorted(categories)),
        garbage=draw(st.booleans()),
        nan_frac=draw(st.sampled_from([0.0, 0.0, 0.01])),
        alias=alias,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _progress_writer(name: str):
    """With ATTNMERGE_FUZZ_PROGRESS_DIR set, a function that records how many cases
    of this shard have passed and the seconds since it started (every 25 cases, and
    at the end), so a run stopped by a time limit still tells how many cases were
    checked and at what rate; else a no-op."""
    folder = os.environ.get("ATTNMERGE_FUZZ_PROGRESS_DIR")
    if not folder:
        return lambda done, final=False: None
    path = Path(folder) / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    def write(done: int, final: bool = False) -> None:
        if final or done % 25 == 0:
            path.write_text(f"{done} {time.monotonic() - start:.1f}\n")

    return write


@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize(
    ("backend", "device"),
    [
        pytest.param(b, d, id=f"{b}-{d}")
        for b, d in (
            [("torch", "cuda"), ("triton", "cuda"), ("cuda", "cuda")]
            if ON_GPU
            else [("torch", "cpu"), ("triton", "cpu")]
        )
    ],
)
def test_fuzz_against_reference(backend, device, shard):
    progress = _progress_writer(f"{backend}-{device}-{shard}")
    passed = 0

    @seed(20261128 + shard)
    @FUZZ
    @given(data=st.data())
    def check(data):
        nonlocal passed
        if device == "cpu":
            run_and_check(make_case(**data.draw(cases(device), label="case")), backend)
        else:  # built on the CPU, run on the device in one batch
            batch = data.draw(st.lists(cases("cpu"), min_size=GPU_BATCH, max_size=GPU_BATCH))
            run_batch_and_check([make_case(**p) for p in batch], backend, device)
        passed += CASES_PER_EXAMPLE
        progress(passed)

    check()
    progress(passed, final=True)


# The GPU fuzz's batch runner, exercised on the CPU so that CI covers its packing.


def _batch() -> list:
    shapes = [(3, 2, 8), (5, 1, 13), (2, 3, 40), (4, 2, 8), (1, 4, 3), (6, 1, 16)]
    aliases = [None, "prefix", "lse_suffix", "suffix", None, "lse_prefix"]
    return [
        make_case(
            T,
            H,
            D,
            dtype=torch.float16 if i % 2 else torch.float32,
            out_dtype=FP8 if aliases[i] is None and i % 3 == 0 else None,
            scale=0.05 if aliases[i] is None and i % 3 == 0 else None,
            prefix_strides=(H * (D + 8) + 3, D + 8) if i % 2 else None,
            offsets=(1, 5, i % 2),
            lse_layouts=("th", "ht", "th"),
            lse_pattern="mixed",
            alias=aliases[i],
            seed=i,
        )
        for i, (T, H, D) in enumerate(shapes)
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batch_runner_checks_every_case(backend):
    # Triton runs on a CPU only under its interpreter, which conftest turns on without a GPU.
    device = "cuda" if ON_GPU and backend == "triton" else "cpu"
    run_batch_and_check(_batch(), backend, device)


def test_batch_runner_fails_when_nothing_is_written(monkeypatch):
    import utils

    monkeypatch.setattr(utils.attnmerge, "merge_attn_states", lambda *a, **k: None)
    with pytest.raises(AssertionError, match="in a batch of 6"):
        run_batch_and_check(_batch(), "torch", "cpu")


def test_batch_runner_views_keep_alignment_and_aliasing():
    from utils import _DeviceCopy, as_int

    cases = _batch()
    copy = _DeviceCopy(cases)
    flat = copy.to(torch.device("cpu"))
    aliased = 0
    for case in cases:
        originals = [t for t in case.args() if isinstance(t, torch.Tensor)]
        views = [copy.view(t, flat) for t in originals]
        for v, t in zip(views, originals, strict=True):
            assert v.data_ptr() % 16 == t.data_ptr() % 16
            assert (v.shape, v.stride(), v.dtype) == (t.shape, t.stride(), t.dtype)
            assert torch.equal(as_int(v), as_int(t))
        for i, j in itertools.combinations(range(len(originals)), 2):
            if originals[i].data_ptr() == originals[j].data_ptr():  # still one memory
                assert views[i].data_ptr() == views[j].data_ptr()
                aliased += 1
    assert aliased == 4  # the batch's four aliasing cases
