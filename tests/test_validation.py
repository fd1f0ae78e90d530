"""Rejected inputs: the right exception type, a message naming the argument, and the
outputs untouched (nothing is written when a check fails).

The checks run before any backend is chosen, so these tests use backend "torch" (and
the device of the machine's first backend pair for device-dependent cases).
"""

from __future__ import annotations

import pytest
import torch
from utils import FP8, ON_GPU

import attnmerge
from attnmerge import dispatch

T, H, D = 5, 3, 16
DEVICE = "cuda" if ON_GPU else "cpu"
SENTINEL = 7.0
LSE_SENTINEL = 3.0


def good_args(out_dtype=torch.float32, device=DEVICE) -> dict:
    g = torch.Generator().manual_seed(0)
    args = {
        "output": torch.full((T, H, D), SENTINEL).to(out_dtype),
        "prefix_output": torch.randn(T, H, D, generator=g),
        "prefix_lse": torch.randn(H, T, generator=g),
        "suffix_output": torch.randn(T, H, D, generator=g),
        "suffix_lse": torch.randn(H, T, generator=g),
        "output_lse": torch.full((H, T), LSE_SENTINEL),
        "prefill_tokens_with_context": None,
        "output_scale": torch.tensor([0.5]) if out_dtype == FP8 else None,
    }
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def call(args: dict, **kw) -> None:
    kw.setdefault("backend", "torch")
    attnmerge.merge_attn_states(**args, **kw)


def _snapshot(args: dict) -> dict:
    snap = {}
    for name in ("output", "output_lse"):
        t = args.get(name)
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            snap[name] = (t, t.detach().cpu().clone())
    return snap


def _untouched(snap: dict) -> None:
    for name, (t, before) in snap.items():
        now = t.detach().cpu()
        if now.dtype == FP8:
            now, before = now.view(torch.uint8), before.view(torch.uint8)
        assert torch.equal(now, before), f"{name} was written by a call that raised"


def assert_rejected(args: dict, exc, match: str, **kw) -> None:
    snap = _snapshot(args)
    with pytest.raises(exc, match=match):
        call(args, **kw)
    _untouched(snap)


def test_good_args_are_accepted():
    # The baseline every case below breaks in one place.
    args = good_args()
    call(args)
    assert not torch.equal(args["output"], torch.full((T, H, D), SENTINEL, device=DEVICE))


# ---------------------------------------------------------------------------
# Types.


_TENSOR_ARGS = [
    "output",
    "prefix_output",
    "prefix_lse",
    "suffix_output",
    "suffix_lse",
    "output_lse",
]


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        (n, b)
        for n in _TENSOR_ARGS
        for b in (None, [1.0, 2.0], 3.0)
        if not (n == "output_lse" and b is None)
    ],  # output_lse=None is valid
    ids=str,
)
def test_non_tensor_argument(name, bad):
    args = good_args()
    args[name] = bad
    assert_rejected(args, TypeError, rf"\b{name}\b")


def test_non_tensor_output_scale():
    args = good_args(FP8)
    args["output_scale"] = 0.5
    assert_rejected(args, TypeError, "output_scale")


@pytest.mark.parametrize("name", ["prefix_output", "suffix_output"])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.int32, torch.float8_e4m3fn, torch.complex64], ids=str
)
def test_bad_partial_dtype(name, dtype):
    args = good_args()
    args[name] = args[name].to(dtype)
    assert_rejected(args, TypeError, rf"\b{name}\b")


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.int8, torch.uint8, torch.float8_e5m2], ids=str
)
def test_bad_output_dtype(dtype):
    args = good_args()
    args["output"] = torch.zeros(T, H, D, dtype=dtype, device=DEVICE)
    assert_rejected(args, TypeError, r"\boutput\b")


@pytest.mark.parametrize("name", ["prefix_lse", "suffix_lse", "output_lse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_lse_not_float32(name, dtype):
    args = good_args()
    args[name] = args[name].to(dtype)
    assert_rejected(args, TypeError, rf"\b{name}\b.*float32")


# ---------------------------------------------------------------------------
# Shapes and strides.


@pytest.mark.parametrize("name", ["output", "prefix_output", "suffix_output"])
@pytest.mark.parametrize("shape", [(T, H * D), (T, H, D, 1), (T * H * D,)], ids=str)
def test_wrong_ndim(name, shape):
    args = good_args()
    args[name] = args[name].reshape(shape)
    assert_rejected(args, ValueError, rf"\b{name}\b")


@pytest.mark.parametrize("name", ["prefix_lse", "suffix_lse", "output_lse"])
@pytest.mark.parametrize("shape", [(H * T,), (1, H, T), (H, T + 1), (H + 1, T)], ids=str)
def test_lse_wrong_shape(name, shape):
    args = good_args()
    args[name] = torch.zeros(shape, device=DEVICE)
    assert_rejected(args, ValueError, rf"\b{name}\b")


@pytest.mark.parametrize("name", ["prefix_output", "suffix_output"])
@pytest.mark.parametrize("shape", [(T + 1, H, D), (T, H + 1, D), (T, H, D - 1), (1, H, D)], ids=str)
def test_partial_shape_mismatch(name, shape):
    args = good_args()
    args[name] = torch.randn(shape, device=DEVICE)
    assert_rejected(args, ValueError, rf"\b{name}\b")


@pytest.mark.parametrize("name", ["prefix_lse", "suffix_lse", "output_lse"])
def test_lse_stored_t_h_hints_transpose(name):
    args = good_args()
    args[name] = torch.zeros(T, H, device=DEVICE)  # [T, H] passed as is (T != H)
    assert_rejected(args, ValueError, rf"\b{name}\b.*lse\.t\(\)")


@pytest.mark.parametrize("name", ["output", "prefix_output", "suffix_output"])
def test_last_dim_not_contiguous(name):
    args = good_args()
    t = args[name]
    args[name] = torch.zeros(T, H, 2 * D, dtype=t.dtype, device=DEVICE)[..., ::2]
    if name != "output":
        args[name].copy_(t)
    assert_rejected(args, ValueError, rf"\b{name}\b.*contiguous")


def test_last_dim_not_contiguous_transposed():
    args = good_args()
    args["prefix_output"] = torch.randn(T, D, H, device=DEVICE).transpose(1, 2)
    args["suffix_output"] = torch.randn(T, H, D, device=DEVICE)
    assert_rejected(args, ValueError, r"\bprefix_output\b.*contiguous")


# ---------------------------------------------------------------------------
# FP8 scale.


def test_fp8_output_without_scale():
    args = good_args(FP8)
    args["output_scale"] = None
    assert_rejected(args, ValueError, "output_scale")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_scale_with_float_output(out_dtype):
    args = good_args(out_dtype)
    args["output_scale"] = torch.tensor([0.5], device=DEVICE)
    assert_rejected(args, ValueError, "output_scale")


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.float64, torch.bfloat16, torch.int32], ids=str
)
def test_scale_wrong_dtype(dtype):
    args = good_args(FP8)
    args["output_scale"] = torch.tensor([1], device=DEVICE).to(dtype)
    assert_rejected(args, TypeError, "output_scale")


@pytest.mark.parametrize("shape", [(2,), (0,), (1, 2)], ids=str)
def test_scale_wrong_numel(shape):
    args = good_args(FP8)
    args["output_scale"] = torch.full(shape, 0.5, device=DEVICE)
    assert_rejected(args, ValueError, "output_scale")


# ---------------------------------------------------------------------------
# Devices. The "meta" device stands in for "another device" on a CPU-only machine.


@pytest.mark.parametrize(
    "name", ["prefix_output", "prefix_lse", "suffix_output", "suffix_lse", "output_lse"]
)
def test_argument_on_another_device(name):
    args = good_args()
    args[name] = args[name].to("meta")
    assert_rejected(args, ValueError, rf"\b{name}\b.*meta")


def test_scale_on_meta_device():
    args = good_args(FP8)
    args["output_scale"] = args["output_scale"].to("meta")
    assert_rejected(args, ValueError, "output_scale")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["output_scale", "prefix_output", "suffix_lse"])
def test_argument_on_cpu_with_cuda_output(name):
    args = good_args(FP8, device="cuda")
    args[name] = args[name].cpu()
    assert_rejected(args, ValueError, rf"\b{name}\b")


# ---------------------------------------------------------------------------
# Scalars.


@pytest.mark.parametrize(
    ("bad", "exc"),
    [
        (-1, ValueError),
        (T + 1, ValueError),
        (True, TypeError),
        (False, TypeError),
        (2.0, TypeError),
        ("3", TypeError),
    ],
    ids=["neg", "gt_T", "True", "False", "float", "str"],
)
def test_bad_prefill_tokens_with_context(bad, exc):
    args = good_args()
    args["prefill_tokens_with_context"] = bad
    assert_rejected(args, exc, "prefill_tokens_with_context")


@pytest.mark.parametrize("base", ["2", 10, None, "E", 2.5, "ln"], ids=repr)
def test_bad_lse_base(base):
    assert_rejected(good_args(), ValueError, "lse_base", lse_base=base)


@pytest.mark.parametrize("backend", ["cpu", "TRITON", "", None, "cutlass"], ids=repr)
def test_bad_backend(backend):
    assert_rejected(good_args(), ValueError, "backend", backend=backend)


def test_bad_backend_env(monkeypatch, clean_dispatch):
    monkeypatch.setenv("ATTNMERGE_BACKEND", "fastest")
    dispatch.reset()
    assert_rejected(good_args(), ValueError, "ATTNMERGE_BACKEND", backend="auto")


@pytest.mark.skipif(ON_GPU, reason="on a GPU the cuda backend serves the call")
def test_cuda_backend_rejects_cpu_tensors():
    args = good_args()
    snap = _snapshot(args)
    with pytest.raises(attnmerge.BackendError, match="cuda"):
        call(args, backend="cuda")
    _untouched(snap)
    assert issubclass(attnmerge.BackendError, RuntimeError)


def test_bad_argument_checked_before_backend():
    # Argument errors win over backend errors (the message names the argument).
    args = good_args()
    args["suffix_lse"] = args["suffix_lse"].double()
    assert_rejected(args, TypeError, "suffix_lse", backend="cuda")


# ---------------------------------------------------------------------------
# Written tensors: aliasing and overlap.


def test_output_aliases_prefix_with_different_strides():
    args = good_args()
    buf = torch.randn(T * H * D * 2, device=DEVICE)
    args["prefix_output"] = buf[: T * H * D].view(T, H, D)
    args["output"] = buf.as_strided((T, H, D), (H * 2 * D, 2 * D, 1))
    assert_rejected(args, ValueError, r"\boutput\b.*prefix_output")


def test_output_aliases_suffix_with_different_dtype():
    args = good_args(torch.float16)
    args["suffix_output"] = torch.randn(T, H, D, device=DEVICE).to(torch.bfloat16)
    args["output"] = args["suffix_output"].view(torch.float16)
    assert_rejected(args, ValueError, r"\boutput\b.*suffix_output")


def test_output_lse_aliases_prefix_lse_with_different_strides():
    n = 4
    args = good_args()
    args.update(
        output=torch.zeros(n, n, D, device=DEVICE),
        prefix_output=torch.randn(n, n, D, device=DEVICE),
        suffix_output=torch.randn(n, n, D, device=DEVICE),
        prefix_lse=torch.randn(n, n, device=DEVICE),
        suffix_lse=torch.randn(n, n, device=DEVICE),
    )
    args["output_lse"] = args["prefix_lse"].t()  # same memory, transposed
    assert_rejected(args, ValueError, r"\boutput_lse\b.*prefix_lse")


def test_expanded_output():
    args = good_args()
    args["output"] = torch.full((1, H, D), SENTINEL, device=DEVICE).expand(T, H, D)
    assert_rejected(args, ValueError, r"\boutput\b.*overlap")


def test_expanded_output_lse():
    args = good_args()
    args["output_lse"] = torch.full((H, 1), LSE_SENTINEL, device=DEVICE).expand(H, T)
    assert_rejected(args, ValueError, r"\boutput_lse\b.*overlap")


def test_custom_op_runs_the_same_checks():
    args = good_args()
    args["prefix_lse"] = args["prefix_lse"].t().contiguous()
    snap = _snapshot(args)
    with pytest.raises(ValueError, match="prefix_lse"):
        torch.ops.attnmerge.merge_attn_states(*args.values(), False, "torch")
    _untouched(snap)


# ---------------------------------------------------------------------------
# The functional form.


def _states():
    args = good_args()
    return [args["prefix_output"], args["suffix_output"]], [args["prefix_lse"], args["suffix_lse"]]


def test_merge_no_states():
    with pytest.raises(ValueError, match="no partials"):
        attnmerge.merge([], [], backend="torch")


def test_merge_mismatched_lengths():
    outs, lses = _states()
    with pytest.raises(ValueError, match="2 outputs but 1 lses"):
        attnmerge.merge(outs, lses[:1], backend="torch")


def test_merge_stacked_outputs_with_a_sequence_of_lses():
    outs, lses = _states()
    with pytest.raises(TypeError, match=r"lses must be a torch\.Tensor"):
        attnmerge.merge(torch.stack(outs), lses, backend="torch")


def test_merge_fp8_out_dtype_without_quant():
    outs, lses = _states()
    with pytest.raises(ValueError, match="FP8Static"):
        attnmerge.merge(outs, lses, out_dtype=FP8, backend="torch")


@pytest.mark.parametrize("quant", ["fp8", 0.5, torch.tensor([0.5])], ids=["str", "float", "tensor"])
def test_merge_quant_of_wrong_type(quant):
    outs, lses = _states()
    with pytest.raises(TypeError, match="quant"):
        attnmerge.merge(outs, lses, quant=quant, backend="torch")


def test_merge_out_dtype_conflicts_with_quant():
    outs, lses = _states()
    spec = attnmerge.FP8Static(torch.tensor([0.5], device=DEVICE))
    with pytest.raises(ValueError, match="out_dtype"):
        attnmerge.merge(outs, lses, quant=spec, out_dtype=torch.bfloat16, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "bfloat16"], ids=str)
def test_merge_bad_out_dtype(dtype):
    outs, lses = _states()
    with pytest.raises(TypeError, match="out_dtype"):
        attnmerge.merge(outs, lses, out_dtype=dtype, backend="torch")


def test_merge_checks_like_merge_attn_states():
    outs, lses = _states()
    with pytest.raises(TypeError, match="suffix_output"):
        attnmerge.merge([outs[0], outs[1].double()], lses, backend="torch")
    with pytest.raises(ValueError, match="prefill_tokens_with_context"):
        attnmerge.merge(outs, lses, prefill_tokens_with_context=T + 1, backend="torch")


def test_fp8_static_spec_checks():
    with pytest.raises(TypeError, match="scale"):
        attnmerge.FP8Static(0.5)
    with pytest.raises(ValueError, match="dtype"):
        attnmerge.FP8Static(torch.tensor([0.5]), dtype=torch.float8_e5m2)
