"""GPU benchmark of the merge: device time per call, bandwidth, host overhead.

Run as ``python -m attnmerge.bench`` on a machine with a CUDA GPU. Timings are
CUDA-graph replays (``triton.testing.do_bench_cudagraph``), median with p20/p80, on
inputs shaped like REFERENCE's baseline: D = 128, FP8 output with scale 0.1, 5% of
the LSEs +inf. "floor" is the minimal byte count (two partial inputs, two LSEs, the
output, the output LSE when written) over the device-to-device copy bandwidth
measured in the same run, so every number in one table comes from one card.

Providers:

* ``cuda``: attnmerge's CUDA C++ backend (fused FP8 store when FP8 is on);
* ``triton``: attnmerge's Triton backend (likewise);
* ``torch``: attnmerge's reference backend (many small kernels; for scale only);
* ``unfused``: Triton merge into the partials' dtype, then a separate static FP8
  quantisation kernel (what an engine does without the fusion).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time

import torch

DEFAULT_SHAPES = ((1, 128), (64, 128), (256, 128), (1024, 128), (4096, 128), (4096, 8))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(
    tokens: int, heads: int, head_size: int, dtype: torch.dtype, device: str = "cuda"
) -> dict:
    """Random partial states: N(0,1) rows, LSEs N(0, 4^2) with 5% +inf (empty rows)."""
    g = torch.Generator(device=device).manual_seed(0)

    def lse() -> torch.Tensor:
        x = torch.randn(heads, tokens, device=device, generator=g) * 4
        empty = torch.rand(heads, tokens, device=device, generator=g) < 0.05
        return x.masked_fill(empty, float("inf"))

    return {
        "prefix_output": torch.randn(tokens, heads, head_size, device=device, generator=g).to(
            dtype
        ),
        "prefix_lse": lse(),
        "suffix_output": torch.randn(tokens, heads, head_size, device=device, generator=g).to(
            dtype
        ),
        "suffix_lse": lse(),
    }


def min_bytes(tokens: int, heads: int, head_size: int, in_dtype, out_dtype, with_lse: bool) -> int:
    rows = tokens * heads
    in_bytes = 2 * rows * head_size * in_dtype.itemsize + 2 * rows * 4
    out_bytes = rows * head_size * out_dtype.itemsize + (rows * 4 if with_lse else 0)
    return in_bytes + out_bytes


def copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    import triton.testing

    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return nbytes / (ms * 1e-3)


def _quantiles_us(fn) -> tuple[float, float, float]:
    import triton.testing

    p20, p50, p80 = triton.testing.do_bench_cudagraph(fn, rep=200, quantiles=[0.2, 0.5, 0.8])
    return p50 * 1e3, p20 * 1e3, p80 * 1e3


def bench_case(
    tokens: int,
    heads: int,
    head_size: int,
    dtype: torch.dtype,
    fp8: bool,
    provider: str,
    with_lse: bool = False,
    block_rows: int | None = None,
) -> tuple[float, float, float]:
    """(median, p20, p80) microseconds of one merge call, replayed in a CUDA graph."""
    import attnmerge
    from attnmerge.reference import quantize_fp8_static
    from attnmerge.triton import load

    x = make_inputs(tokens, heads, head_size, dtype)
    out_dtype = torch.float8_e4m3fn if fp8 else dtype
    out = torch.empty(tokens, heads, head_size, dtype=out_dtype, device="cuda")
    out_lse = torch.empty(heads, tokens, device="cuda") if with_lse else None
    scale = torch.tensor([0.1], device="cuda") if fp8 else None
    args = (
        x["prefix_output"],
        x["prefix_lse"],
        x["suffix_output"],
        x["suffix_lse"],
    )
    if provider == "triton" and block_rows is not None:
        kernel = load().merge_two_states
        fn = lambda: kernel(out, *args, out_lse, None, scale, False, block_rows)
    elif provider in ("cuda", "triton", "torch"):
        fn = lambda: attnmerge.merge_attn_states(out, *args, out_lse, None, scale, backend=provider)
    elif provider == "unfused":
        tmp = torch.empty(tokens, heads, head_size, dtype=dtype, device="cuda")
        quant = torch.compile(quantize_fp8_static) if fp8 else None

        def fn() -> None:
            attnmerge.merge_attn_states(tmp, *args, out_lse, backend="triton")
            if quant is not None:
                out.copy_(quant(tmp, scale))

        fn()
    else:
        raise ValueError(f"unknown provider {provider!r}")
    fn()
    torch.cuda.synchronize()
    return _quantiles_us(fn)


def host_overhead_us(calls: int = 2000) -> dict[str, float]:
    """Host time per eager call (T=1, H=8, D=128 bf16 -> FP8), by layer.

    The kernels are tiny, so with the GPU idle the host is the bottleneck and the
    wall time per call over many back-to-back calls is the host overhead.
    """
    import attnmerge
    from attnmerge import api
    from attnmerge.triton import load

    x = make_inputs(1, 8, 128, torch.bfloat16)
    out = torch.empty(1, 8, 128, dtype=torch.float8_e4m3fn, device="cuda")
    scale = torch.tensor([0.1], device="cuda")
    args = (out, x["prefix_output"], x["prefix_lse"], x["suffix_output"], x["suffix_lse"])
    from attnmerge.cuda import backend as cuda_backend

    kernel = load().merge_two_states
    cases = {
        "merge_attn_states (cuda, public API)": lambda: attnmerge.merge_attn_states(
            *args, None, None, scale, backend="cuda"
        ),
        "cuda launch only": lambda: cuda_backend.merge_two_states(*args, None, None, scale, False),
        "merge_attn_states (triton, public API)": lambda: attnmerge.merge_attn_states(
            *args, None, None, scale, backend="triton"
        ),
        "argument checks only": lambda: api._validate(
            *args, None, None, scale, "e", "triton", True
        ),
        "Triton launch only": lambda: kernel(*args, None, None, scale, False),
        "torch.ops dispatcher path": lambda: torch.ops.attnmerge.merge_attn_states(
            *args, None, None, scale, False, "triton"
        ),
    }
    result = {}
    for name, fn in cases.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls // 5):
                fn()
            torch.cuda.synchronize()
            samples.append((time.perf_counter() - t0) / (calls // 5) * 1e6)
        result[name] = statistics.median(samples)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnmerge.bench", description=__doc__)
    p.add_argument("--dtypes", default="bf16,fp32", help="partial dtypes: bf16,fp16,fp32")
    p.add_argument("--providers", default="cuda,triton,unfused", help="cuda,triton,unfused,torch")
    p.add_argument("--no-fp8", action="store_true", help="store in the partials' dtype")
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument(
        "--shapes", default=",".join(f"{t}x{h}" for t, h in DEFAULT_SHAPES), help="TxH,..."
    )
    p.add_argument(
        "--block-rows", default="", help="also sweep Triton rows per program, e.g. 4,8,16,32"
    )
    p.add_argument("--host-overhead", action="store_true")
    p.add_argument("--csv", default="", help="write results to this CSV file")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attnmerge bench needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    import triton

    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"# {gpu}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"# device-to-device copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)")
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    fp8 = not a.no_fp8
    rows = []
    row_fmt = "{:>5} {:>5} {:>4} {:>12} {:>10} {:>8} {:>8} {:>9} {:>6}"
    print(
        row_fmt.format("dtype", "T", "H", "provider", "median_us", "p20", "p80", "floor_us", "TB/s")
    )
    providers = [(pv, None) for pv in a.providers.split(",") if pv]
    providers += [("triton", int(b)) for b in a.block_rows.split(",") if b]
    for dname in a.dtypes.split(","):
        dtype = DTYPES[dname]
        out_dtype = torch.float8_e4m3fn if fp8 else dtype
        for t, h in shapes:
            nbytes = min_bytes(t, h, a.head_size, dtype, out_dtype, with_lse=False)
            floor = nbytes / bw * 1e6
            for provider, block_rows in providers:
                med, p20, p80 = bench_case(
                    t, h, a.head_size, dtype, fp8, provider, block_rows=block_rows
                )
                name = provider if block_rows is None else f"triton/r{block_rows}"
                tbs = nbytes / (med * 1e-6) / 1e12
                print(
                    row_fmt.format(
                        dname, t, h, name, *(f"{v:.2f}" for v in (med, p20, p80, floor, tbs))
                    )
                )
                rows.append([gpu, dname, t, h, a.head_size, fp8, name, med, p20, p80, floor, tbs])
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                [
                    "gpu",
                    "dtype",
                    "T",
                    "H",
                    "D",
                    "fp8",
                    "provider",
                    "median_us",
                    "p20_us",
                    "p80_us",
                    "floor_us",
                    "TBps",
                ]
            )
            w.writerows(rows)
    if a.host_overhead:
        print("# host overhead per eager call (us)")
        for name, us in host_overhead_us().items():
            print(f"{name:>45}: {us:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
