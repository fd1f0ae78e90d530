"""Export vLLM's merge (CUDA op, Triton kernel, dispatcher, test) into ``.peers/vllm``.

vLLM is not installed where the benchmarks run (and is not a dependency). Its merge is a
CUDA source, ``csrc/attention/merge_attn_states.cu``, built by ``benchmarks/peers/vllm.py``
with nvcc, and two Python files, the dispatcher ``vllm/v1/attention/ops/merge_attn_states.py``
and the Triton kernel ``vllm/v1/attention/ops/triton_merge_attn_states.py``, which run
there on small stand-ins of the rest of vLLM; vLLM's test of the merge,
``tests/kernels/attention/test_merge_attn_states.py``, runs on attnmerge through
``benchmarks/peers/run_vllm_tests.py``. This script reads vLLM's source distribution (sdist)
from PyPI (``--version``, its sha256 checked against PyPI's JSON API) or from a file
(``--sdist``), follows the ``#include`` lines from the ``.cu`` through vLLM's own headers
under ``csrc/``, and writes exactly those files, the two Python files, the test, vLLM's
LICENSE (Apache-2.0) and a ``SOURCE`` record (version, sha256, vLLM's git commit from
``vllm/_version.py``, files) under ``--dest`` (default ``.peers/vllm``, ignored by git; about
120 kB). Nothing of vLLM enters this repository. Standard library only::

    python benchmarks/peers/fetch_vllm.py                    # vLLM 0.34.0 from PyPI
    python benchmarks/peers/fetch_vllm.py --version 0.35.0
    python benchmarks/peers/fetch_vllm.py --sdist /tmp/vllm-0.34.0.tar.gz [--sha256 HEX]

Carry ``.peers`` to the GPU machine; ``benchmarks/peers/vllm.py`` builds from there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import posixpath
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

VERSION = "0.34.0"
JSON_API = "https://pypi.org/pypi/vllm/{version}/json"
PROJECT_JSON = "https://pypi.org/pypi/vllm/json"  # where the per-release page is missing
KERNEL = "csrc/attention/merge_attn_states.cu"
PYTHON = (
    "vllm/v1/attention/ops/merge_attn_states.py",
    "vllm/v1/attention/ops/triton_merge_attn_states.py",
)
TEST = "tests/kernels/attention/test_merge_attn_states.py"
LICENSE = "LICENSE"
VERSION_FILE = "vllm/_version.py"  # read for the commit, not exported
INCLUDE_ROOT = "csrc"  # vLLM compiles with -I csrc
DEST = Path(__file__).resolve().parents[2] / ".peers" / "vllm"
# #include "x" and #include <x>; comments and #if branches are not interpreted, so a header
# of any branch (ROCm's too) is exported: a superset of what nvcc reads
_INCLUDE = re.compile(r'^\s*#\s*include\s*(?:"([^"]+)"|<([^>]+)>)', re.MULTILINE)
_COMMIT = re.compile(r"""commit_id\s*=\s*['"]g?([0-9a-fA-F]+)['"]""")
_SOURCE_SUFFIXES = (".h", ".hpp", ".cuh", ".cu", ".cpp", ".inl")


def includes(text: str) -> list[tuple[str, bool]]:
    """The includes of a source text: (name, quoted)."""
    return [(q or a, bool(q)) for q, a in _INCLUDE.findall(text)]


def resolve(files: dict[str, str], roots=(KERNEL,), include_root: str = INCLUDE_ROOT):
    """Every file of ``files`` (path -> text, the sdist's sources) reachable from ``roots``
    through includes, path -> text, and the includes found nowhere in ``files`` (system,
    CUDA or torch headers), sorted. A quoted include is looked up next to the including
    file, then under ``include_root`` (nvcc's -I); an ``<...>`` include under
    ``include_root`` only."""
    found: dict[str, str] = {}
    outside: set[str] = set()
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path in found:
            continue
        if path not in files:
            raise FileNotFoundError(f"{path} is not in the sdist")
        found[path] = text = files[path]
        for name, quoted in includes(text):
            here = posixpath.normpath(posixpath.join(posixpath.dirname(path), name))
            options = ([here] if quoted else []) + [posixpath.normpath(f"{include_root}/{name}")]
            target = next((p for p in options if p in files), None)
            if target is None:
                outside.add(name)
            else:
                todo.append(target)
    return found, sorted(outside)


def read_sdist(path: Path) -> tuple[str, dict[str, str]]:
    """The sdist's top folder and the texts of its sources under ``csrc/`` and of the
    other files this script reads, path (below the top folder) -> text; one pass."""
    wanted = {*PYTHON, TEST, LICENSE, VERSION_FILE}
    texts: dict[str, str] = {}
    top = None
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            head, _, rest = member.name.partition("/")
            top = top or head
            if head != top or not member.isfile():
                continue
            source = rest.startswith(f"{INCLUDE_ROOT}/") and rest.endswith(_SOURCE_SUFFIXES)
            if source or rest in wanted:
                data = tar.extractfile(member)
                assert data is not None
                texts[rest] = data.read().decode("utf-8")
    if top is None:
        raise ValueError(f"{path} is empty")
    return top, texts


def commit_of(version_text: str) -> str:
    """vLLM's git commit as ``vllm/_version.py`` records it (without the ``g``)."""
    found = _COMMIT.search(version_text)
    if not found:
        raise ValueError("no commit_id in vllm/_version.py")
    return found.group(1)


def export(sdist: Path, dest: Path, sha256: str, source: str) -> list[str]:
    """Write the kernel and its headers, the Python files, the test, the LICENSE and
    ``SOURCE`` under ``dest``; the folders written before are replaced."""
    top, texts = read_sdist(sdist)
    missing = [p for p in (KERNEL, *PYTHON, TEST, LICENSE, VERSION_FILE) if p not in texts]
    if missing:
        raise FileNotFoundError(f"{sdist} lacks {', '.join(missing)}")
    headers, outside = resolve({p: t for p, t in texts.items() if p.startswith("csrc/")})
    files = {**headers, **{p: texts[p] for p in (*PYTHON, TEST, LICENSE)}}
    for folder in {p.split("/", 1)[0] for p in files} | {"csrc", "vllm", "tests"}:
        if (dest / folder).is_dir():
            shutil.rmtree(dest / folder)
    for path, text in files.items():
        out = dest / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    version = top.removeprefix("vllm-")
    record = [f"version {version}", f"sha256 {sha256}", f"commit {commit_of(texts[VERSION_FILE])}"]
    record += [f"source {source}", f"outside {' '.join(outside)}", "files:"]
    record += [f"  {p}" for p in sorted(files)]
    (dest / "SOURCE").write_text("\n".join(record) + "\n")
    return sorted(files)


def read_record(dest: Path = DEST) -> dict[str, str]:
    """``SOURCE`` as a dict (``files`` is a space-separated list)."""
    record: dict[str, str] = {}
    files: list[str] = []
    for line in (dest / "SOURCE").read_text().splitlines():
        if line.startswith("  "):
            files.append(line.strip())
        elif line != "files:":
            key, _, value = line.partition(" ")
            record[key] = value
    record["files"] = " ".join(files)
    return record


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def sdist_on_pypi(version: str) -> tuple[str, str, str]:
    """(url, filename, sha256) of vLLM ``version``'s sdist, from PyPI's JSON API (the
    release's page, or the project's page where an index mirror lacks the first)."""
    try:
        url = JSON_API.format(version=version)
        entries = json.loads(_get(url))["urls"]
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
        url = PROJECT_JSON
        entries = json.loads(_get(url))["releases"].get(version)
        if not entries:
            raise LookupError(f"vLLM {version} is not on PyPI") from e
    sdists = [e for e in entries if e["packagetype"] == "sdist"]
    if not sdists:
        raise LookupError(f"vLLM {version} has no sdist on PyPI")
    entry = sdists[0]
    return urllib.parse.urljoin(url, entry["url"]), entry["filename"], entry["digests"]["sha256"]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, out: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(out, "wb") as f:
        shutil.copyfileobj(response, f, 1 << 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", default=VERSION, help=f"vLLM's release ({VERSION})")
    parser.add_argument("--sdist", type=Path, help="a vLLM sdist already downloaded")
    parser.add_argument("--sha256", help="the sha256 the sdist must have (checked if given)")
    parser.add_argument("--dest", type=Path, default=DEST, help=f"where to write ({DEST})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.sdist:
            sdist, source = args.sdist, str(args.sdist.resolve())
        else:
            source, name, expected = sdist_on_pypi(args.version)
            if args.sha256 and args.sha256 != expected:
                raise SystemExit(f"--sha256 {args.sha256} but PyPI lists {expected} for {name}")
            args.sha256 = expected
            sdist = Path(tmp) / name
            print(f"downloading {source}", file=sys.stderr, flush=True)
            download(source, sdist)
        digest = sha256_of(sdist)
        if args.sha256 and digest != args.sha256:
            raise SystemExit(f"{sdist} has sha256 {digest}, expected {args.sha256}")
        files = export(sdist, args.dest, digest, source)
    record = read_record(args.dest)
    if not args.sdist and record["version"] != args.version:
        raise SystemExit(f"the sdist holds vLLM {record['version']}, not {args.version}")
    print(f"wrote {len(files)} files to {args.dest}:")
    print((args.dest / "SOURCE").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
