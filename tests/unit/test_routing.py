"""Prompt-affine routing and streamed groups: rollout.routing against a naive reference, SGLangEngine
against tests/fake_sglang_server.py (where each prompt went, what an ideal prefix cache prefills,
samples with 1, 2 and 3 servers), and groups streamed in completion order."""
import json
import random
import threading
from collections import Counter

import pytest

from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams
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


def test_a_prompt_stays_on_one_server_and_is_prefilled_once(three_servers, capsys):
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
    with capsys.disabled():
        print(f"\nprefill tokens per round at n={n} on 3 servers: round-robin {prefill_before}, "
              f"prompt-affine {prefill_after}, ratio {prefill_before / prefill_after:.2f}")
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
    # sent yet are lost with it, so a restarted server may see all 4 again and die once more
    with _engine(tmp_path, "--die-after-requests", "3", replicas=2, max_restarts=2) as eng:
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
