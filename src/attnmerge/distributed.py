"""The context-parallel combine: exact attention from partials computed on several ranks.

With the KV cache sharded over the ranks of a process group (decode context parallelism,
sharded-KV or ring attention), every rank computes attention over its own keys for the
same tokens and heads: a partial output ``[T, H, D]`` and its LSE ``[H, T]``.
:func:`cp_combine` exchanges the partials in one collective and merges them with one
K-way :func:`attnmerge.merge` (K = the world size, rank order), so each rank receives its
slice of the exact result in any output format (docs/distributed.md, docs/contract.md
C42 to C46). :func:`cp_lse_ag_out_rs` and :func:`cp_lse_ag_out_ar` take the arguments of
vLLM's functions of those names (vllm/v1/attention/ops/dcp.py, vLLM 0.34.0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .api import MergeResult, merge
from .dispatch import BACKENDS
from .formats import FLOAT_DTYPES, OutputFormat, dtype_names

__all__ = ["SCATTERS", "cp_combine", "cp_lse_ag_out_ar", "cp_lse_ag_out_rs", "token_slice"]

#: The distributions of the result over the ranks (``scatter=``).
SCATTERS = ("head", "token", "none")
_ALIGN = 16  # bytes: each rank's rows and LSEs start 16-byte aligned in the buffers


def token_slice(tokens: int, world_size: int, rank: int) -> slice:
    """The tokens ``scatter="token"`` gives ``rank``: consecutive chunks of
    ``ceil(tokens / world_size)`` tokens in rank order, the last ones shorter or empty
    (the split of ``torch.chunk`` and of DTensor's ``Shard(0)``). Every rank computes the
    same split from ``T`` and the world size alone."""
    chunk = -(-tokens // world_size)
    return slice(min(rank * chunk, tokens), min((rank + 1) * chunk, tokens))


def _round_up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _resolve_group(group: object) -> tuple[object, int, int]:
    """(process group, its size, this process's rank in it). A vLLM ``GroupCoordinator``
    stands for its ``device_group``."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "group=None needs torch.distributed's default process group "
                "(init_process_group was not called); pass a process group"
            )
        group = dist.group.WORLD
    group = getattr(group, "device_group", group)
    size, rank = getattr(group, "size", None), getattr(group, "rank", None)
    if not (callable(size) and callable(rank)):
        raise TypeError(
            f"group must be a torch.distributed ProcessGroup (or an object with a "
            f"device_group, such as vLLM's GroupCoordinator), got {type(group).__name__}"
        )
    return group, size(), rank()


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_lse(name: str, t: object, heads: int, tokens: int, device: torch.device) -> None:
    _tensor(name, t)
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if tuple(t.shape) != (heads, tokens):
        hint = " (pass an LSE stored [T, H] as lse.t())" if t.shape == (tokens, heads) else ""
        raise ValueError(
            f"{name} must have shape ({heads}, {tokens}) [H, T], got {tuple(t.shape)}{hint}"
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (that of partial_out)")


def _check_out(out, quant, shape, partial: torch.Tensor) -> torch.Tensor:
    """The output tensor (``out`` checked, or a new one), checked against ``quant``."""
    if quant is not None and not isinstance(quant, OutputFormat):
        raise TypeError(
            f"quant must be None or an attnmerge output format, got {type(quant).__name__}"
        )
    if out is None:
        dtype = partial.dtype if quant is None else quant.dtype
        out = torch.empty(shape, dtype=dtype, device=partial.device)
    _tensor("out", out)
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape} (this rank's slice), got {tuple(out.shape)}")
    if quant is None and out.dtype not in FLOAT_DTYPES:
        if out.dtype == torch.float8_e4m3fn:
            raise ValueError("an FP8 out needs quant=attnmerge.FP8Static(scale) or another format")
        raise TypeError(f"out must be one of {dtype_names(FLOAT_DTYPES)}, got {out.dtype}")
    if out.device != partial.device:
        raise ValueError(f"out is on {out.device}, expected {partial.device}")
    if out.stride(-1) != 1 and shape[-1] > 1:
        raise ValueError(f"out must be contiguous in its last dimension, got {out.stride()}")
    if out.numel() and torch._debug_has_internal_overlap(out) == 1:
        raise ValueError("out has overlapping elements (e.g. an expanded view)")
    if quant is not None:
        quant.check(out, "out")  # dtype, scale, scales and amax against the rank's slice
    return out


def _views(buf: torch.Tensor, tokens: int, heads: int, head_size: int, dtype: torch.dtype):
    """The rows ``[C, tokens, heads, head_size]`` and LSEs ``[C, heads, tokens]`` in a byte
    buffer ``[C, chunk]``: each chunk holds its rows, then (16-byte aligned) its LSEs."""
    rows = tokens * heads * head_size * buf.new_empty((), dtype=dtype).element_size()
    start = _round_up(rows)
    outputs = buf[:, :rows].view(dtype).unflatten(1, (tokens, heads, head_size))
    lses = buf[:, start : start + 4 * tokens * heads].view(torch.float32)
    return outputs, lses.unflatten(1, (heads, tokens))


def _split_tokens(dst: torch.Tensor, src: torch.Tensor, chunk: int) -> None:
    """``dst[r, :n_r] = src[token_slice(T, W, r)]``: whole chunks in one copy, then the
    rest (shapes only: the same copies on every rank)."""
    full = src.shape[0] // chunk if chunk else 0
    if full:
        dst[:full].copy_(src[: full * chunk].unflatten(0, (full, chunk)))
    if src.shape[0] > full * chunk:
        dst[full, : src.shape[0] - full * chunk].copy_(src[full * chunk :])


def _exchange(send: torch.Tensor, recv: torch.Tensor, group: object) -> None:
    """One collective: all-to-all where every rank sends a chunk to every rank, else an
    all-gather of the one chunk (on Gloo its list form, which its single-tensor form calls
    in torch 2.13 and which older releases have without the latter). ``name`` is e.g.
    "nccl", "gloo" or "cpu:gloo,cuda:nccl"."""
    if send.shape[0] == recv.shape[0]:
        dist.all_to_all_single(recv.view(-1), send.view(-1), group=group)
    elif (name := str(dist.get_backend(group))) == "gloo" or (send.is_cpu and "gloo" in name):
        dist.all_gather(list(recv.unbind(0)), send[0], group=group)
    else:
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(recv.view(-1), send.view(-1), group=group)


def cp_combine(
    partial_out: torch.Tensor,
    partial_lse: torch.Tensor,
    group: object = None,
    *,
    scatter: str = "head",
    quant: OutputFormat | None = None,
    lse_base: str | int = "e",
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> MergeResult:
    """This rank's slice of the exact merge of the partial states of all ranks of ``group``.

    Every rank calls it with its partials for the same ``T`` tokens and ``H`` heads, and
    the same shapes, dtypes, ``scatter``, format type and ``lse_base``. The result is
    bit-identical to :func:`attnmerge.merge` of all ranks' partials stacked in rank order
    and restricted to this rank's slice (per-token scales cover the slice), so the whole
    merge contract holds: ``-inf`` or ``+inf`` LSE marks a rank without keys for a token.

    Args:
        partial_out: ``[T, H, D]`` float32/float16/bfloat16, any strides.
        partial_lse: float32 ``[H, T]``, any strides (``[T, H]`` storage: pass ``.t()``).
        group: a process group (None: the default group), or an object with a
            ``device_group`` (vLLM's ``GroupCoordinator``); its rank order is the merge's.
        scatter: ``"head"``: rank ``r`` of ``W`` gets heads ``r * H / W`` to
            ``(r + 1) * H / W - 1``, ``[T, H / W, D]``; ``"token"``: the tokens of
            :func:`token_slice`; ``"none"``: all of ``[T, H, D]``.
        quant, lse_base, out, out_lse, return_lse, backend: as in :func:`attnmerge.merge`,
            for the slice. A new LSE is stored like ``partial_lse``. ``out`` and ``out_lse``
            may be the partials themselves: they are copied out before anything is written.

    Returns:
        :class:`attnmerge.MergeResult` of this rank's slice.

    Raises:
        TypeError, ValueError: naming the argument, before anything is sent or written
            (agreement between the ranks is not checked). ``BackendError``: after the
            exchange, on every rank alike.
    """
    group, world, rank = _resolve_group(group)
    if scatter not in SCATTERS:
        raise ValueError(f"scatter must be one of {', '.join(SCATTERS)}, got {scatter!r}")
    if _tensor("partial_out", partial_out).dtype not in FLOAT_DTYPES:
        raise TypeError(f"partial_out must be {dtype_names(FLOAT_DTYPES)}, got {partial_out.dtype}")
    if partial_out.dim() != 3:
        raise ValueError(f"partial_out must be 3-D [T, H, D], got shape {tuple(partial_out.shape)}")
    tokens, heads, head_size = partial_out.shape
    device = partial_out.device
    _check_lse("partial_lse", partial_lse, heads, tokens, device)
    chunks, chunk_tokens, chunk_heads, local_tokens = world, tokens, heads, tokens
    if scatter == "head":
        if heads % world:
            raise ValueError(
                f"scatter='head' needs H = {heads} heads to be a multiple of the world size {world}"
            )
        chunk_heads = heads // world
    elif scatter == "token":
        chunk_tokens = -(-tokens // world)
        piece = token_slice(tokens, world, rank)
        local_tokens = piece.stop - piece.start
    else:
        chunks = 1
    if lse_base not in ("e", 2):
        raise ValueError(f"lse_base must be 'e' or 2, got {lse_base!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    out = _check_out(out, quant, (local_tokens, chunk_heads, head_size), partial_out)
    if out_lse is not None:
        _check_lse("out_lse", out_lse, chunk_heads, local_tokens, device)
    elif return_lse:  # stored like partial_lse: [T, H] storage gives [T, H] storage
        t_major = partial_lse.stride(0) == 1 and partial_lse.stride(1) != 1
        shape = (local_tokens, chunk_heads) if t_major else (chunk_heads, local_tokens)
        out_lse = torch.empty(shape, dtype=torch.float32, device=device)
        out_lse = out_lse.t() if t_major else out_lse

    # Pack: chunk c holds what rank c receives (rows, then LSEs), in the partials' dtype.
    dtype, layout = partial_out.dtype, (chunk_tokens, chunk_heads, head_size)
    nbytes = _round_up(chunk_tokens * chunk_heads * head_size * partial_out.element_size())
    nbytes = max(nbytes + _round_up(4 * chunk_tokens * chunk_heads), _ALIGN)
    send = torch.empty(chunks, nbytes, dtype=torch.uint8, device=device)
    rows, lses = _views(send, *layout, dtype)
    for dst, src in ((rows, partial_out), (lses.transpose(1, 2), partial_lse.t())):
        if scatter == "head":
            dst.copy_(src.unflatten(1, (world, chunk_heads)).transpose(0, 1))
        elif scatter == "token":
            _split_tokens(dst, src, chunk_tokens)
        else:
            dst[0].copy_(src)
    recv = send
    if world > 1:
        recv = torch.empty(world, nbytes, dtype=torch.uint8, device=device)
        if chunk_tokens * chunk_heads:  # (shapes only: all ranks skip an empty exchange)
            _exchange(send, recv, group)
    rows, lses = _views(recv, *layout, dtype)
    rows, lses = rows[:, :local_tokens], lses[:, :, :local_tokens]
    return merge(
        rows, lses, quant=quant, lse_base=lse_base, out=out, out_lse=out_lse, backend=backend
    )


# ---------------------------------------------------------------------------
# vLLM's signatures.


def _mask_empty_shards(lse: torch.Tensor, seq_lens, query_start_loc) -> torch.Tensor:
    """``lse [B, H]`` with ``-inf`` in the rows of sequences whose local KV length is 0 and
    in rows past ``query_start_loc[-1]`` (padding), computed on the device."""
    for name, t in (("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if _tensor(name, t).dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError("query_start_loc must hold one more element than seq_lens")
    if seq_lens.shape[0] == 0:  # no local sequences: every row is empty
        return torch.full_like(lse, float("-inf"))
    row = torch.arange(lse.shape[0], device=lse.device, dtype=query_start_loc.dtype)
    seq = torch.bucketize(row, query_start_loc[1:], right=True).clamp_max(seq_lens.shape[0] - 1)
    empty = (row >= query_start_loc[-1]) | (seq_lens[seq] == 0)
    return lse.masked_fill(empty[:, None], float("-inf"))


def _vllm_combine(scatter, out, lse, group, return_lse, base_e, seq_lens, query_start_loc):
    _tensor("cp_attn_out", out)
    _tensor("cp_attn_lse", lse)
    if out.dim() == 4 and out.shape[1] == 1:  # [B, 1, H, D]
        out = out.squeeze(1)
    if lse.dim() == 3 and lse.shape[-1] == 1:  # [B, H, 1]
        lse = lse.squeeze(-1)
    if lse.dim() != 2:
        raise ValueError(f"cp_attn_lse must be [B, H], got shape {tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise TypeError(f"cp_attn_lse must be float32, got {lse.dtype}")
    if (seq_lens is None) != (query_start_loc is None):
        raise ValueError("seq_lens and query_start_loc must be given together")
    if seq_lens is not None:
        lse = _mask_empty_shards(lse, seq_lens, query_start_loc)
    result = cp_combine(
        out, lse.t(), group, scatter=scatter, lse_base="e" if base_e else 2, return_lse=return_lse
    )
    return (result.output, result.lse.t()) if return_lse else result.output


def cp_lse_ag_out_rs(cp_attn_out, cp_attn_lse, cp_group, ctx=None, return_lse=False,
                     is_lse_base_on_e=True, seq_lens=None, query_start_loc=None):  # fmt: skip
    """vLLM's ``cp_lse_ag_out_rs``: this rank's heads ``[B, H / W, D]`` (and with
    ``return_lse`` their LSE ``[B, H / W]``) from ``cp_attn_out [B, H, D]`` and float32
    ``cp_attn_lse [B, H]``: :func:`cp_combine` with ``scatter="head"``. ``cp_group``: a
    ``GroupCoordinator`` (its ``device_group``) or a process group; ``ctx`` is ignored;
    ``seq_lens`` with ``query_start_loc`` mark rows without local keys, and padding, empty.
    Unlike vLLM's, it writes no input and keeps a NaN LSE visible (docs/distributed.md)."""
    args = (cp_attn_out, cp_attn_lse, cp_group, return_lse, is_lse_base_on_e)
    return _vllm_combine("head", *args, seq_lens, query_start_loc)


def cp_lse_ag_out_ar(cp_attn_out, cp_attn_lse, cp_group, ctx=None, return_lse=False,
                     is_lse_base_on_e=True, seq_lens=None, query_start_loc=None):  # fmt: skip
    """vLLM's ``cp_lse_ag_out_ar``: as :func:`cp_lse_ag_out_rs`, but every rank gets all
    heads ``[B, H, D]`` (and LSE ``[B, H]``): :func:`cp_combine` with ``scatter="none"``."""
    args = (cp_attn_out, cp_attn_lse, cp_group, return_lse, is_lse_base_on_e)
    return _vllm_combine("none", *args, seq_lens, query_start_loc)
