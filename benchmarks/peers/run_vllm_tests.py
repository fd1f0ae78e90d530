"""vLLM's own test of ``merge_attn_states``, run with attnmerge as the kernel under test.

vLLM's ``tests/kernels/attention/test_merge_attn_states.py`` (exported into ``.peers/vllm``
by ``fetch_vllm.py``) checks vLLM's CUDA op, imported as ``merge_attn_states_native``
from ``vllm._custom_ops``, against vLLM's Triton kernel, the reference ("we want to
replace the Triton kernel with the custom native kernel"), with a torch implementation of
its own timed and printed beside them. This script copies the file into
``.peers/vllm-tests/`` (ignored by git; never committed) with one substitution, so that
the native kernel is attnmerge's, and runs pytest on the copy once per attnmerge backend
(``cuda``, ``triton``; ``--backends``), with the stand-in ``vllm`` package of
``benchmarks/peers/vllm.py`` (vLLM's Triton kernel from vLLM's file, ``current_platform``,
``scaled_fp8_quant``) first on ``PYTHONPATH``; it prints one summary line per backend.

The copy differs from vLLM's file (0.34.0, git 62d4bc3c7) in exactly this:

* a comment line is put first, saying where the copy comes from;
* ``SUBSTITUTIONS[0]`` (lines 7-9 of vLLM 0.34.0's file): the import of vLLM's CUDA op
  wrapper, ``from vllm._custom_ops import (merge_attn_states as merge_attn_states_native,)``,
  becomes a function of that name that calls
  ``attnmerge.merge_attn_states(*args, **kwargs, backend=B)``, ``B`` read from
  ``$ATTNMERGE_VLLM_TESTS_BACKEND`` when the module is imported (a ``KeyError`` without it).
  Both tests call ``merge_attn_states_native`` with vLLM's positional arguments, which are
  attnmerge's: ``test_merge_attn_states`` (every dtype, FP8 output, head size, token and
  head count and ``prefill_tokens_with_context`` of its grid) compares its output and LSE
  with vLLM's Triton kernel at the test's own tolerances, and
  ``test_merge_attn_states_both_empty`` checks that tokens empty on both sides give no NaN
  (for attnmerge, and for vLLM's Triton kernel as in vLLM).

Everything else is vLLM's text, kept as it is and checked to be there (``REQUIRED``):
``scaled_fp8_quant`` and ``current_platform`` still come from ``vllm._custom_ops`` and
``vllm.platforms`` (the stand-ins: static FP8 in torch; an NVIDIA GPU, so ``DEVICE`` is
``"cuda"`` and the ``skipif`` lets the tests run; on a machine without one they skip), the
Triton kernel from ``vllm.v1.attention.ops.triton_merge_attn_states`` (vLLM's file), the
torch reference is the test's own. vLLM's marker ``skip_global_cleanup`` (for its own
conftest) is declared in the folder's ``pytest.ini``, which also keeps this repository's
pytest settings out. A pattern that is not found exactly once, a required line missing, or
a call of the native kernel left unreplaced raises ``RewriteError``: another vLLM release
fails here rather than testing something else. Run on a GPU, from the repository root::

    python -m benchmarks.peers.run_vllm_tests -n 8 -q        # arguments after ours go to pytest
    python -m benchmarks.peers.run_vllm_tests --backends cuda -x -q -k "bfloat16 and 128"

``--no-standin`` uses the ``vllm`` that imports (a real vLLM) instead of the stand-in.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.peers import fetch_vllm

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".peers" / "vllm-tests"
BACKENDS = ("cuda", "triton")
ENV = "ATTNMERGE_VLLM_TESTS_BACKEND"
NAME = Path(fetch_vllm.TEST).name

#: (why, vLLM's text, ours): each vLLM text must occur exactly once
SUBSTITUTIONS: tuple[tuple[str, str, str], ...] = (
    (
        "the native kernel under test is attnmerge's, on the backend named in $" + ENV,
        "from vllm._custom_ops import (\n    merge_attn_states as merge_attn_states_native,\n)\n",
        "import os  # attnmerge: from here to merge_attn_states_native, see the first line\n"
        "\n"
        "import attnmerge\n"
        "\n"
        f'_ATTNMERGE_BACKEND = os.environ["{ENV}"]\n'
        "\n"
        "\n"
        "def merge_attn_states_native(*args, **kwargs):\n"
        "    return attnmerge.merge_attn_states(*args, **kwargs, backend=_ATTNMERGE_BACKEND)\n"
        "\n"
        "\n",
    ),
)
#: vLLM's lines the adaptation relies on, kept unchanged (regular expressions)
REQUIRED = (
    r"from vllm\._custom_ops import \(\n    scaled_fp8_quant,\n\)",
    r"from vllm\.platforms import current_platform",
    r"from vllm\.v1\.attention\.ops\.triton_merge_attn_states import \(\n"
    r"    merge_attn_states as merge_attn_states_triton,\n\)",
    r"DEVICE = current_platform\.device_type",
    r'"merge_fn", \[merge_attn_states_native, merge_attn_states_triton\]',
    r"\n        merge_attn_states_native\(\n",
    r"torch\.testing\.assert_close\(\n        output_native",
    r"torch\.testing\.assert_close\(\n        output_lse_native",
)
PYTEST_INI = """\
# written by attnmerge's benchmarks/peers/run_vllm_tests.py
[pytest]
markers =
    skip_global_cleanup: vLLM's marker for its own conftest (nothing to clean up here)
"""


class RewriteError(ValueError):
    """vLLM's test is not the text the substitutions were written for."""


def rewrite(
    text: str, source: str = fetch_vllm.TEST, substitutions=SUBSTITUTIONS, required=REQUIRED
) -> str:
    """vLLM's test text with attnmerge as the kernel under test (see the docstring)."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    for pattern in required:
        if not re.search(pattern, text):
            raise RewriteError(f"{source}: no match for {pattern!r}")
    for why, old, new in substitutions:
        count = text.count(old)
        if count != 1:
            raise RewriteError(f"{source}: {count} occurrences (not 1) of {old!r} ({why})")
        text = text.replace(old, new)
    left = re.findall(r"vllm\._custom_ops import \(?\s*merge_attn_states\b", text)
    if left:
        raise RewriteError(f"{source}: vLLM's CUDA op is still imported: {left}")
    header = (
        f"# attnmerge's copy of {source} (sha256 {digest}...), rewritten by "
        f"benchmarks/peers/run_vllm_tests.py: the native kernel is "
        f"attnmerge.merge_attn_states(backend=${ENV})\n"
    )
    return header + text


def write_tests(peer: Path = fetch_vllm.DEST, out: Path = OUT) -> Path:
    """Write the rewritten test and its ``pytest.ini`` under ``out``; returns the test."""
    source = peer / fetch_vllm.TEST
    if not source.is_file():
        raise FileNotFoundError(
            f"no vLLM test in {peer}: run benchmarks/peers/fetch_vllm.py "
            "(and carry .peers to this machine)"
        )
    version = fetch_vllm.read_record(peer)["version"] if (peer / "SOURCE").exists() else "?"
    text = rewrite(source.read_text(), f"vLLM {version}'s {fetch_vllm.TEST}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "pytest.ini").write_text(PYTEST_INI)
    (out / NAME).write_text(text)
    return out / NAME


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)\b")
_SUMMARY = re.compile(r"(\d+ (passed|failed|skipped|errors?|xfailed|xpassed)|no tests ran).* in ")


def summarize(lines: list[str]) -> dict[str, int]:
    """The counts of pytest's last summary line (passed, failed, skipped, error, ...)."""
    found = [line for line in lines if _SUMMARY.search(line)]
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for n, what in _COUNT.findall(found[-1] if found else ""):
        counts[what.removesuffix("s") if what.startswith("error") else what] = int(n)
    return counts


def run(backend: str, test: Path, pytest_args: list[str], pythonpath: list[str]) -> tuple:
    """pytest on the copy for one backend, its output passed through; (rc, counts, s)."""
    env = dict(os.environ, **{ENV: backend})
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    ini = test.parent / "pytest.ini"
    cmd = [sys.executable, "-m", "pytest", "-c", str(ini), "-p", "no:cacheprovider"]
    cmd += [str(test), *pytest_args]
    print(f"=== vllm-tests {backend}: {ENV}={backend} {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    with subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
            del lines[:-50]
    sys.stdout.flush()
    return proc.returncode, summarize(lines), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="attnmerge's backends")
    parser.add_argument("--peer", type=Path, default=fetch_vllm.DEST, help="vLLM's files")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where the copy goes ({OUT})")
    parser.add_argument("--arch", help="the GPU architecture to build vLLM's op for")
    parser.add_argument(
        "--no-standin", action="store_true", help="use the installed vLLM, not the stand-in"
    )
    args, pytest_args = parser.parse_known_args(argv)
    if "--" in pytest_args:  # ours -- pytest's
        pytest_args.remove("--")
    backends = [b for b in args.backends.split(",") if b]
    test = write_tests(args.peer, args.out)
    pythonpath = [] if importlib.util.find_spec("attnmerge") else [str(ROOT / "src")]
    if not args.no_standin:
        from benchmarks.peers import vllm as vllm_peer

        importers = {f"{args.out.name}/{NAME}": test.read_text()}
        pythonpath.insert(0, str(vllm_peer.standin(args.arch, args.peer, importers)))
    results = [(b, *run(b, test, pytest_args, pythonpath)) for b in backends]
    failed = False
    for backend, rc, counts, seconds in results:
        line = ", ".join(f"{n} {what}" for what, n in counts.items())
        note = "" if counts["passed"] else "; nothing passed"
        failed |= bool(rc) or not counts["passed"]
        print(f"vllm-tests {backend}: {line} (rc {rc}, {seconds:.0f} s{note})")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
