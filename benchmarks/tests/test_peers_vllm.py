"""benchmarks/peers, vLLM: exporting vLLM's merge from its sdist, the stand-in ``vllm``
package, the build commands of its CUDA op and the rewrite of vLLM's test. No GPU and no
network; the tests that read vLLM's own files skip where ``.peers/vllm`` is absent
(``benchmarks/peers/fetch_vllm.py``)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import urllib.error
from pathlib import Path

import pytest
import torch

from benchmarks.peers import fetch_vllm, run_vllm_tests
from benchmarks.peers import vllm as vllm_peer

ROOT = Path(__file__).resolve().parents[2]
HAVE_PEER = (vllm_peer.PEER / fetch_vllm.KERNEL).is_file() and all(
    (vllm_peer.PEER / p).is_file() for p in (*fetch_vllm.PYTHON, fetch_vllm.TEST)
)
needs_peer = pytest.mark.skipif(
    not HAVE_PEER, reason="no vLLM files in .peers/vllm (benchmarks/peers/fetch_vllm.py)"
)

# A small vLLM test with every line the rewrite relies on (run_vllm_tests.REQUIRED)
FAKE_TEST = textwrap.dedent(
    """\
    import pytest
    import torch

    from vllm._custom_ops import (
        merge_attn_states as merge_attn_states_native,
    )
    from vllm._custom_ops import (
        scaled_fp8_quant,
    )
    from vllm.platforms import current_platform
    from vllm.v1.attention.ops.triton_merge_attn_states import (
        merge_attn_states as merge_attn_states_triton,
    )

    DEVICE = current_platform.device_type


    @pytest.mark.parametrize(
        "merge_fn", [merge_attn_states_native, merge_attn_states_triton]
    )
    def test_one(merge_fn):
        pass


    def test_two():
        if True:
            merge_attn_states_native(
                output_native,
            )
        torch.testing.assert_close(
            output_native.float() * scale,
        )
        torch.testing.assert_close(
            output_lse_native.float(), output_lse_ref.float()
        )
    """
)
FAKE_SDIST = {
    "csrc/attention/merge_attn_states.cu": (
        '#include <optional>\n#include "../torch_utils.h"\n#include "core/vec.h"\n'
        '#include "quantization/fp8/common.cuh"\n#include <torch/headeronly/core/ScalarType.h>\n'
    ),
    "csrc/torch_utils.h": "#include <cublas_v2.h>\n",
    "csrc/core/vec.h": '#include "dtype.cuh"\n',
    "csrc/core/dtype.cuh": "#pragma once\n",
    "csrc/quantization/fp8/common.cuh": (
        '#include "core/vec.h"\n#ifdef USE_ROCM\n  #include "amd/utils.cuh"\n#endif\n'
        "#include <quantization/utils.cuh>\n"
    ),
    "csrc/quantization/fp8/amd/utils.cuh": '#include "hip/hip_fp8.h"\n',
    "csrc/quantization/utils.cuh": "#pragma once\n",
    "csrc/cache_kernels.cu": '#include "core/vec.h"\n',  # not reached
    "vllm/v1/attention/ops/merge_attn_states.py": "# dispatcher\n",
    "vllm/v1/attention/ops/triton_merge_attn_states.py": "# triton\n",
    "vllm/__init__.py": "# not exported\n",
    "vllm/_version.py": "__commit_id__ = commit_id = 'g0123abc'\n",
    "tests/kernels/attention/test_merge_attn_states.py": FAKE_TEST,
    "LICENSE": "Apache License\n",
}
REACHED = [
    "csrc/attention/merge_attn_states.cu",
    "csrc/core/dtype.cuh",
    "csrc/core/vec.h",
    "csrc/quantization/fp8/amd/utils.cuh",
    "csrc/quantization/fp8/common.cuh",
    "csrc/quantization/utils.cuh",
    "csrc/torch_utils.h",
]


def _sdist(path: Path, files: dict[str, str] = FAKE_SDIST, top: str = "vllm-9.9.9") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# --- fetch_vllm -------------------------------------------------------------------------


def test_includes() -> None:
    text = '#include "a.h"\n  # include <b/c.cuh>\n// #include "d.h"\n/*\n#include "e.h"\n*/\n'
    want = [("a.h", True), ("b/c.cuh", False), ("e.h", True)]  # a block comment is read
    assert fetch_vllm.includes(text) == want


def test_resolve_follows_the_includes() -> None:
    csrc = {p: t for p, t in FAKE_SDIST.items() if p.startswith("csrc/")}
    found, outside = fetch_vllm.resolve(csrc)
    assert sorted(found) == REACHED
    assert outside == [
        "cublas_v2.h",
        "hip/hip_fp8.h",
        "optional",
        "torch/headeronly/core/ScalarType.h",
    ]
    with pytest.raises(FileNotFoundError, match=r"nothing\.cu"):
        fetch_vllm.resolve(csrc, roots=("csrc/nothing.cu",))


def test_export(tmp_path: Path) -> None:
    dest = tmp_path / "vllm"
    (dest / "csrc" / "stale.h").parent.mkdir(parents=True)
    (dest / "csrc" / "stale.h").write_text("old")
    sdist = _sdist(tmp_path / "vllm-9.9.9.tar.gz")
    files = fetch_vllm.export(sdist, dest, "abc123", "test")
    want = sorted([*REACHED, *fetch_vllm.PYTHON, fetch_vllm.TEST, "LICENSE"])
    assert files == want
    for path in want:
        assert (dest / path).read_text() == FAKE_SDIST[path]
    assert not (dest / "csrc" / "stale.h").exists() and not (dest / "vllm/__init__.py").exists()
    record = fetch_vllm.read_record(dest)
    assert record["version"] == "9.9.9" and record["sha256"] == "abc123"
    assert record["commit"] == "0123abc" and record["source"] == "test"
    assert record["files"].split() == want


def test_export_needs_every_file(tmp_path: Path) -> None:
    files = {p: t for p, t in FAKE_SDIST.items() if p != fetch_vllm.TEST}
    with pytest.raises(FileNotFoundError, match=r"test_merge_attn_states\.py"):
        fetch_vllm.export(_sdist(tmp_path / "s.tar.gz", files), tmp_path / "d", "x", "test")


def test_a_wrong_sha256_is_refused(tmp_path: Path) -> None:
    sdist = _sdist(tmp_path / "vllm-9.9.9.tar.gz")
    args = ["--sdist", str(sdist), "--dest", str(tmp_path / "d"), "--sha256", "0" * 64]
    with pytest.raises(SystemExit, match="expected 0000"):
        fetch_vllm.main(args)
    assert not (tmp_path / "d").exists()
    good = fetch_vllm.sha256_of(sdist)
    assert fetch_vllm.main([*args[:-1], good]) == 0
    assert fetch_vllm.read_record(tmp_path / "d")["sha256"] == good


def test_sdist_on_pypi(monkeypatch: pytest.MonkeyPatch) -> None:
    """The release's JSON page, else the project's (an index mirror lacks the first), with
    relative file addresses resolved against the page."""
    entry = {"packagetype": "sdist", "filename": "vllm-1.0.tar.gz", "digests": {"sha256": "ab"}}
    wheel = {"packagetype": "bdist_wheel", "filename": "w.whl", "digests": {"sha256": "cd"}}
    pages = {
        "https://pypi.org/pypi/vllm/1.0/json": {"urls": [wheel, {**entry, "url": "https://f/s"}]},
        fetch_vllm.PROJECT_JSON: {"releases": {"2.0": [{**entry, "url": "../../p/s.tar.gz"}]}},
    }

    def get(url: str) -> bytes:
        if url not in pages:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]
        return json.dumps(pages[url]).encode()

    monkeypatch.setattr(fetch_vllm, "_get", get)
    assert fetch_vllm.sdist_on_pypi("1.0") == ("https://f/s", "vllm-1.0.tar.gz", "ab")
    assert fetch_vllm.sdist_on_pypi("2.0")[0] == "https://pypi.org/p/s.tar.gz"
    with pytest.raises(LookupError, match=r"3\.0"):
        fetch_vllm.sdist_on_pypi("3.0")


# --- run_vllm_tests ---------------------------------------------------------------------


def test_rewrite() -> None:
    text = run_vllm_tests.rewrite(FAKE_TEST, "fake")
    first, rest = text.split("\n", 1)
    assert first.startswith("# attnmerge's copy of fake (sha256 ")
    assert "vllm._custom_ops import (\n    merge_attn_states" not in rest
    old, new = run_vllm_tests.SUBSTITUTIONS[0][1:]
    assert rest == FAKE_TEST.replace(old, new)
    calls: list = []
    attnmerge = type("M", (), {"merge_attn_states": lambda *a, **k: calls.append((a, k))})
    namespace: dict = {"attnmerge": attnmerge}
    os.environ[run_vllm_tests.ENV] = "cuda"
    try:
        exec(new.replace("import attnmerge\n", ""), namespace)  # the function that stands in
    finally:
        del os.environ[run_vllm_tests.ENV]
    namespace["merge_attn_states_native"](1, 2, output_scale=3)
    assert calls == [((1, 2), {"output_scale": 3, "backend": "cuda"})]


@pytest.mark.parametrize(
    "change, match",
    [
        (("merge_attn_states as merge_attn_states_native", "merge_attn_states as native"), "0 occ"),
        (("DEVICE = current_platform.device_type", 'DEVICE = "xpu"'), "DEVICE"),
        (("scaled_fp8_quant,", "scaled_int8_quant,"), "scaled_fp8_quant"),
        (("output_lse_native.float()", "lse.float()"), "output_lse_native"),
    ],
)
def test_rewrite_fails_loudly(change: tuple[str, str], match: str) -> None:
    with pytest.raises(run_vllm_tests.RewriteError, match=match):
        run_vllm_tests.rewrite(FAKE_TEST.replace(*change))


def test_rewrite_refuses_a_second_import_of_the_op() -> None:
    twice = FAKE_TEST + "from vllm._custom_ops import merge_attn_states\n"
    with pytest.raises(run_vllm_tests.RewriteError, match="still imported"):
        run_vllm_tests.rewrite(twice)
    old = run_vllm_tests.SUBSTITUTIONS[0][1]
    with pytest.raises(run_vllm_tests.RewriteError, match="2 occurrences"):
        run_vllm_tests.rewrite(FAKE_TEST + old)


def test_write_tests(tmp_path: Path) -> None:
    peer = tmp_path / "vllm"
    (peer / fetch_vllm.TEST).parent.mkdir(parents=True)
    (peer / fetch_vllm.TEST).write_text(FAKE_TEST)
    test = run_vllm_tests.write_tests(peer, tmp_path / "out")
    assert test == tmp_path / "out" / "test_merge_attn_states.py"
    assert "def merge_attn_states_native" in test.read_text()
    assert "skip_global_cleanup" in (tmp_path / "out" / "pytest.ini").read_text()
    with pytest.raises(FileNotFoundError, match=r"fetch_vllm\.py"):
        run_vllm_tests.write_tests(tmp_path / "nothing", tmp_path / "out")


def test_summarize() -> None:
    lines = ["....s [100%]\n", "12 passed, 3 skipped, 2 warnings in 4.20s (0:00:04)\n"]
    assert run_vllm_tests.summarize(lines) == {"passed": 12, "failed": 0, "skipped": 3, "error": 0}
    bad = ["= 1 failed, 2 passed, 1 error in 0.5s =\n"]
    assert run_vllm_tests.summarize(bad) == {"passed": 2, "failed": 1, "skipped": 0, "error": 1}
    assert run_vllm_tests.summarize(["no tests ran in 0.01s\n"])["passed"] == 0
    assert run_vllm_tests.summarize([])["passed"] == 0


def test_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """One pytest run per backend, our arguments taken out, the stand-in first on the
    path, a summary line each; failing where a run fails or nothing passed."""
    peer = tmp_path / "vllm"
    (peer / fetch_vllm.TEST).parent.mkdir(parents=True)
    (peer / fetch_vllm.TEST).write_text(FAKE_TEST)
    results = {
        "cuda": (0, {"passed": 3, "failed": 0, "skipped": 1, "error": 0}, 1.2),
        "triton": (0, {"passed": 0, "failed": 0, "skipped": 4, "error": 0}, 2.0),
    }
    calls: list = []

    def run(backend, test, pytest_args, pythonpath):
        calls.append((backend, test.name, pytest_args, pythonpath))
        return results[backend]

    def standin(arch, peer_, importers):
        assert (arch, peer_) == (None, peer) and "def merge_attn_states_native" in str(importers)
        return Path("/standin")

    monkeypatch.setattr(run_vllm_tests, "run", run)
    monkeypatch.setattr(vllm_peer, "standin", standin)
    args = ["--peer", str(peer), "--out", str(tmp_path / "out"), "-n", "8", "-q", "--", "-x"]
    assert run_vllm_tests.main(args) == 1
    assert [c[:3] for c in calls] == [
        ("cuda", "test_merge_attn_states.py", ["-n", "8", "-q", "-x"]),
        ("triton", "test_merge_attn_states.py", ["-n", "8", "-q", "-x"]),
    ]
    assert calls[0][3][0] == "/standin"
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [
        "vllm-tests cuda: 3 passed, 0 failed, 1 skipped, 0 error (rc 0, 1 s)",
        "vllm-tests triton: 0 passed, 0 failed, 4 skipped, 0 error (rc 0, 2 s; nothing passed)",
    ]
    del results["triton"]
    assert run_vllm_tests.main(["--backends", "cuda", *args]) == 0


def test_run(tmp_path: Path) -> None:
    """pytest runs on the copy's folder with its pytest.ini, the backend in the
    environment and the given folders first on PYTHONPATH."""
    (tmp_path / "pytest.ini").write_text(run_vllm_tests.PYTEST_INI)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "probe.py").write_text("WHERE = 'lib'\n")
    test = tmp_path / "test_x.py"
    test.write_text(
        "import os, pytest, probe\n"
        "@pytest.mark.skip_global_cleanup\n"
        "def test_env():\n"
        f"    assert os.environ['{run_vllm_tests.ENV}'] == 'triton' and probe.WHERE == 'lib'\n"
        "@pytest.mark.skip\n"
        "def test_skipped():\n    pass\n"
    )
    rc, counts, _ = run_vllm_tests.run(
        "triton", test, ["-q", "-W", "error"], [str(tmp_path / "lib")]
    )
    assert (rc, counts) == (0, {"passed": 1, "failed": 0, "skipped": 1, "error": 0})


@needs_peer
def test_vllms_own_test_rewrites() -> None:
    """vLLM's test in .peers matches every pattern (the release the rewrite is for)."""
    text = run_vllm_tests.rewrite((vllm_peer.PEER / fetch_vllm.TEST).read_text())
    assert text.count("merge_attn_states_native(") >= 3


# --- vllm: the op's build and the stand-in package -------------------------------------


def test_build_commands_and_cache_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_peer, "nvcc", lambda: "/opt/cuda/bin/nvcc")  # no cuBLAS there
    monkeypatch.setattr(vllm_peer, "CACHE", tmp_path / "cache")
    monkeypatch.delenv("CUDAHOSTCXX", raising=False)
    with pytest.raises(FileNotFoundError, match=r"fetch_vllm\.py"):
        vllm_peer.library_path("sm_90a", tmp_path / "nothing")
    peer = tmp_path / "vllm"
    for path in REACHED:
        (peer / path).parent.mkdir(parents=True, exist_ok=True)
        (peer / path).write_text(FAKE_SDIST[path])
    first = vllm_peer.library_path("sm_90a", peer)
    assert first.parent == tmp_path / "cache" and first.name.startswith("vllm_merge-sm_90a-")
    assert vllm_peer.library_path("sm_90a", peer) == first
    assert vllm_peer.library_path("sm_100a", peer) != first
    (peer / "csrc/core/dtype.cuh").write_text("// changed\n")
    assert vllm_peer.library_path("sm_90a", peer) != first
    kernel, binding, link = vllm_peer.commands(Path("/c/x.so"), "sm_90a", peer)
    for cmd in (kernel, binding):
        assert cmd[:2] == ["/opt/cuda/bin/nvcc", "-arch=sm_90a"] and "-c" in cmd
        assert {"-O3", "-std=c++20", "-DUSE_CUDA", "-DENABLE_FP8"} <= set(cmd)
        includes = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-I"]
        assert includes[0] == str(peer / "csrc") and includes[-1] == str(
            tmp_path / "cache" / "vllm-cublas-shim"
        )
    assert (tmp_path / "cache/vllm-cublas-shim/cublas_v2.h").read_text() == vllm_peer.CUBLAS_SHIM
    assert kernel[-3:] == [str(peer / fetch_vllm.KERNEL), "-o", "/c/x.kernel.o"]
    assert binding[-3:] == [str(vllm_peer.BINDING), "-o", "/c/x.binding.o"]
    assert link[-2:] == ["-o", "/c/x.so"] and "-shared" in link
    assert {"/c/x.kernel.o", "/c/x.binding.o", "-ltorch_cpu", "-lc10"} <= set(link)
    monkeypatch.setenv("CUDAHOSTCXX", "/usr/bin/g++-12")
    assert vllm_peer.commands(Path("/c/x.so"), "sm_90a", peer)[0][1:3] == [
        "-ccbin",
        "/usr/bin/g++-12",
    ]
    assert vllm_peer.library_path("sm_90a", peer) != first  # another host compiler


def test_the_binding_compiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our binding compiles against the installed torch's stable ABI headers (no GPU)."""
    monkeypatch.setattr(vllm_peer, "CACHE", tmp_path)  # for the cuBLAS stand-in, if needed
    try:
        nvcc = vllm_peer.nvcc()
    except FileNotFoundError:
        pytest.skip("no nvcc")
    from torch.utils.cpp_extension import include_paths

    if not any((Path(d) / "torch/csrc/stable/library.h").exists() for d in include_paths()):
        pytest.skip(f"torch {torch.__version__} has no stable ABI headers")
    binding = vllm_peer.commands(tmp_path / "x.so", "sm_90a", vllm_peer.PEER)[1]
    assert binding[0] == nvcc
    done = subprocess.run(binding, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "x.binding.o").stat().st_size > 0


def test_missing_imports() -> None:
    package = vllm_peer.standin_sources(None, "9.9.9")
    fine = {
        "a.py": "from vllm.platforms import current_platform\n"
        "current_platform.is_cuda()\nx = current_platform.device_type\n"
        "from vllm._custom_ops import merge_attn_states, scaled_fp8_quant\n"
        "from vllm.triton_utils import tl, triton\nimport torch\n"
        "def f():\n    from vllm.platforms.rocm import get_cdna_version\n",
    }
    assert vllm_peer.missing_imports(package, fine) == []
    wrong = {
        "b.py": "from vllm.platforms import current_platform, CpuArchEnum\n"
        "import vllm.envs\nfrom vllm._custom_ops import cutlass_scaled_mm\n"
        "current_platform.is_tpu()\n"
    }
    assert vllm_peer.missing_imports(package, wrong) == [
        "b.py: vllm.platforms.CpuArchEnum",
        "b.py: vllm.envs",
        "b.py: vllm._custom_ops.cutlass_scaled_mm",
        "b.py: current_platform.is_tpu",
    ]


def test_write_standin_refuses_what_it_cannot_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_peer, "CACHE", tmp_path / "cache")
    peer = tmp_path / "vllm"
    for path in fetch_vllm.PYTHON:
        (peer / path).parent.mkdir(parents=True, exist_ok=True)
        (peer / path).write_text("from vllm.platforms import current_platform\n")
    folder = vllm_peer.write_standin(None, peer)
    assert folder.parent == tmp_path / "cache" and (folder / "vllm/_custom_ops.py").is_file()
    assert vllm_peer.write_standin(None, peer) == folder  # the same contents, the same folder
    with_op = vllm_peer.write_standin(Path("/x.so"), peer)
    assert with_op != folder
    assert "LIBRARY = '/x.so'" in (with_op / "vllm/_custom_ops.py").read_text()
    with pytest.raises(ImportError, match=r"vllm\.utils\.math_utils"):
        vllm_peer.write_standin(None, peer, {"t.py": "from vllm.utils.math_utils import cdiv\n"})
    with pytest.raises(FileNotFoundError, match=r"fetch_vllm\.py"):
        vllm_peer.write_standin(None, tmp_path / "nothing")


STANDIN_SCRIPT = """
import sys, torch, attnmerge, vllm
from vllm.platforms import current_platform
from vllm.v1.attention.ops.merge_attn_states import merge_attn_states as dispatcher
from vllm.v1.attention.ops.triton_merge_attn_states import merge_attn_states as triton_merge
from vllm._custom_ops import merge_attn_states as op, scaled_fp8_quant
assert vllm.STANDIN and current_platform.is_cpu() and current_platform.device_type == "cpu"
T, H, D = 5, 2, 16
g = torch.Generator().manual_seed(0)
po, so = torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)
pl, sl = torch.randn(H, T, generator=g), torch.randn(H, T, generator=g)
pl[0, 1] = float("inf")
want, want_lse = torch.empty_like(po), torch.empty_like(pl)
attnmerge.merge_attn_states(want, po, pl.clone(), so, sl.clone(), want_lse, 3, backend="torch")
for merge in (dispatcher, triton_merge):
    out, lse = torch.empty_like(po), torch.empty_like(pl)
    merge(out, po, pl.clone(), so, sl.clone(), lse, 3)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
q, s = scaled_fp8_quant(torch.tensor([[1.0, -1000.0, 0.0]]), torch.tensor([0.5]))
assert q.dtype == torch.float8_e4m3fn and q.float().tolist() == [[2.0, -448.0, 0.0]], q
try:
    op(torch.empty_like(po), po, pl, so, sl)
except RuntimeError as e:
    assert "without vLLM's CUDA op" in str(e), e
else:
    raise AssertionError("the op ran without a library")
print("ok")
"""


@needs_peer
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stand-in's CPU paths")
def test_the_standin_imports_and_merges_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's dispatcher (its torch path on a CPU) and Triton kernel (in Triton's
    interpreter) on the stand-in, without the CUDA op: they merge as attnmerge does."""
    monkeypatch.setattr(vllm_peer, "CACHE", tmp_path)
    folder = vllm_peer.write_standin(None, vllm_peer.PEER)
    rewritten = run_vllm_tests.rewrite((vllm_peer.PEER / fetch_vllm.TEST).read_text())
    assert vllm_peer.write_standin(None, vllm_peer.PEER, {"test": rewritten}) == folder
    paths = [str(folder), str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)), TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", STANDIN_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
