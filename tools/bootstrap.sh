#!/usr/bin/env bash
# Create (or refresh) ./.venv with CPU torch and this package with its test extra, and download the
# pinned SGLang wheel into build/wheels/ (for its request schemas, not installed).
# Idempotent: a second run only checks what is installed. Usage: bash tools/bootstrap.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [[ ! -x .venv/bin/python ]]; then
  echo "[bootstrap] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
export PIP_CONSTRAINT="$PWD/tools/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
# The GPU image's SGLang wheel, never installed here: tests/unit/test_sglang_schema.py reads its request
# classes. One fixed wheel (cp311, x86_64) on any machine; pip checks it against tools/sglang_pin.txt's hashes.
.venv/bin/python -m pip download -q --no-deps --require-hashes --only-binary=:all: --python-version 3.11 \
  --implementation cp --abi cp311 --platform manylinux_2_34_x86_64 -d build/wheels -r tools/sglang_pin.txt
# Four small wheels (about 1.3 MB) that tools/sglang_request_check.py puts beside the unpacked SGLang wheel to run
# its request classes; never installed into .venv (tests/unit/test_sglang_request_check.py).
.venv/bin/python -m pip download -q --no-deps --require-hashes --only-binary=:all: --python-version 3.11 \
  --implementation cp --abi cp311 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux1_x86_64 -d build/wheels/sglang_check -r tools/sglang_check_pin.txt
# A private Slurm for tests/e2e/test_slurm.py (tests/slurm_cluster.py starts its own daemons): Debian's
# slurmctld, slurmd, client and munge, installed only where this runs as root with apt-get (CI's
# container; services are not started: a policy-rc.d denies it during the install). Elsewhere, or if
# the install fails, those tests skip with one line saying what to install.
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
  SLURM_PKGS=(slurmctld slurmd slurm-client munge)
  if ! dpkg -s "${SLURM_PKGS[@]}" >/dev/null 2>&1; then
    echo "[bootstrap] installing ${SLURM_PKGS[*]} (apt-get) for the Slurm end-to-end tests"
    POLICY=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      POLICY=/usr/sbin/policy-rc.d
      printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod 755 "$POLICY"
    fi
    install_slurm() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${SLURM_PKGS[@]}" >/dev/null; }
    if ! install_slurm && ! { apt-get update -q >/dev/null && install_slurm; }; then
      echo "[bootstrap] warning: apt-get could not install ${SLURM_PKGS[*]}: the Slurm tests will skip"
    fi
    [[ -z $POLICY ]] || rm -f "$POLICY"
  fi
fi
echo "[bootstrap] ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
