#!/usr/bin/env bash
# One entry point that does its own setup: creates .venv (once), installs scratchcnn with
# everything it needs, then runs the requested job.
#
#   ./run.sh compare [options]   NumPy vs PyTorch on MNIST, report in runs/compare
#   ./run.sh test [pytest args]  ruff + the test suite
#   ./run.sh bench [options]     speed benchmark
#   ./run.sh <any scratchcnn subcommand> [options]
set -euo pipefail
cd "$(dirname "$0")"

VENV="${SCRATCHCNN_VENV:-.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.scratchcnn-installed"

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
# Reinstall when pyproject.toml changed since the last install.
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    "$PY" -m pip install --quiet --upgrade pip
    # torch is pinned to the CPU build; an unpinned torch pulls several GB of CUDA packages.
    "$PY" -m pip install --quiet -e ".[test]"
    touch "$STAMP"
fi

job="${1:-compare}"
shift || true
case "$job" in
    test)
        "$VENV/bin/ruff" check .
        exec "$PY" -m pytest "$@"
        ;;
    *)
        exec "$VENV/bin/scratchcnn" "$job" "$@"
        ;;
esac
