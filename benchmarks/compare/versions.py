"""Load attnmerge as of another git revision, in the same process as the working tree's.

``load_base(rev)`` exports ``src/attnmerge`` of ``rev`` with ``git archive`` into a temporary
directory, renames the package (``attnmerge_base`` by default) and rewrites every occurrence
of the package name in its Python sources, so that the copy imports itself, reads its own
kernel sources (``importlib.resources.files("attnmerge_base.cuda")``) and registers its own
torch.library namespace (``torch.ops.attnmerge_base.merge_attn_states``) next to the working
tree's ``torch.ops.attnmerge``.

What is deliberately not rewritten:

* the CUDA sources (``*.cuh``) and the C++ namespace qualifiers that Python passes to them
  (``attnmerge::F32``): the revision's kernels are compiled from byte-identical text, so
  its cubins are the ones the revision itself would build;
* identifiers that merely contain the name (``_attnmerge_fixed``, ``attnmerge_merge_two``,
  ``ATTNMERGE_CACHE_DIR``): no word boundary, so both copies share the environment
  variables, and the Triton interpreter fix of either copy recognises the other's.

Kernel cache: the rewrite turns the cache's default directory ``~/.cache/attnmerge`` into
``~/.cache/attnmerge_base`` and the package-name field of every cache key into
``attnmerge_base``, so the copies never share a cubin, even under one
``ATTNMERGE_CACHE_DIR``.

Triton's interpreter: ``TRITON_INTERPRET=1`` must be in the environment before either copy
first uses Triton (they import it lazily). Both copies patch the interpreter's
process-global float conversion (``attnmerge/triton/interpreter_fix.py``); whichever installs
first wins, and the other sees the patch and keeps it. :func:`use_interpreter_fix` instead
gives each copy its own patch around its calls, so a change to that fix between revisions
shows as it would in separate processes.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

__all__ = [
    "PACKAGE",
    "REPO_ROOT",
    "describe",
    "load_base",
    "load_new",
    "load_working_tree",
    "resolve_rev",
    "use_interpreter_fix",
]

PACKAGE = "attnmerge"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE_REV = "c9a2f13"

# The package name as a word, except as a C++ namespace qualifier (``attnmerge::F32``,
# ``attnmerge::{p}``); torch op names (``"attnmerge::merge_attn_states"``) are lowercase.
_NAME_RE = re.compile(rf"\b{PACKAGE}\b(?!::[{{A-Z])")


def _git(repo: Path, *args: str, binary: bool = False) -> str | bytes:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {proc.stderr.decode().strip()}")
    return proc.stdout if binary else proc.stdout.decode().strip()


def _is_archive(rev: str) -> bool:
    return rev.endswith(".tar") and Path(rev).is_file()


def resolve_rev(rev: str, repo: Path | str = REPO_ROOT) -> str:
    """The full commit hash of ``rev`` in ``repo``; for a tar file made by ``git archive
    <commit>``, the commit recorded in it."""
    if _is_archive(rev):
        with tarfile.open(rev) as tar:
            return tar.pax_headers.get("comment") or f"archive {Path(rev).name}"
    return _git(Path(repo), "rev-parse", "--verify", f"{rev}^{{commit}}")


def rewrite_source(text: str, name: str) -> str:
    """``text`` (a Python source of the package) with the package renamed to ``name``."""
    return _NAME_RE.sub(name, text)


def _export(rev: str, sha: str, repo: Path, dest: Path, name: str) -> Path:
    """Extract ``src/attnmerge`` of ``sha`` (or of the archive ``rev``) as ``dest/name``
    with its Python sources rewritten; returns the package directory."""
    if _is_archive(rev):  # for hosts with a copy of the working tree but no git history
        data = Path(rev).read_bytes()
    else:
        data = _git(repo, "archive", "--format=tar", sha, f"src/{PACKAGE}", binary=True)
    prefix = f"src/{PACKAGE}/"
    pkg_dir = dest / name
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(prefix):
                continue
            target = pkg_dir / member.name[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            content = tar.extractfile(member).read()
            if target.suffix == ".py":
                content = rewrite_source(content.decode(), name).encode()
            target.write_bytes(content)
    if not (pkg_dir / "__init__.py").is_file():
        raise RuntimeError(f"revision {sha[:12]} has no src/{PACKAGE}/__init__.py")
    return pkg_dir


def _check_ops(name: str) -> None:
    """Warn unless the package registered its own op, ``torch.ops.<name>.merge_attn_states``
    (only torch.compile needs it; the comparisons call the eager API)."""
    import torch

    if not hasattr(getattr(torch.ops, name), "merge_attn_states"):
        warnings.warn(
            f"{name} did not register torch.ops.{name}.merge_attn_states at import",
            stacklevel=2,
        )


def load_base(
    rev: str = DEFAULT_BASE_REV, repo: Path | str = REPO_ROOT, name: str = f"{PACKAGE}_base"
) -> ModuleType:
    """Import attnmerge as of git revision ``rev`` of ``repo`` under the name ``name``.
    ``rev`` may also be a ``.tar`` file from ``git archive -o FILE <commit> src/attnmerge``.

    The module gets ``__git_revision__`` (full hash) and ``__compare_label__``. Loading the
    same name twice returns the first copy if it is of the same revision, else raises
    (a package cannot be unloaded: its torch ops stay registered).
    """
    repo = Path(repo)
    sha = resolve_rev(rev, repo)
    loaded = sys.modules.get(name)
    if loaded is not None:
        if getattr(loaded, "__git_revision__", None) != sha:
            raise RuntimeError(f"{name} is already loaded from another revision")
        return loaded
    root = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    # Kept until exit: the cuda backend reads its kernel sources on first use.
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    _export(rev, sha, repo, root, name)
    # Stays on sys.path so that worker processes (e.g. parallel kernel builds) find it.
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    module = importlib.import_module(name)
    _check_ops(name)
    module.__git_revision__ = sha
    module.__compare_label__ = f"{rev} ({sha[:12]})"
    return module


def load_working_tree(repo: Path | str = REPO_ROOT) -> ModuleType:
    """Import the working tree's ``attnmerge`` (``<repo>/src``), checking that the import
    did not pick up another installed copy."""
    repo = Path(repo).resolve()
    src = str(repo / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    module = importlib.import_module(PACKAGE)
    where = Path(module.__file__).resolve()
    if not where.is_relative_to(repo / "src"):
        raise RuntimeError(f"import {PACKAGE} found {where}, not the working tree's {src}")
    try:
        head = resolve_rev("HEAD", repo)
        dirty = bool(_git(repo, "status", "--porcelain", "--", f"src/{PACKAGE}"))
    except (RuntimeError, OSError):  # a copy of the tree without its git history
        head, dirty = "unknown", True
    module.__git_revision__ = f"{head}{'+dirty' if dirty else ''}"
    module.__compare_label__ = f"working tree (HEAD {head[:12]}{', modified' if dirty else ''})"
    _check_ops(PACKAGE)
    return module


def load_new(rev: str | None = None, repo: Path | str = REPO_ROOT) -> ModuleType:
    """The package under test: the working tree (``rev`` None) or a revision loaded as
    ``attnmerge_new``."""
    if rev is None:
        return load_working_tree(repo)
    return load_base(rev, repo, name=f"{PACKAGE}_new")


def describe(module: ModuleType) -> str:
    """A one-line label: revision and where the package was loaded from."""
    label = getattr(module, "__compare_label__", module.__name__)
    return f"{module.__name__} = {label}"


# ---------------------------------------------------------------------------
# The Triton interpreter's float conversion, one patch per copy.

_unpatched_convert = None
_fixes: dict[str, object] = {}


def _interpreter() -> ModuleType | None:
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    return interpreter if hasattr(interpreter, "_convert_float") else None


def capture_unpatched_interpreter() -> None:
    """Remember Triton's own float conversion; call before either copy uses Triton."""
    global _unpatched_convert
    interpreter = _interpreter()
    if interpreter is None or _unpatched_convert is not None:
        return
    current = interpreter._convert_float
    if getattr(current, "_attnmerge_fixed", False):
        raise RuntimeError("the Triton interpreter was patched before it could be captured")
    _unpatched_convert = current


def _fix_of(module: ModuleType):
    """The interpreter's conversion function as ``module``'s own fix installs it."""
    name = module.__name__
    if name not in _fixes:
        interpreter = _interpreter()
        saved = interpreter._convert_float
        interpreter._convert_float = _unpatched_convert
        try:
            fix = importlib.import_module(f"{name}.triton.interpreter_fix")
            fix.install()
            _fixes[name] = interpreter._convert_float
        except ImportError:  # a revision without the fix: Triton's own conversion
            _fixes[name] = _unpatched_convert
        finally:
            interpreter._convert_float = saved
    return _fixes[name]


@contextlib.contextmanager
def use_interpreter_fix(module: ModuleType) -> Iterator[None]:
    """Within the block, the Triton interpreter converts floats as ``module``'s fix does
    (nothing happens unless ``TRITON_INTERPRET=1`` and the unpatched conversion was
    captured with :func:`capture_unpatched_interpreter`)."""
    interpreter = _interpreter() if os.environ.get("TRITON_INTERPRET") == "1" else None
    if interpreter is None or _unpatched_convert is None:
        yield
        return
    saved = interpreter._convert_float
    interpreter._convert_float = _fix_of(module)
    try:
        yield
    finally:
        interpreter._convert_float = saved


def interpreter_fixes_identical(a: ModuleType, b: ModuleType) -> bool | None:
    """Whether both copies' interpreter fixes have the same source (None: no interpreter)."""
    if _interpreter() is None or os.environ.get("TRITON_INTERPRET") != "1":
        return None
    texts = []
    for module in (a, b):
        try:
            fix = importlib.import_module(f"{module.__name__}.triton.interpreter_fix")
        except ImportError:
            texts.append(None)
            continue
        # Back to the package's own name, so that only real differences count.
        own_name = re.compile(rf"\b{re.escape(module.__name__)}\b")
        texts.append(own_name.sub(PACKAGE, Path(fix.__file__).read_text()))
    return texts[0] == texts[1]
