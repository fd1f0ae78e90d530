"""The triton backend's per-token FP8, packed UE8M0 scales and amax (docs/contract.md C36 to
C40), under Triton's interpreter on a CPU (and compiled, on a GPU where there is one).

As in tests/test_formats_kernels.py, a kernel's float32 merge result may differ from the
torch reference's by the ulps C23 allows, so each check takes the backend's own float32
result (the same merge into a float32 output) and compares what the kernel stored with the
format's reference store of that result (``store_reference``), bit for bit: the FP8
codes, every byte of the scales' buffer (padding rows, bytes past ``G`` and what lies
around the tensor included) and amax's bits (NaN canonical). Both kernels: two separate
partials (the two-partial kernel, flat and head-major programs) and stacked or packed
partials (the partials kernel). tests/test_ptx.py compiles these variants for sm_90.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from utils import FP8, INF, NAN, ON_GPU, assert_bits_equal

import attnmerge
from attnmerge import FP8PerToken, FP8PerTokenGroup, FP8Static, Plain, api, dispatch
from attnmerge import triton as triton_backend
from attnmerge.call import CallSignature
from attnmerge.formats import amax_reference
from attnmerge.triton import BACKEND as TRITON_BACKEND

pytest.importorskip("triton")

#: where the triton backend runs here: compiled on a GPU, else the interpreter on the CPU
DEVICE = "cuda" if ON_GPU else "cpu"
DEVICES = [DEVICE]
#: poison for the bytes a store must set (or must leave alone)
POISON = 0x5A5A5A5A
#: int32 elements of the caller's buffer before and after the scales' storage
GUARD = 5


def partials(form: str, tokens: int, heads: int, head_size: int, seed: int, device: str):
    """(outputs, lses, merge keywords) of one form, with an empty partial, an empty row, an
    empty token (all its rows), a NaN in a weighted row, +-inf values and a NaN LSE:
    ``pair`` (two partials: the two-partial kernel), ``pair_prefill`` (tokens past
    ``prefill_tokens_with_context``), ``stacked_prefill`` (K = 3, the partials kernel),
    ``packed`` (0 to 3 rows per token)."""
    g = torch.Generator().manual_seed(seed)
    k = 3 if form == "stacked_prefill" else 2
    o = torch.randn(k, tokens, heads, head_size, generator=g) * 4
    lse = torch.randn(k, heads, tokens, generator=g) * 3
    lse[0, 0, 0] = INF  # an empty partial (FlashAttention's +inf)
    lse[:, heads - 1, tokens - 1] = -INF  # an empty row: zeros
    if tokens > 2:
        lse[:, :, 1] = -INF  # an empty token: all its groups zero (UE8M0 byte 0x5E)
        o[1, 2, 0, 5] = NAN  # a NaN in a weighted row: its group NaN (byte 0xFF)
    if tokens > 3:
        o[0, 3, heads - 1, 1] = INF  # +inf: scale +inf (byte 0xFF)
        o[1, 3, 0, 2] = -INF
        lse[:, 0, 3] = 1.0  # both partials weighted
    if tokens > 4:
        lse[1, heads - 1, 4] = NAN  # a NaN LSE: the whole row NaN
    o, lse = o.to(device), lse.to(device)
    if form == "stacked_prefill":
        return o, lse, {"prefill_tokens_with_context": tokens // 2}
    if form in ("pair", "pair_prefill"):
        kw = {"prefill_tokens_with_context": tokens // 2} if form == "pair_prefill" else {}
        return [o[0], o[1]], [lse[0], lse[1]], kw
    counts = torch.arange(tokens) % 4  # 0 to 3 rows per token
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    n = int(indptr[-1])
    rows = (torch.randn(n, heads, head_size, generator=g) * 4).to(device)
    if n > 2:
        rows[2, 0, 7] = NAN
        rows[1, heads - 1, 0] = -INF
    row_lses = (torch.randn(heads, n, generator=g) * 3).to(device)
    return rows, row_lses, {"indptr": indptr.to(device)}


def float32_result(outputs, lses, kw) -> torch.Tensor:
    """The triton backend's own float32 merge result (what its stores see)."""
    res = attnmerge.merge(outputs, lses, out_dtype=torch.float32, backend="triton", **kw)
    return res.output.cpu()


def packed_buffer(fmt: FP8PerTokenGroup, tokens: int, heads: int, head_size: int, device):
    """(buffer, scales): the caller's "ue8m0_packed" scales as a view into a poisoned
    int32 buffer with ``GUARD`` elements on either side of vLLM's storage and the last
    column's padding rows after it (a store must leave them all alone)."""
    shape, strides, dtype = fmt.scales_layout(tokens, fmt.groups(heads, head_size))
    padded = strides[1]
    buffer = torch.full((GUARD + shape[1] * padded + GUARD,), POISON, dtype=dtype, device=device)
    return buffer, buffer.as_strided(shape, strides, GUARD)


def reference_store(fmt, merged: torch.Tensor, buffer: torch.Tensor | None, scales_at=None):
    """(FP8 output, buffer, amax) as the torch reference stores ``merged`` in ``fmt``
    (``buffer``: a copy of the caller's poisoned buffer, the scales at ``scales_at``)."""
    replace = {}
    if buffer is not None:
        buffer = buffer.cpu().clone()
        replace["scales"] = buffer.as_strided(scales_at.shape, scales_at.stride(), GUARD)
    if getattr(fmt, "amax", None) is not None:
        replace["amax"] = torch.full_like(fmt.amax, 3.0e38, device="cpu")
    ref = dataclasses.replace(fmt, **replace)
    out = torch.empty(merged.shape, dtype=fmt.dtype)
    ref.store_reference(merged, out)
    return out, buffer, replace.get("amax")


def int_bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().reshape(-1).view(torch.int32)


@pytest.mark.parametrize(
    "quant",
    [
        FP8PerTokenGroup(64, True, "ue8m0_packed"),
        FP8PerTokenGroup(64, amax=torch.zeros(1)),
        FP8PerToken(),
        FP8PerToken(scale_ub=torch.ones(1), amax=torch.zeros(1)),
        Plain(torch.bfloat16, torch.zeros(1)),
        FP8Static(torch.ones(1), amax=torch.zeros(1)),
    ],
)
def test_dispatch_offers_the_triton_backend(clean_dispatch, quant):
    """docs/contract.md C40: no format gap keeps the triton backend from per-token FP8,
    packed UE8M0 scales or amax (the backend then answers for its device)."""
    sig = CallSignature(torch.device(DEVICE), (torch.float32,) * 2, 64, quant.key, False, False)
    assert dispatch._unsupported("triton", sig) is None


# ---------------------------------------------------------------------------
# Packed UE8M0 scales (docs/contract.md C37: "ue8m0_packed").


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["pair", "pair_prefill", "stacked_prefill", "packed"])
@pytest.mark.parametrize(
    "tokens, heads, head_size, group_size",
    [
        (5, 3, 128, 128),  # G = 3: one column, its last byte past G
        (5, 5, 64, 64),  # G = 5: two columns, three padding rows, bytes 1 to 3 past G
        (6, 3, 192, 64),  # G = 9: three columns, a non-power-of-two head size
        (3, 2, 320, 64),  # G = 10: 5 groups in a tile of 8
        (4, 4, 128, 64),  # G = 8: T a multiple of 4, no padding rows, no bytes past G
        (7, 2, 128, 64),  # G = 4: one full column
        (1, 6, 64, 64),  # T = 1: three padding rows per column, G = 6
    ],
)
def test_packed_ue8m0_scales_are_the_reference_store(
    device, form, tokens, heads, head_size, group_size
):
    """Every byte of a poisoned buffer holding caller's packed scales: the exponents, 0xFF
    for NaN and +inf scales, 0 past G and in the padding rows of every column but the last,
    and nothing touched outside vLLM's storage; the FP8 codes; and scales merge() allocates."""
    seed = tokens * 100 + heads * 10 + head_size
    outputs, lses, kw = partials(form, tokens, heads, head_size, seed, device)
    merged = float32_result(outputs, lses, kw)
    fmt = FP8PerTokenGroup(group_size, ue8m0=True, layout="ue8m0_packed")
    buffer, scales = packed_buffer(fmt, tokens, heads, head_size, device)
    given = dataclasses.replace(fmt, scales=scales)
    res = attnmerge.merge(outputs, lses, quant=given, backend="triton", **kw)
    want_q, want_buffer, _ = reference_store(given, merged, buffer, scales)
    assert res.scales is scales
    assert_bits_equal(res.output.cpu(), want_q, "output")
    assert torch.equal(buffer.cpu(), want_buffer), [hex(x & 0xFFFFFFFF) for x in buffer.tolist()]
    assert int(buffer[0]) == POISON and int(buffer[-1]) == POISON

    allocated = attnmerge.merge(outputs, lses, quant=fmt, backend="triton", **kw)
    assert allocated.scales.stride() == scales.stride()
    assert torch.equal(allocated.scales.cpu(), scales.cpu())
    assert_bits_equal(allocated.output.cpu(), want_q, "output (allocated scales)")


@pytest.mark.parametrize("device", DEVICES)
def test_packed_scales_bytes_by_hand(device):
    """Known bytes: an all-zero group 0x5E (2**-33), a group of amax 448 0x7F (scale 1),
    NaN and +inf groups 0xFF, and 0 past G; G = 5, T = 2 (two padding rows)."""
    tokens, heads, head_size = 2, 5, 64
    x = torch.zeros(tokens, heads, head_size)
    x[0, 1, 3] = -448.0  # amax 448: s = 1, byte 127
    x[0, 2, 0] = NAN
    x[0, 3, 9] = INF
    x[1, 4, 1] = 449.0  # s = 449 / 448, rounded up to 2: byte 128
    lse = torch.zeros(heads, tokens)  # one partial of weight 1 (twice: the pair kernel)
    empty = torch.full((heads, tokens), -INF)
    outputs, lses = [x.to(device), x.to(device)], [lse.to(device), empty.to(device)]
    fmt = FP8PerTokenGroup(64, ue8m0=True, layout="ue8m0_packed")
    res = attnmerge.merge(outputs, lses, quant=fmt, backend="triton")
    words = [w & 0xFFFFFFFF for w in res.scales.cpu().t().flatten().tolist()]
    assert words == [0xFFFF7F5E, 0x5E5E5E5E, 0x5E, 0x80], [hex(w) for w in words]
    storage = res.scales.as_strided((4 + tokens,), (1,)).cpu().tolist()
    assert storage[tokens:4] == [0, 0]  # column 0's padding rows


@pytest.mark.parametrize("device", DEVICES)
def test_packed_scales_through_output_block_scale(device):
    """vLLM's form (pull request #40930): an int32 output_block_scale with use_ue8m0=True,
    tokens past prefill_tokens_with_context, the caller's poisoned buffer."""
    tokens, heads, head_size = 7, 5, 64
    outputs, lses, _ = partials("pair", tokens, heads, head_size, 3, device)
    kw = {"prefill_tokens_with_context": 5}
    merged = float32_result(outputs, lses, kw)
    fmt = FP8PerTokenGroup(64, ue8m0=True, layout="ue8m0_packed")
    buffer, scales = packed_buffer(fmt, tokens, heads, head_size, device)
    out = torch.empty(tokens, heads, head_size, dtype=FP8, device=device)
    attnmerge.merge_attn_states(
        out, outputs[0], lses[0], outputs[1], lses[1], None, 5, None, scales, 64,
        use_ue8m0=True, backend="triton",
    )  # fmt: skip
    want_q, want_buffer, _ = reference_store(fmt, merged, buffer, scales)
    assert_bits_equal(out.cpu(), want_q, "output")
    assert torch.equal(buffer.cpu(), want_buffer)


# ---------------------------------------------------------------------------
# Per-token FP8 (docs/contract.md C36, C38): token tiles, every head of a token in one
# program (one or more chunks of heads).


def token_scales_buffer(tokens: int, shape: str, device):
    """(buffer, scales): the caller's float32 scales as a strided view into a poisoned
    buffer, ``"t"``: ``[T]`` with stride 3; ``"t1"``: ``[T, 1]`` with strides (2, 7)."""
    buffer = torch.full((GUARD + 3 * tokens + GUARD,), POISON, dtype=torch.int32, device=device)
    floats = buffer.view(torch.float32)
    if shape == "t":
        return buffer, floats.as_strided((tokens,), (3,), GUARD)
    return buffer, floats.as_strided((tokens, 1), (2, 7), GUARD)


def token_bound(merged: torch.Tensor) -> torch.Tensor:
    """A scale_ub between the tokens' absmaxes (the median of the finite non-zero ones):
    some tokens are bounded by it, others not."""
    a = merged.flatten(1).abs().amax(dim=1) if merged.numel() else merged.new_zeros(0)
    finite = a[a.isfinite() & (a > 0)]
    return torch.tensor([float(finite.median()) if len(finite) else 1.0])


def check_token_store(outputs, lses, kw, tokens: int, device) -> None:
    """FP8PerToken stored by the triton backend is the reference quantiser of its own
    float32 result, bit for bit: without scale_ub into allocated [T, 1] scales with the
    output LSE; with scale_ub (some tokens above it, some below) into the caller's strided
    [T] scales with amax; into the caller's strided [T, 1] scales with amax. Elements of
    the caller's buffer around the scales stay as they were."""
    ref32 = attnmerge.merge(
        outputs, lses, out_dtype=torch.float32, backend="triton", return_lse=True, **kw
    )
    merged = ref32.output.cpu()
    bound = token_bound(merged)

    fmt = FP8PerToken()
    res = attnmerge.merge(outputs, lses, quant=fmt, backend="triton", return_lse=True, **kw)
    want_q, want_s = fmt.quantize_with_scales(merged)
    assert res.scales.shape == (tokens, 1)
    assert_bits_equal(res.output.cpu(), want_q, "output")
    assert_bits_equal(res.scales.cpu().reshape(-1), want_s, "scales")
    assert_bits_equal(res.lse.cpu(), ref32.lse.cpu(), "output LSE")

    for shape, scale_ub in (("t", bound), ("t1", None)):
        buffer, scales = token_scales_buffer(tokens, shape, device)
        amax = torch.full((1,), 3.0e38, device=device)
        ub = None if scale_ub is None else scale_ub.to(device)
        fmt = FP8PerToken(scale_ub=ub, scales=scales, amax=amax)
        res = attnmerge.merge(outputs, lses, quant=fmt, backend="triton", **kw)
        want_q, want_s = dataclasses.replace(fmt, scale_ub=scale_ub).quantize_with_scales(merged)
        assert res.scales is scales
        assert_bits_equal(res.output.cpu(), want_q, f"{shape}: output")
        assert_bits_equal(scales.cpu().reshape(-1), want_s, f"{shape}: scales")
        assert torch.equal(int_bits(amax), int_bits(amax_reference(merged)))
        written = torch.zeros(buffer.shape, dtype=torch.bool)
        written[scales.storage_offset() + torch.arange(tokens) * scales.stride(0)] = True
        assert (buffer.cpu()[~written] == POISON).all(), f"{shape}: written outside the scales"


def token_partials(form: str, tokens: int, heads: int, head_size: int, seed: int, device):
    """:func:`partials`, and for T = 0 empty tensors of the form."""
    if tokens:
        return partials(form, tokens, heads, head_size, seed, device)
    k = 3 if form == "stacked_prefill" else 2
    o = torch.randn(k, 0, heads, head_size, device=device)
    lse = torch.randn(k, heads, 0, device=device)
    if form == "stacked_prefill":
        return o, lse, {"prefill_tokens_with_context": 0}
    if form == "packed":
        return o[0], lse[0], {"indptr": torch.zeros(1, dtype=torch.int64, device=device)}
    kw = {"prefill_tokens_with_context": 0} if form == "pair_prefill" else {}
    return [o[0], o[1]], [lse[0], lse[1]], kw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [0, 1, 5, 33])
@pytest.mark.parametrize("head_size", [64, 128, 192])
@pytest.mark.parametrize("heads", [1, 3, 8, 32])
def test_per_token_pair_is_the_reference(device, heads, head_size, tokens):
    """Two partials (the two-partial kernel): NaN, +-inf and empty tokens and rows (all
    partials -inf or +inf), every shape of the grid."""
    seed = tokens * 1000 + heads * 10 + head_size
    outputs, lses, kw = token_partials("pair", tokens, heads, head_size, seed, device)
    check_token_store(outputs, lses, kw, tokens, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["pair_prefill", "stacked_prefill", "packed"])
@pytest.mark.parametrize(
    "heads, head_size, tokens",
    [(1, 64, 5), (3, 192, 5), (8, 128, 33), (32, 64, 5), (32, 192, 1), (3, 128, 0)],
)
def test_per_token_forms_are_the_reference(device, form, heads, head_size, tokens):
    """Tokens past prefill_tokens_with_context (the two-partial kernel), K = 3 stacked
    partials with them and packed rows (0 to 3 per token; the partials kernel)."""
    seed = tokens * 1000 + heads * 10 + head_size + 1
    outputs, lses, kw = token_partials(form, tokens, heads, head_size, seed, device)
    check_token_store(outputs, lses, kw, tokens, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["pair", "pair_prefill", "stacked_prefill", "packed"])
@pytest.mark.parametrize("heads, head_size", [(8, 64), (3, 192), (3, 128)])
def test_per_token_in_chunks_is_the_reference(device, monkeypatch, form, heads, head_size):
    """Tokens wider than a tile (here tiles of 256 elements: 2 or 3 chunks of heads) take
    two passes, the token's absmax first; the same bits as in one tile."""
    monkeypatch.setattr(triton_backend.load(), "TOKEN_TILE_ELEMENTS", 256)
    tokens = 6
    outputs, lses, kw = token_partials(form, tokens, heads, head_size, heads + head_size, device)
    assert triton_backend.load().token_tiles(heads, head_size)[1] > 1
    check_token_store(outputs, lses, kw, tokens, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["pair", "stacked_prefill"])
def test_per_token_wide_tokens(device, form):
    """128 heads of 256 (32768 values a token): the launcher's own two chunks."""
    assert triton_backend.load().token_tiles(128, 256)[1] == 2
    outputs, lses, kw = token_partials(form, 2, 128, 256, 11, device)
    check_token_store(outputs, lses, kw, 2, device)


@pytest.mark.parametrize("device", DEVICES)
def test_per_token_values_by_hand(device):
    """Known scales: amax 448 gives 1; an empty token the smallest scale and zeros; +inf
    without scale_ub the scale +inf (its infinities NaN codes, its finite values 0), with
    scale_ub 1 the scale 1/448 (infinities saturated to +-448); NaN the scale NaN; a NaN
    scale_ub makes every scale NaN."""
    tokens, heads, head_size = 4, 3, 64
    x = torch.zeros(tokens, heads, head_size)
    x[0, 1, 3] = -448.0
    x[0, 2, 5] = 1.0
    x[2, 0, 0] = INF
    x[2, 1, 1] = -INF
    x[2, 2, 2] = 3.0
    x[3, 1, 7] = NAN
    lse = torch.zeros(heads, tokens)  # one partial of weight 1
    empty = torch.full((heads, tokens), -INF)
    empty_first = lse.clone()
    empty_first[:, 1] = INF  # token 1: both partials empty (+inf and -inf)
    outputs = [x.to(device), x.to(device)]
    lses = [empty_first.to(device), empty.to(device)]
    res = attnmerge.merge(outputs, lses, quant=FP8PerToken(), backend="triton")
    scales = res.scales.cpu().reshape(-1)
    min_scale = attnmerge.formats.FP8_MIN_TOKEN_SCALE
    assert scales[:3].tolist() == [1.0, min_scale, INF] and scales[3].isnan()
    codes = res.output.cpu().view(torch.uint8).to(torch.int32)
    assert codes[0, 1, 3] == 0xFE and codes[0, 2, 5] == 0x38  # -448 and 1
    assert (codes[1] == 0).all()
    assert ((codes[2] & 0x7F) == 0x7F).sum() == 2  # the two infinities: NaN
    assert ((codes[2] == 0) | ((codes[2] & 0x7F) == 0x7F)).all()  # the rest: 3 / inf = 0
    assert ((codes[3] & 0x7F) == 0x7F).all()  # NaN everywhere in the NaN token
    one = torch.tensor([1.0], device=device)
    res = attnmerge.merge(outputs, lses, quant=FP8PerToken(scale_ub=one), backend="triton")
    assert res.scales.cpu().reshape(-1)[2].item() == float(torch.tensor(1.0) / 448.0)
    codes = res.output.cpu().view(torch.uint8).to(torch.int32)
    assert codes[2, 0, 0] == 0x7E and codes[2, 1, 1] == 0xFE  # +-448
    nan_ub = torch.tensor([NAN], device=device)
    res = attnmerge.merge(outputs, lses, quant=FP8PerToken(scale_ub=nan_ub), backend="triton")
    assert res.scales.cpu().isnan().all()


# ---------------------------------------------------------------------------
# amax (docs/contract.md C39).

AMAX_FORMATS = {
    "plain_f32": lambda amax: Plain(torch.float32, amax),
    "plain_bf16": lambda amax: Plain(torch.bfloat16, amax),
    "fp8_static": lambda amax: FP8Static(torch.tensor([0.25], device=amax.device), amax=amax),
    "group_row": lambda amax: FP8PerTokenGroup(64, amax=amax),
    "group_packed": lambda amax: FP8PerTokenGroup(64, True, "ue8m0_packed", amax=amax),
    "token": lambda amax: FP8PerToken(amax=amax),
    "token_ub": lambda amax: FP8PerToken(torch.tensor([2.0], device=amax.device), amax=amax),
}


def amax_case(case: str, outputs, lses, kw):
    """The partials of ``case``: ``random`` (with NaN and inf, as :func:`partials`),
    ``finite`` (no NaN or inf anywhere), ``inf`` (+-inf values, no NaN), ``nan`` (a NaN
    of another payload and sign: amax is 0x7FC00000 still), ``empty`` (every row empty)."""
    if case == "random":
        return outputs, lses
    as_list = isinstance(outputs, list)
    o = torch.stack(outputs) if as_list else outputs.clone()
    lse = torch.stack(lses) if as_list else lses.clone()
    o = torch.where(o.isfinite(), o, 1.0)
    lse = torch.where(lse.isnan() | (lse == INF), 0.0, lse)
    # (partial or packed row, token) of two values: packed rows have no token index
    first, last = ((1,), (-1,)) if "indptr" in kw else ((-1, 0), (-1, -1))
    nan = torch.tensor(0xFFC00123 - (1 << 32), dtype=torch.int32).view(torch.float32)
    if case in ("inf", "nan"):
        o[(*first, 0, 1)] = -INF if case == "inf" else nan
        o[(*last, 0, 2)] = INF if case == "inf" else 5.0
        # weighted by about 1: no NaN from 0 * inf, no inf - inf
        lse[(first[0], 0, *first[1:])] = lse[(last[0], 0, *last[1:])] = 30.0
    elif case == "empty":
        lse.fill_(-INF)
    return (list(o), list(lse)) if as_list else (o, lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", list(AMAX_FORMATS))
@pytest.mark.parametrize("form", ["pair", "pair_lse", "pair_prefill", "stacked_prefill", "packed"])
@pytest.mark.parametrize("case", ["random", "finite", "inf", "nan", "empty"])
def test_amax_is_the_reference(device, fmt, form, case):
    """amax's bits are amax_reference of the kernel's own float32 result (NaN 0x7FC00000,
    whatever the NaN's payload); it overwrites what the tensor held (3e38, above every
    value here); the output and scales are the bits the format stores without amax.
    ``pair_lse`` writes the output LSE [H, T]: the two-partial kernel's head-major
    programs."""
    tokens, heads, head_size = 6, 2, 64
    base = "pair" if form == "pair_lse" else form
    outputs, lses, kw = partials(base, tokens, heads, head_size, 7, device)
    outputs, lses = amax_case(case, outputs, lses, kw)
    kw = {**kw, "return_lse": form == "pair_lse"}
    merged = float32_result(outputs, lses, kw)
    amax = torch.full((1,), 3.0e38, device=device)
    quant = AMAX_FORMATS[fmt](amax)
    res = attnmerge.merge(outputs, lses, quant=quant, backend="triton", **kw)
    assert torch.equal(int_bits(amax), int_bits(amax_reference(merged)))
    if case == "nan":
        assert int_bits(amax).tolist() == [0x7FC00000]
    if case == "empty" and form != "pair_prefill":  # (there: the second partial, copied)
        assert int_bits(amax).tolist() == [0]
    without = attnmerge.merge(
        outputs, lses, quant=dataclasses.replace(quant, amax=None), backend="triton", **kw
    )
    assert_bits_equal(res.output.cpu(), without.output.cpu(), "output")
    if res.scales is not None:
        assert torch.equal(int_bits(res.scales.contiguous()), int_bits(without.scales.contiguous()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["pair_prefill", "stacked_prefill"])
def test_amax_includes_tokens_past_prefill(device, form):
    """Tokens past prefill_tokens_with_context (a copy of the last partial) count: the
    largest value is there."""
    tokens, heads, head_size = 5, 2, 64
    outputs, lses, kw = partials(form, tokens, heads, head_size, 1, device)
    outputs, lses = amax_case("finite", outputs, lses, kw)
    outputs[-1][tokens - 1, 0, 3] = -1.0e30
    for k in range(len(lses)):  # the last partial alone: weight 1, the value exactly
        lses[k][0, tokens - 1] = 0.0 if k == len(lses) - 1 else -INF
    amax = torch.zeros((), device=device)
    attnmerge.merge(outputs, lses, quant=Plain(torch.float16, amax), backend="triton", **kw)
    assert amax.item() == float(torch.tensor(1.0e30))  # float16 would round it to inf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["pair", "stacked", "packed"])
def test_amax_of_no_tokens_is_zero(device, form):
    """T = 0 launches nothing, and amax is 0 (the launch path zeroes it first)."""
    heads, head_size = 2, 64
    o = torch.randn(3, 0, heads, head_size, device=device)
    lse = torch.randn(3, heads, 0, device=device)
    kw: dict = {}
    if form == "pair":
        outputs, lses = [o[0], o[1]], [lse[0], lse[1]]
    elif form == "stacked":
        outputs, lses = o, lse
    else:
        outputs, lses = o[0], lse[0]
        kw["indptr"] = torch.zeros(1, dtype=torch.int64, device=device)
    for quant in (Plain(torch.float32), FP8PerTokenGroup(64, True, "ue8m0_packed"), FP8PerToken()):
        amax = torch.full((1,), NAN, device=device)
        quant = dataclasses.replace(quant, amax=amax)
        attnmerge.merge(outputs, lses, quant=quant, backend="triton", **kw)
        assert int_bits(amax).tolist() == [0]


# ---------------------------------------------------------------------------
# The eager launcher never holds a plan for an amax call: a plan launches without the
# launch path's zeroing.


def _pair_call(quant, tokens: int = 4):
    heads, head_size = 2, 64
    o = torch.randn(2, tokens, heads, head_size, device=DEVICE)
    lse = torch.randn(2, heads, tokens, device=DEVICE)
    out = torch.empty(tokens, heads, head_size, dtype=quant.dtype, device=DEVICE)
    args = (out, o[0], lse[0], o[1], lse[1], None, None, quant)
    return args, api._build_call(*args, "e", "triton", real_tensors=True)


@pytest.fixture
def direct_runner(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """A stand-in for the compiled kernel's runner (none exists under the interpreter), so
    that the triton backend plans as it does on a GPU; records its calls."""
    merge_kernel = triton_backend.load()
    calls: list[tuple] = []
    monkeypatch.setattr(
        merge_kernel, "direct_runner", lambda launch: lambda *a, **kw: calls.append((a, kw))
    )
    return calls


@pytest.mark.parametrize("tokens", [4, 0])
def test_amax_calls_have_no_eager_plan(direct_runner, tokens):
    """The triton backend's eager plan is None for a format with amax (T = 0 too, whose
    plan would launch nothing and skip the zeroing), and a plan without amax."""
    for quant in (Plain(torch.float32), FP8Static(torch.tensor([0.5], device=DEVICE))):
        _, call = _pair_call(quant, tokens)
        assert isinstance(TRITON_BACKEND.eager_plan(b"key", call), tuple)
        _, call = _pair_call(dataclasses.replace(quant, amax=torch.zeros(1, device=DEVICE)), tokens)
        assert TRITON_BACKEND.eager_plan(b"key", call) is None


class _MissingLauncher:
    """A stand-in for the compiled eager launcher that reports every call as a miss (the
    real one answers False for a format object in output_scale's place: no plan either)."""

    @staticmethod
    def merge_pair(plans, code, *args):
        return (1234, b"key")


def test_amax_calls_are_not_planned_by_the_api(direct_runner, monkeypatch):
    """Through the two-partial path merge() and merge_attn_states share, with a launcher
    that reports a miss: a call with amax stores no plan, and each repeat zeroes and
    reduces amax again; the same call without amax is planned."""
    amax = torch.zeros(1, device=DEVICE)
    args, _ = _pair_call(Plain(torch.float32, amax))
    want = amax_reference(float32_result([args[1], args[3]], [args[2], args[4]], {}))
    launcher = api.EAGER_LAUNCHER
    monkeypatch.setattr(launcher, "module", _MissingLauncher())
    monkeypatch.setattr(launcher, "plans", {})

    def call(args: tuple) -> None:
        miss = launcher.module.merge_pair(launcher.plans, 0, *args)
        api._merge_pair(args, "e", "triton", eager_miss=miss)

    for _ in range(2):
        amax.fill_(3.0e38)
        call(args)
        assert launcher.plans == {}
        assert torch.equal(int_bits(amax), int_bits(want))
    call((*args[:7], Plain(torch.float32)))
    assert list(launcher.plans) == [1234]


# ---------------------------------------------------------------------------
# Groups of whole heads (docs/contract.md C37: FP8PerTokenGroup where the group size is a
# multiple of a power-of-two head size): token tiles, whose heads the epilogue reshapes
# into groups.


def poisoned_scales(fmt: FP8PerTokenGroup, tokens: int, heads: int, head_size: int, device):
    """(buffer, scales): the caller's scales in any layout as a view into a poisoned buffer
    with ``GUARD`` elements on either side of their extent (TMA padding rows inside it)."""
    shape, strides, dtype = fmt.scales_layout(tokens, fmt.groups(heads, head_size))
    extent = 1 + sum((n - 1) * st for n, st in zip(shape, strides, strict=True))
    buffer = torch.full((GUARD + extent + GUARD,), POISON, dtype=torch.int32, device=device)
    buffer = buffer.view(dtype)
    return buffer, buffer.as_strided(shape, strides, GUARD)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["pair", "pair_prefill", "stacked_prefill", "packed"])
@pytest.mark.parametrize(
    "heads, head_size, group_size, tile_elements, layout",
    [
        (8, 64, 128, None, "row_major"),  # groups of 128 over heads of 64
        (8, 64, 128, None, "ue8m0_packed"),
        (6, 64, 128, None, "col_major_tma"),  # a tile of 8 heads: a group of padding heads
        (4, 32, 128, None, "ue8m0_packed"),  # four heads a group
        (4, 16, 64, None, "col_major"),  # one group a token
        (8, 64, 128, 256, "ue8m0_packed"),  # two passes: tiles of 4 heads, two groups each
    ],
)
def test_groups_of_whole_heads_are_the_reference_store(
    device, monkeypatch, form, heads, head_size, group_size, tile_elements, layout
):
    """The FP8 codes, every element of a poisoned buffer around the caller's scales (NaN
    and +inf groups, empty tokens, TMA and packed padding) and amax, bit for bit what the
    reference store makes of the backend's own float32 result; scales merge() allocates
    equal them."""
    if tile_elements is not None:
        monkeypatch.setattr(triton_backend.load(), "TOKEN_TILE_ELEMENTS", tile_elements)
        assert triton_backend.load().token_tiles(heads, head_size)[1] > 1
    tokens = 6
    seed = heads * 100 + head_size + group_size
    outputs, lses, kw = partials(form, tokens, heads, head_size, seed, device)
    merged = float32_result(outputs, lses, kw)
    ue8m0 = layout == "ue8m0_packed" or head_size == 32
    fmt = FP8PerTokenGroup(group_size, ue8m0=ue8m0, layout=layout)
    check_group_store(fmt, outputs, lses, kw, merged, device)


def check_group_store(fmt, outputs, lses, kw, merged, device):
    """The triton backend's store of ``fmt`` (given scales in a poisoned buffer, and amax)
    against the reference store of ``merged``, its own float32 result: the FP8 codes, every
    element of the buffer, amax's bits; then scales merge() allocates. The call's result."""
    tokens, heads, head_size = merged.shape
    buffer, scales = poisoned_scales(fmt, tokens, heads, head_size, device)
    amax = torch.full((1,), 3.0e38, device=device)
    given = dataclasses.replace(fmt, scales=scales, amax=amax)
    res = attnmerge.merge(outputs, lses, quant=given, backend="triton", return_lse=True, **kw)
    want_q, want_buffer, _ = reference_store(given, merged, buffer, scales)
    assert res.scales is scales
    assert_bits_equal(res.output.cpu(), want_q, "output")
    assert_bits_equal(buffer.cpu(), want_buffer, "scales' buffer")
    assert int_bits(buffer[:GUARD]).eq(POISON).all() and int_bits(buffer[-GUARD:]).eq(POISON).all()
    assert torch.equal(int_bits(amax), int_bits(amax_reference(merged)))

    allocated = attnmerge.merge(outputs, lses, quant=fmt, backend="triton", **kw)
    assert_bits_equal(allocated.output.cpu(), want_q, "output (allocated scales)")
    assert_bits_equal(allocated.scales.cpu(), scales.cpu(), "allocated scales")
    return res


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["pair", "pair_prefill", "stacked_prefill", "packed"])
@pytest.mark.parametrize(
    "tokens, heads, head_size, group_size, layout",
    [
        (6, 2, 96, 64, "ue8m0_packed"),  # rows of 32: a group over two heads, mid-head
        (6, 2, 96, 64, "row_major"),  # (three programs of two tokens each)
        (3, 8, 40, 64, "col_major_tma"),  # rows of 8, a group over two or three heads
        (5, 4, 96, 128, "ue8m0_packed"),  # G = 3: bytes past G, padding rows
        (4, 2, 192, 128, "col_major"),  # rows of 64
        (2, 16, 100, 64, "row_major"),  # rows of 4: a unit (1600 values) past a row tile
    ],
)
def test_groups_spanning_heads_unevenly_are_the_reference_store(
    device, form, tokens, heads, head_size, group_size, layout
):
    """Groups that span heads without being whole heads, in rows of part of a head: the
    FP8 codes, every element of a poisoned buffer around the caller's scales, amax and the
    output LSE (one store per head), bit for bit what the reference store makes of the
    backend's own float32 result; scales merge() allocates equal them."""
    seed = heads * 100 + head_size + group_size
    outputs, lses, kw = partials(form, tokens, heads, head_size, seed, device)
    res32 = attnmerge.merge(
        outputs, lses, out_dtype=torch.float32, backend="triton", return_lse=True, **kw
    )
    fmt = FP8PerTokenGroup(group_size, ue8m0=layout == "ue8m0_packed", layout=layout)
    res = check_group_store(fmt, outputs, lses, kw, res32.output.cpu(), device)
    assert_bits_equal(res.lse.cpu(), res32.lse.cpu(), "output LSE")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["pair", "stacked"])
def test_uneven_groups_in_place_and_strided(device, form):
    """Rows of part of a head read strided partials (a head and token stride of their own)
    and store a strided FP8 output and the output LSE into an input LSE (in place: a head's
    rows all lie in one program, which loads its LSEs before any is stored)."""
    tokens, heads, head_size = 7, 4, 96
    g = torch.Generator().manual_seed(7)
    big = torch.randn(2, tokens, heads + 1, head_size + 32, generator=g).to(device)
    outs = big[:, :, 1:, 32:]  # strides (.., (heads + 1) * 128, 128, 1)
    lses = (torch.randn(2, tokens, heads, generator=g) * 3).to(device).transpose(1, 2)
    lses[0, 1, 2] = INF
    if form == "pair":
        outs, lses = list(outs), list(lses)
    res32 = attnmerge.merge(outs, lses, out_dtype=torch.float32, backend="triton", return_lse=True)
    fmt = FP8PerTokenGroup(64, ue8m0=True, layout="col_major_tma")
    want_q, want_scales = fmt.quantize_with_scales(res32.output.cpu())
    out = torch.zeros(tokens, heads + 2, head_size, dtype=FP8, device=device)[:, 2:]
    in_place = lses[0]
    res = attnmerge.merge(outs, lses, quant=fmt, out=out, out_lse=in_place, backend="triton")
    assert res.output is out and res.lse is in_place
    assert_bits_equal(out.cpu(), want_q, "output")
    assert_bits_equal(res.scales.cpu(), want_scales, "scales")
    assert_bits_equal(in_place.cpu(), res32.lse.cpu(), "output LSE in place")


def test_segment_tiles_take_whole_units():
    """A program's rows are whole units of lcm(D, G) values, at least one, in a tile of a
    power of two rows; a unit past a row tile's values takes token tiles' warps; the row
    count stops short of int32's end by a tile."""
    mk = triton_backend.load()
    fmt = FP8PerTokenGroup(64)
    assert (fmt.segment_size(96), fmt.segment_size(40), fmt.segment_size(128)) == (32, 8, 0)
    assert FP8PerTokenGroup(128).segment_size(64) == 0  # whole heads: token tiles
    tiles = mk.segment_tiles(96, 64, 32, tile_values=512)  # a unit: 6 rows (2 heads)
    assert (tiles.block_rows, tiles.program_rows, tiles.options) == (16, 12, mk.ROW_OPTIONS)
    tiles = mk.segment_tiles(100, 64, 4, tile_values=512)  # a unit: 400 rows (16 heads)
    assert (tiles.block_rows, tiles.program_rows) == (512, 400)
    assert tiles.options == {"num_warps": 4}
    assert mk.segment_count(10, 96, mk.segment_tiles(96, 64, 32, 512)) == 30
    with pytest.raises(ValueError, match="exceeds"):
        mk.segment_count(2**31 // 3, 96, mk.segment_tiles(96, 64, 32, 512))
