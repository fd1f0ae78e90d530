"""A bench-only CUDA kernel: the merge's memory traffic with almost no arithmetic.

``attnmerge bench --providers stream-cuda`` times it: the kernel of
``csrc/stream_two.cuh`` reads both partials and LSEs and writes the output in the CUDA
merge kernel's thread layout and chunk rule, but each output element is only the
partial of the larger LSE, scaled. Next to the ``cuda`` provider it shows what the
merge's own arithmetic costs at each shape; next to ``stream`` (the Triton yardstick)
how much of a yardstick is its compiler's. Contiguous ``[T, H, D]`` partials of one
dtype and ``[H, T]`` LSEs only; it obeys none of the contract.
"""

from __future__ import annotations

import functools
import struct
from importlib import resources

import torch

from . import backend, driver, nvrtc

__all__ = ["stream_two_states"]

KERNEL_NAME = "attnmerge_stream_two"
_PARAMS = struct.Struct("<6Q3q4I")  # StreamParams: 6 pointers, 3 int64, 4 uint32
assert _PARAMS.size == 88


@functools.cache
def source() -> str:
    stream = resources.files("attnmerge.cuda").joinpath("csrc/stream_two.cuh").read_text()
    return backend.source() + "\n" + stream


@functools.cache
def _kernel(device_index: int, partial: torch.dtype, out: torch.dtype, vec: int, team: int):
    arch = backend.arch_of(torch.cuda.get_device_capability(device_index))
    element = backend._ELEMENT
    instance = f"{element[partial]}, {element[out]}, {vec}, {team}"
    text = f"#define ATTNMERGE_STREAM_TWO_INSTANCE {instance}\n" + source()
    cubin = nvrtc.compile_cubin(text, name="stream_two.cu", arch=arch).cubin
    return driver.load_kernel(cubin, KERNEL_NAME, device_index, backend.DATA_THREADS)


def stream_two_states(
    output: torch.Tensor,
    prefix_output: torch.Tensor,
    prefix_lse: torch.Tensor,
    suffix_output: torch.Tensor,
    suffix_lse: torch.Tensor,
    output_scale: torch.Tensor | None,
) -> None:
    """Read what a merge reads, write what it writes (see the module doc)."""
    tensors = (output, prefix_output, suffix_output, prefix_lse, suffix_lse)
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("the stream kernel takes contiguous tensors only")
    if prefix_output.dtype != suffix_output.dtype:
        raise ValueError("the stream kernel takes partials of one dtype")
    num_tokens, num_heads, head_size = output.shape
    num_rows = num_tokens * num_heads
    if num_rows == 0 or head_size == 0:
        return
    widest = prefix_output.itemsize
    chunk = backend.chunk_bytes_for(num_rows, widest, output.itemsize)
    vec = backend.vector_width(head_size, widest, chunk)
    team = min(backend._next_pow2(-(-head_size // vec)), backend.DATA_THREADS)
    if head_size % vec or team * vec < head_size:
        raise ValueError(
            f"the stream kernel takes head sizes of at most {backend.DATA_THREADS * vec}"
        )
    device = output.device.index
    kernel = _kernel(device, prefix_output.dtype, output.dtype, vec, team)
    params = _PARAMS.pack(
        output.data_ptr(),
        prefix_output.data_ptr(),
        prefix_lse.data_ptr(),
        suffix_output.data_ptr(),
        suffix_lse.data_ptr(),
        output_scale.data_ptr() if output_scale is not None else 0,
        num_rows,
        num_tokens,
        head_size,
        num_heads,
        *backend.head_divisor(num_heads),
        0,
    )
    rows_per_block = backend.DATA_THREADS // team
    grid = -(-num_rows // rows_per_block)
    kernel.launch(grid, torch.cuda.current_stream(device).cuda_stream, params)
