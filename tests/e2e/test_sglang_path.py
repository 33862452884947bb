"""The trainer's SGLang path end to end on CPU, through ``rollout.cpu_server`` (SGLang's HTTP protocol, a real model).

* Colocated on two simulated nodes: ``torchrun --nnodes 2`` launched twice on this host, two ranks
  each, tp=2 inside a node and pp=2 across the nodes. Each node's first rank launches its node's
  server (``rollout.launcher``: the CPU server, ``rollout.sglang.tp_size=2``), every rank feeds the
  server TP rank on its GPU, and each server's log records the process every weight came from:
  only its own node's ranks (``ranks.json``), TP rank r from the node's rank r.
* Disaggregated with two launched servers at pp=2: each stage sends its own layers over its own
  gloo weight-update group (the servers' records name two group masters).
* Both give the in-process CPU engine's step-1 metrics with the same seeds and layout, and after
  every sync the trainer-vs-rollout ``token_mult_prob_error`` is 1 within fp32 rounding.
"""
import json
import os
import re
import signal
import sys

import pytest

from tests.dist.launcher import launch
from tests.helpers import (DEMO_CONFIG, SMALL_RUN, demo_overrides, read_records, train_in_process, train_on_nodes,
                           trainer_after_first_checkpoint)

pytestmark = pytest.mark.timeout(1200)
SERVER = f"rollout.launcher=[{sys.executable},-m,megatron_fipo.rollout.cpu_server]"
STEP1_KEYS = ["train/loss", "train/ppo_kl", "train/pg_clipfrac", "train/entropy", "train/grad_norm",
              "train/reward_mean", "train/acc_mean", "train/kept_tokens", "train/response_length_mean"]


def _two_nodes(overrides, timeout=900):
    """Two simulated nodes of two ranks each (``tests.helpers.train_on_nodes``)."""
    train_on_nodes(overrides, nproc_per_node=2, timeout=timeout)


def _updates(log_path):
    """The CPU server's per-update records (``fipo-cpu-server update {json}`` lines of its log)."""
    with open(log_path, encoding="utf-8") as fh:
        return [json.loads(m.group(1)) for m in re.finditer(r"fipo-cpu-server update (\{.*\})", fh.read())]


def _assert_synced(records):
    for r in records:  # after every sync (and at step 1, before any) the engine samples the trainer's weights
        assert r["rollout/token_mult_prob_error"] == pytest.approx(1.0, abs=1e-5), r["step"]
        assert r["rollout/logprob_abs_diff"] < 1e-5


def _reference(demo, tmp_path, world, *extra):
    run = str(tmp_path / "cpu_engine")
    launch(train_in_process, world, DEMO_CONFIG, demo_overrides(demo, run, *SMALL_RUN, *extra), timeout=600)
    return read_records(run)


def test_colocated_on_two_nodes_feeds_each_server_from_its_own_node(demo, tmp_path):
    layout = ["parallel.tp=2", "parallel.pp=2", "train.steps=2", "checkpoint.export_hf=false"]
    run = str(tmp_path / "sglang")
    _two_nodes(demo_overrides(demo, run, *SMALL_RUN, *layout, "rollout.engine=sglang", SERVER,
                              "rollout.sglang={tp_size: 2}"))
    records = read_records(run)
    assert [r["step"] for r in records] == [1, 2]
    _assert_synced(records)
    ranks = json.load(open(os.path.join(run, "ranks.json")))
    assert sorted((r["node"], r["local"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    pid = {(r["node"], r["local"]): r["pid"] for r in ranks}
    for node in (0, 1):
        updates = _updates(os.path.join(run, "sglang_logs", f"node{node}", "sglang_replica0.log"))
        assert [u["weight_version"] for u in updates] == ["1", "2"]  # one complete update per step
        for update in updates:  # each TP rank's weights came from the rank on its own GPU, of its own node
            assert {(s["tp_rank"], s["pid"]) for s in update["sources"]} == {(0, pid[(node, 0)]), (1, pid[(node, 1)])}
    reference = _reference(demo, tmp_path, 4, *layout)[0]
    for key in STEP1_KEYS:
        assert records[0][key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key


def test_disaggregated_with_two_servers_each_stage_sends_its_own_layers(demo, tmp_path):
    """pp=2, two launched servers: each pipeline stage broadcasts its own layers over its own gloo group with
    the servers (two group masters in each server's record, no relay through rank 0)."""
    extra = ["parallel.pp=2", "train.steps=2", "checkpoint.export_hf=false"]
    run = str(tmp_path / "sglang")
    launch(train_in_process, 2, DEMO_CONFIG, demo_overrides(
        demo, run, *SMALL_RUN, *extra, "rollout.engine=sglang", "rollout.mode=disaggregated", "rollout.replicas=2",
        SERVER), timeout=600)
    records = read_records(run)
    _assert_synced(records)
    for replica in (0, 1):
        updates = _updates(os.path.join(run, "sglang_logs", f"sglang_replica{replica}.log"))
        assert [u["weight_version"] for u in updates] == ["1", "2"]
        for update in updates:
            assert all(s["pid"] is None for s in update["sources"])  # by broadcast, not shared memory
            assert len({s["master"] for s in update["sources"]}) == 2  # one group per pipeline stage
    reference = _reference(demo, tmp_path, 2, *extra)[0]
    for key in STEP1_KEYS:
        assert records[0][key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key


@pytest.mark.timeout(2400)
def test_demo_learns_through_the_http_path_as_in_process(demo, tmp_path):
    """The demo (its batch sizes, seed 1234) for 6 steps, colocated on one node through the CPU server, and
    in-process: the same losses step by step and the same held-out Avg@4 rise (64 problems, 4 samples)."""
    extra = ["train.steps=6", "eval.max_problems=64", "eval.every_steps=0", "log.progress=false",
             "log.tensorboard=false", "checkpoint.every_steps=0", "checkpoint.export_hf=false"]
    runs = {}
    for name, engine in (("http", ["rollout.engine=sglang", SERVER]), ("in_process", [])):
        run = str(tmp_path / name)
        launch(train_in_process, 1, DEMO_CONFIG, demo_overrides(demo, run, *extra, *engine), timeout=1100)
        runs[name] = read_records(run)
    _assert_synced([r for r in runs["http"] if "rollout/token_mult_prob_error" in r])
    rises = {}
    for name, records in runs.items():
        avg = [r["eval/avg@4"] for r in records if "eval/avg@4" in r]
        assert len(avg) == 2, records
        rises[name] = avg[1] - avg[0]
    losses = {name: [r["train/loss"] for r in records if "train/loss" in r] for name, records in runs.items()}
    assert losses["http"] == pytest.approx(losses["in_process"], rel=1e-3), losses
    assert rises["http"] >= 0.05, rises
    assert rises["http"] == pytest.approx(rises["in_process"], abs=0.03), rises


AHEAD = ["train.steps=3", "rollout.max_staleness=1", "checkpoint.export_hf=false", "eval.every_steps=0",
         "eval.at_start=false", "checkpoint.every_steps=0"]


@pytest.fixture(scope="module")
def ahead_in_process(demo, tmp_path_factory):
    """The in-process CPU engine's records at max_staleness=1 (the reference of both modes below)."""
    return [r for r in _reference(demo, tmp_path_factory.mktemp("ahead"), 1, *AHEAD) if "train/loss" in r]


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_generation_ahead_through_sglang_in_both_modes(demo, tmp_path, mode, ahead_in_process):
    """rollout.max_staleness=1 through the CPU server: the same schedule as the in-process CPU engine
    (step s trains on the weights of step s - 2, whatever the timing), so every step's metrics equal the
    in-process run's; and no weight reached a server while one of its requests was running."""
    engine = ["rollout.engine=sglang", SERVER] + (["rollout.mode=disaggregated"] if mode == "disaggregated" else [])
    run = str(tmp_path / "sglang")
    launch(train_in_process, 1, DEMO_CONFIG, demo_overrides(demo, run, *SMALL_RUN, *AHEAD, *engine), timeout=600)
    records = [r for r in read_records(run) if "train/loss" in r]
    reference = ahead_in_process
    assert [r["rollout/staleness_max"] for r in records] == [0.0, 1.0, 1.0]
    for got, want in zip(records, reference, strict=True):
        for key in STEP1_KEYS + ["rollout/staleness_mean"]:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (got["step"], key)
    logs = os.path.join(run, "sglang_logs")
    log = os.path.join(logs, "node0", "sglang_replica0.log") if mode == "colocated" else \
        os.path.join(logs, "sglang_replica0.log")
    updates = _updates(log)
    assert [u["weight_version"] for u in updates] == ["1", "2", "3"]
    assert all(u["writes_under_requests"] == 0 for u in updates)


def test_sigkilled_trainer_on_the_sglang_path_leaves_no_process(demo, tmp_path):
    """``python -m megatron_fipo train`` through the CPU server (colocated), SIGKILLed once its first checkpoint
    is complete: every descendant read from /proc until the kill (the server and its watchdog, in their own
    session; reward workers; multiprocessing's resource tracker; whatever megatron-core's checkpoint save
    started) is gone within 20 s."""
    run, log = str(tmp_path / "run"), tmp_path / "trainer.log"
    cmd = [sys.executable, "-m", "megatron_fipo", "train", "--config", DEMO_CONFIG,
           *demo_overrides(demo, run, *SMALL_RUN, "train.reward_workers=2", "train.steps=500",
                           "checkpoint.every_steps=1", "checkpoint.export_hf=false", "rollout.engine=sglang", SERVER)]
    with trainer_after_first_checkpoint(cmd, run, log) as (proc, seen, procs):
        alive = procs.running(seen).values()
        assert any("megatron_fipo.rollout.cpu_server" in c for c in alive), seen
        assert any("resource_tracker" in c for c in alive), seen
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        seen.update(procs.descendants(proc.pid))  # its session and group outlive it
        left = procs.wait_gone(seen, 20)
        assert not left, left
