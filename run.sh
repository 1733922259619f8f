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
    # PyPI's Linux x86-64 torch wheels are CUDA builds that pull several GB of nvidia packages;
    # the CPU build of the pinned version comes from PyTorch's own index, when it is reachable.
    # Offline (a local mirror, as on CI) that step is skipped and the mirror's wheel is used.
    torch_pin="$(grep -o 'torch==[0-9.]*' pyproject.toml | head -n 1)"
    cpu_index="https://download.pytorch.org/whl/cpu"
    if [ "$(uname -s -m)" = "Linux x86_64" ] && ! "$PY" -c "import torch" 2>/dev/null \
        && "$PY" -c "import urllib.request; urllib.request.urlopen('$cpu_index/torch/', timeout=10)" \
            2>/dev/null; then
        # PyPI stays the index for torch's dependencies; the CPU index's "+cpu" wheel outranks
        # PyPI's of the same version.
        "$PY" -m pip install --quiet --extra-index-url "$cpu_index" "$torch_pin"
    fi
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
