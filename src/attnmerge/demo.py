"""``attnmerge demo``: merge a cascade-attention batch with every backend and check it.

The batch is what a serving engine's cascade (shared-prefix) attention produces:
several requests share one prefix KV, each request also has its own suffix KV, and
the last request has no shared prefix. Its tokens sit at the end of the batch, so the
merge is told ``prefill_tokens_with_context`` = the number of tokens that have a
prefix (vLLM's tail-token feature), and the prefix rows past that point hold NaN
garbage that must never be read.

Plain torch computes (float32 math, on the demo's device) the prefix and the suffix
partial attention (output stored in the partial dtype + natural-log LSE in float32
``[H, T]``) and, as ground truth, the attention over the concatenated keys in one
piece. Each backend that can run on the device then merges the two partial states
(a) into the partial dtype and (b) into FP8 with a static scale calibrated on the
ground truth. The demo prints the errors and the time per call, and returns 1 if
any error exceeds the bound derived from the dtypes (see :func:`error_bounds`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import attnmerge

from . import dispatch
from . import triton as triton_backend
from .quant import FP8_E4M3_MAX

__all__ = ["CascadeBatch", "ErrorBounds", "add_arguments", "error_bounds", "make_cascade_batch"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP8 = torch.float8_e4m3fn

# GPU timing: enough warm-up calls to leave clock ramp-up and allocator growth behind,
# and enough timed calls for a stable median.
_GPU_WARMUP_CALLS = 5
_GPU_TIMED_CALLS = 20
# CUDA-graph timing: 20 calls per graph, so one replay's launch cost is shared by 20 merges;
# median of 10 replays.
_GRAPH_CALLS = 20
_GRAPH_REPLAYS = 10
# CPU timing: the Triton interpreter takes ~0.5 s per call at the default sizes on a
# 2-core machine (192 programs of 16 rows, ~2.5 ms each), so time a few calls, or more
# while they stay cheap (the torch backend: ~0.4 ms).
_CPU_MIN_CALLS = 3
_CPU_MAX_CALLS = 20
_CPU_TIME_BUDGET_S = 0.5


# ---------------------------------------------------------------------------
# The cascade-attention batch.


@dataclass(frozen=True)
class CascadeBatch:
    """Partial attention states of a cascade batch, and the one-piece ground truth.

    Attributes:
        prefix_output: ``[T, H, D]`` partial dtype; attention over the shared prefix.
            Rows ``t >= tokens_with_prefix`` are NaN (never computed, must not be read).
        prefix_lse: float32 ``[H, T]``, natural log; NaN past ``tokens_with_prefix``.
        suffix_output: ``[T, H, D]`` partial dtype; each request's causal attention over
            its own suffix keys.
        suffix_lse: float32 ``[H, T]``, natural log.
        reference: float32 ``[T, H, D]``; attention over prefix + suffix keys in one piece.
        reference_lse: float32 ``[H, T]``, natural log.
        tokens_with_prefix: number of leading tokens that have a prefix (``P``).
        suffix_lens: number of suffix keys per request.
    """

    prefix_output: torch.Tensor
    prefix_lse: torch.Tensor
    suffix_output: torch.Tensor
    suffix_lse: torch.Tensor
    reference: torch.Tensor
    reference_lse: torch.Tensor
    tokens_with_prefix: int
    suffix_lens: tuple[int, ...]


@contextlib.contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    """Full float32 matmuls: TF32 (if a user enabled it) would give 1e-3 errors in
    logits and LSEs, far above what the merge itself is checked for."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in float32.

    Args:
        q: ``[t, H, D]`` float32 queries.
        k, v: ``[n, H, D]`` float32 keys and values.
        visible: ``[t, n]`` bool mask (True = query may see key), or None for all.

    Returns:
        ``(out [t, H, D], lse [H, t])``, LSE in natural log.
    """
    logits = torch.einsum("thd,nhd->htn", q, k) * q.shape[-1] ** -0.5
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    return torch.einsum("htn,nhd->thd", probs, v), lse


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
    """Build a cascade-attention batch and its one-piece ground truth.

    Requests ``0 .. requests-2`` share a prefix of ``prefix_len`` keys; the last
    request has none and its tokens come last. Each request has ``query_tokens`` new
    tokens at the end of its own suffix of ``query_tokens + c_r`` keys (``c_r`` random
    earlier keys of that request); query ``i`` sees the whole prefix and the suffix
    keys up to its own position (causal). Q, K, V are drawn in float32, rounded to
    ``dtype`` (as a model's activations are), and all attention math is float32.
    """
    gen = torch.Generator().manual_seed(seed)
    contexts = torch.randint(0, prefix_len // 4 + 1, (requests,), generator=gen).tolist()
    suffix_lens = tuple(query_tokens + c for c in contexts)

    def rounded(*shape: int) -> torch.Tensor:
        # Drawn on the CPU so a seed gives the same batch on every device.
        x = torch.randn(*shape, generator=gen).to(dtype).float()
        return x.to(device)

    tokens = requests * query_tokens
    with_prefix = (requests - 1) * query_tokens
    q = rounded(tokens, heads, head_size)
    prefix_k = rounded(prefix_len, heads, head_size)
    prefix_v = rounded(prefix_len, heads, head_size)

    with _full_fp32_matmul():
        prefix_out, prefix_lse_part = _attend(q[:with_prefix], prefix_k, prefix_v, None)
        suffix_outs, suffix_lses, ref_outs, ref_lses = [], [], [], []
        for r, n in enumerate(suffix_lens):
            k, v = rounded(n, heads, head_size), rounded(n, heads, head_size)
            qr = q[r * query_tokens : (r + 1) * query_tokens]
            # Query i sits at suffix position n - query_tokens + i and sees keys up to it.
            key_pos = torch.arange(n, device=device)
            query_pos = n - query_tokens + torch.arange(query_tokens, device=device)
            causal = key_pos[None, :] <= query_pos[:, None]
            out, lse = _attend(qr, k, v, causal)
            suffix_outs.append(out)
            suffix_lses.append(lse)
            if r < requests - 1:
                k = torch.cat([prefix_k, k])
                v = torch.cat([prefix_v, v])
                causal = torch.cat([causal.new_ones(query_tokens, prefix_len), causal], dim=1)
            out, lse = _attend(qr, k, v, causal)
            ref_outs.append(out)
            ref_lses.append(lse)

    nan = float("nan")
    prefix_output = torch.full((tokens, heads, head_size), nan, dtype=dtype, device=device)
    prefix_output[:with_prefix] = prefix_out.to(dtype)
    prefix_lse = torch.full((heads, tokens), nan, dtype=torch.float32, device=device)
    prefix_lse[:, :with_prefix] = prefix_lse_part
    return CascadeBatch(
        prefix_output=prefix_output,
        prefix_lse=prefix_lse,
        suffix_output=torch.cat(suffix_outs).to(dtype),
        suffix_lse=torch.cat(suffix_lses, dim=1).contiguous(),
        reference=torch.cat(ref_outs),
        reference_lse=torch.cat(ref_lses, dim=1).contiguous(),
        tokens_with_prefix=with_prefix,
        suffix_lens=suffix_lens,
    )


# ---------------------------------------------------------------------------
# Error bounds.


@dataclass(frozen=True)
class ErrorBounds:
    """Largest accepted errors of a merged output against the one-piece attention.

    Attributes:
        rel: ``||out - ref|| / ||ref||`` (Frobenius norms, FP8 dequantised).
        max_abs: ``max |out - ref|``.
        lse: ``max |lse - ref_lse|`` (natural log).
    """

    rel: float
    max_abs: float
    lse: float


# float32 floor, relative: the split and the one-piece attention round the logits,
# the exponentials and the ~1000-term sums differently; fp32 partials at the default sizes
# measured 2.6e-7 (CPU) and 4.1e-7 (H200), so 64 float32 epsilons (7.6e-6) leave margin.
_FP32_FLOOR = 64 * torch.finfo(torch.float32).eps
# An LSE off by d re-weights its state by e^d (~ 1 + d) in any later merge. The split and
# one-piece LSEs (~7 for 1000 keys) differ by a few float32 ulps: measured 9.5e-7 at the
# default sizes, 1.9e-6 with a 4096-key prefix. A state missing a single key of ~1000 is off
# by log(1 + 1/1000) ~ 1e-3. 1e-4 lies between the two.
_LSE_BOUND = 1e-4


def _dtype_name(dtype: torch.dtype) -> str:
    return "fp8_e4m3" if dtype == FP8 else next(k for k, v in DTYPES.items() if v == dtype)


def _unit_roundoff(dtype: torch.dtype) -> float:
    """Largest relative error of round-to-nearest into ``dtype`` (half its epsilon)."""
    return torch.finfo(dtype).eps / 2


def error_bounds(partial_dtype: torch.dtype, out_dtype: torch.dtype, amax: float) -> ErrorBounds:
    """Error bounds for merging ``partial_dtype`` partials into ``out_dtype``.

    The merge itself is float32, so the error against the float32 one-piece attention
    has two rounding sources, each at most the dtype's unit roundoff ``u`` (half its
    epsilon) relative per element: the partials stored in ``partial_dtype`` (the
    merged element mixes them with weights summing to 1, so at most ``u_in`` times the
    largest partial element) and the merged value stored in ``out_dtype`` (``u_out``,
    2^-4 for FP8 E4M3's 3 mantissa bits; for FP8 the value must lie in the normal range,
    which the calibrated scale ensures for all but tiny elements whose absolute error
    is below ``scale * 2^-10``). Hence, per element,
    ``|err| <= (u_in + u_out) * amax`` with ``amax`` the largest partial element. The
    norm-wise relative error gets twice the partials' share, since a weighted mix of
    two rows can be shorter than the rows themselves. Both bounds add a float32 floor
    for the differently ordered float32 math.

    Args:
        partial_dtype: dtype of the stored partial outputs.
        out_dtype: dtype of the merged output.
        amax: largest absolute element of the partial outputs.
    """
    u_in, u_out = _unit_roundoff(partial_dtype), _unit_roundoff(out_dtype)
    return ErrorBounds(
        rel=2 * u_in + u_out + _FP32_FLOOR,
        max_abs=(u_in + u_out + _FP32_FLOOR) * amax,
        lse=_LSE_BOUND,
    )


# ---------------------------------------------------------------------------
# Running the backends.


def _prepare_triton(device: torch.device) -> None:
    """Let Triton run on a CPU device through its interpreter.

    ``TRITON_INTERPRET=1`` only takes effect if set before attnmerge first loads its
    Triton kernels, so it is set only while they are not loaded yet; if they already
    are (in-process use), the triton backend states for itself whether it can run.
    """
    if device.type != "cpu" or triton_backend.interpreting():
        return
    if "attnmerge.triton.merge_kernel" in sys.modules:
        return
    # Harmless without Triton installed: the backend then reports that it cannot import it.
    os.environ["TRITON_INTERPRET"] = "1"
    dispatch.reset()  # forget any availability decided before the variable was set


def _time_per_call(fn: Callable[[], None], device: torch.device) -> float:
    """Median seconds per eager call of ``fn`` (already warmed up once by the caller).

    On a GPU each call is timed with CUDA events: device time plus the host time of
    the launch while the GPU waits, which dominates at demo sizes. On a CPU: wall clock.
    """
    if device.type == "cuda":
        for _ in range(_GPU_WARMUP_CALLS):
            fn()
        events = []
        for _ in range(_GPU_TIMED_CALLS):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3
    times: list[float] = []
    while len(times) < _CPU_MAX_CALLS and (
        len(times) < _CPU_MIN_CALLS or sum(times) < _CPU_TIME_BUDGET_S
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _graph_time_per_call(fn: Callable[[], None], device: torch.device) -> float:
    """Median device seconds per call of ``fn`` replayed from a CUDA graph.

    The eager time per call is mostly host launch cost at demo sizes (H200: ~100 us
    per eager call for a 2.2 us kernel), so the graph shows what the merge itself
    costs on the GPU. ``fn`` has already run eagerly (compiled, warmed up).
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(_GRAPH_CALLS):
            fn()
    graph.replay()
    events = []
    for _ in range(_GRAPH_REPLAYS):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3 / _GRAPH_CALLS


@dataclass
class _Row:
    backend: str
    output: str
    max_abs: float = math.nan
    rel: float = math.nan
    lse: float = math.nan
    eager_s: float = math.nan
    graph_s: float = math.nan
    failures: tuple[str, ...] = ()


def _merge_and_check(
    backend: str,
    batch: CascadeBatch,
    out_dtype: torch.dtype,
    scale: torch.Tensor | None,
    bounds: ErrorBounds,
    graph: bool,
) -> _Row:
    """Merge once into NaN-filled outputs (so an unwritten element fails the check),
    compare with the ground truth, then time further calls. With ``graph`` (a GPU), also
    replay the call from a CUDA graph and check that it writes the eager call's bits."""
    tokens, heads, head_size = batch.reference.shape
    device = batch.reference.device
    row = _Row(backend, _dtype_name(out_dtype))
    nan = float("nan")
    out = torch.full((tokens, heads, head_size), nan, device=device).to(out_dtype)
    out_lse = torch.full((heads, tokens), nan, device=device)

    def call() -> None:
        attnmerge.merge_attn_states(
            out,
            batch.prefix_output,
            batch.prefix_lse,
            batch.suffix_output,
            batch.suffix_lse,
            out_lse,
            prefill_tokens_with_context=batch.tokens_with_prefix,
            output_scale=scale,
            backend=backend,
        )

    call()
    merged = out.float() * scale if scale is not None else out.float()
    diff = merged - batch.reference
    row.max_abs = diff.abs().max().item()
    row.rel = (diff.norm() / batch.reference.norm()).item()
    row.lse = (out_lse - batch.reference_lse).abs().max().item()
    # Written as "not <=" so that a NaN error fails too.
    checks = (
        ("max abs", row.max_abs, bounds.max_abs),
        ("rel", row.rel, bounds.rel),
        ("lse", row.lse, bounds.lse),
    )
    failures = [
        f"{name} err {value:.2e} > {bound:.2e}"
        for name, value, bound in checks
        if not value <= bound
    ]
    # Events and graphs work on the current device: make it the batch's one.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        row.eager_s = _time_per_call(call, device)
        if graph:
            eager_out, eager_lse = out.clone(), out_lse.clone()
            out.zero_()
            out_lse.zero_()
            try:
                row.graph_s = _graph_time_per_call(call, device)
            except Exception as e:  # capture must work (DESIGN.md): a failure is a finding
                failures.append(f"CUDA graph capture failed: {type(e).__name__}: {e}")
            else:
                same = torch.equal(out.view(torch.uint8), eager_out.view(torch.uint8))
                if not (same and torch.equal(out_lse, eager_lse)):
                    failures.append("CUDA graph replay wrote other values than the eager call")
    row.failures = tuple(failures)
    return row


def _format_time(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _print_table(rows: list[_Row], graph: bool) -> None:
    """The result table; the CUDA-graph time column only where graphs were timed."""
    header = ["backend", "output", "max abs err", "rel err", "lse err", "time/call"]
    header += ["in CUDA graph"] if graph else []
    lines = [header]
    for r in rows:
        cells = [r.backend, r.output, f"{r.max_abs:.2e}", f"{r.rel:.2e}", f"{r.lse:.2e}"]
        cells += [_format_time(r.eager_s)] + ([_format_time(r.graph_s)] if graph else [])
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    checks = ["check"] + ["FAIL: " + "; ".join(r.failures) if r.failures else "ok" for r in rows]
    for cells, check in zip(lines, checks, strict=True):
        padded = (x.ljust(w) for x, w in zip(cells, widths, strict=True))
        print("  " + "  ".join(padded), check, sep="  ")


# ---------------------------------------------------------------------------
# Command line.


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"  # how argparse names the type in its error messages
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` options to its subparser."""
    parser.add_argument("--heads", type=_int_at_least(1), default=32, help="query heads H (32)")
    parser.add_argument("--head-size", type=_int_at_least(1), default=128, help="head size D (128)")
    parser.add_argument(
        "--requests",
        type=_int_at_least(2),
        default=6,
        help="requests in the batch (6, at least 2); the last one has no shared prefix",
    )
    parser.add_argument(
        "--query-tokens", type=_int_at_least(1), default=16, help="new tokens per request (16)"
    )
    parser.add_argument(
        "--prefix-len", type=_int_at_least(1), default=1024, help="shared prefix keys (1024)"
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device (default: cuda if a GPU is present, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bf16",
        help="dtype of the partial outputs and of the unquantised merge (bf16)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")


def _pick_device(name: str | None) -> tuple[torch.device, str | None]:
    """The demo's device (default: the first GPU if any, else the CPU), or why not."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name is None:
        return torch.device("cuda" if cuda_count else "cpu"), None
    try:
        device = torch.device(name)
    except RuntimeError as e:
        return torch.device("cpu"), f"bad --device {name!r}: {e}"
    if device.type == "cpu":
        return device, None
    if device.type != "cuda":
        return device, f"--device must be cpu or cuda[:N], got {name!r}"
    if not cuda_count or (device.index or 0) >= cuda_count:
        return device, f"--device {name}: no such CUDA device (found {cuda_count})"
    return device, None


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 if every backend's merge is within bounds, 1 if not, 2 on bad use."""
    device, problem = _pick_device(args.device)
    if problem:
        print(f"attnmerge demo: {problem}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    _prepare_triton(device)

    t0 = time.perf_counter()
    batch = make_cascade_batch(
        requests=args.requests,
        query_tokens=args.query_tokens,
        prefix_len=args.prefix_len,
        heads=args.heads,
        head_size=args.head_size,
        dtype=dtype,
        device=device,
        seed=args.seed,
    )
    setup_s = time.perf_counter() - t0
    tokens = batch.reference.shape[0]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"attnmerge {attnmerge.__version__} demo: cascade attention on {device} ({where})")
    print(
        f"  {args.requests} requests x {args.query_tokens} query tokens = {tokens} tokens, "
        f"H = {args.heads}, D = {args.head_size}, {args.dtype} partials, float32 LSE [H, T] "
        f"(natural log)"
    )
    print(
        f"  shared prefix: {args.prefix_len} keys, seen by {args.requests - 1} of {args.requests} "
        f"requests; suffix keys per request (causal): {list(batch.suffix_lens)}"
    )
    print(
        f"  request {args.requests - 1} has no prefix and comes last: "
        f"prefill_tokens_with_context = {batch.tokens_with_prefix} of {tokens} tokens "
        f"(its prefix rows are NaN garbage)"
    )
    print(f"  partial + one-piece attention in torch float32: {setup_s:.2f} s")

    amax = batch.reference.abs().max().item()
    # Static FP8 calibration on the ground truth: its largest element maps to 448.
    scale = torch.tensor([amax / FP8_E4M3_MAX], dtype=torch.float32, device=device)
    print(f"  FP8 output: static scale = amax(one-piece output) / 448 = {scale.item():.4e}")

    partial_amax = max(
        batch.prefix_output[: batch.tokens_with_prefix].abs().max().item(),
        batch.suffix_output.abs().max().item(),
    )
    outputs = ((dtype, None), (FP8, scale))
    bounds = {out: error_bounds(dtype, out, partial_amax) for out, _ in outputs}
    for out, b in bounds.items():
        print(
            f"  bounds into {_dtype_name(out)}: rel err <= {b.rel:.2e}, "
            f"max abs err <= {b.max_abs:.2e}, lse err <= {b.lse:.0e}"
        )

    # Kernels run by the interpreter (TRITON_INTERPRET=1 on a GPU machine) cannot be
    # captured: it copies tensors to the host.
    graph = device.type == "cuda" and not triton_backend.interpreting()
    status = dispatch.backend_status(device)
    rows: list[_Row] = []
    errors: list[str] = []
    for backend in dispatch.AUTO_ORDER:
        reason = status[backend]
        if reason is not None:
            print(f"  {backend}: not run: {reason}")
            continue
        if backend == "triton" and triton_backend.interpreting():
            print(
                "  triton: runs in Triton's slow CPU interpreter (TRITON_INTERPRET=1); its "
                "times say nothing about GPU speed"
            )
        for out_dtype, out_scale in outputs:
            try:
                rows.append(
                    _merge_and_check(backend, batch, out_dtype, out_scale, bounds[out_dtype], graph)
                )
            except attnmerge.BackendError as e:  # e.g. FP8 on a GPU older than sm_89
                print(f"  {backend}: not run into {_dtype_name(out_dtype)}: {e}")
            except Exception as e:  # a crashing backend is a failed check, not a crash
                traceback.print_exc()
                errors.append(f"{backend} into {_dtype_name(out_dtype)}: {type(e).__name__}: {e}")

    print("\nerrors vs the one-piece attention (FP8 dequantised):")
    if device.type == "cuda":
        print(
            f"  time/call: CUDA events around each eager call, median of {_GPU_TIMED_CALLS} "
            f"(host launch cost included)"
        )
    else:
        print(f"  time/call: wall clock, median of {_CPU_MIN_CALLS} to {_CPU_MAX_CALLS} calls")
    if graph:
        print(
            f"  in CUDA graph: {_GRAPH_CALLS} calls captured in one graph, median of "
            f"{_GRAPH_REPLAYS} replays, per call (device time only)"
        )
    _print_table(rows, graph=graph)
    for e in errors:
        print(f"  ERROR {e}")
    failed = bool(errors) or any(r.failures for r in rows)
    print("\nresult: FAIL" if failed else "\nresult: ok, every merge is within its bounds")
    return 1 if failed else 0
