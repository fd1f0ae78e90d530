#!/usr/bin/env bash
# Set everything up in ./.venv (CPU torch, Triton, test tools) and run one job.
#   scripts/dev.sh test [pytest args]   the test suite (CPU: Triton under its interpreter)
#   scripts/dev.sh demo [demo args]     the cascade-attention demo on this machine
#   scripts/dev.sh lint                 ruff check + format check
#   scripts/dev.sh build [build args]   compile the CUDA kernels (no GPU needed)
set -euo pipefail
cd "$(dirname "$0")/.."
job=${1:-test}
shift || true
venv=${ATTNMERGE_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
# torch 2.13.0 is pinned for reproducible CPU runs; the package itself accepts torch>=2.6.
"$py" -m pip install -q "torch==2.13.0" "triton==3.7.1" "nvidia-cuda-nvrtc>=13,<14" numpy pytest pytest-xdist \
  hypothesis "ruff==0.17.6"
"$py" -m pip install -q --no-deps -e .
case "$job" in
  test) exec "$py" -m pytest -n auto -q "$@" ;;
  demo) exec "$py" -m attnmerge demo "$@" ;;
  build) exec "$py" -m attnmerge build "$@" ;;
  lint)
    "$venv/bin/ruff" check src tests scripts benchmarks
    exec "$venv/bin/ruff" format --check src tests scripts benchmarks ;;
  *) echo "usage: $0 {test|demo|lint|build} [args]" >&2; exit 2 ;;
esac
