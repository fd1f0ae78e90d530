"""Sharded-KV (context-parallel) attention on a group of CPU processes.

    python examples/cp_attention.py --world 4
    python examples/cp_attention.py --world 3 --scatter token --fp8

Every process holds one contiguous shard of the keys and values, as in decode context
parallelism, and computes attention of all the queries over its shard: a partial output
``[T, H, D]`` (bfloat16, as an attention kernel would write it) and its log-sum-exp
``[H, T]`` (float32). ``attnmerge.distributed.cp_combine`` exchanges the partials over a
Gloo group and merges them exactly; each process gets its slice of the result (its
heads, its tokens, or everything), checked here against attention over all the keys in
float64. A shard with no keys (more processes than keys) has LSE ``-inf`` and no weight.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnmerge
from attnmerge.distributed import cp_combine, token_slice


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Attention of ``q [T, H, D]`` over ``k, v [N, H, D]`` in their dtype's precision
    (float64 in, float64 out): the output ``[T, H, D]`` and the LSE ``[H, T]``."""
    scores = torch.einsum("thd,nhd->htn", q, k) / q.shape[-1] ** 0.5
    lse = torch.logsumexp(scores, dim=-1)  # -inf where the shard holds no keys
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("htn,nhd->thd", probs, v), lse


def max_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return (actual.double() - exact).abs().max().item() if exact.numel() else 0.0


def worker(rank: int, args: argparse.Namespace, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.world)
    gen = torch.Generator().manual_seed(0)  # the same queries, keys and values everywhere
    T, N, H, D = args.tokens, args.keys, args.heads, args.head_size
    q, k, v = (torch.randn(n, H, D, generator=gen, dtype=torch.float64) for n in (T, N, N))

    # This process's shard of the keys: its partial output (bf16) and LSE (fp32).
    keys = token_slice(N, args.world, rank)
    out, lse = attention(q.float(), k[keys].float(), v[keys].float())
    partial_out, partial_lse = out.to(torch.bfloat16), lse

    quant = attnmerge.FP8PerToken() if args.fp8 else None
    res = cp_combine(partial_out, partial_lse, scatter=args.scatter, quant=quant, return_lse=True)
    result = res.output.float() * (res.scales[:, :, None] if args.fp8 else 1)

    # This process's slice of attention over all the keys, in float64.
    exact, exact_lse = attention(q, k, v)
    tokens, heads = slice(None), slice(None)
    if args.scatter == "head":
        heads = slice(rank * H // args.world, (rank + 1) * H // args.world)
    elif args.scatter == "token":
        tokens = token_slice(T, args.world, rank)
    exact, exact_lse = exact[tokens, heads], exact_lse[heads, tokens]
    err = torch.tensor([max_error(result, exact), max_error(res.lse, exact_lse)])
    errors = [torch.zeros(2, dtype=err.dtype) for _ in range(args.world)]
    dist.all_gather(errors, err)
    if rank == 0:
        print(
            f"{args.world} ranks, {T} tokens, {N} keys, {H} heads of {D}, scatter={args.scatter}"
            f", output {'fp8 per token' if args.fp8 else 'bfloat16'}"
        )
        for r, e in enumerate(errors):
            print(f"  rank {r}: max error {e[0]:.3e} (output), {e[1]:.3e} (LSE)")
        scale = exact.abs().max().item() if exact.numel() else 1.0
        bound = scale * (2**-3 if args.fp8 else 2**-7)  # the partials' and output's roundings
        worst = max(e[0].item() for e in errors)
        print(
            f"max error {worst:.3e} against attention over all keys in float64 "
            f"({'ok' if worst <= bound else 'TOO LARGE'}: the roundings allow {bound:.1e})"
        )
        if worst > bound:
            raise SystemExit(1)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=4, help="number of processes")
    parser.add_argument("--tokens", type=int, default=6, help="query tokens T")
    parser.add_argument("--keys", type=int, default=1000, help="keys N, split over the ranks")
    parser.add_argument("--heads", type=int, default=8, help="heads H")
    parser.add_argument("--head-size", type=int, default=128, help="head size D")
    parser.add_argument("--scatter", choices=("head", "token", "none"), default="head")
    parser.add_argument("--fp8", action="store_true", help="per-token FP8 output")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(worker, args=(args, store), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
