"""torch.library registration, torch.compile, CUDA graphs, and a clean import.

On a CPU machine the compiled functions use the "aot_eager" compile backend (no C++
compilation) and the custom op runs backend "torch" or the Triton interpreter; on a
GPU, inductor is tested as well.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from utils import (
    BACKEND_DEVICES,
    FP8,
    ON_GPU,
    as_int,
    assert_bits_equal,
    assert_output_close,
    make_case,
)

import attnmerge

OP = torch.ops.attnmerge.merge_attn_states.default
COMPILE_BACKENDS = ["aot_eager", "inductor"] if ON_GPU else ["aot_eager"]
# opcheck runs the op a dozen times under several modes: backend torch on the CPU, and
# on a GPU the Triton kernel too.
OPCHECK_PAIRS = [("torch", "cpu")] + ([("triton", "cuda")] if ON_GPU else [])


def _op_args(case, lse_base_2: bool, backend: str) -> tuple:
    return (*case.args(), lse_base_2, backend)


@pytest.mark.parametrize(("backend", "device"), OPCHECK_PAIRS, ids=lambda x: str(x))
@pytest.mark.parametrize("variant", ["lse", "no_lse", "fp8", "P", "base2", "fp8_P_th"])
def test_opcheck(backend, device, variant):
    kw = {
        "lse": {},
        "no_lse": {"with_lse": False},
        "fp8": {"out_dtype": FP8, "scale": 0.1},
        "P": {"P": 3},
        "base2": {"lse_base": 2},
        "fp8_P_th": {"out_dtype": FP8, "scale": 0.1, "P": 0, "lse_layouts": ("th", "th", "th")},
    }[variant]
    case = make_case(6, 3, 16, dtype=torch.bfloat16, device=device, lse_pattern="mixed", **kw)
    # torch's schema check compares mutated tensors with allclose, which has no float8
    # kernel; for FP8 outputs the other checks still run.
    utils = (
        "test_schema",
        "test_autograd_registration",
        "test_faketensor",
        "test_aot_dispatch_dynamic",
    )
    if kw.get("out_dtype") == FP8:
        utils = utils[1:]
    torch.library.opcheck(OP, _op_args(case, case.lse_base == 2, backend), test_utils=utils)
    # and the op computed the right thing
    exp = case.expected()
    as_int(case.output).zero_()
    OP(*_op_args(case, case.lse_base == 2, backend))
    case.check_against(exp)


def test_op_schema_mutates_outputs_only():
    schema = OP._schema
    mutated = [
        a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
    ]
    assert mutated == ["output", "output_lse"]
    assert len(schema.returns) == 0


def _compile_pairs():
    return [
        (cb, b, d)
        for cb in COMPILE_BACKENDS
        for (b, d) in BACKEND_DEVICES
        if not (cb == "inductor" and d == "cpu")
    ]


COMPILE_PARAMS = pytest.mark.parametrize(
    ("compile_backend", "backend", "device"), _compile_pairs(), ids=lambda x: str(x)
)


@COMPILE_PARAMS
@pytest.mark.parametrize("variant", ["plain", "fp8_P_base2"])
def test_compile_merge_attn_states_fullgraph(compile_backend, backend, device, variant):
    torch._dynamo.reset()
    kw = {} if variant == "plain" else {"out_dtype": FP8, "scale": 0.05, "P": 4, "lse_base": 2}
    P, base = kw.get("P"), kw.get("lse_base", "e")

    def fn(out, po, pl, so, sl, ol, scale):
        attnmerge.merge_attn_states(
            out, po, pl, so, sl, ol, P, scale, lse_base=base, backend=backend
        )
        return out, ol

    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    eager = make_case(
        7, 3, 40, dtype=torch.bfloat16, device=device, lse_pattern="mixed", seed=1, **kw
    )
    comp = make_case(
        7, 3, 40, dtype=torch.bfloat16, device=device, lse_pattern="mixed", seed=1, **kw
    )
    exp = comp.expected()
    eager.run(backend)
    a = comp.args()
    out, ol = compiled(a[0], a[1], a[2], a[3], a[4], a[5], a[7])
    assert out is comp.output and ol is comp.output_lse
    comp.check_against(exp)
    assert_bits_equal(comp.output, eager.output, "compiled output")
    assert_bits_equal(comp.output_lse, eager.output_lse, "compiled output_lse")


@COMPILE_PARAMS
def test_compile_dynamic_shapes_and_symbolic_P(compile_backend, backend, device):
    # T varies between calls (dynamic=True) and P is derived from the symbolic size.
    torch._dynamo.reset()

    def fn(out, po, pl, so, sl, ol):
        attnmerge.merge_attn_states(out, po, pl, so, sl, ol, out.shape[0] - 1, backend=backend)
        return out

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=compile_backend)
    for T in (5, 9, 2):
        case = make_case(T, 2, 24, device=device, lse_pattern="mixed", P=T - 1, seed=T)
        exp = case.expected()
        compiled(*case.args()[:6])
        case.check_against(exp)


@COMPILE_PARAMS
@pytest.mark.parametrize("spec", ["fp8", "bf16", "no_lse"])
def test_compile_merge_functional_fullgraph(compile_backend, backend, device, spec):
    torch._dynamo.reset()

    def fn(po, pl, so, sl, scale):
        if spec == "fp8":
            res = attnmerge.merge(
                (po, so),
                (pl, sl),
                quant=attnmerge.FP8Static(scale),
                return_lse=True,
                backend=backend,
            )
        elif spec == "bf16":
            res = attnmerge.merge(
                (po, so), (pl, sl), out_dtype=torch.bfloat16, return_lse=True, backend=backend
            )
        else:
            res = attnmerge.merge((po, so), (pl, sl), return_lse=False, backend=backend)
        return res.output, res.lse

    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    case = make_case(
        6, 3, 32, device=device, lse_pattern="mixed", lse_layouts=("th", "th", "ht"), seed=2
    )
    scale = torch.tensor([0.05], device=device)
    args = (case.prefix_output, case.prefix_lse, case.suffix_output, case.suffix_lse, scale)
    out_c, lse_c = compiled(*args)
    out_e, lse_e = fn(*args)
    assert out_c.dtype == out_e.dtype
    assert_bits_equal(out_c, out_e, "compiled merge output")
    if spec == "no_lse":
        assert lse_c is None and lse_e is None
    else:
        assert_bits_equal(lse_c.contiguous(), lse_e.contiguous(), "compiled merge lse")
        assert lse_e.stride() == (1, 3)  # [T, H]-stored inputs keep their layout
    exp = case.expected()
    assert_output_close(out_c, exp.output, exp.magnitude, scale if spec == "fp8" else None)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [FP8, torch.bfloat16], ids=str)
def test_cuda_graph_capture_and_replay(out_dtype):
    T, H, D = 37, 8, 128
    scale_kw = {"scale": 0.05} if out_dtype == FP8 else {}
    static = make_case(
        T,
        H,
        D,
        dtype=torch.bfloat16,
        out_dtype=out_dtype,
        device="cuda",
        P=T - 5,
        lse_pattern="mixed",
        seed=3,
        **scale_kw,
    )

    def step():
        static.run("triton")

    # warm up (compiles the kernel) on a side stream, as CUDA graph capture requires
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (4, 5):
        fresh = make_case(
            T,
            H,
            D,
            dtype=torch.bfloat16,
            out_dtype=out_dtype,
            device="cuda",
            P=T - 5,
            lse_pattern="mixed",
            seed=seed,
            **scale_kw,
        )
        for name in ("prefix_output", "prefix_lse", "suffix_output", "suffix_lse"):
            getattr(static, name).copy_(getattr(fresh, name))
        if out_dtype == FP8:
            static.scale.copy_(torch.tensor([0.02 * seed]))
            fresh.scale = static.scale.clone()
        graph.replay()
        torch.cuda.synchronize()
        exp = fresh.expected()
        fresh.output, fresh.output_lse = static.output, static.output_lse
        fresh.guards = []
        fresh.check_against(exp)


def test_import_initialises_neither_cuda_nor_triton():
    code = (
        "import sys, torch, attnmerge\n"
        "print(torch.cuda.is_initialized(), 'triton' in sys.modules)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert res.stdout.split() == ["False", "False"], res.stdout + res.stderr
