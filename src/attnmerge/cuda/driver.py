"""The CUDA driver API through ctypes: load a cubin, launch a kernel on a stream.

The binding is deliberately thin: ``libcuda`` comes with every NVIDIA driver, so
nothing is compiled on the user's machine for the launch itself, and a launch is one
foreign call with the kernel's single by-value parameter struct. Modules are loaded into
the device's primary context, the one PyTorch uses, and kernels go on the stream the
caller passes (PyTorch's current stream, so CUDA graphs capture them).
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["DriverError", "Kernel", "cuda_version", "load_kernel", "unavailable_reason"]

_CUDA_SUCCESS = 0
_CUDA_ERROR_INVALID_CONTEXT = 201


class DriverError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the driver's error."""


@functools.cache
def _library() -> ctypes.CDLL:
    """libcuda, loaded but not initialised (raises OSError without a driver)."""
    return ctypes.CDLL("libcuda.so.1")


@functools.cache
def cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the installed driver supports, e.g. ``(12, 4)``; None
    without a usable driver (no libcuda, or a toolkit's stub library).

    ``cuDriverGetVersion`` needs no ``cuInit``: this loads libcuda but does not initialise
    CUDA or create a context, so it is safe before a ``fork``.
    """
    try:
        get_version = _library().cuDriverGetVersion
    except (OSError, AttributeError):
        return None
    get_version.argtypes = [ctypes.POINTER(ctypes.c_int)]
    get_version.restype = ctypes.c_int
    value = ctypes.c_int()
    if get_version(ctypes.byref(value)) != _CUDA_SUCCESS or value.value <= 0:
        return None
    return value.value // 1000, value.value % 1000 // 10


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = _library()
    vp, u32 = ctypes.c_void_p, ctypes.c_uint
    lib.cuInit.argtypes = [u32]
    lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(vp), ctypes.c_int]
    lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(vp)]
    lib.cuCtxSetCurrent.argtypes = [vp]
    lib.cuCtxPushCurrent_v2.argtypes = [vp]
    lib.cuCtxPopCurrent_v2.argtypes = [ctypes.POINTER(vp)]
    lib.cuModuleLoadData.argtypes = [ctypes.POINTER(vp), ctypes.c_char_p]
    lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(vp), vp, ctypes.c_char_p]
    params = ctypes.POINTER(ctypes.c_char_p)  # kernelParams: one pointer per parameter
    lib.cuLaunchKernel.argtypes = [vp, u32, u32, u32, u32, u32, u32, u32, vp, params, vp]
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    for name in (
        "cuInit",
        "cuDeviceGet",
        "cuDevicePrimaryCtxRetain",
        "cuCtxGetCurrent",
        "cuCtxSetCurrent",
        "cuCtxPushCurrent_v2",
        "cuCtxPopCurrent_v2",
        "cuModuleLoadData",
        "cuModuleGetFunction",
        "cuLaunchKernel",
        "cuGetErrorString",
    ):
        getattr(lib, name).restype = ctypes.c_int
    _check(lib, lib.cuInit(0), "cuInit")
    return lib


def unavailable_reason() -> str | None:
    """None if the driver library loads and initialises, else why not (one line)."""
    try:
        _lib()
    except OSError as e:
        return f"the NVIDIA driver library libcuda.so.1 cannot be loaded ({e})"
    except DriverError as e:
        return str(e)
    return None


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != _CUDA_SUCCESS:
        msg = ctypes.c_char_p()
        lib.cuGetErrorString(code, ctypes.byref(msg))
        text = msg.value.decode() if msg.value else "unknown error"
        raise DriverError(f"{what} failed: {text} (CUresult {code})")


@functools.cache
def _primary_context(device_index: int) -> int:
    lib = _lib()
    dev = ctypes.c_int()
    _check(lib, lib.cuDeviceGet(ctypes.byref(dev), device_index), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    _check(lib, lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    return ctx.value


class Kernel:
    """One loaded kernel function with a single by-value parameter struct."""

    __slots__ = ("_function", "_launch", "block", "device_index", "name")

    def __init__(self, function: int, name: str, device_index: int, block: int) -> None:
        self._function = ctypes.c_void_p(function)
        self._launch = _lib().cuLaunchKernel
        self.name = name
        self.device_index = device_index
        self.block = block

    @property
    def function_address(self) -> int:
        """The ``CUfunction`` handle."""
        return self._function.value

    def launch(self, grid: int, stream: int, params: bytes) -> None:
        """Launch on ``stream`` (a raw ``cudaStream_t``) with ``params`` as the struct.

        The driver copies the parameter bytes at launch (and at graph capture), so the
        buffer may be dropped right after.
        """
        # kernelParams is an array of pointers to each parameter's bytes: with one
        # parameter, a pointer to a single char* holding the address of the bytes
        # object's own buffer (no copy, no array construction on the hot path).
        args = ctypes.c_char_p(params)
        code = self._launch(
            self._function, grid, 1, 1, self.block, 1, 1, 0, stream, ctypes.byref(args), None
        )
        if code == _CUDA_ERROR_INVALID_CONTEXT:
            # A thread on which nothing made the device's context current yet.
            lib = _lib()
            _check(lib, lib.cuCtxSetCurrent(_primary_context(self.device_index)), "cuCtxSetCurrent")
            code = self._launch(
                self._function, grid, 1, 1, self.block, 1, 1, 0, stream, ctypes.byref(args), None
            )
        if code != _CUDA_SUCCESS:
            _check(_lib(), code, f"cuLaunchKernel({self.name}, grid={grid})")


def load_kernel(cubin: bytes, name: str, device_index: int, block: int) -> Kernel:
    """Load ``cubin`` into the primary context of device ``device_index`` and return the
    kernel ``name`` from it (the module stays loaded for the life of the process)."""
    lib = _lib()
    ctx = _primary_context(device_index)
    _check(lib, lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
    try:
        module = ctypes.c_void_p()
        _check(lib, lib.cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
        function = ctypes.c_void_p()
        _check(
            lib,
            lib.cuModuleGetFunction(ctypes.byref(function), module, name.encode()),
            f"cuModuleGetFunction({name})",
        )
    finally:
        popped = ctypes.c_void_p()
        lib.cuCtxPopCurrent_v2(ctypes.byref(popped))
    return Kernel(function.value, name, device_index, block)
