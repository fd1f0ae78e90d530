"""Compile CUDA C++ to a cubin with NVRTC, through ctypes.

No dependency on cuda-python or torch: the only requirement is a libnvrtc shared library,
looked up in this order (the first that exists is used):

1. ``$ATTNMERGE_NVRTC_LIBRARY``: an explicit path (if set, nothing else is tried);
2. the pip wheels (``nvidia-cuda-nvrtc``): ``nvidia/*/lib/libnvrtc.so*`` under every
   ``sys.path`` entry and the ``nvidia`` namespace package, newest version first;
3. ``$CUDA_HOME/lib64``, ``$CUDA_PATH/lib64``, ``/usr/local/cuda/lib64``;
4. ``ctypes.util.find_library("nvrtc")`` (the dynamic loader's search path).

The library is loaded once per process. ``arch`` is always a real architecture
(``sm_80``, ``sm_90a``, ``sm_100a``...), so NVRTC emits SASS (a cubin) that the driver
loads without a JIT step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "BuildError",
    "CompiledModule",
    "compile_cubin",
    "find_library",
    "supported_archs",
    "unavailable_reason",
    "version",
]

ENV_LIBRARY = "ATTNMERGE_NVRTC_LIBRARY"
INSTALL_HINT = "pip install nvidia-cuda-nvrtc"

_NVRTC_SUCCESS = 0
_MAX_LOG_CHARS = 8000
_ARCH_RE = re.compile(r"sm_\d+[af]?")


class BuildError(RuntimeError):
    """A CUDA build could not be done (compile error, missing toolchain, builds forbidden)."""


@dataclass(frozen=True)
class CompiledModule:
    """The result of :func:`compile_cubin`."""

    cubin: bytes
    #: name expression (e.g. ``"merge_kernel<float, 128>"``) -> mangled symbol name
    lowered_names: dict[str, str] = field(default_factory=dict)
    #: the compiler log (warnings); empty when NVRTC had nothing to say
    log: str = ""


# ---------------------------------------------------------------------------------------
# Locating and loading libnvrtc
# ---------------------------------------------------------------------------------------


def _version_key(path: str) -> tuple[int, ...]:
    """(13,) for libnvrtc.so.13, (12, 4, 127) for libnvrtc.so.12.4.127; symlinks resolved."""
    best: tuple[int, ...] = ()
    for name in (os.path.basename(path), os.path.basename(os.path.realpath(path))):
        m = re.search(r"\.so((?:\.\d+)+)$", name)
        if m:
            best = max(best, tuple(int(p) for p in m.group(1).strip(".").split(".")))
    return best


def _libs_in(directory: str) -> list[str]:
    """libnvrtc.so* files in ``directory`` (not libnvrtc-builtins / libnvrtc.alt), newest
    first."""
    found = [
        p
        for p in glob.glob(os.path.join(glob.escape(directory), "libnvrtc.so*"))
        if re.fullmatch(r"libnvrtc\.so(\.\d+)*", os.path.basename(p)) and os.path.isfile(p)
    ]
    return sorted(found, key=_version_key, reverse=True)


def _nvidia_package_dirs() -> list[str]:
    """Directories of the ``nvidia`` namespace package (where the pip CUDA wheels live)."""
    dirs: list[str] = []
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs.extend(spec.submodule_search_locations)
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "nvidia")
        if os.path.isdir(candidate):
            dirs.append(candidate)
    unique: list[str] = []
    seen: set[str] = set()
    for d in dirs:
        real = os.path.realpath(d)
        if real not in seen:
            seen.add(real)
            unique.append(d)
    return unique


def _pip_candidates() -> list[str]:
    """libnvrtc from the pip wheels: nvidia/cuda_nvrtc/lib (CUDA 12), nvidia/cu13/lib
    (CUDA 13), ...; newest version first."""
    found: list[str] = []
    for pkg_dir in _nvidia_package_dirs():
        for lib_dir in sorted(glob.glob(os.path.join(glob.escape(pkg_dir), "*", "lib"))):
            found.extend(_libs_in(lib_dir))
    unique = list(dict.fromkeys(found))
    return sorted(unique, key=_version_key, reverse=True)  # stable: sys.path order on ties


def _toolkit_candidates() -> list[str]:
    dirs = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            dirs.append(os.path.join(root, "lib64"))
    dirs.append("/usr/local/cuda/lib64")
    found: list[str] = []
    for d in dirs:
        found.extend(_libs_in(d))
    return list(dict.fromkeys(found))


def find_library() -> str | None:
    """The libnvrtc that would be loaded (a path, or a bare soname from the dynamic
    loader's search), or None. Does not load it."""
    explicit = os.environ.get(ENV_LIBRARY)
    if explicit:
        return explicit
    candidates = _pip_candidates() + _toolkit_candidates()
    if candidates:
        return candidates[0]
    return ctypes.util.find_library("nvrtc")


@dataclass(frozen=True)
class _Loaded:
    lib: ctypes.CDLL | None
    path: str | None
    reason: str | None


def _declare(lib: ctypes.CDLL) -> None:
    c_int_p = ctypes.POINTER(ctypes.c_int)
    c_size_p = ctypes.POINTER(ctypes.c_size_t)
    prog = ctypes.c_void_p
    char_pp = ctypes.POINTER(ctypes.c_char_p)
    signatures = {
        "nvrtcGetErrorString": (ctypes.c_char_p, [ctypes.c_int]),
        "nvrtcVersion": (ctypes.c_int, [c_int_p, c_int_p]),
        "nvrtcGetNumSupportedArchs": (ctypes.c_int, [c_int_p]),
        "nvrtcGetSupportedArchs": (ctypes.c_int, [c_int_p]),
        "nvrtcCreateProgram": (
            ctypes.c_int,
            [
                ctypes.POINTER(prog),
                ctypes.c_char_p,
                ctypes.c_char_p,
                ctypes.c_int,
                char_pp,
                char_pp,
            ],
        ),
        "nvrtcDestroyProgram": (ctypes.c_int, [ctypes.POINTER(prog)]),
        "nvrtcAddNameExpression": (ctypes.c_int, [prog, ctypes.c_char_p]),
        "nvrtcCompileProgram": (ctypes.c_int, [prog, ctypes.c_int, char_pp]),
        "nvrtcGetProgramLogSize": (ctypes.c_int, [prog, c_size_p]),
        "nvrtcGetProgramLog": (ctypes.c_int, [prog, ctypes.c_char_p]),
        "nvrtcGetCUBINSize": (ctypes.c_int, [prog, c_size_p]),
        "nvrtcGetCUBIN": (ctypes.c_int, [prog, ctypes.c_char_p]),
        "nvrtcGetLoweredName": (ctypes.c_int, [prog, ctypes.c_char_p, char_pp]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)  # AttributeError: too old an NVRTC (< 11.2)
        fn.restype = restype
        fn.argtypes = argtypes


@functools.cache
def _load() -> _Loaded:
    path = find_library()
    if path is None:
        return _Loaded(None, None, f"libnvrtc not found; {INSTALL_HINT}")
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        where = f"{ENV_LIBRARY}={path}" if os.environ.get(ENV_LIBRARY) else path
        return _Loaded(None, path, f"cannot load libnvrtc ({where}): {e}")
    try:
        _declare(lib)
    except AttributeError as e:
        return _Loaded(None, path, f"libnvrtc at {path} is too old (needs CUDA >= 11.2): {e}")
    return _Loaded(lib, path, None)


def unavailable_reason() -> str | None:
    """None if NVRTC can be used, else a one-line reason."""
    return _load().reason


def loaded_path() -> str | None:
    """The path (or soname) of the loaded libnvrtc; None if unavailable."""
    loaded = _load()
    return loaded.path if loaded.lib is not None else None


def _lib() -> ctypes.CDLL:
    loaded = _load()
    if loaded.lib is None:
        raise BuildError(f"NVRTC is unavailable: {loaded.reason}")
    return loaded.lib


def _error_string(lib: ctypes.CDLL, code: int) -> str:
    s = lib.nvrtcGetErrorString(code)
    return s.decode(errors="replace") if s else f"NVRTC error {code}"


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != _NVRTC_SUCCESS:
        raise BuildError(f"{what} failed: {_error_string(lib, code)}")


# ---------------------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------------------


def version() -> tuple[int, int]:
    """NVRTC's (major, minor), e.g. (13, 0)."""
    lib = _lib()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def supported_archs() -> list[str]:
    """The real architectures this NVRTC can target, e.g. ["sm_75", ..., "sm_120"].
    (Arch-specific variants such as sm_90a are accepted for the listed base arch.)"""
    lib = _lib()
    n = ctypes.c_int()
    _check(lib, lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "nvrtcGetNumSupportedArchs")
    arr = (ctypes.c_int * max(n.value, 1))()
    _check(lib, lib.nvrtcGetSupportedArchs(arr), "nvrtcGetSupportedArchs")
    return [f"sm_{a}" for a in arr[: n.value]]


# ---------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------


def _trim(log: str) -> str:
    log = log.strip()
    if len(log) > _MAX_LOG_CHARS:
        rest = len(log) - _MAX_LOG_CHARS
        log = f"{log[:_MAX_LOG_CHARS]}\n... ({rest} more characters of log)"
    return log


def _program_log(lib: ctypes.CDLL, prog: ctypes.c_void_p) -> str:
    size = ctypes.c_size_t()
    if lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) != _NVRTC_SUCCESS or size.value <= 1:
        return ""
    buf = ctypes.create_string_buffer(size.value)
    if lib.nvrtcGetProgramLog(prog, buf) != _NVRTC_SUCCESS:
        return ""
    return buf.value.decode(errors="replace").strip()


def _has_std(options: Sequence[str]) -> bool:
    return any(o.startswith(("-std=", "--std=")) or o in ("-std", "--std") for o in options)


def compile_cubin(
    source: str,
    *,
    name: str,
    arch: str,
    options: Sequence[str] = (),
    name_expressions: Sequence[str] = (),
    headers: Mapping[str, str] | None = None,
) -> CompiledModule:
    """Compile ``source`` (CUDA C++) for ``arch`` (``"sm_80"``, ``"sm_90a"``...).

    ``name`` is the file name used in diagnostics. ``name_expressions`` (e.g.
    ``"merge<float, 128>"``) instantiate templates and are returned with their mangled
    names in :attr:`CompiledModule.lowered_names`. ``headers`` maps include names to
    their text (``#include "name"`` in the source). ``-std=c++17`` is added unless
    ``options`` has a ``-std``. Raises :class:`BuildError` on failure, with the log.
    """
    if not _ARCH_RE.fullmatch(arch):
        raise ValueError(f"arch must be a real architecture like 'sm_90a', got {arch!r}")
    lib = _lib()
    opts = [f"--gpu-architecture={arch}"]
    if not _has_std(options):
        opts.append("-std=c++17")
    opts.extend(options)

    headers = dict(headers or {})
    texts = (ctypes.c_char_p * max(len(headers), 1))(*(t.encode() for t in headers.values()))
    names = (ctypes.c_char_p * max(len(headers), 1))(*(n.encode() for n in headers))
    prog = ctypes.c_void_p()
    _check(
        lib,
        lib.nvrtcCreateProgram(
            ctypes.byref(prog), source.encode(), name.encode(), len(headers), texts, names
        ),
        f"nvrtcCreateProgram({name})",
    )
    try:
        for expr in name_expressions:
            _check(
                lib,
                lib.nvrtcAddNameExpression(prog, expr.encode()),
                f"nvrtcAddNameExpression({expr!r})",
            )
        c_opts = (ctypes.c_char_p * max(len(opts), 1))(*(o.encode() for o in opts))
        code = lib.nvrtcCompileProgram(prog, len(opts), c_opts)
        log = _program_log(lib, prog)
        if code != _NVRTC_SUCCESS:
            raise BuildError(
                f"NVRTC failed to compile {name} for {arch} ({_error_string(lib, code)})\n"
                f"options: {' '.join(opts)}\n"
                f"{_trim(log) or '(empty log)'}"
            )

        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        if size.value == 0:
            raise BuildError(f"NVRTC produced no cubin for {name} ({arch}); options: {opts}")
        buf = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
        cubin = buf.raw

        lowered: dict[str, str] = {}
        for expr in name_expressions:
            out = ctypes.c_char_p()
            _check(
                lib,
                lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(out)),
                f"nvrtcGetLoweredName({expr!r})",
            )
            # Copy now: the string belongs to the program, freed by nvrtcDestroyProgram.
            lowered[expr] = (out.value or b"").decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))

    return CompiledModule(cubin=cubin, lowered_names=lowered, log=log)
