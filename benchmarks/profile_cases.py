"""Merges for Nsight Compute to profile: the CUDA and Triton backends and vLLM's kernels
(where vLLM is installed) on a latency-bound and a bandwidth-bound shape; with
``--formats``, attnmerge's dynamic FP8 formats too (per-token, per-token-group of 128).

Every case runs a few times first, outside the profiled range, so that builds, loads and
caches are warm; then once between ``cudaProfilerStart`` and ``cudaProfilerStop``. Run under
``ncu --profile-from-start off`` from the repository root (``scripts/gpu_check.sh profile``
does):

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats python3 -m benchmarks.profile_cases

The names of the profiled cases are printed in launch order, so that the report's kernels
can be matched to them.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools

import torch

import attnmerge
from benchmarks.grid import VLLM_TRITON_MODULE, shape_pairs

HEAD_SIZE = 128
VLLM_MODULES = {
    "vllm": "vllm.v1.attention.ops.merge_attn_states",
    "vllm-triton": VLLM_TRITON_MODULE,
}
PROVIDERS = ("cuda", "triton", *VLLM_MODULES)
#: The output formats: static FP8 (every provider), the dynamic ones (attnmerge's only).
FORMATS = {
    "static": None,
    "token": attnmerge.FP8PerToken(),
    "group": attnmerge.FP8PerTokenGroup(128),
}


def _call(provider: str, args: tuple, fmt: str = "static"):
    if FORMATS[fmt] is not None:  # attnmerge.merge into the format, scales allocated here
        if provider in VLLM_MODULES:
            return None
        out, p, lp, s, ls = args[:5]
        quant = FORMATS[fmt].with_scales(*out.shape, out.device)
        return functools.partial(
            attnmerge.merge, [p, s], [lp, ls], quant=quant, out=out, backend=provider
        )
    if provider not in VLLM_MODULES:
        return functools.partial(attnmerge.merge_attn_states, *args, backend=provider)
    try:
        return functools.partial(
            importlib.import_module(VLLM_MODULES[provider]).merge_attn_states, *args
        )
    except ImportError as e:
        print(f"skipped {provider}: {e}")
        return None


def main() -> None:
    """Warm every case up, then run each once inside the profiled range."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shapes",
        type=shape_pairs,
        default=((1, 128), (4096, 128)),
        help="TxH,... (default: 1x128,4096x128)",
    )
    parser.add_argument(
        "--providers", default=",".join(PROVIDERS), help="of " + ",".join(PROVIDERS)
    )
    parser.add_argument(
        "--formats", default="static", help="of " + ",".join(FORMATS) + " (default: static)"
    )
    opts = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    calls = []
    for tokens, heads in opts.shapes:
        p, s = (
            torch.randn(tokens, heads, HEAD_SIZE, generator=g, device="cuda").bfloat16()
            for _ in "ps"
        )
        lp, ls = (torch.randn(heads, tokens, generator=g, device="cuda") for _ in "ps")
        out = torch.empty(tokens, heads, HEAD_SIZE, dtype=torch.float8_e4m3fn, device="cuda")
        args = (out, p, lp, s, ls, None, None, torch.tensor([0.1], device="cuda"))
        for fmt, provider in itertools.product(opts.formats.split(","), opts.providers.split(",")):
            call = _call(provider, args, fmt)
            if call is not None:
                name = f"{provider} bf16->fp8 {fmt} T={tokens} H={heads} D={HEAD_SIZE}"
                calls.append((name, call))
    for _, call in calls:
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
