"""train.ahead: generation ahead of training against its schedule, under random timings.

A fake engine records the weight version at the start and end of every request batch (weights must
never change under one), a simulated trainer takes each step's batch, "trains" for a random time,
holds the producer, changes the engine's weights and advances; the batches must come from exactly
the weights the schedule names, whatever the timings (``wait``), or be dropped when too old (``drop``).
"""
import random
import threading
import time

import pytest
import torch

from megatron_fipo.algo.rewards import make_result
from megatron_fipo.config.schema import load_config, validate
from megatron_fipo.train.experience import Experience, PromptItem
from megatron_fipo.rollout.engine import EngineError, RolloutEngine, Sample
from megatron_fipo.train.ahead import (
    STALE_POLICIES,
    RolloutAhead,
    load_in_flight,
    save_in_flight,
    staleness_metrics,
)
from tests.helpers import fresh_seeds


class TimedEngine(RolloutEngine):
    """Mixed groups (sample 0 right, the others wrong) after a random delay; checks its weights stay put."""

    def __init__(self, rng: random.Random, max_delay: float = 0.01, fail_at_call: int = -1):
        self.rng, self.max_delay, self.fail_at_call = rng, max_delay, fail_at_call
        self.weight_version, self.generating, self.calls = 0, False, 0
        self.violations: list = []
        self.lock = threading.Lock()

    def generate(self, requests, *, progress=False):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise EngineError("server died")
        self.generating, version = True, self.weight_version
        time.sleep(self.rng.random() * self.max_delay)
        if self.weight_version != version:
            self.violations.append((version, self.weight_version))
        self.generating = False
        return [[Sample(r.prompt_ids, [1 if j == 0 else 2], [-0.5], "stop", version, i, j) for j in range(r.params.n)]
                for i, r in enumerate(requests)]

    def set_weights(self, version):
        if self.generating:
            self.violations.append(("update during generation", version))
        self.weight_version = version

    def update_weights(self, stream, version):
        raise AssertionError

    def health(self):
        return {"ok": True}

    def shutdown(self):
        pass


class Services:
    def __init__(self, engine):
        self.engine, self.drawn = engine, 0

    def draw(self, k):
        self.drawn += k
        return [PromptItem((3, self.drawn - i), "1") for i in range(k)]

    def score(self, texts, gts):
        return [make_result(t == "R", "x") for t in texts]

    def submit_score(self, texts, gts):
        from concurrent.futures import Future

        done = Future()
        done.set_result(self.score(texts, gts))
        return done

    def decode(self, ids):
        return "R" if ids[0] == 1 else "W"


def _cfg(*extra):
    config = load_config(None, ["rollout.n=2", "train.prompts_per_step=2", "train.mini_batch_prompts=1",
                                "rollout.max_response_length=8", "algo.overlong_buffer=0", *extra])
    validate(config, for_training=False)
    return config


def _simulate(k: int, policy: str, steps: int, seed: int, *, train_delay=0.01, restart_at=None):
    """Run the producer against a simulated trainer; returns ({step: Experience}, the engine, in-flight sizes)."""
    rng = random.Random(seed)
    engine = TimedEngine(random.Random(seed + 1))
    services = Services(engine)
    cfg = _cfg(f"rollout.max_staleness={k}", f"rollout.stale_policy={policy}", f"train.steps={steps}")
    version = [0]
    ahead = RolloutAhead(services, cfg, dp_size=1, done_step=0, version=lambda: version[0])
    taken, in_flight = {}, []
    try:
        ahead.advance(0)
        for step in range(1, steps + 1):
            taken[step], _ = ahead.take(step)
            time.sleep(rng.random() * train_delay)  # training
            ahead.hold()  # the sync
            engine.set_weights(step)
            version[0] = step
            if rng.random() < 0.3:  # a checkpoint: what is in flight
                in_flight.append((step, sorted(ahead.in_flight())))
            ahead.advance(step)
    finally:
        ahead.close()
    return taken, engine, in_flight


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("seed", fresh_seeds(3, base=16))
def test_wait_policy_follows_the_schedule_whatever_the_timing(k, seed):
    steps = 8
    taken, engine, in_flight = _simulate(k, "wait", steps, seed, train_delay=0.02 * (seed % 3))
    assert engine.violations == []
    for step, exp in taken.items():  # drawn with the weights synced after step max(0, step - 1 - k)
        assert set(exp.versions) == {max(0, step - 1 - k)}, (step, exp.versions)
        staleness = staleness_metrics(exp, step - 1, k, 1)[1]
        assert staleness["rollout/staleness_max"] == min(step - 1, k)
        assert staleness["rollout/stale_dropped_groups"] == 0
    for step, pending in in_flight:  # a checkpoint after step u holds exactly steps u+1 .. u+k (capped)
        assert pending == list(range(step + 1, min(step + k, steps) + 1)), (step, pending)


@pytest.mark.parametrize("seed", fresh_seeds(3, base=32))
def test_drop_policy_never_trains_on_samples_older_than_k(seed):
    k, steps = 1, 10
    taken, engine, _ = _simulate(k, "drop", steps, seed, train_delay=0.03)
    assert engine.violations == []
    for step, exp in taken.items():
        assert all(step - 2 - k <= v <= step - 1 for v in exp.versions), (step, exp.versions)
        kept, stats = staleness_metrics(exp, step - 1, k, 1)
        too_old = sum(max(step - 1 - v for v in exp.versions[g * exp.n:(g + 1) * exp.n]) > k
                      for g in range(exp.num_groups))
        assert stats["rollout/stale_dropped_groups"] == too_old
        assert all(step - 1 - v <= k for v in kept.versions)


def test_staleness_metrics_against_direct_counts():
    gen = torch.Generator().manual_seed(5)
    n, groups = 3, 7
    versions = [int(v) for v in torch.randint(3, 8, (groups,), generator=gen) for _ in range(n)]
    versions[4] = 2  # one sample of group 1 is older than the rest of its group
    exp = Experience([[1]] * (n * groups), [[2, 3]] * (n * groups), [torch.zeros(2)] * (n * groups),
                     torch.arange(n * groups, dtype=torch.float32), n, {"train/x": 1.0}, versions)
    kept, stats = staleness_metrics(exp, 8, 4, 2)
    old = [g for g in range(groups) if min(versions[g * n:(g + 1) * n]) < 4]
    keep = [g for g in range(groups) if g not in old]
    keep = keep[:len(keep) - len(keep) % 2]  # n = 3 samples per group split over dp = 2: an even group count
    assert stats["rollout/stale_dropped_groups"] == len(old)
    assert kept.advantages.tolist() == [float(g * n + j) for g in keep for j in range(n)]
    ages = [8 - v for v in kept.versions]
    assert stats["rollout/staleness_mean"] == pytest.approx(sum(ages) / len(ages))
    assert stats["rollout/staleness_max"] == max(ages)
    for a in range(5):
        assert stats[f"rollout/staleness_frac_{a}"] == pytest.approx(ages.count(a) / len(ages))
    empty, stats = staleness_metrics(Experience(n=2), 3, 1, 1)
    assert empty.num_groups == 0 and stats["rollout/staleness_mean"] == 0.0


def test_in_flight_batches_round_trip_through_the_checkpoint_file(tmp_path):
    exp = Experience([[1, 2], [3]], [[4], []], [torch.tensor([-0.25]), torch.zeros(0)], torch.tensor([0.5, -0.5]), 2,
                     {"train/reward_mean": 0.25}, [3, 3])
    save_in_flight(str(tmp_path / "rollouts_in_flight.pt"), {7: exp})
    back = load_in_flight(str(tmp_path))[7]
    assert (back.prompts, back.responses, back.n, back.metrics, back.versions) == \
        (exp.prompts, exp.responses, exp.n, exp.metrics, exp.versions)
    assert torch.equal(back.advantages, exp.advantages)
    assert all(torch.equal(a, b) for a, b in zip(back.rollout_logp, exp.rollout_logp))
    assert load_in_flight(str(tmp_path / "nothing")) == {} and load_in_flight(None) == {}


def test_restored_batches_are_served_before_new_ones():
    engine = TimedEngine(random.Random(0))
    cfg = _cfg("rollout.max_staleness=1", "train.steps=6")
    old = Experience([[1]] * 2, [[2]] * 2, [torch.zeros(1)] * 2, torch.zeros(2), 2, {"restored": 1.0}, [4, 4])
    ahead = RolloutAhead(Services(engine), cfg, dp_size=1, done_step=5, version=lambda: 5,
                         restored={5: old, 6: old})  # step 5 is already trained: ignored
    engine.weight_version = 5
    try:
        ahead.advance(5)
        exp, _ = ahead.take(6)
        assert exp.metrics == {"restored": 1.0}
        assert engine.calls == 0  # nothing generated: step 6 is the last and was in flight
    finally:
        ahead.close()


def test_errors_reach_the_trainer_and_a_lost_sync_is_caught():
    engine = TimedEngine(random.Random(0), fail_at_call=2)
    ahead = RolloutAhead(Services(engine), _cfg("rollout.max_staleness=2", "train.steps=9"), dp_size=1, done_step=0,
                         version=lambda: 0)
    try:
        ahead.advance(0)
        ahead.take(1)
        with pytest.raises(EngineError, match="server died"):
            ahead.take(2)
        with pytest.raises(EngineError, match="server died"):
            ahead.hold()
    finally:
        ahead.close()
    engine = TimedEngine(random.Random(0))
    ahead = RolloutAhead(Services(engine), _cfg("rollout.max_staleness=1", "train.steps=9"), dp_size=1, done_step=0,
                         version=lambda: 3)  # the actor synced 3, the engine holds 0
    try:
        ahead.advance(0)
        with pytest.raises(EngineError, match="weight update was lost"):
            ahead.take(1)
    finally:
        ahead.close()


def test_close_returns_while_held_and_refuses_an_unscheduled_take():
    ahead = RolloutAhead(Services(TimedEngine(random.Random(0))), _cfg("rollout.max_staleness=1"), dp_size=1,
                         done_step=0, version=lambda: 0)
    with pytest.raises(RuntimeError, match="before the producer was allowed"):
        ahead.take(1)
    start = time.perf_counter()
    ahead.close()
    assert not ahead.thread.is_alive() and time.perf_counter() - start < 5


@pytest.mark.parametrize("bad, match", [("rollout.max_staleness=-1", "max_staleness"),
                                        ("rollout.stale_policy=skip", "stale_policy")])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        _cfg(bad)


@pytest.mark.parametrize("policy", STALE_POLICIES)
def test_config_accepts_every_policy_the_producer_knows(policy):  # config.checks keeps its own (stdlib-only) copy
    assert _cfg(f"rollout.stale_policy={policy}", "rollout.max_staleness=1").rollout.stale_policy == policy
