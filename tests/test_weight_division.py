"""GPU only: the CUDA kernel's weight division (``divide_weight`` in the kernel source)
is IEEE division, bit for bit, on its whole domain: numerators in [0, 1] (and NaN) over
denominators in [1, 2], the range of a row's weights. It replaces ``__fdiv_rn`` on the
merge's critical path, so it is checked on its own, over millions of operand pairs,
against the CPU's float32 division."""

from __future__ import annotations

import struct

import pytest
import torch

from attnmerge.cuda import backend as cuda_backend
from attnmerge.cuda import driver, nvrtc

pytestmark = pytest.mark.gpu

_KERNEL = r"""
struct DivideArgs {
  const float* a;
  const float* b;
  float* q;
  long long n;
};
extern "C" __global__ void divide_weights(const DivideArgs args) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < args.n) args.q[i] = attnmerge::divide_weight(args.a[i], args.b[i]);
}
"""
_BLOCK = 256


@pytest.fixture(scope="module")
def divide():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = cuda_backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    dev = torch.cuda.current_device()
    arch = cuda_backend.arch_of(torch.cuda.get_device_capability(dev))
    source = cuda_backend.source() + "\nnamespace attnmerge {\n" + _KERNEL + "}\n"
    cubin = nvrtc.compile_cubin(source, name="divide_weights.cu", arch=arch).cubin
    kernel = driver.load_kernel(cubin, "divide_weights", dev, _BLOCK)

    def run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.cuda(), b.cuda()
        q = torch.empty_like(a)
        params = struct.pack("<3Qq", a.data_ptr(), b.data_ptr(), q.data_ptr(), a.numel())
        grid = -(-a.numel() // _BLOCK)
        kernel.launch(grid, torch.cuda.current_stream().cuda_stream, params)
        return q.cpu()

    return run


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def _check(divide, a: torch.Tensor, b: torch.Tensor) -> None:
    got = divide(a, b)
    want = a / b  # CPU float32 division: IEEE, round to nearest even
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    bad = (_bits(got) != _bits(want)) & ~nan
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {a.numel()} quotients differ, e.g. "
        f"{a[bad][:4].tolist()} / {b[bad][:4].tolist()}: {got[bad][:4].tolist()} "
        f"vs {want[bad][:4].tolist()}"
    )


def test_random_operands(divide):
    g = torch.Generator().manual_seed(0)
    n = 1 << 24
    b = 1.0 + torch.rand(n, generator=g)  # [1, 2)
    # numerators log-uniform from 2^-110 (below the fast path's 2^-100) to 1, as a
    # weight exp(-gap) is for gaps up to 76
    a = torch.exp2(-110.0 * torch.rand(n, generator=g))
    _check(divide, a, b)


def test_every_denominator_mantissa_near_the_ends(divide):
    # b = 1 + k ulp and 2 - k ulp for the first 2^20 k, against a few numerators each
    k = torch.arange(1 << 20, dtype=torch.int32)
    one, two = torch.tensor(1.0).view(torch.int32), torch.tensor(2.0).view(torch.int32)
    b = torch.cat([(one + k).view(torch.float32), (two - k).view(torch.float32)])
    for a_value in (1.0, 0.5, 2.0**-100, 0.3333333432674408, 1.0 - 2.0**-24):
        _check(divide, torch.full_like(b, a_value), b)


def test_special_numerators(divide):
    specials = [0.0, float("nan"), 2.0**-149, 2.0**-126, 2.0**-101, 2.0**-100, 1.0]
    a = torch.tensor(specials).repeat_interleave(5)
    b = torch.tensor([1.0, 1.5, 2.0, 1.0 + 2.0**-23, 2.0 - 2.0**-23]).repeat(len(specials))
    _check(divide, a, b)
