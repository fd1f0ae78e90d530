"""The eager fast path: a compiled launcher for repeated calls (cuda and triton backends).

Outside CUDA graphs an engine pays the host time of every call, and in Python that is
mostly argument checks, reading tensor metadata and the ctypes launch
(docs/host-overhead.md). A call of ``merge_attn_states`` whose tensors look exactly like
an earlier call's (dtypes, devices, shapes, strides, alignment, which written tensors are
the very inputs, the class of ``prefill_tokens_with_context``) passes every check that
call passed and launches the same kernel with the same parameters but for its pointers.
``csrc/eager.c``, a CPython extension, reads those facts from the tensors (one C call a
tensor through DLPack's exchange API where torch has it, torch 2.10 on; else Python's C
API), finds the launch plan stored for them and launches it: the cuda backend's kernel with
``cuLaunchKernel``, the triton backend's through its compiled kernel's runner. Everything
else (the first call of each kind, errors, the torch backend, ``torch.compile``) takes the
Python path, which stores the plan of each call it launches on a kernel backend.

The extension is compiled on first use with the host C compiler and Python's headers (the
toolchain Triton's launchers need too; ``$CC`` picks the compiler) and kept in the kernel
cache. Where it cannot be built, every call takes the Python path, with one log line
saying why. ``ATTNMERGE_EAGER_LAUNCHER=0`` turns the fast path off.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from ..version import __version__
from . import cache
from .nvrtc import BuildError

if TYPE_CHECKING:
    from ..call import MergeCall

__all__ = [
    "DLPACK_EXCHANGE_API",
    "ENV_EAGER_LAUNCHER",
    "LAUNCHER",
    "EagerLauncher",
    "build_extension",
    "cuda_plan",
    "describe",
    "prebuild",
]

logger = logging.getLogger("attnmerge")

ENV_EAGER_LAUNCHER = "ATTNMERGE_EAGER_LAUNCHER"
_SOURCE = "eager.c"
_MODULE_NAME = "_attnmerge_eager"
#: PlanHeader in csrc/eager.c: function, grid, block, device index, heads, the byte
#: offsets of the seven tensors' pointers and of rows_with_first, key and block sizes.
PLAN_HEADER = struct.Struct("<QIIiI7iiII")
#: The tensors of merge_attn_states in the order of the header's offsets (and of
#: MergeCall.launcher_tensors), by the name of their field in MergeParams.
PLAN_FIELDS = ("out", "partial0", "lse0", "partial1", "lse1", "out_lse", "format_operand")
#: The same for a stacked or packed merge, by their fields in PartialsParams.
PARTIALS_PLAN_FIELDS = ("out", "partials", "lses", "indptr", "out_lse", "format_operand")
#: Plans kept at most (one per distinct kind of call; cleared when full).
MAX_PLANS = 4096
#: The attribute of torch.Tensor holding DLPack's exchange API (a capsule), by which the
#: extension reads a tensor in one C call (csrc/eager.c).
DLPACK_EXCHANGE_API = "__dlpack_c_exchange_api__"


def _source() -> str:
    return resources.files("attnmerge.cuda").joinpath("csrc", _SOURCE).read_text()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_extension() -> bytes:
    """The compiled extension (a shared library), built now.

    Raises:
        BuildError: no C compiler, no Python headers, or the compiler failed.
    """
    compiler = _compiler()
    if compiler is None:
        raise BuildError("no C compiler (cc, gcc or $CC) to build the eager launcher")
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").is_file():
        raise BuildError(f"Python's headers are missing ({include}/Python.h)")
    with tempfile.TemporaryDirectory(prefix="attnmerge-eager-") as tmp:
        source, target = Path(tmp, _SOURCE), Path(tmp, _MODULE_NAME + ".so")
        source.write_text(_source())
        command = [compiler, "-O2", "-shared", "-fPIC", "-I", include, str(source)]
        command += ["-o", str(target)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
        return target.read_bytes()


def _cache_key() -> dict[str, str]:
    return {
        "attnmerge": __version__,
        "source": hashlib.sha256(_source().encode()).hexdigest()[:16],
        "python": f"{sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')}",
        "compiler": _compiler() or "",
    }


def _entry() -> Path:
    return cache.entry_path("eager", _cache_key(), suffix=".so")


def prebuild() -> str:
    """Build the extension into the cache now (``attnmerge build``); what was done, in a
    line.

    Raises:
        BuildError: as :func:`build_extension`.
    """
    cache.cached_build(
        "eager", _cache_key(), build_extension, suffix=".so", describe="eager launcher"
    )
    return f"eager launcher built with {_compiler()} ({_entry()})"


def describe() -> str:
    """The eager launcher's state for ``attnmerge info``, in a line; loads nothing."""
    if os.environ.get(ENV_EAGER_LAUNCHER, "1") == "0":
        return f"off ({ENV_EAGER_LAUNCHER}=0): eager calls launch from Python"
    compiler = _compiler()
    if compiler is None:
        return "unavailable: no C compiler (cc, gcc or $CC): eager calls launch from Python"
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").is_file():
        return f"unavailable: no Python headers ({include}): eager calls launch from Python"
    built = "built" if _entry().is_file() else "built on first use"
    dlpack = hasattr(torch.Tensor, DLPACK_EXCHANGE_API)
    reader = "DLPack's exchange API" if dlpack else "Python's C API"
    return f"{built}, with {compiler}; tensors read through {reader}"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class EagerLauncher:
    """The compiled launcher and its plans.

    ``module`` is None until :meth:`load` succeeded; the API then calls
    ``module.merge_pair(plans, code, ...)`` first and takes the Python path on anything
    but None (launched), remembering the plan of a miss with :meth:`remember`.
    """

    def __init__(self) -> None:
        self.module: ModuleType | None = None
        self.plans: dict[int, bytes | tuple] = {}  # csrc/eager.c: bytes (cuda), tuple (triton)
        self.unavailable: str | None = None  # why the fast path is off, once tried
        #: whether the extension reads tensors through DLPack's exchange API (torch 2.10
        #: on), not through Python's C API
        self.reads_with_dlpack = False
        self._tried = False

    def load(self, launch_address: int | None = None, host_tensors: bool = False) -> bool:
        """Build (or take from the cache) and bind the extension, once; whether it is on.
        ``launch_address`` replaces cuLaunchKernel (tests on a CPU, with host tensors)."""
        if self._tried:
            return self.module is not None
        self._tried = True
        if os.environ.get(ENV_EAGER_LAUNCHER, "1") == "0":
            self.unavailable = f"{ENV_EAGER_LAUNCHER}=0"
            return False
        try:
            data = cache.cached_build(
                "eager", _cache_key(), build_extension, suffix=".so", describe="eager launcher"
            )
            path = _entry()
            if not path.is_file():  # the cache could not keep it: load from a copy
                path = Path(tempfile.mkdtemp(prefix="attnmerge-eager-"), _MODULE_NAME + ".so")
                path.write_bytes(data)
            module = _load(path)
            if launch_address is None:
                from .driver import _lib

                launch_address = ctypes.cast(_lib().cuLaunchKernel, ctypes.c_void_p).value
            device_getter = getattr(torch._C, "_cuda_getDevice", lambda: -1)
            stream_getter = getattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 0)
            self.reads_with_dlpack = module.setup(
                torch.Tensor,
                device_getter,
                stream_getter,
                launch_address,
                host_tensors,
                getattr(torch.Tensor, DLPACK_EXCHANGE_API, None),
            )
        except (BuildError, OSError, ImportError) as e:
            self.unavailable = str(e).splitlines()[0]
            logger.info("attnmerge: eager launcher unavailable, Python launches: %s", e)
            return False
        self.module = module
        return True

    def remember(
        self, miss: object, call: MergeCall, plan_of: Callable[[bytes, MergeCall], object]
    ) -> None:
        """Store the plan of ``call``, just validated by the Python path and served by a
        kernel backend, under the key ``miss`` that ``merge_pair`` returned for it;
        ``plan_of(key, call)`` is the backend's plan (None: it has none)."""
        if not isinstance(miss, tuple):
            return
        hash_value, key = miss
        plan = plan_of(key, call)
        if plan is None:
            return
        if len(self.plans) >= MAX_PLANS:
            self.plans.clear()
        self.plans[hash_value] = plan


def cuda_plan(key: bytes, call: MergeCall) -> bytes:
    """The cuda backend's plan: PlanHeader, the key and the launch's parameter block. A
    stacked or packed call's plan patches its token count with a first partial where a
    two-partial one patches its row count (the header's head count is then 1)."""
    from ..call import PartialLayout
    from .backend import PARAMS, PARTIALS_PARAMS, launch_arguments, partials_launch_arguments

    if call.signature.layout is PartialLayout.SEPARATE:
        launch = launch_arguments(call)
        block, fields, first, heads = PARAMS, PLAN_FIELDS, "rows_with_first", call.output.shape[1]
    else:
        launch = partials_launch_arguments(call)
        block, fields, first, heads = PARTIALS_PARAMS, PARTIALS_PLAN_FIELDS, "tokens_with_first", 1
    if launch is None:
        return PLAN_HEADER.pack(0, 0, 0, -1, 0, *([-1] * 8), len(key), 0) + key
    offsets = [block.offsets[field] for field in fields]
    offsets += [-1] * (len(PLAN_FIELDS) - len(offsets))
    if call.output_format.kernel_operand() is None:
        offsets[fields.index("format_operand")] = -1  # the block's null operand stays
    header = PLAN_HEADER.pack(
        launch.kernel.function_address,
        launch.grid,
        launch.kernel.block,
        launch.kernel.device_index,
        heads,
        *offsets,
        block.offsets[first],
        len(key),
        len(launch.params),
    )
    return header + key + launch.params


#: The process's launcher.
LAUNCHER = EagerLauncher()
