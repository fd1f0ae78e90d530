"""Print the table of rejected inputs (docs/reliability.md) from real calls.

Each row makes one bad call of ``attnmerge.merge_attn_states`` / ``attnmerge.merge`` on the
CPU and records the exception type and message, so the documented messages are the ones
users get. ``tests/test_docs.py`` checks that docs/reliability.md holds this exact table.

    python scripts/rejected_inputs.py
"""

from __future__ import annotations

import torch

import attnmerge

T, H, D = 4, 2, 8


def _good() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        output=torch.empty(T, H, D),
        prefix_output=torch.randn(T, H, D, generator=g),
        prefix_lse=torch.randn(H, T, generator=g),
        suffix_output=torch.randn(T, H, D, generator=g),
        suffix_lse=torch.randn(H, T, generator=g),
    )


def _with(**changes):
    def call():
        args = _good()
        args.update(changes)
        attnmerge.merge_attn_states(
            args.pop("output"),
            args.pop("prefix_output"),
            args.pop("prefix_lse"),
            args.pop("suffix_output"),
            args.pop("suffix_lse"),
            **args,
        )

    return call


def _merge(**kwargs):
    def call():
        args = _good()
        outputs = kwargs.pop("outputs", [args["prefix_output"], args["suffix_output"]])
        lses = kwargs.pop("lses", [args["prefix_lse"], args["suffix_lse"]])
        attnmerge.merge(outputs, lses, **kwargs)

    return call


def _aliased_output():
    args = _good()
    buf = torch.randn(H, T, D)
    args["prefix_output"] = buf.transpose(0, 1)
    args["output"] = buf.view(T, H, D)  # same memory, other strides
    attnmerge.merge_attn_states(*args.values())


FP8 = torch.float8_e4m3fn
CASES = [
    ("output not a tensor", _with(output=[0.0])),
    ("output not 3-D", _with(output=torch.empty(T, H * D))),
    ("output of an unsupported dtype", _with(output=torch.empty(T, H, D, dtype=torch.float64))),
    ("partial of another shape", _with(suffix_output=torch.randn(T, H, D + 1))),
    ("partial of an unsupported dtype", _with(prefix_output=torch.randn(T, H, D).double())),
    ("last dimension not contiguous", _with(prefix_output=torch.randn(T, H, 2 * D)[..., ::2])),
    ("LSE not float32", _with(prefix_lse=torch.randn(H, T).half())),
    ("LSE stored [T, H] passed as is", _with(suffix_lse=torch.randn(T, H))),
    ("output_lse of the wrong shape", _with(output_lse=torch.empty(H, T + 1))),
    ("FP8 output without a scale", _with(output=torch.empty(T, H, D, dtype=FP8))),
    ("scale with a non-FP8 output", _with(output_scale=torch.ones(1))),
    (
        "scale not float32",
        _with(output=torch.empty(T, H, D, dtype=FP8), output_scale=torch.ones(1).double()),
    ),
    (
        "scale of several elements",
        _with(output=torch.empty(T, H, D, dtype=FP8), output_scale=torch.ones(2)),
    ),
    ("prefill_tokens_with_context out of range", _with(prefill_tokens_with_context=T + 1)),
    ("prefill_tokens_with_context not an int", _with(prefill_tokens_with_context=1.0)),
    ("unknown lse_base", _with(lse_base=10)),
    ("unknown backend", _with(backend="fastest")),
    ("output aliasing an input with other strides", _aliased_output),
    ("expanded (self-overlapping) output", _with(output=torch.empty(T, 1, D).expand(T, H, D))),
    ("explicit backend that cannot serve the call", _with(backend="cuda")),
    ("merge: no partials", _merge(outputs=[], lses=[])),
    (
        "merge: stacked LSEs not [K, H, T]",
        _merge(outputs=torch.randn(3, T, H, D), lses=torch.randn(T, 3, H)),
    ),
    (
        "merge: indptr of the wrong dtype",
        _merge(
            outputs=torch.randn(5, H, D),
            lses=torch.randn(H, 5),
            indptr=torch.tensor([0.0, 2.0, 5.0]),
        ),
    ),
    ("merge: out of the wrong shape", _merge(out=torch.empty(T + 1, H, D))),
    ("merge: FP8 out_dtype without quant", _merge(out_dtype=FP8)),
    ("merge: unknown quant spec", _merge(quant="fp8")),
]


def table() -> str:
    lines = ["| input | raises | message |", "|---|---|---|"]
    for what, call in CASES:
        try:
            call()
        except Exception as e:  # the point: record what users see
            message = str(e).replace("|", "\\|")
            lines.append(f"| {what} | `{type(e).__name__}` | {message} |")
        else:
            raise AssertionError(f"{what}: the call was accepted")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
