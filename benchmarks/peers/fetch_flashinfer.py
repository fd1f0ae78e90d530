"""Export the FlashInfer headers that ``flashinfer_merge.cu`` needs into ``.peers/flashinfer``.

FlashInfer is not installed where the benchmarks run (and is not a dependency): its merge
kernels are header-only templates in ``include/flashinfer/attention/cascade.cuh``, so the
benchmark builds them with nvcc from those headers. This script reads a FlashInfer git
repository (a clone, a bare mirror, or a URL to clone from), follows the ``#include``
lines from ``cascade.cuh`` through FlashInfer's own headers, and writes exactly those
files, FlashInfer's LICENSE (Apache-2.0) and a ``COMMIT`` record (commit, date, source,
files) under ``--dest`` (default ``.peers/flashinfer``, ignored by git). Nothing of
FlashInfer enters this repository. Standard library only; needs git::

    python benchmarks/peers/fetch_flashinfer.py --git /path/to/flashinfer[.git] [--rev REV]
    python benchmarks/peers/fetch_flashinfer.py      # clones github.com/flashinfer-ai/flashinfer

Carry ``.peers`` to the GPU machine; ``benchmarks/peers/flashinfer.py`` compiles from there.
"""

from __future__ import annotations

import argparse
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

URL = "https://github.com/flashinfer-ai/flashinfer.git"
ROOTS = ("include/flashinfer/attention/cascade.cuh",)
DEST = Path(__file__).resolve().parents[2] / ".peers" / "flashinfer"
# #include "x" (relative to the including file, then to include/) and #include <flashinfer/x>
_INCLUDE = re.compile(r'^\s*#\s*include\s*(?:"([^"]+)"|<(flashinfer/[^>]+)>)', re.MULTILINE)


def git(repo: str | Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)} in {repo}: {done.stderr.strip()}")
    return done.stdout


def exists(repo: str | Path, commit: str, path: str) -> bool:
    probe = ["git", "-C", str(repo), "cat-file", "-e", f"{commit}:{path}"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def includes(text: str) -> list[tuple[str, bool]]:
    """The FlashInfer-candidate includes of a source text: (name, quoted)."""
    return [(q or a, bool(q)) for q, a in _INCLUDE.findall(text)]


def resolve(repo: str | Path, commit: str, roots=ROOTS) -> dict[str, str]:
    """Every file reachable from ``roots`` through includes that exist in the repository
    at ``commit``, path -> text. A quoted include is looked up next to the including file,
    then under ``include/`` (nvcc's -I); one found in neither is a system or CUDA header
    (``<...>`` ones other than ``flashinfer/...`` are never followed)."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found[path] = text = git(repo, "show", f"{commit}:{path}")
        for name, quoted in includes(text):
            here = posixpath.normpath(posixpath.join(posixpath.dirname(path), name))
            options = ([here] if quoted else []) + [posixpath.normpath(f"include/{name}")]
            target = next((p for p in options if exists(repo, commit, p)), None)
            if target is None and not quoted:
                raise FileNotFoundError(f"{path} includes <{name}>, not in {commit}")
            if target is not None:
                todo.append(target)
    return found


def export(repo: str | Path, rev: str, dest: Path, source: str) -> list[str]:
    """Write the resolved headers under ``dest/include``, the LICENSE and ``COMMIT``."""
    commit = git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    files = resolve(repo, commit)
    if (dest / "include").exists():
        shutil.rmtree(dest / "include")
    for path, text in files.items():
        if not path.startswith("include/"):
            raise ValueError(f"{path} is outside include/")
        out = dest / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    if exists(repo, commit, "LICENSE"):
        (dest / "LICENSE").write_text(git(repo, "show", f"{commit}:LICENSE"))
    date, subject = git(repo, "show", "-s", "--format=%cI%n%s", commit).split("\n", 1)
    record = [f"commit {commit}", f"date {date}", f"subject {subject.strip()}"]
    record += [f"source {source}", "files:", *(f"  {p}" for p in sorted(files))]
    (dest / "COMMIT").write_text("\n".join(record) + "\n")
    return sorted(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--git", help=f"a FlashInfer repository (clone or bare) or URL ({URL})")
    parser.add_argument("--rev", default="HEAD", help="the revision to export (HEAD)")
    parser.add_argument("--dest", type=Path, default=DEST, help=f"where to write ({DEST})")
    args = parser.parse_args(argv)
    source = args.git or URL
    with tempfile.TemporaryDirectory() as tmp:
        repo = source
        if not Path(source).exists():  # a URL: a shallow bare clone of the one revision
            repo = str(Path(tmp) / "flashinfer.git")
            depth = ["--depth", "1"] if args.rev == "HEAD" else []
            clone = ["git", "clone", "--bare", "--quiet", *depth, source, repo]
            subprocess.run(clone, check=True)
        files = export(repo, args.rev, args.dest, source)
    print(f"wrote {len(files)} headers to {args.dest / 'include'}:")
    print((args.dest / "COMMIT").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
