#!/usr/bin/env bash
# Set everything up in ./.venv (CPU torch, Triton, NVRTC, test tools) and run one job.
#   scripts/dev.sh test [pytest args]   the test suite (CPU: Triton under its interpreter)
#   scripts/dev.sh demo [demo args]     the cascade-attention demo on this machine
#   scripts/dev.sh lint                 ruff check + format check
#   scripts/dev.sh build [build args]   compile the CUDA kernels (no GPU needed)
# The first run creates the venv ($ATTNMERGE_VENV, default .venv; made with $PYTHON,
# default python3) and installs the pinned requirements (about a minute). A stamp file in
# the venv holds a hash of the pins, pyproject.toml and the checkout's path: later runs
# skip pip while it matches, and install again when one of them changes.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/dev.sh [JOB] [args]
  test [pytest args]   the test suite (the default job; on a CPU, Triton runs under its
                       interpreter)
  demo [demo args]     the cascade-attention demo on this machine
  lint                 ruff check + format check
  build [build args]   compile the CUDA kernels ahead of time (no GPU needed)
The first run sets up $ATTNMERGE_VENV (default .venv): CPU torch, Triton, NVRTC, pytest,
ruff. Later runs skip pip until the pins or pyproject.toml change; to install again
anyway, delete the venv's .attnmerge-dev-stamp.
EOF
}

# Answered before any setup: help and unknown jobs.
job=${1:-test}
case "$job" in
  -h | --help | help)
    usage
    exit 0
    ;;
  test | demo | lint | build) shift || true ;;
  *)
    echo "scripts/dev.sh: unknown job '$job'" >&2
    usage >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")/.."
# torch 2.13.0 is pinned for reproducible CPU runs; the package itself accepts torch>=2.6.
requirements=(
  "torch==2.13.0" "triton==3.7.1" "nvidia-cuda-nvrtc>=13,<14" numpy pytest pytest-xdist
  hypothesis "ruff==0.17.6"
)
venv=${ATTNMERGE_VENV:-.venv}
py="$venv/bin/python"
stamp="$venv/.attnmerge-dev-stamp"
say() { echo "dev.sh: $*" >&2; }

if [ ! -x "$py" ]; then
  say "creating the virtual environment $venv (${PYTHON:-python3} -m venv)"
  "${PYTHON:-python3}" -m venv "$venv"
fi
wanted=$(
  { printf '%s\n' "${requirements[@]}" "$PWD"; cat pyproject.toml; } |
    "$py" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
  rm -f "$stamp"
  say "installing ${requirements[*]} into $venv (the first time: about a minute)"
  "$py" -m pip install -q "${requirements[@]}"
  say "installing attnmerge from $PWD into $venv (editable, without dependencies)"
  "$py" -m pip install -q --no-deps -e .
  echo "$wanted" >"$stamp"
  say "$venv is set up; later runs skip pip until the pins or pyproject.toml change"
fi

case "$job" in
  test) exec "$py" -m pytest -n auto -q "$@" ;;
  demo) exec "$py" -m attnmerge demo "$@" ;;
  build) exec "$py" -m attnmerge build "$@" ;;
  lint)
    "$venv/bin/ruff" check src tests scripts benchmarks examples
    exec "$venv/bin/ruff" format --check src tests scripts benchmarks examples
    ;;
esac
