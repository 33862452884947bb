"""train.pool: over-sampling, partial rollouts and in-flight weight versions against a streaming fake engine.

The fake decodes every running request one token per tick in a background thread. Its tokens are
a deterministic function of the text so far, so a sample aborted and continued from prompt +
partial response yields exactly the tokens of the uninterrupted sample; each prompt's first token
sets how long its answers run (a long tail: most short, a few 10x longer). Weight versions change
under running samples (in-flight updates), and every token must carry the version it was made with.
"""
import random
import threading
import time
from collections import Counter
from concurrent.futures import Future

import pytest

from megatron_fipo.algo.rewards import make_result
from megatron_fipo.config.schema import load_config, validate
from megatron_fipo.rollout.engine import Sample
from megatron_fipo.train.experience import PromptItem
from megatron_fipo.train.pool import RolloutPool, age_metrics, count_metrics, engine_metrics, length_metrics
from tests.helpers import fresh_seeds

PROMPT_LEN = 3
STOP = 0


def _next_token(ids) -> int:
    return 1 + (ids[-1] * 7 + ids[-2] * 3 + len(ids)) % 50


class StreamEngine:
    """One token per tick for every running request; the stop token once a prompt's length is reached."""

    def __init__(self, tick_s: float = 0.0005):
        self.weight_version, self.tick_s = 0, tick_s
        self.running: dict = {}  # future -> [input ids, out tokens, logprobs, versions, max_new]
        self.lock = threading.Lock()
        self.submitted, self.aborts, self.max_running = [], 0, 0
        self.closed = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        self.max_in_flight, self.urls = 64, ["fake"]

    def submit(self, req, j=0, *, group=None):
        fut: Future = Future()
        with self.lock:
            self.running[fut] = [list(req.prompt_ids), [], [], [], req.params.max_new_tokens]
            self.submitted.append((tuple(req.prompt_ids), req.params.max_new_tokens, req.params.seed))
            self.max_running = max(self.max_running, len(self.running))
        return fut

    def forget_group(self, group):
        pass

    def _finish(self, fut, state, reason):
        ids, out, lps, vers, _ = state
        fut.set_result(Sample(tuple(ids), out, lps, reason, vers[0] if vers else self.weight_version, 0, 0,
                              tuple(vers) if len(set(vers)) > 1 else ()))

    def _loop(self):
        while not self.closed:
            with self.lock:
                for fut, state in list(self.running.items()):
                    ids, out, lps, vers, max_new = state
                    length = 4 + 40 * (ids[0] % 10 == 0) + ids[0] % 4  # a long tail: one prompt in ten is 10x
                    done = len(ids) + len(out) - PROMPT_LEN >= length
                    token = STOP if done else _next_token(ids + out)
                    out.append(token)
                    lps.append(-0.1 * (1 + self.weight_version))
                    vers.append(self.weight_version)
                    if token == STOP or len(out) >= max_new:
                        del self.running[fut]
                        self._finish(fut, state, "stop" if token == STOP else "length")
            time.sleep(self.tick_s)

    def abort_running(self):
        with self.lock:
            self.aborts += 1
            for fut, state in list(self.running.items()):
                del self.running[fut]
                self._finish(fut, state, "abort")

    def stream_stats(self):
        return {"tokens": [0], "prompt_tokens": 0, "cached_tokens": 0, "aborted": 0, "busy_s": [0.0],
                "time": time.monotonic()}

    def close(self):
        self.closed = True
        self.thread.join()


class Services:
    def __init__(self, engine, seed):
        self.engine, self.rng, self.drawn = engine, random.Random(seed), []

    def draw(self, k):
        items = [PromptItem((self.rng.randrange(1, 200), 5, 9), "1", f"p{len(self.drawn) + i}") for i in range(k)]
        self.drawn += items
        return items

    def submit_score(self, texts, gts):
        done = Future()
        done.set_result([make_result(self.rng.random() < 0.5, "x") for t in texts])  # mixed in most groups
        return done

    def decode(self, ids):
        return "x" * len(ids)


def _cfg(*extra):
    cfg = load_config(None, ["rollout.engine=sglang", "rollout.mode=disaggregated", "rollout.partial=true",
                             "rollout.n=4", "train.prompts_per_step=8", "train.mini_batch_prompts=4",
                             "rollout.max_response_length=64", "algo.overlong_buffer=0", "rollout.stop_token_ids=[0]",
                             *extra])
    validate(cfg, for_training=False)
    return cfg


def _reference(prompt) -> list:
    """The tokens an uninterrupted sample of ``prompt`` gets (the fake is deterministic)."""
    out = []
    while True:
        length = 4 + 40 * (prompt[0] % 10 == 0) + prompt[0] % 4
        token = STOP if len(out) >= length else _next_token(list(prompt) + out)
        out.append(token)
        if token == STOP:
            return out


@pytest.fixture
def engine():
    eng = StreamEngine()
    yield eng
    eng.close()


@pytest.mark.parametrize("seed", fresh_seeds(2, base=71))
def test_oversampling_forms_batches_without_waiting_for_the_tail(engine, seed):
    cfg = _cfg("rollout.oversample=1.5")
    services = Services(engine, seed)
    pool = RolloutPool(services, cfg, dp_size=2)
    trained, tail_carried = 0, 0
    for step in range(1, 6):
        exp = pool.collect(step)
        tail_carried += any(g.item.prompt_ids[0] % 10 == 0 for g in pool.groups.values())
        assert exp.num_groups == 8 and len(exp.prompts) == 32
        assert len(pool.groups) + len(pool.complete) <= 12  # ceil(1.5 * 8) in flight or waiting, no more
        for prompt, response in zip(exp.prompts, exp.responses):
            assert response == _reference(prompt), "a trained sample is not what the engine generated"
        assert exp.metrics["rollout/groups_in_flight"] == len(pool.groups)
        lengths = sorted(len(r) for r in exp.responses)
        assert exp.metrics["rollout/trained_length_mean"] == pytest.approx(sum(lengths) / len(lengths))
        assert lengths[0] <= exp.metrics["rollout/trained_length_p50"] <= exp.metrics["rollout/trained_length_p90"]
        assert exp.metrics["rollout/trained_length_p90"] <= lengths[-1]
        if exp.metrics["train/generated_samples"]:  # the samples scored during this collect
            assert exp.metrics["rollout/generated_length_mean"] == pytest.approx(
                exp.metrics["train/response_length_mean"])
        trained += exp.num_groups
    # every drawn group is trained once, filtered out, or still in the pool: none lost, none trained twice
    assert trained + pool.counts["filtered_groups"] + len(pool.groups) + len(pool.complete) == len(services.drawn)
    assert engine.aborts == 0 and engine.max_running <= 12 * 4
    long_ones = [it for it in services.drawn if it.prompt_ids[0] % 10 == 0]
    assert tail_carried or not long_ones  # at some step boundary a long group was still running: not waited for


@pytest.mark.parametrize("seed", fresh_seeds(2, base=83))
def test_interrupted_samples_continue_exactly_and_keep_their_versions(engine, seed):
    """Abort at every weight change (colocated / no in-flight updates): the continued samples equal the
    uninterrupted ones, each token keeps the version that made it, and nothing drawn is lost."""
    cfg = _cfg("rollout.oversample=1.25", "rollout.max_staleness=1")
    services = Services(engine, seed)
    pool = RolloutPool(services, cfg, dp_size=1)
    trained, carried = [], 0
    for step in range(1, 6):
        exp = pool.collect(step)
        trained += list(zip(exp.prompts, exp.responses, exp.token_versions))
        carried += exp.metrics["rollout/partial_carried"]
        pool.interrupt()  # the weights change: nothing may run
        engine.weight_version = step
    assert engine.aborts >= 1 and carried > 0
    continued = [t for t in trained if len(set(t[2])) > 1]
    assert continued, "no trained sample spanned a weight change"
    for prompt, response, versions in trained:
        assert response == _reference(prompt)
        assert versions == sorted(versions) and len(versions) == len(response)
    state = pool.state_dict()  # drawn = trained + waiting + generating + filtered out
    in_pool = len(state["generating"]) + len(state["complete"])
    assert len(services.drawn) == len(trained) // 4 + in_pool + pool.counts["filtered_groups"]


def test_checkpointed_pool_resumes_its_partial_samples(engine):
    cfg = _cfg("rollout.oversample=2")
    services = Services(engine, 5)
    pool = RolloutPool(services, cfg, dp_size=1)
    pool.collect(1)
    pool.interrupt()
    state = pool.state_dict()
    partial = [(tuple(g["prompt_ids"]), p["tokens"]) for g in state["generating"] for p in g["pieces"]
               if p["finish"] is None and p["tokens"]]
    assert partial, "nothing was unfinished at the checkpoint"
    before = len(engine.submitted)
    resumed = RolloutPool(services, cfg, dp_size=1, state=state)
    trained = {}
    for step in range(2, 8):
        exp = resumed.collect(step)
        trained.update({tuple(p): r for p, r in zip(exp.prompts, exp.responses)})
    sent = {p for p, _, _ in engine.submitted[before:]}
    for prompt, tokens in partial:  # continued from where it was (prompt + its tokens), not regenerated
        assert prompt + tuple(tokens) in sent
        if prompt in trained:
            assert trained[prompt][:len(tokens)] == tokens and trained[prompt] == _reference(prompt)
    assert any(prompt in trained for prompt, _ in partial)
    continuation = [(p, m) for p, m, _ in engine.submitted if len(p) > PROMPT_LEN]
    assert all(m == 64 - (len(p) - PROMPT_LEN) for p, m in continuation)  # the length budget is the sample's


def test_token_ages_and_sample_starts_in_the_metrics():
    from megatron_fipo.train.experience import Experience

    exp = Experience(prompts=[[1], [1]], responses=[[5, 6, 7], [5]], n=2, versions=[2, 4],
                     token_versions=[[2, 3, 4], [4]])
    stats = {"tokens": [30, 10], "prompt_tokens": 20, "cached_tokens": 15, "aborted": 0, "busy_s": [2.0, 1.0],
             "time": 11.0}
    zero = {"tokens": [0, 0], "prompt_tokens": 0, "cached_tokens": 0, "aborted": 0, "busy_s": [0.0, 0.0],
            "time": 1.0}
    m = {**age_metrics(exp, 4, 1), **engine_metrics(zero, stats, capacity=2),
         **count_metrics(Counter(), Counter(wasted_tokens=7))}
    assert m["rollout/token_age_frac_0"] == 0.5 and m["rollout/token_age_frac_1"] == 0.25
    assert m["rollout/token_age_frac_over_1"] == 0.25 and m["rollout/token_age_max"] == 2
    assert m["rollout/staleness_max"] == 2 and m["rollout/staleness_mean"] == 1
    assert m["rollout/server0_token_share"] == 0.75 and m["rollout/prefix_cache_hit"] == 0.75
    assert m["rollout/slot_util"] == pytest.approx(3.0 / (10.0 * 2 * 2)) and m["rollout/wasted_tokens"] == 7
    assert m["perf/generated_tokens_per_s"] == 4.0


def test_length_metrics_quantiles_and_empty():
    assert length_metrics("trained", []) == {}
    m = length_metrics("generated", [1])
    assert m == {"rollout/generated_length_mean": 1.0, "rollout/generated_length_p50": 1.0,
                 "rollout/generated_length_p90": 1.0}
    m = length_metrics("trained", list(range(1, 11)))  # 1..10: median 5.5, p90 9.1 (linear interpolation)
    assert m["rollout/trained_length_mean"] == 5.5 and m["rollout/trained_length_p50"] == 5.5
    assert m["rollout/trained_length_p90"] == pytest.approx(9.1)
