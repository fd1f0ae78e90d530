"""The ``cuda`` backend: picks a kernel instance, builds it on first use, launches it.

Each kernel instance (partial dtypes, output dtype, vector width, threads per row) is
compiled by NVRTC for the device's architecture on first use and kept in the disk cache
(:mod:`.cache`; key: attnmerge version, source hash, instance, architecture, NVRTC
version), then loaded through the driver API (:mod:`.driver`). ``attnmerge build``
fills the cache ahead of time.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from importlib import resources

import torch

from . import cache, driver, nvrtc

__all__ = [
    "arch_of",
    "build_instance",
    "common_instances",
    "instance_for",
    "merge_two_states",
    "prepare",
    "unavailable_reason",
]

THREADS_PER_BLOCK = 128  # kThreadsPerBlock in the kernel source
KERNEL_NAME = "attnmerge_merge_two"
_MAX_ROWS = 2**31 - 1

# Kernel element types by torch dtype (names of the C++ tag structs).
_ELEMENT = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "FP8E4M3",
}

# MergeParams: 7 pointers, 16 int64, 2 int32 (192 bytes, no padding).
_PARAMS = struct.Struct("<7Q16q2i")
assert _PARAMS.size == 192


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


def build_instance(instance: tuple[str, str, str, int, int], arch: str) -> bytes:
    """The cubin of one kernel instance for ``arch``, from the cache or built now."""
    from .. import __version__

    p, s, o, vec, team = instance
    key = {
        "attnmerge": __version__,
        "source": _source_hash(),
        "instance": f"{p},{s},{o},{vec},{team}",
        "arch": arch,
        "nvrtc": ".".join(map(str, nvrtc.version())),
    }
    template_args = f"attnmerge::{p}, attnmerge::{s}, attnmerge::{o}, {vec}, {team}"

    def build() -> bytes:
        text = f"#define ATTNMERGE_MERGE_TWO_INSTANCE {template_args}\n" + source()
        return nvrtc.compile_cubin(text, name="merge_attn_states.cu", arch=arch).cubin

    return cache.cached_build(
        "merge_two", key, build, describe=f"CUDA merge kernel <{template_args}> for {arch}"
    )


@functools.cache
def _kernel(device_index: int, instance: tuple) -> driver.Kernel:
    arch = arch_of(torch.cuda.get_device_capability(device_index))
    cubin = build_instance(instance, arch)
    return driver.load_kernel(cubin, KERNEL_NAME, device_index, THREADS_PER_BLOCK)


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def instance_for(
    prefix_dtype: torch.dtype,
    suffix_dtype: torch.dtype,
    out_dtype: torch.dtype,
    head_size: int,
    vec: int,
) -> tuple[str, str, str, int, int]:
    """The kernel instance serving these dtypes and head size at vector width ``vec``."""
    team = min(_next_pow2(-(-head_size // vec)), THREADS_PER_BLOCK)
    return (_ELEMENT[prefix_dtype], _ELEMENT[suffix_dtype], _ELEMENT[out_dtype], vec, team)


#: Head sizes ``attnmerge build`` prepares by default (MLA and common attention heads).
COMMON_HEAD_SIZES = (64, 80, 96, 128, 192, 256, 512)


def common_instances(head_sizes=COMMON_HEAD_SIZES) -> list[tuple[str, str, str, int, int]]:
    """Instances for same-dtype partials (fp32/fp16/bf16) into every output dtype, at the
    vector width aligned tensors get and at the scalar fallback."""
    found = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for out in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn):
            for head_size in head_sizes:
                vec = 16 // dtype.itemsize
                for v in (vec, 1) if head_size % vec == 0 else (1,):
                    inst = instance_for(dtype, dtype, out, head_size, v)
                    if inst not in found:
                        found.append(inst)
    return found


def prepare(
    device_index: int,
    prefix_dtype: torch.dtype,
    suffix_dtype: torch.dtype,
    out_dtype: torch.dtype,
    head_size: int,
) -> None:
    """Build (or load) and load both kernel instances a call signature can need (vector
    and scalar), so that a failing build shows at backend selection, not mid-call.

    Raises:
        nvrtc.BuildError, driver.DriverError: with the compiler's or driver's message.
    """
    if head_size == 0:
        return
    vec = 16 // max(prefix_dtype.itemsize, suffix_dtype.itemsize)
    for v in (vec, 1) if head_size % vec == 0 else (1,):
        _kernel(device_index, instance_for(prefix_dtype, suffix_dtype, out_dtype, head_size, v))


def _vector_width(tensors: tuple[torch.Tensor, ...], head_size: int, widest: int) -> int:
    """Elements per thread access: 16 bytes of the widest input when every row chunk of
    every tensor is aligned for it, else 1 (scalar accesses)."""
    vec = 16 // widest
    if head_size % vec:
        return 1
    for t in tensors:
        align = min(16, vec * t.itemsize)
        if t.data_ptr() % align or (t.stride(0) * t.itemsize) % align:
            return 1
        if (t.stride(1) * t.itemsize) % align:
            return 1
    return vec


def merge_two_states(
    output: torch.Tensor,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    output_lse: torch.Tensor | None,
    prefill_tokens_with_context: int | None,
    output_scale: torch.Tensor | None,
    lse_base_2: bool,
) -> None:
    """Launch the merge on the current stream. Arguments must already be validated."""
    num_tokens, num_heads, head_size = output.shape
    num_rows = num_tokens * num_heads
    if num_rows == 0 or head_size == 0:
        return
    if num_rows > _MAX_ROWS:
        raise ValueError(f"cuda backend: tokens x heads = {num_rows} exceeds {_MAX_ROWS} rows")
    widest = max(prefix_output.itemsize, suffix_output.itemsize)
    vec = _vector_width((output, prefix_output, suffix_output), head_size, widest)
    instance = instance_for(prefix_output.dtype, suffix_output.dtype, output.dtype, head_size, vec)
    team = instance[-1]
    device_index = output.device.index
    kernel = _kernel(device_index, instance)
    lse_out = output_lse if output_lse is not None else suffix_lse  # not written then
    params = _PARAMS.pack(
        output.data_ptr(),
        output_lse.data_ptr() if output_lse is not None else 0,
        prefix_output.data_ptr(),
        prefix_lse.data_ptr(),
        suffix_output.data_ptr(),
        suffix_lse.data_ptr(),
        output_scale.data_ptr() if output_scale is not None else 0,
        num_rows,
        num_heads,
        head_size,
        num_tokens if prefill_tokens_with_context is None else prefill_tokens_with_context,
        *output.stride()[:2],
        *prefix_output.stride()[:2],
        *suffix_output.stride()[:2],
        *prefix_lse.stride(),
        *suffix_lse.stride(),
        *lse_out.stride(),
        int(lse_base_2),
        int(output_lse is not None),
    )
    rows_per_block = THREADS_PER_BLOCK // team
    grid = -(-num_rows // rows_per_block)
    stream = torch._C._cuda_getCurrentRawStream(device_index)
    if torch.cuda.current_device() == device_index:
        kernel.launch(grid, stream, params)
    else:  # the launch uses the current context: make it the tensors' device's
        with torch.cuda.device(device_index):
            kernel.launch(grid, stream, params)
