"""The CUDA sources, checked without a GPU.

* The software float32 -> e4m3fn conversion (used on GPUs without FP8 hardware) is
  compiled for the host with the system C++ compiler and compared bit for bit with
  torch's cast on every tie point, its neighbours and random values.
* The kernels compile with nvcc for every target architecture (sm_80, sm_90a, and
  sm_100a where the toolkit has it), as a user's first-use build would.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "src" / "attnmerge" / "cuda" / "csrc"

_HOST_HARNESS = r"""
#include <cstdio>
#include <cstdint>
#include "merge_attn_states.cuh"
int main() {
  uint32_t bits;
  while (fread(&bits, 4, 1, stdin) == 1) {
    float x;
    __builtin_memcpy(&x, &bits, 4);
    unsigned char q = attnmerge::float_to_e4m3_satfinite(x);
    fwrite(&q, 1, 1, stdout);
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def host_converter(tmp_path_factory) -> Path:
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("fp8conv")
    (d / "harness.cpp").write_text(_HOST_HARNESS)
    exe = d / "convert"
    subprocess.run(
        [cxx, "-O2", "-std=c++17", f"-I{CSRC}", str(d / "harness.cpp"), "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    return exe


def _convert(exe: Path, values: torch.Tensor) -> torch.Tensor:
    data = values.float().contiguous().view(torch.int32).numpy().tobytes()
    out = subprocess.run([str(exe)], input=data, capture_output=True, check=True).stdout
    return torch.frombuffer(bytearray(out), dtype=torch.uint8)


def _fp8_test_values() -> torch.Tensor:
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # every finite non-negative code
    grid = codes.view(torch.float8_e4m3fn).float()
    mids = (grid[:-1] + grid[1:]) / 2  # exact in float32: the round-half-even ties
    one_ulp = mids.view(torch.int32)
    near = torch.cat([(one_ulp - 1).view(torch.float32), (one_ulp + 1).view(torch.float32)])
    special = torch.tensor(
        [
            0.0,
            448.0,
            449.0,
            463.99,
            464.0,
            465.0,
            480.0,
            1e30,
            float("inf"),
            2.0**-9,
            2.0**-10,
            3 * 2.0**-11,
            2.0**-6,
            2.0**-6 - 2.0**-12,
            1e-40,
            1.996,
        ]
    )
    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64)
    rnd = random_bits.to(torch.int32).view(torch.float32)
    scaled = torch.randn(200_000, generator=g) * 100
    positive = torch.cat([grid, mids, near, special, scaled])
    return torch.cat([positive, -positive, rnd])


def test_software_fp8_convert_matches_torch_cast(host_converter):
    x = _fp8_test_values()
    got = _convert(host_converter, x)
    # Reference: saturate (NaN kept), then torch's round-to-nearest-even cast.
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    nan = x.isnan()
    assert torch.all(got[nan] == 0x7F), "NaN must become the canonical NaN code 0x7F"
    bad = (got != want) & ~nan
    assert not bad.any(), (
        f"{int(bad.sum())} mismatches; first: x={x[bad][:5].tolist()} "
        f"got={got[bad][:5].tolist()} want={want[bad][:5].tolist()}"
    )


def _nvcc_archs() -> list[str]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    archs = ["sm_80", "sm_90a"]
    if "compute_100" in listed:
        archs.append("sm_100a")
    return archs


_INSTANTIATIONS = r"""
#include "merge_attn_states.cuh"
namespace attnmerge {
#define INSTANCE(...) template __global__ void merge_two_kernel<__VA_ARGS__>(const MergeParams);
// the last two arguments: whether the instance writes the output LSE, LSEs in base 2
INSTANCE(BF16, BF16, FP8E4M3, 8, 16, 1, 0, 128, true, false)
INSTANCE(BF16, BF16, FP8E4M3, 8, 16, 4, 0, 128, false, true)
INSTANCE(F16, F16, F16, 8, 16, 2, 0, 128, true, false)
INSTANCE(F32, F32, FP8E4M3, 4, 32, 2, 0, 128, false, false)
// a team of 128: the loop over further column chunks
INSTANCE(F32, BF16, BF16, 1, 128, 1, 0, 128, true, true)
INSTANCE(F32, F32, F32, 4, 128, 1, 1, 128, true, false)
// the per-thread-weights variant (WEIGHTS = 1, the default), with 32- and 16-byte chunks
INSTANCE(BF16, BF16, FP8E4M3, 16, 8, 1, 1, 128, false, false)
INSTANCE(BF16, BF16, FP8E4M3, 16, 8, 1, 1, 128, true, true)
INSTANCE(BF16, BF16, FP8E4M3, 8, 16, 1, 1, 128, false, false)
INSTANCE(F32, F32, FP8E4M3, 4, 32, 2, 1, 128, true, false)
// small blocks: one team of 8 threads, and two teams of 16
INSTANCE(BF16, BF16, FP8E4M3, 16, 8, 1, 1, 8, true, true)
INSTANCE(F16, F16, F16, 8, 16, 1, 0, 32, false, false)
}
"""


@pytest.mark.parametrize(
    "arch", _nvcc_archs() or [pytest.param("none", marks=pytest.mark.skip(reason="no nvcc"))]
)
def test_kernels_compile_with_nvcc(arch, tmp_path):
    src = tmp_path / "instantiate.cu"
    src.write_text(_INSTANTIATIONS)
    number = arch[3:]
    proc = subprocess.run(
        [
            "nvcc",
            "-std=c++17",
            f"-I{CSRC}",
            f"-gencode=arch=compute_{number},code={arch}",
            "-cubin",
            "-Xptxas",
            "-v",
            "-o",
            str(tmp_path / "k.cubin"),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Registers only: no kernel spills to local memory.
    spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    assert spills and all(n == "0" for n in spills), proc.stderr[-4000:]
    assert (tmp_path / "k.cubin").read_bytes()[:4] == b"\x7fELF"


_PARAMS_HARNESS = r"""
#include <cstdio>
#include "merge_attn_states.cuh"
int main() {
  attnmerge::MergeParams p;
  if (fread(&p, sizeof(p), 1, stdin) != 1) return 1;
  const unsigned long long fields[] = {
      (unsigned long long)p.out, (unsigned long long)p.prefix,
      (unsigned long long)p.prefix_lse, (unsigned long long)p.suffix,
      (unsigned long long)p.suffix_lse, (unsigned long long)p.scale, p.num_rows, p.num_heads,
      p.head_size, p.rows_with_prefix, p.heads_multiplier, p.heads_shift,
      p.out_stride_t, p.out_stride_h, p.prefix_stride_t, p.prefix_stride_h,
      p.suffix_stride_t, p.suffix_stride_h, p.prefix_lse_stride_h, p.prefix_lse_stride_t,
      p.suffix_lse_stride_h, p.suffix_lse_stride_t, (unsigned long long)p.out_lse,
      p.out_lse_stride_h, p.out_lse_stride_t};
  for (unsigned long long f : fields) printf("%llu\n", f);
  return 0;
}
"""


def test_params_struct_layout_matches_the_launcher(tmp_path):
    """The Python launcher packs MergeParams byte by byte: every field must land where the
    kernel reads it."""
    from attnmerge.cuda import backend

    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    (tmp_path / "p.cpp").write_text(_PARAMS_HARNESS)
    exe = tmp_path / "p"
    subprocess.run(
        [cxx, "-std=c++17", f"-I{CSRC}", str(tmp_path / "p.cpp"), "-o", str(exe)], check=True
    )
    pointers = [2**48 + 1000 + i for i in range(6)]
    words = [2**32 - 3, 2**31 - 1, 576, 12345, 2**32 - 1, 31]
    words += [2**32 - 100 - i for i in range(10)]  # strides: all 32 bits
    values = [*pointers, *words, 2**47 + 7, 2**31 + 5, 3]
    packed = backend._PARAMS.pack(*values)
    out = subprocess.run([str(exe)], input=packed, capture_output=True, check=True).stdout
    assert [int(v) for v in out.split()] == values


def _divisors_to_check() -> list[int]:
    powers = [1 << k for k in range(1, 31)]
    near_powers = sorted({p + d for p in powers for d in (-1, 1)} | {2**31 - 1})
    g = torch.Generator().manual_seed(0)
    random = torch.randint(2, 2**31 - 1, (300,), generator=g).tolist()
    return sorted(set(range(1, 1100)) | set(powers) | set(near_powers) | set(random))


def test_row_divisor_gives_the_token_of_every_row():
    """The kernel divides row indices by their inner count (the head count, or the token
    count for head-major rows) with the launcher's multiplier and shift (token_of): the
    quotient must be exact for every row below 2^31 and any count. Checked at the rows
    where an error would show first (multiples of the count and their neighbours, the
    largest rows) and at random rows."""
    from attnmerge.cuda.backend import row_divisor

    last = 2**31 - 1
    g = torch.Generator().manual_seed(1)
    random_rows = torch.randint(0, last, (256,), generator=g)
    for heads in _divisors_to_check():
        multiplier, shift = row_divisor(heads)
        assert 0 < multiplier < 2**32 and 0 <= shift < 32
        top = last // heads
        k = torch.tensor([1, 2, 3, top - 1, top, max(top // 2, 1)])
        edges = torch.cat([k * heads - 1, k * heads, k * heads + 1])
        rows = torch.cat([torch.tensor([0, 1, last, last - 1]), edges, random_rows])
        rows = rows[(rows >= 0) & (rows <= last)]
        # token_of: the high word of 2 row * m, i.e. floor(row * m / 2^31), shifted
        got = ((rows * multiplier) >> 31) >> shift
        assert torch.equal(got, rows // heads), heads


def test_instance_choice():
    from attnmerge.cuda.backend import (
        ROWS_LARGE,
        ROWS_SMALL,
        WEIGHTS,
        common_instances,
        instance_for,
        vector_width,
    )

    # 32-byte chunks of the widest input where the head size allows, else 16-byte ones;
    # one row per team of ceil(D / vec) threads (pow2).
    bf16, f32 = torch.bfloat16, torch.float32
    assert vector_width(128, 2, 32) == 16 and vector_width(128, 4, 32) == 8
    assert vector_width(72, 2, 32) == 8 and vector_width(36, 4, 32) == 4  # 16-byte fallback
    assert vector_width(13, 2, 32) == 1 and vector_width(20, 4, 32) == 4
    assert vector_width(6, 4, 32) == 1 and vector_width(128, 2, 8) == 4
    assert instance_for(bf16, bf16, torch.float8_e4m3fn, 128, 16) == (
        "BF16", "BF16", "FP8E4M3", 16, 8, ROWS_SMALL, WEIGHTS, 128, 0, 0
    )  # fmt: skip
    # 144 chunks: the team of 128 loops; weights computed by a warp (a tuning variant)
    assert instance_for(f32, f32, f32, 576, 4, ROWS_LARGE, 0, write_lse=True) == (
        "F32", "F32", "F32", 4, 128, ROWS_LARGE, 0, 128, 1, 0
    )  # fmt: skip
    assert instance_for(f32, f32, f32, 64, 8, lse_base_2=True)[8:] == (0, 1)
    # blocks smaller than 128 data threads hold whole teams, and at least one
    assert instance_for(bf16, bf16, bf16, 128, 16, threads=16)[4:8] == (8, ROWS_SMALL, WEIGHTS, 16)
    assert instance_for(bf16, bf16, bf16, 128, 4, threads=16)[7] == 32  # one team of 32
    assert instance_for(bf16, bf16, bf16, 128, 16, threads=24)[7] == 32  # whole teams: pow2
    assert instance_for(bf16, bf16, bf16, 128, 16, threads=512)[7] == 128
    assert instance_for(torch.float16, torch.float16, torch.float16, 72, 1)[4] == 128
    insts = common_instances((128, 72))
    for vec, team, rows in ((16, 8, ROWS_SMALL), (8, 16, ROWS_SMALL), (1, 128, 1)):
        for lse, base_2 in itertools.product((0, 1), repeat=2):  # output LSE, LSE base
            inst = ("BF16", "BF16", "FP8E4M3", vec, team, rows, WEIGHTS, 128, lse, base_2)
            assert inst in insts
    # every grid takes one row per team: no other row count is built ahead of time
    assert {inst[5] for inst in insts} == {ROWS_SMALL}
    assert instance_for(bf16, bf16, bf16, 13, 1, 4)[5] == 1  # scalar fallback: one row a team
    assert len(insts) == len(set(insts))


def test_rows_per_team_by_grid_size(monkeypatch):
    from attnmerge.cuda import backend

    assert {backend.rows_per_team(n) for n in (1, 8192, 2**31 - 1)} == {backend.ROWS_SMALL}
    # the rule that tuning runs switch on
    monkeypatch.setattr(backend, "SMALL_GRID_ROWS", 100)
    monkeypatch.setattr(backend, "LARGE_GRID_ROWS", 1000)
    assert [backend.rows_per_team(n) for n in (1, 100, 101, 1000, 1001)] == [
        backend.ROWS_SMALL,
        backend.ROWS_SMALL,
        backend.ROWS_MEDIUM,
        backend.ROWS_MEDIUM,
        backend.ROWS_LARGE,
    ]
    monkeypatch.setattr(backend, "SMALL_GRID_CHUNKS", {})
    assert [r for _, r, _ in backend._grid_layouts()] == [
        backend.ROWS_SMALL,
        backend.ROWS_MEDIUM,
        backend.ROWS_LARGE,
    ]
    assert backend.ROWS_SMALL < backend.ROWS_MEDIUM < backend.ROWS_LARGE


def test_data_threads_by_grid_size(monkeypatch):
    from attnmerge.cuda import backend

    monkeypatch.setattr(backend, "SMALL_BLOCK_GRID_ROWS", 100)
    monkeypatch.setattr(backend, "SMALL_BLOCK_THREADS", 32)
    monkeypatch.setattr(backend, "SMALL_GRID_CHUNKS", {})
    assert [backend.data_threads(n) for n in (1, 100, 101)] == [32, 32, backend.DATA_THREADS]
    assert backend._grid_layouts() == [
        (backend.CHUNK_BYTES, backend.ROWS_SMALL, 32),
        (backend.CHUNK_BYTES, backend.ROWS_SMALL, backend.DATA_THREADS),
    ]
    # both block sizes are built ahead of time, for vector and scalar accesses
    insts = backend.common_instances((128,))
    bf16 = ("BF16", "BF16", "FP8E4M3")
    assert {i[7] for i in insts if i[:3] == bf16 and i[3] == 16} == {32, backend.DATA_THREADS}
    assert {i[7] for i in insts if i[:3] == bf16 and i[3] == 1} == {backend.DATA_THREADS}


def test_chunk_bytes_by_grid_size():
    from attnmerge.cuda import backend

    dtype = {2: torch.bfloat16, 4: torch.float32}
    insts = backend.common_instances((128,))
    assert set(backend.SMALL_GRID_CHUNKS) == {(w, lse) for w in (2, 4) for lse in (False, True)}
    for (widest, lse), tiers in backend.SMALL_GRID_CHUNKS.items():
        first = 1
        for last, chunk in tiers:  # each tier's first and last grid sizes
            assert backend.chunk_bytes_for(first, widest, 1, lse) == chunk
            assert backend.chunk_bytes_for(last, widest, 1, lse) == chunk
            first = last + 1
        assert backend.chunk_bytes_for(first, widest, 1, lse) == backend.CHUNK_BYTES
        # every chunk size is built ahead of time, for calls with and without output LSE
        chunks = {chunk for _, chunk in tiers} | {backend.CHUNK_BYTES}
        assert {c for c, _, _ in backend._grid_layouts(widest, 1, lse)} == chunks
        el = backend._ELEMENT[dtype[widest]]
        vecs = {i[3] for i in insts if i[:3] == (el, el, "FP8E4M3") and i[8] == lse}
        assert vecs == {1} | {c // widest for c in chunks}
        # into outputs of the partials' dtype, only chunks of at most 16 bytes of output
        capped = {min(c, backend.MAX_STORE_BYTES) for c in chunks}
        assert {c for c, _, _ in backend._grid_layouts(widest, widest, lse)} == capped
        vecs = {i[3] for i in insts if i[:3] == (el, el, el) and i[8] == lse}
        assert vecs == {1} | {c // widest for c in capped}


def test_vector_accesses_need_aligned_row_chunks():
    from attnmerge.cuda.backend import _aligned

    def aligned(t: torch.Tensor) -> bool:
        return _aligned(t.data_ptr(), t.stride(), t.itemsize, 8)

    buf = torch.empty(4 * 8 * 136 + 8, dtype=torch.bfloat16)
    assert aligned(buf[: 4 * 8 * 128].view(4, 8, 128))
    assert not aligned(buf[1 : 1 + 4 * 8 * 128].view(4, 8, 128))  # offset 2 B
    padded = buf[: 4 * 8 * 136].view(4, 8, 136)[..., :128]  # head stride 272 B: 16 B aligned
    assert aligned(padded)
    odd = buf[: 4 * 8 * 132].view(4, 8, 132)[..., :128]  # head stride 264 B: not 16 B aligned
    assert not aligned(odd)
    fp8 = torch.empty(4, 8, 136, dtype=torch.float8_e4m3fn)[..., :128]  # 8 B chunks suffice
    assert _aligned(fp8.data_ptr(), fp8.stride(), 1, 8)


def test_build_command_compiles_through_the_first_use_path(tmp_path, monkeypatch):
    from attnmerge import cli
    from attnmerge.cuda import backend, cache, nvrtc

    reason = nvrtc.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("ATTNMERGE_CACHE_DIR", str(tmp_path))
    assert cli.main(["build", "--arch", "sm_90a", "--head-sizes", "128", "--jobs", "1"]) == 0
    built = [e for e in cache.entries() if e["path"].endswith(".cubin")]
    assert len(built) == len(backend.common_instances((128,)))
    assert len(built) >= 12  # 3 partial dtypes x 4 outputs x (vector, scalar)
    assert all(Path(e["path"]).read_bytes()[:4] == b"\x7fELF" for e in built)
    # every pair of partial dtypes, built by two processes at once into the same cache
    args = ["build", "--arch", "sm_90a", "--head-sizes", "128", "--mixed-dtypes", "--jobs", "2"]
    assert cli.main(args) == 0
    mixed = backend.common_instances((128,), mixed_dtypes=True)
    assert len(mixed) > len(built)
    assert len([e for e in cache.entries() if e["path"].endswith(".cubin")]) == len(mixed)
    assert cli.main(["build", "--jobs", "0"]) == 2


def test_stream_kernel_compiles():
    """The bench's CUDA stream yardstick (attnmerge/cuda/stream.py) builds for the element
    types and vector widths it is launched with, and its parameter struct matches."""
    from attnmerge.cuda import nvrtc, stream

    assert stream._PARAMS.size == 88  # static_assert(sizeof(StreamParams) == 88) in the source
    if nvrtc.unavailable_reason() is not None:
        pytest.skip(nvrtc.unavailable_reason())
    for instance in ("BF16, FP8E4M3, 8, 16", "F32, FP8E4M3, 2, 64", "F16, F16, 1, 128"):
        text = f"#define ATTNMERGE_STREAM_TWO_INSTANCE {instance}\n" + stream.source()
        assert nvrtc.compile_cubin(text, name="stream_two.cu", arch="sm_90a").cubin


@pytest.mark.parametrize(
    "script, count, vec, write_lse",
    # vec and write_lse: the instance each times
    [("weight_math_cost", 4, 16, False), ("merge_cost", 11, 8, False), ("lse_cost", 6, 8, True)],
)
def test_kernel_variant_scripts_still_apply(script, count, vec, write_lse):
    """scripts/weight_math_cost.py, merge_cost.py and lse_cost.py edit the kernel source
    by text: each of their variants must still differ from the kernel (the edited lines
    exist) and compile."""
    import importlib.util
    import sys

    from attnmerge.cuda import backend, nvrtc

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(scripts))  # merge_cost imports weight_math_cost
    try:
        spec = importlib.util.spec_from_file_location(script, scripts / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(scripts))
    variants = module.variants(backend.source())
    assert variants["default"] == backend.source()
    assert len(set(variants.values())) == len(variants) == count
    if nvrtc.unavailable_reason() is not None:
        pytest.skip(nvrtc.unavailable_reason())
    instance = backend.instance_for(
        torch.bfloat16, torch.bfloat16, torch.float8_e4m3fn, 128, vec, write_lse=write_lse
    )
    define = f"#define ATTNMERGE_MERGE_TWO_INSTANCE {backend.template_arguments(instance)}\n"
    for name, text in variants.items():
        assert nvrtc.compile_cubin(define + text, name=f"{name}.cu", arch="sm_90a").cubin


def test_param_block_script_pads_the_stream_kernel():
    """scripts/param_block_cost.py pads the stream kernel's parameters by editing its
    source: every padded source must differ, and compile (its static_assert checks the
    padded size)."""
    import importlib.util

    from attnmerge.cuda import nvrtc, stream

    path = Path(__file__).resolve().parents[1] / "scripts" / "param_block_cost.py"
    spec = importlib.util.spec_from_file_location("param_block_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sources = [module.padded_source(n) for n in module.PADDINGS]
    assert sources[0] == stream.source() and len(set(sources)) == len(sources)
    if nvrtc.unavailable_reason() is not None:
        pytest.skip(nvrtc.unavailable_reason())
    for n, text in zip(module.PADDINGS, sources, strict=True):
        text = "#define ATTNMERGE_STREAM_TWO_INSTANCE BF16, FP8E4M3, 8, 16\n" + text
        assert nvrtc.compile_cubin(text, name=f"pad{n}.cu", arch="sm_90a").cubin
