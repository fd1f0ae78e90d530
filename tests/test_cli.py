"""The command line: ``attnmerge info``, ``demo``, ``build``, the command listing, the
progress of long steps, and ``scripts/dev.sh``'s answers that come before any setup.

The demo runs at small sizes (8 tokens x 4 heads: two Triton programs per call, so
the Triton interpreter stays cheap on a CPU). Corruption tests wrap the public merge
to damage its result in one way each and check that the demo's own check fails.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import attnmerge
from attnmerge import api, cli, demo, dispatch
from attnmerge.progress import Progress

SMALL = ["--requests", "2", "--query-tokens", "4", "--prefix-len", "64", "--heads", "4"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().out


def _table_rows(out: str) -> dict[tuple[str, str], str]:
    """``(backend, output) -> check column`` of the demo's result table."""
    rows = {}
    for line in out.splitlines():
        fields = re.split(r"\s{2,}", line.strip())  # columns are 2+ spaces apart
        if len(fields) >= 7 and fields[0] in demo.BACKENDS:
            rows[fields[0], fields[1]] = fields[-1]
    return rows


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(["info"], capsys)
    assert code == 0
    assert f"attnmerge  {attnmerge.__version__}" in out
    assert re.search(r"^torch +\S+ \((CPU build|CUDA \S+|ROCm \S+)\)$", out, re.M)
    assert re.search(r"^triton +\S", out, re.M)
    # Every device lists every backend, available or with its reason.
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for device in devices:
        assert re.search(rf"^  {re.escape(device)}$", out, re.M)
    for name in dispatch.AUTO_ORDER:
        lines = re.findall(rf"^    {name} +(available|not available: .+)$", out, re.M)
        assert len(lines) == len(devices)
    assert re.search(r"^    torch +available$", out, re.M)
    if not torch.cuda.is_available():
        assert "no CUDA device" in out
    # Which NVRTC, and why, on one line; the driver's CUDA version; the kernel cache.
    assert re.search(r"^nvrtc +(NVRTC \d+\.\d+ \(.+\), \S.*|NVRTC unavailable: \S.*)$", out, re.M)
    assert re.search(r"^driver +(supports CUDA \d+\.\d+|no NVIDIA driver found)$", out, re.M)
    assert re.search(r"^kernels +\S.*$", out, re.M)
    assert re.search(r"^eager +(built|built on first use|unavailable: |off ).*$", out, re.M)


def test_info_nvrtc_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from attnmerge.cuda import nvrtc

    line = "NVRTC 12.4 (/venv/nvidia/cuda_nvrtc/lib/libnvrtc.so.12), matches torch's CUDA 12.4"
    monkeypatch.setattr(nvrtc, "describe", lambda: line)
    code, out = _run(["info"], capsys)
    assert code == 0
    assert f"\nnvrtc      {line}\n" in out


def test_info_subprocess() -> None:
    """``python -m attnmerge`` works and ``info`` exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "attnmerge", "info"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"attnmerge  {attnmerge.__version__}" in result.stdout
    assert "backends, in auto order" in result.stdout


def test_info_without_triton() -> None:
    """With Triton not importable, info says so instead of crashing."""
    code = (
        "import sys; sys.modules['triton'] = None; "  # makes `import triton` raise ImportError
        "from attnmerge.cli import main; raise SystemExit(main(['info']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"^triton +(not installed|\S+ installed, but not importable)", result.stdout, re.M
    )
    assert re.search(r"^    triton +not available: triton is not importable", result.stdout, re.M)


def _lists_commands(text: str) -> bool:
    return all(
        re.search(rf"^    {cmd.name} +{re.escape(cmd.help.replace('%%', '%')[:30])}", text, re.M)
        for cmd in cli._COMMANDS
    )


def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert _lists_commands(capsys.readouterr().out)
    assert cli.main(["demo", "--requests", "1"]) == 2
    assert cli.main(["demo", "--device", "no-such-device"]) == 2
    assert cli.main(["no-such-command"]) == 2
    capsys.readouterr()


def test_no_arguments_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: attnmerge")
    assert "commands:" in out and _lists_commands(out)
    assert "attnmerge COMMAND --help" in out


def test_no_arguments_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "attnmerge"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert _lists_commands(result.stdout)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_demo(dtype: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["demo", *SMALL, "--dtype", dtype])
    out, err = capsys.readouterr()
    assert code == 0, out
    # Progress, in a log (stderr is not a terminal here): plain lines, the last at 6 of 6.
    lines = err.splitlines()
    assert "\r" not in err and 2 <= len(lines) <= 8, err
    assert all(re.fullmatch(r"demo: \d/6 merges \(\d+%\), \d+\.\d s(: .+)?", x) for x in lines)
    assert lines[0].endswith(": partial states and the float64 answer")
    assert lines[-1].startswith("demo: 6/6 merges (100%)")
    assert lines[-1].endswith(("torch into fp8_e4m3: ok", "fp8_e4m3: not run"))
    assert "prefill_tokens_with_context = 4 of 8 tokens" in out
    assert "result: ok" in out
    rows = _table_rows(out)
    # Each backend either ran into both outputs and passed, or says why it did not run.
    for name in demo.BACKENDS:
        if f"  {name}: not run: " not in out:
            assert rows[name, dtype] == "ok"
            assert rows[name, "fp8_e4m3"] == "ok"
    assert ("torch", dtype) in rows


def _ignore_prefill_tokens(args: tuple, kwargs: dict) -> None:
    """A merge that forgets the tail tokens have no prefix: it reads their NaN rows."""
    kwargs["prefill_tokens_with_context"] = None


def _corrupting(
    before: Callable[[tuple, dict], None] | None, after: Callable[[tuple], None] | None
) -> Callable[..., None]:
    """``merge_attn_states`` with ``before`` applied to its arguments and ``after`` to its
    results (``args[0]`` output, ``args[5]`` output_lse)."""
    real = api.merge_attn_states

    def merge_attn_states(*args, **kwargs) -> None:
        if before is not None:
            before(args, kwargs)
        real(*args, **kwargs)
        if after is not None:
            after(args)

    return merge_attn_states


def _bump_element(args: tuple) -> None:
    """One wrong element of 4096: the norm-wise error may miss it (FP8), max abs does not."""
    output = args[0]
    x = output.float()
    x[-1, 0, 0] += 0.25 * x.abs().max()
    output.copy_(x.to(output.dtype))


def _bump_lse(args: tuple) -> None:
    """The merged LSE off by 1e-3 at one (head, token): one missing key among ~1000."""
    args[5][0, 0] += 1e-3


@pytest.mark.parametrize(
    ("before", "after", "expect"),
    [
        pytest.param(_ignore_prefill_tokens, None, "rel err nan", id="reads-prefix-past-P"),
        pytest.param(None, _bump_element, "max abs err", id="one-wrong-element"),
        pytest.param(None, _bump_lse, "lse err", id="lse-off-by-1e-3"),
    ],
)
def test_demo_catches_corruption(
    before: Callable[[tuple, dict], None] | None,
    after: Callable[[tuple], None] | None,
    expect: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(api, "merge_attn_states", _corrupting(before, after))
    code, out = _run(["demo", *SMALL], capsys)
    assert code == 1
    assert "result: FAIL" in out
    rows = _table_rows(out)
    assert rows
    for check in rows.values():
        assert check.startswith("FAIL:") and expect in check, out


def test_cascade_batch() -> None:
    """The answer is float64 attention over all keys; prefix rows past P are NaN garbage."""
    batch = demo.make_cascade_batch(
        requests=3,
        query_tokens=2,
        prefix_len=16,
        heads=2,
        head_size=8,
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
    )
    assert batch.tokens_with_prefix == 4 and len(batch.suffix_lens) == 3
    assert batch.reference.dtype == batch.reference_lse.dtype == torch.float64
    assert batch.prefix_output.dtype == batch.suffix_output.dtype == torch.bfloat16
    assert batch.prefix_output[4:].isnan().all() and batch.prefix_lse[:, 4:].isnan().all()
    assert not batch.prefix_output[:4].isnan().any()
    # The last request has no prefix: its answer is its suffix attention alone.
    torch.testing.assert_close(batch.suffix_lse[:, 4:].double(), batch.reference_lse[:, 4:])
    bounds = demo.error_bounds(torch.bfloat16, torch.float8_e4m3fn, amax=2.0)
    assert bounds.rel > bounds.max_abs / 2 > 2**-4  # FP8's unit roundoff dominates


def test_demo_progress_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.delenv("TERM", raising=False)
    code = cli.main(["demo", *SMALL])
    out, err = capsys.readouterr()
    assert code == 0, out
    # One line rewritten in place, erased at the end: no newline, nothing left showing.
    assert "\n" not in err and err.startswith("\rdemo: 0/6 merges (0%)")
    assert re.search(r"\rdemo: 6/6 merges \(100%\), \d+\.\d s: ", err)
    assert re.fullmatch(r"\r +\r", err[err.rindex("\r", 0, len(err) - 1) :])
    assert "\r" not in out and "result: ok" in out


# --------------------------------------------------------------------------------------
# Progress of long steps
# --------------------------------------------------------------------------------------


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TERM", raising=False)
    stream, clock = _Stream(tty=True), _Clock()
    progress = Progress("job", 4, unit="steps", stream=stream, clock=clock)
    assert progress.tty
    progress.update(detail="a")
    clock.now += 0.05
    progress.advance()  # within 0.1 s of the last draw: not drawn
    clock.now += 0.1
    progress.advance(detail="b")
    progress.clear()
    clock.now += 0.01
    progress.advance()  # redrawn at once after clear()
    progress.advance(detail="last")  # the end is always drawn
    progress.close()
    drawn = [
        "job: 0/4 steps (0%), 0.0 s: a",
        "job: 2/4 steps (50%), 0.1 s: b",
        "job: 3/4 steps (75%), 0.2 s: b",
        "job: 4/4 steps (100%), 0.2 s: last",
    ]

    def erase(line: str) -> str:
        return "\r" + " " * len(line) + "\r"

    pieces = ["\r" + drawn[0], "\r" + drawn[1], erase(drawn[1])]  # clear()
    pieces += ["\r" + drawn[2], "\r" + drawn[3], erase(drawn[3])]  # close()
    assert stream.getvalue() == "".join(pieces)


def test_progress_on_a_terminal_pads_a_shorter_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TERM", raising=False)
    stream, clock = _Stream(tty=True), _Clock()
    progress = Progress("job", 2, stream=stream, clock=clock)
    progress.update(detail="a long description")
    clock.now += 1
    progress.update(detail="short")
    first, second = stream.getvalue().split("\r")[1:]
    assert second.rstrip() == "job: 0/2 (0%), 1.0 s: short"
    assert len(second) == len(first)


def test_progress_in_a_log() -> None:
    stream, clock = _Stream(tty=False), _Clock()
    progress = Progress("job", 100, unit="kernels", stream=stream, clock=clock)
    assert not progress.tty
    progress.update(detail="setting up")  # the first line comes at once
    for _ in range(100):
        clock.now += 0.01
        progress.advance()
    progress.close()  # the last line already showed the end: nothing more
    lines = stream.getvalue().splitlines()
    assert lines[0] == "job: 0/100 kernels (0%), 0.0 s: setting up"
    assert [x.split(" (")[0] for x in lines[1:]] == [
        f"job: {n}/100 kernels" for n in range(10, 101, 10)
    ]
    assert lines[-1] == "job: 100/100 kernels (100%), 1.0 s: setting up"


def test_progress_in_a_log_every_ten_seconds() -> None:
    """A slow step still shows signs of life, without repeating an unchanged line."""
    stream, clock = _Stream(tty=False), _Clock()
    progress = Progress("job", 1000, stream=stream, clock=clock, log_every_s=10)
    progress.update(detail="call 1")
    clock.now += 5
    progress.update(detail="call 2")  # changed, but 5 s after the last line
    clock.now += 6
    progress.update(detail="call 3")  # changed, 11 s after
    clock.now += 30
    progress.update(detail="call 3")  # nothing changed
    clock.now += 1
    progress.advance()
    progress.close()  # the count moved since the last line: the final count
    assert stream.getvalue().splitlines() == [
        "job: 0/1000 (0%), 0.0 s: call 1",
        "job: 0/1000 (0%), 11.0 s: call 3",
        "job: 1/1000 (0%), 42.0 s: call 3",
    ]


def test_progress_dumb_terminal_is_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "dumb")
    assert not Progress("job", 1, stream=_Stream(tty=True)).tty


def _fake_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple]:
    from attnmerge.cuda import backend, nvrtc

    built: list[tuple] = []
    monkeypatch.setattr(nvrtc, "unavailable_reason", lambda: None)
    monkeypatch.setattr(backend, "build_kernel", lambda config, arch: built.append((config, arch)))
    monkeypatch.setenv("ATTNMERGE_CACHE_DIR", str(tmp_path / "cache"))
    return built


BUILD = ["build", "--arch", "sm_80", "--arch", "sm_90a", "--head-sizes", "64", "--jobs", "1"]


def test_build_progress_in_a_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = _fake_build(monkeypatch, tmp_path)
    assert cli.main(BUILD) == 0
    out, err = capsys.readouterr()
    n = len(built) // 2
    assert (
        out.splitlines()[0] == f"building {n} kernels for sm_80, sm_90a into {tmp_path / 'cache'}"
    )
    assert re.search(r"^  sm_80: \d+\.\d s$", out, re.M) and re.search(r"^  sm_90a: ", out, re.M)
    for arch in ("sm_80", "sm_90a"):
        lines = [x for x in err.splitlines() if x.startswith(f"  {arch}: ")]
        assert 10 <= len(lines) <= 12, err  # the first kernel, then every tenth
        assert all(
            re.fullmatch(rf"  {arch}: \d+/{n} kernels \(\d+%\), \d+\.\d s", x) for x in lines
        )
        assert lines[-1].startswith(f"  {arch}: {n}/{n} kernels (100%)")


def test_build_progress_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = _fake_build(monkeypatch, tmp_path)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.delenv("TERM", raising=False)
    assert cli.main(BUILD) == 0
    out, err = capsys.readouterr()
    n = len(built) // 2
    assert "\n" not in err and "\r" not in out
    for arch in ("sm_80", "sm_90a"):
        assert f"\r  {arch}: {n}/{n} kernels (100%)" in err
        assert re.search(rf"^  {arch}: \d+\.\d s$", out, re.M)


# --------------------------------------------------------------------------------------
# scripts/dev.sh: what it answers before any setup, and pip only when needed
# --------------------------------------------------------------------------------------

DEV_SH = Path(__file__).resolve().parents[1] / "scripts" / "dev.sh"


def _dev_sh(*args: str, venv: Path) -> subprocess.CompletedProcess[str]:
    # PYTHON points nowhere: a venv it tried to create would fail loudly.
    env = {**os.environ, "ATTNMERGE_VENV": str(venv), "PYTHON": str(venv.parent / "no-python")}
    return subprocess.run(
        ["bash", str(DEV_SH), *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("arg", ["--help", "-h", "help"])
def test_dev_sh_help_is_instant(arg: str, tmp_path: Path) -> None:
    start = time.monotonic()
    result = _dev_sh(arg, venv=tmp_path / "venv")
    assert time.monotonic() - start < 5
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: scripts/dev.sh")
    for job in ("test", "demo", "lint", "build"):
        assert re.search(rf"^  {job} ", result.stdout, re.M)
    assert result.stderr == ""
    assert list(tmp_path.iterdir()) == []  # no venv, nothing else


def test_dev_sh_unknown_job(tmp_path: Path) -> None:
    result = _dev_sh("tset", venv=tmp_path / "venv")
    assert result.returncode == 2
    assert "unknown job 'tset'" in result.stderr and "usage: scripts/dev.sh" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_dev_sh_runs_pip_only_when_the_requirements_change(tmp_path: Path) -> None:
    """A venv whose python logs its calls (and really runs only the hashing snippet): the
    first run installs and leaves a stamp, the next skips pip, a stale stamp installs
    again."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        f'#!/bin/sh\necho "$*" >> "{log}"\n'
        f'case "$1" in -c) exec "{sys.executable}" "$@" ;; esac\nexit 0\n'
    )
    python.chmod(0o755)

    def pip_calls(result: subprocess.CompletedProcess[str]) -> list[str]:
        assert result.returncode == 0, result.stderr
        calls = log.read_text().splitlines()
        log.write_text("")
        assert calls[-1].startswith("-m pytest -n auto -q")
        return [c for c in calls if c.startswith("-m pip")]

    first = _dev_sh("test", "-k", "x", venv=venv)
    pip = pip_calls(first)
    assert len(pip) == 2 and "torch==2.13.0" in pip[0] and pip[1].endswith("--no-deps -e .")
    steps = first.stderr.splitlines()
    assert len(steps) == 3 and all(s.startswith("dev.sh: ") for s in steps), first.stderr
    stamp = venv / ".attnmerge-dev-stamp"
    assert re.fullmatch(r"[0-9a-f]{64}\n", stamp.read_text())

    second = _dev_sh("test", venv=venv)
    assert pip_calls(second) == [] and second.stderr == ""

    stamp.write_text("0" * 64 + "\n")  # what an edit of the pins or of pyproject.toml does
    assert len(pip_calls(_dev_sh("test", venv=venv))) == 2
