"""A rollout server killed mid-step is routed around, restarted by its owner, and rejoins: the run goes on, no sample lost.

Both runs train 2 steps of the small demo on dp=2 through the CPU SGLang-protocol server, with
decode steps slowed (``--decode-step-ms``) so that its samples are still running when a watcher
SIGKILLs one server in the middle of step 1's generation:

* colocated on two simulated nodes (``torchrun --nnodes 2`` launched twice, one rank and one
  server per node): node 1's server dies; rank 0 sends its samples to node 0's server, node 1's
  first rank restarts it at the step's weight sync, and rank 0 routes to it again once it reports
  the synced version;
* disaggregated (two servers launched by rank 0's engine): server 1 dies; the engine restarts it
  at once, and feeds it at the step's sync over a rebuilt weight-update group.

With the CPU server a sample depends only on the weights, the prompt and its seed, so each run's
per-step metrics equal those of the in-process CPU engine's run of the same layout (rel 1e-4), which
has every sample; step 1 counts the death, the rerouted requests and the rejoin, and step 2 samples on
both servers with the trainer's weights (``token_mult_prob_error`` 1).
"""
import json
import os
import re
import signal
import sys
import threading
import time

import pytest

from tests.dist.launcher import launch
from tests.e2e.test_sglang_path import STEP1_KEYS, _assert_synced, _updates
from tests.helpers import DEMO_CONFIG, REPO, SMALL_RUN, demo_overrides, read_records, train_in_process, train_on_nodes

pytestmark = pytest.mark.timeout(1200)
SERVER = (f"rollout.launcher=[{sys.executable},-m,megatron_fipo.rollout.cpu_server,--decode-step-ms,'40']")
RUN = [*SMALL_RUN, "train.steps=2", "checkpoint.export_hf=false"]
SAMPLE_KEYS = STEP1_KEYS + ["rollout/token_mult_prob_error"]


class Killer(threading.Thread):
    """SIGKILLs the CPU server that writes ``log`` once it has taken ``after`` requests and some still run."""

    def __init__(self, log: str, after: int = 2):
        super().__init__(daemon=True)
        self.log, self.after, self.killed, self.done = log, after, None, threading.Event()

    def run(self) -> None:
        from megatron_fipo.rollout.sglang_server import request

        deadline = time.monotonic() + 900
        while not self.done.is_set() and time.monotonic() < deadline:
            try:
                with open(self.log, encoding="utf-8", errors="replace") as fh:
                    found = re.search(r"cpu-sglang: serving \S+ at (http://[\w.:]+), .*?pid (\d+)", fh.read())
                stats = request(found.group(1) + "/fipo_stats", timeout=5) if found else None
            except OSError:
                stats = None
            if stats and stats["requests"] >= self.after and stats["running"] >= 1:
                os.kill(int(found.group(2)), signal.SIGKILL)
                self.killed = {"pid": int(found.group(2)), "requests": stats["requests"], "running": stats["running"]}
                return
            time.sleep(0.02)


def _two_nodes(overrides, timeout=900):
    """Two simulated nodes of one rank each (``tests.helpers.train_on_nodes``); their outputs."""
    return train_on_nodes(overrides, nproc_per_node=1, timeout=timeout)


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory):
    """The in-process CPU engine's records at dp=2 (every sample, nothing killed)."""
    run = str(tmp_path_factory.mktemp("dead_server_reference") / "run")
    launch(train_in_process, 2, DEMO_CONFIG, demo_overrides(demo, run, *RUN), timeout=600)
    return [r for r in read_records(run) if "train/loss" in r]


def _check(run, reference, killer):
    assert killer.killed, "the watcher never saw the server mid-step"
    records = [r for r in read_records(run) if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    first, second = records
    assert first["rollout/server_deaths"] == 1.0 and first["rollout/rerouted_requests"] >= 1.0
    assert first["rollout/server_rejoins"] == 1.0 and first["rollout/servers_live"] == 2.0
    assert second["rollout/server_deaths"] == 0.0 and second["rollout/rerouted_requests"] == 0.0
    assert second["rollout/server1_token_share"] > 0  # the restarted server samples again
    print(f"\nkilled {killer.killed}; per step (deaths, rerouted, rejoins, live, server1 share):",
          [(r["rollout/server_deaths"], r["rollout/rerouted_requests"], r["rollout/server_rejoins"],
            r["rollout/servers_live"], round(r["rollout/server1_token_share"], 3)) for r in records])
    _assert_synced(records)
    for got, want in zip(records, reference, strict=True):
        for key in SAMPLE_KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (got["step"], key)
    return records


def _restarted(log):
    """The server's log: two starts, and the updates of the restarted one (versions 1 and 2)."""
    with open(log, encoding="utf-8") as fh:
        assert len(re.findall(r"cpu-sglang: serving ", fh.read())) == 2
    assert [u["weight_version"] for u in _updates(log)] == ["1", "2"]


def test_colocated_on_two_nodes_a_killed_server_is_restarted_by_its_node(demo, tmp_path, reference):
    run = str(tmp_path / "run")
    log = os.path.join(run, "sglang_logs", "node1", "sglang_replica0.log")
    killer = Killer(log)
    killer.start()
    try:
        outs = _two_nodes(demo_overrides(demo, run, *RUN, "rollout.engine=sglang", SERVER))
    finally:
        killer.done.set()
    _check(run, reference, killer)
    assert "is down" in outs[0] and "rejoined with weight version 1" in outs[0]  # rank 0 routed around it
    assert "restarting server" in outs[1]  # node 1's first rank restarted it
    _restarted(log)
    ranks = json.load(open(os.path.join(run, "ranks.json")))
    assert sorted(r["node"] for r in ranks) == [0, 1]
    with open(os.path.join(run, "sglang_logs", "node0", "sglang_replica0.log"), encoding="utf-8") as fh:
        assert len(re.findall(r"cpu-sglang: serving ", fh.read())) == 1  # node 0's server never stopped


def test_disaggregated_a_killed_server_is_restarted_by_the_engine(demo, tmp_path, reference):
    run = str(tmp_path / "run")
    log = os.path.join(run, "sglang_logs", "sglang_replica1.log")
    killer = Killer(log)
    killer.start()
    try:
        launch(train_in_process, 2, DEMO_CONFIG, demo_overrides(
            demo, run, *RUN, "rollout.engine=sglang", "rollout.mode=disaggregated", "rollout.replicas=2", SERVER),
            timeout=600)
    finally:
        killer.done.set()
    _check(run, reference, killer)
    _restarted(log)
