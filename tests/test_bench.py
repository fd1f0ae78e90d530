"""``attnmerge bench`` on a CPU: everything but the GPU timing.

Option parsing, the case grid, byte counts, records, CSV and table are plain functions;
:func:`attnmerge.bench.run` takes the timer and the device facts as parameters, so its
whole flow runs here on CPU tensors with a fake timer (the triton provider in Triton's
interpreter).
"""

from __future__ import annotations

import ast
import csv
import importlib
import itertools
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from utils import assert_output_close

import attnmerge
from attnmerge import bench, cli
from attnmerge.reference import merge_states_reference, quantize_fp8_static

ROOT = Path(__file__).resolve().parents[1]
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


def _args(*argv: str):
    return cli.build_parser().parse_args(["bench", *argv])


def _records(cases: list[bench.Case], info=H200) -> list:
    """Synthetic results: 1.5 us launch + bytes at a share of the copy bandwidth."""
    out = []
    for c in cases:
        eff = {"cuda": 0.85, "triton": 0.9, "unfused": 0.4, "torch": 0.1, "vllm": 0.8}
        us = 1.5 + c.min_bytes() / (eff[c.provider] * info.copy_gbps * 1e9) * 1e6
        out.append(bench.make_record(c, 1, (us, 0.99 * us, 1.01 * us), info))
    return out


@pytest.fixture
def eager_quant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unfused provider's quantisation without torch.compile (a CPU compile takes
    tens of seconds; the compiled function is the same code)."""

    def quantize_into(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> None:
        out.copy_(quantize_fp8_static(x, scale))

    monkeypatch.setattr(bench, "_compiled_quantize_into", lambda: quantize_into)


@pytest.fixture
def no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)


# ---------------------------------------------------------------------------
# Options and the grid


def test_defaults_are_vllms_grid(no_vllm: None) -> None:
    args = _args()
    assert args.tokens == (1, 16, 64, 256, 1024, 4096)
    assert args.heads == (128, 64, 32, 16, 8, 4)
    assert args.head_sizes == (128,)
    assert args.dtypes == ("fp32", "fp16", "bf16")
    assert (args.fp8, args.output_lse, args.cold_l2, args.eager) == ("on", "off", False, False)
    cases = bench.build_cases(args)
    assert len(cases) == 6 * 6 * 3 * 3  # T x H x dtypes x providers (cuda, triton, unfused)
    assert len(set(cases)) == len(cases)
    assert {c.provider for c in cases} == {"cuda", "triton", "unfused"}
    assert all(c.fp8 and not c.output_lse and c.head_size == 128 for c in cases)
    # table order: dtype, then heads, then tokens, providers side by side
    assert cases[0] == bench.Case("fp32", True, False, 128, 1, 128, "cuda")
    assert cases[3] == bench.Case("fp32", True, False, 128, 16, 128, "cuda")


def test_eager_grid() -> None:
    """--eager sets the host-time grid: T <= 256, H 128/32/8, bf16, FP8 and output LSE on
    and off."""
    cases = bench.build_cases(_args("--eager", "--providers", "cuda"))
    assert {(c.tokens, c.heads) for c in cases} == {
        (t, h) for t in (1, 16, 64, 256) for h in (128, 32, 8)
    }
    assert {(c.fp8, c.output_lse) for c in cases} == {(f, o) for f in (0, 1) for o in (0, 1)}
    assert {c.dtype for c in cases} == {"bf16"} and len(cases) == 48


def test_vllm_is_a_default_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: name == "vllm")
    assert {c.provider for c in bench.build_cases(_args())} == {"cuda", "triton", "unfused", "vllm"}
    assert {c.provider for c in bench.build_cases(_args("--providers", "cuda"))} == {"cuda"}


def test_every_option() -> None:
    args = _args(
        "--eager",  # a preset: the options after it override its grid
        "--tokens",
        "1,2,2",
        "--heads",
        "8",
        "--head-sizes",
        "64,192,256,512",
        "--dtypes",
        "bf16",
        "--fp8",
        "both",
        "--output-lse",
        "on",
        "--providers",
        "torch,unfused,triton,vllm",
        "--cold-l2",
        "--rep-ms",
        "50",
        "--csv",
        "r.csv",
    )
    assert (args.tokens, args.heads, args.head_sizes) == ((1, 2), (8,), (64, 192, 256, 512))
    assert (args.dtypes, args.fp8, args.output_lse) == (("bf16",), "both", "on")
    assert args.providers == ("torch", "unfused", "triton", "vllm")
    assert (args.cold_l2, args.rep_ms, args.eager, args.csv) == (True, 50, True, "r.csv")
    cases = bench.build_cases(args)
    # unfused only with FP8 (without the quantisation it is the triton provider)
    assert {c.fp8 for c in cases if c.provider == "unfused"} == {True}
    assert len(cases) == 2 * 4 * (3 + 4)  # T x D x (providers without FP8 + with FP8)
    assert [c.provider for c in cases[:3]] == ["torch", "triton", "vllm"]
    assert all(c.output_lse for c in cases)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtypes", "fp64"], "subset of fp32,fp16,bf16"),
        (["--providers", "cuda,stream"], "subset of cuda,triton,unfused,torch,vllm"),
        (["--tokens", "0"], "positive integers"),
        (["--heads", "a,b"], "positive integers"),
        (["--head-sizes", ""], "positive integers"),
        (["--fp8", "maybe"], "invalid choice"),
        (["--rep-ms", "x"], "invalid int value"),
        (["--cuda-chunk-bytes", "16"], "unrecognized arguments"),
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
    for option in ("--providers", "--cold-l2", "--rep-ms", "--eager", "--csv"):
        assert option in out


def test_kway_grid() -> None:
    """--kway sets the K-way grid, options after it override; unfused and vllm are two-way."""
    args = _args("--kway", "--tokens", "1,64", "--heads", "8")
    assert (args.partials, args.heads, args.dtypes) == ((2, 4, 8, 16, 32), (8,), ("bf16",))
    assert (args.fp8, args.variable) == ("both", "both")
    assert _args("--heads", "8", "--kway").heads == (128, 32, 8)  # the preset wins
    cases = bench.build_cases(args)
    assert len(cases) == 2 * 2 * 5 * 2 * 2  # FP8 x variable x K x T x (cuda, triton)
    assert {c.provider for c in cases} == {"cuda", "triton"}  # unfused: two-way only
    # table order: output, variable, K, H, T
    assert cases[0] == bench.Case("bf16", False, False, 128, 1, 8, "cuda", 2, False)
    assert cases[4] == bench.Case("bf16", False, False, 128, 1, 8, "cuda", 4, False)
    assert cases[20] == bench.Case("bf16", False, False, 128, 1, 8, "cuda", 2, True)
    one = bench.build_cases(_args("--partials", "3", "--providers", "torch,vllm,unfused"))
    assert {(c.provider, c.partials, c.variable) for c in one} == {("torch", 3, False)}
    assert all(c.partials is None for c in bench.build_cases(_args("--variable", "on")))


@pytest.mark.parametrize("tokens", [1, 2, 16, 4096])
@pytest.mark.parametrize("k", [2, 5, 32])
def test_partial_counts(tokens: int, k: int) -> None:
    """Variable K: 1 to 2K - 1 partials per token, mean K (within rounding), seeded."""
    counts = bench.partial_counts(tokens, k)
    assert len(counts) == tokens and min(counts) >= 1 and max(counts) <= 2 * k - 1
    assert sum(counts) / tokens == pytest.approx(k, abs=0.5 if tokens > 1 else 0)
    if tokens >= 16:
        assert len(set(counts)) > 1 and counts != tuple(sorted(counts))
    assert bench.partial_counts.__wrapped__(tokens, k) == counts  # the same each run


# ---------------------------------------------------------------------------
# Bytes, bandwidth, records, CSV, table


def test_min_bytes() -> None:
    rows = 4096 * 128
    case = bench.Case("bf16", True, False, 128, 4096, 128, "cuda")
    assert case.min_bytes() == 2 * rows * 128 * 2 + 2 * rows * 4 + rows * 128
    lse = bench.Case("fp32", False, True, 128, 4096, 128, "cuda")
    assert lse.min_bytes() == 2 * rows * 128 * 4 + 2 * rows * 4 + rows * 128 * 4 + rows * 4


def test_cold_l2_sets() -> None:
    assert bench.cold_l2_sets(1000, 50_000_000) == 100_001
    assert bench.cold_l2_sets(200_000_000, 50_000_000) == 1


@pytest.mark.parametrize(
    "name, peak, source",
    [
        ("NVIDIA H200", 4800, "datasheet H200"),
        ("NVIDIA H100 80GB HBM3", 3350, "datasheet H100 SXM"),
        ("NVIDIA H100 PCIe", 2000, "datasheet H100 PCIe"),
        ("NVIDIA B200", 8000, "datasheet B200"),
        ("NVIDIA GH200 480GB", 1234, "measured copy"),  # not an H200's memory system
        ("NVIDIA A100-SXM4-80GB", 1234, "measured copy"),
    ],
)
def test_peak_bandwidth(name: str, peak: float, source: str) -> None:
    info = bench.run_info(bench.DeviceInfo(name, 1 << 20, 1234e9), _args())
    assert (info.gpu, info.peak_gbps, info.peak_source) == (name, pytest.approx(peak), source)
    assert info.copy_gbps == pytest.approx(1234)
    assert info.attnmerge_version == attnmerge.__version__
    assert info.git_sha != "" and (info.cold_l2, info.rep_ms) == (False, 100)


def test_record() -> None:
    case = bench.Case("bf16", True, False, 128, 4096, 128, "cuda")
    r = bench.make_record(case, 1, (80.0, 79.0, 81.0), H200)
    assert (r.out_dtype, r.bytes, r.median_us, r.p20_us, r.p80_us) == (
        "fp8",
        case.min_bytes(),
        80,
        79,
        81,
    )
    assert r.gbps == pytest.approx(case.min_bytes() / 80e-6 / 1e9)
    assert r.pct_of_peak == pytest.approx(100 * r.gbps / 4800)
    assert r.floor_us == pytest.approx(case.min_bytes() / 4180e9 * 1e6)
    failed = bench.make_record(case, 3, None, H200, "BackendError: no")
    assert math.isnan(failed.median_us) and failed.error == "BackendError: no" and failed.sets == 3


def test_csv_round_trip_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = bench.build_cases(
        _args(
            "--tokens",
            "1,4096",
            "--heads",
            "128",
            "--dtypes",
            "bf16,fp32",
            "--providers",
            "cuda,triton,unfused",
        )
    )
    records = _records(cases)
    records[1] = bench.make_record(cases[1], 1, None, H200, "ImportError: no triton")
    path = tmp_path / "r.csv"
    bench.write_csv(path, records, H200)
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header[:2] == ["gpu", "torch_version"] and header[-3:] == [
        "pct_of_peak",
        "floor_us",
        "error",
    ]
    back, info = bench.read_csv(path)
    assert info == H200 and len(back) == len(records)
    for a, b in zip(back, records, strict=True):
        assert a[:8] == b[:8] and a.bytes == b.bytes and a.error == b.error
        assert a.median_us == pytest.approx(b.median_us, rel=1e-5, nan_ok=True)
    table = bench.format_table(back, info).splitlines()
    assert table[0].startswith("attnmerge bench on NVIDIA H200: peak 4800 GB/s (datasheet H200)")
    assert table[3].split() == [
        "dtype",
        "out",
        "lse",
        "D",
        "T",
        "H",
        "floor_us",
        "cuda",
        "triton",
        "unfused",
    ]
    assert len(table) == 5 + 4 + 1  # head lines, rows (dtype x T), the error line
    assert table[5].split()[:7] == [
        "bf16",
        "fp8",
        "no",
        "128",
        "1",
        "128",
        f"{records[0].floor_us:.2f}",
    ]
    cuda = records[0]
    cell = [f"{cuda.median_us:.2f}", f"{cuda.gbps:.0f}", f"{cuda.pct_of_peak:.0f}%"]
    assert table[5].split()[7:11] == [*cell, "error"]
    assert table[-1] == "error: triton: ImportError: no triton"


def test_kway_min_bytes() -> None:
    rows, k = 64 * 8, 16
    fixed = bench.Case("bf16", False, False, 128, 64, 8, "cuda", k, False)
    assert fixed.min_bytes() == k * rows * (128 * 2 + 4) + rows * 128 * 2
    fp8 = bench.Case("bf16", True, True, 128, 64, 8, "cuda", k, False)
    assert fp8.min_bytes() == k * rows * (128 * 2 + 4) + rows * (128 + 4)
    var = bench.Case("bf16", True, False, 128, 64, 8, "cuda", k, True)
    n = sum(bench.partial_counts(64, k))
    assert var.min_bytes() == n * 8 * (128 * 2 + 4) + 4 * 65 + rows * 128
    (s,) = bench.make_input_sets(var, 1, "cpu")
    assert s["outputs"].shape == (n, 8, 128) and s["lses"].shape == (8, n)
    assert s["indptr"].dtype == torch.int32 and s["indptr"].tolist()[-1] == n
    assert torch.equal(s["indptr"].diff(), torch.tensor(bench.partial_counts(64, k)).int())


def test_kway_csv_and_table(tmp_path: Path) -> None:
    """K and variable round-trip (the two-way form's K as an empty field); K-way tables get
    K and var columns."""
    cases = [
        bench.Case("bf16", True, False, 128, 1, 8, "cuda", 16, True),
        bench.Case("bf16", True, False, 128, 1, 8, "cuda"),
    ]
    path = tmp_path / "k.csv"
    bench.write_csv(path, _records(cases), H200)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["partials"], r["variable"]) for r in rows] == [("16", "True"), ("", "False")]
    back, _ = bench.read_csv(path)
    assert [(r.partials, r.variable) for r in back] == [(16, True), (None, False)]
    table = bench.format_table(back, H200).splitlines()
    assert table[3].split()[:9] == ["dtype", "out", "lse", "D", "K", "var", "T", "H", "floor_us"]
    assert table[5].split()[4:6] == ["16", "yes"]
    assert "K: partials per token" in table[2]
    assert "var" not in bench.format_table(back[1:], H200).splitlines()[3].split()


@pytest.mark.parametrize(
    "path", sorted((ROOT / "docs" / "results").glob("*.csv")), ids=lambda p: p.name
)
def test_published_csvs_load(path: Path) -> None:
    if path.read_text().startswith(",".join(bench.EagerRecord._fields)):  # bench --eager
        rows = bench.read_eager_csv(path)
        assert rows and all(r.host_us > 0 or r.error for r in rows)
        assert {r.column for r in rows} <= set(bench.EAGER_COLUMNS)
        return
    records, info = bench.read_csv(path)
    assert records and info.gpu and all(r.bytes > 0 for r in records)
    assert bench.format_table(records, info)


# ---------------------------------------------------------------------------
# The timed calls and the whole run, on a CPU


@pytest.mark.parametrize(
    "provider, fp8",
    [(p, fp8) for p in ("torch", "triton") for fp8 in (True, False)]
    + [("unfused", True)]
    + ([("cuda", True), ("cuda", False)] if DEVICE == "cuda" else []),
)
def test_calls_merge_every_set(provider: str, fp8: bool, eager_quant: None) -> None:
    """Each rotated set's output is the merge of that set's own inputs."""
    case = bench.Case("bf16", fp8, True, 64, 2, 4, provider)
    sets = bench.make_input_sets(case, 3, DEVICE)
    scale = torch.tensor([bench.FP8_SCALE], device=DEVICE)
    for s in sets:
        assert (s["prefix_lse"] == math.inf).float().mean() < 0.5
    assert not torch.equal(sets[0]["prefix_output"], sets[1]["prefix_output"])
    bench.make_call(case, sets, scale if fp8 else None)()
    for s in sets:
        want, want_lse = merge_states_reference(
            (s["prefix_output"], s["suffix_output"]), (s["prefix_lse"], s["suffix_lse"])
        )
        if provider == "unfused":  # merged into bf16, then quantised from there
            want = want.bfloat16().float()
        if fp8:  # within the suite's allowance (one code where GPU exp rounding differs)
            magnitude, _ = merge_states_reference(
                (s["prefix_output"].abs(), s["suffix_output"].abs()),
                (s["prefix_lse"], s["suffix_lse"]),
            )
            assert_output_close(s["output"], want, magnitude, scale)
        else:
            torch.testing.assert_close(s["output"].float(), want, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(s["output_lse"], want_lse)


def _kway_reference(s: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 merge of a K-way set and of its rows' magnitudes (token by token)."""
    if s["indptr"] is None:
        rows = list(s["outputs"].transpose(0, 1))  # per token [K, H, D]
        lses = list(s["lses"].permute(2, 0, 1))  # per token [K, H]
    else:
        bounds = s["indptr"].tolist()
        rows = [s["outputs"][a:b] for a, b in itertools.pairwise(bounds)]
        lses = [s["lses"][:, a:b].t() for a, b in itertools.pairwise(bounds)]
    out, magnitude = [], []
    for r, lse in zip(rows, lses, strict=True):
        w = torch.softmax(lse.masked_fill(lse == math.inf, -math.inf), dim=0).nan_to_num(0.0)
        out.append((w.unsqueeze(-1) * r.float()).sum(0))
        magnitude.append((w.unsqueeze(-1) * r.float().abs()).sum(0))
    return torch.stack(out), torch.stack(magnitude)


@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize(
    "provider, fp8",
    [("torch", True), ("torch", False), ("triton", False)]
    + ([("triton", True), ("cuda", True), ("cuda", False)] if DEVICE == "cuda" else []),
)
def test_kway_calls_merge(provider: str, fp8: bool, variable: bool) -> None:
    """A K-way provider merges its set's stacked or packed partials through attnmerge.merge."""
    case = bench.Case("bf16", fp8, True, 64, 5, 3, provider, 3, variable)
    sets = bench.make_input_sets(case, 2, DEVICE)
    scale = torch.tensor([bench.FP8_SCALE], device=DEVICE)
    bench.make_call(case, sets, scale if fp8 else None)()
    for s in sets:
        want, magnitude = _kway_reference(s)
        assert_output_close(s["output"], want, magnitude, scale if fp8 else None)
        assert torch.isfinite(s["output_lse"]).all()


def test_vllm_provider_calls_vllms_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vllm provider hands vLLM's merge_attn_states the arguments attnmerge's takes
    (a stand-in module here: vLLM is not a test dependency)."""
    seen = []
    stand_in = types.ModuleType(bench.VLLM_MODULE)
    stand_in.merge_attn_states = lambda *args: seen.append(args)
    for name in ("vllm", "vllm.v1", "vllm.v1.attention", "vllm.v1.attention.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, bench.VLLM_MODULE, stand_in)
    case = bench.Case("bf16", True, True, 64, 2, 4, "vllm")
    sets = bench.make_input_sets(case, 2, DEVICE)
    scale = torch.tensor([bench.FP8_SCALE], device=DEVICE)
    bench.make_call(case, sets, scale)()
    assert len(seen) == 2
    for args, s in zip(seen, sets, strict=True):
        names = ("output", "prefix_output", "prefix_lse", "suffix_output", "suffix_lse")
        assert all(a is s[n] for a, n in zip(args[:5], names, strict=True))
        assert args[5] is s["output_lse"] and args[6] is None and args[7] is scale


def test_providers_that_cannot_run_say_why(no_vllm: None) -> None:
    case = bench.Case("bf16", True, False, 64, 2, 4, "vllm")
    with pytest.raises(ImportError, match="the vllm provider needs vLLM"):
        bench.make_call(case, bench.make_input_sets(case, 1, DEVICE), None)
    with pytest.raises(ValueError, match="unknown provider 'stream'"):
        bench.make_call(bench.Case("bf16", True, False, 64, 2, 4, "stream"), [{}], None)


def test_extra_providers() -> None:
    """``extra`` adds providers (the repository's benchmark grid adds its yardsticks)."""
    seen = []
    case = bench.Case("fp32", False, False, 8, 1, 2, "mine")
    sets = bench.make_input_sets(case, 2, "cpu")
    bench.make_call(case, sets, None, {"mine": lambda s, scale: lambda: seen.append(s)})()
    assert seen == sets


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU flow (Triton interpreter); GPU: gpu_check.sh")
def test_run_on_cpu(tmp_path: Path, eager_quant: None, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole flow with a fake timer: every provider's call runs once; the cuda
    provider cannot run on a CPU and is reported, not fatal; cold L2 divides by sets."""
    timed = []

    def fake_timer(fn):
        fn()
        timed.append(fn)
        return (100.0, 90.0, 110.0)

    csv_path = tmp_path / "r.csv"
    args = _args(
        "--tokens",
        "1,2",
        "--heads",
        "4",
        "--head-sizes",
        "64",
        "--dtypes",
        "bf16",
        "--output-lse",
        "both",
        "--providers",
        "cuda,triton,unfused,torch",
        "--cold-l2",
        "--csv",
        str(csv_path),
    )
    code = bench.run(args, device="cpu", timer=fake_timer, device_info=FAKE_DEVICE)
    out, err = capsys.readouterr()
    assert code == 0
    assert out.startswith("attnmerge bench: 16 cases on NVIDIA H100 80GB HBM3")
    assert "attnmerge bench on NVIDIA H100 80GB HBM3: peak 3350 GB/s (datasheet H100 SXM)" in out
    assert "error: cuda: BackendError:" in out and f"wrote {csv_path} (16 rows)" in out
    assert "bench: case 1/16: " in err
    assert len(timed) == 12  # cuda fails before timing
    records, _ = bench.read_csv(csv_path)
    assert len(records) == 16
    for r in records:
        case = bench.Case("bf16", True, r.output_lse, 64, r.tokens, 4, r.provider)
        sets = bench.cold_l2_sets(case.min_bytes(), FAKE_DEVICE.l2_bytes)
        assert r.sets == sets > 1
        if r.provider == "cuda":
            assert r.error and math.isnan(r.median_us)
        else:
            assert (r.median_us, r.p20_us) == (
                pytest.approx(100 / sets, rel=1e-5),
                pytest.approx(90 / sets, rel=1e-5),
            )


def test_refusals(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.run(_args("--csv", "/nonexistent-dir/r.csv"), device="cpu") == 2
    assert "--csv: directory of /nonexistent-dir/r.csv does not exist" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench"]) == 2
    assert "attnmerge bench: needs a CUDA GPU, and none is visible" in capsys.readouterr().err


def test_eager(no_vllm: None) -> None:
    """Host time per eager call: a number for each backend that runs, else its error."""
    result = bench.eager_us(DEVICE, calls=10)
    assert list(result) == ["cuda", "auto", "triton", "merge", "merge-k4", "torch.add"]
    runs = list(result)[DEVICE == "cpu" :]  # the cuda backend needs a GPU
    if DEVICE == "cpu":
        assert "BackendError" in result["cuda"]
    for name in runs:
        assert isinstance(result[name], float) and result[name] > 0, result[name]


# What bench and demo may import from attnmerge: public names, from the modules that define
# them (nothing in the package imports its front door), and two reference functions.
ALLOWED = {
    "attnmerge": {"api"},
    "attnmerge.api": {"merge_attn_states", "merge"},
    "attnmerge.formats": {"FP8Static"},
    "attnmerge.dispatch": {"BackendError"},
    "attnmerge.version": {"__version__"},
    "attnmerge.reference": {"merge_states_reference", "quantize_fp8_static"},
    "attnmerge.progress": {"Progress"},  # the command's progress line, not the merge's API
}


def test_public_api_only() -> None:
    """bench and demo use attnmerge through its public API, none of the backends' internals."""
    for module, names in ALLOWED.items():
        for name in names - {"api", "merge_states_reference", "quantize_fp8_static", "Progress"}:
            assert getattr(importlib.import_module(module), name) is getattr(attnmerge, name)
    for file in ("bench.py", "demo.py"):
        for node in ast.walk(ast.parse((ROOT / "src" / "attnmerge" / file).read_text())):
            if isinstance(node, ast.ImportFrom) and (
                node.level or node.module.startswith("attnmerge")
            ):
                assert node.level == 0, f"{file}: relative import"
                names = {a.name for a in node.names}
                assert names <= ALLOWED.get(node.module, set()), f"{file}: {node.module} {names}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("attnmerge") for a in node.names), file
            elif isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "api":
                assert node.attr in ALLOWED["attnmerge.api"], f"{file}: api.{node.attr}"


def test_eager_table_and_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench --eager: a row per shape, a column per EAGER_COLUMNS entry, and a CSV that
    reads back (the timing itself is eager_us's, stood in for here)."""
    times = {"cuda": 5.0, "auto": 5.5, "triton": 9.0, "merge": 7.0, "merge-k4": 8.0}
    times |= {"torch.add": 4.0}
    monkeypatch.setattr(bench, "eager_us", lambda device, case: times | {"vllm": "ImportError"})
    path = tmp_path / "eager.csv"
    args = _args("--eager", "--tokens", "1,16", "--heads", "8", "--csv", str(path))
    bench.write_eager_table(torch.device("cpu"), args, sys.stdout)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[-len(bench.EAGER_COLUMNS) :] == list(bench.EAGER_COLUMNS)
    assert len([line for line in lines if line.startswith(" bf16")]) == 2 * 2 * 2  # T, FP8, LSE
    rows = bench.read_eager_csv(path)
    assert len(rows) == 8 * len(bench.EAGER_COLUMNS)
    assert {(r.column, r.host_us) for r in rows if r.column != "vllm"} == set(times.items())
    assert {r.error for r in rows if r.column == "vllm"} == {"ImportError"}
