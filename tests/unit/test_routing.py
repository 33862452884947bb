"""Prompt-affine routing and streamed groups: rollout.routing against a naive reference, SGLangEngine
against tests/fake_sglang_server.py (where each prompt went, what an ideal prefix cache prefills,
samples with 1, 2 and 3 servers), and collect_experience streamed vs generated-then-scored."""
import json
import random
import threading
from collections import Counter

import pytest
import torch

from megatron_fipo.algo.reward_pool import RewardPool, score_batch
from megatron_fipo.config.schema import load_config
from megatron_fipo.train.experience import PromptItem, collect_experience
from megatron_fipo.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams
from megatron_fipo.rollout.routing import Job, PromptRouter
from megatron_fipo.rollout.sglang_engine import SGLangEngine
from megatron_fipo.rollout.sglang_server import post_checked
from tests.unit.test_sglang_engine import _children, _engine, _state

# --------------------------------------------------------------------------- the router


def naive_trace(requests, servers, max_in_flight, pick):
    """Start samples in request order while fewer than ``max_in_flight`` run; a request's first sample
    picks the server whose unfinished requests hold the fewest tokens, recomputed from scratch
    (prompt + max_new per unfinished sample), lowest index on ties; ``pick(running)`` finishes one."""
    queue = [(r, j) for r, (_, n, _) in enumerate(requests) for j in range(n)]
    server_of, finished, running, trace = {}, Counter(), [], []

    def load(s):
        return sum(p + (n - finished[r]) * m for r, (p, n, m) in enumerate(requests)
                   if server_of.get(r) == s and finished[r] < n)

    while queue or running:
        while queue and len(running) < max_in_flight:
            r, j = queue.pop(0)
            if j == 0:
                server_of[r] = min(range(servers), key=lambda s: (load(s), s))
            running.append((r, j))
            trace.append(("start", r, j, server_of[r], [load(s) for s in range(servers)]))
        done = pick(running)
        running.remove(done)
        finished[done[0]] += 1
        trace.append(("finish", *done, server_of[done[0]], [load(s) for s in range(servers)]))
    return trace


def router_trace(requests, servers, max_in_flight, pick):
    router, running, trace, finished = PromptRouter(requests, servers, max_in_flight), [], [], Counter()

    def start():
        for job in router.dispatch():
            running.append((job.request, job.sample))
            trace.append(("start", job.request, job.sample, job.server, None))

    start()
    while running:
        done = pick(running)
        running.remove(done)
        finished[done[0]] += 1
        assert router.finish(done[0]) == (finished[done[0]] == requests[done[0]][1])  # True on the group's last
        trace.append(("finish", *done, router.assignment[done[0]], list(router.load)))
        start()
    assert router.done and router.load == [0] * servers
    return trace


def _picker(seed):
    rng = random.Random(seed)
    return lambda running: rng.choice(sorted(running))


@pytest.mark.parametrize("seed", range(40))
def test_router_matches_the_naive_reference(seed):
    rng = random.Random(seed)
    requests = [(rng.randint(1, 3000), rng.randint(1, 9), rng.choice([1, 7, 64, 512, 4096]))
                for _ in range(rng.randint(1, 25))]
    servers, max_in_flight = rng.randint(1, 5), rng.randint(1, 30)
    got = router_trace(requests, servers, max_in_flight, _picker(seed))
    want = naive_trace(requests, servers, max_in_flight, _picker(seed))
    # the same jobs start on the same servers, in the same order, and the loads agree after every finish
    assert [t[:4] for t in got] == [t[:4] for t in want]
    assert [t[4] for t in got if t[0] == "finish"] == [t[4] for t in want if t[0] == "finish"]
    starts = [t for t in got if t[0] == "start"]
    assert len(starts) == sum(n for _, n, _ in requests)
    for r in range(len(requests)):  # a prompt's samples share one server
        assert len({t[3] for t in starts if t[1] == r}) == 1


def test_router_by_hand():
    # 3 servers, everything starts at once: prompts 100, 10, 10, 10 tokens, n=2, 50 new tokens each
    router = PromptRouter([(100, 2, 50), (10, 2, 50), (10, 2, 50), (10, 2, 50)], servers=3, max_in_flight=8)
    jobs = router.dispatch()
    # loads 200 / 110 / 110 after three prompts: the fourth goes to the lowest-index least-loaded server, 1
    assert [j.server for j in jobs] == [0, 0, 1, 1, 2, 2, 1, 1] and router.load == [200, 220, 110]
    assert jobs[0] == Job(0, 0, 0) and router.dispatch() == []
    assert not router.finish(2) and router.load == [200, 220, 60]
    assert router.finish(2) and router.load == [200, 220, 0]
    # two free slots, one per sample; a new request would go to server 2 now
    with pytest.raises(ValueError, match="no running sample"):
        router.finish(2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        PromptRouter([(1, 1, 0)], 1, 1)


def test_router_bounds_in_flight_and_splits_a_large_group():
    router = PromptRouter([(5, 7, 3), (5, 1, 3)], servers=2, max_in_flight=3)
    assert [(j.request, j.sample) for j in router.dispatch()] == [(0, 0), (0, 1), (0, 2)]
    router.finish(0)
    assert router.dispatch() == [Job(0, 3, 0)]  # later samples of a started request stay on its server
    for _ in range(3):
        router.finish(0)
    assert [(j.request, j.sample, j.server) for j in router.dispatch()] == [(0, 4, 0), (0, 5, 0), (0, 6, 0)]
    router.finish(0)
    assert router.dispatch() == [Job(1, 0, 1)]  # server 0 still holds request 0's two unfinished samples


# --------------------------------------------------------------------------- SGLangEngine and the fake servers


def _reqs(n, lengths=(3, 11, 5, 8, 2, 13), max_new=5, seed=7):
    return [GenerationRequest(tuple(range(1 + i, 1 + i + L)), SamplingParams(n=n, max_new_tokens=max_new,
                                                                         seed=seed + 1000 * i))
            for i, L in enumerate(lengths)]


def _prompt_counts(engine):
    """Per server: {prompt ids JSON: /generate requests}, and the ideal prefix cache's prefill tokens."""
    states = [_state(engine, i) for i in range(len(engine.urls))]
    return [Counter(s["prompts"]) for s in states], [s["prefill_tokens"] for s in states]


def _flush(engine):
    for url in engine.urls:
        post_checked(url + "/flush_cache", {}, timeout=10, what="flush_cache")


def _samples(groups):
    return [(s.request_index, s.sample_index, s.token_ids, s.logprobs, s.finish_reason) for g in groups for s in g]


@pytest.fixture(scope="module")
def three_servers(tmp_path_factory):
    with _engine(tmp_path_factory.mktemp("routing"), replicas=3) as eng:
        yield eng
    assert not _children()


def test_a_prompt_stays_on_one_server_and_is_prefilled_once(three_servers):
    """n=8 on 3 servers: round-robin per sample (the old rule: sample k of the call on server k % 3)
    sends each prompt to 3 servers, and an ideal prefix cache prefills it 3 times; prompt-affine
    routing sends it to 1."""
    eng, n = three_servers, 8
    requests = _reqs(n)
    prompt_tokens = sum(len(r.prompt_ids) for r in requests)

    _flush(eng)
    counts0, prefill0 = _prompt_counts(eng)
    for k, (ri, j) in enumerate((ri, j) for ri in range(len(requests)) for j in range(n)):
        eng._sample(k % 3, requests[ri], ri, j)
    counts1, prefill1 = _prompt_counts(eng)
    before = [c1 - c0 for c0, c1 in zip(counts0, counts1)]

    _flush(eng)
    out = eng.generate(requests)
    counts2, prefill2 = _prompt_counts(eng)
    after = [c2 - c1 for c1, c2 in zip(counts1, counts2)]

    for r in requests:
        key = json.dumps(list(r.prompt_ids))
        assert sum(c[key] for c in before) == sum(c[key] for c in after) == n
        assert sum(1 for c in before if c[key]) == min(n, 3)
        assert [c[key] for c in after if c[key]] == [n]  # all n samples on one server
    assert sum(sum(c.values()) for c in after) == n * len(requests) and all(after)  # every server was used
    prefill_before = sum(prefill1) - sum(prefill0)
    prefill_after = sum(prefill2) - sum(prefill1)
    assert prefill_after == prompt_tokens and prefill_before == 3 * prompt_tokens
    assert all(len(g) == n and all(s.weight_version == 0 for s in g) for g in out)


def test_samples_do_not_depend_on_the_number_of_servers(three_servers):
    eng = three_servers
    requests = _reqs(3, lengths=(4, 9, 1, 6, 2), max_new=7)
    want = _samples(eng.generate(requests))
    for k, in_flight in [(1, 256), (2, 4), (3, 1), (3, 5)]:
        attached = SGLangEngine("tiny-model", urls=eng.urls[:k], max_in_flight=in_flight, startup_timeout=30)
        assert _samples(attached.generate(requests)) == want, (k, in_flight)
        assert sorted(_samples(g for _, g in attached.generate_groups(requests))) == sorted(want)
    assert want != _samples(eng.generate(_reqs(3, lengths=(4, 9, 1, 6, 2), max_new=7, seed=8)))


def test_a_dead_server_is_restarted_and_its_prompts_retried_there(three_servers, tmp_path):
    requests = _reqs(4, lengths=(3, 7))
    want = _samples(three_servers.generate(requests))
    # one prompt (4 samples) per server; each server dies on its 3rd request, and the answers it had not
    # sent yet are lost with it; a dead server's samples go to the other (rollout.sglang_failover), which
    # then dies too, so each server needs a few lives (every death restarts it; none left is an error)
    with _engine(tmp_path, "--die-after-requests", "3", replicas=2, max_restarts=5) as eng:
        assert _samples(eng.generate(requests)) == want
        assert all(s.restarts >= 1 for s in eng.servers)
    assert not any(s.alive() for s in eng.servers)


class _Gated(SGLangEngine):
    """Each request's samples wait until the test opens its gate: the test decides the completion order."""

    def __init__(self, *args, gates, **kw):
        super().__init__(*args, **kw)
        self.gates = gates

    def _sample(self, replica, req, ri, j):
        assert self.gates[ri].wait(60), f"request {ri} was never released"
        return super()._sample(replica, req, ri, j)


def test_groups_stream_in_completion_order(three_servers):
    eng = three_servers
    requests = _reqs(3, lengths=(2, 3, 4, 5))
    want = eng.generate(requests)
    gates = [threading.Event() for _ in requests]
    gated = _Gated("tiny-model", urls=eng.urls, max_in_flight=12, gates=gates, startup_timeout=30)
    stream = gated.generate_groups(requests)
    for ri in (2, 0, 3, 1):
        gates[ri].set()
        got, group = next(stream)
        assert got == ri and _samples([group]) == _samples([want[ri]])
    with pytest.raises(StopIteration):
        next(stream)
    # a consumer that leaves early: the running requests finish, nothing keeps running after close()
    for g in gates:
        g.clear()
    threads = threading.active_count()
    stream = gated.generate_groups(requests)
    gates[1].set()
    assert next(stream)[0] == 1
    for g in gates:
        g.set()
    stream.close()
    assert threading.active_count() <= threads


# --------------------------------------------------------------------------- experience: streamed vs not


class _Wrapped(RolloutEngine):
    def __init__(self, engine):
        self.engine = engine

    def update_weights(self, stream, version):
        raise AssertionError("not used")

    def health(self):
        return {"ok": True}

    def shutdown(self):
        pass


class RequestOrder(_Wrapped):
    """The non-streamed path: ``generate`` everything, then the groups in request order (the protocol's default)."""

    def generate(self, requests, *, progress=False):
        return self.engine.generate(requests, progress=progress)


class Streamed(_Wrapped):
    """The wrapped engine's stream, with request 0 held back to the end (so never request order) and a log."""

    def __init__(self, engine):
        super().__init__(engine)
        self.log = []

    def generate(self, requests, *, progress=False):
        raise AssertionError("the generation round streams")

    def generate_groups(self, requests, *, progress=False):
        held = None
        for ri, group in self.engine.generate_groups(requests, progress=progress):
            if ri == 0:
                held = group
                continue
            self.log.append(("group", ri))
            yield ri, group
        self.log.append(("group", 0))
        yield 0, held


def _cfg():
    return load_config(None, ["rollout.n=4", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
                              "rollout.max_response_length=6", "rollout.stop_token_ids=[0,1,2,3,4,5,6,7]",
                              "algo.overlong_buffer=2", "algo.max_gen_rounds=6", "algo.on_exhausted=train_short"])


def _decode(ids):  # a right answer when the first token is even: groups with varying rewards
    return f"\\boxed{{{ids[0] % 2 if ids else 1}}}"


def _drawer(seed=0):
    rng = random.Random(seed)
    return lambda k: [PromptItem(tuple(rng.randrange(1, 90) for _ in range(rng.randint(1, 6))), "0") for _ in range(k)]


def _same_experience(a, b):
    assert a.prompts == b.prompts and a.responses == b.responses and a.n == b.n
    assert len(a.rollout_logp) == len(b.rollout_logp)
    assert all(torch.equal(x, y) for x, y in zip(a.rollout_logp, b.rollout_logp))
    assert torch.equal(a.advantages, b.advantages)
    timeless = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # noqa: E731
    assert timeless(a.metrics) == timeless(b.metrics) and a.metrics.keys() == b.metrics.keys()


def _streamed_and_old(engine, streaming_engine, pool):
    cfg = _cfg()
    old = collect_experience(RequestOrder(engine), _drawer(), lambda t, g: score_batch(
        "boxed_math", t, g, num_workers=0, timeout_s=60), _decode, cfg, step=2)
    new = collect_experience(Streamed(streaming_engine), _drawer(), pool.score, _decode, cfg, step=2,
                             submit=lambda t, g: pool.submit("boxed_math", t, g))
    return old, new


@pytest.mark.timeout(300, method="thread")
def test_streamed_experience_equals_the_old_path_through_sglang(three_servers):
    eng = three_servers
    one = SGLangEngine("tiny-model", urls=eng.urls[:1], startup_timeout=30)
    three = SGLangEngine("tiny-model", urls=eng.urls, max_in_flight=5, startup_timeout=30)
    with RewardPool(num_workers=2, timeout_s=120) as pool:
        old, new = _streamed_and_old(one, three, pool)
    _same_experience(old, new)
    assert new.num_groups > 0 and new.metrics["train/gen_rounds"] >= 1


@pytest.mark.timeout(300, method="thread")
def test_streamed_experience_equals_the_old_path_on_the_cpu_engine(tmp_path):
    from megatron_fipo.rollout.cpu_engine import CPUEngine
    from tests.hf_tiny import tiny_hf_model

    engine = CPUEngine(tiny_hf_model(str(tmp_path / "m"), seed=5, vocab_size=90), max_batch_rows=7)
    with RewardPool(num_workers=0, timeout_s=60) as pool:
        old, new = _streamed_and_old(engine, engine, pool)
    _same_experience(old, new)
    assert new.num_groups > 0


def test_each_group_is_scored_as_it_arrives(three_servers):
    engine = Streamed(SGLangEngine("tiny-model", urls=three_servers.urls, max_in_flight=3, startup_timeout=30))
    log = engine.log

    def submit(texts, gts):
        log.append(("submit", len(texts)))
        return RewardPool(0, 1).submit("boxed_math", texts, gts)

    exp = collect_experience(engine, _drawer(), None, _decode, _cfg(), step=1, submit=submit)
    rounds = int(exp.metrics["train/gen_rounds"])
    assert len(log) == 2 * 4 * rounds
    for i in range(0, len(log), 2):  # every group is submitted before the next one is taken
        assert log[i][0] == "group" and log[i + 1] == ("submit", 4)
