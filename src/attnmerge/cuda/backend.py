"""The ``cuda`` backend: picks a kernel instance, builds it on first use, launches it.

Each kernel instance (partial dtypes, output dtype, vector width, threads per row, rows
per team of threads, weights mode, data threads per block, whether it writes the output
LSE: :data:`Instance`) is
compiled by NVRTC for the device's architecture on first use and kept in the disk cache
(:mod:`.cache`; key: attnmerge version, source hash, instance, architecture, NVRTC
version), then loaded through the driver API (:mod:`.driver`). ``attnmerge build``
fills the cache ahead of time.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import struct
from importlib import resources
from typing import Any

import torch

from . import cache, driver, nvrtc

__all__ = [
    "Instance",
    "arch_of",
    "block_threads",
    "build_instance",
    "clear_caches",
    "common_instances",
    "data_threads",
    "head_major_rows",
    "instance_for",
    "launch_arguments",
    "merge_two_states",
    "prepare",
    "rows_per_team",
    "template_arguments",
    "unavailable_reason",
    "vector_width",
]

_MAX_ROWS = 2**31 - 1  # row indices are 32-bit in the kernel
_MAX_STRIDE = 2**32  # strides (in elements) are 32-bit kernel parameters

# Block shape, as in the kernel source: up to DATA_THREADS threads move row data (in teams
# of up to DATA_THREADS; see data_threads), and with WEIGHTS_WARP one more warp computes
# the weights.
DATA_THREADS = 128
WEIGHT_THREADS = 32
#: Where a row's weights are computed (the kernel's WEIGHTS): by every thread of the
#: row's team (the default), or by a separate warp of the block that shares them through
#: shared memory (a tuning variant: ``attnmerge bench --cuda-weight-warp`` times it).
WEIGHTS_WARP, WEIGHTS_PER_THREAD = 0, 1
#: Bytes of the widest input a thread reads per row chunk: 32 (two 16-byte accesses, and
#: 16-byte FP8 stores), falling back to 16 where the head size is not a multiple of 32
#: bytes' worth of elements. 8 and 16 are variants ``attnmerge bench --cuda-chunk-bytes``
#: can time.
#:
#: The default (32-byte chunks, weights per thread, one row per team) was chosen from the
#: variants grid on an H200 (D = 128, FP8 out, CUDA-graph median us; every combination of
#: 8/16/32-byte chunks, weight warp or weights per thread, 1/2/4 rows per team, over
#: vLLM's 36 shapes in bf16 and fp32; docs/performance.md):
#:
#:   shape               32 B, per thread   16 B, weight warp (before)   Triton
#:   bf16 1 x 128        1.89               1.97                          1.65
#:   bf16 256 x 128      5.70               6.16                          5.02
#:   bf16 4096 x 128     78.84              81.24                         78.85
#:   fp32 4096 x 128     137.89             139.91                        137.83
#:
#: Geometric mean over the grid, relative to the Triton kernel: 1.13 (before 1.19; the
#: best variant of every shape, an oracle, would give 1.09).
WEIGHTS = WEIGHTS_PER_THREAD
CHUNK_BYTES = 32
#: Small grids take smaller chunks: {(widest partial's bytes, whether the output LSE is
#: written): ((at most this many rows, chunk bytes), ...)}, the first tier that holds the
#: grid. There every thread's combine is on the critical path of a latency-bound grid,
#: and half the elements per thread shortens it. On an H200 (D = 128, FP8 out,
#: small-variants grid, docs/performance.md), 16-byte chunks took bf16 1 x 32 from 1.55
#: to 1.45 us, 16 x 32 from 1.64 to 1.55 and 64 x 128 from 2.59 to 2.52, and lost from
#: 32768 rows (256 x 128: 5.43 vs 4.24); with fp32 partials, 8-byte chunks took 1 x 8
#: from 1.55 to 1.41 and 1 x 128 from 1.59 to 1.52, and 16-byte chunks (with the
#: 128-byte parameter struct, git 03625c9) took 16 x 32 from 1.56 to 1.46, 16 x 128 from
#: 1.87 to 1.80 and 64 x 64 from 2.23 to 2.09 (today's kernel ties at 64 x 64, below, so
#: that tier ends at 2048 rows). Writing the output LSE moves the ends of
#: the small-chunk tiers down: the lanes of a row's team wait at a barrier before its
#: output LSE is stored, and smaller chunks make wider teams. Same runs, H200, 16- against
#: 32-byte chunks: fp32 with the output LSE at 2048 rows 1.73 against 1.76 to 1.79 us,
#: at 4096 rows 2.24 to 2.26 against 2.15 to 2.17 (five shapes), at 8192 3.16 to 3.21
#: against 2.66 to 2.68, and without it tied at 4096 rows (1.97 to 2.02 against 1.98 to
#: 2.01) and 2.67 against 2.50 at 8192; bf16 with the output LSE at 8192 rows 2.39 to
#: 2.44 against 2.31 to 2.35, tied at 4096 (1.88 against 1.90), and without it at 8192
#: 2.07 against 2.19 to 2.21. fp32 with the output LSE up to 256 rows takes no 8-byte
#: chunks (teams of two warps, which meet at a block barrier): 16-byte ones took 1 x 4
#: 1.26 against 1.35 us, 1 x 128 1.34 against 1.46, 16 x 16 1.36 against 1.54.
SMALL_GRID_CHUNKS = {
    (2, False): ((8192, 16),),
    (2, True): ((4096, 16),),
    (4, False): ((256, 8), (2048, 16)),
    (4, True): ((2048, 16),),
}
#: Output bytes a thread stores per row chunk, at most: chunks are capped so that their
#: output is one 16-byte store, and a warp's store instruction writes one contiguous
#: span (whole 32-byte sectors). A thread's two 16-byte stores of a 32-byte output chunk
#: each cover every other 16 bytes of the warp's span. On an H200 (D = 128, output in the
#: partials' dtype, same run) 16-byte chunks instead of 32 took bf16 256 x 128 from 5.83
#: to 4.63 us, 4096 x 128 from 96.20 to 94.32, and fp32 256 x 128 from 13.96 to 12.21,
#: 4096 x 128 from 196.77 to 186.00 (vLLM's CUDA kernel 4.86 / 99.18 / 12.99 / 188.40);
#: up to 8192 rows, where these grids take 16-byte chunks anyway, within 0.04 us.
MAX_STORE_BYTES = 16


def chunk_bytes_for(num_rows: int, widest: int, out_size: int = 1, write_lse: bool = False) -> int:
    """Chunk bytes for a grid of ``num_rows`` rows whose widest partial has ``widest``-byte
    elements, into ``out_size``-byte outputs (1: FP8), writing the output LSE or not:
    :data:`SMALL_GRID_CHUNKS`, else :data:`CHUNK_BYTES`, capped at
    :data:`MAX_STORE_BYTES` of output."""
    chunk = CHUNK_BYTES
    for last_row, tier_chunk in SMALL_GRID_CHUNKS.get((widest, write_lse), ()):
        if num_rows <= last_row:
            chunk = tier_chunk
            break
    return min(chunk, MAX_STORE_BYTES * widest // out_size)


def block_threads(weights: int, threads: int = DATA_THREADS) -> int:
    """Threads per block of a kernel instance with ``threads`` data threads
    (block_threads in the kernel source)."""
    return threads + (WEIGHT_THREADS if weights == WEIGHTS_WARP else 0)


KERNEL_NAME = "attnmerge_merge_two"

# Kernel element types by torch dtype (names of the C++ tag structs).
_ELEMENT = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "FP8E4M3",
}

# MergeParams: 6 pointers, 16 uint32, then the output LSE's pointer and 2 uint32 (128
# bytes; the kernel source says why it is this small). Sizes and strides are 32-bit:
# packing a stride of 2^32 elements or more fails (see launch_arguments).
_PARAMS = struct.Struct("<6Q16IQ2I")
assert _PARAMS.size == 128


@functools.cache
def source() -> str:
    return resources.files("attnmerge.cuda").joinpath("csrc/merge_attn_states.cuh").read_text()


@functools.cache
def _source_hash() -> str:
    return hashlib.sha256(source().encode()).hexdigest()[:16]


def arch_of(capability: tuple[int, int]) -> str:
    """The SASS target for a compute capability: the 'a' variant where one exists."""
    major, minor = capability
    suffix = "a" if (major, minor) in ((9, 0), (10, 0), (10, 3), (12, 0)) else ""
    return f"sm_{major}{minor}{suffix}"


def unavailable_reason() -> str | None:
    """None if the backend can build and launch kernels here, else why not."""
    reason = nvrtc.unavailable_reason()
    if reason is not None:
        return reason
    return driver.unavailable_reason()


#: A kernel instance: prefix, suffix and output element types (names of the kernel's
#: tag structs), elements per access, threads per row, rows per team, weights mode, data
#: threads per block, whether it writes the output LSE and whether its LSEs are in base 2
#: (0 or 1 each: template arguments, so that a call runs no code for the cases it is not;
#: see the kernel source).
Instance = tuple[str, str, str, int, int, int, int, int, int, int]


def template_arguments(instance: Instance) -> str:
    """The C++ template arguments of merge_two_rows for one kernel instance."""
    p, s, o, vec, team, rows, weights, threads, write_lse, base_2 = instance
    flags = ", ".join("true" if flag else "false" for flag in (write_lse, base_2))
    return (
        f"attnmerge::{p}, attnmerge::{s}, attnmerge::{o}, {vec}, {team}, {rows}, {weights}, "
        f"{threads}, {flags}"
    )


def build_instance(instance: Instance, arch: str) -> bytes:
    """The cubin of one kernel instance for ``arch``, from the cache or built now."""
    from .. import __version__

    key = {
        "attnmerge": __version__,
        "source": _source_hash(),
        "instance": ",".join(map(str, instance)),
        "arch": arch,
        "nvrtc": ".".join(map(str, nvrtc.version())),
    }
    template_args = template_arguments(instance)

    def build() -> bytes:
        text = f"#define ATTNMERGE_MERGE_TWO_INSTANCE {template_args}\n" + source()
        return nvrtc.compile_cubin(text, name="merge_attn_states.cu", arch=arch).cubin

    return cache.cached_build(
        "merge_two", key, build, describe=f"CUDA merge kernel <{template_args}> for {arch}"
    )


@functools.cache
def _kernel(device_index: int, instance: Instance) -> driver.Kernel:
    arch = arch_of(torch.cuda.get_device_capability(device_index))
    cubin = build_instance(instance, arch)
    return driver.load_kernel(
        cubin, KERNEL_NAME, device_index, block_threads(instance[6], instance[7])
    )


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


#: Rows per thread team, by grid size (tokens x heads). More rows put more loads in
#: flight per thread, at the cost of registers. With 32-byte chunks and weights per
#: thread, one row is within 3% of the best of 1, 2 and 4 at every shape of the variants
#: grid on an H200 (bf16 4096 x 128: 78.84 / 81.66 / 92.82 us), so every grid takes
#: ROWS_SMALL; the thresholds stay so that tuning runs (and the tests) can switch the
#: other row counts on.
ROWS_SMALL, ROWS_MEDIUM, ROWS_LARGE = 1, 2, 4
SMALL_GRID_ROWS = _MAX_ROWS  # at most this many rows: ROWS_SMALL
LARGE_GRID_ROWS = _MAX_ROWS  # more than this many rows: ROWS_LARGE


def rows_per_team(num_rows: int) -> int:
    """Rows each team of threads merges, for a grid of ``num_rows`` (token, head) rows."""
    if num_rows <= SMALL_GRID_ROWS:
        return ROWS_SMALL
    return ROWS_MEDIUM if num_rows <= LARGE_GRID_ROWS else ROWS_LARGE


#: Data threads per block, by grid size: blocks of DATA_THREADS, except that grids of at
#: most SMALL_BLOCK_GRID_ROWS rows take blocks of SMALL_BLOCK_THREADS (at least one team),
#: which spreads a small grid over more SMs (0: never).
SMALL_BLOCK_GRID_ROWS = 0
SMALL_BLOCK_THREADS = 32


def data_threads(num_rows: int) -> int:
    """Data threads per block asked for a grid of ``num_rows`` rows (a block holds at
    least one team, whatever this says: see :func:`instance_for`)."""
    return SMALL_BLOCK_THREADS if num_rows <= SMALL_BLOCK_GRID_ROWS else DATA_THREADS


def instance_for(
    prefix_dtype: torch.dtype,
    suffix_dtype: torch.dtype,
    out_dtype: torch.dtype,
    head_size: int,
    vec: int,
    rows: int = ROWS_SMALL,
    weights: int | None = None,
    threads: int = DATA_THREADS,
    write_lse: bool = False,
    lse_base_2: bool = False,
) -> Instance:
    """The kernel instance serving these dtypes and head size at vector width ``vec``
    with ``rows`` rows per team of threads, the given weights mode and ``threads`` data
    threads per block (rounded up to one team, at most DATA_THREADS), writing the output
    LSE or not, for LSEs in base 2 or base e.

    The scalar fallback (``vec`` 1: misaligned or odd-sized rows, rare) always takes one
    row per team: with more, its registers spill on sm_100a.
    """
    if vec == 1:
        rows = 1
    weights = WEIGHTS if weights is None else weights
    team = min(_next_pow2(-(-head_size // vec)), DATA_THREADS)
    threads = min(max(_next_pow2(threads), team), DATA_THREADS)
    elements = (_ELEMENT[prefix_dtype], _ELEMENT[suffix_dtype], _ELEMENT[out_dtype])
    return (*elements, vec, team, rows, weights, threads, int(write_lse), int(lse_base_2))


#: Head sizes ``attnmerge build`` prepares by default (MLA and common attention heads).
COMMON_HEAD_SIZES = (64, 80, 96, 128, 192, 256, 512)


@functools.cache  # on the eager path: 0.07 instead of 0.38 us per call on the CI host
def vector_width(head_size: int, widest: int, chunk_bytes: int) -> int:
    """Elements per access for rows of ``head_size`` elements of ``widest`` bytes at most:
    ``chunk_bytes`` worth (the launcher passes :data:`CHUNK_BYTES`), else 16 bytes' worth,
    whichever first divides the head size; 1 (scalar accesses) if neither does."""
    for nbytes in dict.fromkeys((chunk_bytes, min(chunk_bytes, 16))):
        vec = max(1, nbytes // widest)
        if head_size % vec == 0:
            return vec
    return 1


def _grid_sizes(widest: int, write_lse: bool) -> list[int]:
    """One grid size (rows) from each range over which the grid rules (rows per team,
    data threads, chunk bytes) stay the same."""
    last = (SMALL_BLOCK_GRID_ROWS, SMALL_GRID_ROWS, LARGE_GRID_ROWS)
    last += tuple(last_row for last_row, _ in SMALL_GRID_CHUNKS.get((widest, write_lse), ()))
    return sorted({1} | {n + 1 for n in last if 1 <= n + 1 <= _MAX_ROWS})


def _grid_layouts(
    widest: int = 2, out_size: int = 1, write_lse: bool = False
) -> list[tuple[int, int, int]]:
    """The (chunk bytes, rows per team, data threads per block) that
    :func:`chunk_bytes_for`, :func:`rows_per_team` and :func:`data_threads` can return
    over every grid size, for partials of ``widest`` bytes into ``out_size``-byte
    outputs, writing the output LSE or not."""
    return list(
        dict.fromkeys(
            (chunk_bytes_for(n, widest, out_size, write_lse), rows_per_team(n), data_threads(n))
            for n in _grid_sizes(widest, write_lse)
        )
    )


def _variants(
    head_size: int, widest: int, out_size: int, write_lse: bool
) -> list[tuple[int, int, int]]:
    """(vector width, rows per team, data threads) a call signature can need: vector or
    scalar accesses (alignment is a property of each call's tensors), and every grid
    size."""
    found = []
    for chunk, rows, threads in _grid_layouts(widest, out_size, write_lse):
        vec = vector_width(head_size, widest, chunk)
        if vec > 1:
            found.append((vec, rows, threads))
        found.append((1, 1, threads))  # the scalar fallback takes one row per team
    return list(dict.fromkeys(found))


_PARTIAL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OUTPUT_DTYPES = (*_PARTIAL_DTYPES, torch.float8_e4m3fn)


def common_instances(head_sizes=COMMON_HEAD_SIZES, mixed_dtypes: bool = False) -> list[Instance]:
    """Instances for fp32/fp16/bf16 partials into every output dtype, with and without
    the output LSE, in both LSE bases, for every variant a call can need: same-dtype
    partials only, or with ``mixed_dtypes`` every pair."""
    pairs = [(p, s) for p in _PARTIAL_DTYPES for s in _PARTIAL_DTYPES if mixed_dtypes or p == s]
    found = {}
    flags = list(itertools.product((False, True), repeat=2))  # output LSE, base 2
    for (p, s), out, head_size in itertools.product(pairs, _OUTPUT_DTYPES, head_sizes):
        widest = max(p.itemsize, s.itemsize)
        for lse, base_2 in flags:
            for v, r, t in _variants(head_size, widest, out.itemsize, lse):
                instance = instance_for(p, s, out, head_size, v, r, WEIGHTS, t, lse, base_2)
                found.setdefault(instance)
    return list(found)


def prepare(
    device_index: int,
    prefix_dtype: torch.dtype,
    suffix_dtype: torch.dtype,
    out_dtype: torch.dtype,
    head_size: int,
    write_lse: bool,
    lse_base_2: bool,
) -> None:
    """Build (or load) and load every kernel instance a call signature (dtypes, head
    size, output LSE or not, LSE base) can need, so that a failing build shows at backend
    selection, not mid-call.

    Raises:
        nvrtc.BuildError, driver.DriverError: with the compiler's or driver's message.
    """
    if head_size == 0:
        return
    widest = max(prefix_dtype.itemsize, suffix_dtype.itemsize)
    for v, r, t in _variants(head_size, widest, out_dtype.itemsize, write_lse):
        _launcher(
            device_index, prefix_dtype, suffix_dtype, out_dtype, head_size, v, r, WEIGHTS, t,
            write_lse, lse_base_2,
        )  # fmt: skip


@functools.cache
def _launcher(
    device_index: int,
    prefix_dtype: torch.dtype,
    suffix_dtype: torch.dtype,
    out_dtype: torch.dtype,
    head_size: int,
    vec: int,
    rows: int,
    weights: int,
    threads: int,
    write_lse: bool,
    lse_base_2: bool,
) -> tuple[driver.Kernel, int]:
    """The loaded kernel of one call variant and the rows each of its blocks merges."""
    instance = instance_for(
        prefix_dtype, suffix_dtype, out_dtype, head_size, vec, rows, weights, threads,
        write_lse, lse_base_2,
    )  # fmt: skip
    team, rows, threads = instance[4], instance[5], instance[7]
    return _kernel(device_index, instance), threads // team * rows


def clear_caches() -> None:
    """Forget loaded kernels and launchers (tests that swap the build or the driver)."""
    _launcher.cache_clear()
    _kernel.cache_clear()


def _aligned(ptr: int, strides: tuple[int, ...], itemsize: int, vec: int) -> bool:
    """Whether every row chunk of a tensor is aligned for ``vec``-element accesses."""
    align = min(16, vec * itemsize)
    return not (ptr % align or (strides[0] * itemsize) % align or (strides[1] * itemsize) % align)


# Resolved once: torch.cuda.current_device() and friends cost a microsecond or more each
# on the eager path. Absent on CPU-only builds of torch, where this backend never runs.
_current_device = getattr(torch._C, "_cuda_getDevice", None)
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def merge_two_states(*args: Any, **tuning: int | None) -> None:
    """Launch the merge on the current stream. Arguments must already be validated; they
    are those of :func:`launch_arguments` (the tuning keywords override
    :func:`rows_per_team`, :func:`chunk_bytes_for`, :data:`WEIGHTS`, :func:`data_threads`
    and :func:`head_major_rows`)."""
    launch = launch_arguments(*args, **tuning)
    if launch is None:
        return
    kernel, grid, params = launch
    device_index = kernel.device_index
    stream = _current_raw_stream(device_index)
    if _current_device() == device_index:
        kernel.launch(grid, stream, params)
    else:  # the launch uses the current context: make it the tensors' device's
        with torch.cuda.device(device_index):
            kernel.launch(grid, stream, params)


def _size_one_strides_zeroed(t: torch.Tensor) -> torch.Tensor:
    return t.as_strided(
        t.shape, [st if n > 1 else 0 for n, st in zip(t.shape, t.stride(), strict=True)]
    )


def row_divisor(n: int) -> tuple[int, int]:
    """(multiplier, shift) with which the kernel divides a row index below 2^31 by ``n``,
    the rows' inner count (``token_of`` in the kernel source, which has the proof)."""
    log2_ceil = (n - 1).bit_length()
    return -(-(1 << (31 + log2_ceil)) // n), log2_ceil


# The head count is per model: cached for good. The token count (head-major rows) changes
# with every batch: a bounded cache (the division by it costs ~0.2 us of host time).
head_divisor = functools.cache(row_divisor)
token_divisor = functools.lru_cache(maxsize=4096)(row_divisor)


# Head-major rows only while one partial holds at most this many bytes (see
# head_major_rows).
HEAD_MAJOR_MAX_PARTIAL_BYTES = 16 << 20


def head_major_rows(
    output_lse_token_stride: int | None,
    num_tokens: int,
    num_heads: int,
    prefill_tokens_with_context: int | None,
    partial_bytes: int,
) -> bool:
    """Whether a call's rows go to the kernel in head-major order (row = head x T +
    token) rather than token-major (token x H + head). ``output_lse_token_stride`` is
    the output LSE's stride along tokens (None: no output LSE), ``partial_bytes`` the
    size of the wider partial (T x H x D x its element size); plain numbers, because the
    launcher has them at hand and the eager call path is host-bound.

    The kernel's thread teams take consecutive rows, and a block's output LSEs are one
    4-byte store per row. In vLLM's ``[H, T]`` LSE layout, token-major rows put each of
    those stores in its own 32-byte sector; head-major rows make a block's LSEs
    contiguous. Every other access is a whole row either way, but head-major rows are a
    token stride apart in memory, which costs once the partials stream from HBM. On an
    H200 (-> FP8 with the output LSE, D = 128, scripts/row_order_cost.py, bit-identical
    outputs, one run) head-major rows took bf16 64 x 32 from 1.80 to 1.62 us, 64 x 128
    from 2.45 to 2.40, 256 x 16 from 2.05 to 1.88, 1024 x 64 (16 MiB a partial) from
    8.86 to 8.59, fp32 64 x 8 from 1.62 to 1.49; but bf16 1024 x 128 (32 MiB) from
    21.83 to 22.14, 4096 x 128 from 80.14 to 84.46, fp32 1024 x 128 from 36.53 to 37.69
    and 4096 x 128 from 139.35 to 143.84 (at some large shapes this measurement varies by
    up to 6% between two launches of the same kernel; docs/performance.md). Without the
    output LSE the order made no difference at small shapes (within 0.02 us). So: with
    an output LSE stored contiguously along tokens, more than one token and head,
    partials of at most HEAD_MAJOR_MAX_PARTIAL_BYTES each, and a prefix either on every
    token or on none (the kernel tests the prefix on the row index, and P x H rows are a
    row range only in token-major order).
    """
    with_prefix = prefill_tokens_with_context
    return (
        output_lse_token_stride == 1
        and num_tokens > 1
        and num_heads > 1
        and partial_bytes <= HEAD_MAJOR_MAX_PARTIAL_BYTES
        and (with_prefix is None or with_prefix in (0, num_tokens))
    )


def launch_arguments(
    output: torch.Tensor,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    output_lse: torch.Tensor | None,
    prefill_tokens_with_context: int | None,
    output_scale: torch.Tensor | None,
    lse_base_2: bool,
    rows: int | None = None,
    chunk_bytes: int | None = None,
    weights: int | None = None,
    threads: int | None = None,
    head_major: bool | None = None,
) -> tuple[driver.Kernel, int, bytes] | None:
    """The kernel, grid size and packed parameters of one merge (None: nothing to do).
    Separate from the launch so that ``attnmerge bench`` can time the two apart.

    For tuning, ``rows`` (rows per thread team) overrides :func:`rows_per_team`,
    ``chunk_bytes`` :func:`chunk_bytes_for`, ``weights`` :data:`WEIGHTS`, ``threads``
    (data threads per block) :func:`data_threads` and ``head_major`` (the row order; it
    needs a prefix on every token or none) :func:`head_major_rows`.
    """
    num_tokens, num_heads, head_size = output.shape
    num_rows = num_tokens * num_heads
    if num_rows == 0 or head_size == 0:
        return None
    if num_rows > _MAX_ROWS:
        raise ValueError(f"cuda backend: tokens x heads = {num_rows} exceeds {_MAX_ROWS} rows")
    out_ptr, pre_ptr, suf_ptr = (
        output.data_ptr(),
        prefix_output.data_ptr(),
        suffix_output.data_ptr(),
    )
    out_st, pre_st, suf_st = output.stride(), prefix_output.stride(), suffix_output.stride()
    pre_size, suf_size = prefix_output.itemsize, suffix_output.itemsize
    widest = max(pre_size, suf_size)
    chunk = (
        chunk_bytes_for(num_rows, widest, output.itemsize, output_lse is not None)
        if chunk_bytes is None
        else chunk_bytes
    )
    vec = vector_width(head_size, widest, chunk)
    if vec > 1 and not (
        _aligned(out_ptr, out_st, output.itemsize, vec)
        and _aligned(pre_ptr, pre_st, pre_size, vec)
        and _aligned(suf_ptr, suf_st, suf_size, vec)
    ):
        vec = 1  # scalar accesses for misaligned rows
    device_index = output.device.index
    kernel, rows_per_block = _launcher(
        device_index,
        prefix_output.dtype,
        suffix_output.dtype,
        output.dtype,
        head_size,
        vec,
        rows_per_team(num_rows) if rows is None else rows,
        WEIGHTS if weights is None else weights,
        data_threads(num_rows) if threads is None else threads,
        output_lse is not None,
        lse_base_2,
    )
    lse_out = output_lse if output_lse is not None else suffix_lse  # not written then
    pl_st, sl_st, ol_st = prefix_lse.stride(), suffix_lse.stride(), lse_out.stride()
    # rows with a prefix (P x H <= num_rows: the API checks 0 <= P <= T)
    P = prefill_tokens_with_context
    rows_with_prefix = num_rows if P is None else P * num_heads
    if head_major is None:
        head_major = head_major_rows(
            ol_st[1] if output_lse is not None else None,
            num_tokens,
            num_heads,
            P,
            num_rows * head_size * widest,
        )
    # The kernel splits a row into an outer and an inner index by the inner count (H,
    # token-major) and addresses the outer index with each tensor's token stride and the
    # inner one with its head stride. Head-major: T is the inner count and every tensor's
    # token and head strides trade places (o, i: which of a tensor's first two strides
    # fills its first and its second field), so the same code walks the rows head by head.
    if head_major:
        if not (P is None or P in (0, num_tokens)):
            raise ValueError("head-major rows need a prefix on every token or on none")
        inner, (multiplier, shift) = num_tokens, token_divisor(num_tokens)
        o, i = 1, 0
    else:
        inner, (multiplier, shift) = num_heads, head_divisor(num_heads)
        o, i = 0, 1
    try:
        params = _PARAMS.pack(
            out_ptr,
            pre_ptr,
            prefix_lse.data_ptr(),
            suf_ptr,
            suffix_lse.data_ptr(),
            output_scale.data_ptr() if output_scale is not None else 0,
            num_rows,
            inner,
            head_size,
            rows_with_prefix,
            multiplier,
            shift,
            out_st[o],
            out_st[i],
            pre_st[o],
            pre_st[i],
            suf_st[o],
            suf_st[i],
            pl_st[o],
            pl_st[i],
            sl_st[o],
            sl_st[i],
            output_lse.data_ptr() if output_lse is not None else 0,
            ol_st[o],
            ol_st[i],
        )
    except struct.error:  # a value past 32 bits: only a stride can be (rows are checked)
        named = {"output": output, "prefix_output": prefix_output, "prefix_lse": prefix_lse}
        named |= {"suffix_output": suffix_output, "suffix_lse": suffix_lse}
        if output_lse is not None:
            named["output_lse"] = output_lse
        for name, t in named.items():
            if any(n > 1 and st >= _MAX_STRIDE for n, st in zip(t.shape, t.stride(), strict=True)):
                raise ValueError(
                    f"cuda backend: {name} has strides {tuple(t.stride())}; the kernel takes "
                    f"strides below 2^32 elements (backend='triton' takes any)"
                ) from None
        # Only dimensions of size 1 have such strides, and they address nothing: the
        # same call with those strides 0 (views of the same memory, aliasing kept).
        zeroed = [_size_one_strides_zeroed(t) for t in named.values()]
        if output_lse is None:
            zeroed.append(None)
        return launch_arguments(
            *zeroed[:5], zeroed[5], prefill_tokens_with_context, output_scale, lse_base_2,
            rows, chunk_bytes, weights, threads, head_major,
        )  # fmt: skip
    return kernel, -(-num_rows // rows_per_block), params
