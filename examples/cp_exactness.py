"""How exact is the context-parallel combine? cp_combine against vLLM's pattern, on a CPU.

    python examples/cp_exactness.py                   # W = 2, 4, 8 simulated ranks
    python examples/cp_exactness.py --worlds 2 4 8 16 --q-scale 1 4

W ranks each hold a contiguous shard of the keys and compute attention over it in
float64, written as an attention kernel writes it: a bfloat16 output and a float32 LSE.
Those partials are combined into a bfloat16 output in two ways:

* ``cp_combine``: the partials travel unchanged and one float32 K-way merge rounds the
  result to bfloat16 once. It is simulated here by ``attnmerge.merge`` of the W partials
  stacked in rank order, which is what every rank's ``cp_combine`` returns, bit for bit
  (tests/test_distributed.py);
* vLLM's ``cp_lse_ag_out_rs``: all-gather the LSEs, rescale each rank's output by
  ``exp(lse_r - lse)`` in float32 and store it in bfloat16, then reduce-scatter the
  rescaled outputs, a sum in bfloat16 (emulated as a ring in rank order: each step adds
  one rank's rows in float32 and rounds to bfloat16).

Both are compared with the float64 merge of the same partials (the error the combine
adds) and with attention over all the keys in float64 (the end-to-end error, which
includes the rounding of the partials to bfloat16). Errors are in bfloat16 ulps of the
element's magnitude ``sum_k w_k |O_k|`` (the scale of a sum's rounding errors; an ulp of
x is the spacing of bfloat16 numbers at |x|), so an element that cancels to near 0 does
not inflate them; "exact" is the share of elements equal to the float64 result rounded
to bfloat16 (correctly rounded).
"""

from __future__ import annotations

import argparse

import torch

import attnmerge
from attnmerge.distributed import token_slice


def shard_attention(q, k, v):
    """Attention of ``q [T, H, D]`` over one shard ``k, v [N, H, D]`` in float64: the
    output ``[T, H, D]`` and LSE ``[H, T]``."""
    scores = torch.einsum("thd,nhd->htn", q, k) / q.shape[-1] ** 0.5
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("htn,nhd->thd", torch.exp(scores - lse[..., None]), v), lse


def merge_f64(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact merge of ``outs [W, T, H, D]`` with ``lses [W, H, T]`` in float64, and
    its magnitude ``sum_k w_k |O_k|`` (the scale of the rounding errors of a sum)."""
    w = torch.softmax(lses.double(), dim=0).permute(0, 2, 1)[..., None]
    return (w * outs.double()).sum(0), (w * outs.double().abs()).sum(0)


def vllm_pattern(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """vLLM's all-gather + rescale + reduce-scatter: the float32 correction of its Triton
    kernel (``correct_attn_out``), the rescaled rows stored in the partials' dtype, and a
    bfloat16 ring sum in rank order."""
    m = lses.max(0).values
    lse = torch.log(torch.exp(lses - m).sum(0)) + m  # [H, T], float32
    factor = torch.exp(lses - lse).permute(0, 2, 1)[..., None]  # [W, T, H, 1]
    corrected = (outs.float() * factor).to(outs.dtype)
    acc = corrected[0]
    for r in range(1, len(corrected)):
        acc = (acc.float() + corrected[r].float()).to(outs.dtype)
    return acc


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at ``|x|`` (8 significant bits)."""
    _, e = torch.frexp(x.abs().clamp(min=2.0**-126))
    return torch.ldexp(torch.ones_like(x), e - 8)


def stats(actual: torch.Tensor, exact: torch.Tensor, mag: torch.Tensor) -> str:
    """Max and mean of ``|actual - exact|`` in ulps of ``mag``; the share of elements
    equal to ``exact`` correctly rounded."""
    err = (actual.double() - exact).abs() / ulp(mag)
    correct = (actual == exact.to(actual.dtype)).double().mean().item()
    return f"{err.max().item():.2f} | {err.mean().item():.3f} | {100 * correct:.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument(
        "--q-scale",
        type=float,
        nargs="+",
        default=[1.0, 4.0],
        help="query scale: 1 gives flat softmaxes, 4 peaked ones",
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--keys", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    T, H, D, N = args.tokens, args.heads, args.head_size, args.keys

    print(
        f"T = {T} tokens, H = {H} heads of D = {D}, N = {N} keys; bfloat16 partials and "
        f"output, float32 LSEs. Errors in bfloat16 ulps of sum_k w_k |O_k|: max | mean | "
        f"share correctly rounded\n"
    )
    head = "max | mean | exact"
    print(f"| against | W | q scale | cp_combine: {head} | vLLM's pattern: {head} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for q_scale in args.q_scale:
        gen = torch.Generator().manual_seed(args.seed)
        q = torch.randn(T, H, D, generator=gen, dtype=torch.float64) * q_scale
        k, v = (torch.randn(N, H, D, generator=gen, dtype=torch.float64) for _ in range(2))
        attention = shard_attention(q, k, v)[0]
        for world in args.worlds:
            parts = [
                shard_attention(q, k[s], v[s])
                for s in (token_slice(N, world, r) for r in range(world))
            ]
            outs = torch.stack([o for o, _ in parts]).to(torch.bfloat16)
            lses = torch.stack([lse for _, lse in parts]).float()
            merged, mag = merge_f64(outs, lses)
            ours = attnmerge.merge(outs, lses, backend="torch").output
            theirs = vllm_pattern(outs, lses)
            for name, exact in (("fp64 merge", merged), ("fp64 attention", attention)):
                print(
                    f"| {name} | {world} | {q_scale:g} | {stats(ours, exact, mag)} | "
                    f"{stats(theirs, exact, mag)} |"
                )


if __name__ == "__main__":
    main()
