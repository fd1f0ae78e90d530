"""Representative merges for compute-sanitizer (memcheck, racecheck, initcheck).

Run under the sanitizer with PyTorch's caching allocator off, so that every tensor is its
own allocation and an out-of-bounds access is caught at the tensor's edge:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        python3 scripts/sanitize_cases.py [backend ...]

Each case is also checked against the reference, so a run that the sanitizer passes but
that computes garbage still fails (exit code 1). The cases run through the public API; their
sizes range from one row to 65536, so that the backends pick their different kernel
layouts themselves: two partials, K partials stacked and packed, and the dynamic FP8
formats (the token tiles' shared memory and named barriers among them).
"""

from __future__ import annotations

import sys

import torch

import attnmerge
from attnmerge.reference import merge_states_reference, quantize_fp8_static


def _lse(H: int, T: int, layout: str, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(H, T, generator=g, device="cuda") * 4
    x[0, ::5] = float("inf")
    x[-1, 1::7] = float("-inf")
    if layout == "TH":
        return x.t().contiguous().t()  # a [T, H]-stored LSE, seen as [H, T]
    return x


def _close(out: torch.Tensor, ref: torch.Tensor, fp8: bool) -> bool:
    """NaN where the reference has it, else close: FP8 one code apart at most (GPU exp
    rounding), floats a few ulps of fp32."""
    a, b = out.float(), ref.float()
    tol = b.abs().nan_to_num(0) * (0.13 if fp8 else 1e-2) + 1e-6
    same_nan = torch.equal(a.isnan(), b.isnan())
    return same_nan and bool(((a - b).abs().nan_to_num(0) <= tol).all())


def _states(T, H, D, dtype, head_pad, g):
    full = torch.randn(T, H, D + head_pad, generator=g, device="cuda").to(dtype)
    return full[..., :D]  # a padded-V view: head stride D + head_pad


CASES = [
    # T, H, D, dtype, out dtype, head pad, LSE layout, P, alias, base
    (1, 8, 128, torch.bfloat16, torch.float8_e4m3fn, 0, "HT", None, None, "e"),
    (37, 5, 72, torch.float16, torch.float16, 8, "TH", 30, None, "e"),
    (64, 4, 80, torch.float32, torch.bfloat16, 0, "HT", 0, None, 2),
    (19, 3, 13, torch.bfloat16, torch.float32, 3, "TH", 19, None, "e"),
    (256, 16, 192, torch.bfloat16, torch.bfloat16, 0, "HT", 200, "output", "e"),
    (33, 2, 512, torch.float32, torch.float32, 0, "HT", None, "lse", 2),
    (7, 9, 576, torch.bfloat16, torch.float8_e4m3fn, 64, "TH", 5, None, "e"),
    (2048, 32, 128, torch.bfloat16, torch.float8_e4m3fn, 0, "HT", 2000, None, "e"),
    (1024, 16, 64, torch.float32, torch.float32, 0, "TH", None, "lse", "e"),
]


def run(backend: str) -> int:
    g = torch.Generator(device="cuda").manual_seed(0)
    failures = 0
    for T, H, D, dtype, out_dtype, pad, layout, P, alias, base in CASES:
        p, s = _states(T, H, D, dtype, pad, g), _states(T, H, D, dtype, pad, g)
        lp, ls = _lse(H, T, layout, g), _lse(H, T, layout, g)
        scale = torch.tensor([0.05], device="cuda") if out_dtype == torch.float8_e4m3fn else None
        ref, ref_lse = merge_states_reference(
            (p, s), (lp, ls), lse_base_2=base == 2, prefill_tokens_with_context=P
        )
        ref = quantize_fp8_static(ref, scale) if scale is not None else ref.to(out_dtype)
        if alias == "output":
            out = p  # in-place into the prefix
        else:
            out = torch.empty(T, H, D, dtype=out_dtype, device="cuda")
        out_lse = lp if alias == "lse" else torch.empty(H, T, device="cuda")
        attnmerge.merge_attn_states(
            out, p, lp, s, ls, out_lse, P, scale, lse_base=base, backend=backend
        )
        torch.cuda.synchronize()
        ok = _close(out, ref, fp8=scale is not None)
        lse_ok = torch.allclose(out_lse, ref_lse, rtol=1e-5, atol=1e-5, equal_nan=True)
        status = "ok" if ok and lse_ok else "MISMATCH"
        failures += status != "ok"
        print(
            f"{backend:6} T={T:<4} H={H:<3} D={D:<4} {str(dtype)[6:]:>8} -> "
            f"{str(out_dtype)[6:]:<14} P={P} alias={alias} base={base}: {status}"
        )
    return failures


KWAY_CASES = [
    # K (None: packed rows), T, H, D, dtype, out dtype, in place, base
    (3, 1, 8, 128, torch.bfloat16, torch.float8_e4m3fn, False, "e"),
    (16, 5, 8, 128, torch.bfloat16, torch.bfloat16, True, "e"),
    (7, 37, 3, 72, torch.float16, torch.float32, False, 2),
    (5, 9, 2, 576, torch.float32, torch.float32, True, "e"),
    (64, 3, 4, 13, torch.float32, torch.bfloat16, False, "e"),
    (None, 40, 8, 128, torch.bfloat16, torch.float8_e4m3fn, False, "e"),
    (None, 7, 3, 576, torch.float32, torch.float32, False, 2),
]


def run_kway(backend: str) -> int:
    """K partials, stacked (in place into the first partial and its LSE where asked) or
    packed rows whose indptr runs past the rows (clamped by the kernels)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    failures = 0
    for K, T, H, D, dtype, out_dtype, in_place, base in KWAY_CASES:
        scale = torch.tensor([0.05], device="cuda") if out_dtype == torch.float8_e4m3fn else None
        quant = attnmerge.FP8Static(scale) if scale is not None else attnmerge.Plain(out_dtype)
        if K is None:
            counts = torch.randint(0, 12, (T,), generator=g, device="cuda")
            indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()
            n = int(indptr[-1]) - 3  # the last rows' ranges end past the packed rows
            indptr[-1] += 5
            outputs = torch.randn(n, H, D, generator=g, device="cuda").to(dtype)
            lses = _lse(H, n, "TH", g)
            kwargs = {"indptr": indptr}
        else:
            outputs = torch.randn(K, T, H, D, generator=g, device="cuda").to(dtype)
            lses = torch.stack([_lse(H, T, "HT", g) for _ in range(K)])
            kwargs = {}
        args = dict(quant=quant, lse_base=base, return_lse=True, **kwargs)
        ref = attnmerge.merge(outputs, lses, backend="torch", **args)
        if in_place:  # plain output of the partials' dtype only
            outputs, lses = outputs.clone(), lses.clone()
            args |= {"out": outputs[0], "out_lse": lses[0]}
        res = attnmerge.merge(outputs, lses, backend=backend, **args)
        torch.cuda.synchronize()
        ok = _close(res.output, ref.output, fp8=scale is not None)
        lse_ok = torch.allclose(res.lse, ref.lse, rtol=1e-5, atol=1e-5, equal_nan=True)
        status = "ok" if ok and lse_ok else "MISMATCH"
        failures += status != "ok"
        print(
            f"{backend:6} K={K or 'packed'} T={T:<4} H={H:<3} D={D:<4} {str(dtype)[6:]:>8} -> "
            f"{str(out_dtype)[6:]:<14} in_place={in_place} base={base}: {status}"
        )
    return failures


FORMAT_CASES = [
    # K (2: two separate partials; None: packed rows), T, H, D, format, misaligned
    (2, 33, 32, 128, attnmerge.FP8PerToken(), False),
    (8, 9, 16, 128, attnmerge.FP8PerToken(), False),  # token tiles with staged LSEs
    (None, 7, 4, 96, attnmerge.FP8PerToken(), False),
    (2, 5, 4, 96, attnmerge.FP8PerTokenGroup(64, ue8m0=True, layout="ue8m0_packed"), False),
    (4, 6, 2, 192, attnmerge.FP8PerTokenGroup(128, layout="col_major_tma"), True),
    (2, 40, 8, 128, attnmerge.FP8PerTokenGroup(128), False),
]


def run_formats(backend: str) -> int:
    """Dynamic FP8 formats: the token tiles (per-token scales; groups that span heads
    unevenly, with scalar accesses where misaligned) and a group store, against the torch
    backend (FP8 codes one apart at most, scales to float32 rounding)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    failures = 0
    for K, T, H, D, fmt, misaligned in FORMAT_CASES:
        if fmt.kernel_gap(fmt.key, D, backend) is not None:
            continue
        if K is None:
            counts = torch.randint(0, 6, (T,), generator=g, device="cuda")
            indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            n = int(indptr[-1])
            outputs = torch.randn(n, H, D, generator=g, device="cuda").bfloat16()
            lses, kwargs = _lse(H, n, "TH", g), {"indptr": indptr}
        else:
            shape = (K, T, H, D)
            flat = torch.randn(torch.Size(shape).numel() + misaligned, generator=g, device="cuda")
            outputs = flat.bfloat16()[misaligned:].view(shape)
            lses, kwargs = torch.stack([_lse(H, T, "HT", g) for _ in range(K)]), {}
            if K == 2:
                outputs, lses = list(outputs), list(lses)
        ref = attnmerge.merge(outputs, lses, quant=fmt, backend="torch", **kwargs)
        res = attnmerge.merge(outputs, lses, quant=fmt, backend=backend, **kwargs)
        torch.cuda.synchronize()
        ok = _close(res.output, ref.output, fp8=True)
        got, want = res.scales.view(torch.float32), ref.scales.view(torch.float32)
        if res.scales.dtype == torch.int32:  # packed UE8M0 bytes: equal, or one step apart
            got, want = res.scales.view(torch.uint8).float(), ref.scales.view(torch.uint8).float()
        scales_ok = torch.allclose(got, want, rtol=1e-5, atol=1.0, equal_nan=True)
        status = "ok" if ok and scales_ok else "MISMATCH"
        failures += status != "ok"
        print(
            f"{backend:6} K={K or 'packed'} T={T:<4} H={H:<3} D={D:<4} {type(fmt).__name__} "
            f"{getattr(fmt, 'layout', '')} misaligned={misaligned}: {status}"
        )
    return failures


if __name__ == "__main__":
    backends = sys.argv[1:] or ["cuda", "triton"]
    bad = sum(run(b) + run_kway(b) + run_formats(b) for b in backends)
    print("sanitize cases:", "all ok" if not bad else f"{bad} mismatches")
    sys.exit(1 if bad else 0)
