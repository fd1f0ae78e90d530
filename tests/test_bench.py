"""``attnmerge bench`` on a CPU: everything but the GPU timing.

Option parsing, the case grid, byte counts, the bandwidth table, the records, CSV, table
and plot writing are plain functions; :func:`attnmerge.bench.run` takes the timer and
the device facts as parameters, so its whole flow runs here on CPU tensors with a fake
timer (the Triton provider in Triton's interpreter, at one program per call). The
numbers checked by hand come from REFERENCE.md and docs/performance.md.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from utils import assert_output_close

from attnmerge import bench, cli
from attnmerge.reference import merge_states_reference, quantize_fp8_static

H200 = bench.RunInfo(
    gpu="NVIDIA H200",
    torch_version="2.11.0+cu130",
    triton_version="3.6.0",
    attnmerge_version="0.1.0",
    git_sha="abc1234",
    peak_gbps=4800.0,
    peak_source="datasheet H200",
    copy_gbps=4180.0,
    cold_l2=False,
    rep_ms=100,
)
# Where provider calls run: the GPU when there is one (Triton's interpreter, which runs
# CPU tensors, is only on in CPU-only test runs).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAKE_DEVICE = bench.DeviceInfo("NVIDIA H100 80GB HBM3", l2_bytes=8192, copy_bytes_per_s=3.01e12)


def _records(cases: list[bench.Case], info: bench.RunInfo = H200) -> list[bench.Record]:
    """Synthetic results: 1.5 us launch + bytes at 90% (triton), 85% (cuda), 40% of copy."""
    out = []
    for c in cases:
        eff = {"cuda": 0.85, "triton": 0.9, "unfused": 0.4, "torch": 0.1}[c.provider]
        us = 1.5 + c.min_bytes() / (eff * info.copy_gbps * 1e9) * 1e6
        out.append(bench.make_record(c, 1, (us, 0.99 * us, 1.01 * us), info))
    return out


@pytest.fixture
def eager_quant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unfused provider's quantisation without torch.compile (a CPU compile takes
    tens of seconds; the compiled function is the same code)."""
    monkeypatch.setattr(bench, "_compiled_quantize_into", lambda: bench._quantize_into)


# ---------------------------------------------------------------------------
# Options and the grid


def test_defaults_are_vllms_grid() -> None:
    config = bench.parse_args([])
    assert config == bench.Config()
    assert config.tokens == (1, 16, 64, 256, 1024, 4096)
    assert config.heads == (128, 64, 32, 16, 8, 4)
    assert config.head_sizes == (128,)
    assert set(config.dtypes) == {"fp32", "fp16", "bf16"}
    assert config.fp8 == (True,) and config.output_lse == (False,)
    cases = bench.build_cases(config)
    assert len(cases) == 6 * 6 * 3 * 3  # T x H x dtypes x providers (cuda, triton, unfused)
    assert len(set(cases)) == len(cases)
    assert {c.provider for c in cases} == {"cuda", "triton", "unfused"}
    assert all(c.fp8 and not c.output_lse and c.head_size == 128 for c in cases)
    # table order: dtype, then heads, then tokens, providers side by side
    assert cases[0] == bench.Case("fp32", True, False, 128, 1, 128, "cuda")
    assert cases[3] == bench.Case("fp32", True, False, 128, 16, 128, "cuda")


def test_every_option() -> None:
    config = bench.parse_args(
        [
            "--tokens", "1,2", "--heads", "8", "--head-sizes", "64,192,256,512",
            "--dtypes", "bf16", "--fp8", "both", "--output-lse", "on",
            "--providers", "torch,unfused,triton", "--block-rows", "8,16", "--cuda-rows", "2",
            "--cuda-chunk-bytes", "32",
            "--cold-l2", "--rep-ms", "50", "--host-overhead",
            "--csv", "r.csv", "--plot", "r.png", "--no-progress",
        ]
    )  # fmt: skip
    assert config == bench.Config(
        tokens=(1, 2),
        heads=(8,),
        head_sizes=(64, 192, 256, 512),
        dtypes=("bf16",),
        fp8=(False, True),
        output_lse=(True,),
        providers=("torch", "unfused", "triton"),
        block_rows=(8, 16),
        cuda_rows=(2,),
        cuda_chunk_bytes=(32,),
        cold_l2=True,
        rep_ms=50,
        host_overhead=True,
        csv="r.csv",
        plot="r.png",
        progress=False,
    )
    cases = bench.build_cases(config)
    # unfused only with FP8 (without the quantisation it is the triton provider)
    assert {c.fp8 for c in cases if c.provider == "unfused"} == {True}
    # torch, triton, triton/r8, triton/r16, cuda/r2, cuda/r2c32 (+ unfused)
    per_shape = {False: 6, True: 7}
    assert len(cases) == 2 * 1 * 4 * sum(per_shape.values())
    providers = ["torch", "triton", "triton/r8", "triton/r16", "cuda/r2", "cuda/r2c32"]
    assert [c.provider for c in cases[:6]] == providers
    assert [c.block_rows for c in cases[:6]] == [None, None, 8, 16, None, None]
    assert [c.cuda_rows for c in cases[:6]] == [None, None, None, None, 2, 2]
    assert [c.cuda_chunk_bytes for c in cases[:6]] == [None] * 5 + [32]


def test_cuda_variant_names() -> None:
    def variant(provider: str):
        c = bench.Case("bf16", True, False, 128, 1, 8, provider)
        return (c.cuda_variant, c.cuda_rows, c.cuda_chunk_bytes, c.cuda_block_threads,
                c.cuda_weights)  # fmt: skip

    assert variant("cuda") == (False, None, None, None, "")
    assert variant("cuda/r4") == (True, 4, None, None, "")
    assert variant("cuda/c32") == (True, None, 32, None, "")
    assert variant("cuda/r2c32") == (True, 2, 32, None, "")
    assert variant("cuda/t") == (True, None, None, None, "t")
    assert variant("cuda/w") == (True, None, None, None, "w")
    assert variant("cuda/r1c32t") == (True, 1, 32, None, "t")
    assert variant("cuda/b32") == (True, None, None, 32, "")
    assert variant("cuda/r1c8b64w") == (True, 1, 8, 64, "w")
    assert variant("cuda/") == (False, None, None, None, "")
    assert variant("cuda/tw") == (False, None, None, None, "")
    assert variant("triton/r8") == (False, None, None, None, "")
    config = bench.Config(tokens=(1,), heads=(8,), dtypes=("bf16",), providers=("cuda",),
                          cuda_chunk_bytes=(32,))  # fmt: skip
    assert [c.provider for c in bench.build_cases(config)] == ["cuda", "cuda/c32"]
    config = dataclasses.replace(config, cuda_rows=(1, 2), cuda_thread_weights=True)
    assert [c.provider for c in bench.build_cases(config)] == [
        "cuda", "cuda/r1", "cuda/r2", "cuda/r1c32", "cuda/r2c32",
        "cuda/r1t", "cuda/r2t", "cuda/r1c32t", "cuda/r2c32t",
    ]  # fmt: skip
    config = bench.Config(tokens=(1,), heads=(8,), dtypes=("bf16",), providers=("cuda",),
                          cuda_block_threads=(32,), cuda_weight_warp=True)  # fmt: skip
    assert [c.provider for c in bench.build_cases(config)] == [
        "cuda", "cuda/b32", "cuda/w", "cuda/b32w"
    ]  # fmt: skip
    args = bench.parse_args(["--cuda-thread-weights"])
    assert (
        args.cuda_thread_weights and [c.provider for c in bench.build_cases(args)][-1] == "cuda/t"
    )
    args = bench.parse_args(["--cuda-block-threads", "16,64", "--cuda-weight-warp"])
    assert args.cuda_block_threads == (16, 64) and args.cuda_weight_warp


def test_shapes_replace_the_product() -> None:
    config = bench.parse_args(["--shapes", "1x128,4096x8", "--tokens", "7", "--dtypes", "fp16"])
    assert config.shapes == ((1, 128), (4096, 8))
    cases = bench.build_cases(config)
    assert [(c.tokens, c.heads) for c in cases if c.provider == "cuda"] == [(1, 128), (4096, 8)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtypes", "fp64"], "subset of fp32,fp16,bf16"),
        (["--providers", "cuda,flashinfer"], "subset of cuda,triton,unfused,torch,vllm,"),
        (["--tokens", "0"], "positive integers"),
        (["--heads", "a,b"], "comma-separated integers"),
        (["--shapes", "1024"], "TxH pairs"),
        (["--fp8", "maybe"], "invalid choice"),
        (["--rep-ms", "0"], "positive integer"),
    ],
)
def test_bad_options_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "bench     benchmark the merge on the GPU" in capsys.readouterr().out
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--tokens", "--heads", "--head-sizes", "--dtypes", "--fp8", "--output-lse"):
        assert option in out
    for option in ("--providers", "--cold-l2", "--csv", "--plot", "--host-overhead"):
        assert option in out


# ---------------------------------------------------------------------------
# Bytes, bandwidth, records


def test_min_bytes() -> None:
    rows = 4096 * 128
    fp8 = bench.min_bytes(4096, 128, 128, torch.bfloat16, torch.float8_e4m3fn, False)
    assert fp8 == 2 * rows * 128 * 2 + 2 * rows * 4 + rows * 128
    assert fp8 == 339_738_624  # docs/performance.md: "bf16 4096 x 128 moves 340 MB"
    with_lse = bench.min_bytes(4096, 128, 128, torch.bfloat16, torch.float8_e4m3fn, True)
    assert with_lse == fp8 + rows * 4
    assert bench.min_bytes(3, 5, 192, torch.float32, torch.float32, False) == 15 * (
        2 * 192 * 4 + 8 + 192 * 4
    )
    case = bench.Case("fp16", False, True, 64, 16, 4, "triton")
    assert case.min_bytes() == bench.min_bytes(16, 4, 64, torch.float16, torch.float16, True)
    assert case.input_bytes() == 2 * 64 * 64 * 2 + 2 * 64 * 4


@pytest.mark.parametrize(
    "tokens, heads, floor_us",
    [(1, 128, 0.03), (64, 128, 1.77), (1024, 128, 28.26), (4096, 128, 113.06), (4096, 8, 7.07)],
)
def test_floor_matches_reference(tokens: int, heads: int, floor_us: float) -> None:
    """REFERENCE.md's H100 floors (bf16 -> FP8, copy bandwidth 3.01 TB/s)."""
    info = dataclasses.replace(H200, copy_gbps=3010.0)
    case = bench.Case("bf16", True, False, 128, tokens, heads, "cuda")
    r = bench.make_record(case, 1, (1.0, 1.0, 1.0), info)
    assert r.floor_us == pytest.approx(floor_us, rel=0.01, abs=0.005)


def test_record_bandwidth() -> None:
    """docs/performance.md: bf16 4096 x 128 in 79.28 us is 4.29 TB/s, 89% of an H200."""
    case = bench.Case("bf16", True, False, 128, 4096, 128, "triton")
    r = bench.make_record(case, 1, (79.28, 79.0, 79.5), H200)
    assert r.gbps == pytest.approx(4285, abs=1)
    assert r.pct_of_peak == pytest.approx(89.3, abs=0.1)
    assert (r.median_us, r.p20_us, r.p80_us, r.bytes) == (79.28, 79.0, 79.5, 339_738_624)
    failed = bench.make_record(case, 1, None, H200, error="BackendError: no")
    assert math.isnan(failed.median_us) and math.isnan(failed.gbps) and failed.error


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", (3.35e12, "H100 SXM")),
        ("NVIDIA H100 SXM5 80GB", (3.35e12, "H100 SXM")),
        ("NVIDIA H100 PCIe", (2.0e12, "H100 PCIe")),
        ("NVIDIA H200", (4.8e12, "H200")),
        ("NVIDIA H200 NVL", (4.8e12, "H200")),
        ("NVIDIA B200", (8.0e12, "B200")),
        ("NVIDIA GH200 480GB", None),  # not an H200: other memory
        ("NVIDIA GB200", None),
        ("NVIDIA H100 NVL", None),  # 3.9 TB/s, not in the table
        ("NVIDIA A100-SXM4-80GB", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_datasheet_bandwidth(name: str, expected: tuple[float, str] | None) -> None:
    assert bench.datasheet_bandwidth(name) == expected


def test_unknown_card_uses_measured_copy() -> None:
    config = bench.Config()
    info = bench.run_info(bench.DeviceInfo("NVIDIA A100-SXM4-80GB", 40 << 20, 1.7e12), config)
    assert info.peak_gbps == info.copy_gbps == pytest.approx(1700)
    assert "measured copy" in info.peak_source
    info = bench.run_info(FAKE_DEVICE, config)
    assert (info.peak_gbps, info.peak_source) == (3350, "datasheet H100 SXM")
    assert info.copy_gbps == pytest.approx(3010)
    assert info.gpu == FAKE_DEVICE.name
    assert info.torch_version == torch.__version__


def test_cold_l2_sets() -> None:
    l2 = 50 << 20  # H100
    for case in bench.build_cases(bench.Config(providers=("triton",))):
        n = bench.cold_l2_sets(case.input_bytes(), l2)
        assert n * case.input_bytes() > 2 * l2
        assert n == 1 or (n - 1) * case.input_bytes() <= 2 * l2
    assert bench.cold_l2_sets(10**9, l2) == 1


def test_git_sha(monkeypatch: pytest.MonkeyPatch) -> None:
    sha = bench.git_sha().removesuffix("-dirty")
    assert sha == "unknown" or (4 <= len(sha) <= 40 and all(ch in "0123456789abcdef" for ch in sha))

    def fake_git(returncodes):  # rev-parse, then diff --quiet
        results = iter(returncodes)
        return lambda *a, **k: subprocess.CompletedProcess(a, next(results), "abc1234\n", "")

    monkeypatch.setattr(subprocess, "run", fake_git([0, 0]))
    assert bench.git_sha() == "abc1234"
    monkeypatch.setattr(subprocess, "run", fake_git([0, 1]))
    assert bench.git_sha() == "abc1234-dirty"

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert bench.git_sha() == "unknown"
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", "not a repo")
    )
    assert bench.git_sha() == "unknown"


# ---------------------------------------------------------------------------
# CSV, table, plot


def test_csv(tmp_path: Path) -> None:
    cases = bench.build_cases(bench.Config(tokens=(1, 4096), heads=(128,), dtypes=("bf16",)))
    records = _records(cases)
    records[0] = bench.make_record(cases[0], 1, None, H200, error='BackendError: "cuda", no')
    path = tmp_path / "bench.csv"
    bench.write_csv(path, records, H200)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == bench.csv_fields()
    for name in ("gpu", "torch_version", "triton_version", "attnmerge_version", "git_sha"):
        assert name in reader.fieldnames
    for name in ("median_us", "p20_us", "p80_us", "gbps", "pct_of_peak", "floor_us", "error"):
        assert name in reader.fieldnames
    assert len(rows) == len(records) == 2 * 3
    assert all(r["gpu"] == "NVIDIA H200" and r["git_sha"] == "abc1234" for r in rows)
    assert rows[0]["error"] == 'BackendError: "cuda", no' and rows[0]["median_us"] == "nan"
    for row, rec in zip(rows[1:], records[1:], strict=True):
        assert (row["provider"], int(row["tokens"]), int(row["heads"])) == (
            rec.provider,
            rec.tokens,
            rec.heads,
        )
        assert float(row["median_us"]) == pytest.approx(rec.median_us, rel=1e-5)
        assert float(row["gbps"]) == pytest.approx(rec.gbps, rel=1e-5)
        assert int(row["bytes"]) == rec.bytes and row["error"] == ""


def test_table() -> None:
    cases = bench.build_cases(
        bench.Config(tokens=(1, 4096), heads=(128, 8), dtypes=("bf16", "fp32"))
    )
    records = _records(cases)
    records[0] = bench.make_record(cases[0], 1, None, H200, error="BackendError: no NVRTC")
    table = bench.format_table(records, H200)
    lines = table.splitlines()
    assert lines[0].startswith("attnmerge bench on NVIDIA H200: peak 4800 GB/s (datasheet H200)")
    assert "git abc1234" in lines[1]
    header = lines[3].split()
    assert header == ["dtype", "out", "D", "T", "H", "|", "cuda", "triton", "unfused", "floor_us"]
    body = lines[5:13]
    assert len(body) == 2 * 2 * 2  # dtype x H x T
    assert body[0].split()[:7] == ["bf16", "fp8", "128", "1", "128", "|", "error"]
    # bf16 4096 x 128, triton: "us GB/s pct%"
    row = next(line for line in body if line.split()[:5] == ["bf16", "fp8", "128", "4096", "128"])
    r = next(
        r
        for r in records
        if (r.dtype, r.tokens, r.heads, r.provider) == ("bf16", 4096, 128, "triton")
    )
    assert f"{r.median_us:.2f} {r.gbps:.0f} {r.pct_of_peak:.0f}%" in row
    assert row.split()[-1] == f"{r.floor_us:.2f}"
    assert lines[13:] == ["error: cuda: BackendError: no NVRTC"]
    # The output-LSE column shows only when some case writes the LSE.
    lse_cases = bench.build_cases(bench.Config(tokens=(16,), heads=(4,), output_lse=(False, True)))
    assert "lse" in bench.format_table(_records(lse_cases), H200).splitlines()[3].split()


def test_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = _records(bench.build_cases(bench.Config(heads=(32, 8), dtypes=("bf16", "fp32"))))
    path = tmp_path / "bench.png"
    assert bench.write_plot(path, records, H200) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    records = _records(bench.build_cases(bench.Config(tokens=(1,), heads=(8,))))
    why = bench.write_plot(tmp_path / "x.png", records, H200)
    assert why is not None and "matplotlib" in why
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------
# Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_log_file() -> None:
    """Not a terminal: a line every ~10%, so a log of a 324-case run stays short."""
    stream = io.StringIO()
    p = bench._Progress(324, True, stream)
    for _ in range(324):
        p.start("case")
        p.advance()
    p.close()
    lines = stream.getvalue().splitlines()
    assert 10 <= len(lines) <= 12
    assert lines[-1] == "bench: 324/324 cases" and "\r" not in stream.getvalue()


def test_progress_counter_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    stream = _Tty()
    p = bench._Progress(3, True, stream)
    for i in range(3):
        p.start(f"case {i}")
        p.advance()
    p.close()
    text = stream.getvalue()
    assert "\r[1/3] case 0" in text and "\r[3/3] case 2" in text and text.endswith("\n")
    silent = io.StringIO()
    q = bench._Progress(3, False, silent)
    q.start("x")
    q.advance()
    q.close()
    assert silent.getvalue() == ""


# ---------------------------------------------------------------------------
# The timed calls and the whole run, on a CPU


@pytest.mark.parametrize(
    "provider, fp8",
    [(p, fp8) for p in ("torch", "triton", "triton/r2") for fp8 in (True, False)]
    + [("unfused", True)]  # unfused runs with FP8 only
    + ([("cuda", True), ("cuda", False)] if DEVICE == "cuda" else []),
)
def test_calls_merge_every_set(provider: str, fp8: bool, eager_quant: None) -> None:
    """Each rotated set's output is the merge of that set's own inputs."""
    case = bench.Case("bf16", fp8, True, 64, 2, 4, provider)
    sets = bench.make_input_sets(case, 3, DEVICE)
    scale = torch.tensor([bench.FP8_SCALE], device=DEVICE)
    for s in sets:  # each set starts 256 bytes apart from the first, as allocations would
        for name in ("output", "prefix_output", "prefix_lse", "output_lse"):
            assert (s[name].data_ptr() - sets[0][name].data_ptr()) % 256 == 0
        assert (s["prefix_lse"] == float("inf")).float().mean() < 0.5
    assert not torch.equal(sets[0]["prefix_output"], sets[1]["prefix_output"])
    bench.make_call(case, sets, scale if fp8 else None)()
    for s in sets:
        want, want_lse = merge_states_reference(
            (s["prefix_output"], s["suffix_output"]), (s["prefix_lse"], s["suffix_lse"])
        )
        if provider == "unfused":  # merged into bf16 (tmp), then quantised from there
            torch.testing.assert_close(s["tmp"].float(), want, atol=1e-2, rtol=1e-2)
            want = s["tmp"]
        if fp8:  # within the suite's allowance (one code where GPU exp rounding differs)
            magnitude, _ = merge_states_reference(
                (s["prefix_output"].abs(), s["suffix_output"].abs()),
                (s["prefix_lse"], s["suffix_lse"]),
            )
            assert_output_close(s["output"], want.float(), magnitude, scale)
        else:
            torch.testing.assert_close(s["output"].float(), want, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(s["output_lse"], want_lse)


_STREAM_PROVIDERS = ["stream"] + (["stream-cuda"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("provider", _STREAM_PROVIDERS)
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("dtype, D", [("bf16", 72), ("fp32", 128)])
def test_stream_moves_the_merges_bytes(fp8: bool, provider: str, dtype: str, D: int) -> None:
    """The stream yardsticks write every output element from the partial of the larger
    LSE (scaled into FP8), so they read all that a merge reads and write all it writes
    (the CUDA one needs a GPU)."""
    case = bench.Case(dtype, fp8, False, D, 5, 3, provider)
    (s,) = bench.make_input_sets(case, 1, DEVICE)
    scale = torch.tensor([bench.FP8_SCALE], device=DEVICE)
    bench.make_call(case, [s], scale if fp8 else None)()
    pick = (s["prefix_lse"] > s["suffix_lse"]).t().unsqueeze(-1)  # [T, H, 1]
    want = torch.where(pick, s["prefix_output"], s["suffix_output"]).float()
    if fp8:
        want = quantize_fp8_static(want, scale)
    assert torch.equal(s["output"].view(torch.uint8), want.to(s["output"].dtype).view(torch.uint8))


@pytest.mark.parametrize("fp8", [True, False])
def test_read_writes_nothing(fp8: bool) -> None:
    """The read bound loads the merge's inputs and leaves the output as it was."""
    case = bench.Case("bf16", fp8, False, 72, 5, 3, "read")
    (s,) = bench.make_input_sets(case, 1, DEVICE)
    s["output"].view(torch.uint8).fill_(0x5A)
    scale = torch.tensor([bench.FP8_SCALE], device=DEVICE)
    bench.make_call(case, [s], scale if fp8 else None)()
    assert bool((s["output"].view(torch.uint8) == 0x5A).all())


@pytest.mark.parametrize(
    "provider, module",
    [
        ("vllm", "vllm.v1.attention.ops.merge_attn_states"),
        ("vllm-triton", "vllm.v1.attention.ops.triton_merge_attn_states"),
    ],
)
def test_vllm_provider_calls_vllms_merge(
    monkeypatch: pytest.MonkeyPatch, provider: str, module: str
) -> None:
    """The vllm provider hands vLLM's merge_attn_states the arguments attnmerge's takes
    (a stand-in module here: vLLM is not a test dependency)."""
    import types

    seen = []
    stand_in = types.ModuleType(module)
    stand_in.merge_attn_states = lambda *args: seen.append(args)
    for name in ("vllm", "vllm.v1", "vllm.v1.attention", "vllm.v1.attention.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module, stand_in)
    case = bench.Case("bf16", True, True, 64, 2, 4, provider)
    sets = bench.make_input_sets(case, 2, DEVICE)
    scale = torch.tensor([bench.FP8_SCALE], device=DEVICE)
    bench.make_call(case, sets, scale)()
    assert len(seen) == 2
    for args, s in zip(seen, sets, strict=True):
        names = ("output", "prefix_output", "prefix_lse", "suffix_output", "suffix_lse")
        assert all(a is s[n] for a, n in zip(args[:5], names, strict=True))
        assert args[5] is s["output_lse"] and args[6] is None and args[7] is scale


def test_vllm_provider_without_vllm_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    case = bench.Case("bf16", True, False, 64, 2, 4, "vllm-triton")
    with pytest.raises(ImportError, match="the vllm-triton provider needs vLLM"):
        bench.make_call(case, bench.make_input_sets(case, 1, DEVICE), None)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU flow (Triton interpreter); GPU: gpu_check.sh")
def test_run_on_cpu(tmp_path: Path, eager_quant: None, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole flow with a fake timer: every provider's call runs once; the cuda
    provider cannot run on a CPU and is reported, not fatal; cold L2 divides by sets."""
    timed = []

    def fake_timer(fn):
        fn()
        timed.append(fn)
        return (100.0, 90.0, 110.0)

    config = bench.Config(
        tokens=(1, 2),
        heads=(4,),
        head_sizes=(64,),
        dtypes=("bf16",),
        output_lse=(False, True),
        providers=("cuda", "triton", "unfused", "torch"),
        cold_l2=True,
        csv=str(tmp_path / "r.csv"),
        plot=str(tmp_path / "r.png"),
    )
    code = bench.run(config, device="cpu", timer=fake_timer, device_info=FAKE_DEVICE)
    out, err = capsys.readouterr()
    assert code == 0
    assert out.startswith("attnmerge bench: 16 cases on NVIDIA H100 80GB HBM3")
    assert "attnmerge bench on NVIDIA H100 80GB HBM3: peak 3350 GB/s (datasheet H100 SXM)" in out
    assert "error: cuda: BackendError:" in out
    assert "bench: 16/16 cases" in err  # progress: stderr is not a terminal here
    assert len(timed) == 12  # cuda fails before timing
    with open(config.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16
    for row in rows:
        case = bench.Case("bf16", True, row["output_lse"] == "True", 64, int(row["tokens"]), 4,
                          row["provider"])  # fmt: skip
        sets = bench.cold_l2_sets(case.input_bytes(), FAKE_DEVICE.l2_bytes)
        assert int(row["sets"]) == sets > 1
        if row["provider"] == "cuda":
            assert row["error"] and row["median_us"] == "nan"
        else:
            assert float(row["median_us"]) == pytest.approx(100 / sets, rel=1e-5)
            assert float(row["p20_us"]) == pytest.approx(90 / sets, rel=1e-5)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "r.png").exists() and f"wrote {config.plot}" in out
    else:
        assert "plot skipped: matplotlib is not installed" in out


def test_run_refuses_a_missing_output_directory(capsys: pytest.CaptureFixture[str]) -> None:
    config = bench.Config(csv="/nonexistent-dir/r.csv")
    assert bench.run(config, device="cpu", timer=None, device_info=FAKE_DEVICE) == 2
    assert "--csv: directory of /nonexistent-dir/r.csv does not exist" in capsys.readouterr().err


def test_bench_without_gpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench"]) == 2
    assert "attnmerge bench: needs a CUDA GPU, and none is visible" in capsys.readouterr().err
    assert bench.main(["--dtypes", "bf16"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_module_entry_point_without_gpu() -> None:
    """``python -m attnmerge.bench`` still works (and exits 2 with no GPU visible)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "attnmerge.bench", "--shapes", "1x8"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert "needs a CUDA GPU" in result.stderr


def test_csv_round_trip_and_replot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A CSV from a GPU machine can be re-tabled and plotted where there is no GPU.
    config = bench.Config(tokens=(1, 4096), heads=(128,), dtypes=("bf16", "fp32"))
    records = _records(bench.build_cases(config))
    path = tmp_path / "r.csv"
    bench.write_csv(path, records, H200)
    back, info = bench.read_csv(path)
    assert info == H200
    assert len(back) == len(records)
    for a, b in zip(back, records, strict=True):
        assert (a.dtype, a.tokens, a.heads, a.provider, a.bytes) == (
            b.dtype, b.tokens, b.heads, b.provider, b.bytes
        )  # fmt: skip
        assert a.median_us == pytest.approx(b.median_us, rel=1e-5)
    assert cli.main(["bench", "--from-csv", str(path)]) == 0
    assert capsys.readouterr().out.strip() == bench.format_table(back, info)
    assert cli.main(["bench", "--from-csv", str(tmp_path / "missing.csv")]) == 2
    assert "--from-csv" in capsys.readouterr().err


def _targets_module():
    path = Path(__file__).resolve().parents[1] / "scripts" / "targets.py"
    spec = importlib.util.spec_from_file_location("targets", path)
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    return targets


def test_targets_script_reads_a_grid(tmp_path: Path) -> None:
    """scripts/targets.py (the performance targets from a whole-grid CSV): the counts and
    the HBM bound, on two shapes with chosen times."""
    targets = _targets_module()
    big = bench.Case("bf16", True, False, 128, 4096, 128, "read")
    writes = 4096 * 128 * 128  # the FP8 output
    inputs = big.min_bytes() - writes
    read_us = inputs / 4500e3  # reads at 4500 GB/s
    times = {  # us: (1 x 128, 4096 x 128)
        "cuda": (1.25, 80.0),
        "triton": (1.5, 81.0),
        "stream": (1.3, 80.0),
        "stream-cuda": (1.2, 79.5),
        "read": (1.3, read_us),
        "vllm": (1.8, 91.6),
        "vllm-triton": (1.3, 318.0),
    }
    records = []
    for provider, (small_us, big_us) in times.items():
        for tokens, us in ((1, small_us), (4096, big_us)):
            case = bench.Case("bf16", True, False, 128, tokens, 128, provider)
            records.append(bench.make_record(case, 1, (us, us, us), H200))
    csv_path = tmp_path / "bench.csv"
    bench.write_csv(csv_path, records, H200)

    by_shape, _ = targets.load(csv_path)
    read_gbps, write_gbps, bounds = targets.hbm_bound(by_shape, H200.copy_gbps)
    assert read_gbps == pytest.approx(4500, rel=1e-5)
    # a copy's half of reads at 4500 GB/s leaves the rest of its time to its writes
    assert write_gbps == pytest.approx(0.5 / (1 / 4180 - 0.5 / 4500), rel=1e-5)
    total = big.min_bytes()
    want = total / (inputs / 4500 + writes / write_gbps)
    assert bounds[("bf16", 4096, 128)] == pytest.approx(want, rel=1e-5)

    report = targets.report(csv_path)
    assert "cuda <= vLLM CUDA: 2 of 2" in report
    assert "T = 1 <= 1.3 us: 1 of 1 (cuda 1.25 to 1.25 us)" in report
    assert ">= 92% of datasheet at >= 131072 rows: 0 of 1" in report
    assert "triton within 1.1x of cuda at >= 131072 rows: 1 of 1" in report
    # 1 x 128: 3x vLLM Triton is 0.43 us, below every yardstick; 4096 x 128 is met
    assert "triton >= 3x vLLM Triton: 1 of 2; of the rest, 1 need less time" in report


def test_targets_script_reads_what_a_grid_has(tmp_path: Path) -> None:
    """An output-LSE grid of cuda and vLLM alone gets the targets those providers allow;
    a grid without vLLM is refused by name."""
    targets = _targets_module()
    records = []
    for provider, (small_us, big_us) in {"cuda": (1.4, 80.0), "vllm": (1.8, 97.0)}.items():
        for tokens, us in ((1, small_us), (4096, big_us)):
            case = bench.Case("bf16", True, True, 128, tokens, 128, provider)
            records.append(bench.make_record(case, 1, (us, us, us), H200))
    csv_path = tmp_path / "bench-lse.csv"
    bench.write_csv(csv_path, records, H200)
    report = targets.report(csv_path)
    assert "2 shapes, output fp8, with output LSE" in report
    assert "cuda <= vLLM CUDA: 2 of 2" in report
    assert "geometric-mean speed-up over vLLM CUDA: cuda " in report
    assert "T = 1 <= 1.3 us: 0 of 1" in report
    assert "HBM" not in report and "triton" not in report

    bench.write_csv(csv_path, [r for r in records if r.provider == "cuda"], H200)
    with pytest.raises(SystemExit, match="cuda and vllm"):
        targets.report(csv_path)
