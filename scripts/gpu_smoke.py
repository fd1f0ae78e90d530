"""Quick GPU sanity check of every backend against the reference (a few shapes).

Faster than the test suite; used for a first look at a new kernel on a GPU.
"""

import torch

import attnmerge
from attnmerge.reference import merge_states_reference, quantize_fp8_static

torch.manual_seed(0)
worst = 0
for T, H, D, dt, fp8 in [
    (1, 8, 128, torch.bfloat16, True),
    (77, 16, 72, torch.float16, False),
    (300, 4, 512, torch.float32, True),
    (5, 3, 8, torch.bfloat16, False),
]:
    p = torch.randn(T, H, D, device="cuda", dtype=dt)
    s = torch.randn(T, H, D, device="cuda", dtype=dt)
    lp = torch.randn(H, T, device="cuda") * 5
    ls = torch.randn(H, T, device="cuda") * 5
    lp[0, ::3] = float("inf")
    ls[0, ::2] = float("-inf")
    scale = torch.tensor([0.02], device="cuda") if fp8 else None
    ref, ref_lse = merge_states_reference((p, s), (lp, ls), prefill_tokens_with_context=T - 1)
    ref = quantize_fp8_static(ref, scale) if fp8 else ref.to(dt)
    for backend in ("triton", "torch"):
        out = torch.full_like(ref, 7.0) if not fp8 else torch.empty_like(ref)
        lse = torch.empty(H, T, device="cuda")
        attnmerge.merge_attn_states(out, p, lp, s, ls, lse, T - 1, scale, backend=backend)
        if fp8:
            d = (out.view(torch.uint8).int() - ref.view(torch.uint8).int()).abs().max().item()
        else:
            d = (out.float() - ref.float()).abs().max().item()
        e = (lse - ref_lse).abs().nan_to_num(0).max().item()
        worst = max(worst, d)
        print(f"T={T} H={H} D={D} {dt} fp8={fp8} {backend}: max diff {d:.3g}, lse diff {e:.3g}")
print("worst", worst)
