"""A dead rollout server is routed around (rollout.sglang_failover, rollout.routing): against tests/fake_sglang_server.py.

Its requests go, with their seeds, to the live servers (the same samples as without the death), the
routers exclude it, its owner restarts it (bounded), it rejoins only with the current weights, and
the counters say so; every server dead, or one that keeps dying, ends generation with a clear error.
"""
import os
import signal

import psutil
import pytest
import torch

from megatron_fipo.rollout.engine import EngineError, GenerationRequest, SamplingParams
from megatron_fipo.rollout.routing import PromptRouter
from megatron_fipo.rollout.sglang_engine import SGLangEngine
from megatron_fipo.rollout.sglang_weights import serialize_named_tensors, tcp_gloo_group
from megatron_fipo.train.pool import engine_metrics
from tests.unit.test_sglang_engine import _children, _engine, _sha, _state


def _reqs(n=4, lengths=(3, 7, 2, 5, 4, 6), seed=11, max_new=5):
    return [GenerationRequest(tuple(range(1, L + 1)), SamplingParams(n=n, max_new_tokens=max_new, seed=seed + 100 * i))
            for i, L in enumerate(lengths)]


def _samples(groups):
    return [(s.request_index, s.sample_index, s.token_ids, s.logprobs, s.finish_reason) for g in groups for s in g]


def _kill(server):
    """SIGKILL a launched server's whole process group (the watchdog and the server), as a crash would."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def want(tmp_path_factory):
    """The samples of ``_reqs()`` on healthy servers (the fake's samples depend on weights, prompt and seed only)."""
    with _engine(tmp_path_factory.mktemp("healthy"), replicas=1) as eng:
        return {"base": _samples(eng.generate(_reqs()))}


# --------------------------------------------------------------------------- the router


def test_router_moves_a_dead_servers_requests_with_their_load():
    requests = [(3, 2, 10), (5, 2, 10), (4, 2, 10), (2, 2, 10)]
    router = PromptRouter(requests, 3, max_in_flight=8)
    jobs = router.dispatch()
    assert [j.server for j in jobs] == [0, 0, 1, 1, 2, 2, 0, 0]  # least outstanding tokens, ties to the lowest
    assert router.load == [23 + 22, 25, 24]
    assert router.finish(0) is False  # one sample of request 0 done: 10 tokens off server 0
    moved = router.exclude(0)
    assert moved == {0: 2, 3: 1}  # in request order, each to the least loaded live server
    assert router.load == [0, 25 + 22, 24 + 13] and router.live == [False, True, True]
    assert router.exclude(0) == {}  # idempotent
    assert router.finish(0) and router.finish(3) is False and router.finish(3)  # finishes count on the new servers
    assert router.load == [0, 25, 24]
    with pytest.raises(ValueError, match="last live server"):
        PromptRouter(requests, 2, 8, excluded=[0]).exclude(1)
    fresh = PromptRouter(requests, 3, 8, excluded=[1])
    assert {j.server for j in fresh.dispatch()} == {0, 2}
    fresh.include(1)
    assert fresh.live == [True, True, True]
    with pytest.raises(ValueError, match="no live server"):
        PromptRouter(requests, 2, 8, excluded=[0, 1])


# --------------------------------------------------------------------------- the engine


def test_a_killed_server_is_routed_around_restarted_and_rejoins_after_a_sync(tmp_path, want):
    """Owned servers (the disaggregated engine): the dead one's samples come from the others, bit for bit;
    it starts again at once, rejoins with the next sync's weights, and a second death is past max_restarts."""
    with _engine(tmp_path, replicas=3, max_restarts=1) as eng:
        before = eng.stream_stats()
        _kill(eng.servers[1])
        assert _samples(eng.generate(_reqs())) == want["base"]
        counts = eng.failover_counts()
        assert counts["server_deaths"] == 1 and counts["rerouted_requests"] >= 1 and counts["server_restarts"] == 1
        assert eng.servers[1].restarts == 1 and eng.servers[1].alive()
        metrics = engine_metrics(before, eng.stream_stats(), eng.slots_per_server)
        assert metrics["rollout/server_deaths"] == 1.0 and metrics["rollout/rerouted_requests"] >= 1.0
        # version 0 is the base weights: the restarted server rejoins at the next generate once it answers
        eng.servers[1].wait_healthy(60)
        served = _state(eng, 1)["requests"]
        assert _samples(eng.generate(_reqs())) == want["base"]
        assert eng.failover_counts()["server_rejoins"] == 1 and _state(eng, 1)["requests"] > served
        _kill(eng.servers[2])
        tensors = [("w", torch.randn(3, 2))]
        eng.update_weights(iter([tensors]), version=4)  # restarts server 2 first, then feeds all three
        assert eng.live_servers() == [0, 1, 2] and eng.failover_counts()["server_rejoins"] == 2
        for i in range(3):
            state = _state(eng, i)
            assert state["weight_version"] == "4" and state["checksums"]["0"] == {"w": _sha(tensors[0][1])}
        after = _samples(eng.generate(_reqs()))
        assert after != want["base"] and all(s.weight_version == 4 for g in eng.generate(_reqs()) for s in g)
        _kill(eng.servers[1])  # its second death: max_restarts=1 is used up
        with pytest.raises(EngineError, match="max_restarts=1 restart\\(s\\) are used up: it keeps dying"):
            eng.generate(_reqs())
    assert not _children()


def test_attached_engine_routes_around_until_the_node_feeds_the_restarted_server(tmp_path, want):
    """Colocated on several nodes: rank 0's engine is attached to every node's servers and a node's engine
    owns its own. A dead server is excluded by rank 0 (release / resume skip it), restarted by its node at the
    next sync's start, fed there, and taken back by rank 0 once it reports the synced version."""
    with _engine(tmp_path, replicas=2, max_restarts=1) as node:
        rank0 = SGLangEngine("tiny-model", urls=node.urls, startup_timeout=30)
        _kill(node.servers[0])
        assert _samples(rank0.generate(_reqs())) == want["base"]
        assert rank0.live_servers() == [1] and rank0.failover_counts()["server_restarts"] == 0  # not its server
        rank0.release()
        rank0.resume()
        assert _samples(rank0.generate(_reqs())) == want["base"]  # still excluded: the node has not restarted it
        assert rank0.live_servers() == [1]
        tensors = [("w", torch.randn(4))]
        node.begin_update()  # the node's sync: its dead server first starts again
        assert node.servers[0].restarts == 1 and node.excluded_servers() == [0]
        payload = serialize_named_tensors(tensors)
        node.push_tensor_payloads([[payload], [serialize_named_tensors(tensors)]], version=2)
        node.finish_update(2)
        assert node.live_servers() == [0, 1]
        rank0.adopt_version(2)
        assert rank0.live_servers() == [0, 1] and rank0.failover_counts()["server_rejoins"] == 1
        got = rank0.generate(_reqs())
        assert all(s.weight_version == 2 for g in got for s in g)
        assert _state(node, 0)["requests"] > 0  # the restarted server serves again
        rank0.shutdown()
    assert not _children()


def test_a_server_restarted_with_old_weights_does_not_rejoin(tmp_path):
    """A server that answers again but does not serve the engine's version stays excluded (stale weights)."""
    with _engine(tmp_path, replicas=2) as owner:
        owner.update_weights(iter([[("w", torch.ones(2))]]), version=3)
        rank0 = SGLangEngine("tiny-model", urls=owner.urls, startup_timeout=30)
        rank0.adopt_version(3)
        _kill(owner.servers[1])
        rank0.generate(_reqs(n=2))
        owner.servers[1].start()  # back, with the base weights ("default"), not version 3
        owner.servers[1].wait_healthy(60)
        rank0.generate(_reqs(n=2))
        rank0.adopt_version(3)
        assert rank0.live_servers() == [0]
        rank0.shutdown()
    assert not _children()


def test_a_launcher_restarted_server_is_fed_at_the_next_sync_over_a_rebuilt_group(tmp_path, want):
    """Disaggregated with servers given by url (a rollout node's launcher owns them): a dead one is routed around,
    and once its launcher has started it again the next sync rebuilds the weight-update group over both servers
    (a fresh group name) and feeds it; only then does it rejoin."""
    with _engine(tmp_path, replicas=2, mode="disaggregated") as launcher:
        trainer = SGLangEngine("tiny-model", urls=launcher.urls, mode="disaggregated", group_factory=tcp_gloo_group,
                               startup_timeout=30)
        trainer.update_weights(iter([[("w", torch.ones(3))]]), version=1)
        _kill(launcher.servers[1])
        first = _samples(trainer.generate(_reqs()))
        launcher.servers[1].start()  # the launcher's restart: the base weights
        launcher.servers[1].wait_healthy(60)
        assert _samples(trainer.generate(_reqs())) == first and trainer.live_servers() == [0]  # stale: not routed to
        tensors = [("w", torch.randn(3))]
        trainer.update_weights(iter([tensors]), version=2)
        assert trainer.live_servers() == [0, 1] and trainer.weight_group == "fipo_weights_1"
        for i in range(2):
            state = _state(launcher, i)
            assert state["weight_version"] == "2" and state["checksums"]["0"] == {"w": _sha(tensors[0][1])}
        served = _state(launcher, 1)["requests"]
        assert all(s.weight_version == 2 for g in trainer.generate(_reqs()) for s in g)
        assert _state(launcher, 1)["requests"] > served
        counts = trainer.failover_counts()
        assert (counts["server_deaths"], counts["server_rejoins"], counts["server_restarts"]) == (1, 1, 0)
        trainer.shutdown()
    assert not _children()


def test_streamed_jobs_move_to_a_live_server(tmp_path, want):
    """The streaming path (train.pool): a job whose server died finishes on another, with its seed."""
    with _engine(tmp_path, replicas=2, max_restarts=1) as eng:
        requests = _reqs()
        _kill(eng.servers[0])
        futures = [(ri, j, eng.submit(req, j, group=ri)) for ri, req in enumerate(requests) for j in range(4)]
        got = [(ri, j, f.result(timeout=60)) for ri, j, f in futures]
        assert [(ri, j, s.token_ids, s.logprobs, s.finish_reason) for ri, j, s in got] == want["base"]
        assert eng.failover_counts()["rerouted_requests"] >= 1 and eng.stream_stats()["server_deaths"] == 1
    assert not _children()


def test_every_server_dead_is_a_clear_error(tmp_path):
    with _engine(tmp_path, replicas=2) as owner:
        rank0 = SGLangEngine("tiny-model", urls=owner.urls, startup_timeout=30)
        for server in owner.servers:
            _kill(server)
        with pytest.raises(EngineError, match="every rollout server is down"):
            rank0.generate(_reqs(n=2))
        with pytest.raises(EngineError, match="every rollout server is down"):
            rank0.generate(_reqs(n=2))
        rank0.shutdown()
    assert not _children()
    assert not [p for p in psutil.Process().children(recursive=True) if "fake_sglang" in " ".join(p.cmdline())]


# --------------------------------------------------------------------------- the Slurm launcher's rollout node


def test_the_rollout_node_restarts_a_dead_server_then_gives_up_with_its_log(tmp_path):
    """Disaggregated under slurm/fipo.sbatch: the rollout node's step restarts a server that died
    (rollout.max_restarts times, here once) before the job ends with its log tail (fake Slurm, fake servers dying at 0.5 s)."""
    from tests.unit.test_launch import RECIPE, FakeCluster

    cluster = FakeCluster(tmp_path, 2)
    rc = cluster.run(cluster.sbatch("--mode", "disaggregated", "--rollout-nodes", "1", "--config", RECIPE,
                                    *cluster.overrides, "rollout.sglang={tp_size: 8}", "rollout.max_restarts=1"),
                     FAKE_SGLANG_SECONDS="0.5", FAKE_TORCHRUN_SLEEP="60")
    log = (tmp_path / "logs" / "sglang-r0-gpu02.log").read_text()
    assert rc == 1, cluster.output()
    assert log.count("restarting it (restart 1 of rollout.max_restarts=1)") == 1
    assert "exited and rollout.max_restarts=1 restart(s) are used up" in log and "CUDA out of memory" in log
