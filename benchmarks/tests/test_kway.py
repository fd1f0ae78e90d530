"""benchmarks/kway.py on a CPU: the grid, the providers' calls (through attnmerge's torch
backend where they would use cuda) and the whole flow with a fake timer."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from attnmerge import bench
from attnmerge.reference import quantize_fp8_static
from benchmarks import kway

FAKE_DEVICE = bench.DeviceInfo("NVIDIA H100 80GB HBM3", l2_bytes=1 << 20, copy_bytes_per_s=3.0e12)
SCALE = torch.tensor([bench.FP8_SCALE])


@pytest.fixture
def on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The providers' attnmerge calls on the torch backend, the quantisation uncompiled."""

    def quantize_into(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> None:
        out.copy_(quantize_fp8_static(x, scale))

    monkeypatch.setattr(kway, "BACKEND", "torch")
    monkeypatch.setattr(bench, "_compiled_quantize_into", lambda: quantize_into)


def reference(s: dict) -> torch.Tensor:
    """The merge of set ``s`` in float64, token by token (LSEs natural, +inf empty)."""
    if s["indptr"] is None:
        k = s["outputs"].shape[0]
        rows = [s["outputs"][:, t] for t in range(s["outputs"].shape[1])]  # [K, H, D] each
        lses = [s["lses"][:, :, t] for t in range(s["lses"].shape[2])]  # [K, H]
        assert all(r.shape[0] == k for r in rows)
    else:
        bounds = s["indptr"].tolist()
        rows = [s["outputs"][a:b] for a, b in itertools.pairwise(bounds)]
        lses = [s["lses"][:, a:b].t() for a, b in itertools.pairwise(bounds)]
    out = []
    for r, lse in zip(rows, lses, strict=True):
        lse = lse.double().masked_fill(lse == math.inf, -math.inf)  # [K, H]
        w = torch.softmax(lse, dim=0).nan_to_num(0.0)  # all empty: zeros
        out.append((w.unsqueeze(-1) * r.double()).sum(0))
    return torch.stack(out)


def _set(partials: int, variable: bool, fp8: bool, tokens: int = 5, heads: int = 3) -> tuple:
    case = bench.Case("bf16", fp8, False, 64, tokens, heads, "cuda", partials, variable)
    (s,) = bench.make_input_sets(case, 1, "cpu")
    return case, s


def _check(s: dict, fp8: bool, via_bf16: bool = False, atol: float = 1e-2) -> None:
    """The output against the float64 merge; FP8 within one code (3 mantissa bits, 2^-9
    subnormal steps), plus ``atol`` (in output units) for roundings between steps."""
    want = reference(s)
    if via_bf16:  # merged into bf16, then quantised from there
        want = want.bfloat16().double()
    if fp8:
        want = quantize_fp8_static(want.float(), SCALE).float()
        got = s["output"].float()
        assert ((got - want).abs() <= want.abs() / 8 + 2**-9 + atol).all()
    else:
        torch.testing.assert_close(s["output"].double(), want, atol=atol, rtol=1e-2)


def test_grid() -> None:
    args = kway.parser().parse_args([])
    assert args.partials == (2, 4, 8, 16, 32) and args.heads == (128, 32, 8)
    assert (args.dtypes, args.fp8, args.variable) == (("bf16",), "both", "both")
    cases = kway.build_cases(args)
    per_shape = {  # (fp8, variable): providers
        (False, False): 6,  # cuda, flashinfer, cuda-tkhd, triton, chained, copy
        (True, False): 7,  # cuda, cuda-tkhd, flashinfer+quant, triton, chained, unfused, copy
        (False, True): 5,  # no chained
        (True, True): 6,
    }
    assert len(cases) == 5 * 6 * 3 * sum(per_shape.values())
    assert len(set(cases)) == len(cases)
    for c in cases:
        assert kway.applies(c) and c.partials in args.partials and c.dtype == "bf16"
    assert not any(c.provider == "flashinfer" and c.fp8 for c in cases)
    assert not any(c.provider in ("unfused", "flashinfer+quant") and not c.fp8 for c in cases)
    assert not any(c.provider == "chained" and c.variable for c in cases)
    assert [c.provider for c in cases[:6]] == [
        "cuda",
        "flashinfer",
        "cuda-tkhd",
        "triton",
        "chained",
        "copy",
    ]
    narrow = kway.parser().parse_args(["--partials", "16", "--variable", "on", "--fp8", "off"])
    assert {(c.partials, c.variable, c.fp8) for c in kway.build_cases(narrow)} == {
        (16, True, False)
    }


@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_copy_moves_the_merges_bytes(variable: bool, fp8: bool) -> None:
    case, s = _set(4, variable, fp8)
    assert kway.set_bytes(s) == case.min_bytes()
    call = kway._copy(s, None)
    assert 2 * call.args[0].numel() == case.min_bytes() // 2 * 2
    call()


@pytest.mark.parametrize("partials", [2, 3, 5])
@pytest.mark.parametrize("fp8", [False, True])
def test_chained(partials: int, fp8: bool, on_cpu: None) -> None:
    _, s = _set(partials, False, fp8)
    kway._chained(s, SCALE if fp8 else None)()
    # the running result is rounded to bf16 between steps: a few 2^-8 of the partials
    _check(s, fp8, via_bf16=True, atol=0.05 / (bench.FP8_SCALE if fp8 else 1))
    with pytest.raises(ValueError, match="same K at every token"):
        kway._chained(_set(partials, True, fp8)[1], None)


@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_tkhd_reads_flashinfers_layout(variable: bool, fp8: bool, on_cpu: None) -> None:
    _, s = _set(4, variable, fp8)
    v, lse2 = kway.flashinfer_layout(s)
    if variable:
        assert v is s["outputs"] and lse2.shape == (s["outputs"].shape[0], 3)
        torch.testing.assert_close(
            lse2.t(), s["lses"].masked_fill(s["lses"] == math.inf, -math.inf) * kway.LOG2E
        )
    else:
        assert v.shape == (5, 4, 3, 64) and v.is_contiguous() and lse2.is_contiguous()
        assert torch.equal(v.transpose(0, 1), s["outputs"])
        lses = s["lses"].masked_fill(s["lses"] == math.inf, -math.inf)
        torch.testing.assert_close(lse2.permute(1, 2, 0), lses * kway.LOG2E)
    kway._cuda_tkhd(s, SCALE if fp8 else None)()
    _check(s, fp8)


@pytest.mark.parametrize("variable", [False, True])
def test_unfused(variable: bool, on_cpu: None) -> None:
    _, s = _set(4, variable, True)
    kway._unfused(s, SCALE)()
    _check(s, True, via_bf16=True)
    with pytest.raises(ValueError, match="FP8-output provider"):
        kway._unfused(s, None)


def test_flashinfer_refuses_fp8() -> None:
    with pytest.raises(ValueError, match="flashinfer\\+quant"):
        kway._flashinfer(_set(4, False, True)[1], SCALE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU flow")
def test_flow(tmp_path: Path, on_cpu: None, capsys: pytest.CaptureFixture[str]) -> None:
    """Every provider through bench.run, its CSV and the summary; FlashInfer's providers
    fail on a CPU and are reported."""
    timed = []

    def timer(fn):
        fn()
        timed.append(fn)
        return (10.0, 9.0, 11.0)

    path = tmp_path / "k.csv"
    providers = "torch,flashinfer,cuda-tkhd,flashinfer+quant,chained,unfused,copy"
    argv = ["--tokens", "1,3", "--heads", "4", "--head-sizes", "64", "--partials", "3,16"]
    argv += ["--providers", providers, "--csv", str(path)]
    assert kway.main(argv, device="cpu", timer=timer, device_info=FAKE_DEVICE) == 0
    out = capsys.readouterr().out
    records, _ = bench.read_csv(path)
    # 2 K x 2 T; torch, cuda-tkhd, copy everywhere, chained at fixed K, one FlashInfer each
    assert len(records) == 2 * 2 * (5 + 6 + 4 + 5)
    assert len(records) == len(kway.build_cases(kway.parser().parse_args(argv)))
    assert {r.partials for r in records} == {3, 16} and {r.variable for r in records} == {
        False,
        True,
    }
    failed = {r.provider for r in records if r.error}
    assert failed == {"flashinfer", "flashinfer+quant"}
    assert len(timed) == sum(not r.error for r in records)
    assert "K-way summary of k.csv: NVIDIA H100 80GB HBM3" in out
    assert "flashinfer failed at 8 cases" in out
