"""benchmarks/grid.py on a CPU: the product harness with the yardsticks as providers, and
the plot from its CSV."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from attnmerge import bench
from benchmarks import grid, plot

FAKE_DEVICE = bench.DeviceInfo("NVIDIA H200", l2_bytes=1 << 20, copy_bytes_per_s=4.2e12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU flow")
def test_grid_with_yardsticks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def timer(fn):
        fn()
        return (10.0, 9.0, 11.0)

    png = tmp_path / "g.png"
    argv = [
        "--tokens",
        "1,4",
        "--heads",
        "4",
        "--dtypes",
        "bf16",
        "--head-sizes",
        "64",
        "--providers",
        "torch,stream,read,vllm-triton",
        "--plot",
        str(png),
    ]
    assert grid.main(argv, device="cpu", timer=timer, device_info=FAKE_DEVICE) == 0
    out = capsys.readouterr().out
    records, info = bench.read_csv(tmp_path / "g.csv")
    assert info.peak_source == "datasheet H200"
    assert [r.provider for r in records[:4]] == ["torch", "stream", "read", "vllm-triton"]
    assert [bool(r.error) for r in records[:4]] == [False, False, False, True]
    assert "the vllm-triton provider needs vLLM" in records[3].error
    if importlib.util.find_spec("matplotlib"):
        assert f"wrote {png}" in out and png.read_bytes()[:4] == b"\x89PNG"
    else:
        assert "plot skipped: matplotlib is not installed" in out


def test_shapes_replace_the_product() -> None:
    args = grid.parser().parse_args(["--shapes", "1x128,4096x8", "--tokens", "7"])
    cases = bench.build_cases(args)
    assert sorted({(c.tokens, c.heads) for c in cases}) == [(1, 128), (4096, 8)]
    with pytest.raises(SystemExit):
        grid.parser().parse_args(["--shapes", "1024"])


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    case = bench.Case("bf16", True, False, 128, 1, 8, "cuda")
    info = bench.run_info(FAKE_DEVICE, grid.parser().parse_args([]))
    record = bench.make_record(case, 1, (2.0, 2.0, 2.0), info)
    assert "matplotlib" in plot.write_plot(tmp_path / "x.png", [record], info)
    assert not (tmp_path / "x.png").exists()
