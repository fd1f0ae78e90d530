"""The CUDA sources, checked without a GPU.

* The software float32 -> e4m3fn conversion (used on GPUs without FP8 hardware) is
  compiled for the host with the system C++ compiler and compared bit for bit with
  torch's cast on every tie point, its neighbours and random values.
* The kernels compile with nvcc for every target architecture (sm_80, sm_90a, and
  sm_100a where the toolkit has it), as a user's first-use build would.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "src" / "attnmerge" / "cuda" / "csrc"

_HOST_HARNESS = r"""
#include <cstdio>
#include <cstdint>
#include "merge_attn_states.cuh"
int main() {
  uint32_t bits;
  while (fread(&bits, 4, 1, stdin) == 1) {
    float x;
    __builtin_memcpy(&x, &bits, 4);
    unsigned char q = attnmerge::float_to_e4m3_satfinite(x);
    fwrite(&q, 1, 1, stdout);
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def host_converter(tmp_path_factory) -> Path:
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("fp8conv")
    (d / "harness.cpp").write_text(_HOST_HARNESS)
    exe = d / "convert"
    subprocess.run(
        [cxx, "-O2", "-std=c++17", f"-I{CSRC}", str(d / "harness.cpp"), "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    return exe


def _convert(exe: Path, values: torch.Tensor) -> torch.Tensor:
    data = values.float().contiguous().view(torch.int32).numpy().tobytes()
    out = subprocess.run([str(exe)], input=data, capture_output=True, check=True).stdout
    return torch.frombuffer(bytearray(out), dtype=torch.uint8)


def _fp8_test_values() -> torch.Tensor:
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # every finite non-negative code
    grid = codes.view(torch.float8_e4m3fn).float()
    mids = (grid[:-1] + grid[1:]) / 2  # exact in float32: the round-half-even ties
    one_ulp = mids.view(torch.int32)
    near = torch.cat([(one_ulp - 1).view(torch.float32), (one_ulp + 1).view(torch.float32)])
    special = torch.tensor(
        [
            0.0,
            448.0,
            449.0,
            463.99,
            464.0,
            465.0,
            480.0,
            1e30,
            float("inf"),
            2.0**-9,
            2.0**-10,
            3 * 2.0**-11,
            2.0**-6,
            2.0**-6 - 2.0**-12,
            1e-40,
            1.996,
        ]
    )
    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64)
    rnd = random_bits.to(torch.int32).view(torch.float32)
    scaled = torch.randn(200_000, generator=g) * 100
    positive = torch.cat([grid, mids, near, special, scaled])
    return torch.cat([positive, -positive, rnd])


def test_software_fp8_convert_matches_torch_cast(host_converter):
    x = _fp8_test_values()
    got = _convert(host_converter, x)
    # Reference: saturate (NaN kept), then torch's round-to-nearest-even cast.
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    nan = x.isnan()
    assert torch.all(got[nan] == 0x7F), "NaN must become the canonical NaN code 0x7F"
    bad = (got != want) & ~nan
    assert not bad.any(), (
        f"{int(bad.sum())} mismatches; first: x={x[bad][:5].tolist()} "
        f"got={got[bad][:5].tolist()} want={want[bad][:5].tolist()}"
    )


def _nvcc_archs() -> list[str]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    archs = ["sm_80", "sm_90a"]
    if "compute_100" in listed:
        archs.append("sm_100a")
    return archs


_INSTANTIATIONS = r"""
#include "merge_attn_states.cuh"
namespace attnmerge {
template __global__ void merge_two_kernel<BF16, BF16, FP8E4M3, 8, 16>(const MergeParams);
template __global__ void merge_two_kernel<F16, F16, F16, 8, 16>(const MergeParams);
template __global__ void merge_two_kernel<F32, F32, FP8E4M3, 4, 32>(const MergeParams);
template __global__ void merge_two_kernel<F32, BF16, BF16, 1, 128>(const MergeParams);
}
"""


@pytest.mark.parametrize(
    "arch", _nvcc_archs() or [pytest.param("none", marks=pytest.mark.skip(reason="no nvcc"))]
)
def test_kernels_compile_with_nvcc(arch, tmp_path):
    src = tmp_path / "instantiate.cu"
    src.write_text(_INSTANTIATIONS)
    number = arch[3:]
    proc = subprocess.run(
        [
            "nvcc",
            "-std=c++17",
            f"-I{CSRC}",
            f"-gencode=arch=compute_{number},code={arch}",
            "-cubin",
            "-Xptxas",
            "-v",
            "-o",
            str(tmp_path / "k.cubin"),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Registers only: no kernel spills to local memory.
    spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    assert spills and all(n == "0" for n in spills), proc.stderr[-4000:]
    assert (tmp_path / "k.cubin").read_bytes()[:4] == b"\x7fELF"
