"""K-way merges: attnmerge against FlashInfer's kernels, chained two-way merges and a copy.

Runs the K-way grid of ``attnmerge bench --kway`` (:mod:`attnmerge.bench`: K in 2..32
partials x T in 1..4096 x H in 128/32/8 x D = 128, bf16 partials into bf16 and FP8, fixed
K stacked ``[K, T, H, D]`` and variable K packed with an ``indptr``; the same inputs, timing,
bytes and CSV) with these providers besides attnmerge's backends ``cuda``, ``triton`` and
``torch``:

* ``cuda-tkhd``: the ``cuda`` backend on FlashInfer's layout (the copy the ``flashinfer``
  provider reads: ``v [T, K, H, D]``, ``s [T, K, H]`` in base 2, passed as
  ``v.transpose(0, 1)``, ``s.permute(1, 2, 0)``; packed rows with ``s [N, H]`` as
  ``s.t()``);
* ``flashinfer``: FlashInfer's ``MergeStates`` (fixed K) and ``VariableLengthMergeStates``
  (variable K), bf16 out, no output LSE (``peers/flashinfer.py``, built from FlashInfer's
  headers); its inputs are copied into its layout before timing;
* ``flashinfer+quant``: the same, then the FP8 quantisation below (FP8 out);
* ``chained``: K - 1 two-way merges through ``merge_attn_states`` (``cuda``): the first two
  partials into a bf16 buffer and its LSE, each further one merged into it in place, the
  last straight into the output format, as an engine without a K-way merge would (fixed K);
* ``unfused``: attnmerge's K-way merge (``cuda``) into bf16, then the torch.compile'd FP8
  quantisation of ``attnmerge bench``'s ``unfused`` provider (``_compiled_quantize_into``)
  as a second kernel (FP8 out);
* ``copy``: ``dst.copy_(src)`` of half the case's bytes, so that it reads and writes as
  many bytes as the merge moves: the bandwidth yardstick.

Every provider's GB/s counts the merge's bytes (``Case.min_bytes``). Before the run, a
small merge by ``flashinfer`` and by ``cuda-tkhd`` on the same inputs is compared (their
largest difference is printed); the summary (:mod:`benchmarks.kway_summary`) after it.
From the repository root, on a GPU (``--kway``'s grid is the default here; ``attnmerge
bench``'s options narrow it)::

    python -m benchmarks.kway --csv kway.csv
    python -m benchmarks.kway --partials 16 --tokens 1,4096 --providers cuda,flashinfer
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from collections.abc import Sequence

import torch

from attnmerge import bench
from attnmerge.api import merge, merge_attn_states
from attnmerge.formats import FP8Static

LOG2E = 1.0 / math.log(2.0)
BACKEND = "cuda"  # of the chained, unfused and cuda-tkhd providers (tests use torch)
PROVIDERS = (
    "cuda",
    "flashinfer",
    "cuda-tkhd",
    "flashinfer+quant",
    "triton",
    "chained",
    "unfused",
    "copy",
    "torch",
)
DEFAULT_PROVIDERS = PROVIDERS[:-1]  # the torch reference is slow and takes float32 copies
_BF16_ONLY = ("flashinfer",)  # bf16 out
_FP8_ONLY = ("flashinfer+quant", "unfused")
_FIXED_ONLY = ("chained",)


def applies(case: bench.Case) -> bool:
    """Whether ``case.provider`` can run the case (output format, fixed or variable K)."""
    p = case.provider
    return not (
        (p in _BF16_ONLY and case.fp8)
        or (p in _FP8_ONLY and not case.fp8)
        or (p in _FIXED_ONLY and case.variable)
    )


def build_cases(args: argparse.Namespace) -> list[bench.Case]:
    """``attnmerge bench``'s K-way grid, in its order, with the providers that apply."""
    shapes = bench.build_cases(argparse.Namespace(**{**vars(args), "providers": ("cuda",)}))
    cases = [dataclasses.replace(c, provider=p) for c in shapes for p in args.providers]
    return [c for c in cases if applies(c)]


def flashinfer_layout(s: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A set's partials as FlashInfer takes them (new dense tensors): ``v [T, K, H, D]`` and
    ``s [T, K, H]``, or packed ``v [N, H, D]`` and ``s [N, H]``; LSEs in base 2 with
    ``-inf`` for empty partials (the set's ``+inf``)."""
    lses = s["lses"]
    lse2 = torch.where(torch.isinf(lses), -math.inf, lses * LOG2E)
    if s["indptr"] is None:  # [K, T, H, D], [K, H, T]
        return s["outputs"].transpose(0, 1).contiguous(), lse2.permute(2, 0, 1).contiguous()
    return s["outputs"], lse2.t().contiguous()  # [N, H, D] already; [H, N] -> [N, H]


def _flashinfer_merge(s: dict, out: torch.Tensor):
    from benchmarks.peers import flashinfer

    flashinfer.library()  # built now, not while a CUDA graph is captured
    v, lse = flashinfer_layout(s)
    if s["indptr"] is None:
        return functools.partial(flashinfer.merge_states, v, lse, out=out, write_lse=False)
    merge_rows = flashinfer.variable_length_merge_states
    return functools.partial(merge_rows, v, lse, s["indptr"], out=out, write_lse=False)


def _flashinfer(s: dict, scale):
    if scale is not None:
        raise ValueError("flashinfer writes the partials' dtype; FP8: flashinfer+quant")
    return _flashinfer_merge(s, s["output"])


def _quantized(s: dict, scale, merge_into):
    """``merge_into(tmp)`` into a bf16 buffer, then the separate FP8 quantisation."""
    if scale is None:
        raise ValueError("an FP8-output provider: --fp8 on")
    tmp = torch.empty_like(s["output"], dtype=s["outputs"].dtype)
    quantize, first = bench._compiled_quantize_into(), merge_into(tmp)

    def call() -> None:
        first()
        quantize(s["output"], tmp, scale)

    return call


def _flashinfer_quant(s: dict, scale):
    return _quantized(s, scale, lambda tmp: _flashinfer_merge(s, tmp))


def _unfused(s: dict, scale):
    def merge_into(tmp: torch.Tensor):
        args = (s["outputs"], s["lses"])
        return functools.partial(merge, *args, out=tmp, indptr=s["indptr"], backend=BACKEND)

    return _quantized(s, scale, merge_into)


def _cuda_tkhd(s: dict, scale):
    v, lse = flashinfer_layout(s)
    packed = s["indptr"] is not None
    quant = None if scale is None else FP8Static(scale)
    kwargs = {"quant": quant, "out": s["output"], "out_lse": s["output_lse"], "lse_base": 2}
    outputs, lses = (v, lse.t()) if packed else (v.transpose(0, 1), lse.permute(1, 2, 0))
    return functools.partial(merge, outputs, lses, indptr=s["indptr"], backend=BACKEND, **kwargs)


def _chained(s: dict, scale):
    """K - 1 two-way merges, the running result in a bf16 buffer merged into in place."""
    if s["indptr"] is not None:
        raise ValueError("chained two-way merges need the same K at every token")
    outputs, lses = s["outputs"], s["lses"]
    tmp, tmp_lse = torch.empty_like(outputs[0]), torch.empty_like(lses[0])
    steps = []
    for i in range(1, outputs.shape[0]):
        last = i == outputs.shape[0] - 1
        prev = (outputs[0], lses[0]) if i == 1 else (tmp, tmp_lse)
        dst, dst_lse = (s["output"], s["output_lse"]) if last else (tmp, tmp_lse)
        args = (dst, prev[0], prev[1], outputs[i], lses[i], dst_lse, None, scale if last else None)
        steps.append(functools.partial(merge_attn_states, *args, backend=BACKEND))

    def call() -> None:
        for step in steps:
            step()

    return call


def set_bytes(s: dict) -> int:
    """The bytes a merge of set ``s`` moves: its partials, LSEs, indptr, output, output LSE."""
    keys = ("outputs", "lses", "indptr", "output", "output_lse")
    return sum(s[k].numel() * s[k].element_size() for k in keys if s[k] is not None)


def _copy(s: dict, scale):
    src = torch.empty(set_bytes(s) // 2, dtype=torch.uint8, device=s["output"].device)
    dst = torch.empty_like(src)
    return functools.partial(dst.copy_, src)


EXTRA = {
    "cuda-tkhd": _cuda_tkhd,
    "flashinfer": _flashinfer,
    "flashinfer+quant": _flashinfer_quant,
    "chained": _chained,
    "unfused": _unfused,
    "copy": _copy,
}


def check_flashinfer(device: torch.device | str = "cuda") -> str:
    """A small fixed-K and variable-K merge by ``flashinfer`` and by ``cuda-tkhd`` on the
    same inputs, and their largest difference: a wrong binding shows here, not as a time."""
    diffs = []
    for variable in (False, True):
        case = bench.Case("bf16", False, False, 128, 7, 4, "flashinfer", 5, variable)
        (s,) = bench.make_input_sets(case, 1, device)
        theirs = _flashinfer(s, None)
        ours = _cuda_tkhd(dict(s, output=torch.empty_like(s["output"])), None)
        theirs(), ours()
        diff = (theirs.keywords["out"].float() - ours.keywords["out"].float()).abs().max()
        diffs.append(f"{'variable' if variable else 'fixed'} K {diff.item():.3g}")
    return f"flashinfer vs cuda on the same inputs, largest difference: {', '.join(diffs)}"


def parser() -> argparse.ArgumentParser:
    """``attnmerge bench``'s options with this module's providers; ``--kway``'s grid and
    :data:`DEFAULT_PROVIDERS` by default."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.kway", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    bench.add_arguments(p, PROVIDERS)
    p.set_defaults(**bench.KWAY, providers=DEFAULT_PROVIDERS)
    return p


def main(argv: Sequence[str] | None = None, **run_options) -> int:
    """Run the K-way grid and print its summary; ``run_options`` go to
    :func:`attnmerge.bench.run` (tests use them)."""
    args = parser().parse_args(argv)
    if args.eager:
        raise SystemExit("benchmarks.kway times CUDA graphs; for --eager use attnmerge bench")
    if {"flashinfer", "flashinfer+quant"} & set(args.providers) and torch.cuda.is_available():
        try:
            print(check_flashinfer(), flush=True)
        except Exception as e:  # the run records the error at each case
            print(f"flashinfer check failed: {type(e).__name__}: {e}", flush=True)
    code = bench.run(args, extra=EXTRA, cases=build_cases(args), **run_options)
    if code == 0 and args.csv:
        from benchmarks import kway_summary

        print(kway_summary.report(args.csv))
    return code


if __name__ == "__main__":
    sys.exit(main())
