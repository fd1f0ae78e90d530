"""The command line: ``attnmerge info`` and ``attnmerge demo``.

The demo runs at small sizes (8 tokens x 4 heads: two Triton programs per call, so
the Triton interpreter stays cheap on a CPU). Corruption tests wrap the public merge
to damage its result in one way each and check that the demo's own check fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

import attnmerge
from attnmerge import api, cli, demo, dispatch

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


def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert cli.main([]) == 2
    assert cli.main(["demo", "--requests", "1"]) == 2
    assert cli.main(["demo", "--device", "no-such-device"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_demo(dtype: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(["demo", *SMALL, "--dtype", dtype], capsys)
    assert code == 0, out
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
