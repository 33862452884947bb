"""The long tail end to end on CPU: rollout.partial, in-flight updates and over-sampling through ``rollout.cpu_server``.

The CPU server batches every running request in one decode loop, pauses (``retract`` / ``abort``)
and continues as SGLang does, and reports per-token weight-version spans; its decode steps are
slowed (``--decode-step-ms``) so that samples are still running when the weights change, as on GPUs.

* disaggregated, ``max_staleness=1 inflight_updates=true partial=true oversample=1.5``: every step
  trains a full batch, trained tokens come from older versions (ages logged), no weight reached a
  server while one of its requests was running unpaused;
* colocated, ``partial=true oversample=1.5`` (k = 0): unfinished samples are aborted before the
  servers release their memory and continued in a later step;
* a checkpoint holds the unfinished samples, and a resumed run continues them.
* ``benchmarks/long_tail.py --quick`` runs (on the addition demo) and reports its figures.
"""
import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from tests.dist.launcher import launch
from tests.helpers import DEMO_CONFIG, REPO, SMALL_RUN, demo_overrides, read_records, train_in_process

pytestmark = pytest.mark.timeout(1200)


def _server(decode_ms: int) -> str:
    return (f"rollout.launcher=[{sys.executable},-m,megatron_fipo.rollout.cpu_server,--decode-step-ms,"
            f"'{decode_ms}']")


LONG_TAIL = ["rollout.engine=sglang", "rollout.partial=true", "rollout.oversample=1.5", "eval.at_start=false",
             "eval.every_steps=0", "checkpoint.export_hf=false"]


def _updates(run):
    log = os.path.join(run, "sglang_logs", "sglang_replica0.log")
    if not os.path.exists(log):
        log = os.path.join(run, "sglang_logs", "node0", "sglang_replica0.log")
    with open(log, encoding="utf-8") as fh:
        return [json.loads(m.group(1)) for m in re.finditer(r"fipo-cpu-server update (\{.*\})", fh.read())]


def _train(demo, run, *extra):
    launch(train_in_process, 1, DEMO_CONFIG, demo_overrides(demo, run, *SMALL_RUN, *LONG_TAIL, *extra), timeout=900)
    return [r for r in read_records(run) if "train/loss" in r]


def test_inflight_updates_with_partial_rollouts_and_oversampling(demo, tmp_path):
    run = str(tmp_path / "inflight")
    records = _train(demo, run, "train.steps=4", "rollout.mode=disaggregated", "rollout.max_staleness=1",
                     "rollout.inflight_updates=true", _server(60))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["train/kept_groups"] == 8 for r in records)  # every step a full batch
    for r in records:
        fracs = [v for k, v in r.items() if k.startswith("rollout/token_age_frac_")]
        assert sum(fracs) == pytest.approx(1.0)
        assert 0.0 <= r["rollout/slot_util"] <= 1.0 and r["perf/generated_tokens_per_s"] > 0
        assert r["rollout/server0_token_share"] == pytest.approx(1.0)
    assert any(r["rollout/token_age_max"] >= 1 for r in records[1:])  # generated while the previous step trained
    assert any(r["rollout/partial_carried"] > 0 for r in records)  # the tail was not waited for
    updates = _updates(run)
    assert [u["weight_version"] for u in updates] == ["1", "2", "3", "4"]
    assert all(u["writes_under_requests"] == 0 for u in updates)  # paused (retract) around every update


def test_colocated_partial_rollouts_continue_after_training(demo, tmp_path):
    run = str(tmp_path / "colocated")
    records = _train(demo, run, "train.steps=3", _server(40))
    assert [r["train/kept_groups"] for r in records] == [8, 8, 8]
    assert sum(r["rollout/aborted_tokens"] for r in records) > 0  # interrupted before each release
    assert any(r["rollout/token_age_max"] >= 1 for r in records)  # continued with newer weights
    assert all(u["writes_under_requests"] == 0 for u in _updates(run))


def test_checkpoint_holds_the_unfinished_samples_and_resume_continues_them(demo, tmp_path):
    run = str(tmp_path / "resume")
    common = ["rollout.mode=disaggregated", "checkpoint.every_steps=1", _server(40)]
    first = _train(demo, run, "train.steps=2", *common)
    assert len(first) == 2
    checkpoints = os.path.join(run, "checkpoints")
    latest = sorted(d for d in os.listdir(checkpoints) if d.startswith("iter_"))[-1]
    pool = torch.load(os.path.join(checkpoints, latest, "rollout_pool.pt"), weights_only=True)
    unfinished = [(g["prompt_ids"], p["tokens"]) for g in pool["generating"] for p in g["pieces"]
                  if p["finish"] is None]
    assert unfinished, "the checkpoint holds no unfinished sample"
    assert first[0]["rollout/groups_unfinished_in"] == 0  # a fresh pool starts empty
    resumed = _train(demo, run, "train.steps=4", *common)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    step3 = resumed[2]  # the resumed pool starts with the checkpoint's groups, and continues them
    assert step3["rollout/groups_unfinished_in"] == len(pool["generating"])
    assert step3["rollout/groups_carried_in"] == len(pool["complete"])
    assert step3["rollout/continued_started"] == len(unfinished)  # every restored unfinished sample continues
    # (whether a continued group is then trained depends on its rewards: dynamic sampling may filter it)


def test_long_tail_benchmark_quick(demo, tmp_path):
    """``benchmarks/long_tail.py --quick`` on the addition demo (the long-tailed demo takes minutes to
    build): the synchronous and the in-flight + partial + over-sampled settings run pinned as in the
    README's figures, from the same start, and report throughput, slots and length distributions."""
    out = tmp_path / "long_tail.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "long_tail.py"), "--quick", "--demo", demo,
           "--config", "demo_cpu.yaml", "--settings", "sync", "inflight", "--decode-step-ms", "20", "--json", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:  # the benchmark and the trainers and servers it started, all of them
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Summary" in stdout
    results = json.loads(out.read_text())["results"]
    sync, inflight = results["sync"], results["inflight"]
    assert sync["avg4_start"] == inflight["avg4_start"]  # the same model, evaluated with the same seeds
    assert all(r["samples_per_s"] > 0 and r["timed_steps"] == 2 and 0 < r["slot_util"] <= 1 for r in results.values())
    assert inflight["ratio"] > 0 and sync["ratio"] == 1.0
    assert sync["staleness_mean"] == 0.0 and math.isnan(sync["trained_length_mean"])  # no pool without partial
    assert inflight["trained_length_p50"] <= inflight["trained_length_p90"]
    assert inflight["generated_length_mean"] > 0
