"""Merges for Nsight Compute to profile: the CUDA and Triton kernels (and the CUDA tuning
variants) on a latency-bound and a bandwidth-bound shape.

Every case runs a few times first, outside the profiled range, so that builds, loads and
caches are warm; then once between ``cudaProfilerStart`` and ``cudaProfilerStop``. Run
under ``ncu --profile-from-start off`` (``scripts/gpu_check.sh profile`` does):

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats python3 scripts/profile_cases.py

The names of the profiled cases are printed in launch order, so that the report's
kernels (one per case) can be matched to them.
"""

from __future__ import annotations

import argparse

import torch

import attnmerge
from attnmerge import bench
from attnmerge.cuda import backend as cuda_backend

SHAPES = [(1, 128), (4096, 128)]  # (tokens, heads): latency-bound, HBM-bound
HEAD_SIZE = 128
# (label, how to launch): the public backends, vLLM's kernels where importable (see
# `attnmerge bench --providers vllm`), then CUDA tuning variants.
VARIANTS = [
    ("cuda", {}),
    ("triton", None),
    ("vllm", "vllm"),
    ("vllm-triton", "vllm"),
    ("cuda/w", {"weights": cuda_backend.WEIGHTS_WARP}),
    ("cuda/c8", {"chunk_bytes": 8}),
    ("cuda/b8", {"threads": 8}),
    ("cuda/b32", {"threads": 32}),
    ("cuda/c8b32", {"chunk_bytes": 8, "threads": 32}),
    ("cuda/c16b16", {"chunk_bytes": 16, "threads": 16}),
]


def _public(args: tuple, backend: str):
    return lambda: attnmerge.merge_attn_states(*args, backend=backend)


def _variant(args: tuple, options: dict):
    return lambda: cuda_backend.merge_two_states(*args, False, **options)


def _vllm(args: tuple, provider: str):
    try:
        merge = bench._vllm_merge_attn_states(provider)
    except ImportError as e:
        print(f"skipped {provider}: {e}")
        return None
    return lambda: merge(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shapes", type=bench._shape_list, default=SHAPES, help="TxH,... (default: 1x128,4096x128)"
    )
    parser.add_argument("--variants", help="labels to profile, e.g. cuda,triton (default: all)")
    opts = parser.parse_args()
    chosen = opts.variants.split(",") if opts.variants else [label for label, _ in VARIANTS]
    g = torch.Generator(device="cuda").manual_seed(0)
    calls = []
    for T, H in opts.shapes:
        p = torch.randn(T, H, HEAD_SIZE, generator=g, device="cuda").to(torch.bfloat16)
        s = torch.randn(T, H, HEAD_SIZE, generator=g, device="cuda").to(torch.bfloat16)
        lp = torch.randn(H, T, generator=g, device="cuda")
        ls = torch.randn(H, T, generator=g, device="cuda")
        out = torch.empty(T, H, HEAD_SIZE, dtype=torch.float8_e4m3fn, device="cuda")
        scale = torch.tensor([0.1], device="cuda")
        args = (out, p, lp, s, ls, None, None, scale)
        for label, options in VARIANTS:
            if label not in chosen:
                continue
            if options is None:
                call = _public(args, label)
            elif options == "vllm":
                call = _vllm(args, label)
            else:
                call = _variant(args, options)
            if call is not None:
                calls.append((f"{label} bf16->fp8 T={T} H={H} D={HEAD_SIZE}", call))
    for _, call in calls:  # warm: builds, module loads, caches
        for _ in range(3):
            call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, call in calls:
        print("profiled:", name, flush=True)
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
