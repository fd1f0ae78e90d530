"""What reading kernel parameters from further constant-cache lines costs a launch.

A kernel reads its by-value parameters through the SM's constant cache; each line its
first instructions read is a miss to wait for at the start of every launch. This times
the CUDA stream yardstick (``csrc/stream_two.cuh``, the merge's bytes with a select for
its math) with N bytes of padding inserted before the four 32-bit fields it reads first
(the head count and divisor, at parameter byte 72 + N), by CUDA-graph replay on vLLM's
bench inputs (bf16 -> FP8, D = 128, 16-byte chunks), median us, mean of ``--rounds``
rounds in alternating order. On an H200 the cost appeared at N = 40 (byte 112, constant
offset 0x280 on sm_90): 0.03 to 0.08 us, the same for any N beyond. That is why
``MergeParams`` keeps what the merge kernel reads in its first 112 bytes (see the
kernel source). Every padded kernel's output is checked against the unpadded one's.

Run on a GPU: ``python3 scripts/param_block_cost.py`` (``scripts/gpu_check.sh
param-block``).
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

import torch

from attnmerge import bench
from attnmerge.cuda import backend, driver, nvrtc, stream

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_timing

PADDINGS = [0, 8, 24, 40, 56, 72, 112, 176]
SHAPES = [(1, 4), (1, 128), (16, 128), (64, 64), (64, 128)]
_FIELDS = "  i64 head_size;\n  u32 num_heads;"


def padded_source(n: int) -> str:
    """The stream kernel's source with ``n`` bytes before its 32-bit fields."""
    text = stream.source()
    if n == 0:
        return text
    assert _FIELDS in text
    text = text.replace(_FIELDS, f"  i64 head_size;\n  char pad[{n}];\n  u32 num_heads;")
    return text.replace("sizeof(StreamParams) == 88", f"sizeof(StreamParams) == {88 + n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="times per column (mean)")
    opts = parser.parse_args()
    dev = torch.cuda.current_device()
    arch = backend.arch_of(torch.cuda.get_device_capability(dev))
    kernels = {}
    for n in PADDINGS:
        text = "#define ATTNMERGE_STREAM_TWO_INSTANCE BF16, FP8E4M3, 8, 16\n" + padded_source(n)
        cubin = nvrtc.compile_cubin(text, name=f"stream_pad{n}.cu", arch=arch).cubin
        kernels[n] = driver.load_kernel(cubin, stream.KERNEL_NAME, dev, backend.DATA_THREADS)
    scale = torch.tensor([bench.FP8_SCALE], device="cuda")
    print(
        f"{torch.cuda.get_device_name(dev)}, stream kernel, its 32-bit fields at parameter "
        f"byte 72 + N; median us, mean of {opts.rounds} rounds"
    )
    print(f"{'T x H':>10} " + " ".join(f"{f'N={n}':>9}" for n in PADDINGS))
    for T, H in SHAPES:
        (s,) = bench.make_input_sets(bench.Case("bf16", True, False, 128, T, H, "cuda"), 1, "cuda")
        out, rows = s["output"], T * H
        pointers = (out, s["prefix_output"], s["prefix_lse"], s["suffix_output"], s["suffix_lse"])
        addresses = [t.data_ptr() for t in pointers] + [scale.data_ptr()]
        head = struct.pack("<6Q3q", *addresses, rows, T, 128)
        tail = struct.pack("<4I", H, *backend.head_divisor(H), 0)
        grid = -(-rows // (backend.DATA_THREADS // 16))
        calls = []
        for n in PADDINGS:

            def launch(kernel=kernels[n], grid=grid, params=head + bytes(n) + tail) -> None:
                # the current stream: do_bench_cudagraph captures on a side stream
                kernel.launch(grid, torch.cuda.current_stream().cuda_stream, params)

            calls.append(launch)
        expected = None
        for launch in calls:  # every layout reads the same fields: the same output
            out.view(torch.uint8).zero_()
            launch()
            got = out.view(torch.uint8).clone()
            expected = got if expected is None else expected
            assert torch.equal(got, expected) and got.any()
        times = kernel_timing.mean_of_rounds(calls, opts.rounds)
        print(f"{f'{T} x {H}':>10} " + " ".join(f"{t:9.3f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
