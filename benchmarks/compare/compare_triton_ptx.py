"""Compare the code of the Triton merge kernel with that of a base git revision, no GPU.

Triton compiles for a GPU target without a GPU. For every specialisation the launcher can
pick (partial dtypes, output format, head sizes, rows per program, output LSE, LSE base,
program order), both versions' kernels are compiled for one architecture and their PTX
(debug information and names masked), or else their machine code (SASS), must be equal:
equal machine code means equal output bits and equal device time.

    python benchmarks/compare/compare_triton_ptx.py [--base-rev c9a2f13] [--cc 90]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import versions

FLOATS = ("fp32", "fp16", "bf16")
HEAD_SIZES = (8, 80, 128, 512)
NUM_HEADS = (1, 8, 128)


def _sass(cubin: bytes) -> str:
    """The machine code of a cubin, kernel names masked (cuobjdump, shipped with Triton)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-sass", f.name], check=True, capture_output=True)
    lines = text.stdout.decode().splitlines()
    return "\n".join(re.sub(r"_merge_two_kernel\w*", "KERNEL", x) for x in lines if "/*" in x)


def _compiled(kernel, names, constexprs, cc: int, triton) -> tuple[str, str]:
    """(PTX, SASS) of one specialisation."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: ("constexpr" if n in constexprs else t) for n, t in names.items()}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", cc, 32), options={"num_warps": 4, "maxnreg": 64}
    )
    # the code only: no debug information (source lines and file names differ)
    text = compiled.asm["ptx"].split(".section\t.debug")[0]
    text = re.sub(r"_merge_two_kernel\w*", "KERNEL", text)
    lines = (line.split("//")[0].rstrip() for line in text.splitlines())
    ptx = "\n".join(
        line
        for line in lines
        if line and not line.lstrip().startswith((".loc", ".file", "$L__tmp"))
    )
    return ptx, _sass(compiled.asm["cubin"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-rev", default=versions.DEFAULT_BASE_REV)
    parser.add_argument("--cc", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--sample", type=int, default=0, help="this many random specialisations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    base = versions.load_base(args.base_rev).triton.load()
    new_pkg = versions.load_working_tree()
    new = new_pkg.triton.load()
    from attnmerge.triton import epilogues

    ptr = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "fp8": "*fp8e4nv"}
    same = same_sass = differ = 0
    grid = itertools.product(
        itertools.product(FLOATS, FLOATS),
        (*FLOATS, "fp8"),
        HEAD_SIZES,
        NUM_HEADS,
        (1, 4, 8, 16),
        (False, True),
        (False, True),
        (False, True),
    )
    specs = [g for g in grid if not (g[7] and not g[5])]  # head-major only with an LSE
    if args.sample:
        specs = random.Random(args.seed).sample(specs, min(args.sample, len(specs)))
    start = time.perf_counter()
    for (d0, d1), out, head_size, heads, rows, lse, base_2, head_major in specs:
        fp8 = out == "fp8"
        common = [ptr[out], "*fp32", ptr[d0], "*fp32", ptr[d1], "*fp32", "*fp32", "i32", "i32"]
        values = (heads, head_size, triton.next_power_of_2(head_size), rows, base_2, lse)
        types = [*common, *["i32"] * 12]
        old_names = dict(zip(base._merge_two_kernel.arg_names, types, strict=False))
        # the working tree's kernel takes amax_ptr after the format's operand
        new_types = [*common[:7], "*i32", *common[7:], *["i32"] * 12]
        new_names = dict(zip(new._merge_two_kernel.arg_names, new_types, strict=False))
        keys = ("NUM_HEADS", "HEAD_SIZE", "BLOCK_D", "BLOCK_ROWS", "LSE_BASE_2", "WRITE_LSE")
        old_c = dict(zip(keys, values, strict=True)) | {"FP8_OUT": fp8, "HEAD_MAJOR": head_major}
        epilogue = epilogues.fp8_static if fp8 else epilogues.plain
        new_c = dict(zip(keys, values, strict=True)) | {
            "EPILOGUE": epilogue,
            "GROUP": 0,
            "UE8M0": False,
            "UE8M0_PACKED": False,
            "AMAX": False,
            "HEAD_MAJOR": head_major,
        }
        for name in old_c:
            old_names[name] = "constexpr"
        for name in new_c:
            new_names[name] = "constexpr"
        a = _compiled(base._merge_two_kernel, old_names, old_c, args.cc, triton)
        b = _compiled(new._merge_two_kernel, new_names, new_c, args.cc, triton)
        if a[0] == b[0]:
            same += 1
        elif a[1] == b[1]:
            same_sass += 1
        else:
            differ += 1
            print(f"differs: {d0},{d1} -> {out} D={head_size} H={heads} rows={rows} "
                  f"lse={lse} base2={base_2} head_major={head_major}")  # fmt: skip
    print(
        f"{same + same_sass + differ} Triton specialisations against {args.base_rev}: "
        f"{same} the same PTX, {same_sass} the same machine code from reordered PTX, "
        f"{differ} different ({time.perf_counter() - start:.0f} s)"
    )
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
