"""Compile CUDA C++ to a cubin with NVRTC, through ctypes.

No dependency on cuda-python: the only requirement is a libnvrtc shared library. Several
may be installed (torch's own ``nvidia-cuda-nvrtc-cu12`` beside a CUDA 13
``nvidia-cuda-nvrtc``, a CUDA toolkit...), and a cubin is loaded by the driver only if the
NVRTC that built it is of a CUDA major version the driver supports. The library is
chosen on first use (``import attnmerge`` loads nothing) and loaded once per process:

1. ``$ATTNMERGE_NVRTC_LIBRARY``: an explicit path (if set, nothing else is tried);
2. else among the libraries found (:func:`candidates`: the pip wheels
   ``nvidia/*/lib/libnvrtc.so*`` under every ``sys.path`` entry and the ``nvidia``
   namespace package, then ``$CUDA_HOME/lib64``, ``$CUDA_PATH/lib64``,
   ``/usr/local/cuda/lib64``, and only if none is there the dynamic loader's search
   path), :func:`choose_library` picks one from their versions, torch's CUDA version
   (``torch.version.cuda``) and the driver's (``cuDriverGetVersion``, read without
   initialising CUDA). Its docstring states the rule and why.

``arch`` is always a real architecture (``sm_80``, ``sm_90a``, ``sm_100a``...), so NVRTC
emits SASS (a cubin) that the driver loads without a JIT step.
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
    "Candidate",
    "Choice",
    "CompiledModule",
    "LibraryChoiceError",
    "candidates",
    "choose_library",
    "compile_cubin",
    "describe",
    "find_library",
    "install_hint",
    "select",
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
# Locating libnvrtc
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


def _library_version(path: str) -> tuple[int, ...]:
    """The CUDA version of the libnvrtc at ``path``, without loading it: from its file name
    (``libnvrtc.so.12.4.127``, symlinks resolved), else, where the name has only the major
    (the pip wheels' ``libnvrtc.so.13``), from ``libnvrtc-builtins.so.<major>.<minor>``
    beside it, which NVRTC itself loads by that name. ``(13,)`` if only the major is known,
    ``()`` if nothing is."""
    version = _version_key(path)
    if len(version) >= 2 or not os.path.isabs(path):
        return version
    builtins = [
        _version_key(p)
        for p in glob.glob(
            os.path.join(glob.escape(os.path.dirname(path)), "libnvrtc-builtins.so.*")
        )
    ]
    same_major = [v for v in builtins if len(v) >= 2 and v[:1] == version[:1]]
    if version and same_major:
        return max(same_major)
    return version


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


@dataclass(frozen=True)
class Candidate:
    """A libnvrtc found on this machine: its path (or a bare soname from the dynamic
    loader's search) and its CUDA version, ``(12, 4, 127)``, ``(12, 4)``, ``(13,)`` where
    only the major is known, ``()`` where nothing is."""

    path: str
    version: tuple[int, ...]


@dataclass(frozen=True)
class Choice:
    """The libnvrtc to load and why (one clause, e.g. "matches torch's CUDA 12.4")."""

    path: str
    version: tuple[int, ...]
    why: str


class LibraryChoiceError(BuildError):
    """No libnvrtc was found, or none whose cubins the driver can load."""


_SEARCHED = (
    "searched the nvidia-cuda-nvrtc pip wheels, $CUDA_HOME/lib64, $CUDA_PATH/lib64, "
    "/usr/local/cuda/lib64 and the dynamic loader's path"
)


def candidates() -> list[Candidate]:
    """Every libnvrtc found, in search order (pip wheels, newest first, then the CUDA
    toolkits), one per file; the dynamic loader's only when none of those exists. Nothing
    is loaded."""
    paths = _pip_candidates() + _toolkit_candidates()
    unique: dict[str, str] = {}
    for path in paths:
        unique.setdefault(os.path.realpath(path), path)
    if not unique:
        soname = ctypes.util.find_library("nvrtc")
        return [Candidate(soname, _version_key(soname))] if soname else []
    return [Candidate(path, _library_version(path)) for path in unique.values()]


def _dotted(version: Sequence[int]) -> str:
    """The major.minor: "12.4" for (12, 4, 127), "13" for (13,), "unknown" for ()."""
    return ".".join(map(str, version[:2])) or "unknown"


def install_hint(torch_cuda: tuple[int, int] | None, driver: tuple[int, int] | None) -> str:
    """The pip command that installs the NVRTC matching torch's CUDA (if the driver can
    load its cubins), else the driver's CUDA; the generic one when neither is known."""
    target = torch_cuda
    if target is None or (driver is not None and target[0] > driver[0]):
        target = driver
    if target is None:
        return INSTALL_HINT
    package = "nvidia-cuda-nvrtc" if target[0] >= 13 else f"nvidia-cuda-nvrtc-cu{target[0]}"
    return f'pip install "{package}=={target[0]}.{target[1]}.*"'


def _setting(torch_cuda: tuple[int, int] | None, driver: tuple[int, int] | None) -> str:
    torch_part = f"built with CUDA {_dotted(torch_cuda)}" if torch_cuda else "a CPU build"
    driver_part = (
        f"the NVIDIA driver supports CUDA {_dotted(driver)}"
        if driver
        else "no NVIDIA driver was found"
    )
    return f"torch is {torch_part}, {driver_part}"


def _newest_fitting(found: Sequence[Candidate], cap: tuple[int, int]) -> tuple[Candidate, bool]:
    """Among ``found`` (all of a CUDA major <= ``cap``'s): the highest major; in it the
    newest not newer than ``cap`` (then True), else the oldest, nearest to ``cap`` (then
    False). Ties go to the first in search order."""
    major = max(c.version[:1] for c in found)
    same = [c for c in found if c.version[:1] == major]
    within = [c for c in same if len(c.version) >= 2 and c.version[:2] <= cap]
    within += [c for c in same if len(c.version) == 1 and c.version[0] < cap[0]]
    if within:
        return max(within, key=lambda c: c.version), True
    return min(same, key=lambda c: c.version), False


def choose_library(
    found: Sequence[Candidate],
    torch_cuda: tuple[int, int] | None,
    driver: tuple[int, int] | None,
) -> Choice:
    """The libnvrtc to use among ``found`` (in search order), given torch's CUDA version
    (None for a CPU build) and the CUDA version the driver supports (None without one).

    The driver loads a cubin built by NVRTC of its own CUDA major version or an older one
    (within a major, CUDA's minor-version compatibility lets a 12.8 cubin load on a 12.4
    driver: a cubin is SASS, no PTX for the driver to JIT); a newer major never loads.
    Hence:

    1. torch with CUDA: an NVRTC of exactly torch's major.minor, the one torch was built
       with (CUDA builds of torch install it as a dependency), whose cubins load wherever
       torch runs; else the newest of torch's major not newer than the driver (or than torch,
       without a driver), else the nearest newer one of that major;
    2. else (a CPU build of torch, or no NVRTC of torch's major the driver can load): the
       newest CUDA major the driver can load, in it the newest not newer than the driver
       (that NVRTC knows every architecture the driver does), else the nearest newer one;
    3. without a driver (a build machine, CI): the newest found, which can target the
       most architectures; the reason says so.

    Raises :class:`LibraryChoiceError` (one line: what was found, torch's and the
    driver's CUDA, and how to fix it) if nothing was found or the driver can load none.
    """
    setting = _setting(torch_cuda, driver)
    if not found:
        raise LibraryChoiceError(
            f"libnvrtc not found ({_SEARCHED}); {setting}; fix: {install_hint(torch_cuda, driver)}"
        )
    loadable = [c for c in found if driver is None or not c.version or c.version[0] <= driver[0]]
    if torch_cuda is not None:
        wanted = _dotted(torch_cuda)
        same = [c for c in loadable if c.version[:1] == torch_cuda[:1]]
        for c in same:
            if c.version[:2] == torch_cuda:
                return Choice(c.path, c.version, f"matches torch's CUDA {wanted}")
        if same:
            cap = driver or torch_cuda
            cap_name = (
                f"the driver's CUDA {_dotted(driver)}"
                if driver
                else f"torch's {wanted} (no NVIDIA driver found)"
            )
            c, within = _newest_fitting(same, cap)
            relation = (
                f"the newest {torch_cuda[0]}.x not newer than {cap_name}"
                if within
                else f"the nearest {torch_cuda[0]}.x above {cap_name} "
                "(CUDA minor-version compatibility)"
            )
            why = f"torch's CUDA is {wanted}, none found of that version: {relation}"
            return Choice(c.path, c.version, why)
        fallback = f"none of torch's CUDA {torch_cuda[0]}.x found"
        if driver is not None and any(c.version[:1] == torch_cuda[:1] for c in found):
            fallback = f"torch's CUDA {wanted} is newer than the driver's"
    else:
        fallback = "torch is a CPU build"
    if driver is None:
        c = max(found, key=lambda c: c.version)
        return Choice(c.path, c.version, f"{fallback}, no NVIDIA driver found: the newest found")
    if not loadable:
        listed = ", ".join(f"NVRTC {_dotted(c.version)} ({c.path})" for c in found)
        raise LibraryChoiceError(
            f"no libnvrtc whose cubins the driver can load: found {listed}; {setting}, "
            f"and it loads no cubin of a newer CUDA major; fix: {install_hint(torch_cuda, driver)}"
            f" (or point {ENV_LIBRARY} to a libnvrtc of CUDA {driver[0]}.x or older)"
        )
    c, within = _newest_fitting(loadable, driver)
    relation = (
        f"the newest not newer than the driver's CUDA {_dotted(driver)}"
        if within
        else f"the nearest above the driver's CUDA {_dotted(driver)} "
        "(CUDA minor-version compatibility)"
    )
    return Choice(c.path, c.version, f"{fallback}: {relation}")


def _torch_cuda_version() -> tuple[int, int] | None:
    """torch's CUDA version (``torch.version.cuda``), None for a CPU or ROCm build. Reads a
    constant: CUDA is not initialised."""
    try:
        import torch
    except ImportError:
        return None
    m = re.match(r"(\d+)\.(\d+)", getattr(torch.version, "cuda", None) or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def select() -> Choice:
    """The libnvrtc this process uses (not loaded): ``$ATTNMERGE_NVRTC_LIBRARY``, else
    :func:`choose_library` on what is installed here. Raises :class:`LibraryChoiceError`."""
    explicit = os.environ.get(ENV_LIBRARY)
    if explicit:
        return Choice(explicit, _library_version(explicit), f"set by {ENV_LIBRARY}")
    from . import driver

    return choose_library(candidates(), _torch_cuda_version(), driver.cuda_version())


def find_library() -> str | None:
    """The libnvrtc that would be loaded (a path, or a bare soname from the dynamic
    loader's search), or None. Does not load it."""
    try:
        return select().path
    except LibraryChoiceError:
        return None


# ---------------------------------------------------------------------------------------
# Loading libnvrtc
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    lib: ctypes.CDLL | None
    path: str | None
    reason: str | None
    choice: Choice | None = None
    version: tuple[int, int] | None = None


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
    try:
        choice = select()
    except LibraryChoiceError as e:
        return _Loaded(None, None, str(e))
    path = choice.path
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        where = f"{ENV_LIBRARY}={path}" if os.environ.get(ENV_LIBRARY) else path
        return _Loaded(None, path, f"cannot load libnvrtc ({where}): {e}", choice)
    try:
        _declare(lib)
    except AttributeError as e:
        reason = f"libnvrtc at {path} is too old (needs CUDA >= 11.2): {e}"
        return _Loaded(None, path, reason, choice)
    major, minor = ctypes.c_int(), ctypes.c_int()
    code = lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    if code != _NVRTC_SUCCESS:
        reason = f"libnvrtc at {path}: nvrtcVersion failed: {_error_string(lib, code)}"
        return _Loaded(None, path, reason, choice)
    return _Loaded(lib, path, None, choice, (major.value, minor.value))


def unavailable_reason() -> str | None:
    """None if NVRTC can be used, else a one-line reason."""
    return _load().reason


def loaded_path() -> str | None:
    """The path (or soname) of the loaded libnvrtc; None if unavailable."""
    loaded = _load()
    return loaded.path if loaded.lib is not None else None


def describe() -> str:
    """One line: which NVRTC is used and why, e.g. ``NVRTC 12.4
    (/.../libnvrtc.so.12), matches torch's CUDA 12.4``; or why none can be used."""
    loaded = _load()
    if loaded.lib is None or loaded.choice is None or loaded.version is None:
        return f"NVRTC unavailable: {loaded.reason}"
    return f"NVRTC {_dotted(loaded.version)} ({loaded.path}), {loaded.choice.why}"


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
    _lib()
    version = _load().version
    assert version is not None  # set whenever the library loaded
    return version


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
