"""Degraded environments: no Triton, no NVRTC, a failing CUDA build.

attnmerge must import and merge in each of them: ``auto`` falls back with a logged
reason, an explicitly named backend raises with a clear message, nothing crashes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from utils import ON_GPU, as_int, make_case, run_and_check

import attnmerge
from attnmerge import dispatch
from attnmerge.cuda import backend as cuda_backend
from attnmerge.cuda import cache, nvrtc
from attnmerge.formats import Plain


def _config(dtype, fmt, vec, write_lse=False, lse_base_2=False):
    return cuda_backend.config_for((dtype, dtype), fmt.key, 128, vec, write_lse, lse_base_2)


SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": SRC, **env}
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_without_triton_auto_falls_back_and_explicit_raises():
    proc = _run_python(
        """
        import logging, sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        import torch, attnmerge
        T, H, D = 3, 2, 8
        o = [torch.randn(T, H, D) for _ in range(2)]
        l = [torch.randn(H, T) for _ in range(2)]
        res = attnmerge.merge(o, l)  # auto: torch
        ref = attnmerge.merge(o, l, backend="torch")
        assert torch.equal(res.output, ref.output)
        try:
            attnmerge.merge(o, l, backend="triton")
        except attnmerge.BackendError as e:
            print("explicit:", e)
        """,
        TRITON_INTERPRET="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "backend 'triton' skipped: triton is not importable" in proc.stdout
    assert "explicit: backend 'triton' cannot serve this call: triton is not importable" in (
        proc.stdout
    )


def test_without_nvrtc_the_cuda_backend_says_why(tmp_path):
    proc = _run_python(
        """
        import sys
        from attnmerge import cli
        from attnmerge.cuda import nvrtc
        print("reason:", nvrtc.unavailable_reason())
        sys.exit(cli.main(["build", "--arch", "sm_90a"]))
        """,
        ATTNMERGE_NVRTC_LIBRARY=str(tmp_path / "libnvrtc.so.missing"),
        ATTNMERGE_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert proc.returncode == 1
    assert "reason:" in proc.stdout and "libnvrtc.so.missing" in proc.stdout
    assert "cannot compile" in proc.stderr


def test_failing_build_leaves_no_cache_entry(monkeypatch, tmp_path):
    if nvrtc.unavailable_reason() is not None:
        pytest.skip(nvrtc.unavailable_reason())
    monkeypatch.setenv("ATTNMERGE_CACHE_DIR", str(tmp_path))

    def broken(*args, **kwargs):
        raise nvrtc.BuildError("simulated compiler failure")

    monkeypatch.setattr(nvrtc, "compile_cubin", broken)
    with pytest.raises(nvrtc.BuildError, match="simulated"):
        cuda_backend.build_kernel(_config(torch.bfloat16, Plain(torch.bfloat16), 8), "sm_90a")
    assert cache.entries() == []


def test_builds_forbidden_raise_before_compiling(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNMERGE_NO_BUILD", "1")
    monkeypatch.setattr(nvrtc, "version", lambda: (13, 0))
    monkeypatch.setattr(nvrtc, "compile_cubin", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(nvrtc.BuildError, match="attnmerge build"):
        cuda_backend.build_kernel(
            _config(torch.float32, Plain(torch.float32), 4, True, True), "sm_90a"
        )


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_failing_cuda_build_auto_falls_back_explicit_raises(monkeypatch, tmp_path, caplog):
    def broken(*args, **kwargs):
        raise nvrtc.BuildError("boom")

    monkeypatch.setenv("ATTNMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(nvrtc, "compile_cubin", broken)
    cuda_backend.clear_caches()
    dispatch.reset()
    try:
        case = make_case(4, 3, 96, dtype=torch.float16, device="cuda")
        before = as_int(case.output).clone()
        with pytest.raises(attnmerge.BackendError, match="boom"):
            case.run("cuda")
        assert torch.equal(as_int(case.output), before)  # nothing was written
        caplog.set_level("INFO", logger="attnmerge")
        run_and_check(make_case(4, 3, 96, dtype=torch.float16, device="cuda"), "auto")
        assert any(
            "'cuda' skipped" in r.getMessage() and "boom" in r.getMessage() for r in caplog.records
        )
    finally:
        cuda_backend.clear_caches()
        dispatch.reset()
