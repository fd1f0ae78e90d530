"""benchmarks/peers: exporting FlashInfer's headers from a git repository, and building
the wrapper (the build itself only where nvcc and the exported headers are present)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from attnmerge import bench
from benchmarks import kway
from benchmarks.peers import fetch_flashinfer, flashinfer
from benchmarks.tests.test_kway import reference

FILES = {
    "include/flashinfer/attention/cascade.cuh": (
        '#include "../cp_async.cuh"\n#include "state.cuh"\n#include <cuda_runtime.h>\n'
        "  #  include <flashinfer/utils.cuh>\n"
    ),
    "include/flashinfer/attention/state.cuh": '#include "../utils.cuh"\n#include "cuda_fp8.h"\n',
    "include/flashinfer/cp_async.cuh": "#include <cstdint>\n",
    "include/flashinfer/utils.cuh": '#include "exception.h"\n',
    "include/flashinfer/exception.h": "#include <exception>\n",
    "include/flashinfer/decode.cuh": '#include "utils.cuh"\n',  # not reached
    "LICENSE": "Apache License\n",
}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if not shutil.which("git"):
        pytest.skip("needs git")
    root = tmp_path / "flashinfer"
    for path, text in FILES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    _git(root, "init", "-q")
    _commit(root, "headers")
    return root


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def _commit(root: Path, message: str) -> None:
    _git(root, "add", ".")
    env = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    _git(root, *env, "commit", "-q", "-m", message)


def test_includes() -> None:
    text = '#include "a.h"\n# include <flashinfer/b.cuh>\n#include <cuda.h>\n// #include "c.h"\n'
    assert fetch_flashinfer.includes(text) == [("a.h", True), ("flashinfer/b.cuh", False)]


def test_export_follows_the_includes(repo: Path, tmp_path: Path) -> None:
    dest = tmp_path / "peers"
    (dest / "include" / "stale.h").parent.mkdir(parents=True)
    (dest / "include" / "stale.h").write_text("old")
    files = fetch_flashinfer.export(repo, "HEAD", dest, "test")
    want = sorted(p for p in FILES if p.startswith("include/") and "decode" not in p)
    assert files == want
    for path in want:
        assert (dest / path).read_text() == FILES[path]
    assert not (dest / "include" / "stale.h").exists()
    assert (dest / "LICENSE").read_text() == "Apache License\n"
    record = (dest / "COMMIT").read_text().splitlines()
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True)
    assert record[0] == f"commit {head.stdout.decode().strip()}"
    assert record[2:5] == ["subject headers", "source test", "files:"]
    assert record[5:] == [f"  {p}" for p in want]


def test_a_missing_flashinfer_header_is_an_error(repo: Path) -> None:
    path = repo / "include/flashinfer/utils.cuh"
    path.write_text('#include "exception.h"\n#include <flashinfer/gone.cuh>\n')
    _commit(repo, "gone")
    with pytest.raises(FileNotFoundError, match=r"gone\.cuh"):
        fetch_flashinfer.resolve(repo, "HEAD")


def test_library_path_and_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo: Path
) -> None:
    monkeypatch.setattr(flashinfer, "nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(flashinfer, "CACHE", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"fetch_flashinfer\.py"):
        flashinfer.library_path("sm_90a", tmp_path / "nothing")
    include = repo / "include"
    first = flashinfer.library_path("sm_90a", include)
    assert first.parent == tmp_path / "cache" and first.name.startswith("flashinfer_merge-sm_90a")
    assert flashinfer.library_path("sm_90a", include) == first
    assert flashinfer.library_path("sm_100a", include) != first
    (include / "flashinfer/utils.cuh").write_text("// changed\n")
    assert flashinfer.library_path("sm_90a", include) != first
    cmd = flashinfer.compile_command(Path("/tmp/x.so"), "sm_90a", include)
    assert cmd[:2] == ["/opt/cuda/bin/nvcc", "-arch=sm_90a"]
    assert {"-O3", "-std=c++17", "-shared"} <= set(cmd) and cmd[-2:] == ["-o", "/tmp/x.so"]
    assert cmd[cmd.index("-I") + 1] == str(include)


@pytest.mark.skipif(
    not (flashinfer.INCLUDE / "flashinfer/attention/cascade.cuh").exists(),
    reason="no FlashInfer headers in .peers (benchmarks/peers/fetch_flashinfer.py)",
)
def test_the_wrapper_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nvcc builds flashinfer_merge.cu for sm_90a from the exported headers (no GPU)."""
    try:
        flashinfer.nvcc()
    except FileNotFoundError:
        pytest.skip("no nvcc")
    monkeypatch.setattr(flashinfer, "CACHE", tmp_path)
    path = flashinfer.build("sm_90a")
    assert path.exists() and path.parent == tmp_path
    assert flashinfer.build("sm_90a") == path  # cached


@pytest.mark.skipif(
    not torch.cuda.is_available()
    or not (flashinfer.INCLUDE / "flashinfer/attention/cascade.cuh").exists(),
    reason="needs a GPU and FlashInfer's headers in .peers",
)
@pytest.mark.parametrize("variable", [False, True])
@pytest.mark.parametrize("partials", [2, 5, 40])  # 40 >= T: the many-partials kernel
def test_flashinfer_merges(partials: int, variable: bool) -> None:
    """FlashInfer's kernels through the wrapper give the merge of the benchmark's inputs."""
    case = bench.Case("bf16", False, False, 128, 9, 4, "flashinfer", partials, variable)
    (s,) = bench.make_input_sets(case, 1, "cuda")
    kway._flashinfer(s, None)()
    torch.testing.assert_close(s["output"].double().cpu(), reference(s).cpu(), atol=2e-2, rtol=2e-2)
    assert "flashinfer vs cuda on the same inputs" in kway.check_flashinfer()
