"""experience: generation rounds, dynamic sampling, overlong shaping and advantages against direct computation."""
import random

import pytest
import torch

from megatron_fipo.algo.advantages import grpo_advantages, overlong_penalty
from megatron_fipo.algo.rewards import make_result
from megatron_fipo.config.schema import load_config
from megatron_fipo.data.balance import sample_cost
from megatron_fipo.train.experience import (
    Experience,
    PromptItem,
    collect_experience,
    rollout_seed,
    split_balance,
    split_step,
)
from megatron_fipo.rollout.engine import RolloutEngine, Sample


class FakeEngine(RolloutEngine):
    """Samples answer tokens: ``[correct_answer]`` with prob p(prompt), random garbage otherwise.

    The first prompt token is the kind: 0 always right, 1 always wrong, 2 right with prob 0.5,
    3 only sample 0 right (a group that is always mixed, so dynamic sampling always keeps it).
    """

    def __init__(self):
        self.calls = []

    def generate(self, requests, *, progress=False):
        self.calls.append(requests)
        out = []
        for ri, req in enumerate(requests):
            group = []
            for j in range(req.params.n):
                rng = random.Random(req.params.seed + j)
                kind = req.prompt_ids[0]  # 0: always right, 1: always wrong, 2: mixed, 3: only sample 0 right
                right = kind == 0 or (kind == 2 and rng.random() < 0.5) or (kind == 3 and j == 0)
                length = rng.randint(1, req.params.max_new_tokens)
                toks = [1 if right else 2] + [3] * (length - 1)
                group.append(Sample(req.prompt_ids, toks, [-0.1] * length, "stop", 0, ri, j))
            out.append(group)
        return out

    def update_weights(self, stream, version):
        raise AssertionError

    def health(self):
        return {"ok": True}

    def shutdown(self):
        pass


def _score(texts, gts):
    return [make_result(t.startswith("R"), "x") for t in texts]


def _decode(ids):
    return "R" if ids[0] == 1 else "W"


def _drawer(kinds):
    it = iter(kinds)
    return lambda k: [PromptItem((next(it), 9), "1", "") for _ in range(k)]


def _cfg(*extra):
    return load_config(None, ["rollout.n=4", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
                              "rollout.max_response_length=40", "algo.overlong_buffer=10", *extra])


def test_dynamic_sampling_rounds_and_trim():
    kinds = [0, 2, 1, 2] + [2, 2, 0, 2] + [2] * 40
    exp = collect_experience(FakeEngine(), _drawer(kinds), _score, _decode, _cfg(), step=3)
    # a mixed group is only "kept" if its 4 samples disagree: count directly
    assert exp.num_groups == 4 and len(exp.prompts) == 16
    assert all(p[0] == 2 for p in exp.prompts)  # all-right / all-wrong groups are filtered
    assert exp.metrics["train/gen_rounds"] >= 2 and exp.metrics["train/kept_groups"] == 4
    for g in range(4):  # group structure: n consecutive samples of one prompt
        assert len({tuple(p) for p in exp.prompts[4 * g:4 * g + 4]}) == 1


def test_advantages_equal_direct_computation():
    cfg = _cfg()
    exp = collect_experience(FakeEngine(), _drawer([2] * 200), _score, _decode, cfg, step=1)
    scores = torch.tensor([1.0 if r[0] == 1 else -1.0 for r in exp.responses], dtype=torch.float64)
    lengths = torch.tensor([len(r) for r in exp.responses], dtype=torch.float64)
    scores = scores + overlong_penalty(lengths, max_response_length=40, buffer_length=10).double()
    assert torch.allclose(exp.advantages, grpo_advantages(scores, 4).float())
    assert all(len(lp) == len(r) for lp, r in zip(exp.rollout_logp, exp.responses))


def test_no_dynamic_sampling_keeps_everything_in_one_round():
    eng = FakeEngine()
    exp = collect_experience(eng, _drawer([0, 1, 2, 2]), _score, _decode, _cfg("algo.dynamic_sampling=false", "algo.overlong_buffer=0"),
                             step=1)
    assert len(eng.calls) == 1 and exp.num_groups == 4
    assert exp.advantages[:8].abs().sum() == 0  # constant groups: zero advantage


def test_exhausted_rounds():
    cfg = _cfg("algo.max_gen_rounds=2")
    with pytest.warns(UserWarning, match="kept 0 of 4"):
        exp = collect_experience(FakeEngine(), _drawer([0] * 8), _score, _decode, cfg, step=1)
    assert exp.num_groups == 0 and exp.metrics["train/gen_rounds"] == 2
    with pytest.raises(RuntimeError, match="max_gen_rounds"):
        collect_experience(FakeEngine(), _drawer([0] * 8), _score, _decode, _cfg("algo.max_gen_rounds=2",
                           "algo.on_exhausted=error"), step=1)


def test_short_batch_trimmed_to_split_over_dp():
    # n=3 and dp=2: a group count must be even for its samples to split over the ranks.
    cfg = load_config(None, ["rollout.n=3", "train.prompts_per_step=4", "train.mini_batch_prompts=2",
                             "rollout.max_response_length=8", "algo.overlong_buffer=0", "algo.max_gen_rounds=1"])
    # Prompts 10, 11, 12 always give mixed groups (kept); 13 is always right (filtered): 3 of 4 groups
    # kept in the one round allowed, trimmed to the first 2 so that 2 * 3 samples split over 2 ranks.
    items = iter([PromptItem((3, 10), "1", ""), PromptItem((3, 11), "1", ""), PromptItem((3, 12), "1", ""),
                  PromptItem((0, 13), "1", "")])
    with pytest.warns(UserWarning, match="kept 3 of 4 groups"):
        exp = collect_experience(FakeEngine(), lambda k: [next(items) for _ in range(k)], _score, _decode, cfg,
                                 step=5, dp_size=2)
    assert exp.prompts == [[3, 10]] * 3 + [[3, 11]] * 3
    assert exp.num_groups == 2 and len(exp.responses) == len(exp.advantages) == 6
    assert [r[0] for r in exp.responses] == [1, 2, 2, 1, 2, 2]  # sample 0 of each group is the right one
    assert exp.metrics["train/kept_groups"] == 2.0


def test_seeds_deterministic_and_distinct():
    seeds = {rollout_seed(1, s, r, i, 16) for s in range(5) for r in range(1, 4) for i in range(50)}
    assert len(seeds) == 5 * 3 * 50
    a = collect_experience(FakeEngine(), _drawer([2] * 100), _score, _decode, _cfg(), step=7)
    b = collect_experience(FakeEngine(), _drawer([2] * 100), _score, _decode, _cfg(), step=7)
    assert a.responses == b.responses


@pytest.mark.parametrize("num, n, m, dp", [(16, 4, 2, 2), (12, 3, 2, 2), (8, 4, 2, 4), (4, 4, 4, 1)])
@pytest.mark.parametrize("balanced", [False, True], ids=["round_robin", "balanced"])
def test_split_step_partitions(num, n, m, dp, balanced):
    rng = random.Random(num * 7 + dp)
    costs = [rng.lognormvariate(7, 1) for _ in range(num)] if balanced else None
    shards = [[parts[r] for parts in split_step(num, n, m, dp, costs=costs)] for r in range(dp)]
    everything = sorted(i for s in shards for mb in s for i in mb)
    assert everything == list(range(num))
    for mb in range(len(shards[0])):  # each mini-batch stays within its groups, every rank gets samples
        if not balanced:  # round-robin: the same count on every rank
            assert len({len(s[mb]) for s in shards}) == 1
        for s in shards:
            assert s[mb] and s[mb] == sorted(s[mb])
            assert all(mb * m * n <= i < (mb + 1) * m * n for i in s[mb])


def _long_tailed_experience(num_groups=8, n=4, seed=0):
    rng = random.Random(seed)
    exp = Experience(n=n)
    for i in range(num_groups * n):
        exp.prompts.append([i % 50] * rng.randint(1, 20))
        exp.responses.append([7] * (2000 if rng.random() < 0.15 else rng.randint(1, 300)))
        exp.rollout_logp.append(torch.full((len(exp.responses[-1]),), -0.5))
    exp.advantages = torch.randn(num_groups * n, generator=torch.Generator().manual_seed(seed))
    return exp


def test_dp1_share_is_every_sample_in_order():
    exp = _long_tailed_experience()
    (share,) = exp.shares(exp.split(2, 1, costs=exp.costs(64)), 1)
    assert [len(mb) for mb in share.mini_batches] == [8, 8, 8, 8]
    assert [p for mb in share.mini_batches for p in mb.prompts] == exp.prompts
    assert torch.equal(torch.cat([mb.advantages for mb in share.mini_batches]), exp.advantages)
    assert exp.shares(exp.split(2, 1), 1)[0].mini_batches[1].responses == exp.responses[8:16]
    assert split_step(32, 4, 2, 1, costs=exp.costs(64)) == split_step(32, 4, 2, 1) == \
        [[list(range(s, s + 8))] for s in range(0, 32, 8)]


def test_balanced_split_beats_round_robin_and_keeps_samples_whole():
    exp = _long_tailed_experience(num_groups=16, n=8, seed=3)
    costs = exp.costs(64)
    assert costs[0] == sample_cost(len(exp.prompts[0]), len(exp.responses[0]), 64)
    balanced, rr = exp.split(4, 4, costs=costs), exp.split(4, 4)
    assert split_balance(costs, balanced) < split_balance(costs, rr)
    shares = exp.shares(balanced, 4)
    for r, share in enumerate(shares):  # each rank's mini-batch holds exactly its samples, whole
        for m, mb in enumerate(share.mini_batches):
            idx = balanced[m][r]
            assert mb.prompts == [exp.prompts[i] for i in idx] and mb.responses == [exp.responses[i] for i in idx]
            assert torch.equal(mb.advantages, exp.advantages[idx])
            assert all(a is exp.rollout_logp[i] for a, i in zip(mb.rollout_logp, idx))
    assert sum(s.num_tokens for s in shares) == sum(len(p) + len(r) for p, r in zip(exp.prompts, exp.responses))
    assert split_balance([], []) == 1.0
    with pytest.raises(ValueError, match="3 sample costs for 4 samples"):
        split_step(4, 2, 1, 2, costs=[1.0, 2.0, 3.0])
