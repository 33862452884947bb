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
"""
import json
import os
import re
import sys

import pytest
import torch

from tests.dist.launcher import launch
from tests.helpers import DEMO_CONFIG, SMALL_RUN, demo_overrides, read_records, train_in_process

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
    assert sum(r["rollout/continued_samples"] for r in resumed[2:]) > 0
