"""Every (backend, device) against the fp32 reference on the same device.

Shapes are chosen per platform: under the Triton interpreter each program instance
costs about a millisecond, so CPU grids stay small; a GPU runs the larger lists.
"""

from __future__ import annotations

import pytest
import torch
from utils import (
    FLOAT_DTYPES,
    FP8,
    ON_GPU,
    assert_lse_close,
    assert_output_close,
    dtype_name,
    make_case,
    run_and_check,
)

import attnmerge

# Head sizes: tiny, odd (not a multiple of 16 bytes: 72, 80), the MLA sizes (128, 192,
# 512) and 256. Under the interpreter, 512 means 4 rows per program.
HEAD_SIZES = [8, 72, 80, 128, 192, 256, 512] if ON_GPU else [8, 72, 80, 128, 192, 512]
# (T, H): a single row, fewer rows than one program holds, several programs with a
# partial last one, and on a GPU many programs.
SHAPES = (
    [(1, 1), (2, 3), (17, 8), (255, 32), (1024, 16), (4097, 5)]
    if ON_GPU
    else [(1, 1), (2, 3), (17, 8), (33, 2), (64, 8)]
)
MAIN_T, MAIN_H = (300, 7) if ON_GPU else (17, 3)

# An output dtype different from the partials' dtype.
OTHER_DTYPE = {
    torch.float32: torch.bfloat16,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float16,
}
OUT_KINDS = ["same", "other", "fp8"]
FP8_SCALE = 0.02  # |O| <~ 5 maps to <~ 250: the whole e4m3 range without saturating


def out_spec(kind: str, dtype: torch.dtype) -> dict:
    if kind == "same":
        return {"out_dtype": dtype}
    if kind == "other":
        return {"out_dtype": OTHER_DTYPE[dtype]}
    return {"out_dtype": FP8, "scale": FP8_SCALE}


@pytest.mark.parametrize("D", HEAD_SIZES)
@pytest.mark.parametrize("out_kind", OUT_KINDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
def test_matches_reference(backend_device, dtype, out_kind, D):
    backend, device = backend_device
    case = make_case(
        MAIN_T, MAIN_H, D, dtype=dtype, device=device, seed=D, **out_spec(out_kind, dtype)
    )
    run_and_check(case, backend)


@pytest.mark.parametrize(("T", "H"), SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("out_kind", OUT_KINDS)
def test_shapes(backend_device, T, H, out_kind):
    backend, device = backend_device
    D = 80 if ON_GPU else 72
    case = make_case(
        T,
        H,
        D,
        dtype=torch.bfloat16,
        device=device,
        lse_pattern="mixed",
        seed=T * 31 + H,
        **out_spec(out_kind, torch.bfloat16),
    )
    run_and_check(case, backend)


@pytest.mark.parametrize(
    "lse_pattern",
    [
        "mixed",
        "wide",
        "offset",
        ("big_pos", "big_neg"),
        ("huge", "normal"),
        ("nan", "normal"),
        ("neg_inf", "pos_inf", "normal"),
    ],
    ids=lambda p: p if isinstance(p, str) else "+".join(p),
)
@pytest.mark.parametrize("out_kind", OUT_KINDS)
def test_lse_patterns(backend_device, lse_pattern, out_kind):
    backend, device = backend_device
    case = make_case(
        MAIN_T,
        MAIN_H,
        40,
        dtype=torch.float16,
        device=device,
        lse_pattern=lse_pattern,
        seed=3,
        **out_spec(out_kind, torch.float16),
    )
    run_and_check(case, backend)


@pytest.mark.parametrize("out_kind", OUT_KINDS)
@pytest.mark.parametrize("lse_pattern", ["normal", "mixed"])
def test_lse_base_2(backend_device, out_kind, lse_pattern):
    backend, device = backend_device
    case = make_case(
        MAIN_T,
        MAIN_H,
        24,
        dtype=torch.float32,
        device=device,
        lse_base=2,
        lse_pattern=lse_pattern,
        seed=4,
        **out_spec(out_kind, torch.float32),
    )
    run_and_check(case, backend)


@pytest.mark.parametrize("out_kind", OUT_KINDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
def test_without_output_lse(backend_device, dtype, out_kind):
    backend, device = backend_device
    case = make_case(
        MAIN_T,
        MAIN_H,
        72,
        dtype=dtype,
        device=device,
        with_lse=False,
        lse_pattern="mixed",
        seed=5,
        **out_spec(out_kind, dtype),
    )
    assert case.output_lse is None
    run_and_check(case, backend)


@pytest.mark.parametrize("P", [0, 1, 9, MAIN_T])
def test_prefill_tokens_with_context(backend_device, P):
    backend, device = backend_device
    case = make_case(
        MAIN_T, MAIN_H, 72, dtype=torch.bfloat16, device=device, P=P, lse_pattern="mixed", seed=6
    )
    run_and_check(case, backend)


@pytest.mark.parametrize("scale_shape", [(), (1,), (1, 1)], ids=str)
def test_fp8_scale_shapes(backend_device, scale_shape):
    # Any 1-element float32 tensor is a valid scale.
    backend, device = backend_device
    scale = torch.full(scale_shape, 0.05, dtype=torch.float32)
    case = make_case(
        5, 2, 24, dtype=torch.bfloat16, out_dtype=FP8, scale=scale, device=device, seed=7
    )
    run_and_check(case, backend)


@pytest.mark.parametrize(
    ("prefix_dtype", "suffix_dtype"),
    [
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
    ],
    ids=str,
)
@pytest.mark.parametrize("out_kind", ["fp32", "fp8"])
def test_mixed_partial_dtypes(backend_device, prefix_dtype, suffix_dtype, out_kind):
    backend, device = backend_device
    spec = {"out_dtype": torch.float32} if out_kind == "fp32" else {"out_dtype": FP8, "scale": 0.1}
    case = make_case(
        MAIN_T,
        MAIN_H,
        40,
        dtype=prefix_dtype,
        suffix_dtype=suffix_dtype,
        device=device,
        lse_pattern="mixed",
        seed=8,
        **spec,
    )
    run_and_check(case, backend)


# ---------------------------------------------------------------------------
# The functional form.


@pytest.mark.parametrize("spec", ["default", "out_dtype", "plain", "fp8", "fp8_explicit_dtype"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
def test_merge_functional(backend_device, dtype, spec):
    backend, device = backend_device
    case = make_case(MAIN_T, MAIN_H, 72, dtype=dtype, device=device, lse_pattern="mixed", seed=9)
    scale = torch.tensor([0.03], device=device)
    kwargs = {
        "default": {},
        "out_dtype": {"out_dtype": OTHER_DTYPE[dtype]},
        "plain": {"quant": attnmerge.Plain(OTHER_DTYPE[dtype])},
        "fp8": {"quant": attnmerge.FP8Static(scale)},
        "fp8_explicit_dtype": {"quant": attnmerge.FP8Static(scale), "out_dtype": FP8},
    }[spec]
    want_dtype = {"default": dtype}.get(spec, OTHER_DTYPE[dtype] if "fp8" not in spec else FP8)
    exp = case.expected()
    res = attnmerge.merge(
        [case.prefix_output, case.suffix_output],
        [case.prefix_lse, case.suffix_lse],
        return_lse=True,
        backend=backend,
        **kwargs,
    )
    assert isinstance(res, attnmerge.MergeResult)
    assert res.output.dtype == want_dtype
    assert res.output.shape == (MAIN_T, MAIN_H, 72)
    assert res.output.device == case.prefix_output.device
    assert res.lse.shape == (MAIN_H, MAIN_T) and res.lse.dtype == torch.float32
    assert_output_close(res.output, exp.output, exp.magnitude, scale if want_dtype == FP8 else None)
    assert_lse_close(res.lse, exp.lse)


def test_merge_return_lse_false(backend_device):
    backend, device = backend_device
    case = make_case(MAIN_T, MAIN_H, 40, dtype=torch.bfloat16, device=device, seed=10)
    exp = case.expected()
    res = attnmerge.merge(
        (case.prefix_output, case.suffix_output),
        (case.prefix_lse, case.suffix_lse),
        return_lse=False,
        backend=backend,
    )
    assert res.lse is None
    assert_output_close(res.output, exp.output, exp.magnitude)


@pytest.mark.parametrize("layout", ["ht", "th"])
def test_merge_keeps_lse_layout(backend_device, layout):
    # [T, H]-stored inputs give a [T, H]-stored result (stride (1, H) as an [H, T] view).
    backend, device = backend_device
    T, H = MAIN_T, MAIN_H
    case = make_case(T, H, 16, device=device, lse_layouts=(layout, layout, "ht"), seed=11)
    exp = case.expected()
    res = attnmerge.merge(
        (case.prefix_output, case.suffix_output),
        (case.prefix_lse, case.suffix_lse),
        return_lse=True,
        backend=backend,
    )
    assert res.lse.shape == (H, T)
    assert res.lse.stride() == ((1, H) if layout == "th" else (T, 1))
    assert_lse_close(res.lse, exp.lse)
    assert_output_close(res.output, exp.output, exp.magnitude)


@pytest.mark.parametrize("P", [0, 4])
def test_merge_base_2_and_prefill_tokens(backend_device, P):
    backend, device = backend_device
    case = make_case(
        MAIN_T, MAIN_H, 16, device=device, lse_base=2, P=P, lse_pattern="mixed", seed=12
    )
    exp = case.expected()
    res = attnmerge.merge(
        (case.prefix_output, case.suffix_output),
        (case.prefix_lse, case.suffix_lse),
        lse_base=2,
        prefill_tokens_with_context=P,
        return_lse=True,
        backend=backend,
    )
    assert_output_close(res.output, exp.output, exp.magnitude)
    assert_lse_close(res.lse, exp.lse)


def test_triton_rows_per_program_by_grid_size():
    """Small grids take fewer Triton rows per program; both sides of the boundary merge
    exactly (the interpreter runs one program per 1.25 ms: D = 8 keeps it short)."""
    from attnmerge.triton import merge_kernel as mk

    assert mk.block_rows_for(128, 2) == mk.block_rows_for(128, 2, 10**6) == 16
    (small, small_rows), (medium, medium_rows) = mk._SMALL_GRID_BLOCK_ROWS
    assert mk.block_rows_for(128, 2, small) == small_rows == 4
    assert mk.block_rows_for(128, 2, small + 1) == mk.block_rows_for(128, 2, medium)
    assert mk.block_rows_for(128, 2, medium) == medium_rows == 8
    assert mk.block_rows_for(128, 2, medium + 1) == 16
    assert mk.block_rows_for(1024, 4, 1) == 1  # never more than the tile rule
    device = "cuda" if ON_GPU else "cpu"
    for T in (small, small + 1, medium, medium + 1):
        case = make_case(T, 1, 8, dtype=torch.float16, device=device, lse_pattern="mixed",
                         seed=T, **out_spec("fp8", torch.float16))  # fmt: skip
        run_and_check(case, "triton")


@pytest.mark.parametrize(
    ("T", "P", "out_lse_layout", "alias", "head_major"),
    [
        (17, None, "ht", None, True),
        (17, 9, "ht", "lse_prefix", True),  # tail tokens, output LSE in place
        (17, None, "ht", "prefix", True),  # output in place
        (3, None, "ht", None, False),  # fewer tokens than a program's 4 rows
        (17, None, "th", None, False),  # [T, H] output LSEs are contiguous token-major
    ],
)
def test_triton_program_order(T, P, out_lse_layout, alias, head_major):
    """Triton programs take the tokens of one head (a 2-D grid) where the output LSE is
    stored [H, T] and there are tokens enough (head_major_programs), consecutive
    (token, head) rows otherwise; either way the result is the reference's."""
    from attnmerge.triton import merge_kernel as mk

    H, D, dtype = 3, 8, torch.bfloat16
    kind = "same" if alias == "prefix" else "fp8"
    case = make_case(
        T, H, D, dtype=dtype, device="cuda" if ON_GPU else "cpu", lse_pattern="mixed", P=P,
        alias=alias, lse_layouts=("ht", "ht", out_lse_layout), **out_spec(kind, dtype),
    )  # fmt: skip
    rows = mk.block_rows_for(D, dtype.itemsize, T * H)
    lse_token_stride = case.args()[5].stride(1)
    assert mk.head_major_programs(lse_token_stride, T, H, rows, T * H * D * 2) == head_major
    run_and_check(case, "triton")


def test_triton_head_major_programs_rule():
    from attnmerge.triton import merge_kernel as mk

    limit = mk.HEAD_MAJOR_MAX_PARTIAL_BYTES
    ht = 1  # the output LSE's token stride: [H, T] storage
    assert mk.head_major_programs(ht, 5, 3, 4, limit)
    assert not mk.head_major_programs(ht, 5, 3, 4, limit + 1)  # HBM-bound: token-major
    assert not mk.head_major_programs(ht, 5, 3, 8, 1)  # fewer tokens than a program's rows
    assert not mk.head_major_programs(3, 5, 3, 4, 1)  # [T, H] storage: token stride H
    assert not mk.head_major_programs(None, 5, 3, 4, 1)  # no output LSE
    assert not mk.head_major_programs(ht, 5, 1, 4, 1)
    assert not mk.head_major_programs(ht, 5, 70000, 4, 1)  # past the grid's y limit
