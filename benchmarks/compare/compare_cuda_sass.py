"""Compare the machine code of every CUDA kernel with that of a base git revision.

For each kernel the product can launch (``attnmerge.cuda.backend.common_configs``), the
matching kernel instance of the base revision is compiled too, both with NVRTC for one
architecture, and their SASS (``cuobjdump -sass``, kernel names masked) must be equal.
Equal SASS means equal output bits and equal device time, so this settles both for the
CUDA backend without a GPU.

    python benchmarks/compare/compare_cuda_sass.py [--base c9a2f13] [--arch sm_90a]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))


def _cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _base_package(rev: str) -> Path:
    """The base revision's src/ in a temporary directory, its package as attnmerge_base."""
    tmp = Path(tempfile.mkdtemp(prefix="attnmerge-base-"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src/attnmerge"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    pkg = tmp / "src" / "attnmerge_base"
    (tmp / "src" / "attnmerge").rename(pkg)
    for path in pkg.rglob("*"):
        if path.suffix in (".py", ".cuh"):
            path.write_text(re.sub(r"\battnmerge\b", "attnmerge_base", path.read_text()))
    return tmp / "src"


def _sass(cubin: bytes, tool: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], check=True, capture_output=True).stdout
    lines = []
    for line in text.decode().splitlines():
        line = re.sub(r"attnmerge(_base)?_merge(_two)?", "KERNEL", line)
        if "/*" in line and "*/" in line and not line.strip().startswith("Fatbin"):
            lines.append(line.strip())
    return "\n".join(lines)


def _base_instance(config) -> tuple:
    """The base revision's instance tuple for a config (one row per team, weights per
    thread, 128 data threads: what it selected for every call)."""
    p0, p1 = config.partial_elements
    flags = (int(config.write_lse), int(config.lse_base_2))
    return (p0, p1, config.output_element, config.vec, config.team, 1, 1, 128, *flags)


def _pair(args: tuple) -> tuple[str, bool]:
    config, arch, base_src, tool = args
    sys.path.insert(0, base_src)
    import attnmerge_base.cuda.backend as old

    from attnmerge.cuda import backend as new

    new_sass = _sass(new.build_kernel(config, arch), tool)
    old_sass = _sass(old.build_instance(_base_instance(config), arch), tool)
    return config.template_arguments(), new_sass == old_sass and bool(new_sass)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="c9a2f13")
    parser.add_argument("--arch", default="sm_90a")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--head-sizes", default=None, help="comma-separated (default: common)")
    args = parser.parse_args()
    os.environ.setdefault("ATTNMERGE_CACHE_DIR", tempfile.mkdtemp(prefix="attnmerge-cache-"))
    from attnmerge.cuda import backend

    heads = tuple(map(int, args.head_sizes.split(","))) if args.head_sizes else None
    configs = backend.common_configs(heads) if heads else backend.common_configs()
    base_src = str(_base_package(args.base))
    tool = _cuobjdump()
    jobs = [(c, args.arch, base_src, tool) for c in configs]
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(_pair, jobs))
    differing = [name for name, same in results if not same]
    for name in differing:
        print(f"differs: <{name}>")
    print(f"{len(results) - len(differing)} of {len(results)} kernels: same SASS as {args.base}")
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
