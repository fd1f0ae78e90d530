"""The kernels' stores of the dynamic FP8 formats (docs/contract.md C37) against the format's
reference quantiser, bit for bit: Triton's (under the interpreter on a CPU) and, on a GPU,
the cuda backend's (on a CPU through its kernel emulator: tests/test_formats_cuda_emulated.py).

A kernel's merged float32 values may differ from the torch reference's by the ulps C23
allows (its exponential is not torch's), and a group's scale follows its amax. So each
check quantises the backend's own float32 result (the same merge into a float32 output,
whose values are the ones its store sees) with the format's reference quantiser, and
compares the backend's FP8 output and scales with that, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from utils import INF, NAN, ON_GPU, assert_bits_equal

import attnmerge
from attnmerge import FP8PerTokenGroup

# Triton runs on a CPU only under its interpreter, which conftest turns on where no GPU is.
BACKENDS = [("triton", "cuda"), ("cuda", "cuda")] if ON_GPU else [("triton", "cpu")]
LAYOUTS = ["row_major", "col_major", "col_major_tma"]


def partials(form: str, tokens: int, heads: int, head_size: int, seed: int, device: str):
    """(outputs, lses, merge keywords) of one input form, with empty, NaN and infinite
    entries: a two-way sequence (the two-partial kernel), stacked K = 3, packed rows."""
    g = torch.Generator().manual_seed(seed)
    k = 2 if form == "pair" else 3
    o = torch.randn(k, tokens, heads, head_size, generator=g) * 4
    lse = torch.randn(k, heads, tokens, generator=g) * 3
    lse[0, 0, 0] = INF  # an empty partial
    lse[:, heads - 1, tokens - 1] = -INF  # an empty row: zeros, the smallest scale
    o[1, 0, 0, 5] = NAN  # a NaN in a weighted row: its group is NaN
    if tokens > 1:
        o[0, 1, 0, 3] = INF  # an infinite value: scale +inf
        lse[0, 0, 1] = 50.0
    o, lse = o.to(device), lse.to(device)
    if form == "pair":
        return [o[0], o[1]], [lse[0], lse[1]], {}
    if form == "stacked":
        return o, lse, {}
    counts = torch.arange(tokens) % 4  # 0 to 3 rows per token
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    n = int(indptr[-1])
    rows = torch.randn(n, heads, head_size, generator=g).to(device)
    row_lses = (torch.randn(heads, n, generator=g) * 3).to(device)
    return rows, row_lses, {"indptr": indptr.to(device)}


def expected(fmt: FP8PerTokenGroup, merged: torch.Tensor):
    """The reference quantiser on the backend's own float32 result."""
    return fmt.quantize_with_scales(merged.cpu())


def valid_scales(scales: torch.Tensor) -> torch.Tensor:
    """The [T, G] scales as values (a TMA-aligned tensor's padding left out)."""
    return scales.cpu().contiguous()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("form", ["pair", "stacked", "packed"])
@pytest.mark.parametrize(
    "heads, head_size, group_size", [(2, 128, 128), (3, 128, 64), (2, 64, 64), (2, 192, 64)]
)
@pytest.mark.parametrize("ue8m0", [False, True])
def test_group_store_is_the_reference_quantiser(
    backend, device, form, heads, head_size, group_size, ue8m0
):
    tokens = 5
    outs, lses, kw = partials(form, tokens, heads, head_size, head_size + tokens, device)
    merged = attnmerge.merge(outs, lses, out_dtype=torch.float32, backend=backend, **kw).output
    for layout in LAYOUTS:
        fmt = FP8PerTokenGroup(group_size, ue8m0=ue8m0, layout=layout)
        res = attnmerge.merge(outs, lses, quant=fmt, backend=backend, return_lse=True, **kw)
        want_q, want_scales = expected(fmt, merged)
        assert_bits_equal(res.output.cpu(), want_q, f"{layout}: output")
        assert_bits_equal(valid_scales(res.scales), want_scales, f"{layout}: scales")
        allocated = fmt.with_scales(tokens, heads, head_size, "cpu").scales
        assert res.scales.stride() == allocated.stride()


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_group_store_with_prefill_tokens_and_strides(backend, device):
    """Tokens past prefill_tokens_with_context (a copy of the suffix, quantised), strided
    partials and output, and scales the caller passes."""
    tokens, heads, head_size = 6, 2, 128
    big = torch.randn(2, tokens, heads + 1, head_size + 64, device=device)
    prefix, suffix = big[0, :, :heads, :head_size], big[1, :, 1:, 64:]
    prefix_lse = torch.randn(heads, tokens, device=device)
    suffix_lse = torch.randn(tokens, heads, device=device).t()
    out = torch.empty(tokens, heads + 2, head_size, dtype=torch.float8_e4m3fn, device=device)
    out = out[:, 1:-1]
    fmt = FP8PerTokenGroup(64, layout="col_major_tma")
    fmt = fmt.with_scales(tokens, heads, head_size, device)
    args = ([prefix, suffix], [prefix_lse, suffix_lse])
    kw = {"prefill_tokens_with_context": 4, "backend": backend}
    merged = attnmerge.merge(*args, out_dtype=torch.float32, **kw).output
    res = attnmerge.merge(*args, quant=fmt, out=out, **kw)
    assert res.output is out and res.scales is fmt.scales
    want_q, want_scales = expected(fmt, merged)
    assert_bits_equal(out.cpu(), want_q, "output")
    assert_bits_equal(valid_scales(fmt.scales), want_scales, "scales")


def test_both_kernel_backends_have_the_store(clean_dispatch, monkeypatch):
    """Dispatch passes the format on to the cuda and triton backends (each then answers for
    its device) whether its groups lie within a head, are whole heads of a power-of-two
    size or span heads otherwise (the cuda backend's token tiles, the triton backend's rows
    of part of a head); the triton backend refuses groups whose programs would exceed its
    tiles (lcm(D, G) above 16384 values: odd head sizes past 128)."""
    from attnmerge import dispatch
    from attnmerge.call import CallSignature

    class ServesAll:
        def unsupported(self, signature):
            return None

    for backend in ("cuda", "triton"):
        monkeypatch.setitem(dispatch.REGISTRY, backend, ServesAll())
        too_wide = None if backend == "cuda" else "lcm(258, 128) = 16512 values"
        for head_size, reason in ((128, None), (256, None), (64, None), (32, None),
                                  (96, None), (192, None), (40, None), (258, too_wide),
                                  (254, None)):  # fmt: skip
            sig = CallSignature(
                torch.device("cuda"), (torch.bfloat16,) * 2, head_size,
                FP8PerTokenGroup(128).key, False, False,
            )  # fmt: skip
            got = dispatch._unsupported(backend, sig)
            assert got is None if reason is None else reason in got
