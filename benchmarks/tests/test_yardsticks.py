"""The yardsticks move a merge's bytes: the stream kernels write the partial of the larger
LSE at every output element (scaled into FP8), the read kernels leave the output alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from attnmerge import bench
from attnmerge.reference import quantize_fp8_static
from benchmarks import grid
from benchmarks.yardsticks import stream_cuda

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
PROVIDERS = ["stream", *(["stream-cuda"] if GPU else [])]


def _run(provider: str, case: bench.Case) -> dict:
    (s,) = bench.make_input_sets(case, 1, DEVICE)
    s["output"].view(torch.uint8).fill_(0x5A)
    scale = torch.tensor([bench.FP8_SCALE], device=DEVICE)
    bench.make_call(case, [s], scale if case.fp8 else None, grid.EXTRA)()
    return s


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize(("dtype", "head_size"), [("bf16", 72), ("fp32", 128), ("fp16", 576)])
def test_stream_writes_the_merges_bytes(provider: str, fp8: bool, dtype: str, head_size: int):
    if fp8 and not GPU:
        pytest.skip("Triton's interpreter converts to FP8 otherwise than a GPU")
    s = _run(provider, bench.Case(dtype, fp8, False, head_size, 5, 3, provider))
    pick = (s["prefix_lse"] > s["suffix_lse"]).t().unsqueeze(-1)
    want = torch.where(pick, s["prefix_output"], s["suffix_output"]).float()
    want = (
        quantize_fp8_static(want, torch.tensor([bench.FP8_SCALE], device=DEVICE)) if fp8 else want
    )
    got = s["output"]
    assert torch.equal(got.view(torch.uint8), want.to(got.dtype).view(torch.uint8))


@pytest.mark.parametrize("provider", ["read"])
@pytest.mark.parametrize("fp8", [True, False])
def test_read_writes_nothing(provider: str, fp8: bool) -> None:
    s = _run(provider, bench.Case("bf16", fp8, False, 72, 5, 3, provider))
    assert bool((s["output"].view(torch.uint8) == 0x5A).all())


def test_heads_divisor() -> None:
    rng = random.Random(0)
    for heads in [*range(1, 300), *(rng.randrange(1, 1 << 20) for _ in range(300))]:
        magic, shift = stream_cuda.heads_divisor(heads)
        assert 0 < magic < 1 << 32
        for n in (0, heads - 1, heads, (1 << 32) - 1, *(rng.randrange(1 << 32) for _ in range(20))):
            assert (((n * magic) >> 32) + n) >> shift == n // heads


def test_cuda_source_compiles() -> None:
    """Every element type pair and both modes build (no GPU needed, only NVRTC)."""
    from attnmerge.cuda import nvrtc

    text = Path(stream_cuda.__file__).with_name("stream_two.cu").read_text()
    instances = ["BF16, E4M3, 8, 16, true", "F32, E4M3, 4, 32, false", "F16, F16, 8, 128, true"]
    try:
        for instance in instances:
            for arch in ("sm_80", "sm_90"):
                source = f"#define STREAM_TWO_INSTANCE {instance}\n{text}"
                assert nvrtc.compile_cubin(source, name="stream_two.cu", arch=arch).cubin
    except nvrtc.BuildError as e:
        if "unavailable" in str(e):
            pytest.skip(str(e))
        raise
