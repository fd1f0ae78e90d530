"""The ``cuda`` backend's launcher: picks a kernel, builds it on first use, launches it.

A kernel is described by a :class:`KernelConfig` (partial element types, the output
format's epilogue, vector width, threads per row, output LSE or not, LSE base, amax or
not). It is
compiled by NVRTC for the device's architecture on first use and kept in the disk cache
(:mod:`.cache`; key: attnmerge version, source hash, configuration, architecture, NVRTC
version), then loaded through the driver API (:mod:`.driver`). ``attnmerge build`` fills
the cache ahead of time. Tiling choices and their measurements: docs/cuda-backend.md.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import struct
from importlib import resources
from typing import NamedTuple

import torch

from ..call import CallSignature, MergeCall, PartialLayout
from ..formats import (
    FLOAT_DTYPES,
    FormatKey,
    FP8PerToken,
    FP8PerTokenGroup,
    FP8Static,
    OutputFormat,
    Plain,
    spans_whole_heads,
)
from ..version import __version__
from . import cache, driver, nvrtc
from .params import ParamBlock

__all__ = [
    "TOKEN_TILE_EPILOGUES",
    "KernelConfig",
    "Launch",
    "PartialsKernelConfig",
    "arch_of",
    "build_kernel",
    "chunk_bytes_for",
    "common_configs",
    "config_for",
    "head_major_rows",
    "launch_arguments",
    "partials_config_for",
    "partials_launch_arguments",
    "prepare",
    "row_divisor",
    "run",
    "unavailable_reason",
    "vector_width",
]

_MAX_ROWS = 2**31 - 1  # row indices are 32-bit in the kernel
_MAX_STRIDE = 2**32  # strides (in elements) are 32-bit kernel parameters

#: Threads per block (kBlockThreads in the kernel source), in teams of one row each.
BLOCK_THREADS = 128
#: Token-tile kernels (a block stores one whole token, for stores whose scale is per token):
#: block sizes, and the values of its token each thread keeps in registers
#: (kTokenTileValues in csrc/merge.cuh). A call takes the smallest block that holds its
#: H * D values, else the largest, which merges the values past it twice.
TOKEN_TILE_THREADS = (128, 256, 512)
TOKEN_TILE_VALUES = 32
#: Bytes of the widest partial a token-tile thread reads per chunk.
TOKEN_TILE_CHUNK_BYTES = 16
#: The stores the token-tile kernels serve (OutputFormat.cuda_epilogue of whole-token
#: formats).
TOKEN_TILE_EPILOGUES = frozenset({"FP8TokenStore"})
#: Bytes of the widest partial a thread reads per row chunk: two 16-byte accesses, falling
#: back to 16 where the head size is not a multiple of 32 bytes' worth of elements.
CHUNK_BYTES = 32
#: Small grids take smaller chunks, which shortens every thread's combine on a
#: latency-bound grid: {(widest partial's bytes, output LSE written): ((at most this many
#: rows, chunk bytes), ...)}, the first tier that holds the grid (docs/cuda-backend.md).
SMALL_GRID_CHUNKS = {
    (2, False): ((8192, 16),),
    (2, True): ((4096, 16),),
    (4, False): ((256, 8), (2048, 16)),
    (4, True): ((2048, 16),),
}
#: Output bytes a thread stores per row chunk, at most: one 16-byte store, so that a
#: warp's store instruction writes one contiguous span of whole sectors.
MAX_STORE_BYTES = 16

_SOURCE_FILES = ("merge.cuh", "partials.cuh", "epilogues.cuh", "common.cuh")

# Kernel element types by torch dtype (names of the C++ tag structs).
_ELEMENT = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "FP8E4M3",
}
#: The element types of stores that write scales: per group of columns, per token (Groups,
#: TokenScales in csrc/epilogues.cuh).
_GROUPS = "Groups<"
_TOKEN_SCALES = "TokenScales<"
#: Head sizes ``attnmerge build`` prepares by default (MLA and common attention heads).
COMMON_HEAD_SIZES = (64, 80, 96, 128, 192, 256, 512)


def _takes_scale_layout(config: KernelConfig | PartialsKernelConfig) -> bool:
    """Whether a kernel's parameters are followed by the scales' layout (its store writes
    scales: Store::kWritesScales in csrc/epilogues.cuh): ScaleLayout, or for a token tile
    TokenScaleLayout."""
    return config.output_element.startswith((_GROUPS, _TOKEN_SCALES))


def _block_threads(config: KernelConfig | PartialsKernelConfig) -> int:
    """Threads a block of the kernel has: a token tile's ``team``, else BLOCK_THREADS."""
    return config.team if config.whole_tokens else BLOCK_THREADS


def _rows_per_block(config: KernelConfig | PartialsKernelConfig) -> int:
    """Rows a block of a row-tiled kernel stores (a token tile: all of one token's)."""
    if config.whole_tokens:
        raise ValueError("a token-tile kernel stores one token a block, not a row count")
    return BLOCK_THREADS // config.team


@functools.cache
def sources() -> dict[str, str]:
    """The kernel source files by name (partials.cuh includes merge.cuh, which includes
    the others)."""
    csrc = resources.files("attnmerge.cuda").joinpath("csrc")
    return {name: csrc.joinpath(name).read_text() for name in _SOURCE_FILES}


@functools.cache
def _source_hash() -> str:
    digest = hashlib.sha256()
    for name, text in sources().items():
        digest.update(f"{name}\0{text}\0".encode())
    return digest.hexdigest()[:16]


#: The kernel parameter structs, read from their declarations in csrc/.
PARAMS = ParamBlock(sources()["merge.cuh"], "MergeParams")
PARTIALS_PARAMS = ParamBlock(sources()["partials.cuh"], "PartialsParams")
#: What follows either struct for a store that writes scales and for a kernel that reduces
#: amax, in this order (WithOutputs in csrc/epilogues.cuh).
SCALE_LAYOUT = ParamBlock(sources()["epilogues.cuh"], "ScaleLayout")
TOKEN_SCALE_LAYOUT = ParamBlock(sources()["epilogues.cuh"], "TokenScaleLayout")
AMAX_OUTPUT = ParamBlock(sources()["epilogues.cuh"], "AmaxOutput")


def arch_of(capability: tuple[int, int]) -> str:
    """The SASS target for a compute capability: the 'a' variant where one exists."""
    major, minor = capability
    suffix = "a" if (major, minor) in ((9, 0), (10, 0), (10, 3), (12, 0)) else ""
    return f"sm_{major}{minor}{suffix}"


def unavailable_reason() -> str | None:
    """None if the backend can build and launch kernels here, else why not."""
    return nvrtc.unavailable_reason() or driver.unavailable_reason()


class KernelConfig(NamedTuple):
    """One compiled two-partial kernel: the template arguments of merge_two_rows
    (csrc/merge.cuh).

    Whether the output LSE is written, the LSE base and whether the kernel reduces amax
    are template arguments, so a call runs no code for the cases it is not. A NamedTuple:
    the eager path hashes one per call.
    """

    partial_elements: tuple[str, str]  # C++ element types of the partials
    epilogue: str  # the output format's store functor (OutputFormat.cuda_epilogue)
    output_element: str  # its element type (Groups<...> with a group store's options)
    vec: int  # elements per access
    team: int  # threads per row; a token tile's threads per token (the block)
    write_lse: bool
    lse_base_2: bool
    amax: bool = False  # the format's amax output (a template argument only when set)
    # a token tile: block b stores token b (a whole-token store, TOKEN_TILE_EPILOGUES)
    whole_tokens: bool = False

    source = "merge.cuh"
    instance_macro = "ATTNMERGE_MERGE_INSTANCE"
    kernel_name = "attnmerge_merge"

    def template_arguments(self) -> str:
        elements = ", ".join(f"attnmerge::{e}" for e in self.partial_elements)
        return f"{elements}, {_common_arguments(self)}"

    rows_per_block = property(_rows_per_block)
    block_threads = property(_block_threads)
    takes_scale_layout = property(_takes_scale_layout)


class PartialsKernelConfig(NamedTuple):
    """One compiled kernel for stacked or packed partials: the template arguments of
    merge_partial_rows (csrc/partials.cuh)."""

    partial_element: str  # C++ element type of the partials
    epilogue: str
    output_element: str
    vec: int
    team: int
    write_lse: bool
    lse_base_2: bool
    amax: bool = False
    whole_tokens: bool = False

    source = "partials.cuh"
    instance_macro = "ATTNMERGE_PARTIALS_INSTANCE"
    kernel_name = "attnmerge_merge_partials"

    def template_arguments(self) -> str:
        return f"attnmerge::{self.partial_element}, {_common_arguments(self)}"

    rows_per_block = property(_rows_per_block)
    block_threads = property(_block_threads)
    takes_scale_layout = property(_takes_scale_layout)


def _output_element(output_format: FormatKey, head_size: int) -> str:
    """The element type the format's store is instantiated with: the output dtype's, and
    for FP8PerTokenGroup the group size, the UE8M0 flag and whether the scales are packed
    with it (compile-time options that lead the key's options), and whether token tiles
    store the groups (:func:`groups_in_token_tiles`)."""
    element = _ELEMENT[output_format.dtype]
    if output_format.kind is FP8PerTokenGroup and output_format.options:
        group_size, ue8m0, layout = output_format.options[:3]
        flags = f"{str(ue8m0).lower()}, {str(layout == _PACKED).lower()}"
        if groups_in_token_tiles(output_format, head_size):
            flags += ", true"
        return f"{_GROUPS}attnmerge::{element}, {group_size}, {flags}>"
    if output_format.kind is FP8PerToken:
        bound = "scale_ub" in output_format.options
        return f"{_TOKEN_SCALES}attnmerge::{element}, {str(bound).lower()}>"
    return element


def groups_in_token_tiles(output_format: FormatKey, head_size: int) -> bool:
    """Whether the format's groups span heads of ``head_size`` without being whole heads
    (FP8PerTokenGroup at a head size it does not divide, that is not a power of two
    dividing it): the token-tile kernels store those, where a group is consecutive lanes
    of the block whatever the heads (Groups<..., TILED> in csrc/epilogues.cuh)."""
    if output_format.kind is not FP8PerTokenGroup or not output_format.options:
        return False
    group_size = output_format.options[0]
    return head_size % group_size != 0 and not spans_whole_heads(head_size, group_size)


def whole_tokens(output_format: FormatKey, head_size: int) -> bool:
    """Whether the format's store takes the token-tile kernels (a block a token) at
    ``head_size``: a per-token scale, or groups that span heads unevenly."""
    return output_format.kind.cuda_epilogue in TOKEN_TILE_EPILOGUES or groups_in_token_tiles(
        output_format, head_size
    )


def token_tile_threads(values: int) -> int:
    """The token-tile block size for tokens of ``values`` (H * D) values."""
    for threads in TOKEN_TILE_THREADS:
        if threads * TOKEN_TILE_VALUES >= values:
            return threads
    return TOKEN_TILE_THREADS[-1]


#: The scale layout of FP8PerTokenGroup whose scales are UE8M0 bytes, four to an int32.
_PACKED = "ue8m0_packed"


def _reduces_amax(output_format: FormatKey) -> bool:
    """Whether the format has an amax output (its key's "amax" option)."""
    return "amax" in output_format.options


def _common_arguments(config: KernelConfig | PartialsKernelConfig) -> str:
    """The template arguments after the partials' element types; AMAX (false by default)
    only where set."""
    store = f"attnmerge::{config.epilogue}<attnmerge::{config.output_element}>"
    flags = [config.write_lse, config.lse_base_2] + ([True] if config.amax else [])
    flags_text = ", ".join("true" if flag else "false" for flag in flags)
    return f"{store}, {config.vec}, {config.team}, {flags_text}"


def build_kernel(config: KernelConfig | PartialsKernelConfig, arch: str) -> bytes:
    """The cubin of one kernel for ``arch``, from the cache or built now."""
    template_args = config.template_arguments()
    key = {
        "attnmerge": __version__,
        "source": _source_hash(),
        "kernel": f"{config.kernel_name}<{template_args}>",
        "arch": arch,
        "nvrtc": ".".join(map(str, nvrtc.version())),
    }

    def build() -> bytes:
        files = sources()
        text = f"#define {config.instance_macro} {template_args}\n" + files[config.source]
        headers = {name: text for name, text in files.items() if name != config.source}
        name = config.source.replace(".cuh", ".cu")
        return nvrtc.compile_cubin(text, name=name, arch=arch, headers=headers).cubin

    return cache.cached_build(
        "merge",
        key,
        build,
        describe=f"CUDA kernel {config.kernel_name}<{template_args}> for {arch}",
    )


@functools.cache  # the two config types never compare equal: their first fields differ
def _kernel(device_index: int, config: KernelConfig | PartialsKernelConfig) -> driver.Kernel:
    arch = arch_of(torch.cuda.get_device_capability(device_index))
    cubin = build_kernel(config, arch)
    return driver.load_kernel(cubin, config.kernel_name, device_index, config.block_threads)


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


@functools.cache  # on the eager path: one look-up per call instead of a new config
def config_for(
    partial_dtypes: tuple[torch.dtype, torch.dtype],
    output_format: FormatKey,
    head_size: int,
    vec: int,
    write_lse: bool = False,
    lse_base_2: bool = False,
    token_threads: int = 0,
) -> KernelConfig:
    """The kernel serving these partials, format and head size at vector width ``vec``:
    teams just wide enough to cover the head size in one pass, at most a block; for a
    whole-token store a token tile of ``token_threads`` threads."""
    tile = whole_tokens(output_format, head_size)
    return KernelConfig(
        partial_elements=(_ELEMENT[partial_dtypes[0]], _ELEMENT[partial_dtypes[1]]),
        epilogue=output_format.kind.cuda_epilogue,
        output_element=_output_element(output_format, head_size),
        vec=vec,
        team=(token_threads or TOKEN_TILE_THREADS[0])
        if tile
        else min(_next_pow2(-(-head_size // vec)), BLOCK_THREADS),
        write_lse=write_lse,
        lse_base_2=lse_base_2,
        amax=_reduces_amax(output_format),
        whole_tokens=tile,
    )


def chunk_bytes_for(num_rows: int, widest: int, out_size: int = 1, write_lse: bool = False) -> int:
    """Chunk bytes for a grid of ``num_rows`` rows whose widest partial has ``widest``-byte
    elements, into ``out_size``-byte outputs, writing the output LSE or not."""
    chunk = CHUNK_BYTES
    for last_row, tier_chunk in SMALL_GRID_CHUNKS.get((widest, write_lse), ()):
        if num_rows <= last_row:
            chunk = tier_chunk
            break
    return min(chunk, MAX_STORE_BYTES * widest // out_size)


@functools.cache  # on the eager path
def vector_width(head_size: int, widest: int, chunk_bytes: int) -> int:
    """Elements per access for rows of ``head_size`` elements of ``widest`` bytes at most:
    ``chunk_bytes`` worth, else 16 bytes' worth, whichever first divides the head size; 1
    (scalar accesses) if neither does."""
    for nbytes in dict.fromkeys((chunk_bytes, min(chunk_bytes, 16))):
        vec = max(1, nbytes // widest)
        if head_size % vec == 0:
            return vec
    return 1


def _vector_widths(head_size: int, widest: int, out_size: int, write_lse: bool) -> list[int]:
    """Every vector width a call signature can need: each grid-size tier's, and scalar
    accesses (alignment is a property of each call's tensors)."""
    tiers = [last_row for last_row, _ in SMALL_GRID_CHUNKS.get((widest, write_lse), ())]
    grids = sorted({1} | {n + 1 for n in tiers})
    chunks = dict.fromkeys(chunk_bytes_for(n, widest, out_size, write_lse) for n in grids)
    return list(dict.fromkeys([*(vector_width(head_size, widest, c) for c in chunks), 1]))


@functools.cache  # on the eager path
def partials_config_for(
    partial_dtype: torch.dtype,
    output_format: FormatKey,
    head_size: int,
    vec: int,
    write_lse: bool = False,
    lse_base_2: bool = False,
    token_threads: int = 0,
) -> PartialsKernelConfig:
    """As :func:`config_for`, for stacked or packed partials of ``partial_dtype``."""
    tile = whole_tokens(output_format, head_size)
    return PartialsKernelConfig(
        partial_element=_ELEMENT[partial_dtype],
        epilogue=output_format.kind.cuda_epilogue,
        output_element=_output_element(output_format, head_size),
        vec=vec,
        team=(token_threads or TOKEN_TILE_THREADS[0])
        if tile
        else min(_next_pow2(-(-head_size // vec)), BLOCK_THREADS),
        write_lse=write_lse,
        lse_base_2=lse_base_2,
        amax=_reduces_amax(output_format),
        whole_tokens=tile,
    )


#: Partials whose rows a team of the stacked/packed kernel loads together (B in
#: merge_partial_rows, csrc/partials.cuh, for teams of four lanes or more).
PARTIALS_BATCH = 4
#: Threads a grid of few rows takes at most by sharing each row among teams
#: (merge_partial_rows' split): about half the threads an H100 holds at once.
SPLIT_MAX_THREADS = 1 << 17


def partials_split(num_rows: int, team: int, partials_a_row: int) -> int:
    """Teams that share a row of the stacked/packed kernel (a power of two): one per batch
    of the row's partials, while the grid stays within SPLIT_MAX_THREADS and a block holds
    whole rows. A latency-bound grid then has that many more rows' loads in flight."""
    batches = -(-partials_a_row // min(PARTIALS_BATCH, team, 32))
    split = 1
    while (
        split * 2 <= batches
        and team * split * 2 <= BLOCK_THREADS
        and num_rows * team * split * 2 <= SPLIT_MAX_THREADS
    ):
        split *= 2
    return split


def partials_chunk_bytes(partial_size: int, out_size: int) -> int:
    """Bytes of a partial a thread reads per row chunk in the stacked/packed kernel: one
    16-byte access, less where its output chunk would exceed one 16-byte store."""
    return min(16, MAX_STORE_BYTES * partial_size // out_size)


def _token_tile_configs(signature: CallSignature) -> list[KernelConfig | PartialsKernelConfig]:
    """Every token-tile kernel a signature can need: each block size, at the chunk width
    and scalar (the head count and alignment are the call's), for two separate partials
    or for stacked or packed ones."""
    widest = max(d.itemsize for d in signature.partial_dtypes)
    vec = vector_width(signature.head_size, widest, TOKEN_TILE_CHUNK_BYTES)
    if signature.layout is PartialLayout.SEPARATE:
        config, dtypes = config_for, signature.partial_dtypes
    else:  # stacked or packed partials: one dtype
        config, (dtypes,) = partials_config_for, signature.partial_dtypes
    return [
        config(
            dtypes,
            signature.output_format,
            signature.head_size,
            v,
            signature.write_lse,
            signature.lse_base_2,
            threads,
        )
        for v in dict.fromkeys((vec, 1))
        for threads in TOKEN_TILE_THREADS
    ]


def _configs_of(signature: CallSignature) -> list[KernelConfig | PartialsKernelConfig]:
    if whole_tokens(signature.output_format, signature.head_size):
        return _token_tile_configs(signature)
    if signature.layout is not PartialLayout.SEPARATE:
        (dtype,) = signature.partial_dtypes
        chunk = partials_chunk_bytes(dtype.itemsize, signature.output_dtype.itemsize)
        widths = dict.fromkeys((vector_width(signature.head_size, dtype.itemsize, chunk), 1))
        return [
            partials_config_for(
                dtype,
                signature.output_format,
                signature.head_size,
                vec,
                signature.write_lse,
                signature.lse_base_2,
            )
            for vec in widths
        ]
    widest = max(d.itemsize for d in signature.partial_dtypes)
    out_size = signature.output_dtype.itemsize
    return [
        config_for(
            signature.partial_dtypes,
            signature.output_format,
            signature.head_size,
            vec,
            signature.write_lse,
            signature.lse_base_2,
        )
        for vec in _vector_widths(signature.head_size, widest, out_size, signature.write_lse)
    ]


def common_configs(
    head_sizes=COMMON_HEAD_SIZES, mixed_dtypes: bool = False
) -> list[KernelConfig | PartialsKernelConfig]:
    """Kernels for fp32/fp16/bf16 partials into every format (plain fp32/fp16/bf16, static
    FP8), with and without the output LSE, in both LSE bases, for every vector width a
    call can need, for two separate partials and for stacked or packed ones: same-dtype
    partials only, or with ``mixed_dtypes`` every pair of separate ones."""
    dtypes = FLOAT_DTYPES
    pairs = [(p, s) for p in dtypes for s in dtypes if mixed_dtypes or p == s]
    groups = [(pair, PartialLayout.SEPARATE) for pair in pairs]
    groups += [((d,), PartialLayout.STACKED) for d in dtypes]
    formats = [FormatKey(Plain, d) for d in dtypes] + [FormatKey(FP8Static, torch.float8_e4m3fn)]
    found: dict[KernelConfig | PartialsKernelConfig, None] = {}
    flags = list(itertools.product((False, True), repeat=2))  # output LSE, base 2
    for (partial_dtypes, layout), fmt, head_size, (lse, base_2) in itertools.product(
        groups, formats, head_sizes, flags
    ):
        signature = CallSignature(
            torch.device("cuda"), partial_dtypes, head_size, fmt, lse, base_2, layout
        )
        found.update(dict.fromkeys(_configs_of(signature)))
    return list(found)


def prepare(device_index: int, signature: CallSignature) -> None:
    """Build (or load) every kernel a call signature can need, so that a failing build
    shows at backend selection, not mid-call.

    Raises:
        nvrtc.BuildError, driver.DriverError: with the compiler's or driver's message.
    """
    if signature.head_size == 0:
        return
    for config in _configs_of(signature):
        _kernel(device_index, config)


def clear_caches() -> None:
    """Forget loaded kernels (tests that swap the build or the driver)."""
    _kernel.cache_clear()


def _aligned(ptr: int, strides: tuple[int, ...], itemsize: int, vec: int) -> bool:
    """Whether every row chunk of a tensor is aligned for ``vec``-element accesses."""
    align = min(16, vec * itemsize)
    return not (ptr % align or (strides[0] * itemsize) % align or (strides[1] * itemsize) % align)


def row_divisor(n: int) -> tuple[int, int]:
    """(multiplier, shift) with which the kernel divides a row index below 2^31 by ``n``,
    the rows' inner count (``outer_of`` in the kernel source, which has the proof)."""
    log2_ceil = (n - 1).bit_length()
    return -(-(1 << (31 + log2_ceil)) // n), log2_ceil


# The head count is per model: cached for good. The token count (head-major rows) changes
# with every batch: a bounded cache.
head_divisor = functools.cache(row_divisor)
token_divisor = functools.lru_cache(maxsize=4096)(row_divisor)

# Head-major rows only while one partial holds at most this many bytes: past it the rows,
# a token stride apart, stream worse from HBM (docs/cuda-backend.md).
HEAD_MAJOR_MAX_PARTIAL_BYTES = 16 << 20


def head_major_rows(
    output_lse_token_stride: int | None,
    num_tokens: int,
    num_heads: int,
    tokens_with_first: int,
    partial_bytes: int,
) -> bool:
    """Whether a call's rows go to the kernel head-major (row = head x T + token) rather
    than token-major (token x H + head). ``output_lse_token_stride`` is the output LSE's
    stride along tokens (None: no output LSE), ``partial_bytes`` the size of the wider
    partial (plain numbers: the eager call path is host-bound).

    With the output LSE stored ``[H, T]``, a block's output LSEs are then contiguous
    instead of one 32-byte sector per row. Only with a first partial on every token or on
    none: the kernel tests it on the row index, and P x H rows are a row range only in
    token-major order.
    """
    return (
        output_lse_token_stride == 1
        and num_tokens > 1
        and num_heads > 1
        and partial_bytes <= HEAD_MAJOR_MAX_PARTIAL_BYTES
        and tokens_with_first in (0, num_tokens)
    )


class Launch(NamedTuple):
    """What one launch needs: the loaded kernel, the grid size and the packed parameters."""

    kernel: driver.Kernel
    grid: int
    params: bytes


# Resolved once: torch.cuda.current_device() and friends cost a microsecond or more each
# on the eager path. Absent on CPU-only builds of torch, where this backend never runs.
_current_device = getattr(torch._C, "_cuda_getDevice", None)
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def run(call: MergeCall) -> None:
    """Launch the merge of ``call`` on the current stream."""
    if call.signature.layout is PartialLayout.SEPARATE:
        launch = launch_arguments(call)
    else:
        launch = partials_launch_arguments(call)
    amax = getattr(call.output_format, "amax", None)
    if amax is not None:
        # Zeroed for the kernel's atomic maxima (T = 0 leaves it 0), after every check.
        # On the current stream before the launch: a CUDA graph captures both.
        amax.zero_()
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


def _size_one_strides_zeroed(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.as_strided(
        t.shape, [st if n > 1 else 0 for n, st in zip(t.shape, t.stride(), strict=True)]
    )


def _check_strides(call: MergeCall) -> None:
    """Raise a ValueError naming the first tensor with a stride of 2^32 elements or more
    along a dimension longer than 1."""
    named = {"output": call.output, "prefix_output": call.partials[0]}
    named |= {"prefix_lse": call.lses[0], "suffix_output": call.partials[1]}
    named |= {"suffix_lse": call.lses[1], "output_lse": call.output_lse}
    for name, t in named.items():
        if t is not None and any(
            n > 1 and st >= _MAX_STRIDE for n, st in zip(t.shape, t.stride(), strict=True)
        ):
            raise ValueError(
                f"cuda backend: {name} has strides {tuple(t.stride())}; the kernel takes "
                f"strides below 2^32 elements (backend='triton' takes any)"
            )


def _groups_span_heads(output_format: OutputFormat, head_size: int) -> bool:
    """Whether the format's groups hold several heads (FP8PerTokenGroup.spans_heads): a
    group's rows must then be consecutive rows of one block, each a whole team."""
    return isinstance(output_format, FP8PerTokenGroup) and output_format.spans_heads(head_size)


def _scale_layout(call: MergeCall, head_major: bool = False) -> dict[str, int]:
    """The ScaleLayout fields (csrc/epilogues.cuh) of the scales a group store writes, in
    the kernel's row order: a row's token stride (float32 elements, or bytes of packed
    scales) and first column within the token (head * D) along the outer and inner index, the
    stride per group (packed: per column of four, in bytes), and for packed scales G, the
    offset of token T - 1 and the padding tokens after it (in every column but the last).
    0 along a dimension of one element, which addresses nothing."""
    output_format = call.output_format
    num_tokens, num_heads, head_size = call.output.shape
    stride_t, stride_g = output_format.epilogue_strides()
    groups = num_heads * head_size // output_format.epilogue_constants()[0]
    packed = output_format.key.options[2] == _PACKED
    # Packed scales are addressed in bytes, each int32 column holding four groups.
    unit, columns = (4, -(-groups // 4)) if packed else (1, groups)
    token = unit * stride_t if num_tokens > 1 else 0
    group = unit * stride_g if columns > 1 else 0
    head = head_size if num_heads > 1 else 0  # a head's first column within its token
    # Packed: token T - 1 zeros the padding tokens of its columns (stride_g is round_up(T, 4)).
    last_token = (num_tokens - 1) * token if packed else 0
    padding = stride_g - num_tokens if packed and columns > 1 else 0
    if max(token, group, groups, last_token) >= _MAX_STRIDE:
        raise ValueError(
            f"cuda backend: scales has strides {(stride_t, stride_g)}, and the kernel takes "
            f"offsets per token and group below 2^32 {'bytes' if packed else 'elements'} "
            f"(backend='triton' takes any)"
        )
    tokens = (token, 0) if not head_major else (0, token)  # along (outer, inner)
    heads = (0, head) if not head_major else (head, 0)
    return {
        "scale_stride_outer": tokens[0],
        "scale_stride_inner": tokens[1],
        "first_col_outer": heads[0],
        "first_col_inner": heads[1],
        "scale_stride_group": group,
        "num_groups": groups,
        "last_token_offset": last_token,
        "padding_tokens": padding,
    }


def _with_outputs(
    params: bytes, scale_layout: dict[str, int] | bytes | None, amax: int | None
) -> bytes:
    """WithOutputs<Params, ...> (csrc/epilogues.cuh): the packed ``params``, then the
    scales' layout where given (ScaleLayout's fields, or a packed TokenScaleLayout), then
    the amax output's address where given, each at its C alignment, the whole padded to
    the 8-byte alignment of the struct's pointers."""
    block = params
    if isinstance(scale_layout, bytes):  # TokenScaleLayout: a pointer first
        block += bytes(-len(block) % 8) + scale_layout
    elif scale_layout is not None:
        block += SCALE_LAYOUT.pack(**scale_layout)
    if amax is not None:
        block += bytes(-len(block) % 8) + AMAX_OUTPUT.pack(amax=amax)
    return block + bytes(-len(block) % 8)


def launch_arguments(
    call: MergeCall, *, chunk_bytes: int | None = None, head_major: bool | None = None
) -> Launch | None:
    """The launch of ``call`` (None: nothing to do). ``chunk_bytes`` overrides
    :func:`chunk_bytes_for` and ``head_major`` :func:`head_major_rows` (it needs a first
    partial on every token or on none)."""
    output, output_lse = call.output, call.output_lse
    partial0, partial1 = call.partials
    lse0, lse1 = call.lses
    num_tokens, num_heads, head_size = output.shape
    num_rows = num_tokens * num_heads
    if num_rows == 0 or head_size == 0:
        return None
    if num_rows > _MAX_ROWS:
        raise ValueError(f"cuda backend: tokens x heads = {num_rows} exceeds {_MAX_ROWS} rows")
    out_ptr, ptr0, ptr1 = output.data_ptr(), partial0.data_ptr(), partial1.data_ptr()
    out_st, st0, st1 = output.stride(), partial0.stride(), partial1.stride()
    size0, size1 = partial0.itemsize, partial1.itemsize
    widest = max(size0, size1)
    write_lse = output_lse is not None
    signature = call.signature
    tile = whole_tokens(signature.output_format, head_size)
    if tile:  # a block a token, token-major (store_token in csrc/merge.cuh)
        chunk_bytes, head_major = TOKEN_TILE_CHUNK_BYTES, False
    elif chunk_bytes is None:
        chunk_bytes = chunk_bytes_for(num_rows, widest, output.itemsize, write_lse)
    vec = vector_width(head_size, widest, chunk_bytes)
    if vec > 1 and not (
        _aligned(out_ptr, out_st, output.itemsize, vec)
        and _aligned(ptr0, st0, size0, vec)
        and _aligned(ptr1, st1, size1, vec)
    ):
        vec = 1  # scalar accesses for misaligned rows
    config = config_for(
        signature.partial_dtypes,
        signature.output_format,
        head_size,
        vec,
        write_lse,
        signature.lse_base_2,
        token_tile_threads(num_heads * head_size) if tile else 0,
    )
    kernel = _kernel(output.device.index, config)
    lse_out = output_lse if write_lse else lse1  # not written then
    lst0, lst1, ol_st = lse0.stride(), lse1.stride(), lse_out.stride()
    first = call.tokens_with_first
    if head_major is None:
        # A group of several heads needs its heads in consecutive rows (token-major).
        head_major = not _groups_span_heads(call.output_format, head_size) and (
            head_major_rows(
                ol_st[1] if write_lse else None,
                num_tokens,
                num_heads,
                first,
                num_rows * head_size * widest,
            )
        )
    # Token-major rows: the inner count is H and each tensor's first stride is the outer
    # one. Head-major: T is the inner count and every tensor's two strides trade places.
    if head_major:
        if first not in (0, num_tokens):
            raise ValueError("head-major rows need a first partial on every token or on none")
        if _groups_span_heads(call.output_format, head_size):
            raise ValueError("head-major rows cannot keep a group's heads together")
        inner, (multiplier, shift) = num_tokens, token_divisor(num_tokens)
        o, i = 1, 0
    else:
        inner, (multiplier, shift) = num_heads, head_divisor(num_heads)
        o, i = 0, 1
    if config.output_element.startswith(_TOKEN_SCALES):
        scale_layout = _token_scale_layout(call)
    elif config.takes_scale_layout:
        scale_layout = _scale_layout(call, head_major)
    else:
        scale_layout = None
    operand = call.output_format.kernel_operand()
    try:
        params = PARAMS.pack(
            out=out_ptr,
            partial0=ptr0,
            lse0=lse0.data_ptr(),
            partial1=ptr1,
            lse1=lse1.data_ptr(),
            format_operand=0 if operand is None else operand.data_ptr(),
            num_rows=num_rows,
            inner_count=inner,
            head_size=head_size,
            rows_with_first=first * num_heads,
            inner_multiplier=multiplier,
            inner_shift=shift,
            out_stride_outer=out_st[o],
            out_stride_inner=out_st[i],
            partial0_stride_outer=st0[o],
            partial0_stride_inner=st0[i],
            partial1_stride_outer=st1[o],
            partial1_stride_inner=st1[i],
            lse0_stride_inner=lst0[o],
            lse0_stride_outer=lst0[i],
            lse1_stride_inner=lst1[o],
            lse1_stride_outer=lst1[i],
            out_lse=output_lse.data_ptr() if write_lse else 0,
            out_lse_stride_inner=ol_st[o],
            out_lse_stride_outer=ol_st[i],
        )
    except struct.error:  # a value past 32 bits: only a stride can be (rows are checked)
        _check_strides(call)
        # Only dimensions of size 1 have such strides, and they address nothing: the same
        # call with those strides 0 (views of the same memory, aliasing kept).
        zeroed = call._replace(
            output=_size_one_strides_zeroed(output),
            output_lse=_size_one_strides_zeroed(output_lse),
            partials=tuple(_size_one_strides_zeroed(t) for t in call.partials),
            lses=tuple(_size_one_strides_zeroed(t) for t in call.lses),
        )
        return launch_arguments(zeroed, chunk_bytes=chunk_bytes, head_major=head_major)
    if scale_layout is not None or config.amax:
        amax = call.output_format.amax.data_ptr() if config.amax else None
        params = _with_outputs(params, scale_layout, amax)
    grid = num_tokens if tile else -(-num_rows // config.rows_per_block)
    return Launch(kernel, grid, params)


def _token_scale_layout(call: MergeCall) -> bytes:
    """The packed TokenScaleLayout (csrc/epilogues.cuh) of a per-token store: the scale
    bound's address (0 without) and the scales' stride along tokens (0 for one token)."""
    output_format = call.output_format
    scales = output_format.kernel_operand()
    stride = scales.stride(0) if scales.shape[0] > 1 else 0
    if stride >= _MAX_STRIDE:
        raise ValueError(
            f"cuda backend: scales has strides {tuple(scales.stride())}, and the kernel takes "
            f"a token stride below 2^32 elements (backend='triton' takes any)"
        )
    bound = output_format.scale_ub
    return TOKEN_SCALE_LAYOUT.pack(
        scale_ub=0 if bound is None else bound.data_ptr(), scale_stride_token=stride
    )


def _zero_size_one(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...]:
    """Strides with those of size-1 dimensions 0 (they address nothing, and may be huge)."""
    return tuple(st if n > 1 else 0 for n, st in zip(shape, strides, strict=True))


def partials_launch_arguments(call: MergeCall) -> Launch | None:
    """The launch of a stacked or packed ``call`` (None: nothing to do)."""
    output, output_lse = call.output, call.output_lse
    (partials,), (lses,) = call.partials, call.lses
    num_tokens, num_heads, head_size = output.shape
    num_rows = num_tokens * num_heads
    if num_rows == 0 or head_size == 0:
        return None
    if num_rows > _MAX_ROWS:
        raise ValueError(f"cuda backend: tokens x heads = {num_rows} exceeds {_MAX_ROWS} rows")
    packed = call.signature.layout is PartialLayout.PACKED
    p_strides = _zero_size_one(partials.shape, partials.stride())
    l_strides = _zero_size_one(lses.shape, lses.stride())
    if packed:  # (k, token, head): the packed row axis is the partial axis
        partial_strides = (p_strides[0], 0, p_strides[1])
        lse_strides = (l_strides[1], 0, l_strides[0])
    else:
        partial_strides = p_strides[:3]
        lse_strides = (l_strides[0], l_strides[2], l_strides[1])
    out_strides = _zero_size_one(output.shape, output.stride())
    size = partials.itemsize
    signature = call.signature
    tile = whole_tokens(signature.output_format, head_size)  # a block a token, token-major
    chunk = TOKEN_TILE_CHUNK_BYTES if tile else partials_chunk_bytes(size, output.itemsize)
    vec = vector_width(head_size, size, chunk)
    if vec > 1 and not (
        _aligned(output.data_ptr(), out_strides[:2], output.itemsize, vec)
        and _aligned(partials.data_ptr(), partial_strides, size, vec)
    ):
        vec = 1  # scalar accesses for misaligned rows
    config = partials_config_for(
        partials.dtype,
        signature.output_format,
        head_size,
        vec,
        output_lse is not None,
        signature.lse_base_2,
        token_tile_threads(num_heads * head_size) if tile else 0,
    )
    kernel = _kernel(output.device.index, config)
    if output_lse is None:
        out_lse_ptr, out_lse_strides = 0, (0, 0)
    else:
        out_lse_ptr = output_lse.data_ptr()
        out_lse_strides = _zero_size_one(output_lse.shape, output_lse.stride())
    multiplier, shift = head_divisor(num_heads)
    # Teams a row (none shared in a token tile, nor where a group holds several rows);
    # packed: the mean count of a token's rows.
    partials_a_row = -(-partials.shape[0] // num_tokens) if packed else partials.shape[0]
    one_team = tile or _groups_span_heads(call.output_format, head_size)
    split = 1 if one_team else partials_split(num_rows, config.team, partials_a_row)
    if config.output_element.startswith(_TOKEN_SCALES):
        scale_layout = _token_scale_layout(call)
    elif config.takes_scale_layout:
        scale_layout = _scale_layout(call)
    else:
        scale_layout = None
    operand = call.output_format.kernel_operand()
    try:
        params = PARTIALS_PARAMS.pack(
            out=output.data_ptr(),
            partials=partials.data_ptr(),
            lses=lses.data_ptr(),
            indptr=call.indptr.data_ptr() if packed else 0,
            format_operand=0 if operand is None else operand.data_ptr(),
            out_lse=out_lse_ptr,
            num_rows=num_rows,
            inner_count=num_heads,
            head_size=head_size,
            num_partials=partials.shape[0],  # K, or the packed rows' count N
            tokens_with_first=call.tokens_with_first,
            indptr_bytes=call.indptr.itemsize if packed else 0,
            split=split,
            inner_multiplier=multiplier,
            inner_shift=shift,
            out_stride_outer=out_strides[0],
            out_stride_inner=out_strides[1],
            partial_stride_k=partial_strides[0],
            partial_stride_outer=partial_strides[1],
            partial_stride_inner=partial_strides[2],
            lse_stride_k=lse_strides[0],
            lse_stride_outer=lse_strides[1],
            lse_stride_inner=lse_strides[2],
            out_lse_stride_outer=out_lse_strides[1],
            out_lse_stride_inner=out_lse_strides[0],
        )
    except struct.error:  # a value past 32 bits: a stride (rows are checked)
        raise ValueError(
            f"cuda backend: a stride of outputs, lses, out or out_lse reaches 2^32 elements "
            f"(strides {tuple(partials.stride())}, {tuple(lses.stride())}, "
            f"{tuple(output.stride())}); backend='triton' takes any"
        ) from None
    if scale_layout is not None or config.amax:
        amax = call.output_format.amax.data_ptr() if config.amax else None
        params = _with_outputs(params, scale_layout, amax)
    grid = num_tokens if tile else -(-num_rows * split // config.rows_per_block)
    return Launch(kernel, grid, params)
