#!/usr/bin/env bash
# Check a GPU node with no network: install what its stock PyTorch image lacks from a wheelhouse, run
# every GPU path one GPU can check, measure, and write a report.
#
#   bash tools/gpu_wheelhouse.sh wheels/                     # where pip reaches the index; copy to the node
#   bash tools/gpu_check.sh --wheels wheels/ --out report/   # on the node (about 6 minutes on one H100)
#   bash tools/gpu_check.sh --wheels wheels/ --out report/ --cpu   # the same steps on a CPU machine
#
# Options: --python PY (the node's Python, default python3), --only STEP[,STEP] (a subset), --budget-s S
# (the whole check's time box, default 540). report/report.json and report/check.log are the result;
# the exit status is 0 when no step failed. Steps and what each proves: README, "Checking a GPU node".
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py=python3
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --python) [[ $# -ge 2 ]] || { echo "gpu_check: --python needs a path" >&2; exit 2; }; py=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
command -v "$py" >/dev/null 2>&1 || { echo "gpu_check: no Python '$py' (give the node's with --python)" >&2; exit 2; }
exec "$py" "$here/gpu_check.py" "${args[@]}"
