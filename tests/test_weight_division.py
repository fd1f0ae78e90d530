"""GPU only: the CUDA kernel's row weights (``two_partial_state`` in csrc/merge.cuh) are
the textbook formula's, bit for bit. The kernel computes one exponential per row and
divides by Markstein's sequence (``divide_weight``, ``reciprocal_weight``) on a shared
approximate reciprocal (``weight_reciprocal``), instead of two exponentials and two IEEE
divisions (``__fdiv_rn``); both live on the merge's critical path, so they are checked on
their own, over millions of inputs: the division against the CPU's float32 division, the
weights against the textbook formula computed with the same device's ``expf``/``exp2f``
and ``__fdiv_rn``. The Triton kernel divides its weights by the same sequence
(``_weights_of``): its quotients and reciprocals are checked against the CPU's division
on the same inputs."""

from __future__ import annotations

import struct

import pytest
import torch
import triton
import triton.language as tl

from attnmerge.cuda import backend as cuda_backend
from attnmerge.cuda import driver, nvrtc
from attnmerge.triton import merge_kernel

pytestmark = pytest.mark.gpu

_KERNELS = r"""
#include "merge.cuh"
namespace attnmerge {

struct PairArgs {
  const float* a;
  const float* b;
  float* out;  // divide: n x {a / b, 1 / b}; weights: n x {weight0, weight1, textbook
               // weight0, textbook weight1, max, total, textbook max, textbook total,
               // keep0, keep1}
  long long n;
  int base_2;
};

extern "C" __global__ void divide_weights(const PairArgs args) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < args.n) {
    const float b = args.b[i];
    const float y = weight_reciprocal(b);
    args.out[2 * i] = divide_weight(args.a[i], b, y);
    args.out[2 * i + 1] = reciprocal_weight(b, y);
  }
}

extern "C" __global__ void two_partial_states(const PairArgs args) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= args.n) return;
  const bool base_2 = args.base_2 != 0;
  const float l0 = args.a[i], l1 = args.b[i];
  const TwoPartialState w = two_partial_state(l0, l1, true, base_2);
  // the textbook formula: both exponentials, IEEE division
  const float inf = __int_as_float(0x7f800000);
  const float p = l0 == inf ? -inf : l0, s = l1 == inf ? -inf : l1;
  float m = (p != p || s != s) ? __int_as_float(0x7fffffff) : fmaxf(p, s);
  const bool empty = m == -inf;
  if (empty) m = 0.0f;
  const float e0 = base_2 ? exp2f(p - m) : expf(p - m);
  const float e1 = base_2 ? exp2f(s - m) : expf(s - m);
  const float total = e0 + e1;
  float* out = args.out + 10 * i;
  out[0] = w.weight0;
  out[1] = w.weight1;
  out[2] = empty ? 0.0f : __fdiv_rn(e0, total);
  out[3] = empty ? 0.0f : __fdiv_rn(e1, total);
  out[4] = w.max;
  out[5] = w.total;
  out[6] = m;
  out[7] = total;
  out[8] = w.keep0 ? 1.0f : 0.0f;
  out[9] = w.keep1 ? 1.0f : 0.0f;
}

}  // namespace attnmerge
"""
_BLOCK = 256


def _compile(arch: str) -> bytes:
    """The test kernels, built as the launcher builds the merge kernel: NVRTC, with the
    kernel sources as headers (merge.cuh includes epilogues.cuh, which includes
    common.cuh)."""
    return nvrtc.compile_cubin(
        _KERNELS, name="two_partial_states.cu", arch=arch, headers=cuda_backend.sources()
    ).cubin


@pytest.fixture(scope="module")
def kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = cuda_backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    dev = torch.cuda.current_device()
    arch = cuda_backend.arch_of(torch.cuda.get_device_capability(dev))
    cubin = _compile(arch)
    loaded = {
        name: driver.load_kernel(cubin, name, dev, _BLOCK)
        for name in ("divide_weights", "two_partial_states")
    }

    def run(name: str, a: torch.Tensor, b: torch.Tensor, width: int, base_2: bool = False):
        a, b = a.cuda(), b.cuda()
        out = torch.empty(a.numel(), width, device="cuda")
        params = struct.pack(
            "<3Qqi4x", a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel(), base_2
        )
        grid = -(-a.numel() // _BLOCK)
        loaded[name].launch(grid, torch.cuda.current_stream().cuda_stream, params)
        return out.cpu()

    return run


@triton.jit
def _triton_divide(a_ptr, b_ptr, quotient_ptr, reciprocal_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    a = tl.load(a_ptr + i, mask=ok)
    b = tl.load(b_ptr + i, mask=ok, other=1.0)
    reciprocal, quotient = merge_kernel._weights_of(a, b)
    tl.store(quotient_ptr + i, quotient, mask=ok)
    tl.store(reciprocal_ptr + i, reciprocal, mask=ok)


@pytest.fixture(scope="module", params=["cuda", "triton"])
def divide(request):
    """(a / b, 1 / b) by one kernel's weight division, on the GPU."""
    if request.param == "cuda":
        run = request.getfixturevalue("kernels")
        return lambda a, b: tuple(run("divide_weights", a, b, 2).unbind(1))
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert merge_kernel._RECIPROCAL_DIVISION, "the interpreter's path would be checked"

    def run_triton(a: torch.Tensor, b: torch.Tensor):
        a, b = a.cuda(), b.cuda()
        quotient, reciprocal = torch.empty_like(a), torch.empty_like(a)
        grid = (triton.cdiv(a.numel(), 1024),)
        _triton_divide[grid](a, b, quotient, reciprocal, a.numel(), BLOCK=1024)
        return quotient.cpu(), reciprocal.cpu()

    return run_triton


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str, inputs) -> None:
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN positions differ"
    bad = (_bits(got) != _bits(want)) & ~nan
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {want.numel()} differ, e.g. at inputs "
        f"{[x[bad][:4].tolist() for x in inputs]}: {got[bad][:4].tolist()} "
        f"vs {want[bad][:4].tolist()}"
    )


def _check_division(divide, a: torch.Tensor, b: torch.Tensor) -> None:
    quotient, reciprocal = divide(a, b)
    _assert_same(quotient, a / b, "quotients", (a, b))  # CPU float32: IEEE, nearest even
    _assert_same(reciprocal, 1.0 / b, "reciprocals", (b,))


def _exponentials(n: int, g: torch.Generator) -> torch.Tensor:
    """e = exp(-gap), log-uniform over the whole float range down to 2^-149, and 0."""
    e = torch.exp2(-150.0 * torch.rand(n, generator=g))
    e[::97] = 0.0
    return e


def test_division_of_a_rows_operands(divide):
    # b = 1 + e, a = 1 or e: exactly the operands two_partial_state gives it
    g = torch.Generator().manual_seed(0)
    e = _exponentials(1 << 23, g)
    b = 1.0 + e
    _check_division(divide, e, b)
    _check_division(divide, torch.ones_like(b), b)


def test_division_of_any_normal_numerator(divide):
    # the stronger property the proof gives: any a in [2^-100, 1] over b in [1, 2)
    g = torch.Generator().manual_seed(1)
    n = 1 << 23
    b = 1.0 + torch.rand(n, generator=g)
    a = torch.exp2(-100.0 * torch.rand(n, generator=g))
    _check_division(divide, a, b)


def test_division_by_every_denominator_near_the_ends(divide):
    # b = 1 + k ulp and 2 - k ulp for the first 2^20 k, with a = 1 and a = b - 1 (exact)
    k = torch.arange(1 << 20, dtype=torch.int32)
    one, two = torch.tensor(1.0).view(torch.int32), torch.tensor(2.0).view(torch.int32)
    b = torch.cat([(one + k).view(torch.float32), (two - k).view(torch.float32)])
    _check_division(divide, torch.ones_like(b), b)
    _check_division(divide, b - 1.0, b)


def test_division_by_one_keeps_subnormals(divide):
    a = torch.tensor([0.0, 2.0**-149, 2.0**-140, 2.0**-126, 2.0**-101, 2.0**-24, 1.0])
    _check_division(divide, a, torch.ones_like(a))
    _check_division(divide, torch.tensor([float("nan")] * 3), torch.tensor([1.0, 1.5, 2.0]))


def _check_weights(kernels, l0: torch.Tensor, l1: torch.Tensor, base_2: bool) -> None:
    out = kernels("two_partial_states", l0, l1, 10, base_2)
    inputs = (l0, l1)
    _assert_same(out[:, 0], out[:, 2], "first partial's weights", inputs)
    _assert_same(out[:, 1], out[:, 3], "second partial's weights", inputs)
    # the rows the combine keeps, decided before the weights: those of nonzero (or NaN)
    # weight, exactly
    for keep, weight, what in ((8, 2, "kept first partials"), (9, 3, "kept second partials")):
        wrong = (out[:, keep] != 0) != (out[:, weight] != 0)
        assert not bool(wrong.any()), f"{what}: wrong at inputs {l0[wrong][:4]}, {l1[wrong][:4]}"
    # the output LSE's terms: the same max and sum of exponentials (0 marks empty)
    empty = out[:, 5] == 0
    _assert_same(out[:, 4][~empty], out[:, 6][~empty], "maxima", (l0[~empty], l1[~empty]))
    _assert_same(out[:, 5][~empty], out[:, 7][~empty], "totals", (l0[~empty], l1[~empty]))
    textbook_empty = (l0.isinf() & l1.isinf()).cpu()
    assert torch.equal(empty, textbook_empty)


@pytest.mark.parametrize("base_2", [False, True], ids=["base_e", "base_2"])
def test_weights_on_random_lses(kernels, base_2):
    g = torch.Generator().manual_seed(2 + base_2)
    n = 1 << 22
    l0 = 40.0 * torch.randn(n, generator=g)
    # gaps spread over 0 to 160 (past every exponential's underflow), either sign
    gap = 160.0 * torch.rand(n, generator=g) ** 2
    l1 = l0 + torch.where(torch.rand(n, generator=g) < 0.5, gap, -gap)
    _check_weights(kernels, l0, l1, base_2)


@pytest.mark.parametrize("base_2", [False, True], ids=["base_e", "base_2"])
def test_weights_on_special_lses(kernels, base_2):
    inf, nan = float("inf"), float("nan")
    values = [-inf, inf, nan, 0.0, -0.0, 1.0, -1.0, 87.0, -87.0, 104.0, 150.0, -150.0,
              1e30, -1e30, 3.4e38, -3.4e38, 1e-40]  # fmt: skip
    v = torch.tensor(values)
    l0, l1 = v.repeat_interleave(len(values)), v.repeat(len(values))
    _check_weights(kernels, l0, l1, base_2)
    # equal LSEs and neighbours one ulp apart
    x = 30.0 * torch.randn(1 << 16, generator=torch.Generator().manual_seed(4))
    up = (x.view(torch.int32) + 1).view(torch.float32)
    _check_weights(kernels, x, x, base_2)
    _check_weights(kernels, x, up, base_2)
