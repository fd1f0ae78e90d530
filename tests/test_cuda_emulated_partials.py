"""The CUDA backend's kernel for stacked and packed partials (csrc/partials.cuh) on a CPU.

As tests/test_cuda_emulated.py does for the two-partial kernel: the kernel is built for the
host (tests/cuda_emulation/emulate.cpp, one OS thread per CUDA thread, warp shuffles
through a barrier per segment of lanes), the backend's kernel loader is pointed at it, and
everything else is the production path (the call the API builds, the configuration, the
packed PartialsParams, the grid). Results are compared with the torch reference through
the tolerance table (the host's expf may round differently from torch's), and bit for bit
where the contract fixes them.
"""

from __future__ import annotations

import cuda_emulator_support
import pytest
import torch
from utils import FP8, INF, NAN, assert_bits_equal, assert_lse_close, assert_output_close

import attnmerge
from attnmerge import api
from attnmerge.cuda import backend as cuda_backend
from attnmerge.reference import merge_packed_reference, merge_states_reference


@pytest.fixture(scope="module")
def emulator_dir(tmp_path_factory):
    return cuda_emulator_support.emulator_dir(tmp_path_factory)


@pytest.fixture
def emulated(emulator_dir, monkeypatch):
    """Route the cuda backend's launches of the stacked/packed kernel to host builds;
    yields the configurations launched, in order."""
    return cuda_emulator_support.emulate(emulator_dir, monkeypatch)


def _lses(shape, gen, special: bool) -> torch.Tensor:
    lse = torch.randn(shape, generator=gen) * 6
    if special:
        pick = torch.rand(shape, generator=gen)
        lse[pick < 0.08] = INF
        lse[(pick >= 0.08) & (pick < 0.16)] = -INF
        lse[(pick >= 0.16) & (pick < 0.19)] = NAN
        lse[(pick >= 0.19) & (pick < 0.22)] += 200  # weights of the others underflow to 0
    return lse


def _run_cuda(outputs, lses, *, indptr=None, quant=None, out_dtype=None, lse_base="e",
              P=None, out=None, out_lse=None):  # fmt: skip
    """The cuda backend's launch path for a stacked or packed call; returns (out, out_lse)."""
    T = indptr.numel() - 1 if indptr is not None else outputs.shape[1]
    H, D = outputs.shape[-2:]
    dtype = quant.dtype if quant is not None else out_dtype or outputs.dtype
    out = torch.full((T, H, D), 7.0).to(dtype) if out is None else out
    out_lse = torch.full((H, T), 3.0) if out_lse is None else out_lse
    scale = quant.scale if isinstance(quant, attnmerge.FP8Static) else None
    call = api._build_partials_call(
        out, out_lse, outputs, lses, indptr, P, scale, lse_base, "cuda", real_tensors=True
    )
    cuda_backend.run(call)
    return out, out_lse


def _check(out, out_lse, ref, mag, scale=None) -> None:
    assert_output_close(out, ref[0], mag, scale)
    assert_lse_close(out_lse, ref[1])


@pytest.mark.parametrize(
    ("K", "D", "dtype", "out_dtype"),
    [
        (1, 128, torch.bfloat16, torch.bfloat16),
        (2, 128, torch.bfloat16, FP8),
        (3, 72, torch.float16, torch.float32),
        (5, 8, torch.float32, torch.bfloat16),  # a row per thread, one weight lane
        (16, 128, torch.bfloat16, torch.bfloat16),  # one set of 16 weight lanes
        (33, 64, torch.float32, torch.float32),  # two sets of weight lanes
        (9, 13, torch.bfloat16, torch.float32),  # scalar accesses
        (4, 576, torch.float32, FP8),  # a team of a whole block, two column chunks
    ],
)
@pytest.mark.parametrize("base", ["e", 2])
def test_stacked_against_reference(emulated, K, D, dtype, out_dtype, base):
    gen = torch.Generator().manual_seed(K * 1000 + D)
    T, H = 3, 5
    outputs = torch.randn(K, T, H, D, generator=gen).to(dtype)
    lses = _lses((K, H, T), gen, special=True)
    scale = torch.tensor([0.07])
    quant = attnmerge.FP8Static(scale) if out_dtype == FP8 else attnmerge.Plain(out_dtype)
    out, out_lse = _run_cuda(outputs, lses, quant=quant, lse_base=base)
    ref = merge_states_reference(outputs, lses, lse_base_2=base == 2)
    mag = merge_states_reference(outputs.float().abs(), lses, lse_base_2=base == 2)[0]
    _check(out, out_lse, ref, mag, scale if out_dtype == FP8 else None)
    assert emulated and emulated[-1].team * emulated[-1].vec >= min(D, 128)


def test_stacked_views_padding_P_and_in_place(emulated):
    """FlashInfer's [T, K, H, D] layout as a view, padded heads, P, and in place into the
    first partial and its LSE: the out-of-place bits."""
    gen = torch.Generator().manual_seed(7)
    T, K, H, D = 6, 7, 3, 40
    v = torch.randn(T, K, H, D + 8, generator=gen)[..., :D]
    s = _lses((T, K, H), gen, special=True)
    outputs, lses = v.transpose(0, 1), s.permute(1, 2, 0)
    out, out_lse = _run_cuda(outputs, lses, P=4)
    ref = merge_states_reference(outputs, lses, prefill_tokens_with_context=4)
    mag = merge_states_reference(outputs.abs(), lses, prefill_tokens_with_context=4)[0]
    _check(out, out_lse, ref, mag)
    in_place_outputs, in_place_lses = outputs.clone(), lses.clone()
    _run_cuda(
        in_place_outputs, in_place_lses, P=4, out=in_place_outputs[0], out_lse=in_place_lses[0]
    )
    assert_bits_equal(in_place_outputs[0], out, "in place")
    assert_bits_equal(in_place_lses[0], out_lse, "in place LSE")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("D", [128, 20])
def test_packed_against_reference(emulated, index_dtype, D):
    """Per-token counts from 0 to 40 (more than one set of weight lanes), one tile of rows
    with different counts, and an indptr whose last range runs past the rows (clamped)."""
    gen = torch.Generator().manual_seed(D)
    counts = [0, 3, 40, 1, 17, 0, 8]
    indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=index_dtype)
    n = int(indptr[-1]) - 5
    H = 4
    outputs = torch.randn(n, H, D, generator=gen).to(torch.bfloat16)
    lses = _lses((n, H), gen, special=True).t()
    out, out_lse = _run_cuda(outputs, lses, indptr=indptr, out_dtype=torch.float32)
    ref = merge_packed_reference(outputs, lses, indptr)
    mag = merge_packed_reference(outputs.float().abs(), lses, indptr)[0]
    _check(out, out_lse, ref, mag)
    assert (out[0] == 0).all() and (out_lse[:, 0] == -INF).all()


def test_two_partials_give_the_two_way_bits(emulated):
    """K = 2 through this kernel (packed, two rows per token) equals the reference's
    two-partial merge bit for bit where the host's exp matches: rows with one weight 0,
    empty rows and NaN rows."""
    gen = torch.Generator().manual_seed(3)
    T, H, D = 8, 2, 16
    pair = torch.randn(2, T, H, D, generator=gen)
    lses = torch.tensor([[0.0, -INF, INF, NAN, 1e4, -INF, 0.0, 5.0]] * H)
    lses = torch.stack([lses, lses.flip(-1)])  # [2, H, T]
    rows = pair.transpose(0, 1).reshape(2 * T, H, D)
    row_lses = lses.permute(1, 2, 0).reshape(H, 2 * T)
    indptr = torch.arange(0, 2 * T + 1, 2)
    out, out_lse = _run_cuda(rows, row_lses, indptr=indptr)
    ref = merge_states_reference(pair, lses)
    assert_bits_equal(out, ref[0], "output")
    assert_bits_equal(out_lse, ref[1], "lse")


def _launch_each_way(emulated, monkeypatch, fmt, outputs, lses, indptr=None, **kw):
    """The call once with the launcher's split (teams a row) and once with one team a row:
    ``[(out, out_lse, scales, amax, split), ...]``."""
    results = []
    for force_one in (False, True):
        if force_one:
            monkeypatch.setattr(cuda_backend, "partials_split", lambda *args: 1)
        T = indptr.numel() - 1 if indptr is not None else outputs.shape[1]
        H, D = outputs.shape[-2:]
        fmt_now = fmt().with_scales(T, H, D, outputs.device)
        out = torch.full((T, H, D), 7.0).to(fmt_now.dtype)
        out_lse = torch.full((H, T), 3.0)
        call = api._build_partials_call(
            out, out_lse, outputs, lses, indptr, None, fmt_now, "e", "cuda", real_tensors=True
        )
        cuda_backend.run(call)
        split = emulated.launches[-1].fields["split"]
        scales = getattr(fmt_now, "scales", None)
        results.append((out, out_lse, scales, getattr(fmt_now, "amax", None), split))
    return results


@pytest.mark.parametrize(
    ("form", "K", "D", "dtype", "fmt"),
    [
        ("stacked", 16, 128, torch.bfloat16, lambda: attnmerge.Plain(torch.bfloat16)),
        ("stacked", 13, 64, torch.float32, lambda: attnmerge.Plain(torch.float32)),
        ("stacked", 9, 13, torch.bfloat16, lambda: attnmerge.Plain(torch.float32)),  # scalar
        ("stacked", 5, 8, torch.float32, lambda: attnmerge.Plain(torch.bfloat16)),  # team of 2
        (
            "stacked",
            12,
            128,
            torch.bfloat16,
            lambda: attnmerge.FP8PerTokenGroup(64, amax=torch.zeros(1)),
        ),
        (
            "stacked",
            8,
            64,
            torch.float16,
            lambda: attnmerge.FP8Static(torch.tensor([0.03]), amax=torch.zeros(1)),
        ),
        ("packed", 40, 128, torch.bfloat16, lambda: attnmerge.Plain(torch.bfloat16)),
        ("packed", 40, 64, torch.bfloat16, lambda: attnmerge.FP8PerTokenGroup(64, ue8m0=True)),
    ],
)
def test_teams_sharing_a_row_give_one_teams_bits(emulated, monkeypatch, form, K, D, dtype, fmt):
    """Rows shared by several teams (the launcher's split on a small grid: the running sum
    handed on through shared memory, in order of k) give the bits of one team a row: the
    output, output LSE, scales and amax, with empty, NaN and underflowing LSEs; packed rows
    with counts from 0 to K (teams of one row with no batch, rounds that some rows skip)."""
    gen = torch.Generator().manual_seed(K * 100 + D)
    H = 3
    if form == "stacked":
        T, indptr = 4, None
        outputs = torch.randn(K, T, H, D, generator=gen).to(dtype)
        lses = _lses((K, H, T), gen, special=True)
    else:
        counts = [0, 3, K, 1, 17, 0, 8]
        indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
        n = int(indptr[-1])
        outputs = torch.randn(n, H, D, generator=gen).to(dtype) * 4
        lses = _lses((n, H), gen, special=True).t()
    (shared, one) = _launch_each_way(emulated, monkeypatch, fmt, outputs, lses, indptr)
    assert shared[4] > 1 and one[4] == 1
    names = ("output", "output LSE", "scales", "amax")
    for name, a, b in zip(names, shared[:4], one[:4], strict=True):
        if a is not None:
            assert_bits_equal(a.view(torch.uint8) if a.dtype == FP8 else a,
                              b.view(torch.uint8) if b.dtype == FP8 else b, name)  # fmt: skip


def test_rows_are_shared_only_on_small_grids():
    """The launcher's split: one team per batch of four partials on a decode-sized grid,
    fewer as the grid grows past SPLIT_MAX_THREADS threads, one on large grids, and never
    more teams than a block holds."""
    split = cuda_backend.partials_split
    assert split(8, 16, 16) == 4  # T = 1, H = 8, K = 16: four batches, four teams
    assert split(8, 16, 3) == 1  # one batch
    assert split(8, 16, 64) == 8  # a block of 128 threads holds 8 teams of 16
    assert split(8, 128, 64) == 1  # a team of a whole block
    assert split(4096, 16, 16) == 2  # 4096 x 16 x 2 threads = SPLIT_MAX_THREADS
    assert split(4096 * 128, 16, 4) == split(4096 * 128, 16, 32) == 1
