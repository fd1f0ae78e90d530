"""The eager launcher (attnmerge.cuda.eager, csrc/eager.c). On a CPU it is built with the
host C compiler and bound to a stand-in cuLaunchKernel (and Triton runner) that records
what it is asked to launch; on a GPU, its launches are compared with the Python path's.

What it must do: launch exactly what the Python path launches (kernel, grid, block, every
byte of the parameter block; the runner's every argument) for every call shaped like one
the Python path validated, and hand every other call to the Python path (misses), so
errors stay the Python path's. The CPU tests run with both ways the extension reads a
tensor: DLPack's exchange API (torch 2.10 on) and Python's C API (older torch). Every GPU
test that repeats a call runs through it too, and `attnmerge bench --eager` times it.
"""

from __future__ import annotations

import ctypes
import itertools
import random
from typing import NamedTuple

import pytest
import torch

from attnmerge import FP8Static, Plain, api, dispatch
from attnmerge.cuda import BACKEND as CUDA_BACKEND
from attnmerge.cuda import backend, eager
from attnmerge.triton import BACKEND as TRITON_BACKEND

pytestmark = pytest.mark.skipif(eager._compiler() is None, reason="no C compiler here")

_LAUNCH = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    *[ctypes.c_uint] * 7,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.c_void_p,
)


#: kMaxParams of csrc/eager.c: the launcher's parameter block (its first bytes the plan's).
MAX_BLOCK = 512


class Launched(NamedTuple):
    function: int
    grid: int
    block: int
    stream: int
    params: bytes  # launched by the extension: MAX_BLOCK bytes, the plan's block first

    def same_block(self, python: Launched) -> bool:
        """Whether this launch passed the parameter block of the Python path's launch."""
        return self.params[: len(python.params)] == python.params


class StandInKernel:
    """backend._kernel's result on a CPU: records its Python-path launches."""

    def __init__(self, config, launches: list[Launched]) -> None:
        self.function_address = hash(config) & 0xFFFFFFFFFFFF
        self.block = backend.BLOCK_THREADS
        self.device_index = -1  # the stand-in device getter's answer
        self.launches = launches

    def launch(self, grid: int, stream: int, params: bytes) -> None:
        self.launches.append(Launched(self.function_address, grid, self.block, stream, params))


class Harness(NamedTuple):
    launcher: eager.EagerLauncher
    fast: list[Launched]  # launched by the extension
    python: list[Launched]  # launched by the Python path


class Built(NamedTuple):
    launcher: eager.EagerLauncher
    fast: list[Launched]  # launched by the extension
    launch: object  # the stand-in cuLaunchKernel (must outlive the extension's use of it)
    exchange: object  # the DLPack exchange API given to setup(), or None


@pytest.fixture(scope="module", params=["dlpack", "python"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One build of the extension for the module, in its own cache directory, reading
    tensors through DLPack's exchange API (torch 2.10 on) or through Python's C API."""
    exchange = getattr(torch.Tensor, eager.DLPACK_EXCHANGE_API, None)
    if request.param == "python":
        exchange = None
    elif exchange is None:
        pytest.skip(f"torch {torch.__version__} has no DLPack exchange API")
    fast: list[Launched] = []

    @_LAUNCH
    def launch(function, gx, gy, gz, bx, by, bz, shared, stream, params, extra) -> int:
        block = ctypes.string_at(params[0], MAX_BLOCK)  # then compared up to the plan's size
        fast.append(Launched(function or 0, gx, bx, stream or 0, block))
        return 0

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNMERGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.delenv(eager.ENV_EAGER_LAUNCHER, raising=False)
        launcher = eager.EagerLauncher()
        address = ctypes.cast(launch, ctypes.c_void_p).value
        assert launcher.load(launch_address=address, host_tensors=True), launcher.unavailable
    reads = launcher.module.setup(
        torch.Tensor, lambda: -1, lambda index: 0, address, True, exchange
    )
    assert reads is (exchange is not None)
    yield Built(launcher, fast, launch, exchange)


@pytest.fixture
def harness(built: Built, monkeypatch: pytest.MonkeyPatch) -> Harness:
    launcher, fast = built.launcher, built.fast
    launcher.plans.clear()
    fast.clear()
    python: list[Launched] = []
    kernels: dict = {}
    monkeypatch.setattr(
        backend,
        "_kernel",
        lambda index, config: kernels.setdefault(config, StandInKernel(config, python)),
    )
    monkeypatch.setattr(backend, "_current_device", lambda: -1)
    monkeypatch.setattr(backend, "_current_raw_stream", lambda index: 0)
    return Harness(launcher, fast, python)


# ---------------------------------------------------------------------------------------
# A corpus of call layouts: each builds fresh tensors of the same layout on every call.

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Layout(NamedTuple):
    tokens: int
    heads: int
    head_size: int
    dtypes: tuple[torch.dtype, torch.dtype]
    fp8: bool
    out_dtype: torch.dtype  # where not FP8 or in place
    pad: int  # extra elements per row of the partials (a [..., :D] view)
    head_major: bool  # partials stored [H, T, D]
    misalign: int  # elements the partials' storage starts past a 16-byte boundary
    output_lse: str  # "none", "HT", "TH" (a transposed view), "inplace" (prefix_lse)
    inplace: bool  # output is prefix_output
    prefill: str  # "none", "zero", "all", "some"
    lse_base: object


def random_layout(rng: random.Random) -> Layout:
    tokens = rng.choice([0, 1, 2, 5, 16, 33, 64])
    dtypes = (rng.choice(DTYPES), rng.choice(DTYPES))
    inplace = rng.random() < 0.2
    fp8 = not inplace and rng.random() < 0.4
    return Layout(
        tokens=tokens,
        heads=rng.choice([1, 2, 3, 8]),
        head_size=rng.choice([3, 8, 64, 80, 128, 256]),
        dtypes=(dtypes[0], dtypes[0]) if inplace else dtypes,
        fp8=fp8,
        out_dtype=rng.choice(DTYPES),
        pad=rng.choice([0, 0, 1, 8]),
        head_major=rng.random() < 0.2,
        misalign=rng.choice([0, 0, 0, 1, 3]),
        output_lse=rng.choice(["none", "none", "HT", "TH", "inplace"]),
        inplace=inplace,
        prefill=rng.choice(["none", "none", "zero", "all", "some"]),
        lse_base=rng.choice(["e", 2]),
    )


def make_args(layout: Layout, device: str = "cpu") -> tuple:
    t, h, d = layout.tokens, layout.heads, layout.head_size

    def partial(dtype: torch.dtype) -> torch.Tensor:
        rows = h * t * (d + layout.pad) + layout.misalign
        flat = torch.randn(rows, device=device).to(dtype)[layout.misalign :]
        if layout.head_major:
            return flat.view(h, t, d + layout.pad)[..., :d].transpose(0, 1)
        return flat.view(t, h, d + layout.pad)[..., :d]

    prefix, suffix = partial(layout.dtypes[0]), partial(layout.dtypes[1])
    prefix_lse = torch.randn(h, t, device=device) * 3
    suffix_lse = torch.randn(h, t, device=device) * 3
    if layout.inplace:
        output = prefix
    elif layout.fp8:
        output = torch.empty(t, h, d, dtype=torch.float8_e4m3fn, device=device)
    else:
        output = torch.empty(t, h, d, dtype=layout.out_dtype, device=device)
    output_lse = {
        "none": None,
        "HT": torch.empty(h, t, device=device),
        "TH": torch.empty(t, h, device=device).t(),
        "inplace": prefix_lse,
    }[layout.output_lse]
    prefill = {"none": None, "zero": 0, "all": t, "some": t // 2}[layout.prefill]
    scale = torch.tensor([0.5], device=device) if layout.fp8 else None
    return (output, prefix, prefix_lse, suffix, suffix_lse, output_lse, prefill, scale)


def code_of(layout: Layout, backend_name: str = "cuda") -> int:
    return api._eager_code(layout.lse_base, backend_name)


def build_call(args: tuple, layout: Layout, backend_name: str = "cuda"):
    return api._build_call(*args, layout.lse_base, backend_name, real_tensors=True)


def plan_then_launch(harness: Harness, layout: Layout, backend_name: str):
    """A call of ``layout`` through the Python path's planning, then another of the same
    layout in other memory, which the extension must serve; the second call described."""
    module, plans = harness.launcher.module, harness.launcher.plans
    first = make_args(layout)
    miss = module.merge_pair(plans, code_of(layout, backend_name), *first)
    assert isinstance(miss, tuple), (layout, miss)
    plan_of = {"cuda": CUDA_BACKEND, "triton": TRITON_BACKEND}[backend_name].eager_plan
    harness.launcher.remember(miss, build_call(first, layout, backend_name), plan_of)
    again = make_args(layout)  # other memory, the same layout
    assert module.merge_pair(plans, code_of(layout, backend_name), *again) is None, layout
    return build_call(again, layout, backend_name)


def planned_calls(form: str):
    """(random layout, plan-then-launch) of two partials (``form="pair"``) or of stacked
    and packed ones."""
    if form == "pair":
        return random_layout, plan_then_launch
    return random_stack_layout, plan_then_launch_stacked


@pytest.mark.parametrize(("form", "seed"), [("pair", 0), ("stacked", 5)])
def test_launches_exactly_what_the_python_path_launches(
    harness: Harness, form: str, seed: int
) -> None:
    new_layout, planned = planned_calls(form)
    pair = form == "pair"
    launch_arguments = backend.launch_arguments if pair else backend.partials_launch_arguments
    rng = random.Random(seed)
    launched = 0
    for _ in range(300):
        layout = new_layout(rng)
        before = len(harness.fast)
        expected = launch_arguments(planned(harness, layout, "cuda"))
        if expected is None:  # nothing to do: nothing launched
            assert len(harness.fast) == before, layout
            continue
        launched += 1
        got = harness.fast[-1]
        assert (got.function, got.grid, got.block) == (
            expected.kernel.function_address,
            expected.grid,
            expected.kernel.block,
        ), layout
        assert got.params[: len(expected.params)] == expected.params, layout
    assert launched > 200


@pytest.fixture
def triton_runner(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The triton backend's direct runner, as a stand-in recording its calls."""
    merge_kernel = pytest.importorskip("attnmerge.triton").load()
    calls: list[tuple] = []
    monkeypatch.setattr(
        merge_kernel, "direct_runner", lambda launch: lambda *a, **kw: calls.append((a, kw))
    )
    return calls


@pytest.mark.parametrize(("form", "seed"), [("pair", 3), ("stacked", 6)])
def test_runner_plans_pass_the_python_paths_arguments(
    harness: Harness, triton_runner: list[tuple], form: str, seed: int
) -> None:
    """The triton backend's plans: the runner receives the arguments the Python path
    computes for the new call (its tensors' data pointers, the same numbers and
    compile-time arguments) and the current stream."""
    triton_backend = pytest.importorskip("attnmerge.triton")
    kernels = triton_backend.load() if form == "pair" else triton_backend.load_partials()
    new_layout, planned = planned_calls(form)
    rng = random.Random(seed)
    checked = 0
    for _ in range(150):
        layout = new_layout(rng)
        before = len(triton_runner)
        expected = kernels.launch_arguments(planned(harness, layout, "triton"))
        if expected is None:
            assert len(triton_runner) == before, layout
            continue
        args, kwargs = triton_runner[-1]
        assert kwargs == {"stream": 0}
        want = (*expected.args, *expected.constexprs)
        assert len(args) == len(want), layout
        for got, exp in zip(args, want, strict=True):
            if isinstance(exp, torch.Tensor):
                assert type(got) is int and got == exp.data_ptr(), layout
            else:
                assert got == exp, layout
        checked += 1
    assert checked > 100


def test_a_different_fact_is_a_miss(harness: Harness) -> None:
    """Each fact that can change validation or the launch is part of the key."""
    module, plans = harness.launcher.module, harness.launcher.plans
    base = Layout(
        16,
        8,
        128,
        (torch.bfloat16,) * 2,
        True,
        torch.bfloat16,
        0,
        False,
        0,
        "HT",
        False,
        "none",
        "e",
    )
    args = make_args(base)
    miss = module.merge_pair(plans, code_of(base), *args)
    harness.launcher.remember(miss, build_call(args, base), CUDA_BACKEND.eager_plan)
    assert module.merge_pair(plans, code_of(base), *make_args(base)) is None
    variants = [
        base._replace(tokens=17),
        base._replace(heads=4),
        base._replace(head_size=64),
        base._replace(dtypes=(torch.float16, torch.bfloat16)),
        base._replace(fp8=False),
        base._replace(pad=8),
        base._replace(head_major=True),
        base._replace(misalign=1),
        base._replace(output_lse="none"),
        base._replace(output_lse="TH"),
        base._replace(output_lse="inplace"),
        base._replace(prefill="some"),
        base._replace(prefill="zero"),
    ]
    for variant in variants:
        got = module.merge_pair(plans, code_of(variant), *make_args(variant))
        assert isinstance(got, tuple), variant
    # the LSE base and the backend asked for
    assert isinstance(module.merge_pair(plans, code_of(base._replace(lse_base=2)), *args), tuple)
    assert isinstance(module.merge_pair(plans, code_of(base, "auto"), *args), tuple)


def test_in_place_is_a_different_call(harness: Harness) -> None:
    """Output and prefix_output of one layout, once separate, once the same tensor."""
    module, plans = harness.launcher.module, harness.launcher.plans
    t, h, d = 4, 2, 64
    prefix, suffix = torch.randn(t, h, d), torch.randn(t, h, d)
    lses = (torch.randn(h, t), torch.randn(h, t))
    separate = (torch.empty(t, h, d), prefix, lses[0], suffix, lses[1], None, None, None)
    call = api._build_call(*separate, "e", "cuda", real_tensors=True)
    harness.launcher.remember(module.merge_pair(plans, 0, *separate), call, CUDA_BACKEND.eager_plan)
    in_place = (prefix, prefix, lses[0], suffix, lses[1], None, None, None)
    assert isinstance(module.merge_pair(plans, 0, *in_place), tuple)


@pytest.mark.parametrize(
    "change",
    ["parameter", "not_a_tensor", "prefill_bool", "prefill_past_end", "prefill_negative"],
)
def test_calls_the_fast_path_refuses(harness: Harness, change: str) -> None:
    """Not for the fast path (False): the Python path decides (and raises where it must)."""
    module, plans = harness.launcher.module, harness.launcher.plans
    t, h, d = 4, 2, 64
    args = [torch.empty(t, h, d), torch.randn(t, h, d), torch.randn(h, t)]
    args += [torch.randn(t, h, d), torch.randn(h, t), None, None, None]
    call = api._build_call(*args, "e", "cuda", real_tensors=True)
    harness.launcher.remember(module.merge_pair(plans, 0, *args), call, CUDA_BACKEND.eager_plan)
    if change == "parameter":
        args[1] = torch.nn.Parameter(args[1], requires_grad=False)
    elif change == "not_a_tensor":
        args[5] = [1.0]
    else:
        args[6] = {"prefill_bool": True, "prefill_past_end": t + 1, "prefill_negative": -1}[change]
    assert module.merge_pair(plans, 0, *args) is False


# ---------------------------------------------------------------------------------------
# Stacked and packed partials (merge() with K partials): merge_partials, the same way.


class StackLayout(NamedTuple):
    form: str  # "stacked" [K, T, H, D], "flashinfer" ([T, K, H, D] as views), "packed"
    partials: int  # K; packed: rows per token of tokens 1.. (token 0 has none)
    tokens: int
    heads: int
    head_size: int
    dtype: torch.dtype
    fp8: bool
    out_dtype: torch.dtype
    misalign: int  # elements the partials' storage starts past a 16-byte boundary
    output_lse: str  # "none", "HT", "TH", "inplace" (lses[0]; not packed)
    inplace: bool  # out is outputs[1] (stacked, K >= 2)
    prefill: str  # "none", "zero", "all", "some" (not packed)
    indptr_dtype: torch.dtype
    lse_base: object


def random_stack_layout(rng: random.Random) -> StackLayout:
    form = rng.choice(["stacked", "flashinfer", "packed"])
    partials = rng.choice([1, 2, 3, 8, 17])
    dtype = rng.choice(DTYPES)
    inplace = form != "packed" and partials >= 2 and rng.random() < 0.2
    return StackLayout(
        form=form,
        partials=partials,
        tokens=rng.choice([0, 1, 2, 5, 16, 33]),
        heads=rng.choice([1, 2, 3, 8]),
        head_size=rng.choice([3, 8, 64, 80, 128, 256]),
        dtype=dtype,
        fp8=not inplace and rng.random() < 0.4,
        out_dtype=dtype if inplace else rng.choice(DTYPES),
        misalign=rng.choice([0, 0, 0, 1, 3]),
        output_lse=rng.choice(["none", "HT", "TH"] + ([] if form == "packed" else ["inplace"])),
        inplace=inplace,
        prefill="none" if form == "packed" else rng.choice(["none", "zero", "all", "some"]),
        indptr_dtype=rng.choice([torch.int32, torch.int64]),
        lse_base=rng.choice(["e", 2]),
    )


def make_stack_args(layout: StackLayout, device: str = "cpu") -> tuple:
    """The arguments of api._merge_partials: (out, out_lse, outputs, lses, indptr,
    prefill_tokens_with_context, output_scale)."""
    k, t, h, d = layout.partials, layout.tokens, layout.heads, layout.head_size
    rows = k * t if layout.form != "packed" else max(t - 1, 0) * k
    flat = torch.randn(rows * h * d + layout.misalign, device=device).to(layout.dtype)
    flat = flat[layout.misalign :]
    indptr = None
    if layout.form == "stacked":
        outputs, lses = flat.view(k, t, h, d), torch.randn(k, h, t, device=device) * 3
    elif layout.form == "flashinfer":
        outputs = flat.view(t, k, h, d).transpose(0, 1)
        lses = (torch.randn(t, k, h, device=device) * 3).permute(1, 2, 0)
    else:
        outputs, lses = flat.view(rows, h, d), (torch.randn(rows, h, device=device) * 3).t()
        counts = [0] + [k] * max(t - 1, 0)
        indptr = torch.tensor([0, *itertools.accumulate(counts)][: t + 1], device=device)
        indptr = indptr.to(layout.indptr_dtype)
    if layout.inplace:
        out = outputs[1]
    else:
        dtype = torch.float8_e4m3fn if layout.fp8 else layout.out_dtype
        out = torch.empty(t, h, d, dtype=dtype, device=device)
    out_lse = {
        "none": None,
        "HT": torch.empty(h, t, device=device),
        "TH": torch.empty(t, h, device=device).t(),
        "inplace": lses[0],
    }[layout.output_lse]
    prefill = {"none": None, "zero": 0, "all": t, "some": t // 2}[layout.prefill]
    scale = torch.tensor([0.5], device=device) if layout.fp8 else None
    return (out, out_lse, outputs, lses, indptr, prefill, scale)


def stack_code(layout: StackLayout, backend_name: str = "cuda") -> int:
    return api._eager_code(layout.lse_base, backend_name)


def build_stack_call(args: tuple, layout: StackLayout, backend_name: str = "cuda"):
    return api._build_partials_call(*args, layout.lse_base, backend_name, real_tensors=True)


def plan_then_launch_stacked(harness: Harness, layout: StackLayout, backend_name: str):
    """As plan_then_launch, for stacked or packed partials."""
    module, plans = harness.launcher.module, harness.launcher.plans
    first = make_stack_args(layout)
    miss = module.merge_partials(plans, stack_code(layout, backend_name), *first)
    assert isinstance(miss, tuple), (layout, miss)
    plan_of = {"cuda": CUDA_BACKEND, "triton": TRITON_BACKEND}[backend_name].eager_plan
    harness.launcher.remember(miss, build_stack_call(first, layout, backend_name), plan_of)
    again = make_stack_args(layout)
    assert module.merge_partials(plans, stack_code(layout, backend_name), *again) is None, layout
    return build_stack_call(again, layout, backend_name)


def test_a_different_stacked_fact_is_a_miss(harness: Harness) -> None:
    """Each fact of a stacked or packed call that can change validation or the launch is
    part of its key; a two-partial key never serves it."""
    module, plans = harness.launcher.module, harness.launcher.plans
    base = StackLayout(
        "stacked", 4, 16, 8, 128, torch.bfloat16, True, torch.bfloat16, 0, "HT", False, "none",
        torch.int32, "e",
    )  # fmt: skip
    args = make_stack_args(base)
    miss = module.merge_partials(plans, stack_code(base), *args)
    harness.launcher.remember(miss, build_stack_call(args, base), CUDA_BACKEND.eager_plan)
    assert module.merge_partials(plans, stack_code(base), *make_stack_args(base)) is None
    packed = base._replace(form="packed", output_lse="none")
    variants = [
        base._replace(partials=5),
        base._replace(tokens=17),
        base._replace(heads=4),
        base._replace(head_size=64),
        base._replace(dtype=torch.float16),
        base._replace(fp8=False),
        base._replace(form="flashinfer"),
        base._replace(misalign=1),
        base._replace(output_lse="none"),
        base._replace(output_lse="TH"),
        base._replace(output_lse="inplace"),
        base._replace(fp8=False, inplace=True),
        base._replace(prefill="some"),
        base._replace(prefill="zero"),
        packed,
        packed._replace(indptr_dtype=torch.int64),
    ]
    for variant in variants:
        got = module.merge_partials(plans, stack_code(variant), *make_stack_args(variant))
        assert isinstance(got, tuple), variant
    assert isinstance(module.merge_partials(plans, stack_code(base, "auto"), *args), tuple)
    # out in place on outputs[1], then on outputs[2]: the same strides, another call
    inplace = base._replace(fp8=False, inplace=True)
    first = make_stack_args(inplace)
    miss = module.merge_partials(plans, stack_code(inplace), *first)
    harness.launcher.remember(miss, build_stack_call(first, inplace), CUDA_BACKEND.eager_plan)
    again = make_stack_args(inplace)
    assert module.merge_partials(plans, stack_code(inplace), *again) is None
    moved = (again[2][2], *again[1:])
    assert isinstance(module.merge_partials(plans, stack_code(inplace), *moved), tuple)
    # the two entries' keys differ for the same pointers and code
    pair = (args[0], args[2][0], args[3][0], args[2][1], args[3][1], args[1], None, args[6])
    assert isinstance(module.merge_pair(plans, stack_code(base), *pair), tuple)


def test_merge_with_k_partials_takes_the_fast_path(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """merge() with a stacked tensor, a list of its four views and packed rows: the first
    call of each kind plans, the next ones launch from the extension with the Python
    path's block (the list, a view of the same stack, takes the stacked tensor's plan);
    errors stay the Python path's."""
    monkeypatch.setattr(api, "EAGER_LAUNCHER", harness.launcher)
    monkeypatch.setattr(dispatch, "select", lambda backend, signature: CUDA_BACKEND.run)
    k, t, h, d = 4, 8, 4, 128
    stacked, lses = torch.randn(k, t, h, d), torch.randn(k, h, t)
    out = torch.empty(t, h, d, dtype=torch.bfloat16)
    indptr = torch.arange(0, k * t + 1, k, dtype=torch.int32)
    forms = [
        (stacked, lses, {}),
        (list(stacked), list(lses), {}),
        (stacked.transpose(0, 1).reshape(t * k, h, d), lses.permute(0, 2, 1).reshape(-1, h).t(),
         {"indptr": indptr}),
    ]  # fmt: skip
    for (outputs, form_lses, extra), planned in zip(forms, (1, 0, 1), strict=True):
        harness.fast.clear()
        before = len(harness.python)
        for _ in range(3):
            api.merge(outputs, form_lses, out=out, backend="cuda", **extra)
        assert len(harness.python) - before == planned and len(harness.fast) == 3 - planned
        assert all(fast.same_block(harness.python[-1]) for fast in harness.fast)
    with pytest.raises(ValueError, match="prefill_tokens_with_context must be in"):
        api.merge(stacked, lses, out=out, prefill_tokens_with_context=t + 1, backend="cuda")
    with pytest.raises(ValueError, match="lse_base must be 'e' or 2"):
        api.merge(stacked, lses, out=out, lse_base=3, backend="cuda")
    assert len(harness.fast) == 2 and len(harness.python) == 2


def test_host_tensors_are_refused_outside_tests(built: Built) -> None:
    module = built.launcher.module
    address = ctypes.cast(built.launch, ctypes.c_void_p).value
    args = (torch.empty(2, 1, 8), torch.randn(2, 1, 8), torch.randn(1, 2))
    args += (torch.randn(2, 1, 8), torch.randn(1, 2), None, None, None)
    try:
        module.setup(torch.Tensor, lambda: -1, lambda index: 0, address, False, built.exchange)
        assert module.merge_pair({}, 0, *args) is False
    finally:
        module.setup(torch.Tensor, lambda: -1, lambda index: 0, address, True, built.exchange)


def test_the_exchange_api_is_taken_where_torch_has_one(built: Built) -> None:
    """load() reads tensors through DLPack's exchange API where torch.Tensor has one (torch
    2.10 on); setup() takes nothing but such a capsule for it."""
    assert built.launcher.reads_with_dlpack is hasattr(torch.Tensor, eager.DLPACK_EXCHANGE_API)
    module = built.launcher.module
    address = ctypes.cast(built.launch, ctypes.c_void_p).value
    try:
        for other in (None, object(), torch.empty(0)):
            assert (
                module.setup(torch.Tensor, lambda: -1, lambda i: 0, address, True, other) is False
            )
    finally:
        module.setup(torch.Tensor, lambda: -1, lambda index: 0, address, True, built.exchange)


def test_public_api_takes_the_fast_path(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """merge_attn_states: the first call runs the Python path and stores its plan, the
    next ones launch it from the extension, byte for byte the same; errors stay the
    Python path's, and nothing is launched for them."""
    monkeypatch.setattr(api, "EAGER_LAUNCHER", harness.launcher)
    monkeypatch.setattr(dispatch, "select", lambda backend, signature: CUDA_BACKEND.run)
    t, h, d = 8, 4, 128
    args = (torch.empty(t, h, d, dtype=torch.bfloat16), torch.randn(t, h, d), torch.randn(h, t))
    args += (torch.randn(t, h, d), torch.randn(h, t))
    for _ in range(3):
        api.merge_attn_states(*args, backend="cuda")
    assert len(harness.python) == 1 and len(harness.fast) == 2
    assert all(fast.same_block(harness.python[0]) for fast in harness.fast)
    assert harness.fast[0].grid == harness.python[0].grid
    with pytest.raises(ValueError, match="prefill_tokens_with_context must be in"):
        api.merge_attn_states(*args, prefill_tokens_with_context=t + 1, backend="cuda")
    with pytest.raises(ValueError, match="lse_base must be 'e' or 2"):
        api.merge_attn_states(*args, lse_base=3, backend="cuda")
    with pytest.raises(ValueError, match="suffix_lse must have shape"):
        api.merge_attn_states(*args[:4], torch.randn(t, h + 1), backend="cuda")
    assert len(harness.python) == 1 and len(harness.fast) == 2


@pytest.mark.parametrize("form", ["list", "stacked", "fp8", "lse"])
def test_merge_takes_the_fast_path(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """merge() with two partials (a list or stacked, plain or FP8Static, with a new or a
    given output LSE): its plans are merge_attn_states's, so the first call plans and the
    next ones launch from the extension, byte for byte the Python path's launch; bad calls
    still raise the Python path's errors and launch nothing."""
    monkeypatch.setattr(api, "EAGER_LAUNCHER", harness.launcher)
    monkeypatch.setattr(dispatch, "select", lambda backend, signature: CUDA_BACKEND.run)
    t, h, d = 8, 4, 128
    outputs = [torch.randn(t, h, d), torch.randn(t, h, d)]
    lses = [torch.randn(h, t), torch.randn(h, t)]
    if form == "stacked":
        outputs, lses = torch.stack(outputs), torch.stack(lses)
    kwargs = {"out": torch.empty(t, h, d, dtype=torch.bfloat16), "backend": "cuda"}
    if form == "fp8":
        kwargs = {"quant": FP8Static(torch.tensor([0.5])), "backend": "cuda"}
    if form == "lse":
        kwargs |= {"return_lse": True}
    results = [api.merge(outputs, lses, **kwargs) for _ in range(3)]
    assert len(harness.python) == 1 and len(harness.fast) == 2
    assert harness.fast[0].grid == harness.python[0].grid
    python = harness.python[0]
    if form in ("fp8", "lse"):  # new tensors per call: only their pointers differ
        blocks = {python.params} | {fast.params[: len(python.params)] for fast in harness.fast}
        assert len(blocks) == 3
    else:
        assert all(fast.same_block(python) for fast in harness.fast)
    assert all((r.lse is not None) == (form == "lse") for r in results)
    with pytest.raises(ValueError, match="prefill_tokens_with_context must be in"):
        api.merge(outputs, lses, prefill_tokens_with_context=t + 1, **kwargs)
    with pytest.raises(ValueError, match="lse_base must be 'e' or 2"):
        api.merge(outputs, lses, lse_base=3, **kwargs)
    if form == "list":  # merge()'s own checks of the output, for an otherwise planned call
        with pytest.raises(TypeError, match=r"out must be torch\.float32"):
            api.merge(outputs, lses, quant=Plain(torch.float32), **kwargs)
        with pytest.raises(TypeError, match=r"out must be torch\.float16"):
            api.merge(outputs, lses, out_dtype=torch.float16, **kwargs)
    assert len(harness.python) == 1 and len(harness.fast) == 2


def test_build_failure_leaves_the_python_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ATTNMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    launcher = eager.EagerLauncher()
    with caplog.at_level("INFO", logger="attnmerge"):
        assert not launcher.load(launch_address=1, host_tensors=True)
    assert launcher.module is None and "failed" in launcher.unavailable
    assert "eager launcher unavailable" in caplog.text
    assert not launcher.load()  # tried once


def test_describe_and_prebuild(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """What `attnmerge info` says of the launcher, and `attnmerge build`'s prebuild."""
    monkeypatch.setenv("ATTNMERGE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(eager.ENV_EAGER_LAUNCHER, raising=False)
    assert eager.describe().startswith("built on first use, with ")
    assert eager.prebuild().startswith("eager launcher built with ")
    assert eager.describe().startswith("built, with ")
    dlpack = hasattr(torch.Tensor, "__dlpack_c_exchange_api__")
    reader = "DLPack's exchange API" if dlpack else "Python's C API"
    assert eager.describe().endswith(f"tensors read through {reader}")
    monkeypatch.setenv(eager.ENV_EAGER_LAUNCHER, "0")
    assert eager.describe().startswith("off (ATTNMERGE_EAGER_LAUNCHER=0)")
    monkeypatch.delenv(eager.ENV_EAGER_LAUNCHER)
    monkeypatch.setattr(eager, "_compiler", lambda: None)
    assert eager.describe().startswith("unavailable: no C compiler")
    with pytest.raises(eager.BuildError, match="no C compiler"):
        eager.build_extension()


def test_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eager.ENV_EAGER_LAUNCHER, "0")
    launcher = eager.EagerLauncher()
    assert not launcher.load(launch_address=1, host_tensors=True)
    assert launcher.unavailable == "ATTNMERGE_EAGER_LAUNCHER=0"


def test_plan_header_matches_the_c_declaration() -> None:
    """PLAN_HEADER packs PlanHeader of csrc/eager.c: the same fields, sizes and order."""
    source = (backend.resources.files("attnmerge.cuda") / "csrc" / "eager.c").read_text()
    body = source.split("typedef struct {", 1)[1].split("} PlanHeader;", 1)[0]
    sizes = {"uint64_t": "Q", "uint32_t": "I", "int32_t": "i"}
    fmt = "<"
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        if not line:
            continue
        ctype, names = line.rstrip(";").split(" ", 1)
        for name in names.split(","):
            name = name.strip()
            count = (
                int(name.split("[")[1].rstrip("]").replace("kTensors", "7")) if "[" in name else 1
            )
            fmt += (str(count) if count > 1 else "") + sizes[ctype]
    assert fmt == eager.PLAN_HEADER.format
    assert len(eager.PLAN_FIELDS) == 7 and set(eager.PLAN_FIELDS) <= set(backend.PARAMS.fields)
    assert len(eager.PARTIALS_PLAN_FIELDS) <= 7
    assert set(eager.PARTIALS_PLAN_FIELDS) <= set(backend.PARTIALS_PARAMS.fields)


class CountingLauncher:
    """The process's launcher as the API sees it, counting the calls it launched."""

    def __init__(self, real: eager.EagerLauncher) -> None:
        self.real, self.plans, self.launched = real, real.plans, 0
        self.module = self

    def merge_pair(self, *args):
        result = self.real.module.merge_pair(*args)
        self.launched += result is None
        return result

    def merge_partials(self, *args):
        result = self.real.module.merge_partials(*args)
        self.launched += result is None
        return result

    def load(self) -> bool:
        return self.real.load()

    def remember(self, miss, call, plan_of) -> None:
        self.real.remember(miss, call, plan_of)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def run_filled(
    args: tuple, written: list[torch.Tensor], layout: Layout, backend: str, entry: str = "op"
) -> list[torch.Tensor]:
    """The call on outputs filled with a byte pattern first, through merge_attn_states
    (``entry="op"``) or merge with two partials; copies of what it wrote."""
    for t in written:
        t.fill_(-7.25)
    if entry == "op":
        api.merge_attn_states(*args, lse_base=layout.lse_base, backend=backend)
    else:
        out, prefix, prefix_lse, suffix, suffix_lse, out_lse, prefill, scale = args
        api.merge(
            [prefix, suffix],
            [prefix_lse, suffix_lse],
            quant=None if scale is None else FP8Static(scale),
            out=out,
            out_lse=out_lse,
            prefill_tokens_with_context=prefill,
            lse_base=layout.lse_base,
            backend=backend,
        )
    return [t.clone() for t in written]


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_gpu_fast_path_gives_the_python_paths_bits(
    monkeypatch: pytest.MonkeyPatch, backend_name: str
) -> None:
    """On a GPU: for each layout, the Python path's output, then the same call twice more
    (planned, then launched by the extension), three times through merge() (launched),
    and once captured in a CUDA graph and
    replayed: every output and output LSE bit-identical."""
    real = eager.LAUNCHER
    assert real.load(), real.unavailable
    counting = CountingLauncher(real)
    rng = random.Random(2)
    served = 0
    for _ in range(60):
        layout = random_layout(rng)._replace(inplace=False)
        if layout.output_lse == "inplace":  # the input LSE is overwritten: not repeatable
            layout = layout._replace(output_lse="HT")
        args = make_args(layout, "cuda")
        written = [t for t in (args[0], args[5]) if t is not None]
        monkeypatch.setattr(api, "EAGER_LAUNCHER", eager.EagerLauncher())  # off: Python
        api.EAGER_LAUNCHER._tried = True
        expected = run_filled(args, written, layout, backend_name)
        monkeypatch.setattr(api, "EAGER_LAUNCHER", counting)
        before = counting.launched
        for entry in ("op", "merge"):
            for _ in range(3):
                got = run_filled(args, written, layout, backend_name, entry)
                for e, g in zip(expected, got, strict=True):
                    assert same_bits(e, g), (layout, entry)
        served += counting.launched - before
        if layout.tokens and layout.heads:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                api.merge_attn_states(*args, lse_base=layout.lse_base, backend=backend_name)
            for t in written:
                t.fill_(-7.25)
            graph.replay()
            torch.cuda.synchronize()
            for e, t in zip(expected, written, strict=True):
                assert same_bits(e, t), layout
    assert served >= 150, served


def run_stacked_filled(args: tuple, layout: StackLayout, backend: str) -> list[torch.Tensor]:
    """merge() of make_stack_args's ``args`` on outputs filled with a byte pattern first;
    copies of what it wrote."""
    out, out_lse, outputs, lses, indptr, prefill, scale = args
    written = [t for t in (out, out_lse) if t is not None]
    for t in written:
        t.fill_(-7.25)
    api.merge(
        outputs,
        lses,
        quant=None if scale is None else FP8Static(scale),
        out=out,
        out_lse=out_lse,
        indptr=indptr,
        prefill_tokens_with_context=prefill,
        lse_base=layout.lse_base,
        backend=backend,
    )
    return [t.clone() for t in written]


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_gpu_stacked_fast_path_gives_the_python_paths_bits(
    monkeypatch: pytest.MonkeyPatch, backend_name: str
) -> None:
    """On a GPU, stacked and packed partials through merge(): for each layout the Python
    path's output, then the same call three times more (planned, then launched by the
    extension): every output and output LSE bit-identical."""
    real = eager.LAUNCHER
    assert real.load(), real.unavailable
    counting = CountingLauncher(real)
    rng = random.Random(4)
    served = 0
    for _ in range(60):
        layout = random_stack_layout(rng)._replace(inplace=False)
        if layout.output_lse == "inplace":  # the input LSE is overwritten: not repeatable
            layout = layout._replace(output_lse="HT")
        args = make_stack_args(layout, "cuda")
        monkeypatch.setattr(api, "EAGER_LAUNCHER", eager.EagerLauncher())  # off: Python
        api.EAGER_LAUNCHER._tried = True
        expected = run_stacked_filled(args, layout, backend_name)
        monkeypatch.setattr(api, "EAGER_LAUNCHER", counting)
        before = counting.launched
        for _ in range(3):
            for e, g in zip(expected, run_stacked_filled(args, layout, backend_name), strict=True):
                assert same_bits(e, g), layout
        served += counting.launched - before
    assert served >= 90, served
