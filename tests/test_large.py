"""GPU only: 64-bit offsets. Element offsets past 2^31 must not wrap around in the
kernels' address arithmetic (token * stride, head * stride, storage offsets), whether
they come from huge strides over a few rows or from tensors of more than 2^31 elements."""

from __future__ import annotations

import pytest
import torch
from utils import FP8, assert_lse_close, assert_output_close

import attnmerge
from attnmerge.reference import merge_states_reference

pytestmark = pytest.mark.gpu

H, D = 4, 128
BIG = 2**31
GPU_BACKENDS = ["triton", "cuda"]
# (T, token stride): a stride just over 2^30 (an int32 argument; token 2 starts past
# element 2^31), and a stride over 2^31 itself (an int64 argument; token 1 past 2^31).
TOKEN_STRIDES = [(3, 2**30 + 64), (2, 2**31 + 64)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, FP8], ids=str)
@pytest.mark.parametrize("huge_lse_stride", [False, True])
@pytest.mark.parametrize(("T", "STRIDE_T"), TOKEN_STRIDES, ids=["stride_2^30", "stride_2^31"])
def test_offsets_beyond_2_pow_31(backend, out_dtype, huge_lse_stride, T, STRIDE_T):
    g = torch.Generator().manual_seed(0)
    # One bf16 buffer of 2^31 + 2^20 elements (4.3 GB): the prefix rows at its start with
    # a huge token stride, the suffix as a view whose storage offset exceeds 2^31. The
    # output uses the same token stride, 2^15 (or 2^16) elements further on.
    buf = torch.full((BIG + 2**20,), float("nan"), dtype=torch.bfloat16, device="cuda")
    prefix = buf.as_strided((T, H, D), (STRIDE_T, D, 1), 0)
    suffix = buf[BIG + 2**19 : BIG + 2**19 + T * H * D].view(T, H, D)
    assert suffix.storage_offset() > BIG
    assert prefix.stride(0) * (T - 1) > BIG
    assert (T - 1) * STRIDE_T + 2**16 + H * D < BIG + 2**19  # no overlap with the suffix
    prefix.copy_(torch.randn(T, H, D, generator=g))
    suffix.copy_(torch.randn(T, H, D, generator=g))
    if out_dtype == torch.bfloat16:
        # the output interleaved in the same buffer, same huge token stride
        output = buf.as_strided((T, H, D), (STRIDE_T, D, 1), 2**15)
        scale = None
    else:
        obuf = torch.zeros(BIG + 2**20, dtype=torch.uint8, device="cuda")
        output = obuf.as_strided((T, H, D), (STRIDE_T, D, 1), 2**16).view(FP8)
        scale = torch.tensor([0.02], device="cuda")
    if out_dtype == FP8:
        output.view(torch.uint8).fill_(0x55)
    else:
        output.fill_(7.0)
    pl = torch.randn(H, T, generator=g).cuda()
    sl = torch.randn(H, T, generator=g).cuda()
    if huge_lse_stride:
        # output LSE [H, T] with a token stride past 2^30 (float32: 8.6 GB)
        lbuf = torch.zeros(BIG + 2**10, dtype=torch.float32, device="cuda")
        output_lse = lbuf.as_strided((H, T), (1, 2**30 + 8), 0)
    else:
        output_lse = torch.empty(H, T, device="cuda")

    ref_out, ref_lse = merge_states_reference((prefix.clone(), suffix.clone()), (pl, sl))
    mag, _ = merge_states_reference((prefix.float().abs(), suffix.float().abs()), (pl, sl))
    attnmerge.merge_attn_states(
        output, prefix, pl, suffix, sl, output_lse, None, scale, backend=backend
    )
    torch.cuda.synchronize()
    assert_output_close(output, ref_out, mag, scale, "64-bit offsets")
    assert_lse_close(output_lse, ref_lse)
    # the prefix rows (read, not written) are unchanged; nothing NaN leaked in
    assert not prefix.isnan().any() and not suffix.isnan().any()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_pow_31_elements(backend):
    # 1.1M tokens x 16 heads x 128: 2.25e9 elements per partial (4.5 GB in bf16) and 17.6M
    # rows, merged into FP8 with tail tokens and empty prefix rows; checked against the
    # reference a slice of tokens at a time (the fp32 reference of the whole would need
    # tens of GB).
    T, H, D, P = 1_100_000, 16, 128, 1_099_000
    assert T * H * D > BIG
    g = torch.Generator(device="cuda").manual_seed(0)
    prefix = torch.randn(T, H, D, generator=g, device="cuda", dtype=torch.bfloat16)
    suffix = torch.randn(T, H, D, generator=g, device="cuda", dtype=torch.bfloat16)
    pl = torch.randn(H, T, generator=g, device="cuda") * 3
    sl = torch.randn(H, T, generator=g, device="cuda") * 3
    pl[:, ::97] = float("inf")  # empty prefix rows (FlashAttention's +inf)
    output = torch.empty(T, H, D, dtype=FP8, device="cuda")
    output_lse = torch.empty(H, T, device="cuda")
    scale = torch.tensor([0.05], device="cuda")
    attnmerge.merge_attn_states(
        output, prefix, pl, suffix, sl, output_lse, P, scale, backend=backend
    )
    torch.cuda.synchronize()
    chunk = 1 << 16
    for t0 in range(0, T, chunk):
        tokens = slice(t0, min(t0 + chunk, T))
        n = tokens.stop - t0
        p_local = min(max(P - t0, 0), n)
        lses = (pl[:, tokens], sl[:, tokens])
        ref, ref_lse = merge_states_reference(
            (prefix[tokens], suffix[tokens]), lses, prefill_tokens_with_context=p_local
        )
        mag, _ = merge_states_reference(
            (prefix[tokens].float().abs(), suffix[tokens].float().abs()),
            lses,
            prefill_tokens_with_context=p_local,
        )
        assert_output_close(output[tokens], ref, mag, scale, f"tokens {t0}..{tokens.stop}")
        assert_lse_close(output_lse[:, tokens], ref_lse)
