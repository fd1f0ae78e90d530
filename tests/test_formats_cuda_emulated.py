"""The cuda backend's per-token-group FP8 store (``FP8GroupStore`` in csrc/epilogues.cuh) on
a CPU, bit for bit against the format's reference quantiser (docs/contract.md C37, C40).

Both kernels (two partials, csrc/merge.cuh; stacked or packed partials, csrc/partials.cuh)
are built for the host (tests/cuda_emulation/emulate.cpp: one OS thread per CUDA thread,
warp shuffles and named barriers emulated) and the backend's kernel loader is pointed at
them; the rest is the production path: the call the API builds, the kernel configuration,
the packed parameters (with the scales' strides), the grid and the row order. A kernel's
float32 result may differ from the torch reference's by the ulps C23 allows, and a group's
scale follows its amax, so each check runs the same call into a float32 output too and
compares the FP8 output and the scales with what ``quantize_with_scales`` makes of that.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from utils import INF, NAN, assert_bits_equal

from attnmerge import FP8PerTokenGroup, Plain, api, dispatch
from attnmerge.call import CallSignature, PartialLayout
from attnmerge.cuda import backend as cuda_backend
from attnmerge.formats import FP8_E4M3_MAX, FP8_GROUP_EPS

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent / "src" / "attnmerge" / "cuda" / "csrc"
LAYOUTS = ("row_major", "col_major", "col_major_tma")
SENTINEL = 12345.0  # in scales the store must not write (TMA padding)


@pytest.fixture(scope="module")
def emulator_dir(tmp_path_factory) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the kernel emulator")
    return tmp_path_factory.mktemp("cuda_emulation_groups")


def _block_size(config) -> int:
    """Bytes of the instance's parameters: its struct, then the scales' strides (padded to
    8 bytes) where its store writes scales."""
    two = isinstance(config, cuda_backend.KernelConfig)
    size = (cuda_backend.PARAMS if two else cuda_backend.PARTIALS_PARAMS).size
    if config.takes_scale_strides:
        size += cuda_backend.SCALE_STRIDES.size
    return -(-size // 8) * 8


class _EmulatedKernel:
    device_index = None  # as the CPU tensors' device index

    def __init__(self, lib: ctypes.CDLL, config, launched: list):
        self._lib, self._config, self._launched = lib, config, launched

    def launch(self, grid: int, stream: int, params: bytes) -> None:
        assert len(params) == _block_size(self._config)
        if isinstance(self._config, cuda_backend.KernelConfig):
            run = self._lib.emulate_merge
        else:
            run = self._lib.emulate_partials
        assert run(ctypes.c_char_p(params), ctypes.c_uint(grid)) == 0
        self._launched.append(self._config)


@pytest.fixture
def emulated(emulator_dir, monkeypatch):
    """Route the cuda backend's launches of both kernels to host builds; yields the
    configurations launched, in order."""
    launched = []

    @functools.cache
    def library(config) -> ctypes.CDLL:
        two = isinstance(config, cuda_backend.KernelConfig)
        macro = "ATTNMERGE_MERGE_INSTANCE" if two else "ATTNMERGE_PARTIALS_INSTANCE"
        template_args = config.template_arguments()
        lib = emulator_dir / f"{hashlib.sha256(template_args.encode()).hexdigest()[:20]}.so"
        if not lib.exists():
            subprocess.run(
                ["g++", "-O1", "-std=c++20", "-pthread", "-shared", "-fPIC",
                 "-ffp-contract=off", f"-I{CSRC}", f"-D{macro}={template_args}",
                 str(HERE / "cuda_emulation" / "emulate.cpp"), "-o", str(lib)],
                check=True,
            )  # fmt: skip
        cdll = ctypes.CDLL(str(lib))
        for entry in ("emulate_merge", "emulate_partials"):
            if hasattr(cdll, entry):
                getattr(cdll, entry).argtypes = [ctypes.c_char_p, ctypes.c_uint]
        return cdll

    monkeypatch.setattr(
        cuda_backend,
        "_kernel",
        lambda index, config: _EmulatedKernel(library(config), config, launched),
    )
    monkeypatch.setattr(cuda_backend, "_current_raw_stream", lambda index: 0)
    monkeypatch.setattr(cuda_backend, "_current_device", lambda: None)
    return launched


def states(form: str, tokens: int, heads: int, head_size: int, seed: int, dtype=torch.bfloat16):
    """(outputs, lses, indptr) of one input form with empty, NaN and infinite entries: two
    partials (the two-partial kernel), K = 3 stacked, or packed rows (0 to 3 a token)."""
    g = torch.Generator().manual_seed(seed)
    k = 2 if form == "pair" else 3
    o = torch.randn(k, tokens, heads, head_size, generator=g) * 4
    lse = torch.randn(k, heads, tokens, generator=g) * 3
    if tokens:
        lse[0, 0, 0] = INF  # an empty partial
        o[1, 0, 0, 5] = NAN  # a NaN in a weighted row: its group's scale is NaN
        lse[:, heads - 1, tokens - 1] = -INF  # an empty row: zeros, the smallest scale
    if tokens > 2:
        lse[1, 0, 1] = NAN  # a NaN LSE: the whole row is NaN
        o[0, 2, 0, head_size - 1] = INF  # an infinite value, weighted: scale +inf
        lse[0, 0, 2] = 50.0
    if form == "pair":
        return [o[0].to(dtype), o[1].to(dtype)], [lse[0], lse[1]], None
    if form == "stacked":
        return o.to(dtype), lse, None
    counts = torch.arange(tokens) % 4  # token 0 has no rows: an empty row
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    n = int(indptr[-1])
    rows = torch.randn(n, heads, head_size, generator=g) * 4
    row_lses = torch.randn(heads, n, generator=g) * 3
    if n > 2:
        rows[1, 0, head_size // 2] = NAN
        row_lses[heads - 1, 2] = INF
    return rows.to(dtype), row_lses, indptr


def run_cuda(outputs, lses, indptr, fmt, *, with_lse=True, P=None, out=None, lse_base="e"):
    """The call the API builds, through the cuda backend's launch path; (out, out_lse)."""
    pair = isinstance(outputs, list)
    if pair:
        tokens, heads, head_size = outputs[0].shape
    else:
        tokens = outputs.shape[1] if indptr is None else indptr.numel() - 1
        heads, head_size = outputs.shape[-2:]
    if out is None:
        out = torch.full((tokens, heads, head_size), 7.0).to(fmt.dtype)
    out_lse = torch.full((heads, tokens), 3.0) if with_lse else None
    if pair:
        call = api._build_call(
            out, outputs[0], lses[0], outputs[1], lses[1], out_lse, P, fmt, lse_base, "cuda",
            real_tensors=True,
        )  # fmt: skip
    else:
        call = api._build_partials_call(
            out, out_lse, outputs, lses, indptr, P, fmt, lse_base, "cuda", real_tensors=True
        )
    cuda_backend.run(call)
    return out, out_lse, call


def group_format(group_size, ue8m0, layout, tokens, heads, head_size) -> FP8PerTokenGroup:
    """The format with new scales, every element of their storage (TMA padding included)
    set to SENTINEL."""
    fmt = FP8PerTokenGroup(group_size, ue8m0=ue8m0, layout=layout)
    fmt = fmt.with_scales(tokens, heads, head_size, "cpu")
    scales = fmt.scales
    storage = scales.as_strided((scales.untyped_storage().nbytes() // 4,), (1,), 0)
    storage.fill_(SENTINEL)
    return fmt


def check_group_store(outputs, lses, indptr, group_size, ue8m0, launched, **kw):
    """Every layout's FP8 output, scales and output LSE against the reference quantiser of
    the same call's float32 result; the launched kernels are the ones dispatch prepares."""
    merged, merged_lse, _ = run_cuda(outputs, lses, indptr, Plain(torch.float32), **kw)
    tokens, heads, head_size = merged.shape
    for layout in LAYOUTS:
        fmt = group_format(group_size, ue8m0, layout, tokens, heads, head_size)
        out, out_lse, call = run_cuda(outputs, lses, indptr, fmt, **kw)
        want_q, want_scales = fmt.quantize_with_scales(merged)
        assert_bits_equal(out, want_q, f"{layout}: output")
        assert_bits_equal(fmt.scales.contiguous(), want_scales, f"{layout}: scales")
        if out_lse is not None:
            assert_bits_equal(out_lse, merged_lse, f"{layout}: output LSE")
        if layout == "col_major_tma" and tokens:  # the padding after each column but the last
            padded, groups = fmt.scales.stride(1), want_scales.shape[1]
            padding = fmt.scales.as_strided((groups - 1, padded - tokens), (padded, 1), tokens)
            assert (padding == SENTINEL).all(), "the TMA padding was written"
        if tokens:
            config = launched[-1]
            assert config in cuda_backend._configs_of(call.signature)  # what prepare builds
            assert config.takes_scale_strides and config.epilogue == "FP8GroupStore"
            ue8m0_arg = "true" if ue8m0 else "false"
            assert f"FP8E4M3, {group_size}, {ue8m0_arg}>" in config.template_arguments()


SHAPES = [(0, 1), (1, 2), (5, 3), (7, 4)]  # (T, H): none and odd tokens, 1 to 4 heads


@pytest.mark.parametrize("form", ["pair", "stacked", "packed"])
@pytest.mark.parametrize(
    "head_size, group_size, ue8m0",
    [(64, 64, False), (64, 64, True), (128, 64, True), (128, 128, False), (128, 128, True),
     (256, 64, False), (256, 128, True)],
)  # fmt: skip
def test_group_store_is_the_reference_quantiser(emulated, form, head_size, group_size, ue8m0):
    """Groups of 64 and 128 within heads of 64 to 256, fp32 and UE8M0 scales in the three
    float32 layouts, T = 0 and odd, H = 1 to 4, empty partials and rows, NaN and infinite
    LSEs and values; two partials (head-major rows where T, H > 1, the output LSE being
    [H, T]), K = 3 stacked, packed rows."""
    for tokens, heads in SHAPES:
        outputs, lses, indptr = states(form, tokens, heads, head_size, tokens * 10 + heads)
        check_group_store(outputs, lses, indptr, group_size, ue8m0, emulated)
    if form == "pair":
        # 16-byte chunks of bf16: 8 to 32 lanes a row, 8 or 16 a group
        assert {c.vec for c in emulated if c.takes_scale_strides} == {8}
    assert emulated, "nothing reached the kernel"


@pytest.mark.parametrize(
    "form, head_size, group_size, ue8m0, with_lse, vec",
    [
        # fp32 into FP8 on a small grid without output LSE: 8-byte chunks, so a group of
        # 128 is 64 lanes (two warps); a team of 128 a row at D = 256
        ("pair", 128, 128, False, False, 2),
        ("pair", 256, 128, True, False, 2),
        # 32 lanes a group of 64 in a team of 128 that loops over the columns (2 passes);
        # 16 lanes at 16-byte chunks, 2 passes, the block's barrier before the output LSE
        ("pair", 320, 64, True, False, 2),
        ("pair", 576, 64, False, True, 4),
        # stacked fp32 at D = 576: 144 chunks, a team of 128 that loops
        ("stacked", 576, 64, True, True, 4),
    ],
)
def test_groups_across_warps_and_column_loops(
    emulated, form, head_size, group_size, ue8m0, with_lse, vec
):
    """Groups whose lanes span warps (their warps' maxima meet in shared memory behind a
    named barrier of the group's warps) and teams of a block that loop over the columns."""
    for tokens, heads in [(3, 2), (1, 3)]:
        outputs, lses, indptr = states(form, tokens, heads, head_size, head_size, torch.float32)
        check_group_store(outputs, lses, indptr, group_size, ue8m0, emulated, with_lse=with_lse)
        assert emulated[-1].vec == vec


@pytest.mark.parametrize(
    "form, head_size, group_size, with_lse",
    [("pair", 64, 64, False), ("pair", 192, 64, True), ("stacked", 128, 128, False),
     ("stacked", 256, 128, True)],
)  # fmt: skip
def test_misaligned_partials_take_scalar_accesses(emulated, form, head_size, group_size, with_lse):
    """Partials one element off 16-byte alignment take scalar accesses (VEC = 1): a group is
    64 or 128 lanes, two or four warps, and teams of a block loop over D = 192, 256."""
    tokens, heads = 3, 2
    outputs, lses, indptr = states(form, tokens, heads, head_size, 5)
    if form == "pair":
        shifted = torch.empty(outputs[1].numel() + 1, dtype=outputs[1].dtype)
        outputs[1] = shifted[1:].view(outputs[1].shape).copy_(outputs[1])
    else:
        shifted = torch.empty(outputs.numel() + 1, dtype=outputs.dtype)
        outputs = shifted[1:].view(outputs.shape).copy_(outputs)
    check_group_store(outputs, lses, indptr, group_size, True, emulated, with_lse=with_lse)
    assert emulated[-1].vec == 1


def test_prefill_tokens_strides_and_given_scales(emulated):
    """Tokens past prefill_tokens_with_context (token-major rows), strided partials and
    output, and TMA-aligned scales the caller passes in a larger buffer."""
    tokens, heads, head_size = 7, 3, 128
    g = torch.Generator().manual_seed(11)
    big = torch.randn(2, tokens, heads + 1, head_size + 64, generator=g).to(torch.bfloat16)
    prefix, suffix = big[0, :, :heads, :head_size], big[1, :, 1:, 64:]
    lses = [torch.randn(heads, tokens, generator=g), torch.randn(tokens, heads, generator=g).t()]
    merged, merged_lse, _ = run_cuda([prefix, suffix], lses, None, Plain(torch.float32), P=4)
    for group_size in (64, 128):
        fmt = group_format(group_size, False, "col_major_tma", tokens, heads, head_size)
        out = torch.zeros(tokens, heads + 2, head_size, dtype=torch.float8_e4m3fn)[:, 1:-1]
        res, res_lse, _ = run_cuda([prefix, suffix], lses, None, fmt, P=4, out=out)
        want_q, want_scales = fmt.quantize_with_scales(merged)
        assert res is out
        assert_bits_equal(out, want_q, "output")
        assert_bits_equal(fmt.scales.contiguous(), want_scales, "scales")
        assert_bits_equal(res_lse, merged_lse, "output LSE")


@pytest.mark.parametrize("form", ["pair", "stacked"])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_special_groups(emulated, form, ue8m0):
    """docs/contract.md C38 in the kernel's store: a NaN in a group gives scale NaN and NaN
    codes; an infinite value scale +inf; an empty row zeros and the smallest scale."""
    tokens, heads, head_size, group_size = 4, 2, 128, 64
    outputs, lses, _ = states(form, tokens, heads, head_size, 3)
    fmt = group_format(group_size, ue8m0, "row_major", tokens, heads, head_size)
    out, _, _ = run_cuda(outputs, lses, None, fmt)
    scales, codes = fmt.scales, out.view(torch.uint8)
    assert scales[0, 0].isnan() and not scales[0, 1:].isnan().any()  # value NaN at column 5
    assert ((codes[0, 0, :64] & 0x7F) == 0x7F).all()
    assert scales[1, :2].isnan().all() and ((codes[1, 0] & 0x7F) == 0x7F).all()  # NaN LSE
    assert not scales[1, 2:].isnan().any()
    assert scales[2, 1] == INF  # the infinite value at head 0's last column
    smallest = torch.tensor(FP8_GROUP_EPS) / torch.tensor(FP8_E4M3_MAX)
    if ue8m0:
        smallest = torch.tensor(2.0**-33)  # 2^ceil(log2(max(1e-10 / 448, 1e-10)))
    assert_bits_equal(scales[3, 2:], smallest.expand(2), "empty row's scales")
    assert (codes[3, 1] == 0).all()


def test_scale_strides_in_the_kernel_row_order():
    """The launcher's scale strides: per token, per head (groups a head times the group
    stride) and per group, swapped with the rows for head-major order, 0 along dimensions
    of one element; past 32 bits a ValueError naming the scales."""
    fmt = FP8PerTokenGroup(64, layout="col_major").with_scales(5, 3, 128, "meta")
    call = SimpleNamespace(output=torch.empty(5, 3, 128, device="meta"), output_format=fmt)
    assert cuda_backend._scale_strides(call) == (1, 10, 5)
    assert cuda_backend._scale_strides(call, head_major=True) == (10, 1, 5)
    fmt = FP8PerTokenGroup(128, layout="row_major").with_scales(1, 1, 128, "meta")
    call = SimpleNamespace(output=torch.empty(1, 1, 128, device="meta"), output_format=fmt)
    assert cuda_backend._scale_strides(call) == (0, 0, 0)
    tokens = 2**31
    fmt = FP8PerTokenGroup(64, layout="col_major").with_scales(tokens, 2, 128, "meta")
    call = SimpleNamespace(output=torch.empty(tokens, 2, 128, device="meta"), output_format=fmt)
    with pytest.raises(ValueError, match=r"scales has strides \(1, 2147483648\)"):
        cuda_backend._scale_strides(call)


_LAYOUT_HARNESS = r"""
#include <cstddef>
#include <cstdio>
#include "partials.cuh"
using namespace attnmerge;
int main() {
  printf("%zu %zu %zu %zu\n", sizeof(WithScaleStrides<MergeParams>),
         offsetof(WithScaleStrides<MergeParams>, strides), sizeof(WithScaleStrides<PartialsParams>),
         offsetof(WithScaleStrides<PartialsParams>, strides));
  return 0;
}
"""


def test_scale_strides_follow_the_parameters(tmp_path):
    """The launcher appends the packed ScaleStrides to MergeParams or PartialsParams and pads
    to 8 bytes: WithScaleStrides' layout as g++ compiles it."""
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    (tmp_path / "layout.cpp").write_text(_LAYOUT_HARNESS)
    exe = tmp_path / "layout"
    source = tmp_path / "layout.cpp"
    subprocess.run(["g++", "-std=c++17", f"-I{CSRC}", str(source), "-o", str(exe)], check=True)
    printed = subprocess.run([str(exe)], capture_output=True, check=True).stdout
    sizes = [int(v) for v in printed.split()]
    for block, (size, offset) in zip(
        (cuda_backend.PARAMS, cuda_backend.PARTIALS_PARAMS), (sizes[:2], sizes[2:]), strict=True
    ):
        packed = cuda_backend._with_scale_strides(
            block.pack(**dict.fromkeys(block.fields, 0)), (1, 2, 3)
        )
        assert (len(packed), block.size) == (size, offset)
        assert packed[offset : offset + 12] == bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0])


def test_dispatch_serves_groups_within_a_head(clean_dispatch, monkeypatch):
    """The format's gaps are the kernels' (FP8PerTokenGroup.kernel_gap): groups within a head
    in the float32 layouts reach the cuda backend; packed UE8M0 scales, groups that span
    heads and amax are refused with their reason."""

    class Serves:
        def unsupported(self, signature):
            return None

    monkeypatch.setitem(dispatch.REGISTRY, "cuda", Serves())

    def reason(fmt, head_size, layout=PartialLayout.SEPARATE):
        dtypes = (torch.bfloat16,) * (2 if layout is PartialLayout.SEPARATE else 1)
        sig = CallSignature(torch.device("cuda"), dtypes, head_size, fmt.key, False, False, layout)
        return dispatch._unsupported("cuda", sig)

    for layout in (PartialLayout.SEPARATE, PartialLayout.STACKED, PartialLayout.PACKED):
        for fmt_layout in LAYOUTS:
            assert reason(FP8PerTokenGroup(128, True, fmt_layout), 256, layout) is None
            assert reason(FP8PerTokenGroup(64, False, fmt_layout), 64, layout) is None
    assert "packed UE8M0" in reason(FP8PerTokenGroup(64, True, "ue8m0_packed"), 128)
    assert "span heads" in reason(FP8PerTokenGroup(128), 64)
    assert "amax" in reason(FP8PerTokenGroup(64, amax=torch.zeros(1)), 128)


@pytest.mark.parametrize(
    "layout, dtype, head_size, group_size, vec",
    [
        (PartialLayout.SEPARATE, torch.bfloat16, 128, 128, 8),  # a group in 16 lanes
        (PartialLayout.SEPARATE, torch.float32, 256, 128, 1),  # four warps a group, a loop
        (PartialLayout.STACKED, torch.float16, 576, 64, 8),
        (PartialLayout.STACKED, torch.float32, 128, 128, 1),
    ],
)
def test_group_kernels_compile_with_nvrtc(monkeypatch, tmp_path, layout, dtype, head_size,
                                          group_size, vec):  # fmt: skip
    """The first-use build (NVRTC, sm_90a) of group-store kernels, which `attnmerge build`
    does not prepare: warp shuffles, and the named barrier of groups wider than a warp."""
    from attnmerge.cuda import nvrtc

    if nvrtc.unavailable_reason() is not None:
        pytest.skip(nvrtc.unavailable_reason())
    monkeypatch.setenv("ATTNMERGE_CACHE_DIR", str(tmp_path))
    two = layout is PartialLayout.SEPARATE
    sig = CallSignature(
        torch.device("cuda"), (dtype,) * (2 if two else 1), head_size,
        FP8PerTokenGroup(group_size, True).key, True, False, layout,
    )  # fmt: skip
    configs = [c for c in cuda_backend._configs_of(sig) if c.vec == vec]
    assert len(configs) == 1 and configs[0].takes_scale_strides
    assert cuda_backend.build_kernel(configs[0], "sm_90a")[:4] == b"\x7fELF"
