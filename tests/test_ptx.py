"""The Triton kernel's machine code, checked without a GPU.

Triton compiles for sm_90 on a machine without a GPU, so CI can look at the PTX the
GPU would run: 16-byte vector loads and stores, the saturating round-to-nearest FP8
convert, the weights' division by the approximate reciprocal with Markstein's
correction, and an ``exp`` that keeps subnormal weights in base 2 (``ex2.approx.ftz``
flushes them, which would hide a NaN in a row of tiny but non-zero weight). In the
sm_90a machine code (where Triton ships ``cuobjdump``) it checks that every row load is
issued before the first exponential, which the kernel's register cap is for. For
in-place merges it checks that the output LSE is stored after a block barrier (PTX) and
that the output tile is stored in the layout its rows were loaded in (TTGIR). The
compile runs in a subprocess because this test session runs Triton in its interpreter,
where kernels cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_COMPILE_SCRIPT = r"""
import collections, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attnmerge import formats
from attnmerge.triton import epilogues, merge_kernel as mk

in_ty, out_ty, head_size, base_2 = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
num_rows, head_major = int(sys.argv[5]), sys.argv[6] == "1"
itemsize = {"bf16": 2, "fp16": 2, "fp32": 4}[in_ty]
fn = mk._merge_two_kernel
pointers = {"out_ptr": out_ty, "out_lse_ptr": "fp32", "partial0_ptr": in_ty,
            "lse0_ptr": "fp32", "partial1_ptr": in_ty, "lse1_ptr": "fp32",
            "operand_ptr": "fp32", "amax_ptr": "i32", "scale_ub_ptr": "fp32"}
# the output format's epilogue, as the launcher passes it (OutputFormat.triton_epilogue)
output_format = formats.FP8Static if out_ty == "fp8e4nv" else formats.Plain
epilogue = getattr(epilogues, output_format.triton_epilogue)
block_d = triton.next_power_of_2(head_size)
const = dict(NUM_HEADS=32, HEAD_SIZE=head_size, BLOCK_D=block_d,
             BLOCK_ROWS=mk.block_rows_for(head_size, itemsize, num_rows), LSE_BASE_2=base_2,
             WRITE_LSE=True, EPILOGUE=epilogue, GROUP=0, UE8M0=False, UE8M0_PACKED=False,
             SCALE_UB=False, AMAX=False, HEAD_MAJOR=head_major, TOKEN_CHUNKS=0,
             SEGMENT=0)
sig = {n: "constexpr" if n in const else ("*" + pointers[n] if n in pointers else "i32")
       for n in fn.arg_names}
# What Triton infers for aligned tensors and strides that are multiples of 16.
aligned = [n for n in fn.arg_names if n in pointers
           or n.startswith(("out_stride", "partial0_stride", "partial1_stride"))]
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
options = mk.ROW_OPTIONS  # as the launcher's
compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)
ops = re.findall(r"\b(ld\.global[.\w]*|st\.global[.\w]*|cvt[.\w]*e4m3\w*|ex2\.approx[.\w]*|"
                 r"div[.\w]*f32|rcp[.\w]*f32)", compiled.asm["ptx"])
# Positions in the SASS of the row loads (64- and 128-bit) and of the exponentials.
sass = None
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
if os.path.exists(tool):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    code = [line for line in text.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    sass = {"row_loads": [i for i, x in enumerate(code) if re.search(r"LDG\.E\.(64|128)\b", x)],
            "exps": [i for i, x in enumerate(code) if "MUFU.EX2" in x]}
# Global loads and stores and block barriers in program order (the output LSE is written).
order = re.findall(r"\b(ld\.global|st\.global|bar\.sync)\b", compiled.asm["ptx"])
# The layout (thread of each element) of every 2-D load and store: the row tiles.
tiles = re.findall(r"tt\.(load|store) [^\n]*: tensor<\d+x\d+x!tt\.ptr<\w+>, (#\w+)>",
                   compiled.asm["ttgir"])
print(json.dumps({"ptx": collections.Counter(ops), "sass": sass, "order": order,
                  "tiles": tiles}))
"""


def _compile(
    in_ty: str, out_ty: str, head_size: int, base_2: bool, num_rows: int, head_major: bool = False
) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (src, env.get("PYTHONPATH"))))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _COMPILE_SCRIPT,
            in_ty,
            out_ty,
            str(head_size),
            str(int(base_2)),
            str(num_rows),
            str(int(head_major)),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"compiling the kernel for sm_90 failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ptx_ops(in_ty: str, out_ty: str, head_size: int, base_2: bool) -> dict[str, int]:
    # the tile of large grids (the rule's own, without the small-grid cap)
    return _compile(in_ty, out_ty, head_size, base_2, num_rows=1 << 20)["ptx"]


def test_bf16_to_fp8_uses_vector_memory_ops_and_saturating_convert():
    ops = _ptx_ops("bf16", "fp8e4nv", 128, base_2=False)
    # Two partial rows per thread-tile, read as 16-byte vectors; the FP8 row stored as one.
    assert ops.get("ld.global.v4.b32", 0) >= 2, ops
    assert ops.get("st.global.v4.b32", 0) >= 1, ops
    # RNE with saturation to +-448 (NaN stays NaN); no other FP8 convert.
    converts = {k: v for k, v in ops.items() if "e4m3" in k}
    assert converts and all(k.startswith("cvt.rn.satfinite.e4m3x2") for k in converts), ops
    # The scale's reciprocal is an IEEE division, as in vLLM's static quantisation; the
    # weights are Markstein's sequence on the approximate reciprocal (correctly rounded
    # on their operands, as IEEE division; tests/test_weight_division.py checks the bits).
    assert ops.get("div.rn.f32", 0) == 1, ops
    assert ops.get("rcp.approx.ftz.f32", 0) >= 1, ops


def test_base_2_weights_keep_subnormals():
    ops = _ptx_ops("fp32", "fp32", 128, base_2=True)
    # The non-flushing exp is present next to the flushing fast path.
    assert ops.get("ex2.approx.f32", 0) >= 2, ops


@pytest.mark.parametrize("head_size", [72, 80])
def test_odd_head_sizes_still_vectorise(head_size):
    # 72 and 80 are multiples of 8 bf16 elements: the masked tail keeps 16-byte loads.
    ops = _ptx_ops("bf16", "bf16", head_size, base_2=False)
    assert ops.get("ld.global.v4.b32", 0) >= 2, ops


# The tiles where ptxas, left to itself, issued row loads after the weights' exponential:
# a thread with two rows (bf16 -> bf16) or a row of four 16-byte loads (fp32), large
# grids and the small grids' 4-row tile.
@pytest.mark.parametrize(
    "in_ty, out_ty, head_size, num_rows",
    [
        ("bf16", "fp8e4nv", 128, 16384),
        ("bf16", "bf16", 128, 16384),
        ("fp32", "fp8e4nv", 64, 16384),
        ("fp32", "bf16", 128, 16384),
        ("fp32", "bf16", 256, 128),
    ],
)
def test_row_loads_are_issued_before_the_weights(in_ty, out_ty, head_size, num_rows):
    sass = _compile(in_ty, out_ty, head_size, False, num_rows)["sass"]
    if sass is None:
        pytest.skip("this Triton ships no cuobjdump to read the machine code with")
    assert sass["row_loads"] and sass["exps"], sass
    assert max(sass["row_loads"]) < min(sass["exps"]), sass


@pytest.mark.parametrize(
    "in_ty, head_size, num_rows, head_major",
    [
        ("bf16", 128, 1 << 20, False),
        ("bf16", 128, 128, False),
        ("fp32", 512, 1 << 20, False),
        ("bf16", 128, 8192, True),  # programs over (token block, head)
    ],
)
def test_output_lse_is_stored_after_a_block_barrier(in_ty, head_size, num_rows, head_major):
    # output_lse may alias prefix_lse, and the thread that stores a row's output LSE is
    # not one of those that load its LSEs for the weights (the kernel's comment): every
    # load comes before one block barrier, and the LSE store after it.
    order = _compile(in_ty, "fp8e4nv", head_size, False, num_rows, head_major)["order"]
    assert order.count("bar.sync") == 1, order
    barrier = order.index("bar.sync")
    assert "ld.global" not in order[barrier:], order
    assert "st.global" in order[barrier:], order


@pytest.mark.parametrize(
    "in_ty, out_ty, head_size, head_major",
    [
        ("bf16", "fp8e4nv", 128, False),
        ("bf16", "bf16", 128, False),
        ("fp32", "fp32", 512, False),
        ("bf16", "fp8e4nv", 128, True),
    ],
)
def test_output_elements_are_loaded_and_stored_by_one_thread(in_ty, out_ty, head_size, head_major):
    # output may be prefix_output (in place) with no barrier in the kernel: that holds only
    # while each element of the output tile is stored by the thread that loaded it, i.e.
    # the row tiles' loads and the output's store share one layout.
    tiles = _compile(in_ty, out_ty, head_size, False, 1 << 20, head_major)["tiles"]
    assert [op for op, _ in tiles].count("load") == 2 and ("store" in [op for op, _ in tiles]), (
        tiles
    )
    assert len({layout for _, layout in tiles}) == 1, tiles


_EPILOGUES_SCRIPT = r"""
import itertools, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attnmerge import formats
from attnmerge.triton import epilogues, merge_kernel, partials_kernel

pointers = {"out_lse_ptr": "fp32", "partial0_ptr": "bf16", "partial1_ptr": "bf16",
            "partials_ptr": "bf16", "lse0_ptr": "fp32", "lse1_ptr": "fp32", "lses_ptr": "fp32",
            "indptr_ptr": "i32", "amax_ptr": "i32", "scale_ub_ptr": "fp32"}

def compile_(fn, const, out_ty, operand_ty, options, aligned=False):
    types = {**pointers, "out_ptr": out_ty, "operand_ptr": operand_ty}
    sig = {n: "constexpr" if n in const else ("*" + types[n] if n in types else "i32")
           for n in fn.arg_names}
    # aligned: what Triton infers for aligned tensors and row strides that are multiples of 16
    names = [n for n in fn.arg_names if n in types or "_stride_" in n and "lse" not in n]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names if aligned}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

def ops(ptx):
    atomics = sorted(set(re.findall(r"\b(?:atom|red)\.global[.\w]*", ptx)))
    return len(re.findall(r"\bdiv\.rn\.f32\b", ptx)), atomics

# Row tiles: (epilogue, output type, GROUP, UE8M0, UE8M0_PACKED), each with and without amax
cases = [("plain", "bf16", 0, False, False), ("fp8_static", "fp8e4nv", 0, False, False)]
cases += [("fp8_group", "fp8e4nv", g, u, False) for g in (64, 128) for u in (False, True)]
cases += [("fp8_group", "fp8e4nv", g, True, True) for g in (64, 128)]
kernels = [(merge_kernel._merge_two_kernel, {"HEAD_MAJOR": h}) for h in (False, True)]
kernels += [(partials_kernel._merge_partials_kernel, {"PACKED": p}) for p in (False, True)]
for (name, out_ty, group, ue8m0, packed), amax, (fn, extra) in itertools.product(
    cases, (False, True), kernels
):
    # 3 heads of 128 (G = 3 or 6 groups: a partly used last column) or 2 of 192
    heads, head_size = (3, 128) if packed else (2, 192)
    const = dict(NUM_HEADS=heads, HEAD_SIZE=head_size, BLOCK_D=256, BLOCK_ROWS=4,
                 LSE_BASE_2=False, WRITE_LSE=True, EPILOGUE=getattr(epilogues, name),
                 GROUP=group, UE8M0=ue8m0, UE8M0_PACKED=packed, SCALE_UB=False, AMAX=amax,
                 TOKEN_CHUNKS=0, SEGMENT=0, **extra)
    ptx = compile_(fn, const, out_ty, "i32" if packed else "fp32", {"num_warps": 4})
    divisions, atomics = ops(ptx)
    print("compiled", name, group, ue8m0, packed, amax, fn.__name__, extra, atomics)

# Token tiles (FP8PerToken) as the launcher sizes them (merge_kernel.token_tiles): 32 heads
# of 128 (one chunk, 4 warps), 128 of 128 (one chunk, 16 warps) and 128 of 192 (two chunks,
# 16 warps), with and without scale_ub
token_kernels = [(merge_kernel._merge_two_kernel, {"HEAD_MAJOR": False})] + kernels[2:]
shapes = [(32, 128, False), (128, 128, True), (128, 192, True)]
for (heads, head_size, scale_ub), amax, (fn, extra) in itertools.product(
    shapes, (False, True), token_kernels
):
    block_h, chunks, options = merge_kernel.token_tiles(heads, head_size)
    block_d = triton.next_power_of_2(head_size)
    const = dict(NUM_HEADS=heads, HEAD_SIZE=head_size, BLOCK_D=block_d, BLOCK_ROWS=block_h,
                 LSE_BASE_2=False, WRITE_LSE=True, EPILOGUE=epilogues.fp8_token, GROUP=0,
                 UE8M0=False, UE8M0_PACKED=False, SCALE_UB=scale_ub, AMAX=amax,
                 TOKEN_CHUNKS=chunks, SEGMENT=0, **extra)
    ptx = compile_(fn, const, "fp8e4nv", "fp32", options)
    divisions, atomics = ops(ptx)
    # a division per element a thread stores (chunks: in the loop's body once), plus a / 448
    per_thread = block_h * block_d // (32 * options["num_warps"])
    print("token", heads, head_size, chunks, options["num_warps"], per_thread, divisions, amax,
          fn.__name__, extra, atomics)

# Groups of whole heads (FP8PerTokenGroup, GROUP > HEAD_SIZE) in token tiles: groups of 128
# over 128 heads of 64 (one chunk) or 512 (two chunks, packed UE8M0 scales), one per kernel
for (heads, packed), (fn, extra) in zip(((128, False), (512, True), (128, True)), token_kernels):
    block_h, chunks, options = merge_kernel.token_tiles(heads, 64)
    const = dict(NUM_HEADS=heads, HEAD_SIZE=64, BLOCK_D=64, BLOCK_ROWS=block_h,
                 LSE_BASE_2=False, WRITE_LSE=True, EPILOGUE=epilogues.fp8_group, GROUP=128,
                 UE8M0=packed, UE8M0_PACKED=packed, SCALE_UB=False, AMAX=True,
                 TOKEN_CHUNKS=chunks, SEGMENT=0, **extra)
    ptx = compile_(fn, const, "fp8e4nv", "i32" if packed else "fp32", options)
    print("groups", heads, chunks, fn.__name__, extra, ops(ptx)[1])

# Groups that span heads unevenly (FP8PerTokenGroup.segment_size) in rows of part of a head,
# as the launcher sizes them (merge_kernel.segment_tiles), aligned bf16 partials: 2 heads of
# 96 in groups of 64 (rows of 32 values), 8 of 40 in 64 (rows of 8, packed UE8M0 scales),
# 128 of 192 in 128 (rows of 64); the count of 16-byte row loads
for (heads, head_size, group, packed), (fn, extra) in itertools.product(
    ((2, 96, 64, False), (8, 40, 64, True), (128, 192, 128, False)), token_kernels
):
    segment = formats.FP8PerTokenGroup(group).segment_size(head_size)
    tiles = merge_kernel.segment_tiles(head_size, group, segment, 2048)
    const = dict(NUM_HEADS=heads, HEAD_SIZE=head_size, BLOCK_D=segment,
                 BLOCK_ROWS=tiles.block_rows, LSE_BASE_2=False, WRITE_LSE=True,
                 EPILOGUE=epilogues.fp8_group, GROUP=group, UE8M0=packed,
                 UE8M0_PACKED=packed, SCALE_UB=False, AMAX=True, TOKEN_CHUNKS=0,
                 SEGMENT=segment, **extra)
    ptx = compile_(fn, const, "fp8e4nv", "i32" if packed else "fp32", tiles.options, True)
    vector_loads = len(re.findall(r"\bld\.global\.v4\.b32\b", ptx))
    print("segments", heads, head_size, vector_loads, fn.__name__, extra, ops(ptx)[1])
"""


def test_every_epilogue_compiles_for_sm_90():
    """Every output format's epilogue in both kernels (and both program orders and partial
    forms), with packed UE8M0 scales and with amax, FP8PerToken's and groups of whole
    heads in token tiles (one and two chunks, with and without scale_ub), and groups that
    span heads unevenly in rows of part of a head (16-byte loads), compiled (not
    interpreted): the
    interpreter accepts code that Triton's compiler rejects, such as a global that is not
    a constexpr. A kernel with amax takes one relaxed atomic maximum on its bits."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (src, env.get("PYTHONPATH"))))
    proc = subprocess.run(
        [sys.executable, "-c", _EPILOGUES_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("compiled")]
    assert len(lines) == 8 * 2 * 4, proc.stdout
    for line in lines:
        # amax: one relaxed atomic maximum of the int32 bits, and no atomic without it
        amax = line.split()[5] == "True"
        want = "['atom.global.gpu.relaxed.max.s32']" if amax else "[]"
        assert line.endswith(want), line
    tokens = [line.split() for line in proc.stdout.splitlines() if line.startswith("token")]
    assert len(tokens) == 3 * 2 * 3, proc.stdout
    assert {(t[3], t[4]) for t in tokens} == {("1", "4"), ("1", "16"), ("2", "16")}, tokens
    for t in tokens:
        # FP8PerToken divides each element by its token's scale (IEEE division, no
        # reciprocal), and a / 448 once; amax as in row tiles, one atomic per token
        per_thread, divisions = int(t[5]), int(t[6])
        assert divisions >= per_thread + 1, t
        want = "['atom.global.gpu.relaxed.max.s32']" if t[7] == "True" else "[]"
        assert " ".join(t).endswith(want), t
    groups = [line.split() for line in proc.stdout.splitlines() if line.startswith("groups")]
    assert len(groups) == 3 and {g[2] for g in groups} == {"1", "2"}, proc.stdout
    segments = [line.split() for line in proc.stdout.splitlines() if line.startswith("segments")]
    assert len(segments) == 3 * 3, proc.stdout
    for t in segments:
        # a row of part of a head is still loaded 16 bytes at a time (its first column is a
        # multiple of the row's length), each partial's; one atomic for amax
        assert int(t[3]) >= 2, t
        assert " ".join(t).endswith("['atom.global.gpu.relaxed.max.s32']"), t
