"""benchmarks/targets.py: the performance targets read off a whole-grid CSV."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnmerge import bench
from benchmarks import targets

H200 = bench.RunInfo(
    "NVIDIA H200",
    "2.11.0",
    "3.6.0",
    "0.1.0",
    "abc1234",
    4800.0,
    "datasheet H200",
    4180.0,
    False,
    25,
)


def _csv(path: Path, times: dict, output_lse: bool = False) -> None:
    """A CSV of two shapes (1 x 128 and 4096 x 128, bf16 -> FP8) with chosen times."""
    records = []
    for provider, (small_us, big_us) in times.items():
        for tokens, us in ((1, small_us), (4096, big_us)):
            case = bench.Case("bf16", True, output_lse, 128, tokens, 128, provider)
            records.append(bench.make_record(case, 1, (us, us, us), H200))
    bench.write_csv(path, records, H200)


def test_targets_of_a_whole_grid(tmp_path: Path) -> None:
    """The counts and the HBM bound, on two shapes with chosen times."""
    big = bench.Case("bf16", True, False, 128, 4096, 128, "read")
    writes = 4096 * 128 * 128  # the FP8 output
    inputs = big.min_bytes() - writes
    path = tmp_path / "bench.csv"
    _csv(
        path,
        {  # us: (1 x 128, 4096 x 128); reads at 4500 GB/s
            "cuda": (1.25, 80.0),
            "triton": (1.5, 81.0),
            "stream": (1.3, 80.0),
            "stream-cuda": (1.2, 79.5),
            "read": (1.3, inputs / 4500e3),
            "vllm": (1.8, 91.6),
            "vllm-triton": (1.3, 318.0),
        },
    )
    by_shape, _ = targets.load(path)
    read_gbps, write_gbps, bounds = targets.hbm_bound(by_shape, H200.copy_gbps)
    assert read_gbps == pytest.approx(4500, rel=1e-5)
    # a copy's half of reads at 4500 GB/s leaves the rest of its time to its writes
    assert write_gbps == pytest.approx(0.5 / (1 / 4180 - 0.5 / 4500), rel=1e-5)
    want = big.min_bytes() / (inputs / 4500 + writes / write_gbps)
    assert bounds[("bf16", 4096, 128)] == pytest.approx(want, rel=1e-5)

    report = targets.report(path)
    assert "cuda <= vLLM CUDA: 2 of 2" in report
    assert "T = 1 <= 1.3 us: 1 of 1 (cuda 1.25 to 1.25 us)" in report
    assert ">= 92% of datasheet at >= 131072 rows: 0 of 1" in report
    assert "triton within 1.1x of cuda at >= 131072 rows: 1 of 1" in report
    # 1 x 128: 3x vLLM Triton is 0.43 us, below every yardstick; 4096 x 128 is met
    assert "triton >= 3x vLLM Triton: 1 of 2; of the rest, 1 need less time" in report


def test_targets_of_what_a_grid_has(tmp_path: Path) -> None:
    """An output-LSE grid of cuda and vLLM alone gets the targets those providers allow;
    a grid without vLLM is refused by name."""
    path = tmp_path / "bench-lse.csv"
    _csv(path, {"cuda": (1.4, 80.0), "vllm": (1.8, 97.0)}, output_lse=True)
    report = targets.report(path)
    assert "2 shapes, output fp8, with output LSE" in report
    assert "cuda <= vLLM CUDA: 2 of 2" in report
    assert "geometric-mean speed-up over vLLM CUDA: cuda " in report
    assert "T = 1 <= 1.3 us: 0 of 1" in report
    assert "HBM" not in report and "triton" not in report
    _csv(path, {"cuda": (1.4, 80.0)}, output_lse=True)
    with pytest.raises(SystemExit, match="cuda and vllm"):
        targets.report(path)
