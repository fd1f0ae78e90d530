"""benchmarks/formats.py on a CPU: its Triton quantisers bit for bit against the formats'
torch reference (under Triton's interpreter; compiled where a GPU is visible), the
providers' calls (on attnmerge's torch backend where they would use cuda), the case list,
the summary of a hand-made CSV, the options, and the whole flow with a fake timer."""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
from pathlib import Path

import pytest
import torch

import attnmerge
from attnmerge import FP8PerToken, FP8PerTokenGroup, bench
from benchmarks import formats

pytest.importorskip("triton")

FP8 = torch.float8_e4m3fn
NAN, INF = math.nan, math.inf
#: where the quantisers run: on a GPU where there is one (the interpreter is off there)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
interpreter_only = pytest.mark.skipif(
    DEVICE == "cuda", reason="Triton kernels on CPU tensors: the interpreter, without a GPU"
)
FAKE_DEVICE = bench.DeviceInfo("NVIDIA H100 80GB HBM3", l2_bytes=1 << 20, copy_bytes_per_s=3.0e12)
#: poison for the scales' buffer: what a store must set, or leave alone
POISON = 0x5A5A5A5A
#: elements of the scales' buffer before and after the tensor
GUARD = 3

GROUP_FORMATS = [
    FP8PerTokenGroup(size, ue8m0, layout)
    for size in (64, 128)
    for ue8m0, layout in (
        (False, "row_major"),
        (False, "col_major"),
        (False, "col_major_tma"),
        (True, "row_major"),
        (True, "col_major_tma"),
        (True, "ue8m0_packed"),
    )
]
# (T, H, D): G = H * D / group not a multiple of 4 (packed: bytes past G), T not a multiple
# of 4 (padding rows), several packed columns, groups spanning heads, one token
SHAPES = [(5, 3, 128), (6, 10, 64), (7, 4, 32), (1, 16, 128), (8, 2, 256)]


def values(tokens: int, heads: int, head_size: int, seed: int = 0) -> torch.Tensor:
    """bf16 ``[T, H, D]`` with rows of very different magnitudes and the special rows: all
    zeros, a NaN, +-inf, subnormal-range values, bf16's largest values, exact powers of
    two (UE8M0 scales with a zero mantissa)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads * head_size, generator=g)
    x *= torch.exp2(torch.randint(-20, 20, (tokens, 1), generator=g).float())
    x = x.reshape(tokens, heads, head_size)
    rows = [
        lambda r: r.zero_(),
        lambda r: r.view(-1)[5].fill_(NAN),
        lambda r: r.view(-1)[1].fill_(INF),
        lambda r: r.view(-1)[-2].fill_(-INF),
        lambda r: r.mul_(1e-38),
        lambda r: r.view(-1)[::7].fill_(-3.3e38),
        lambda r: r.copy_(torch.exp2(torch.randint(-8, 8, r.shape, generator=g).float())),
    ]
    for t, special in zip(range(tokens), rows, strict=False):
        special(x[t])
    return x.bfloat16().to(DEVICE)


def poisoned(shape, strides, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A tensor of ``shape``/``strides``/``dtype`` inside a buffer of poison (returned too),
    with ``GUARD`` elements of it before and after the tensor's storage."""
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True) if n)
    buffer = torch.full((span + 2 * GUARD,), POISON, dtype=torch.int32, device=DEVICE)
    return buffer.view(dtype).as_strided(shape, strides, GUARD), buffer


def with_poisoned_scales(fmt, tokens: int, heads: int, head_size: int):
    """``fmt`` with its scales in a poisoned buffer, and that buffer."""
    if isinstance(fmt, FP8PerTokenGroup):
        layout = fmt.scales_layout(tokens, fmt.groups(heads, head_size))
    else:  # a [T] view with a stride of 2: any stride is allowed
        layout = ((tokens,), (2,), torch.float32)
    scales, buffer = poisoned(*layout)
    return dataclasses.replace(fmt, scales=scales), buffer


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Bit for bit, except that any two NaNs are equal (FP8 0x7F and 0xFF, payloads)."""
    assert a.shape == b.shape and a.dtype == b.dtype, what
    nan_a, nan_b = a.float().isnan(), b.float().isnan()
    ints = {1: torch.uint8, 4: torch.int32}[a.element_size()]
    ia, ib = a.contiguous().view(ints).clone(), b.contiguous().view(ints).clone()
    ia[nan_a], ib[nan_b] = 0, 0
    differ = (nan_a != nan_b) | (ia != ib)
    assert not differ.any(), (
        f"{what}: {int(differ.sum())} of {a.numel()} elements differ, first at "
        f"{differ.nonzero()[:4].tolist()}"
    )


def check_against_reference(fmt, x: torch.Tensor, store) -> None:
    """``store(fmt, x, out)`` against ``fmt.store_reference`` of ``x``: the FP8 codes and
    every element of the scales' buffers (padding, guards) bit for bit."""
    ours, our_buffer = with_poisoned_scales(fmt, *x.shape)
    theirs, their_buffer = with_poisoned_scales(fmt, *x.shape)
    out = torch.full(x.shape, 0x5A, dtype=torch.uint8, device=DEVICE).view(FP8)
    want = torch.empty_like(out)
    store(ours, x, out)
    theirs.store_reference(x.float(), want)
    assert_bits_equal(out, want, "FP8 codes")
    as_float = ours.scales.dtype == torch.float32
    view = (lambda b: b.view(torch.float32)) if as_float else (lambda b: b)
    assert_bits_equal(view(our_buffer), view(their_buffer), "scales' buffer")


def test_the_check_sees_differences() -> None:
    a = torch.tensor([1.0, NAN, 3.0])
    assert_bits_equal(a, torch.tensor([1.0, -NAN, 3.0]), "NaNs")
    for b in ([1.0, NAN, 3.0000002], [1.0, 2.0, 3.0], [-1.0, NAN, 3.0]):
        with pytest.raises(AssertionError, match="differ"):
            assert_bits_equal(a, torch.tensor(b), "values")

    def off_by_one_code(fmt, x, out):  # a quantiser one FP8 code off somewhere
        fmt.store_reference(x.float(), out)
        out.view(torch.uint8).view(-1)[3] += 1

    fmt = FP8PerTokenGroup(128)
    with pytest.raises(AssertionError, match="FP8 codes"):
        check_against_reference(fmt, values(2, 2, 128), off_by_one_code)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "fmt", GROUP_FORMATS, ids=lambda f: f"g{f.group_size}-{f.layout}{'-ue8m0' * f.ue8m0}"
)
def test_group_quantiser_is_the_reference(fmt, shape) -> None:
    if shape[1] * shape[2] % fmt.group_size:
        pytest.skip("H * D is not a multiple of the group size")
    x = values(*shape, seed=sum(shape))
    check_against_reference(fmt, x, formats.quantize_into)


@pytest.mark.parametrize("per_program", [2, 4])
def test_group_quantiser_with_several_groups_per_program(per_program: int) -> None:
    quantize = lambda fmt, x, out: formats.quantize_into(fmt, x, out, per_program)
    for fmt in (FP8PerTokenGroup(64), FP8PerTokenGroup(128, True, "col_major_tma")):
        check_against_reference(fmt, values(6, 10, 64, seed=per_program), quantize)
    with pytest.raises(ValueError, match="power of two"):
        formats.quantize_into(*_group_args(), groups_per_program=3)


def _group_args():
    fmt = FP8PerTokenGroup(128).with_scales(2, 1, 128, DEVICE)
    return fmt, values(2, 1, 128), torch.empty(2, 1, 128, dtype=FP8, device=DEVICE)


@pytest.mark.parametrize("scale_ub", [None, 0.5, INF, NAN])
@pytest.mark.parametrize("shape", [(7, 3, 128), (1, 16, 128), (4, 33, 128), (3, 1, 64)])
def test_token_quantiser_is_the_reference(shape, scale_ub, monkeypatch) -> None:
    # a short block: tokens of several blocks and a partial last block
    monkeypatch.setattr(formats, "TOKEN_BLOCK", 1024)
    ub = None if scale_ub is None else torch.tensor([scale_ub], device=DEVICE)
    check_against_reference(FP8PerToken(ub), values(*shape, seed=3), formats.quantize_into)


def test_quantiser_checks_its_arguments() -> None:
    fmt, x, out = _group_args()
    with pytest.raises(ValueError, match="scales"):
        formats.quantize_into(FP8PerTokenGroup(128), x, out)
    with pytest.raises(ValueError, match="out must be"):
        formats.quantize_into(fmt, x, out.view(torch.uint8))
    with pytest.raises(ValueError, match="x must be contiguous"):
        x = torch.empty(2, 1, 256, dtype=torch.bfloat16, device=DEVICE)[:, :, ::2]
        formats.quantize_into(fmt, x, out)
    with pytest.raises(TypeError, match="no Triton quantiser"):
        formats.quantize_into(attnmerge.Plain(torch.bfloat16), x, x)


@pytest.mark.parametrize("name", list(formats.FORMATS))
def test_reference_store_is_the_reference(name: str) -> None:
    """The function ``cuda+compiled`` compiles, uncompiled: the reference's bits (packed
    scales' padding aside: it is zeroed once, where the buffer is allocated)."""
    x = values(6, 10, 128, seed=7)
    fmt = formats.FORMATS[name]

    def store(ours, x, out):
        formats.reference_store(fmt, out, ours.scales, x)

    if name != "ue8m0-packed":
        check_against_reference(fmt, x, store)
        return
    ours, theirs = (fmt.with_scales(*x.shape, DEVICE) for _ in "ab")
    for f in (ours, theirs):
        f.scales.untyped_storage().fill_(POISON & 0xFF)
    ours.scales.untyped_storage().fill_(0)
    out, want = (torch.empty(x.shape, dtype=FP8, device=DEVICE) for _ in "ab")
    store(ours, x, out)
    theirs.store_reference(x.float(), want)
    assert_bits_equal(out, want, "FP8 codes")
    assert_bits_equal(ours.scales, theirs.scales, "scales")
    assert ours.scales.stride(1) > 6  # the reference zeroed the padding rows the test poisoned
    whole = [
        torch.tensor([], dtype=torch.uint8).set_(f.scales.untyped_storage()) for f in (ours, theirs)
    ]
    assert torch.equal(*whole)


# ---------------------------------------------------------------------------
# Providers.


@pytest.fixture
def torch_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    """The providers' cuda merges on the torch backend, the reference quantiser uncompiled."""
    monkeypatch.setattr(formats, "BACKEND", "torch")
    monkeypatch.setattr(
        formats,
        "_compiled_store",
        lambda name: lambda *args: formats.reference_store(formats.FORMATS[name], *args),
    )


def input_set(partials: int | None, tokens: int = 5, heads: int = 2, device: str = DEVICE):
    case = bench.Case("bf16", True, False, 128, tokens, heads, "static", partials)
    (s,) = bench.make_input_sets(case, 1, device)
    return s


def bf16_merge(s: dict) -> torch.Tensor:
    outputs, lses, _ = formats._partials(s)
    return attnmerge.merge(outputs, lses, out_dtype=torch.bfloat16, backend="torch").output


@pytest.mark.parametrize("partials", [None, 4])
@pytest.mark.parametrize("provider", formats.SEPARATE)
@pytest.mark.parametrize("name", list(formats.FORMATS))
def test_separate_providers(name: str, provider: str, partials, torch_merges: None) -> None:
    """The merge into bf16 and the quantisation: the format's reference of that merge."""
    s = input_set(partials)
    call = formats.providers()[f"{provider}:{name}"](s, None)
    call()
    want = torch.empty_like(s["output"])
    fmt = formats.with_scales(name, want)
    fmt.store_reference(bf16_merge(s).float(), want)
    assert_bits_equal(s["output"], want, "FP8 codes")
    assert s["output"].view(torch.uint8).any()  # not an output of zeros


@interpreter_only
@pytest.mark.parametrize("partials", [None, 4])
def test_static_and_fused_providers(partials, torch_merges: None) -> None:
    scale = torch.tensor([bench.FP8_SCALE])
    calls = formats.providers()
    s = input_set(partials)
    calls["static"](s, scale)()
    want = attnmerge.merge(*formats._partials(s)[:2], quant=attnmerge.FP8Static(scale))
    assert_bits_equal(s["output"], want.output, "static")
    # on a CPU the cuda backend refuses every call, and no kernel stores per-token scales
    with pytest.raises(attnmerge.BackendError, match="backend 'cuda'"):
        calls["cuda:group-row"](s, scale)()
    with pytest.raises(attnmerge.BackendError, match="backend 'triton'"):
        calls["triton:token"](s, scale)()
    call = calls["triton:group-row"](s, scale)  # the interpreter's merge, with row scales
    call()
    assert isinstance(call.keywords["quant"], FP8PerTokenGroup)
    assert call.keywords["quant"].scales.shape == (5, 2)
    assert call.keywords["backend"] == "triton"
    if partials is None:  # two partials in a list, the two-partial kernel
        assert isinstance(call.args[0], list) and len(call.args[0]) == 2


@interpreter_only
def test_served() -> None:
    table = formats.served(["group-row", "token"], [(None, False), (4, False)], device="cpu")
    assert set(table) == {(n, k, False) for n in ("group-row", "token") for k in (None, 4)}
    for (name, _, _), reasons in table.items():
        assert list(reasons) == ["cuda", "triton", "torch"]
        assert reasons["cuda"].startswith("unsupported: ")  # not on a CPU
        assert reasons["torch"] is None
        assert (reasons["triton"] is None) == (name == "group-row")
    report = formats.served_report(table)
    assert "group-row     K=2 (two partials) auto -> triton" in report
    assert "token         K=4                auto -> torch" in report
    assert "      triton: unsupported: " in report


# ---------------------------------------------------------------------------
# Options and cases.


def test_options() -> None:
    args = formats.parser().parse_args([])
    assert args.tokens == (1, 4, 16, 64, 256, 1024, 4096, 8192)
    assert args.heads == (128, 64, 32, 16) and args.head_sizes == (128,)
    assert args.partials == (2, 4, 8) and args.dtypes == ("bf16",)
    assert args.formats == tuple(formats.FORMATS) and args.rep_ms == 2
    assert args.providers == ("static", "cuda", "triton", "cuda+quant")
    assert args.summary is None and args.csv is None
    args = formats.parser().parse_args(
        ["--formats", "token,group-row,token", "--providers", "cuda+compiled", "--rep-ms", "5"]
    )
    assert args.formats == ("token", "group-row")
    assert args.providers == ("cuda+compiled",) and args.rep_ms == 5
    assert formats.parser().parse_args(["--summary", "x.csv"]).summary == "x.csv"
    for bad in (["--formats", "group"], ["--providers", "unfused"], ["--tokens", "0"]):
        with pytest.raises(SystemExit):
            formats.parser().parse_args(bad)
    with pytest.raises(SystemExit, match="--eager"):
        formats.main(["--eager"])


def test_cases() -> None:
    cases = formats.build_cases(formats.parser().parse_args([]))
    shapes = 8 * 4 * 3
    assert len(cases) == shapes * (1 + 5 * 3)
    assert len(set(cases)) == len(cases)
    assert {(c.dtype, c.fp8, c.output_lse, c.head_size, c.variable) for c in cases} == {
        ("bf16", True, False, 128, False)
    }
    assert {c.partials for c in cases} == {None, 4, 8}  # K = 2: two separate partials
    assert {(c.tokens, c.heads) for c in cases} == set(
        itertools.product(formats.TOKENS, formats.HEADS)
    )
    first = [c.provider for c in cases[:16]]
    assert len({(c.partials, c.tokens, c.heads) for c in cases[:16]}) == 1
    assert first[:5] == [
        "static",
        "cuda:group-row",
        "triton:group-row",
        "cuda+quant:group-row",
        "cuda:group-tma",
    ]
    assert first[-3:] == ["cuda:token", "triton:token", "cuda+quant:token"]
    extra = formats.providers()
    assert all(c.provider in extra for c in cases)
    narrow = formats.parser().parse_args(
        ["--partials", "2", "--tokens", "4096", "--heads", "16", "--formats", "token"]
    )
    narrow.providers = ("cuda+compiled", "cuda")
    assert [(c.provider, c.partials) for c in formats.build_cases(narrow)] == [
        ("cuda+compiled:token", None),
        ("cuda:token", None),
    ]


# ---------------------------------------------------------------------------
# The summary.

INFO = bench.RunInfo(
    "NVIDIA H100 80GB HBM3", "2.13", "3.7", "0.1", "abc1234", 3350.0, "datasheet", 3000.0, False, 2
)


def write_results(path: Path, times: dict) -> None:
    """A CSV of ``{(provider, (K, T, H)): us, or an error message}``."""
    records = []
    for (provider, (k, t, h)), value in times.items():
        case = bench.Case("bf16", True, False, 128, t, h, provider, None if k == 2 else k)
        error = value if isinstance(value, str) else ""
        us = None if error else (value,) * 3
        records.append(bench.make_record(case, 1, us, INFO, error))
    bench.write_csv(path, records, INFO)


SHAPES_2x2x2 = list(itertools.product((2, 4), (1, 4096), (16, 128)))


def test_summary(tmp_path: Path) -> None:
    times: dict = {}
    for shape in SHAPES_2x2x2:
        _, t, h = shape
        times["static", shape] = 10.0
        # group-row: within 5% of static, 1.6x faster than its separate quantisation
        times["cuda:group-row", shape] = 10.5
        times["triton:group-row", shape] = 12.0
        times["cuda+quant:group-row", shape] = 16.8
        times["cuda+compiled:group-row", shape] = 20.0
        # ue8m0-packed: 15% over static at one shape; the compiled quantiser the faster
        times["cuda:ue8m0-packed", shape] = 11.5 if shape == (4, 1, 16) else 10.0
        times["cuda+quant:ue8m0-packed", shape] = 13.0
        times["cuda+compiled:ue8m0-packed", shape] = 12.0
        # token: 30% over static at T x H = 4096 x 128 only, also at T = 1 (not judged)
        times["cuda:token", shape] = 13.0 if t * h in (16, 128, 4096 * 128) else 12.0
        times["cuda+quant:token", shape] = 40.0
        # group-tma: no kernel stores it here
        reason = "BackendError: backend 'cuda' cannot serve this call: no epilogue"
        times["cuda:group-tma", shape] = reason
        times["cuda+quant:group-tma", shape] = 15.0
    times["triton:token", (2, 1, 16)] = "RuntimeError: boom"
    path = tmp_path / "formats.csv"
    write_results(path, times)
    text = formats.summary(path)
    lines = text.splitlines()
    print(text)
    assert lines[0].startswith("formats summary of formats.csv: NVIDIA H100 80GB HBM3, git abc1234")
    assert "8 shapes" in lines[0]
    # the formats in FORMATS' order
    assert [x for x in lines if x.endswith(":") and not x.startswith(" ")] == [
        "group-row:",
        "group-tma:",
        "ue8m0-packed:",
        "token:",
    ]
    block = _block(lines, "group-row:")
    assert block[0] == (
        "  cuda vs separate quant: 1.60x geometric mean over 8 shapes (1.60x to 1.60x; separate "
        "quant: the faster of cuda+quant at 8); target 1.3x: met"
    )
    assert block[1].startswith("  cuda / static: 1.050 geometric mean, 1.050 to 1.050; target ")
    assert block[1].endswith("<= 1.1 at every shape (8 shapes): met")
    assert block[2].startswith("  triton vs separate quant: 1.40x")
    assert block[3] == "  triton / static: 1.200 geometric mean, 1.200 to 1.200"
    block = _block(lines, "group-tma:")
    assert block[0] == (
        "  cuda: unsupported at 8 shapes: BackendError: backend 'cuda' cannot serve this call: "
        "no epilogue"
    )
    assert len(block) == 1
    block = _block(lines, "ue8m0-packed:")
    mean = 12.0 / math.exp((7 * math.log(10.0) + math.log(11.5)) / 8)
    assert block[0].startswith(f"  cuda vs separate quant: {mean:.2f}x geometric mean")
    assert "the faster of cuda+compiled at 8); target 1.3x: MISSED" in block[0]
    assert block[1].startswith("    below 1.3x at 8: K=4,T=1,H=16:1.04 K=2,T=1,H=16:1.20")
    static = next(x for x in block if "cuda / static" in x)
    assert static.endswith("target <= 1.1 at every shape (8 shapes): MISSED at 1")
    assert _block(lines, "ue8m0-packed:")[-1] == "    over 1.1: K=4,T=1,H=16:1.15"
    block = _block(lines, "token:")
    assert block[0] == "  triton: failed at 1 shapes: RuntimeError: boom"
    static = next(x for x in block if "cuda / static" in x)
    assert static.startswith("  cuda / static: ") and "1.200 to 1.300" in static
    assert static.endswith("<= 1.25 at T x H >= 32768 (4 shapes): MISSED at 2")
    assert block[-1] == "    over 1.25: K=2,T=4096,H=128:1.30 K=4,T=4096,H=128:1.30"
    assert lines[-1] == (
        f"targets missed: group-tma (no cuda times); ue8m0-packed speed-up {mean:.2f}x; "
        "ue8m0-packed / static at 1 shapes; token / static at 2 shapes"
    )


def _block(lines: list[str], head: str) -> list[str]:
    start = lines.index(head) + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith(" "))
    return lines[start:end]


def test_summary_all_met_and_from_the_command_line(tmp_path: Path, capsys) -> None:
    times = {("static", s): 10.0 for s in SHAPES_2x2x2}
    times |= {("cuda:token", s): 12.0 for s in SHAPES_2x2x2}
    times |= {("cuda+quant:token", s): 24.0 for s in SHAPES_2x2x2}
    path = tmp_path / "f.csv"
    write_results(path, times)
    assert formats.main(["--summary", str(path)]) == 0
    text = capsys.readouterr().out
    assert "cuda vs separate quant: 2.00x" in text and "target 1.3x: met" in text
    assert "(4 shapes): met" in text
    assert text.rstrip().endswith("targets missed: none")


# ---------------------------------------------------------------------------
# The whole flow.


@interpreter_only
def test_main_with_a_fake_timer(tmp_path: Path, torch_merges: None, capsys) -> None:
    calls = []

    def timer(fn):
        fn()  # every provider's call runs once (errors are recorded, as on a GPU)
        calls.append(fn)
        return (2.0, 1.5, 2.5)

    path = tmp_path / "formats.csv"
    argv = ["--tokens", "3", "--heads", "1", "--partials", "2,4", "--csv", str(path)]
    argv += ["--formats", "group-row,token", "--providers", "static,cuda,triton,cuda+quant"]
    out = io.StringIO()
    code = formats.main(argv, device="cpu", timer=timer, device_info=FAKE_DEVICE, out=out)
    assert code == 0
    records, info = bench.read_csv(path)
    assert info.gpu == FAKE_DEVICE.name and info.rep_ms == 2
    providers = [r.provider for r in records]
    assert providers == 2 * [
        "static",
        "cuda:group-row",
        "triton:group-row",
        "cuda+quant:group-row",
        "cuda:token",
        "triton:token",
        "cuda+quant:token",
    ]
    by = {(r.provider, r.partials): r for r in records}
    for k in (None, 4):
        for p in ("static", "triton:group-row", "cuda+quant:group-row", "cuda+quant:token"):
            assert by[p, k].error == "" and by[p, k].median_us == 2.0, (p, k)
        for p in ("cuda:group-row", "cuda:token", "triton:token"):
            assert by[p, k].error.startswith("BackendError: backend"), (p, k)
    assert len(calls) == 8
    printed = capsys.readouterr().out
    assert "backends per format" in printed and "auto -> torch" in printed
    assert "formats summary of formats.csv" in printed
    assert "cuda: unsupported at 2 shapes: BackendError" in printed
    assert printed.rstrip().endswith(
        "targets missed: group-row (no cuda times); token (no cuda times)"
    )
