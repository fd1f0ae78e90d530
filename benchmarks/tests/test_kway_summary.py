"""benchmarks/kway_summary.py: the K-way figures read off a CSV with chosen times."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from attnmerge import bench
from benchmarks import kway_summary

H100 = bench.RunInfo(
    "NVIDIA H100 80GB HBM3",
    "2.11.0",
    "3.6.0",
    "0.1.0",
    "abc1234",
    3350.0,
    "datasheet H100 SXM",
    3000.0,
    False,
    3,
)


def _record(provider, k, t, h, us, fp8=False, variable=False, error=""):
    case = bench.Case("bf16", fp8, False, 128, t, h, provider, k, variable)
    return bench.make_record(case, 1, None if error else (us, us, us), H100, error)


def _write(path: Path, records: list) -> Path:
    bench.write_csv(path, records, H100)
    return path


def test_csv_round_trip(tmp_path: Path) -> None:
    """K and variable come back from the CSV; a two-way row has an empty K."""
    rows = [_record("cuda", 16, 1, 8, 2.0, variable=True), _record("cuda", None, 1, 8, 1.2)]
    back, info = bench.read_csv(_write(tmp_path / "k.csv", rows))
    assert info == H100
    assert [(r.partials, r.variable) for r in back] == [(16, True), (None, False)]
    assert back[0].bytes == rows[0].bytes and back[0].median_us == 2.0
    table = bench.format_table(back, info).splitlines()
    assert table[3].split()[:9] == ["dtype", "out", "lse", "D", "K", "var", "T", "H", "floor_us"]
    assert table[5].split()[4:6] == ["16", "yes"] and table[6].split()[4:6] == ["None", "no"]


def test_speedups_and_geomean(tmp_path: Path) -> None:
    rows = []
    for k, (cuda, fi) in {2: (2.0, 3.0), 16: (4.0, 2.0)}.items():
        rows += [_record("cuda", k, 4096, 32, cuda), _record("flashinfer", k, 4096, 32, fi)]
    rows.append(_record("flashinfer", 32, 4096, 128, 0, error="RuntimeError: too many threads"))
    rows.append(_record("cuda", 32, 4096, 128, 9.0))
    by_shape, failed, _ = kway_summary.load(_write(tmp_path / "k.csv", rows))
    ratios = kway_summary.speedups(by_shape, "flashinfer", "bf16", False)
    assert ratios == {(2, 4096, 32): 1.5, (16, 4096, 32): 0.5}
    assert kway_summary.geomean(list(ratios.values())) == pytest.approx(math.sqrt(0.75))
    assert failed == {
        "flashinfer": ("RuntimeError: too many threads", {(False, "bf16", 32, 4096, 128)})
    }
    assert kway_summary.speedups(by_shape, "flashinfer", "bf16", True) == {}


def test_report(tmp_path: Path) -> None:
    rows = []
    for variable in (False, True):
        for k in (2, 16):
            for t, h in ((1, 8), (1, 32), (4096, 32), (1024, 128), (64, 128)):
                rows.append(_record("cuda", k, t, h, 2.0, variable=variable))
                if h == 128 and t == 64 and not variable:  # FlashInfer's H x 16 threads
                    rows.append(_record("flashinfer", k, t, h, 0, error="RuntimeError: launch"))
                else:
                    rows.append(_record("flashinfer", k, t, h, 3.0, variable=variable))
                rows.append(_record("cuda", k, t, h, 4.0, fp8=True, variable=variable))
                rows.append(_record("flashinfer+quant", k, t, h, 10.0, fp8=True, variable=variable))
                # the copy of the same bytes at 1.25x cuda's speed: cuda at 80% of it
                rows.append(_record("copy", k, t, h, 1.6, variable=variable))
    report = kway_summary.report(_write(tmp_path / "kway.csv", rows))
    lines = report.splitlines()
    assert lines[0].startswith("K-way summary of kway.csv: NVIDIA H100 80GB HBM3, git abc1234")
    assert "20 shapes (K, T, H, fixed or variable K) x output bf16/fp8" in lines[0]
    assert "flashinfer failed at 2 cases, first: RuntimeError: launch" in lines
    fixed = "cuda vs flashinfer, bf16 out, fixed K: 1.500x geometric mean over 8 shapes"
    assert any(line.startswith(fixed) and "cuda faster at 8" in line for line in lines)
    i = lines.index(next(line for line in lines if line.startswith(fixed)))
    assert lines[i + 1].split() == ["K", "H", "T=1", "T=64", "T=1024", "T=4096"]
    assert lines[i + 2].split() == ["2", "128", "-", "failed", "1.50x", "-"]
    assert lines[i + 3].split() == ["2", "32", "1.50x", "-", "-", "1.50x"]
    assert "cuda vs flashinfer, bf16 out, variable K: 1.500x geometric mean over 10" in report
    assert "cuda vs flashinfer+quant, fp8 out, variable K: 2.500x geometric mean" in report
    # T x H >= 131072: 4096 x 32 and 1024 x 128, for each K
    share = "cuda % of copy rate at T x H >= 131072, bf16 out, fixed K: K=2 80.0%, K=16 80.0%"
    assert share in report
    assert "fp8 out" not in report.split("% of copy")[-1].split("\n")[0]  # no fp8 copy rows
    assert "T = 1, K = 16, H = 32, bf16 out, fixed K: cuda 2.00 us (flashinfer 3.00)" in report
    assert "T = 1, K = 16, H = 8, fp8 out, variable K: cuda 4.00 us (flashinfer+quant 10.00)" in (
        report
    )


def test_no_kway_rows(tmp_path: Path) -> None:
    path = _write(tmp_path / "two.csv", [_record("cuda", None, 1, 8, 1.2)])
    with pytest.raises(SystemExit, match="no K-way measurements"):
        kway_summary.report(path)
