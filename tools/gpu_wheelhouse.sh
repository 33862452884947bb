#!/usr/bin/env bash
# Download the wheels a GPU node needs for tools/gpu_check.sh into DIR, where pip reaches the index.
#
#   bash tools/gpu_wheelhouse.sh DIR            # cp312, x86-64 Linux: the stock PyTorch image's Python
#   bash tools/gpu_wheelhouse.sh DIR --python-version 3.11   # another interpreter (the CPU test's own check)
#
# DIR receives the exact files of tools/gpu_wheels.txt (pip checks every hash), requirements.txt (the
# same pins, for `pip install --require-hashes` on the node) and manifest.json (file names, sizes,
# sha256, the Python tag and the total). Copy DIR to the node with the repository; nothing else is
# fetched there. Refuses a wheelhouse over 16 MiB.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
usage() { echo "usage: bash tools/gpu_wheelhouse.sh DIR [--python-version X.Y]" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
dir=$1; shift
pyver=3.12
while [[ $# -gt 0 ]]; do
  case $1 in
    --python-version) [[ $# -ge 2 ]] || usage; pyver=$2; shift 2 ;;
    *) usage ;;
  esac
done
[[ $pyver =~ ^3\.[0-9]+$ ]] || { echo "gpu_wheelhouse: --python-version wants X.Y, got '$pyver'" >&2; exit 2; }
abi="cp${pyver/./}"
py=${PYTHON:-}
if [[ -z $py ]]; then
  if [[ -x "$here/../.venv/bin/python" ]]; then py="$here/../.venv/bin/python"; else py=python3; fi
fi
mkdir -p "$dir"
echo "gpu_wheelhouse: downloading $(grep -c '^[a-zA-Z]' "$here/gpu_wheels.txt") wheels for Python $pyver (x86-64 Linux) into $dir"
# megatron-core is the one compiled wheel (its dataset helpers); psutil is abi3; the rest are pure Python.
"$py" -m pip download -q --disable-pip-version-check --no-deps --require-hashes --only-binary=:all: \
  --python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$dir" -r "$here/gpu_wheels.txt" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
grep -E '^[A-Za-z]' "$here/gpu_wheels.txt" > "$dir/requirements.txt"
"$py" - "$dir" "$pyver" <<'EOF'
import hashlib, json, os, re, sys

d, pyver = sys.argv[1], sys.argv[2]
pins = {}
for line in open(os.path.join(d, "requirements.txt")):
    name, rest = line.split("==", 1)
    pins[re.sub(r"[-_.]+", "_", name.lower())] = (rest.split()[0], re.findall(r"sha256:([0-9a-f]{64})", rest))
files, total = [], 0
for f in sorted(os.listdir(d)):
    if not f.endswith(".whl"):
        continue
    key, version = re.sub(r"[-_.]+", "_", f.split("-")[0].lower()), f.split("-")[1]
    if pins.get(key, (None,))[0] != version:
        continue  # a file of another wheelhouse in the same folder: not listed, not counted
    digest = hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
    assert digest in pins[key][1], f"{f}: sha256 {digest} is not the pinned one"
    size = os.path.getsize(os.path.join(d, f))
    files.append({"file": f, "bytes": size, "sha256": digest})
    total += size
missing = sorted(set(pins) - {re.sub(r"[-_.]+", "_", x["file"].split("-")[0].lower()) for x in files})
assert not missing, f"not downloaded: {missing}"
manifest = {"python": pyver, "platform": "x86_64 Linux", "files": files, "total_bytes": total}
json.dump(manifest, open(os.path.join(d, "manifest.json"), "w"), indent=1)
limit = 16 * 1024 * 1024
print(f"gpu_wheelhouse: {len(files)} wheels, {total / 1e6:.2f} MB ({total} bytes) in {d}")
if total > limit:
    sys.exit(f"gpu_wheelhouse: {total} bytes is over the 16 MiB a node is handed")
EOF
