"""The CUDA sources and the launcher's rules, checked without a GPU.

* The software float32 -> e4m3fn conversion (used on GPUs without FP8 hardware) is
  compiled for the host with the system C++ compiler and compared bit for bit with
  torch's cast on every tie point, its neighbours and random values.
* Every kernel configuration ``attnmerge build`` prepares compiles with nvcc for every
  target architecture (sm_80, sm_90a, and sm_100a where the toolkit has it), without
  spilling, as a user's first-use build would.
* The parameter block the launcher packs (derived from the ``MergeParams`` declaration)
  has the C++ struct's layout, field by field.
* The launcher's rules: the row divisor, vector widths, chunk sizes, kernel
  configurations, and that every output format names epilogues that exist.
"""

from __future__ import annotations

import itertools
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "src" / "attnmerge" / "cuda" / "csrc"

_HOST_HARNESS = r"""
#include <cstdio>
#include <cstdint>
#include "common.cuh"
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


def _instantiations(configs) -> str:
    """A translation unit with one kernel per configuration, as the launcher's build
    instantiates them (merge_two_rows or merge_partial_rows with the configuration's
    template_arguments()), and the launcher's own entry points (attnmerge_merge,
    attnmerge_merge_partials) for the first of each kind."""
    from attnmerge.cuda.backend import KernelConfig, PartialsKernelConfig

    first_two = next(c for c in configs if isinstance(c, KernelConfig))
    first_partials = next(c for c in configs if isinstance(c, PartialsKernelConfig))
    lines = [
        f"#define ATTNMERGE_MERGE_INSTANCE {first_two.template_arguments()}",
        f"#define ATTNMERGE_PARTIALS_INSTANCE {first_partials.template_arguments()}",
        '#include "partials.cuh"',
        "namespace attnmerge {",
    ]
    for i, config in enumerate(configs):
        two = isinstance(config, KernelConfig)
        params, body, bounds = ("MergeParams", "merge_two_rows", "kBlockThreads") if two else (
            "PartialsParams", "merge_partial_rows", "kBlockThreads, 1")  # fmt: skip
        lines.append(
            f'extern "C" __global__ void __launch_bounds__({bounds}) config_{i}('
            f"const {params} p) {{ {body}<{config.template_arguments()}>(p); }}"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "arch", _nvcc_archs() or [pytest.param("none", marks=pytest.mark.skip(reason="no nvcc"))]
)
def test_every_common_config_compiles_with_nvcc(arch, tmp_path):
    """Every configuration `attnmerge build` prepares (common_configs: all the code paths
    the launcher can pick for the common head sizes) compiles for every target, with
    registers only: no kernel spills to local memory. sm_80 takes the software FP8
    conversion, sm_90a and later the hardware one."""
    from attnmerge.cuda import backend

    configs = backend.common_configs()
    src = tmp_path / "instantiate.cu"
    src.write_text(_instantiations(configs))
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
    spills = dict(
        re.findall(
            r"Function properties for (\w+)\n\s*\d+ bytes stack frame, (\d+) bytes spill",
            proc.stderr,
        )
    )
    names = {f"config_{i}": c.template_arguments() for i, c in enumerate(configs)}
    names["attnmerge_merge"] = "the two-partial entry point"
    names["attnmerge_merge_partials"] = "the stacked/packed entry point"
    assert spills.keys() == names.keys(), proc.stderr[-4000:]
    spilling = {names[f]: f"{n} bytes" for f, n in spills.items() if n != "0"}
    assert not spilling, f"kernels that spill on {arch}: {spilling}"
    assert (tmp_path / "k.cubin").read_bytes()[:4] == b"\x7fELF"


def _param_layout(block) -> dict[str, tuple[int, int]]:
    """{field: (offset, size)} where ``block.pack`` puts each field: found by packing one
    field at a time with a value whose every byte is nonzero (a 64-bit one where it fits,
    else a 32-bit one) and the others zero."""
    layout = {}
    for field in block.fields:
        zeros = dict.fromkeys(block.fields, 0)
        for value in (0x0102030405060708, 0x01020304):
            try:
                packed = block.pack(**{**zeros, field: value})
            except struct.error:  # a 32-bit field
                continue
            break
        nonzero = [i for i, b in enumerate(packed) if b]
        layout[field] = (nonzero[0], nonzero[-1] + 1 - nonzero[0])
    return layout


_PARAMS_HARNESS = r"""
#include <cstddef>
#include <cstdio>
#include "merge.cuh"
using attnmerge::MergeParams;

// The number of members of an aggregate: the most initialisers it accepts.
struct Any {
  template <class T>
  constexpr operator T() const;
};
template <class T, class... A>
constexpr int count_members() {
  if constexpr (requires { T{A{}..., Any{}}; }) {
    return count_members<T, A..., Any>();
  } else {
    return sizeof...(A);
  }
}

int main() {
  printf("%d %zu\n", count_members<MergeParams>(), sizeof(MergeParams));
#define FIELD(f) printf(#f " %zu %zu\n", offsetof(MergeParams, f), sizeof(MergeParams::f));
  FIELDS
  // a packed block, read as the kernel reads it
  MergeParams p;
  if (fread(&p, sizeof(p), 1, stdin) != 1) return 1;
#undef FIELD
#define FIELD(f) printf("%llu\n", (unsigned long long)p.f);
  FIELDS
  return 0;
}
"""


def test_params_struct_layout_matches_the_launcher(tmp_path):
    """The launcher packs MergeParams byte by byte from its own reading of the declaration
    (cuda_backend.PARAMS): the struct compiled by g++ must have exactly those fields, each
    at the offset and of the size the packing gives it, and a packed block must read back
    field by field with the values packed (pointers and strides over all their bits)."""
    from attnmerge.cuda import backend

    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    params = backend.PARAMS
    fields = " ".join(f"FIELD({f})" for f in params.fields)
    (tmp_path / "p.cpp").write_text(_PARAMS_HARNESS.replace("FIELDS", fields))
    exe = tmp_path / "p"
    subprocess.run(
        [cxx, "-std=c++20", f"-I{CSRC}", str(tmp_path / "p.cpp"), "-o", str(exe)], check=True
    )
    layout = _param_layout(params)
    values = {}
    for i, (field, (_, size)) in enumerate(layout.items()):
        values[field] = (2**48 if size == 8 else 2**31) + 1000 * i + 7  # top bits set too
    out = (
        subprocess.run([str(exe)], input=params.pack(**values), capture_output=True, check=True)
        .stdout.decode()
        .splitlines()
    )
    members, size = map(int, out[0].split())
    assert members == len(params.fields) == len(layout)  # no field missed or invented
    assert size == params.size == 128  # static_assert(sizeof(MergeParams) == 128)
    cxx_layout = {f: (int(o), int(n)) for f, o, n in (line.split() for line in out[1:][:members])}
    assert cxx_layout == layout
    assert [int(v) for v in out[1 + members :]] == list(values.values())


def test_param_block_rejects_what_it_cannot_pack():
    """ParamBlock reads pointers and 32-bit fields only: any other field type is refused
    at import (naming it), as is a missing struct; PARAMS.pack takes every field by
    keyword and refuses a missing or an unknown one."""
    from attnmerge.cuda import backend
    from attnmerge.cuda.params import ParamBlock

    struct_source = "struct P {\n  void* a;\n  u32 n, m;\n  double x;\n};\n"
    with pytest.raises(ValueError, match="'double' is not supported"):
        ParamBlock(struct_source, "P")
    with pytest.raises(ValueError, match="no struct Q"):
        ParamBlock(struct_source, "Q")
    ok = ParamBlock(struct_source.replace("  double x;\n", ""), "P")
    assert ok.fields == ("a", "n", "m") and ok.size == 16
    values = dict.fromkeys(backend.PARAMS.fields, 0)
    assert len(backend.PARAMS.pack(**values)) == backend.PARAMS.size
    missing = {k: v for k, v in values.items() if k != "inner_count"}
    with pytest.raises(TypeError, match="inner_count"):
        backend.PARAMS.pack(**missing)
    with pytest.raises(TypeError, match="bogus"):
        backend.PARAMS.pack(**values, bogus=1)
    with pytest.raises(struct.error):  # a value past its field's 32 bits
        backend.PARAMS.pack(**{**values, "out_stride_outer": 2**32})


def _divisors_to_check() -> list[int]:
    powers = [1 << k for k in range(1, 31)]
    near_powers = sorted({p + d for p in powers for d in (-1, 1)} | {2**31 - 1})
    g = torch.Generator().manual_seed(0)
    random = torch.randint(2, 2**31 - 1, (300,), generator=g).tolist()
    return sorted(set(range(1, 1100)) | set(powers) | set(near_powers) | set(random))


def test_row_divisor_gives_the_outer_index_of_every_row():
    """The kernel divides row indices by their inner count (the head count, or the token
    count for head-major rows) with the launcher's multiplier and shift (outer_of): the
    quotient must be exact for every row below 2^31 and any count. Checked at the rows
    where an error would show first (multiples of the count and their neighbours, the
    largest rows) and at random rows."""
    from attnmerge.cuda.backend import row_divisor

    last = 2**31 - 1
    g = torch.Generator().manual_seed(1)
    random_rows = torch.randint(0, last, (256,), generator=g)
    for count in _divisors_to_check():
        multiplier, shift = row_divisor(count)
        assert 0 < multiplier < 2**32 and 0 <= shift < 32
        top = last // count
        k = torch.tensor([1, 2, 3, top - 1, top, max(top // 2, 1)])
        edges = torch.cat([k * count - 1, k * count, k * count + 1])
        rows = torch.cat([torch.tensor([0, 1, last, last - 1]), edges, random_rows])
        rows = rows[(rows >= 0) & (rows <= last)]
        # outer_of: the high word of 2 row * m, i.e. floor(row * m / 2^31), shifted
        got = ((rows * multiplier) >> 31) >> shift
        assert torch.equal(got, rows // count), count


def test_kernel_configs():
    """Vector widths (32-byte chunks of the widest partial where the head size allows,
    else 16-byte ones, else scalar), teams of ceil(D / vec) threads rounded up to a power
    of two and at most a block, and the template arguments each configuration names."""
    from attnmerge.cuda.backend import (
        BLOCK_THREADS,
        COMMON_HEAD_SIZES,
        KernelConfig,
        common_configs,
        config_for,
        vector_width,
    )
    from attnmerge.formats import FormatKey, FP8Static, Plain

    bf16, f32 = torch.bfloat16, torch.float32
    fp8 = FormatKey(FP8Static, torch.float8_e4m3fn)
    assert vector_width(128, 2, 32) == 16 and vector_width(128, 4, 32) == 8
    assert vector_width(72, 2, 32) == 8 and vector_width(36, 4, 32) == 4  # 16-byte fallback
    assert vector_width(13, 2, 32) == 1 and vector_width(20, 4, 32) == 4
    assert vector_width(6, 4, 32) == 1 and vector_width(128, 2, 8) == 4
    config = config_for((bf16, bf16), fp8, 128, 16)
    assert config == KernelConfig(
        ("BF16", "BF16"), "FP8StaticStore", "FP8E4M3", 16, 8, False, False
    )
    assert config.template_arguments() == (
        "attnmerge::BF16, attnmerge::BF16, attnmerge::FP8StaticStore<attnmerge::FP8E4M3>, "
        "16, 8, false, false"
    )
    assert config.rows_per_block == BLOCK_THREADS // 8 == 16
    # 144 chunks: the team of a whole block loops; the flags are the last arguments
    wide = config_for((f32, bf16), FormatKey(Plain, f32), 576, 4, write_lse=True, lse_base_2=True)
    assert (wide.team, wide.rows_per_block, wide.partial_elements) == (128, 1, ("F32", "BF16"))
    assert wide.template_arguments().endswith(
        "attnmerge::PlainStore<attnmerge::F32>, 4, 128, true, true"
    )
    assert config_for((bf16, bf16), fp8, 72, 1).team == 128  # scalar: 72 threads, pow2
    assert config_for((bf16, bf16), fp8, 8, 8).team == 1  # a row per thread
    # every (vec, team) a bf16 -> FP8 call with D = 128 or 72 can take, in every flag pair
    configs = common_configs((128, 72))
    for vec, team in ((16, 8), (8, 16), (1, 128)):
        for lse, base_2 in itertools.product((False, True), repeat=2):
            want = KernelConfig(
                ("BF16", "BF16"), "FP8StaticStore", "FP8E4M3", vec, team, lse, base_2
            )
            assert want in configs
    everything = common_configs()
    assert COMMON_HEAD_SIZES == (64, 80, 96, 128, 192, 256, 512)
    # what `attnmerge build` prepares by default (docs/cuda-backend.md gives its build
    # time): 392 two-partial kernels, 288 for stacked or packed partials
    assert len(everything) == len(set(everything)) == 680
    assert sum(isinstance(c, KernelConfig) for c in everything) == 392
    assert all(c.team & (c.team - 1) == 0 and c.team <= BLOCK_THREADS for c in everything)
    mixed = [c for c in common_configs((128,), mixed_dtypes=True) if isinstance(c, KernelConfig)]
    assert {c.partial_elements for c in mixed} == {
        (p, s) for p in ("F32", "F16", "BF16") for s in ("F32", "F16", "BF16")
    }


def test_chunk_bytes_by_grid_size():
    """Each small-grid tier's chunk size applies from its first grid size to its last,
    CHUNK_BYTES past them, capped at MAX_STORE_BYTES of output; and every chunk size a
    call can get is among the configurations built ahead of time, with and without the
    output LSE."""
    from attnmerge.cuda import backend

    dtype = {2: torch.bfloat16, 4: torch.float32}
    configs = [c for c in backend.common_configs((128,)) if isinstance(c, backend.KernelConfig)]
    assert set(backend.SMALL_GRID_CHUNKS) == {(w, lse) for w in (2, 4) for lse in (False, True)}
    for (widest, lse), tiers in backend.SMALL_GRID_CHUNKS.items():
        first = 1
        for last, chunk in tiers:  # each tier's first and last grid sizes
            assert backend.chunk_bytes_for(first, widest, 1, lse) == chunk
            assert backend.chunk_bytes_for(last, widest, 1, lse) == chunk
            first = last + 1
        assert backend.chunk_bytes_for(first, widest, 1, lse) == backend.CHUNK_BYTES
        assert backend.chunk_bytes_for(2**31 - 1, widest, 1, lse) == backend.CHUNK_BYTES
        chunks = {chunk for _, chunk in tiers} | {backend.CHUNK_BYTES}
        el = backend._ELEMENT[dtype[widest]]
        # into FP8 every chunk size, as vectors of the head size 128 divides, and scalars
        vecs = {c.vec for c in configs if c.partial_elements == (el, el)
                and c.epilogue == "FP8StaticStore" and c.write_lse == lse}  # fmt: skip
        assert vecs == {1} | {c // widest for c in chunks}
        # into outputs of the partials' dtype, only chunks of at most 16 bytes of output
        capped = {min(c, backend.MAX_STORE_BYTES) for c in chunks}
        assert {backend.chunk_bytes_for(n, widest, widest, lse) for n in (1, first)} <= capped
        assert backend.chunk_bytes_for(first, widest, widest, lse) == backend.MAX_STORE_BYTES
        vecs = {c.vec for c in configs if c.partial_elements == (el, el)
                and c.epilogue == "PlainStore" and c.output_element == el
                and c.write_lse == lse}  # fmt: skip
        assert vecs == {1} | {c // widest for c in capped}


def test_vector_accesses_need_aligned_row_chunks():
    """Vector accesses need every row chunk aligned to min(16, vec * itemsize) bytes:
    base pointer, token stride and head stride."""
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
    """`attnmerge build` compiles every configuration of common_configs() with NVRTC into
    the cache through build_kernel (the first-use path), each a cubin; two processes
    building every pair of partial dtypes at once fill the same cache."""
    from attnmerge import cli
    from attnmerge.cuda import backend, cache, nvrtc

    reason = nvrtc.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("ATTNMERGE_CACHE_DIR", str(tmp_path))
    assert cli.main(["build", "--arch", "sm_90a", "--jobs", "2"]) == 0  # the default sizes
    built = [e for e in cache.entries() if e["path"].endswith(".cubin")]
    assert len(built) == len(backend.common_configs()) == 680
    assert all(Path(e["path"]).read_bytes()[:4] == b"\x7fELF" for e in built)
    assert {e["key"]["kernel"] for e in built} == {
        f"{c.kernel_name}<{c.template_arguments()}>" for c in backend.common_configs()
    }
    # every pair of partial dtypes, built by two processes at once into the same cache
    args = ["build", "--arch", "sm_90a", "--head-sizes", "128", "--mixed-dtypes", "--jobs", "2"]
    assert cli.main(args) == 0
    mixed = {
        f"{c.kernel_name}<{c.template_arguments()}>"
        for c in backend.common_configs((128,), mixed_dtypes=True)
    }
    entries = [e for e in cache.entries() if e["path"].endswith(".cubin")]
    assert {e["key"]["kernel"] for e in entries} == mixed | {e["key"]["kernel"] for e in built}
    assert cli.main(["build", "--jobs", "0"]) == 2


def test_every_output_format_names_epilogues_that_exist():
    """Each output format class in attnmerge.formats that the kernels store names its
    CUDA store (a functor template over the element type in cuda/csrc/epilogues.cuh) and
    its Triton epilogue (a @triton.jit function in attnmerge.triton.epilogues); the
    launcher's configurations name the format's CUDA store. A backend without the
    format's epilogue (None) is refused by dispatch (tests/test_formats_dynamic.py)."""
    import triton

    from attnmerge import formats
    from attnmerge.cuda import backend
    from attnmerge.triton import epilogues

    classes = [
        c for c in vars(formats).values()
        if isinstance(c, type) and issubclass(c, formats.OutputFormat)
        and c is not formats.OutputFormat and c.__module__ == formats.__name__
    ]  # fmt: skip
    assert {c.__name__ for c in classes} >= {"Plain", "FP8Static", "FP8PerTokenGroup"}
    cuda_source = backend.sources()["epilogues.cuh"]
    # a @triton.jit function (an interpreted one under TRITON_INTERPRET=1) of the
    # epilogue's arguments (triton/epilogues.py) -> the values to store
    arguments = ["scale_ub_ptr", "token_amax", "tok", "head", "row_ok", "num_tokens"]
    arguments += ["stride_t", "stride_g", "NUM_HEADS", "HEAD_SIZE", "BLOCK_D", "GROUP"]
    arguments += ["UE8M0", "UE8M0_PACKED", "SCALE_UB"]
    for cls in classes:
        if cls.triton_epilogue is not None:
            epilogue = getattr(epilogues, cls.triton_epilogue, None)
            assert isinstance(epilogue, triton.runtime.jit.KernelInterface), cls
            assert epilogue.arg_names[0] == "acc", cls  # then the operand, any name
            assert epilogue.arg_names[2:] == arguments, cls
        if cls.cuda_epilogue is None:  # (None: dispatch refuses it for the cuda kernels)
            continue
        functor = re.escape(cls.cuda_epilogue)
        assert re.search(rf"template <typename E>\s*struct {functor}\s*\{{", cuda_source), cls
        dtype = torch.float8_e4m3fn if cls is formats.FP8Static else torch.float16
        config = backend.config_for((torch.float16,) * 2, formats.FormatKey(cls, dtype), 64, 8)
        assert config.epilogue == cls.cuda_epilogue


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_weight_division_kernels_compile(arch):
    """tests/test_weight_division.py (GPU only) checks the kernel's weight functions
    (two_partial_state, divide_weight, reciprocal_weight, weight_reciprocal) through test
    kernels that call them by name: those kernels still compile, so a renamed function or
    field shows here, without a GPU."""
    from attnmerge.cuda import nvrtc

    if nvrtc.unavailable_reason() is not None:
        pytest.skip(nvrtc.unavailable_reason())
    from test_weight_division import _compile

    assert _compile(arch)[:4] == b"\x7fELF"
