"""``attnmerge demo``: merge a cascade-attention batch with every backend and check it.

The batch is what a serving engine's cascade (shared-prefix) attention produces: several
requests share one prefix KV, each request also has its own suffix KV, and the last request
has no shared prefix. Its tokens come last, so the merge is told
``prefill_tokens_with_context`` = the number of tokens with a prefix, and the prefix rows
past that point hold NaN garbage that must never be read.

Plain torch computes the prefix and suffix partial states (float32 math, outputs stored in
the partial dtype, natural-log LSEs ``[H, T]``) and, as the answer, the attention over all
keys in one piece in float64. Each backend that can run merges the partial states into the
partial dtype and into FP8 (static scale calibrated on the answer); the demo prints the
errors, their bounds (:func:`error_bounds`) and the time per call, and exits with 1 if an
error exceeds its bound. Progress goes to stderr (on a CPU, Triton's interpreter takes
seconds per call).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from attnmerge import api
from attnmerge.dispatch import BackendError
from attnmerge.progress import Progress
from attnmerge.version import __version__

__all__ = ["CascadeBatch", "ErrorBounds", "add_arguments", "error_bounds", "make_cascade_batch"]

BACKENDS = ("cuda", "triton", "torch")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP8 = torch.float8_e4m3fn
_WARMUP, _TIMED = 5, 20  # eager GPU calls: past clock ramp-up, then a stable median
_GRAPH_CALLS = 20  # calls per CUDA graph, which share one replay's launch cost
_CPU_BUDGET_S = 0.5  # CPU timing: fewer calls where each is slow (Triton's interpreter)


@dataclass(frozen=True)
class CascadeBatch:
    """Partial attention states of a cascade batch and the one-piece answer.

    ``prefix_output`` / ``suffix_output``: ``[T, H, D]`` in the partial dtype;
    ``prefix_lse`` / ``suffix_lse``: float32 ``[H, T]``, natural log; the prefix rows and
    LSEs of tokens ``t >= tokens_with_prefix`` are NaN. ``reference`` / ``reference_lse``:
    float64 attention over prefix and suffix keys in one piece. ``suffix_lens``: suffix keys
    per request.
    """

    prefix_output: torch.Tensor
    prefix_lse: torch.Tensor
    suffix_output: torch.Tensor
    suffix_lse: torch.Tensor
    reference: torch.Tensor
    reference_lse: torch.Tensor
    tokens_with_prefix: int
    suffix_lens: tuple[int, ...]


def _attend(q, k, v, visible: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q [t, H, D]`` over ``k, v [n, H, D]`` in their dtype, with a
    ``[t, n]`` mask of visible keys: ``(out [t, H, D], natural-log lse [H, t])``."""
    logits = torch.einsum("thd,nhd->htn", q, k) * q.shape[-1] ** -0.5
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    return torch.einsum("htn,nhd->thd", torch.exp(logits - lse.unsqueeze(-1)), v), lse


def make_cascade_batch(
    *,
    requests: int,
    query_tokens: int,
    prefix_len: int,
    heads: int,
    head_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> CascadeBatch:
    """Build a cascade-attention batch and its float64 one-piece answer.

    Requests ``0 .. requests-2`` share a prefix of ``prefix_len`` keys; the last has none
    and its tokens come last. Each request has ``query_tokens`` new tokens at the end of its
    own suffix of ``query_tokens + c_r`` keys (``c_r`` random earlier keys); a query sees
    the whole prefix and the suffix keys up to its own position. Q, K and V are drawn on the
    CPU (the same batch on every device) and rounded to ``dtype``, as a model's are.
    """
    gen = torch.Generator().manual_seed(seed)
    contexts = torch.randint(0, prefix_len // 4 + 1, (requests,), generator=gen).tolist()
    suffix_lens = tuple(query_tokens + c for c in contexts)

    def rounded(n: int) -> torch.Tensor:
        x = torch.randn(n, heads, head_size, generator=gen).to(dtype)
        return x.to(device=device, dtype=torch.float64)

    tokens, with_prefix = requests * query_tokens, (requests - 1) * query_tokens
    q, prefix_k, prefix_v = rounded(tokens), rounded(prefix_len), rounded(prefix_len)
    # TF32, if a user enabled it, would put 1e-3 errors into the float32 partials.
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        f32 = [x.float() for x in (q[:with_prefix], prefix_k, prefix_v)]
        prefix_out, prefix_lse = _attend(*f32, None)
        suffix, answer = [], []
        for r, n in enumerate(suffix_lens):
            k, v, qr = rounded(n), rounded(n), q[r * query_tokens : (r + 1) * query_tokens]
            query_pos = n - query_tokens + torch.arange(query_tokens, device=device)
            causal = torch.arange(n, device=device)[None, :] <= query_pos[:, None]
            suffix.append(_attend(qr.float(), k.float(), v.float(), causal))
            if r < requests - 1:
                k, v = torch.cat([prefix_k, k]), torch.cat([prefix_v, v])
                causal = torch.cat([causal.new_ones(query_tokens, prefix_len), causal], dim=1)
            answer.append(_attend(qr, k, v, causal))
    finally:
        torch.set_float32_matmul_precision(saved)
    garbage = torch.full((tokens - with_prefix, heads, head_size), math.nan, device=device)
    return CascadeBatch(
        prefix_output=torch.cat([prefix_out, garbage]).to(dtype),
        prefix_lse=torch.cat([prefix_lse, garbage[:, :, 0].t()], dim=1).contiguous(),
        suffix_output=torch.cat([o for o, _ in suffix]).to(dtype),
        suffix_lse=torch.cat([lse for _, lse in suffix], dim=1).contiguous(),
        reference=torch.cat([o for o, _ in answer]),
        reference_lse=torch.cat([lse for _, lse in answer], dim=1),
        tokens_with_prefix=with_prefix,
        suffix_lens=suffix_lens,
    )


@dataclass(frozen=True)
class ErrorBounds:
    """Largest accepted errors of a merged output against the one-piece answer:
    ``rel`` = ||out - ref|| / ||ref|| (FP8 dequantised), ``max_abs`` = max |out - ref|,
    ``lse`` = max |lse - ref_lse| (natural log)."""

    rel: float
    max_abs: float
    lse: float


# Float32 partials and merge round in another order than the answer: ample margin for that.
_FP32_FLOOR = 64 * torch.finfo(torch.float32).eps
# Between float32 rounding and one key missing of a thousand, which moves an LSE by 1e-3.
_LSE_BOUND = 1e-4


def error_bounds(partial_dtype: torch.dtype, out_dtype: torch.dtype, amax: float) -> ErrorBounds:
    """Error bounds for merging ``partial_dtype`` partials into ``out_dtype``.

    The merge computes in float32, so the error has two rounding sources, each at most
    the dtype's unit roundoff ``u`` (half its epsilon) per element: the partials stored in
    ``partial_dtype`` (mixed with weights summing to 1: at most ``u_in`` times the largest
    partial element ``amax``) and the merged value stored in ``out_dtype`` (2^-4 for FP8
    E4M3, whose calibrated scale keeps all but tiny elements in its normal range). Hence
    ``|err| <= (u_in + u_out) * amax`` per element; the norm-wise relative error gets
    twice the partials' share, since a mix of two rows can be shorter than either row.
    Both bounds add a float32 floor for the differently ordered float32 math.
    """
    u_in, u_out = torch.finfo(partial_dtype).eps / 2, torch.finfo(out_dtype).eps / 2
    return ErrorBounds(
        rel=2 * u_in + u_out + _FP32_FLOOR,
        max_abs=(u_in + u_out + _FP32_FLOOR) * amax,
        lse=_LSE_BOUND,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return "fp8_e4m3" if dtype == FP8 else next(k for k, v in DTYPES.items() if v == dtype)


def _seconds_per_call(
    fn: Callable[[], None], device: torch.device, graph: bool, tick: Callable[[], None]
) -> float:
    """Median seconds per call of ``fn`` (already run once): on a GPU by CUDA events around
    each eager call (host launch cost included) or, with ``graph``, around replays of a
    CUDA graph of 20 calls (device time only); on a CPU by the wall clock (3 to 20 calls),
    with ``tick()`` after each call, outside the timed span (GPU calls are too quick to
    need progress, and their timing includes the host's time)."""
    if device.type != "cuda":
        times: list[float] = []
        while len(times) < 20 and (len(times) < 3 or sum(times) < _CPU_BUDGET_S):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            tick()
        return statistics.median(times)
    calls, run = 1, fn
    if graph:
        calls, cuda_graph = _GRAPH_CALLS, torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            for _ in range(calls):
                fn()
        run = cuda_graph.replay
    for _ in range(_WARMUP):
        run()
    events = [[torch.cuda.Event(enable_timing=True) for _ in "se"] for _ in range(_TIMED)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3 / calls


def _merge_and_check(
    backend, batch, out_dtype, scale, bounds: ErrorBounds, graph, tick=lambda: None
):
    """Merge once into NaN-filled outputs (an unwritten element fails the check), compare
    with the answer, then time further calls; with ``graph`` (a GPU) also from a CUDA graph,
    whose replay must write the eager call's bits. ``tick()`` follows the first call and
    each timed CPU call. Returns the table cells and failures."""
    tokens, heads, head_size = batch.reference.shape
    device = batch.reference.device
    out = torch.full((tokens, heads, head_size), math.nan, device=device).to(out_dtype)
    out_lse = torch.full((heads, tokens), math.nan, device=device)
    states = (batch.prefix_output, batch.prefix_lse, batch.suffix_output, batch.suffix_lse)

    def call() -> None:
        api.merge_attn_states(
            out,
            *states,
            out_lse,
            prefill_tokens_with_context=batch.tokens_with_prefix,
            output_scale=scale,
            backend=backend,
        )

    call()
    tick()
    diff = out.double() * (scale.double() if scale is not None else 1) - batch.reference
    errors = (
        diff.abs().max().item(),
        (diff.norm() / batch.reference.norm()).item(),
        (out_lse - batch.reference_lse).abs().max().item(),
    )
    limits = (bounds.max_abs, bounds.rel, bounds.lse)
    checks = zip(("max abs", "rel", "lse"), errors, limits, strict=True)
    # "not <=" so that a NaN error fails too
    failures = [f"{n} err {e:.2e} > {b:.2e}" for n, e, b in checks if not e <= b]
    # Events and graphs work on the current device: make it the batch's.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        times = [_seconds_per_call(call, device, graph=False, tick=tick)]
        if graph:
            eager = (out.clone(), out_lse.clone())
            out.zero_()
            out_lse.zero_()
            try:
                times.append(_seconds_per_call(call, device, graph=True, tick=tick))
            except Exception as e:  # capture is part of the contract: a failure is a finding
                times.append(math.nan)
                failures.append(f"CUDA graph capture failed: {type(e).__name__}: {e}")
            else:
                same = torch.equal(out.view(torch.uint8), eager[0].view(torch.uint8))
                if not (same and torch.equal(out_lse, eager[1])):
                    failures.append("CUDA graph replay wrote other values than the eager call")
    cells = [backend, _dtype_name(out_dtype), *(f"{e:.2e}" for e in errors)]
    return [*cells, *map(_format_time, times)], failures


def _format_time(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _report_call(progress, what: str, calls: Iterator[int]) -> None:
    """Progress after a merge call: "<backend> into <dtype>, call <n>"."""
    progress.update(detail=f"{what}, call {next(calls)}")


def _at_least(low: int) -> Callable[[str], int]:
    def integer(text: str) -> int:
        if int(text) < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return int(text)

    return integer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` options to its subparser."""
    add = parser.add_argument
    add("--heads", type=_at_least(1), default=32, help="query heads H (32)")
    add("--head-size", type=_at_least(1), default=128, help="head size D (128)")
    add("--requests", type=_at_least(2), default=6, help="requests, the last without prefix (6)")
    add("--query-tokens", type=_at_least(1), default=16, help="new tokens per request (16)")
    add("--prefix-len", type=_at_least(1), default=1024, help="shared prefix keys (1024)")
    add("--device", help="torch device (default: cuda if a GPU is present, else cpu)")
    add("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the partials (bf16)")
    add("--seed", type=int, default=0, help="random seed (0)")


def _pick_device(name: str | None) -> tuple[torch.device, str | None]:
    """The demo's device (default: the first GPU if any, else the CPU), or why not."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        device = torch.device(name or ("cuda" if gpus else "cpu"))
    except RuntimeError as e:
        return torch.device("cpu"), f"bad --device {name!r}: {e}"
    if device.type not in ("cpu", "cuda"):
        return device, f"--device must be cpu or cuda[:N], got {name!r}"
    if device.type == "cuda" and (device.index or 0) >= gpus:
        return device, f"--device {name}: no such CUDA device (found {gpus})"
    return device, None


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 if every backend's merge is within bounds, 1 if not, 2 on bad use."""

    device, problem = _pick_device(args.device)
    if problem:
        print(f"attnmerge demo: {problem}", file=sys.stderr)
        return 2
    if device.type == "cpu":  # Triton runs on a CPU through its interpreter, set before first use
        os.environ.setdefault("TRITON_INTERPRET", "1")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    # Each backend merges twice: into the partial dtype and into FP8.
    progress = Progress("demo", 2 * len(BACKENDS), unit="merges")
    progress.update(detail="partial states and the float64 answer")
    dtype, t0 = DTYPES[args.dtype], time.perf_counter()
    sizes = ("requests", "query_tokens", "prefix_len", "heads", "head_size", "seed")
    batch = make_cascade_batch(**{k: getattr(args, k) for k in sizes}, dtype=dtype, device=device)
    progress.clear()
    setup_s, tokens, last = time.perf_counter() - t0, batch.reference.shape[0], args.requests - 1
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    amax = batch.reference.abs().max().item()
    # Static FP8 calibration on the answer: its largest element maps to E4M3's largest, 448.
    scale = torch.tensor([amax / torch.finfo(FP8).max], device=device)
    print(
        f"attnmerge {__version__} demo: cascade attention on {device} ({where})\n"
        f"  {args.requests} requests x {args.query_tokens} query tokens = {tokens} tokens, "
        f"H = {args.heads}, D = {args.head_size}, {args.dtype} partials, float32 LSE [H, T]\n"
        f"  shared prefix: {args.prefix_len} keys, seen by {last} of {args.requests} requests; "
        f"suffix keys per request (causal): {list(batch.suffix_lens)}\n"
        f"  request {last} has no prefix and comes last: prefill_tokens_with_context = "
        f"{batch.tokens_with_prefix} of {tokens} tokens (its prefix rows are NaN garbage)\n"
        f"  partials in torch float32, the one-piece answer in float64: {setup_s:.2f} s\n"
        f"  FP8 output: static scale = amax(answer) / 448 = {scale.item():.4e}",
        flush=True,
    )
    partials = (batch.prefix_output[: batch.tokens_with_prefix], batch.suffix_output)
    partial_amax = max(x.abs().max().item() for x in partials)
    outputs = ((dtype, None), (FP8, scale))
    bounds = {out: error_bounds(dtype, out, partial_amax) for out, _ in outputs}
    for out, b in bounds.items():
        print(
            f"  bounds into {_dtype_name(out)}: rel err <= {b.rel:.2e}, "
            f"max abs err <= {b.max_abs:.2e}, lse err <= {b.lse:.0e}"
        )
    # The interpreter copies tensors to the host, which a CUDA graph cannot capture.
    graph = device.type == "cuda" and not interpreting
    head = ["backend", "output", "max abs err", "rel err", "lse err", "time/call"]
    table = [[*head, *(["in CUDA graph"] if graph else []), "check"]]
    failed, errors = False, []
    for backend in BACKENDS:
        for i, (out_dtype, out_scale) in enumerate(outputs):
            name = _dtype_name(out_dtype)
            what = f"{backend} into {name}"
            progress.update(detail=what)
            tick = functools.partial(_report_call, progress, what, itertools.count(1))
            try:
                cells, failures = _merge_and_check(
                    backend, batch, out_dtype, out_scale, bounds[out_dtype], graph, tick
                )
            except BackendError as e:  # e.g. no GPU, or FP8 before sm_89
                progress.clear()
                print(f"  {backend}: not run{f' into {name}' if i else ''}: {e}", flush=True)
                if i == 0:
                    progress.advance(len(outputs), detail=f"{backend}: not run")
                    break
                status = "not run"
            except Exception as e:  # a crashing backend is a failed check, not a crash
                progress.clear()
                traceback.print_exc()
                errors.append(f"{backend} into {name}: {type(e).__name__}: {e}")
                status = "error"
            else:
                failed |= bool(failures)
                table.append([*cells, "FAIL: " + "; ".join(failures) if failures else "ok"])
                status = "FAIL" if failures else "ok"
            progress.advance(detail=f"{what}: {status}")
    progress.close()
    if interpreting and any(row[0] == "triton" for row in table):
        print("  triton ran in Triton's CPU interpreter: its times say nothing of a GPU's")
    how = "wall clock, median of 3 to 20 calls"
    if device.type == "cuda":
        how = f"CUDA events around each eager call, median of {_TIMED} (with the launch)"
    print(f"\nerrors vs the one-piece answer (FP8 dequantised)\n  time/call: {how}")
    if graph:
        print(
            f"  in CUDA graph: {_GRAPH_CALLS} calls in one graph, median of {_TIMED} "
            "replays, per call (device time only)"
        )
    widths = [max(map(len, column)) for column in zip(*table, strict=True)]
    for row in table:
        print("  " + "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    for e in errors:
        print(f"  ERROR {e}")
    failed |= bool(errors)
    print("\nresult: FAIL" if failed else "\nresult: ok, every merge is within its bounds")
    return 1 if failed else 0
