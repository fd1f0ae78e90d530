"""The CUDA stream yardstick (``stream_two.cu``): a merge's bytes with next to no arithmetic.

``stream_two_states`` reads both partials and both LSEs and writes every output element
(the partial of the larger LSE, scaled into FP8 when a scale is given); ``read_two_states``
reads the same and writes nothing. Next to attnmerge's ``cuda`` backend the first shows
what the merge's own arithmetic costs at a shape, the second bounds the time of any merge.
Built with attnmerge's NVRTC binding into its kernel cache, launched through its driver
binding on torch's current stream (so CUDA graphs capture it). Contiguous tensors only.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
from pathlib import Path

import torch

from attnmerge.cuda import cache, driver, nvrtc

__all__ = ["read_two_states", "stream_two_states"]

BLOCK = 128  # threads per block, kBlock in the source
_SOURCE = Path(__file__).with_name("stream_two.cu")
_PARAMS = struct.Struct("<6Q2q4IfI")
_ELEMENTS = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "E4M3",
}


def heads_divisor(heads: int) -> tuple[int, int]:
    """``(magic, shift)`` with ``n // heads == (umulhi(n, magic) + n) >> shift`` for every
    32-bit ``n`` (the sum taken in 64 bits)."""
    shift = (heads - 1).bit_length()
    return ((1 << 32) * ((1 << shift) - heads)) // heads + 1, shift


def vector_width(head_size: int, itemsize: int) -> int:
    """Elements per access: up to 16 bytes, dividing the head size."""
    vec = 16 // itemsize
    while head_size % vec:
        vec //= 2
    return vec


@functools.cache
def _kernel(
    device: int, partial: torch.dtype, out: torch.dtype, vec: int, team: int, write: bool
) -> driver.Kernel:
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"sm_{major}{minor}"
    instance = f"{_ELEMENTS[partial]}, {_ELEMENTS[out]}, {vec}, {team}, {str(write).lower()}"
    text = f"#define STREAM_TWO_INSTANCE {instance}\n{_SOURCE.read_text()}"
    key = {"source": hashlib.sha256(text.encode()).hexdigest(), "arch": arch}
    cubin = cache.cached_build(
        "yardstick",
        key,
        lambda: nvrtc.compile_cubin(text, name="stream_two.cu", arch=arch).cubin,
        describe=f"stream yardstick <{instance}> for {arch}",
    )
    return driver.load_kernel(cubin, "stream_two", device, BLOCK)


def _launch(output, prefix_output, prefix_lse, suffix_output, suffix_lse, scale, write):
    tensors = (output, prefix_output, prefix_lse, suffix_output, suffix_lse)
    if not all(t.is_contiguous() and t.is_cuda for t in tensors):
        raise ValueError("the CUDA stream yardstick takes contiguous CUDA tensors only")
    if prefix_output.dtype != suffix_output.dtype:
        raise ValueError("the CUDA stream yardstick takes partials of one dtype")
    tokens, heads, head_size = output.shape
    rows = tokens * heads
    if rows == 0 or head_size == 0:
        return
    if rows >= 1 << 32:
        raise ValueError("the CUDA stream yardstick takes fewer than 2^32 rows")
    vec = vector_width(head_size, max(prefix_output.itemsize, output.itemsize))
    team = min(BLOCK, 1 << (math.ceil(head_size / vec) - 1).bit_length())
    device = output.device.index
    kernel = _kernel(device, prefix_output.dtype, output.dtype, vec, team, write)
    params = _PARAMS.pack(
        prefix_output.data_ptr(),
        prefix_lse.data_ptr(),
        suffix_output.data_ptr(),
        suffix_lse.data_ptr(),
        output.data_ptr(),
        scale.data_ptr() if scale is not None else 0,
        rows,
        tokens,
        head_size,
        heads,
        *heads_divisor(heads),
        math.nan,
        0,
    )
    grid = -(-rows // (BLOCK // team))
    kernel.launch(grid, torch.cuda.current_stream(device).cuda_stream, params)


def stream_two_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse, scale):
    """Read what a merge reads, write what it writes (see the module doc)."""
    _launch(output, prefix_output, prefix_lse, suffix_output, suffix_lse, scale, True)


def read_two_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse, scale):
    """Read what a merge reads, write nothing (see the module doc)."""
    _launch(output, prefix_output, prefix_lse, suffix_output, suffix_lse, scale, False)
