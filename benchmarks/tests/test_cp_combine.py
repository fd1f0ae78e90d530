"""benchmarks/cp_combine.py on a CPU: the whole run on a Gloo group of two processes (tiny
shapes, every variant, bf16 and FP8 out), the Triton rescale and static quantiser against
their torch versions (under Triton's interpreter; compiled where a GPU is visible), the
error metric, and the summary of a hand-made CSV."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from benchmarks import cp_combine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN, INF = math.nan, math.inf
#: one ulp of attnmerge's float32 merge beyond half a bf16 ulp (docs/distributed.md: 0.50002)
EPS = 1e-3
DEVICE_NAME = "NVIDIA H100 80GB HBM3"


# ---------------------------------------------------------------------------
# The whole run.


def test_gloo_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cp.csv"
    argv = ["--device", "cpu", "--worlds", "2", "--tokens", "1,5", "--heads", "4"]
    argv += ["--head-size", "16", "--iters", "2", "--out", str(out)]
    assert cp_combine.main(argv) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(cp_combine.Row._fields) <= set(rows[0])
    names = [v.name for v in cp_combine.variants("torch")]
    assert sorted((r["T"], r["variant"], r["mode"]) for r in rows) == sorted(
        (t, name, "eager") for t in ("1", "5") for name in names
    )
    for r in rows:
        assert (r["device"], r["world"], r["H"], r["D"]) == ("cpu", "2", "4", "16")
        assert r["out_dtype"] == ("bf16" if r["format"] == "bf16" else "fp8")
        assert float(r["us"]) > 0
        err, exact = float(r["err_max_ulps"]), float(r["exact_share"])
        assert math.isfinite(err) and 0 <= exact <= 1
        if r["provider"] == "attnmerge":  # rounded once: correctly rounded but for near-ties
            assert err <= 0.5 + EPS and exact >= 0.99, r
        else:  # CPU: the torch rescale and quantisers
            assert r["provider"] == "vllm_pattern", r
            assert r["variant"].startswith("vllm_pattern[torch]"), r
    # vLLM's pattern rounds W + 1 times: the metric sees it
    assert max(float(r["err_max_ulps"]) for r in rows if r["variant"] == names[1]) > 0.5
    printed = capsys.readouterr().out
    assert "cp_combine summary of cp.csv: cpu" in printed
    table = printed[printed.index("eager:") :].splitlines()
    assert [line.split()[:3] for line in table[2:5]] == [
        ["2", "4", "bf16"], ["2", "4", "static"], ["2", "4", "token"]
    ]  # fmt: skip
    assert printed.rstrip().splitlines()[-1].startswith("targets missed: ")


def test_worlds_that_do_not_divide_the_heads_are_skipped(tmp_path: Path) -> None:
    argv = ["--device", "cpu", "--worlds", "3", "--heads", "4", "--out", str(tmp_path / "x.csv")]
    with pytest.raises(SystemExit, match="no shape to run"):
        cp_combine.main(argv)


# ---------------------------------------------------------------------------
# vLLM's pattern: the Triton kernels against the torch versions.


def special_lses(world: int, tokens: int, heads: int) -> torch.Tensor:
    """``[W, T, H]`` LSEs ~ 3 N(0, 1) with tokens of specials: a rank at -inf, at +inf, at
    NaN, all ranks at -inf, values far apart."""
    g = torch.Generator().manual_seed(3)
    lses = torch.randn((world, tokens, heads), generator=g) * 3
    lses[0, 1] = -INF
    lses[1, 2] = INF
    lses[0, 3, :2] = NAN
    lses[:, 4] = -INF
    lses[1, 5] = 200.0
    return lses


# the interpreter's NumPy warns of log(0) and inf - inf at the token without keys
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("world", [2, 4])
def test_triton_rescale_matches_torch(world: int) -> None:
    pytest.importorskip("triton")
    tokens, heads, head_size = 6, 8, 24  # D not a power of two: masked columns
    g = torch.Generator().manual_seed(world)
    out = torch.randn((tokens, heads, head_size), generator=g).to(torch.bfloat16)
    lses = special_lses(world, tokens, heads)
    out, lses = out.to(DEVICE), lses.to(DEVICE)
    shape = (world, tokens, heads // world, head_size)
    for rank in range(world):
        ours = torch.full(shape, NAN, dtype=torch.bfloat16, device=DEVICE)
        theirs = torch.full_like(ours, NAN)
        cp_combine.rescale_triton(out, lses, rank, ours)
        cp_combine.rescale_torch(out, lses, rank, theirs)
        # exp may differ by a float32 ulp between Triton and torch: a bf16 ulp at most
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2**-7, atol=0)
        assert (ours == theirs).float().mean() > 0.95
        assert not ours.isnan().any()


def test_torch_rescale_is_vllms_correction() -> None:
    """Each rank's rescaled heads summed over the ranks: the merge (rows of ranks at -inf,
    +inf or NaN count for nothing, as in vLLM's kernel; a token with no keys is 0)."""
    world, tokens, heads, head_size = 2, 6, 4, 8
    out = torch.randn((world, tokens, heads, head_size)).to(torch.bfloat16)
    lses = special_lses(world, tokens, heads)
    total = torch.zeros((world, tokens, heads // world, head_size))
    for rank in range(world):
        dst = torch.empty((world, tokens, heads // world, head_size), dtype=torch.bfloat16)
        cp_combine.rescale_torch(out[rank], lses, rank, dst)
        total += dst.float()
    merged = total.transpose(0, 1).flatten(1, 2)  # [T, H, D]
    valid = lses.masked_fill(lses.isnan() | (lses == INF), -INF)
    w = torch.softmax(valid, dim=0).nan_to_num(0.0)[..., None]  # [W, T, H, 1]
    torch.testing.assert_close(merged, (w * out.float()).sum(0), rtol=2**-6, atol=2**-6)
    assert (merged[4] == 0).all()


def test_triton_static_quantiser_is_the_reference() -> None:
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((5, 3, 100), generator=g) * torch.logspace(-4, 2, 100)
    x[0, 0, :4] = torch.tensor([NAN, INF, -INF, 1e6])
    x = x.to(torch.bfloat16).to(DEVICE)
    scale = torch.tensor([cp_combine.FP8_SCALE], device=DEVICE)
    ours = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=DEVICE)
    theirs = torch.empty_like(ours)
    cp_combine.quantize_static(x, scale, ours)
    cp_combine.quantize_static_torch(x, scale, theirs)
    assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))


# ---------------------------------------------------------------------------
# The error metric.


def test_errors_of_correctly_rounded_and_off_by_one_values() -> None:
    value = torch.tensor([[[1.0, -3.0, 0.3, 105.0]]], dtype=torch.float64)
    ref = cp_combine.Reference(value, value.abs())
    rounded = value.to(torch.bfloat16)  # 0.3 -> 0.30078125, 0.4 of its ulp 2^-9 off
    err, exact = cp_combine.errors(cp_combine.Output(rounded, None), "bf16", ref)
    assert exact == 1.0 and err == pytest.approx((0.30078125 - 0.3) / 2**-9)
    off = rounded.clone()
    off[0, 0, 0] = 1.0078125  # one bf16 ulp above 1
    err, exact = cp_combine.errors(cp_combine.Output(off, None), "bf16", ref)
    assert err == pytest.approx(1.0) and exact == 0.75

    scale = torch.tensor([0.5])
    codes = (value / 0.5).to(torch.float8_e4m3fn)  # 2, -6, 0.6 -> 0.625, 210 -> 208
    err, exact = cp_combine.errors(cp_combine.Output(codes, scale), "static", ref)
    assert exact == 1.0 and err == pytest.approx((0.625 - 0.6) / 2**-4)
    per_token = cp_combine.Output(codes, torch.tensor([[0.25]]))  # the codes of another scale
    err, exact = cp_combine.errors(per_token, "token", ref)
    assert exact == 0.0 and err == pytest.approx((420 - 208) / 32)


def test_reference_is_the_merge_of_the_ranks_heads() -> None:
    shape = cp_combine.Shape(2, 3, 4, 8)
    outs, lses = cp_combine.make_partials(shape, torch.device("cpu"))
    again = cp_combine.make_partials(shape, torch.device("cpu"))
    assert torch.equal(outs, again[0]) and torch.equal(lses, again[1])  # the same on all ranks
    assert outs.dtype == torch.bfloat16 and lses.shape == (2, 3, 4)
    ref = cp_combine.reference(outs, lses, rank=1)
    w = torch.softmax(lses.double(), dim=0)[..., None]
    torch.testing.assert_close(ref.value, (w * outs.double()).sum(0)[:, 2:])
    torch.testing.assert_close(ref.magnitude, (w * outs.double().abs()).sum(0)[:, 2:])


# ---------------------------------------------------------------------------
# The summary.


def write_rows(path: Path, times: dict[tuple[str, int], float], mode: str = "graph") -> None:
    """A CSV of W = 2, H = 128, bf16 rows with ``times[provider, T]``."""
    rows = [
        cp_combine.Row(
            DEVICE_NAME,
            2,
            t,
            128,
            128,
            "bf16",
            "bf16",
            provider,
            provider,
            mode,
            us,
            0.5,
            1.0,
            "",
            "abc1234",
        )
        for (provider, t), us in times.items()
    ]
    cp_combine.write_csv(path, rows)


def test_summary(tmp_path: Path, capsys) -> None:
    path = tmp_path / "cp.csv"
    times = {("vllm_pattern", t): 20.0 for t in (1, 16, 1024, 4096)}
    times |= {("attnmerge", 1): 10.0, ("attnmerge", 16): 10.0}  # 2x at T <= 256
    times |= {("attnmerge", 1024): 18.0, ("attnmerge", 4096): 25.0}  # 0.8x at T = 4096
    write_rows(path, times)
    assert cp_combine.main(["--summary", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"{DEVICE_NAME}, git abc1234" in text and "judged on graph times" in text
    table = text[text.index("graph:") :].splitlines()
    head = "W H out T=1 T=16 T=1024 T=4096 T<=256 geomean T>256 min"
    assert table[1].split() == head.split()
    row = "2 128 bf16 2.00 2.00 1.11 0.80 2.00x met 0.80x MISSED"
    assert table[2].split() == row.split()
    assert text.rstrip().endswith("targets missed: W=2 H=128 bf16 T>256 min 0.80x")

    write_rows(path, {**times, ("attnmerge", 4096): 20.0})
    cp_combine.main(["--summary", str(path)])
    assert capsys.readouterr().out.rstrip().endswith("targets missed: none")
