"""A run directory protects itself, end to end: the console's held-out line, a complete run, a refused DAPO start.

One tiny FIPO run (2 steps) through ``python -m megatron_fipo train``; then the same command again
(complete: one line with its last held-out figures, nothing trained) and the README's DAPO override
in the same directory (refused, exit 2, every file of the run byte-identical).
"""
import hashlib
import os
import subprocess
import sys

import pytest

from tests.helpers import DEMO_CONFIG as CONFIG
from tests.helpers import SMALL_RUN as SMALL
from tests.helpers import demo_overrides as _overrides
from tests.helpers import read_records as _records

pytestmark = pytest.mark.timeout(1800)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_fipo", "train", "--config", CONFIG, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def _checksums(run):
    out = {}
    for root, _, names in os.walk(run):
        for n in names:
            with open(os.path.join(root, n), "rb") as fh:
                out[os.path.relpath(os.path.join(root, n), run)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_run_dir_console_complete_and_refusal(demo, tmp_path):
    run = str(tmp_path / "run")
    args = _overrides(demo, run, *SMALL, "train.steps=2", "eval.at_start=true", "eval.max_problems=4",
                      "checkpoint.export_hf=false")
    first = _cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    evals = [r for r in _records(run) if "eval/avg@2" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:  # one console line per held-out evaluation, with the figures metrics.jsonl records
        assert (f"held-out step {r['step']}: avg@2 {r['eval/avg@2']:.4f}  cons@2 {r['eval/cons@2']:.4f}  "
                f"pass@2 {r['eval/pass@2']:.4f}") in first.stdout
    before = _checksums(run)

    again = _cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete (step 2" in again.stdout
    assert f"step 2: avg@2 {evals[-1]['eval/avg@2']:.4f}" in again.stdout
    assert "held-out step" not in again.stdout  # nothing evaluated or trained again
    assert _checksums(run) == before

    dapo = _cli(*args, "algo.use_influence=false", "algo.drop_filter=false", "train.steps=10")
    assert dapo.returncode == 2
    line = dapo.stderr.strip().splitlines()[-1]
    assert "algo.use_influence: true -> false" in line and "algo.drop_filter: true -> false" in line
    assert "train.run_dir=" in line and "--allow-changed" in line
    assert _checksums(run) == before  # config.yaml, metrics.jsonl and checkpoints untouched
