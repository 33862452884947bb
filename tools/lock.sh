#!/usr/bin/env bash
# Refresh the CPU environment lock, tools/constraints.txt: every package of the venv at an exact version.
#
# Usage: bash tools/lock.sh            (writes tools/constraints.txt; review the diff, then check it:)
#   rm -rf .venv && bash tools/bootstrap.sh && .venv/bin/python -m pytest -q    # the suite, twice on a fresh clone
#   .venv/bin/python tools/make_demo.py && .venv/bin/megatron-fipo train --config examples/demo_cpu.yaml
#   and update the README's demo figures (and the tests' thresholds if the demo no longer clears them by 2x).
#
# It resolves setup.py's dependencies (with the test extra) afresh in a scratch venv, with only torch
# pinned (the CPU build; an unpinned torch pulls a multi-GB CUDA build), and freezes the result. The
# GPU image keeps its own pins (Dockerfile / setup.py's gpu extra) and does not read this file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
TORCH=torch==2.13.0
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "[lock] resolving in a scratch venv ($($PY --version))"
"$PY" -m venv "$scratch/venv"
pin="$scratch/torch.txt"
echo "$TORCH" > "$pin"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP_CONSTRAINT="$pin" "$scratch/venv/bin/python" -m pip install -q "$TORCH"
PIP_CONSTRAINT="$pin" "$scratch/venv/bin/python" -m pip install -q "$PWD[test]"
out=tools/constraints.txt
{
  echo "# The locked CPU environment: tools/bootstrap.sh applies it to every pip call (build isolation"
  echo "# included) through PIP_CONSTRAINT, so a fresh clone installs exactly these versions."
  echo "# Written by tools/lock.sh on $(date -u +%Y-%m-%d) with $("$scratch/venv/bin/python" --version);"
  echo "# do not edit by hand. torch is the CPU build (an unpinned torch pulls a multi-GB CUDA build)."
  # --all keeps setuptools (build isolation); pip itself and this package are left out.
  "$scratch/venv/bin/python" -m pip freeze --all \
    | grep -v -i -E '^(pip|megatron-fipo)==|^-e |^#' \
    | sed -E 's/^torch==([^+]+)\+.*/torch==\1/'
} > "$out"
echo "[lock] wrote $out ($(grep -c '==' "$out") packages)"
