"""The context-parallel combine: ``attnmerge.distributed.cp_combine`` against vLLM's
``cp_lse_ag_out_rs`` pattern rebuilt from torch.distributed calls, on a group of 2 or 4
GPUs over NCCL (or of CPU processes over Gloo, with tiny shapes, for the tests).

Every rank holds the partial attention of the same T tokens and H heads over its shard of
the keys: a bf16 output ``[T, H, D]`` and a float32 LSE stored ``[T, H]``, as vLLM's decode
context parallelism stores it. Each rank ends with its H / W heads of the merged result,
``[T, H / W, D]``, in bf16 or FP8. The variants (the CSV's ``variant``; ``format`` is
``bf16``, ``static`` or ``token``):

* ``attnmerge``, ``attnmerge:FP8Static``, ``attnmerge:FP8PerToken``: ``cp_combine(out,
  lse.t(), group, scatter="head", quant=...)`` with no format, ``FP8Static(0.05)`` or
  ``FP8PerToken()``: one all-to-all of the partials and their LSEs, then one K-way merge
  that writes the format (docs/distributed.md);
* ``vllm_pattern[IMPL]``: vLLM's order of operations (``vllm/v1/attention/ops/dcp.py``,
  vLLM 0.34.0): an all-gather of the LSEs into ``[W, T, H]``; one kernel that computes the
  merged LSE (NaN and +inf LSEs count as -inf, as in vLLM's kernel), rescales the rank's
  output by ``exp(lse_r - lse)`` in float32 and stores it in bf16; a reduce-scatter of the
  rescaled outputs over the heads, summed in bf16. IMPL names the kernels of the rescale and
  of the quantisers below: ``triton`` (this module's Triton kernels, on CUDA) or ``torch``
  (torch ops, on CPU or where Triton does not import);
* ``vllm_pattern[IMPL]+quant:static``, ``vllm_pattern[IMPL]+quant:token``: the same, then
  a separate FP8 quantisation kernel, as an engine whose next GEMM reads FP8 runs one: static
  (:func:`quantize_static`, ``e4m3fn(saturate(x * (1 / scale)))``, bit-identical to
  ``FP8Static``'s reference) or per token (:func:`benchmarks.formats.quantize_into`, one
  program per token, bit-identical to ``FP8PerToken``'s reference).

The rebuilt pattern is leaner than vLLM's code: its rescale writes straight into the
reduce-scatter's buffer, heads leading (``[W, T, H / W, D]``, chunk ``c`` the heads of rank
``c``), where vLLM rescales ``cp_attn_out`` in place and its group coordinator copies
``movedim(0, 1).contiguous()`` before the reduce-scatter and again after it; its times are,
if anything, below vLLM's. It leaves its inputs as they were (each replay sees the same
partials), and neither side returns the merged LSE. The collectives are
``all_gather_single`` and ``reduce_scatter_single`` (``all_gather_into_tensor`` and
``reduce_scatter_tensor`` on torch releases without them; torch 2.13 deprecates the latter
names) on flat views of the buffers.

Times (``us``: the largest over the ranks of each rank's median): on CUDA, mode ``graph``
replays a CUDA graph of one call (collectives included), captured on every rank after a
warm-up on a side stream, ``--iters`` times, each replay between two CUDA events; mode
``eager`` times the call itself the same way. A variant whose capture fails on any rank has
only its eager row, with the error in ``note``. On CPU: ``eager`` only, timed with
``time.perf_counter``.

Errors (``err_max_ulps``, ``exact_share``) of each variant's first call: every rank builds
all ranks' partials from the shape's seed (bf16 outputs ~ N(0, 1), LSEs ~ 3 N(0, 1)),
computes its heads of their merge in float64 and compares its output with it. bf16: the
largest error in bf16 ulps of the element's magnitude ``sum_k w_k |O_k|`` (as
examples/cp_exactness.py measures it), and the share of elements equal to the float64
result correctly rounded to bf16. FP8: the codes against the float64 result divided by the
output's own scale (the static scale, or the variant's per-token scale) and saturated to
+-448, i.e. the dequantised values against the float64 result quantised exactly: the
largest error in e4m3 ulps of the magnitude over the scale, and the share of codes equal to
the correctly rounded code. The largest error over the ranks; the share over all ranks'
elements.

The CSV (``--out``, default ``$OUT/cp.csv``, rewritten after each world) has a row per W,
shape, variant and mode: device, world, T, H, D, out_dtype (bf16 or fp8), format, provider
(attnmerge or vllm_pattern), variant, mode, us, err_max_ulps, exact_share, note, git_sha.
The summary (also ``--summary CSV``, no GPU needed): per W, H and output format, the
speed-up of attnmerge over vLLM's pattern at each T, its geometric mean over T <= 256
(target >= 1.3x) and its minimum over T > 256 (target >= 1.0x: never slower), then the
errors. From the repository root with ``src`` on PYTHONPATH::

    python3 -m benchmarks.cp_combine                  # W = 2 and 4, as far as GPUs allow
    python3 -m benchmarks.cp_combine --worlds 2 --tokens 1,4096 --heads 128 --out cp.csv
    python3 -m benchmarks.cp_combine --device cpu --worlds 2 --tokens 1,5 --heads 4 \\
        --head-size 16 --iters 2
    python3 -m benchmarks.cp_combine --summary cp.csv
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnmerge import FP8PerToken, FP8Static, bench
from attnmerge.distributed import cp_combine
from benchmarks import formats

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch implementations stand in
    triton = None

# The default grid (a world larger than the visible GPUs is left out).
WORLDS = (2, 4)
TOKENS = (1, 16, 64, 256, 1024, 4096)
HEADS = (128, 32)
HEAD_SIZE = 128
ITERS = 50
WARMUP = 3  # eager calls before a capture (kernels built, NCCL communicator set up)
FP8_SCALE = 0.05  # FP8Static's scale
LSE_STD = 3.0  # the partial LSEs ~ LSE_STD * N(0, 1)
SEED = 0
TIMEOUT = datetime.timedelta(minutes=10)  # of the process group's collectives
# The targets of the summary.
SPEEDUP_TARGET = 1.3  # geometric mean over T <= SMALL_TOKENS
LARGE_TARGET = 1.0  # at every T > SMALL_TOKENS
SMALL_TOKENS = 256
MODES = ("graph", "eager")
#: Heads per program of the Triton rescale.
RESCALE_HEADS = 4
#: Values per program of the Triton static quantiser.
QUANT_BLOCK = 1024
# The spacing of a format's numbers at |x|: its explicit mantissa bits and smallest normal.
BF16_ULP = (7, 2.0**-126)
E4M3_ULP = (3, 2.0**-6)
#: The output formats, in the order of the variants and the summary.
FORMATS = ("bf16", "static", "token")
FP8_MAX = formats.FP8_E4M3_MAX


class Shape(NamedTuple):
    world: int
    tokens: int
    heads: int
    head_size: int


class Output(NamedTuple):
    """A call's result: ``values [T, H / W, D]`` and, for FP8, its scale (``[1]`` static,
    ``[T, 1]`` per token; None for bf16)."""

    values: torch.Tensor
    scales: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class Rank:
    """One rank's partials (``out [T, H, D]`` bf16, ``lse [T, H]`` float32, contiguous), its
    group and the static FP8 scale (``[1]`` float32 on its device)."""

    out: torch.Tensor
    lse: torch.Tensor
    group: object
    rank: int
    world: int
    scale: torch.Tensor


class Variant(NamedTuple):
    """A way to combine: ``make(rank)`` returns the call that is checked and timed."""

    provider: str  # "attnmerge" or "vllm_pattern"
    name: str
    format: str  # "bf16", "static" or "token"
    make: Callable[[Rank], Callable[[], Output]]


class Reference(NamedTuple):
    """A rank's heads of the float64 merge ``[T, H / W, D]`` and its magnitude
    ``sum_k w_k |O_k|``."""

    value: torch.Tensor
    magnitude: torch.Tensor


class Measurement(NamedTuple):
    """One CSV row of one rank, before the ranks are combined."""

    world: int
    T: int
    H: int
    D: int
    out_dtype: str
    format: str
    provider: str
    variant: str
    mode: str
    us: float
    err_max_ulps: float
    exact_share: float
    note: str

    @property
    def key(self) -> tuple:
        """What identifies the row: all but the measured fields."""
        return self[:9]


#: The CSV's columns: the device's name, a measurement's, the git sha of the checkout.
Row = collections.namedtuple("Row", ("device", *Measurement._fields, "git_sha"))
_INTS = {"world", "T", "H", "D"}
_FLOATS = {"us", "err_max_ulps", "exact_share"}


@dataclasses.dataclass(frozen=True)
class Job:
    """What the ranks of one world run: the shapes, the device type ("cuda", rank r on
    cuda:r, or "cpu"), the rescale's and quantisers' implementation, the timed calls per
    variant and mode, and the file of the process group's store."""

    world: int
    shapes: tuple[Shape, ...]
    device: str
    impl: str
    iters: int
    store: str


# ---------------------------------------------------------------------------
# vLLM's pattern: the rescale and the separate quantisers.

if triton is not None:

    @triton.jit
    def _rescale_kernel(
        out_ptr,
        lses_ptr,
        dst_ptr,
        rank,
        num_tokens,
        num_heads,
        heads_per_rank,
        stride_ot,
        stride_oh,
        WORLD: tl.constexpr,
        WORLD_POW2: tl.constexpr,
        HEAD_SIZE: tl.constexpr,
        HEAD_SIZE_POW2: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        # Program (t, b): heads b * BLOCK_H ... of token t. lses [WORLD, T, H] contiguous;
        # dst [WORLD, T, H / WORLD, D] contiguous, head h in chunk h // (H / WORLD).
        tok = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        head_ok = head < num_heads
        src = tl.arange(0, WORLD_POW2)
        lse_at = lses_ptr + tok * num_heads + head
        ok = (src < WORLD)[:, None] & head_ok[None, :]
        lses = tl.load(
            lse_at[None, :] + src[:, None] * num_tokens * num_heads, mask=ok, other=float("-inf")
        )
        # The merged LSE: NaN and +inf count as -inf; a max of -inf is taken as 0.
        lses = tl.where((lses != lses) | (lses == float("inf")), float("-inf"), lses)
        top = tl.max(lses, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)
        lse = tl.log(tl.sum(tl.exp(lses - top[None, :]), axis=0)) + top
        # This rank's weight: 0 where the difference is NaN or +inf.
        diff = tl.load(lse_at + rank * num_tokens * num_heads, mask=head_ok, other=0.0) - lse
        diff = tl.where((diff != diff) | (diff == float("inf")), float("-inf"), diff)
        factor = tl.exp(diff)
        col = tl.arange(0, HEAD_SIZE_POW2)
        rows_ok = head_ok[:, None] & (col < HEAD_SIZE)[None, :]
        rows = out_ptr + tok * stride_ot + head[:, None] * stride_oh + col[None, :]
        x = tl.load(rows, mask=rows_ok, other=0.0).to(tl.float32) * factor[:, None]
        x = tl.where(factor[:, None] == 0.0, 0.0, x)
        chunk = head // heads_per_rank
        row = (chunk * num_tokens + tok) * heads_per_rank + head - chunk * heads_per_rank
        dst = dst_ptr + row[:, None] * HEAD_SIZE + col[None, :]
        tl.store(dst, x.to(dst_ptr.dtype.element_ty), mask=rows_ok)

    @triton.jit
    def _static_quant_kernel(x_ptr, q_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        # e4m3fn(saturate(x * (1 / scale))): the reciprocal an IEEE division, as torch's;
        # the conversion rounds to nearest even, saturates to +-448 and keeps NaN.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        inv = tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.load(scale_ptr).to(tl.float32))
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(q_ptr + offs, (x * inv).to(q_ptr.dtype.element_ty), mask=ok)


def _prepare_triton() -> None:
    if triton is None:
        raise ImportError("the Triton kernels need triton")
    from attnmerge.triton import interpreter_fix, interpreting

    if interpreting():  # the interpreter's own float conversions round wrongly
        interpreter_fix.install()


def rescale_triton(out: torch.Tensor, lses: torch.Tensor, rank: int, dst: torch.Tensor) -> None:
    """vLLM's rescale in one Triton kernel: ``out [T, H, D]`` (contiguous in D) times this
    rank's weight from the gathered ``lses [W, T, H]``, stored into ``dst [W, T, H / W, D]``
    (both contiguous), the heads of rank ``c`` in ``dst[c]``."""
    _prepare_triton()
    world, tokens, heads_per_rank, head_size = dst.shape
    heads = out.shape[1]
    if tokens * heads == 0:
        return
    block_h = min(triton.next_power_of_2(heads), RESCALE_HEADS)
    _rescale_kernel[(tokens, triton.cdiv(heads, block_h))](
        out,
        lses,
        dst,
        rank,
        tokens,
        heads,
        heads_per_rank,
        out.stride(0),
        out.stride(1),
        WORLD=world,
        WORLD_POW2=triton.next_power_of_2(world),
        HEAD_SIZE=head_size,
        HEAD_SIZE_POW2=triton.next_power_of_2(head_size),
        BLOCK_H=block_h,
    )


def rescale_torch(out: torch.Tensor, lses: torch.Tensor, rank: int, dst: torch.Tensor) -> None:
    """:func:`rescale_triton` in torch ops."""
    inf = math.inf
    masked = lses.masked_fill(lses.isnan() | (lses == inf), -inf)
    top = masked.amax(0)
    top = top.masked_fill(top == -inf, 0.0)
    lse = torch.log(torch.exp(masked - top).sum(0)) + top
    diff = lses[rank] - lse
    factor = torch.exp(diff.masked_fill(diff.isnan() | (diff == inf), -inf))[..., None]
    x = torch.where(factor == 0, 0.0, out.float() * factor)
    world, _, heads_per_rank, _ = dst.shape
    dst.copy_(x.unflatten(1, (world, heads_per_rank)).transpose(0, 1))


def quantize_static(x: torch.Tensor, scale: torch.Tensor, q: torch.Tensor) -> None:
    """``q = e4m3fn(saturate(x * (1 / scale)))`` in one Triton kernel, ``x`` and ``q``
    contiguous: the bits of ``FP8Static(scale)``'s reference."""
    _prepare_triton()
    n = x.numel()
    if n:
        _static_quant_kernel[(triton.cdiv(n, QUANT_BLOCK),)](x, q, scale, n, BLOCK=QUANT_BLOCK)


def quantize_static_torch(x: torch.Tensor, scale: torch.Tensor, q: torch.Tensor) -> None:
    """:func:`quantize_static` in torch ops (``FP8Static``'s reference)."""
    q.copy_(FP8Static(scale).quantize_reference(x))


def quantize_token(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """Per-token FP8 of ``x [T, H', D]`` into ``q`` and ``scales [T, 1]`` with the Triton
    quantiser of benchmarks/formats.py."""
    formats.quantize_into(FP8PerToken(scales=scales), x, q)


def quantize_token_torch(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> None:
    """:func:`quantize_token` in torch ops (``FP8PerToken``'s reference)."""
    formats.reference_store(FP8PerToken(), q, scales, x)


#: The rescale, static and per-token quantisers of each implementation.
KERNELS = {
    "triton": (rescale_triton, quantize_static, quantize_token),
    "torch": (rescale_torch, quantize_static_torch, quantize_token_torch),
}


def _all_gather(dst: torch.Tensor, src: torch.Tensor, group: object) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(dst.view(-1), src.view(-1), group=group)


def _reduce_scatter(dst: torch.Tensor, src: torch.Tensor, group: object) -> None:
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(dst.view(-1), src.view(-1), group=group)


def _vllm_pattern(impl: str, fmt: str) -> Callable[[Rank], Callable[[], Output]]:
    rescale, static, token = KERNELS[impl]

    def make(r: Rank) -> Callable[[], Output]:
        tokens, heads, head_size = r.out.shape
        shape, dev = (tokens, heads // r.world, head_size), r.out.device

        def call() -> Output:
            lses = torch.empty((r.world, tokens, heads), dtype=torch.float32, device=dev)
            _all_gather(lses, r.lse, r.group)
            rescaled = torch.empty((r.world, *shape), dtype=r.out.dtype, device=dev)
            rescale(r.out, lses, r.rank, rescaled)
            result = torch.empty(shape, dtype=r.out.dtype, device=dev)
            _reduce_scatter(result, rescaled, r.group)
            if fmt == "bf16":
                return Output(result, None)
            q = torch.empty(shape, dtype=torch.float8_e4m3fn, device=dev)
            if fmt == "static":
                static(result, r.scale, q)
                return Output(q, r.scale)
            scales = torch.empty((tokens, 1), dtype=torch.float32, device=dev)
            token(result, q, scales)
            return Output(q, scales)

        return call

    return make


def _attnmerge(fmt: str) -> Callable[[Rank], Callable[[], Output]]:
    def make(r: Rank) -> Callable[[], Output]:
        quant = {"bf16": None, "static": FP8Static(r.scale), "token": FP8PerToken()}[fmt]

        def call() -> Output:
            res = cp_combine(r.out, r.lse.t(), r.group, scatter="head", quant=quant)
            return Output(res.output, r.scale if fmt == "static" else res.scales)

        return call

    return make


def variants(impl: str) -> list[Variant]:
    """attnmerge's and vLLM's pattern's variants, bf16 then static then per-token FP8."""
    vllm = f"vllm_pattern[{impl}]"
    return [
        Variant("attnmerge", "attnmerge", "bf16", _attnmerge("bf16")),
        Variant("vllm_pattern", vllm, "bf16", _vllm_pattern(impl, "bf16")),
        Variant("attnmerge", "attnmerge:FP8Static", "static", _attnmerge("static")),
        Variant("vllm_pattern", f"{vllm}+quant:static", "static", _vllm_pattern(impl, "static")),
        Variant("attnmerge", "attnmerge:FP8PerToken", "token", _attnmerge("token")),
        Variant("vllm_pattern", f"{vllm}+quant:token", "token", _vllm_pattern(impl, "token")),
    ]


# ---------------------------------------------------------------------------
# Inputs and errors.


def make_partials(shape: Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' partials of ``shape``, the same on every rank (the shape's seed): outputs
    ``[W, T, H, D]`` bf16 and LSEs ``[W, T, H]`` float32."""
    w, t, h, d = shape
    g = torch.Generator(device=device).manual_seed(SEED + 1000 * t + h)
    outs = torch.randn((w, t, h, d), generator=g, device=device).to(torch.bfloat16)
    return outs, torch.randn((w, t, h), generator=g, device=device) * LSE_STD


def reference(outs: torch.Tensor, lses: torch.Tensor, rank: int) -> Reference:
    """Rank ``rank``'s heads of the float64 merge of ``outs [W, T, H, D]`` with ``lses
    [W, T, H]``, and its magnitude."""
    world, tokens, heads, head_size = outs.shape
    mine = slice(rank * heads // world, (rank + 1) * heads // world)
    weights = torch.softmax(lses[:, :, mine].double(), dim=0)[..., None]
    value = outs.new_zeros((tokens, mine.stop - mine.start, head_size), dtype=torch.float64)
    magnitude = torch.zeros_like(value)
    for k in range(world):
        o = outs[k, :, mine].double()
        value.addcmul_(weights[k], o)
        magnitude.addcmul_(weights[k], o.abs())
    return Reference(value, magnitude)


def ulp(x: torch.Tensor, spec: tuple[int, float]) -> torch.Tensor:
    """The spacing of the numbers of a format at ``|x|``; ``spec``: its explicit mantissa
    bits and smallest normal (:data:`BF16_ULP`, :data:`E4M3_ULP`)."""
    bits, smallest = spec
    _, e = torch.frexp(x.abs().clamp(min=smallest))
    return torch.ldexp(torch.ones_like(x), e - 1 - bits)


def errors(output: Output, fmt: str, ref: Reference) -> tuple[float, float]:
    """``(largest error in ulps of the magnitude, share exactly rounded)`` of a call's
    output against the float64 reference (the module's docstring says how)."""
    if fmt == "bf16":
        err = (output.values.double() - ref.value).abs() / ulp(ref.magnitude, BF16_ULP)
        exact = output.values == ref.value.to(output.values.dtype)
    else:
        scale = output.scales.double().reshape(-1, 1, 1)
        target = (ref.value / scale).clamp(-FP8_MAX, FP8_MAX)
        err = (output.values.double() - target).abs() / ulp(ref.magnitude / scale, E4M3_ULP)
        code = target.to(torch.float8_e4m3fn).view(torch.uint8)
        exact = output.values.view(torch.uint8) == code
    if not err.numel():
        return 0.0, 1.0
    return err.max().item(), exact.double().mean().item()


# ---------------------------------------------------------------------------
# Timing, on each rank.


def _cuda_us(fn: Callable[[], object], iters: int) -> float:
    """The median of ``iters`` calls between CUDA events, enqueued back to back."""
    pairs = [[torch.cuda.Event(enable_timing=True) for _ in "se"] for _ in range(iters)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(start.elapsed_time(end) for start, end in pairs)


def _cpu_us(fn: Callable[[], object], iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def _capture(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph | None, str]:
    """A CUDA graph of one call after a warm-up on a side stream, or None and the error."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # the eager row stands, with the error as its note
        return None, f"graph capture failed: {type(e).__name__}: {e}".splitlines()[0]
    return graph, ""


def measure(variant: Variant, r: Rank, ref: Reference, iters: int) -> list[Measurement]:
    """This rank's rows of a variant: its first call's errors, then its times (graph and
    eager on CUDA, eager on CPU)."""
    call = variant.make(r)
    err, exact = errors(call(), variant.format, ref)
    tokens, heads, head_size = r.out.shape
    out_dtype = "bf16" if variant.format == "bf16" else "fp8"
    shape = (r.world, tokens, heads, head_size, out_dtype, variant.format)
    row = Measurement(*shape, variant.provider, variant.name, "eager", math.nan, err, exact, "")
    if r.out.device.type != "cuda":
        dist.barrier(group=r.group)
        return [row._replace(us=_cpu_us(call, iters))]
    graph, note = _capture(call)
    # A capture must have succeeded on every rank: a replay's collectives need them all.
    captured = torch.tensor([graph is not None], dtype=torch.int32, device=r.out.device)
    dist.all_reduce(captured, op=dist.ReduceOp.MIN, group=r.group)
    rows = []
    if captured.item():
        dist.barrier(group=r.group)
        rows.append(row._replace(mode="graph", us=_cuda_us(graph.replay, iters)))
    del graph
    dist.barrier(group=r.group)
    rows.append(row._replace(us=_cuda_us(call, iters), note=note))
    return rows


def _run_rank(rank: int, job: Job) -> tuple[str, list[Measurement]]:
    """Rank ``rank`` of ``job``'s group: every shape's variants, in order."""
    options = {}
    if job.device == "cuda":
        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
        backend, options["device_id"] = "nccl", dev
    else:
        dev, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(1)
    dist.init_process_group(
        backend,
        init_method=f"file://{job.store}",
        rank=rank,
        world_size=job.world,
        timeout=TIMEOUT,
        **options,
    )
    try:
        scale = torch.tensor([FP8_SCALE], device=dev)
        rows: list[Measurement] = []
        for shape in job.shapes:
            outs, lses = make_partials(shape, dev)
            ref = reference(outs, lses, rank)
            r = Rank(
                outs[rank].clone(), lses[rank].clone(), dist.group.WORLD, rank, job.world, scale
            )
            del outs, lses
            for variant in variants(job.impl):
                rows += measure(variant, r, ref, job.iters)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        return name, rows
    finally:
        dist.destroy_process_group()


def _worker(rank: int, job: Job, reports) -> None:
    """Report ``(rank, device name, rows as plain tuples, "")``, or the traceback as the
    last item. (Plain tuples: under ``python -m`` this module is ``__mp_main__`` here, a
    name the parent could not unpickle a class from.)"""
    try:
        name, rows = _run_rank(rank, job)
        reports.put((rank, name, [tuple(m) for m in rows], ""))
    except BaseException:
        reports.put((rank, "", [], traceback.format_exc()))


# ---------------------------------------------------------------------------
# The groups, from the parent process.


def combine_ranks(per_rank: Sequence[Sequence[Measurement]]) -> list[Measurement]:
    """One row per measurement: the largest time and error over the ranks, the share over
    all ranks' elements (each rank has as many), the first note."""
    rows = []
    for same in zip(*per_rank, strict=True):
        if len({m.key for m in same}) != 1:
            raise RuntimeError(f"the ranks measured different rows: {[m.key for m in same]}")
        rows.append(
            same[0]._replace(
                us=max(m.us for m in same),
                err_max_ulps=max(m.err_max_ulps for m in same),
                exact_share=statistics.fmean(m.exact_share for m in same),
                note=next((m.note for m in same if m.note), ""),
            )
        )
    return rows


def run_world(job: Job) -> tuple[str, list[Measurement]]:
    """Spawn ``job.world`` ranks, run the job, and return the device's name and the rows
    combined over the ranks. A rank that fails or dies stops the others."""
    ctx = mp.get_context("spawn")
    reports = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, job, reports)) for r in range(job.world)]
    for p in procs:
        p.start()
    done: dict[int, tuple[str, list[Measurement]]] = {}
    ok = False
    try:
        while len(done) < job.world:
            try:
                rank, name, rows, error = reports.get(timeout=1.0)
            except queue.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode]
                if dead:
                    raise RuntimeError(f"rank {dead[0][0]} exited with code {dead[0][1]}") from None
                continue
            if error:
                raise RuntimeError(f"rank {rank} of {job.world} failed:\n{error}")
            done[rank] = (name, [Measurement(*m) for m in rows])
        ok = True
    finally:
        for p in procs:
            p.join(timeout=60 if ok else 1)
            if p.is_alive():
                p.kill()
                p.join()
    return done[0][0], combine_ranks([done[r][1] for r in range(job.world)])


def git_sha() -> str:
    """The short sha of the checkout holding this file, or "" where git cannot tell."""
    git = ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"]
    try:
        run = subprocess.run(git, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return run.stdout.strip() if run.returncode == 0 else ""


def write_csv(path: str | Path, rows: Sequence[Row]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(Row._fields)
        for r in rows:
            w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in r])


def read_csv(path: str | Path) -> list[Row]:
    """The rows of a CSV written by :func:`write_csv`."""
    kinds = {**dict.fromkeys(_INTS, int), **dict.fromkeys(_FLOATS, float)}
    with open(path, newline="") as f:
        return [
            Row(*(kinds.get(k, str)(d.get(k, "")) for k in Row._fields)) for d in csv.DictReader(f)
        ]


def columns(cells: Sequence[Sequence[str]], left: set[int]) -> list[str]:
    """The lines of ``cells`` in aligned columns, right-aligned but those in ``left``."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]


def table(rows: Sequence[Row]) -> str:
    """One line per row: shape, variant, mode, time and errors."""
    head = ("W", "T", "H", "variant", "mode", "us", "err_ulps", "exact", "note")
    cells = [head] + [
        (
            *map(str, (r.world, r.T, r.H)),
            r.variant,
            r.mode,
            f"{r.us:.2f}",
            f"{r.err_max_ulps:.3f}",
            f"{100 * r.exact_share:.2f}%",
            r.note,
        )
        for r in rows
    ]
    return "\n".join(columns(cells, left={3, 4, 8}))


# ---------------------------------------------------------------------------
# The summary.


def geomean(xs: Sequence[float]) -> float:
    return math.exp(statistics.fmean(map(math.log, xs)))


def speedups(rows: Sequence[Row], mode: str) -> dict[tuple[int, int, str], dict[int, float]]:
    """Per (W, H, format), in that order: vLLM's pattern's time over attnmerge's at each T
    of the ``mode`` rows."""
    times = {
        (r.world, r.H, r.format, r.provider, r.T): r.us for r in rows if r.mode == mode and r.us > 0
    }
    result: dict[tuple[int, int, str], dict[int, float]] = {}
    for (w, h, fmt, provider, t), us in times.items():
        theirs = times.get((w, h, fmt, "vllm_pattern", t))
        if provider == "attnmerge" and theirs:
            result.setdefault((w, h, fmt), {})[t] = theirs / us
    order = {fmt: i for i, fmt in enumerate(FORMATS)}
    return dict(sorted(result.items(), key=lambda kv: (kv[0][0], -kv[0][1], order[kv[0][2]])))


def speedup_table(groups: dict, judged: bool) -> tuple[list[str], list[str]]:
    """The lines of a table of :func:`speedups`' groups (a column per T, then the geometric
    mean over T <= 256 and the minimum over T > 256, judged against the targets where
    ``judged``), and the targets missed."""
    tokens = sorted({t for per_t in groups.values() for t in per_t})
    small, large = f"T<={SMALL_TOKENS} geomean", f"T>{SMALL_TOKENS} min"
    cells = [["W", "H", "out", *(f"T={t}" for t in tokens), small, large]]
    missed = []
    for (world, heads, fmt), per_t in groups.items():
        row = [
            str(world),
            str(heads),
            fmt,
            *(f"{per_t[t]:.2f}" if t in per_t else "-" for t in tokens),
        ]
        for how, of, target, keep in (
            (small, geomean, SPEEDUP_TARGET, lambda t: t <= SMALL_TOKENS),
            (large, min, LARGE_TARGET, lambda t: t > SMALL_TOKENS),
        ):
            values = [v for t, v in per_t.items() if keep(t)]
            if not values:
                row.append("-")
                continue
            value = of(values)
            row.append(
                f"{value:.2f}x" + ("" if not judged else " met" if value >= target else " MISSED")
            )
            if judged and value < target:
                missed.append(f"W={world} H={heads} {fmt} {how} {value:.2f}x")
        cells.append(row)
    return columns(cells, left={2}), missed


def summary(path: str | Path) -> str:
    """The summary of a CSV of this benchmark (see the module's docstring); its last line
    names the targets missed (judged on graph times where the CSV has them)."""
    rows = read_csv(path)
    if not rows:
        return f"cp_combine summary of {Path(path).name}: no rows"
    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    lines = [
        f"cp_combine summary of {Path(path).name}: {rows[0].device}, git {rows[0].git_sha or '-'}"
        f"; times: the slowest rank's median",
        f"speed-up of attnmerge over vLLM's pattern (its time / attnmerge's) per T; targets, "
        f"judged on {modes[0]} times:",
        f"  >= {SPEEDUP_TARGET}x geometric mean at T <= {SMALL_TOKENS}, >= {LARGE_TARGET}x at "
        f"every T > {SMALL_TOKENS}",
    ]
    missed = []
    for mode in modes:
        groups = speedups(rows, mode)
        if groups:
            more, miss = speedup_table(groups, judged=mode == modes[0])
            lines += [f"{mode}:", *("  " + line for line in more)]
            missed += miss
    lines.append("errors against the float64 merge (largest ulps, smallest exact share):")
    worst: dict[tuple[str, str], tuple[float, float]] = {}
    for r in rows:
        err, exact = worst.get((r.format, r.variant), (0.0, 1.0))
        worst[r.format, r.variant] = (max(err, r.err_max_ulps), min(exact, r.exact_share))
    cells = [
        ["", fmt, variant, f"{err:.3f} ulps", f"{100 * exact:.2f}% exact"]
        for (fmt, variant), (err, exact) in worst.items()
    ]
    lines += columns(cells, left={1, 2})
    lines.append("targets missed: " + ("; ".join(missed) if missed else "none"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The command line.


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.cp_combine", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    ints = bench.items("comma-separated positive integers")

    def positive(text: str) -> int:
        (value,) = bench.items("a positive integer")(text)
        return value

    p.add_argument(
        "--worlds",
        type=ints,
        default=WORLDS,
        metavar="W,...",
        help="group sizes; on cuda those <= the visible GPUs, else 1 (2,4)",
    )
    p.add_argument(
        "--tokens", type=ints, default=TOKENS, metavar="T,...", help="(1,16,64,256,1024,4096)"
    )
    p.add_argument(
        "--heads",
        type=ints,
        default=HEADS,
        metavar="H,...",
        help="heads; a world that does not divide H skips the shape (128,32)",
    )
    p.add_argument("--head-size", type=positive, default=HEAD_SIZE, metavar="D", help="(128)")
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cuda: NCCL, rank r on cuda:r; cpu: Gloo processes (cuda)",
    )
    p.add_argument("--iters", type=positive, default=ITERS, help=f"timed calls per row ({ITERS})")
    p.add_argument("--out", default=None, metavar="CSV", help="the CSV ($OUT/cp.csv)")
    p.add_argument("--summary", metavar="CSV", help="print the summary of a CSV and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid world by world (the CSV rewritten after each), then print the summary."""
    args = parser().parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    worlds = args.worlds
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if not gpus:
            raise SystemExit("--device cuda: no GPU is visible (--device cpu runs on Gloo)")
        worlds = tuple(w for w in worlds if w <= gpus) or (1,)
    impl = "triton" if args.device == "cuda" and triton is not None else "torch"
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "cp.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    sha, rows = git_sha(), []
    for world in worlds:
        shapes = [
            Shape(world, t, h, args.head_size)
            for t in args.tokens
            for h in args.heads
            if h % world == 0
        ]
        skipped = sorted({h for h in args.heads if h % world})
        print(
            f"world {world} ({args.device}, {impl} kernels for vLLM's pattern): {len(shapes)} "
            f"shapes" + (f"; H = {skipped} skipped (not multiples of {world})" if skipped else ""),
            flush=True,
        )
        if not shapes:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            job = Job(world, tuple(shapes), args.device, impl, args.iters, str(Path(tmp) / "store"))
            device, measured = run_world(job)
        new = [Row(device, *m, sha) for m in measured]
        rows += new
        write_csv(out, rows)
        print(table(new), flush=True)
    if not rows:
        raise SystemExit("no shape to run: every H must be a multiple of a world size")
    print(f"wrote {out}")
    print(summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
