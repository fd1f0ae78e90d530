"""Hypothesis fuzzing: random shapes, dtypes, strides, layouts, special LSE values and
aliasing, every (backend, device) against the reference through the shared tolerance.

ATTNMERGE_FUZZ_EXAMPLES sets the number of examples per (backend, device) (default 100;
the GPU script runs thousands). They are split into shards, one test each, so that
``pytest -n`` spreads them over its workers (on a GPU most of the time goes to
compiling the kernel variants the examples ask for). Every shard runs from a fixed
seed, so CI is reproducible. Shapes stay tiny on a CPU, where the Triton interpreter
costs ~1 ms per program.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from utils import FLOAT_DTYPES, FP8, FUZZ_EXAMPLES, LSE_CATEGORIES, ON_GPU, make_case, run_and_check

from attnmerge.cuda import backend as cuda_backend

MAX_T, MAX_H = (300, 16) if ON_GPU else (12, 4)
HEAD_SIZES = (
    # fewer sizes on a GPU: each distinct size is another kernel compilation
    [1, 3, 8, 13, 40, 72, 80, 96, 128, 130, 192, 256, 512, 576]
    if ON_GPU
    else [1, 2, 3, 5, 8, 13, 16, 40, 72, 80, 96, 128, 192]
)

SHARDS = 16 if ON_GPU else 2
# The CUDA kernel's rows per thread team, by shard: every variant the backend picks
# (by grid size, see attnmerge.cuda.backend.rows_per_team) meets every kind of case.
CUDA_ROWS = (cuda_backend.ROWS_SMALL, cuda_backend.ROWS_MEDIUM, cuda_backend.ROWS_LARGE)

FUZZ = settings(
    max_examples=math.ceil(FUZZ_EXAMPLES / SHARDS),
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
    """With ATTNMERGE_FUZZ_PROGRESS_DIR set, a function that records how many examples
    of this shard have passed and the seconds since it started (every 25 examples, and
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
def test_fuzz_against_reference(backend, device, shard, monkeypatch):
    if backend == "cuda":
        rows = CUDA_ROWS[shard % len(CUDA_ROWS)]
        monkeypatch.setattr(cuda_backend, "rows_per_team", lambda num_rows: rows)

    progress = _progress_writer(f"{backend}-{device}-{shard}")
    passed = 0

    @seed(20261128 + shard)
    @FUZZ
    @given(data=st.data())
    def check(data):
        nonlocal passed
        params = data.draw(cases(device), label="case")
        case = make_case(**params)
        run_and_check(case, backend)
        passed += 1
        progress(passed)

    check()
    progress(passed, final=True)
