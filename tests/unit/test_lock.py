"""tools/constraints.txt locks the CPU environment: every package this project pulls in, at one exact version.

A fresh clone that resolves its dependencies afresh gets whatever was released since (a newer
transformers once moved the demo's figures); the lock is what keeps a clone's numbers equal to the
README's. These tests fail when a dependency is unlocked, locked loosely, or installed at a version
other than the locked one.
"""
import os
import re

from packaging.utils import canonicalize_name

from tests.helpers import installed_requirements

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCK = os.path.join(REPO, "tools", "constraints.txt")


def _lock() -> dict:
    pins = {}
    for n, line in enumerate(open(LOCK, encoding="utf-8"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.!+\-]+)", line)
        assert m, f"{LOCK}:{n}: not an exact pin: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{LOCK}:{n}: {name} pinned twice"
        pins[name] = m.group(2)
    return pins


def test_every_line_is_an_exact_pin_and_torch_is_the_cpu_build():
    pins = _lock()
    assert pins["torch"] == "2.13.0"
    assert len(pins) > 50  # the whole environment, not just torch
    assert "megatron-fipo" not in pins and "pip" not in pins


def test_installed_environment_equals_the_lock():
    pins = _lock()
    installed = installed_requirements("megatron-fipo", ("test",))
    assert {"transformers", "megatron-core", "numpy", "pytest", "nemo-run"} <= set(installed)
    unlocked = sorted(set(installed) - set(pins))
    assert not unlocked, f"dependencies missing from {LOCK} (run bash tools/lock.sh): {unlocked}"
    drift = {k: (v, pins[k]) for k, v in installed.items() if v.split("+")[0] != pins[k]}
    assert not drift, f"installed (left) differs from the lock (right); rerun bash tools/bootstrap.sh: {drift}"


def test_bootstrap_applies_the_lock_to_every_pip_call():
    text = open(os.path.join(REPO, "tools", "bootstrap.sh"), encoding="utf-8").read()
    assert 'export PIP_CONSTRAINT="$PWD/tools/constraints.txt"' in text
    assert text.index("PIP_CONSTRAINT") < text.index("pip install")
    lock = open(os.path.join(REPO, "tools", "lock.sh"), encoding="utf-8").read()
    assert "tools/constraints.txt" in lock and "freeze --all" in lock
