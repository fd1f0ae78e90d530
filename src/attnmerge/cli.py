"""The ``attnmerge`` command line: ``info``, ``demo``, ``build`` and ``bench``.

Each subcommand is one entry of :data:`_COMMANDS`: a name, a help text, a function
that adds its options to its subparser and a function that runs it and returns the
exit code. ``bench`` is imported only when it is used. ``attnmerge`` alone prints the
help, which lists the commands. Long steps (``build``, ``demo``) report progress on
stderr through :class:`Progress`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata

import torch

from . import demo, dispatch
from .progress import Progress
from .version import __version__

__all__ = ["main"]


def _torch_line() -> str:
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    else:
        build = "CPU build"
    return f"{torch.__version__} ({build})"


def _triton_line() -> str:
    try:
        import triton
    except Exception as e:  # ImportError, or a broken install raising anything else
        try:
            return f"{metadata.version('triton')} installed, but not importable: {e}"
        except metadata.PackageNotFoundError:
            return "not installed"
    return getattr(triton, "__version__", "unknown version")


def _cuda_devices() -> list[str]:
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(
            f"cuda:{i}  {p.name}, compute capability {p.major}.{p.minor}, "
            f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs"
        )
    return lines


def _driver_line() -> str:
    from .cuda import driver

    version = driver.cuda_version()
    return f"supports CUDA {version[0]}.{version[1]}" if version else "no NVIDIA driver found"


def _cache_line() -> str:
    """The kernel cache: where, how many kernels built."""
    from .cuda import cache

    try:
        n = sum(entry.get("kind") != "eager" for entry in cache.entries())
    except OSError as e:
        return f"{cache.cache_dir()} unreadable: {e}"
    return f"{cache.cache_dir()} ({n} kernels)"


def _backend_lines(device: torch.device) -> list[str]:
    try:
        status = dispatch.backend_status(device)
    except Exception as e:  # info reports a broken installation, it must not crash on it
        return [f"cannot query backends: {type(e).__name__}: {e}"]
    width = max(len(name) for name in status)
    return [
        f"{name.ljust(width)}  {'available' if reason is None else 'not available: ' + reason}"
        for name, reason in status.items()
    ]


def _run_info(args: argparse.Namespace) -> int:
    """Print versions, devices and which backend can run where."""
    print(f"attnmerge  {__version__}")
    print(f"python     {platform.python_version()} ({sys.executable})")
    print(f"torch      {_torch_line()}")
    print(f"triton     {_triton_line()}")
    for var in ("TRITON_INTERPRET", dispatch.ENV_BACKEND):
        print(f"{var}={os.environ[var]}" if var in os.environ else f"{var} not set")
    devices = _cuda_devices() if torch.cuda.is_available() else []
    print("cuda devices:")
    for line in devices or ["no CUDA device"]:
        print(f"  {line}")
    from .cuda import eager, nvrtc

    print(f"driver     {_driver_line()}")
    print(f"nvrtc      {nvrtc.describe()}")
    print(f"kernels    {_cache_line()}")
    print(f"eager      {eager.describe()}")
    print(f"backends, in auto order ({', '.join(dispatch.AUTO_ORDER)}):")
    for device in ["cpu", *(f"cuda:{i}" for i in range(len(devices)))]:
        print(f"  {device}")
        for line in _backend_lines(torch.device(device)):
            print(f"    {line}")
    return 0


def _add_info_arguments(parser: argparse.ArgumentParser) -> None:
    """``info`` takes no options."""


# ---------------------------------------------------------------------------
# attnmerge build


def _default_archs() -> list[str]:
    from .cuda.backend import arch_of

    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return sorted(arch_of(c) for c in caps)
    return ["sm_80", "sm_90a"]


def _add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        action="append",
        help="target architecture, e.g. sm_90a (repeatable; default: the visible GPUs', "
        "or sm_80 and sm_90a without a GPU)",
    )
    parser.add_argument(
        "--head-sizes",
        default=",".join(str(d) for d in _common_head_sizes()),
        help="comma-separated head sizes to prepare kernels for",
    )
    parser.add_argument(
        "--mixed-dtypes",
        action="store_true",
        help="also prefix and suffix partials of different dtypes (9 pairs instead of 3)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="compile this many instances at once, in separate processes (default: the "
        "number of CPUs)",
    )


def _common_head_sizes() -> tuple[int, ...]:
    from .cuda.backend import COMMON_HEAD_SIZES

    return COMMON_HEAD_SIZES


def _run_build(args: argparse.Namespace) -> int:
    """Compile the CUDA kernels for the given architectures into the cache."""
    from .cuda import backend, cache, nvrtc

    reason = nvrtc.unavailable_reason()
    if reason is not None:
        print(f"attnmerge build: cannot compile: {reason}", file=sys.stderr)
        return 1
    if args.jobs < 1:
        print(f"attnmerge build: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    archs = args.arch or _default_archs()
    head_sizes = tuple(int(d) for d in args.head_sizes.split(",") if d)
    configs = backend.common_configs(head_sizes, mixed_dtypes=args.mixed_dtypes)
    where = cache.cache_dir()
    print(f"building {len(configs)} kernels for {', '.join(archs)} into {where}", flush=True)
    for arch in archs:
        start = time.perf_counter()
        with Progress(f"  {arch}", len(configs), unit="kernels") as progress:
            if args.jobs == 1:
                for config in configs:
                    backend.build_kernel(config, arch)
                    progress.advance()
            else:  # NVRTC runs in the calling thread: processes, each with its own
                import concurrent.futures

                with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
                    futures = [pool.submit(backend.build_kernel, c, arch) for c in configs]
                    for future in concurrent.futures.as_completed(futures):
                        future.result()
                        progress.advance()
        print(f"  {arch}: {time.perf_counter() - start:.1f} s", flush=True)
    from .cuda import eager

    try:  # the host-side launcher: optional, so a failure is reported, not fatal
        print(eager.prebuild(), flush=True)
    except (nvrtc.BuildError, OSError) as e:
        print(f"eager launcher not built: {str(e).splitlines()[0]}", flush=True)
    return 0


# ---------------------------------------------------------------------------
# attnmerge bench (options and the run live in bench.py, imported on use)


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from . import bench

    bench.add_arguments(parser)


def _run_bench(args: argparse.Namespace) -> int:
    """Benchmark the merge on the GPU; 2 without one."""
    from . import bench

    return bench.run(args)


# ---------------------------------------------------------------------------
# Command table and entry point.


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


_COMMANDS = (
    _Command(
        "info",
        "show versions, devices and which backends can run",
        "Print the attnmerge, Python, torch and Triton versions, the CUDA devices, and for "
        "the CPU and each CUDA device whether each backend can run there (or why not).",
        _add_info_arguments,
        _run_info,
    ),
    _Command(
        "demo",
        "merge a cascade-attention batch with every backend and check the result",
        "Build a cascade-attention batch (a shared prefix, per-request suffixes, one request "
        "without prefix at the end of the batch), merge the prefix and suffix partial states "
        "with every backend that can run on the device, into the partial dtype and into FP8, "
        "and compare with the attention computed in one piece in float64. Exits with 1 if an "
        "error exceeds its bound. On a CPU, the Triton backend runs in Triton's interpreter.",
        demo.add_arguments,
        demo.run,
    ),
    _Command(
        "build",
        "compile the CUDA kernels ahead of time (no GPU needed)",
        "Compile the CUDA backend's kernels with NVRTC for the given architectures and "
        "store them in the build cache (ATTNMERGE_CACHE_DIR, default ~/.cache/attnmerge), "
        "so that first use does not compile. Works on a machine without a GPU.",
        _add_build_arguments,
        _run_build,
    ),
    _Command(
        "bench",
        "benchmark the merge on the GPU (time, GB/s, %% of peak bandwidth)",
        "Time attnmerge's backends (cuda, triton, torch), the unfused baseline (merge, then a "
        "separate FP8 quantisation) and vLLM's merge_attn_states where vLLM is installed, on "
        "a grid of shapes (default: vLLM's, T in 1..4096 x H in 128..4 x D = 128 x "
        "fp32/fp16/bf16 partials, FP8 output) by CUDA-graph replay; print a table with the "
        "median time, GB/s and % of the card's datasheet bandwidth, and optionally write a "
        "CSV. --eager measures the host time per eager call instead. Needs a CUDA GPU: "
        "without one it exits with 2.",
        _add_bench_arguments,
        _run_bench,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``attnmerge`` argument parser, one subparser per entry of ``_COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="attnmerge",
        description="attnmerge: exact merging of partial attention states (output + LSE), "
        "with fused FP8 output.",
        epilog="Run 'attnmerge COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND", required=True)
    for cmd in _COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``attnmerge`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Usage errors return 2, ``--help`` returns 0, as the shell would see them; nothing
    calls ``sys.exit``, so tests and other programs can call this directly. No arguments
    at all print the help (the list of commands) and return 0.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        build_parser().print_help()
        return 0
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on usage errors
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    return args.run(args)
