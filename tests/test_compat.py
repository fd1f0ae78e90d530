"""attnmerge.compat: FlashInfer's and SGLang's merge functions on attnmerge.

Each function is checked for its upstream argument names and order, layouts and dtypes of
what it returns, its LSE base, in-place updates and FlashInfer's mask, and that its
results are attnmerge.merge's / merge_attn_states' bit for bit, called on views of the
caller's tensors. The last tests check the layout recipes of docs/integration.md. The
upstream test files themselves run in tests/upstream.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from utils import FLOAT_DTYPES, as_int, assert_bits_equal, dtype_name

import attnmerge
import attnmerge.compat as compat

INF, NAN = float("inf"), float("nan")
T, H, D = 5, 3, 16


def partials(k: int, dtype=torch.float16, device="cpu", seed=0, t=T, h=H, d=D):
    """k partial outputs [T, H, D] and LSEs stored [T, H] (the engines' layout)."""
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(t, h, d, generator=g).to(device=device, dtype=dtype) for _ in range(k)]
    ss = [(3 * torch.randn(t, h, generator=g)).to(device) for _ in range(k)]
    return vs, ss


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical bytes (NaN payloads included)."""
    return a.dtype == b.dtype and torch.equal(as_int(a.contiguous()), as_int(b.contiguous()))


def merge_ref64(vs, ss, base):
    """Independent float64 merge of finite states (LSEs stored [T, H])."""
    s = torch.stack([x.double() for x in ss]) * (math.log(2) if base == 2 else 1.0)
    w = torch.softmax(s, dim=0)
    out = sum(w[k, ..., None] * vs[k].double() for k in range(len(vs)))
    lse = torch.logsumexp(s, dim=0) / (math.log(2) if base == 2 else 1.0)
    return out, lse


# --- Signatures: upstream names and order --------------------------------------------


@pytest.mark.parametrize(
    ("fn", "params"),
    [
        (compat.merge_state, ["v_a", "s_a", "v_b", "s_b"]),
        (compat.merge_state_in_place, ["v", "s", "v_other", "s_other", "mask"]),
        (compat.merge_states, ["v", "s"]),
        (compat.merge_state_v2, ["v_a", "s_a", "v_b", "s_b", "v_merged", "s_merged"]),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_signature_matches_upstream(fn, params):
    sig = inspect.signature(fn).parameters
    positional = [n for n, p in sig.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == params
    assert sig["backend"].kind is inspect.Parameter.KEYWORD_ONLY


def test_public_namespace():
    assert attnmerge.compat is compat
    assert set(compat.__all__) == {
        "merge_state",
        "merge_state_in_place",
        "merge_states",
        "merge_state_v2",
    }


# --- No copies: attnmerge is called on views of the caller's tensors ----------------


@pytest.fixture
def calls(monkeypatch):
    """The tensor arguments compat passes to merge / merge_attn_states."""
    seen = []

    def spy(fn):
        def wrapper(*args, **kwargs):
            flat = [*args, *kwargs.values()]
            for a in flat:
                seen.extend(a if isinstance(a, (list, tuple)) else [a])
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(compat, "merge", spy(attnmerge.merge))
    monkeypatch.setattr(compat, "merge_attn_states", spy(attnmerge.merge_attn_states))
    return seen


def passed_as_views(seen, *tensors):
    ptrs = {t.data_ptr() for t in seen if isinstance(t, torch.Tensor)}
    return all(t.data_ptr() in ptrs for t in tensors)


def test_no_input_copies(calls):
    (va, vb), (sa, sb) = partials(2)
    compat.merge_state(va, sa, vb, sb)
    assert passed_as_views(calls, va, sa, vb, sb)
    calls.clear()
    v, s = va.clone(), sa.clone()
    compat.merge_state_in_place(v, s, vb, sb)
    assert passed_as_views(calls, v, s, vb, sb)
    calls.clear()
    compat.merge_state_in_place(v, s, vb, sb, mask=torch.ones(T, dtype=torch.bool))
    assert passed_as_views(calls, v, s, vb, sb)
    calls.clear()
    stacked_v, stacked_s = torch.stack([va, vb], dim=1), torch.stack([sa, sb], dim=1)
    compat.merge_states(stacked_v, stacked_s)
    assert passed_as_views(calls, stacked_v, stacked_s)
    calls.clear()
    out, out_lse = torch.empty_like(va), torch.empty_like(sa)
    compat.merge_state_v2(va, sa, vb, sb, out, out_lse)
    assert passed_as_views(calls, va, sa, vb, sb, out, out_lse)


# --- FlashInfer merge_state ------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
def test_merge_state_equals_merge(backend_device, dtype):
    backend, device = backend_device
    (va, vb), (sa, sb) = partials(2, dtype, device)
    v, s = compat.merge_state(va, sa, vb, sb, backend=backend)
    res = attnmerge.merge([va, vb], [sa.t(), sb.t()], lse_base=2, return_lse=True, backend=backend)
    assert v.shape == (T, H, D) and v.dtype == dtype
    assert s.shape == (T, H) and s.dtype == torch.float32 and s.is_contiguous()
    assert_bits_equal(v, res.output, "v_merged")
    assert_bits_equal(s, res.lse.t(), "s_merged")


def test_merge_state_is_base_2():
    (va, vb), (sa, sb) = partials(2, torch.float32)
    v, s = compat.merge_state(va, sa, vb, sb)
    ref_v, ref_s = merge_ref64([va, vb], [sa, sb], base=2)
    torch.testing.assert_close(v.double(), ref_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-6, atol=1e-6)
    natural = attnmerge.merge([va, vb], [sa.t(), sb.t()], return_lse=True)
    assert not torch.allclose(v, natural.output)


def test_merge_state_dtypes_and_views():
    """v_b of another dtype than v_a, and partials and LSEs that are strided views."""
    g = torch.Generator().manual_seed(1)
    big = torch.randn(T, H + 2, D + 8, generator=g, dtype=torch.bfloat16)
    va = big[:, 1 : H + 1, :D]  # padded heads and head_dim: free strides
    vb = torch.randn(T, H, D, generator=g, dtype=torch.float32)
    lse_buf = torch.randn(T, 2 * H, generator=g)
    sa, sb = lse_buf[:, :H], lse_buf[:, H:]  # [T, H] views into one buffer
    v, s = compat.merge_state(va, sa, vb, sb)
    res = attnmerge.merge([va, vb], [sa.t(), sb.t()], lse_base=2, return_lse=True)
    assert v.dtype == torch.bfloat16  # v_a's dtype, as upstream
    assert_bits_equal(v, res.output, "v_merged")
    assert_bits_equal(s, res.lse.t(), "s_merged")


def test_merge_state_converts_lse_dtype():
    (va, vb), (sa, sb) = partials(2)
    sa16 = sa.half()
    v, s = compat.merge_state(va, sa16, vb, sb)
    v32, s32 = compat.merge_state(va, sa16.float(), vb, sb)
    assert_bits_equal(v, v32)
    assert_bits_equal(s, s32)


# --- FlashInfer merge_state_in_place -------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
def test_in_place_equals_out_of_place(backend_device, dtype):
    backend, device = backend_device
    (va, vb), (sa, sb) = partials(2, dtype, device, seed=2)
    expected_v, expected_s = compat.merge_state(va, sa, vb, sb, backend=backend)
    v, s = va.clone(), sa.clone()
    ptr_v, ptr_s = v.data_ptr(), s.data_ptr()
    assert compat.merge_state_in_place(v, s, vb, sb, backend=backend) is None
    assert v.data_ptr() == ptr_v and s.data_ptr() == ptr_s
    assert_bits_equal(v, expected_v, "v")
    assert_bits_equal(s, expected_s, "s")


def test_in_place_on_strided_views():
    """v and s views into larger buffers are updated in place; their padding is not."""
    (_, vb), (_, sb) = partials(2, seed=3)
    g = torch.Generator().manual_seed(3)
    vbuf = torch.randn(T, H + 1, D + 4, generator=g).half()
    sbuf = torch.randn(T, H + 2, generator=g)
    v, s = vbuf[:, :H, :D], sbuf[:, 1 : H + 1]
    expected_v, expected_s = compat.merge_state(v, s, vb, sb)
    vbuf0, sbuf0 = vbuf.clone(), sbuf.clone()
    compat.merge_state_in_place(v, s, vb, sb)
    assert_bits_equal(v, expected_v, "v")
    assert_bits_equal(s, expected_s, "s")
    assert same_bytes(vbuf[:, H:], vbuf0[:, H:]) and same_bytes(vbuf[..., D:], vbuf0[..., D:])
    assert same_bytes(sbuf[:, :1], sbuf0[:, :1]) and same_bytes(sbuf[:, H + 1 :], sbuf0[:, H + 1 :])


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32])
def test_mask(backend_device, mask_dtype):
    backend, device = backend_device
    t = 8
    (va, vb), (sa, sb) = partials(2, device=device, seed=4, t=t)
    # Unmerged rows keep their bytes even where they hold NaN and infinite LSEs.
    va[1, 0, 3], sa[1, 1], sa[3, 2] = NAN, INF, NAN
    mask = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0], dtype=mask_dtype, device=device)
    merged_v, merged_s = va.clone(), sa.clone()
    compat.merge_state_in_place(merged_v, merged_s, vb, sb, backend=backend)
    v, s = va.clone(), sa.clone()
    compat.merge_state_in_place(v, s, vb, sb, mask=mask, backend=backend)
    on, off = mask != 0, mask == 0
    assert same_bytes(v[off], va[off]) and same_bytes(s[off], sa[off])
    assert_bits_equal(v[on], merged_v[on], "merged rows")
    assert_bits_equal(s[on], merged_s[on], "merged LSEs")


def test_mask_all_and_none():
    (va, vb), (sa, sb) = partials(2, seed=5)
    v, s = va.clone(), sa.clone()
    compat.merge_state_in_place(v, s, vb, sb)
    v1, s1 = va.clone(), sa.clone()
    compat.merge_state_in_place(v1, s1, vb, sb, mask=torch.ones(T, dtype=torch.bool))
    assert same_bytes(v1, v) and same_bytes(s1, s)
    v0, s0 = va.clone(), sa.clone()
    compat.merge_state_in_place(v0, s0, vb, sb, mask=torch.zeros(T, dtype=torch.bool))
    assert same_bytes(v0, va) and same_bytes(s0, sa)


def test_in_place_rejects_non_float32_s():
    (va, vb), (sa, sb) = partials(2)
    v, s = va.clone(), sa.half()
    with pytest.raises(TypeError, match="s must be float32"):
        compat.merge_state_in_place(v, s, vb, sb)
    assert same_bytes(v, va)


def test_in_place_argument_errors():
    (va, vb), (sa, sb) = partials(2)
    v, s = va.clone(), sa.clone()
    with pytest.raises(ValueError, match="mask must have shape"):
        compat.merge_state_in_place(v, s, vb, sb, mask=torch.ones(T + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a torch\.Tensor"):
        compat.merge_state_in_place(v, s, vb, sb, mask=[True] * T)
    with pytest.raises(ValueError, match="s_other must have shape"):
        compat.merge_state_in_place(v, s, vb, sb.t())
    assert same_bytes(v, va) and same_bytes(s, sa)


# --- FlashInfer merge_states -----------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_merge_states_equals_merge(backend_device, k):
    backend, device = backend_device
    vs, ss = partials(k, device=device, seed=10 + k)
    v, s = torch.stack(vs, dim=1), torch.stack(ss, dim=1)  # [T, K, H, D], [T, K, H]
    out, lse = compat.merge_states(v, s, backend=backend)
    res = attnmerge.merge(
        v.transpose(0, 1), s.permute(1, 2, 0), lse_base=2, return_lse=True, backend=backend
    )
    assert out.shape == (T, H, D) and out.dtype == v.dtype
    assert lse.shape == (T, H) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert_bits_equal(out, res.output, "v_merged")
    assert_bits_equal(lse, res.lse.t(), "s_merged")


def test_merge_states_two_equals_merge_state(backend_device):
    backend, device = backend_device
    (va, vb), (sa, sb) = partials(2, device=device, seed=20)
    out, lse = compat.merge_states(
        torch.stack([va, vb], dim=1), torch.stack([sa, sb], dim=1), backend=backend
    )
    v, s = compat.merge_state(va, sa, vb, sb, backend=backend)
    assert_bits_equal(out, v)
    assert_bits_equal(lse, s)


def test_merge_states_matches_float64():
    vs, ss = partials(5, torch.float32, seed=21)
    out, lse = compat.merge_states(torch.stack(vs, dim=1), torch.stack(ss, dim=1))
    ref_v, ref_s = merge_ref64(vs, ss, base=2)
    torch.testing.assert_close(out.double(), ref_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), ref_s, rtol=1e-6, atol=1e-6)


def test_merge_states_one_state():
    """One state: the row and LSE as they are where the LSE is finite; empty (0, -inf)
    where it is infinite; NaN where it is NaN (FlashInfer copies all of them)."""
    (v,), (s,) = partials(1, seed=22)
    s[0, 0], s[1, 1], s[2, 2] = INF, -INF, NAN
    out, lse = compat.merge_states(v.unsqueeze(1), s.unsqueeze(1))
    finite = s.isfinite()
    assert_bits_equal(out[finite], v[finite])
    assert_bits_equal(lse[finite], s[finite])
    assert (out[0, 0] == 0).all() and (out[1, 1] == 0).all() and out[2, 2].isnan().all()
    assert lse[0, 0] == -INF and lse[1, 1] == -INF and lse[2, 2].isnan()


def test_merge_states_no_states():
    v = torch.empty(T, 0, H, D, dtype=torch.bfloat16)
    out, lse = compat.merge_states(v, torch.empty(T, 0, H))
    assert out.dtype == torch.bfloat16 and (out == 0).all() and (lse == -INF).all()
    assert out.shape == (T, H, D) and lse.shape == (T, H)


def test_merge_states_strided():
    """v and s as views (a slice of the states, padded head_dim): no copies needed."""
    vs, ss = partials(6, seed=23, d=D + 8)
    v = torch.stack(vs, dim=1)[:, ::2, :, :D]
    s = torch.stack(ss, dim=1)[:, ::2]
    out, lse = compat.merge_states(v, s)
    expected = compat.merge_states(v.contiguous(), s.contiguous())
    assert_bits_equal(out, expected[0])
    assert_bits_equal(lse, expected[1])


def test_merge_states_argument_errors():
    vs, ss = partials(2)
    v, s = torch.stack(vs, dim=1), torch.stack(ss, dim=1)
    with pytest.raises(ValueError, match="v must be 4-D"):
        compat.merge_states(vs[0], s)
    with pytest.raises(ValueError, match="s must have shape"):
        compat.merge_states(v, s.transpose(1, 2))
    with pytest.raises(TypeError, match=r"s must be a torch\.Tensor"):
        compat.merge_states(v, None)


# --- SGLang merge_state_v2 ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
def test_merge_state_v2_equals_merge_attn_states(backend_device, dtype):
    backend, device = backend_device
    (va, vb), (sa, sb) = partials(2, dtype, device, seed=30)
    v, s = compat.merge_state_v2(va, sa, vb, sb, backend=backend)
    out = torch.empty_like(va)
    out_lse = torch.empty(H, T, device=device)
    attnmerge.merge_attn_states(out, va, sa.t(), vb, sb.t(), out_lse, backend=backend)
    assert v.dtype == dtype and s.shape == (T, H) and s.is_contiguous()
    assert_bits_equal(v, out, "v_merged")
    assert_bits_equal(s, out_lse.t(), "s_merged")


def test_merge_state_v2_is_natural_log():
    (va, vb), (sa, sb) = partials(2, torch.float32, seed=31)
    v, s = compat.merge_state_v2(va, sa, vb, sb)
    ref_v, ref_s = merge_ref64([va, vb], [sa, sb], base="e")
    torch.testing.assert_close(v.double(), ref_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-6, atol=1e-6)


def test_merge_state_v2_given_outputs():
    """Given outputs are written and returned as the same tensors; an output dtype other
    than the partials' is converted to (sgl-kernel needs one dtype)."""
    (va, vb), (sa, sb) = partials(2, seed=32)
    out = torch.empty(T, H, D, dtype=torch.float32)
    out_lse = torch.empty(T, H)
    v, s = compat.merge_state_v2(va, sa, vb, sb, out, out_lse)
    assert v is out and s is out_lse
    expected_v = torch.empty(T, H, D)
    expected_s = torch.empty(H, T)
    attnmerge.merge_attn_states(expected_v, va, sa.t(), vb, sb.t(), expected_s)
    assert_bits_equal(v, expected_v)
    assert_bits_equal(s, expected_s.t())
    # Only the output given: the LSE is still computed and returned.
    v2, s2 = compat.merge_state_v2(va, sa, vb, sb, torch.empty(T, H, D))
    assert_bits_equal(v2, expected_v)
    assert_bits_equal(s2, expected_s.t())


@pytest.mark.parametrize("which", ["a", "b"])
def test_merge_state_v2_in_place(backend_device, which):
    backend, device = backend_device
    (va, vb), (sa, sb) = partials(2, device=device, seed=33)
    expected = compat.merge_state_v2(va, sa, vb, sb, backend=backend)
    va, sa, vb, sb = va.clone(), sa.clone(), vb.clone(), sb.clone()
    out, out_lse = (va, sa) if which == "a" else (vb, sb)
    v, s = compat.merge_state_v2(va, sa, vb, sb, out, out_lse, backend=backend)
    assert v is out and s is out_lse
    assert_bits_equal(v, expected[0])
    assert_bits_equal(s, expected[1])


def test_merge_state_v2_argument_errors():
    (va, vb), (sa, sb) = partials(2)
    with pytest.raises(ValueError, match="s_b must have shape"):
        compat.merge_state_v2(va, sa, vb, sb.t())
    with pytest.raises(ValueError, match="s_merged must have shape"):
        compat.merge_state_v2(va, sa, vb, sb, None, torch.empty(H, T))
    with pytest.raises(TypeError, match="output_lse must be float32"):
        compat.merge_state_v2(va, sa, vb, sb, None, torch.empty(T, H, dtype=torch.float64))


# --- Special values: attnmerge's contract, not the kernels' arithmetic (module docstring)


def special_case(base_inf_value: float, other: float, row: float | None = None):
    """Two states over one token and head, the first with LSE ``base_inf_value``."""
    va = torch.full((1, 1, 4), 2.0)
    vb = torch.full((1, 1, 4), 3.0)
    if row is not None:
        va[0, 0, 1] = row
    sa = torch.tensor([[base_inf_value]])
    sb = torch.tensor([[other]])
    return va, sa, vb, sb


TWO_WAY = {
    "merge_state": compat.merge_state,
    "merge_state_v2": compat.merge_state_v2,
    "merge_states": lambda va, sa, vb, sb: compat.merge_states(
        torch.stack([va, vb], dim=1), torch.stack([sa, sb], dim=1)
    ),
}


@pytest.mark.parametrize("name", TWO_WAY)
def test_both_empty_gives_zero_and_minus_inf(name):
    va, sa, vb, sb = special_case(-INF, -INF)
    va[0, 0, 0] = vb[0, 0, 2] = NAN  # rows of empty states may hold anything
    v, s = TWO_WAY[name](va, sa, vb, sb)
    assert same_bytes(v, torch.zeros_like(v)) and s.item() == -INF


@pytest.mark.parametrize("name", TWO_WAY)
def test_plus_inf_is_empty(name):
    va, sa, vb, sb = special_case(INF, 0.5)
    v, s = TWO_WAY[name](va, sa, vb, sb)
    assert same_bytes(v, vb) and s.item() == 0.5


@pytest.mark.parametrize("name", TWO_WAY)
def test_nan_lse_gives_nan(name):
    va, sa, vb, sb = special_case(NAN, 0.5)
    v, s = TWO_WAY[name](va, sa, vb, sb)
    assert v.isnan().all() and s.isnan().all()


@pytest.mark.parametrize("name", TWO_WAY)
def test_zero_weight_row_adds_exactly_zero(name):
    va, sa, vb, sb = special_case(-200.0, 0.5, row=NAN)  # exp(-200.5) == 0 in float32
    v, s = TWO_WAY[name](va, sa, vb, sb)
    assert same_bytes(v, vb) and s.item() == 0.5


def test_in_place_special_values():
    va, sa, vb, sb = special_case(-INF, -INF)
    va[0, 0, 0] = NAN
    compat.merge_state_in_place(va, sa, vb, sb)
    assert same_bytes(va, torch.zeros_like(va)) and sa.item() == -INF


# --- The layout recipes of docs/integration.md -------------------------------------------


def test_recipe_flash_attention_split_kv_batched():
    """FA3's out_accum [K, B, H, S, D] and lse_accum [K, B, H, S] as views."""
    K, B, Hh, S, Dd = 3, 2, 3, 4, 8
    g = torch.Generator().manual_seed(40)
    out_accum = torch.randn(K, B, Hh, S, Dd, generator=g)
    lse_accum = torch.randn(K, B, Hh, S, generator=g)
    res = attnmerge.merge(
        out_accum.permute(0, 3, 1, 2, 4).flatten(2, 3),
        lse_accum.flatten(1, 2),
        out_dtype=torch.bfloat16,
    )
    out = res.output.unflatten(1, (B, Hh)).transpose(0, 1)  # [B, S, H, D]
    for b in range(B):
        per_batch = attnmerge.merge(
            [out_accum[k, b].transpose(0, 1) for k in range(K)],
            [lse_accum[k, b] for k in range(K)],
            out_dtype=torch.bfloat16,
        )
        assert_bits_equal(out[b], per_batch.output, f"batch {b}")


def test_recipe_flash_attention_split_kv_varlen():
    K, Hh, Tt, Dd = 3, 2, 7, 8
    g = torch.Generator().manual_seed(41)
    out_accum = torch.randn(K, Hh, Tt, Dd, generator=g)
    lse_accum = torch.randn(K, Hh, Tt, generator=g)
    res = attnmerge.merge(out_accum.transpose(1, 2), lse_accum, return_lse=True)
    ref = attnmerge.merge(
        [out_accum[k].transpose(0, 1).contiguous() for k in range(K)],
        [lse_accum[k].contiguous() for k in range(K)],
        return_lse=True,
    )
    assert_bits_equal(res.output, ref.output)
    assert_bits_equal(res.lse, ref.lse)


def test_recipe_flash_attention_batched_lse():
    """out [B, S, H, D] with softmax_lse [B, H, S]: flattened outputs, copied LSE."""
    B, S, Hh, Dd = 2, 3, 4, 8
    (o1, o2), _ = partials(2, torch.float32, seed=42, t=B * S, h=Hh, d=Dd)
    o1, o2 = o1.view(B, S, Hh, Dd), o2.view(B, S, Hh, Dd)
    g = torch.Generator().manual_seed(42)
    lse1, lse2 = torch.randn(B, Hh, S, generator=g), torch.randn(B, Hh, S, generator=g)

    def flat(lse):
        return lse.transpose(0, 1).reshape(Hh, B * S)

    res = attnmerge.merge([o1.flatten(0, 1), o2.flatten(0, 1)], [flat(lse1), flat(lse2)])
    out = res.output.view(B, S, Hh, Dd)
    for b in range(B):
        ref = attnmerge.merge([o1[b], o2[b]], [lse1[b], lse2[b]])
        assert_bits_equal(out[b], ref.output, f"batch {b}")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_recipe_flashinfer_variable_length(index_dtype):
    """FlashInfer's packed v [nnz, H, D], s [nnz, H] with indptr, against merge_states
    token by token (a token with no rows: 0 and -inf)."""
    lengths = [2, 1, 0, 4, 3]
    indptr = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=index_dtype)
    vs, ss = partials(1, seed=43, t=int(indptr[-1]))
    v, s = vs[0], ss[0]
    res = attnmerge.merge(v, s.t(), indptr=indptr, lse_base=2, return_lse=True)
    assert res.lse.t().is_contiguous()
    for t, (a, b) in enumerate(zip(indptr[:-1].tolist(), indptr[1:].tolist(), strict=True)):
        out, lse = compat.merge_states(v[a:b].unsqueeze(0), s[a:b].unsqueeze(0))
        assert_bits_equal(res.output[t], out[0], f"token {t}")
        assert_bits_equal(res.lse[:, t], lse[0], f"token {t} lse")
