"""tools/gpu_check.sh on this CPU machine (``--cpu``), so the GPU node check cannot rot while no GPU is at hand.

Two environments that have only what the check may assume, each built fresh:

* the node's Python 3.12 (a new venv with the image's pure-Python sympy and pytest): the cp312 wheelhouse
  installs into a scratch target with no index and its packages import (megatron-core's compiled helpers
  match the interpreter; megatron.core itself needs torch, which no CPU build offers for Python 3.12 here);
* a stock PyTorch image, emulated: a new Python 3.11 venv holding exactly torch, transformers,
  safetensors, numpy and pytest with their own dependencies (linked from ``.venv``), nothing of this
  project's other dependencies. With the cp311 wheelhouse every step of the check runs in it.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata

import pytest

from tests.helpers import installed_requirements

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STOCK = ("torch", "transformers", "safetensors", "numpy", "pytest")


def _wheelhouse(out, version):
    subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_wheelhouse.sh"), str(out), "--python-version", version],
                   check=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable))
    return json.load(open(os.path.join(out, "manifest.json")))


def _python312():
    found = shutil.which("python3.12")
    if found and subprocess.run([found, "-V"], capture_output=True).returncode == 0:
        return found
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    return candidates[-1] if candidates else None


def _stock_image(root):
    """A venv of this interpreter holding the stock image's packages only (linked from .venv)."""
    base = getattr(sys, "_base_executable", sys.executable)  # the interpreter under .venv, not .venv itself
    subprocess.run([base, "-m", "venv", str(root)], check=True, timeout=300)
    site = glob.glob(os.path.join(root, "lib", "python3*", "site-packages"))[0]
    linked = set()
    names = {n for root in STOCK for n in (root, *installed_requirements(root))}
    for dist in (metadata.distribution(n) for n in sorted(names)):
        for f in dist.files or ():
            top = f.parts[0]
            if top in ("..", "bin", "__pycache__") or top in linked:
                continue
            src = os.path.join(str(dist.locate_file("")), top)
            if os.path.exists(src) and not os.path.exists(os.path.join(site, top)):
                os.symlink(src, os.path.join(site, top))
                linked.add(top)
    return os.path.join(root, "bin", "python"), linked


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheelhouse_installs_into_a_fresh_python312(tmp_path):
    py = _python312()
    if py is None:
        pytest.skip("no Python 3.12 on this machine (pyenv's 3.12 is what CI has)")
    manifest = _wheelhouse(tmp_path / "wheels", "3.12")
    assert manifest["total_bytes"] <= 16 * 2**20 and manifest["python"] == "3.12"
    subprocess.run([py, "-m", "venv", str(tmp_path / "node")], check=True, timeout=120)
    node = str(tmp_path / "node" / "bin" / "python")  # the stock image's pure-Python part (no CPU torch for 3.12 here)
    subprocess.run([node, "-m", "pip", "install", "-q", "-c", os.path.join(REPO, "tools", "constraints.txt"),
                    "sympy", "pytest"], check=True, timeout=600)
    out = tmp_path / "report"
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), "--wheels", str(tmp_path / "wheels"),
                           "--out", str(out), "--cpu", "--only", "install", "--python", node],
                          capture_output=True, text=True, timeout=240)
    report = json.load(open(out / "report.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (install,) = report["steps"]
    assert install["status"] == "pass", install
    figures = install["figures"]
    assert figures["python"].startswith("3.12") and figures["math_verify"] is True and not figures["not_imported"]
    assert figures["megatron_core_extension"] and all(".cpython-312-" in f for f in figures["megatron_core_extension"])
    assert "no torch" in figures["megatron_core"]
    # nothing reached the node's own environment: the install went to the scratch target only
    node_site = glob.glob(str(tmp_path / "node" / "lib" / "python3.12" / "site-packages"))[0]
    assert not [d for d in os.listdir(node_site) if re.match(r"(megatron|math_verify|psutil)", d)]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_on_cpu_in_a_stock_image(demo, tmp_path):
    _wheelhouse(tmp_path / "wheels", "%d.%d" % sys.version_info[:2])
    py, linked = _stock_image(tmp_path / "stock")
    assert not any(re.match(r"(megatron|math_verify|psutil|pytest_timeout)", n) for n in linked)
    out = tmp_path / "report"
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), "--wheels", str(tmp_path / "wheels"),
                           "--out", str(out), "--cpu", "--python", py], capture_output=True, text=True, timeout=880,
                          env=dict(os.environ, FIPO_GPU_CHECK_DEMO=demo))  # the session's built demo, reused
    report = json.load(open(out / "report.json"))
    steps = {s["step"]: s for s in report["steps"]}
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert list(steps) == ["install", "environment", "gpu_tests", "demo_bf16", "ipc_handles", "future_kl",
                           "actor_throughput"]
    assert steps["install"]["figures"]["megatron_core_path"].startswith(str(tmp_path)) or \
        "fipo-gpu-check-" in steps["install"]["figures"]["megatron_core_path"]
    # without CUDA every GPU test skips, saying why
    assert steps["gpu_tests"]["status"] == "skip" and steps["gpu_tests"]["figures"]["skipped"] >= 3
    assert "CUDA" in steps["gpu_tests"]["reason"]
    for name in ("install", "environment", "demo_bf16", "ipc_handles", "future_kl", "actor_throughput"):
        assert steps[name]["status"] == "pass", steps[name]
    demo = steps["demo_bf16"]["figures"]
    assert demo["step1_bf16"]["train/reward_mean"] == demo["step1_cpu_fp32"]["train/reward_mean"]
    assert demo["step1_bf16"]["train/entropy"] != demo["step1_cpu_fp32"]["train/entropy"]  # bf16 did run
    assert steps["ipc_handles"]["figures"]["bit_exact"] is True
    assert steps["future_kl"]["figures"]["speedup"] > 1.0
    assert steps["actor_throughput"]["figures"]["tokens_per_s"] > 0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    assert size < 16 * 2**20 and os.path.getsize(out / "check.log") < 64 * 1024
    assert report["fail"] == 0 and report["seconds"] < 540
