"""On-disk cache for build artefacts (cubins), safe against concurrent and killed builds.

An entry is ``<cache_dir>/{kind}-{digest}{suffix}`` where ``digest`` is the first 24 hex
digits of the SHA-256 of the canonical JSON of its key (package version, source hash,
arch, toolchain...). Next to it, ``<entry>.json`` holds the key for humans and
``attnmerge info``, and ``<entry>.lock`` is the lock file of its build.

Protocol: look up without a lock (the common, warm case); on a miss take an exclusive
``flock`` on the lock file, look up again (another process may have finished the build
meanwhile), build, write to a temporary file in the same directory, fsync, and
``os.replace`` it into place. A build killed half-way leaves at most a temporary file
(``.<entry>.*.tmp``), never an entry, and the kernel releases its lock.

Environment:

* ``ATTNMERGE_CACHE_DIR``: the cache directory (default ``$XDG_CACHE_HOME/attnmerge``,
  else ``~/.cache/attnmerge``).
* ``ATTNMERGE_NO_BUILD=1``: never build; a missing entry raises :class:`BuildError`.
* ``ATTNMERGE_VERBOSE_BUILD=1``: the build log line also shows the key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .nvrtc import BuildError

__all__ = ["BuildError", "cache_dir", "cached_build", "entries", "entry_path"]

logger = logging.getLogger("attnmerge")

ENV_CACHE_DIR = "ATTNMERGE_CACHE_DIR"
ENV_NO_BUILD = "ATTNMERGE_NO_BUILD"
ENV_VERBOSE = "ATTNMERGE_VERBOSE_BUILD"

_DIGEST_CHARS = 24
_KIND_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_SUFFIX_RE = re.compile(r"[A-Za-z0-9_.+-]*")
_RESERVED_ENDINGS = (".json", ".lock", ".tmp")  # sidecars, lock files, temporary files
_ENTRY_RE = re.compile(
    r"(?P<kind>[A-Za-z0-9][A-Za-z0-9_.+-]*)-(?P<digest>[0-9a-f]{24})(?P<suffix>.*)"
)

# flock excludes separately opened descriptors, also within one process, but on some
# network file systems it is emulated with per-process fcntl locks: also lock in-process.
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def cache_dir() -> Path:
    """``$ATTNMERGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnmerge``, else
    ``~/.cache/attnmerge``. Not created here."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative paths
        return Path(xdg) / "attnmerge"
    return Path.home() / ".cache" / "attnmerge"


def key_digest(key: Mapping[str, str]) -> str:
    """First 24 hex digits of the SHA-256 of the canonical JSON of ``key``."""
    canonical = json.dumps(dict(key), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:_DIGEST_CHARS]


def entry_path(kind: str, key: Mapping[str, str], *, suffix: str = ".cubin") -> Path:
    """Where the entry for (kind, key) lives (it may not exist)."""
    if not _KIND_RE.fullmatch(kind):
        raise ValueError(f"kind must match {_KIND_RE.pattern}, got {kind!r}")
    if not _SUFFIX_RE.fullmatch(suffix) or suffix.endswith(_RESERVED_ENDINGS):
        raise ValueError(
            f"suffix must match {_SUFFIX_RE.pattern} and not end with one of "
            f"{_RESERVED_ENDINGS} (reserved for the cache's own files), got {suffix!r}"
        )
    for k, v in key.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"key items must be str -> str, got {k!r}: {v!r}")
    return cache_dir() / f"{kind}-{key_digest(key)}{suffix}"


def _sidecar(entry: Path) -> Path:
    return entry.with_name(entry.name + ".json")


def _lock_file(entry: Path) -> Path:
    return entry.with_name(entry.name + ".lock")


def _read(entry: Path) -> bytes | None:
    try:
        return entry.read_bytes()
    except FileNotFoundError:
        return None


def _atomic_write(target: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``target``, fsync, rename into place."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temps(entry: Path) -> None:
    """Called with the entry's lock held: no one else can be writing these."""
    for tmp in entry.parent.glob(f".{entry.name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
    for tmp in entry.parent.glob(f".{entry.name}.json.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def _locked(entry: Path, what: str) -> Iterator[None]:
    with _thread_locks_guard:
        tlock = _thread_locks.setdefault(str(entry), threading.Lock())
    with tlock:
        fd = os.open(_lock_file(entry), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("attnmerge: waiting for another process to build %s", what)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock


def cached_build(
    kind: str,
    key: Mapping[str, str],
    build: Callable[[], bytes],
    *,
    suffix: str = ".cubin",
    describe: str = "",
) -> bytes:
    """The cached artefact for (kind, key); on a miss call ``build()`` (once across
    processes: see the module docstring), store its bytes and return them."""
    entry = entry_path(kind, key, suffix=suffix)
    data = _read(entry)
    if data is not None:
        return data

    what = describe or kind
    if _env_flag(ENV_NO_BUILD):
        raise BuildError(
            f"attnmerge: {what} is not built and builds are forbidden ({ENV_NO_BUILD} is set): "
            f"missing cache entry {entry}. Run `attnmerge build` beforehand to prebuild, "
            f"or unset {ENV_NO_BUILD}."
        )

    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry, what):
        data = _read(entry)
        if data is not None:
            return data  # another process built it while we waited
        _remove_stale_temps(entry)

        message = f"attnmerge: building {what} (first use; cached at {entry})"
        if _env_flag(ENV_VERBOSE):
            message += f"; key: {json.dumps(dict(key), sort_keys=True)}"
        logger.info(message)
        start = time.perf_counter()
        result = build()
        seconds = time.perf_counter() - start
        if not isinstance(result, (bytes, bytearray, memoryview)):
            raise BuildError(f"build of {what} returned {type(result).__name__}, not bytes")
        data = bytes(result)
        if not data:
            raise BuildError(f"build of {what} returned no data")

        sidecar = {
            "kind": kind,
            "key": dict(key),
            "describe": describe,
            "file": entry.name,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "build_seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # The sidecar first: an entry that exists always has its key next to it.
        _atomic_write(_sidecar(entry), (json.dumps(sidecar, indent=2) + "\n").encode())
        _atomic_write(entry, data)
        _fsync_dir(entry.parent)
        logger.info("attnmerge: built %s in %.2f s", what, seconds)
        return data


def entries() -> list[dict]:
    """The cached entries, for ``attnmerge info``: dicts with ``path``, ``size``, ``kind``,
    ``key`` (None if the sidecar is missing or unreadable) and, when known, ``describe``,
    ``created`` and ``build_seconds``. Lock files, sidecars and temporary files are not
    entries."""
    root = cache_dir()
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        name = path.name
        if name.startswith(".") or name.endswith(_RESERVED_ENDINGS):
            continue
        m = _ENTRY_RE.fullmatch(name)
        if m is None or not path.is_file():
            continue
        info: dict = {"path": str(path), "size": path.stat().st_size, "kind": m["kind"]}
        info["key"] = None
        try:
            meta = json.loads(_sidecar(path).read_text())
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict):
            info["key"] = meta.get("key")
            info["kind"] = meta.get("kind", info["kind"])
            for field in ("describe", "created", "build_seconds"):
                if field in meta:
                    info[field] = meta[field]
        found.append(info)
    return found
