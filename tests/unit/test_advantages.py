"""GRPO advantages, dynamic sampling and overlong shaping against naive float64 loops."""

import statistics

import pytest
import torch

from megatron_fipo.algo.advantages import (
    dynamic_sampling_filter,
    dynamic_sampling_step,
    grpo_advantages,
    overlong_penalty,
)
from tests.helpers import fresh_seeds

SEEDS = fresh_seeds(5, base=17)


# ---------------------------------------------------------------- naive references (Python floats)


def naive_groups(ids: list) -> dict:
    """id -> list of sample positions, in order of first appearance."""
    groups: dict = {}
    for i, g in enumerate(ids):
        groups.setdefault(g, []).append(i)
    return groups


def naive_grpo(rewards: list, ids: list, normalize_std: bool, eps: float) -> list:
    out = [0.0] * len(rewards)
    for members in naive_groups(ids).values():
        vals = [rewards[i] for i in members]
        if len(set(vals)) == 1:
            continue  # all equal (incl. size 1): advantage 0
        mean = statistics.fmean(vals)
        std = statistics.stdev(vals)  # unbiased, n - 1
        for i in members:
            out[i] = (rewards[i] - mean) / (std + eps) if normalize_std else rewards[i] - mean
    return out


def naive_filter(values: list, ids: list) -> tuple[list, list, list]:
    groups = naive_groups(ids)
    keep_group = {g: len({values[i] for i in m}) > 1 for g, m in groups.items()}
    return list(keep_group.values()), [keep_group[g] for g in ids], list(groups)


def naive_overlong(length: float, max_len: int, buffer: int, factor: float) -> float:
    expected = max_len - buffer
    if length <= expected:
        return 0.0
    return -(length - expected) / buffer * factor


# ---------------------------------------------------------------- random builders


def random_rewards(gen: torch.Generator, n: int, kind: str, dtype=torch.float64) -> torch.Tensor:
    """Binary +-1 (many all-equal groups), Gaussian, or a few repeated non-dyadic levels."""
    if kind == "binary":
        return torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, -1.0).to(dtype)
    if kind == "levels":
        return (torch.randint(0, 3, (n,), generator=gen) * 0.1 + 0.1).to(dtype)
    return torch.randn(n, generator=gen, dtype=dtype)


def random_group_ids(gen: torch.Generator, num_groups: int, max_size: int) -> torch.Tensor:
    """Unequal sizes in [1, max_size], sparse (negative and large) ids, shuffled positions."""
    sizes = torch.randint(1, max_size + 1, (num_groups,), generator=gen)
    labels = torch.randperm(1000, generator=gen)[:num_groups] * 7 - 3000
    ids = torch.repeat_interleave(labels, sizes)
    return ids[torch.randperm(ids.numel(), generator=gen)]


# ---------------------------------------------------------------- grpo_advantages


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["binary", "gauss", "levels"])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_unequal_shuffled_groups_match_naive(seed, kind, normalize_std):
    gen = torch.Generator().manual_seed(seed)
    ids = random_group_ids(gen, 40, 9)
    rewards = random_rewards(gen, ids.numel(), kind)
    got = grpo_advantages(rewards, ids, normalize_std=normalize_std)
    ref = naive_grpo(rewards.tolist(), ids.tolist(), normalize_std, 1e-6)
    assert got.dtype == torch.float64 and got.shape == rewards.shape
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", [1, 2, 5, 16])
def test_grpo_fixed_group_size_matches_naive_and_ids(seed, group_size):
    gen = torch.Generator().manual_seed(seed)
    rewards = random_rewards(gen, 12 * group_size, ["binary", "gauss", "levels"][seed % 3])
    got = grpo_advantages(rewards, group_size, eps=1e-4)
    ids = [i // group_size for i in range(rewards.numel())]
    ref = naive_grpo(rewards.tolist(), ids, True, 1e-4)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.equal(got, grpo_advantages(rewards, torch.tensor(ids), eps=1e-4))
    assert torch.equal(got, grpo_advantages(rewards, ids, eps=1e-4))  # a plain list of ids
    if group_size == 1:
        assert torch.all(got == 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_float32_in_float32_within_rounding(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = random_group_ids(gen, 30, 16)
    rewards = random_rewards(gen, ids.numel(), "gauss")
    got = grpo_advantages(rewards.float(), ids)
    assert got.dtype == torch.float32
    ref = torch.tensor(naive_grpo(rewards.float().double().tolist(), ids.tolist(), True, 1e-6), dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_grpo_all_equal_and_singleton_groups_are_exactly_zero():
    # 0.1 is not dyadic: a float mean/std of [0.1] * 3 need not be exactly 0.1 / 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 5.0, -2.0, 0.3, 0.7], dtype=torch.float64)
    ids = torch.tensor([4, 4, 4, 9, 9, 2, 3, 8, 8])
    for normalize_std in (True, False):
        got = grpo_advantages(rewards, ids, normalize_std=normalize_std)
        assert torch.all(got[:7] == 0), got
        assert torch.isfinite(got).all() and got[7] < 0 < got[8]
    # Same for float32 and for eps = 0.
    assert torch.all(grpo_advantages(rewards.float(), ids, eps=0.0)[:7] == 0)


def test_grpo_permutation_equivariant_and_int_rewards():
    gen = torch.Generator().manual_seed(3)
    ids = random_group_ids(gen, 20, 6)
    rewards = torch.randint(-1, 2, (ids.numel(),), generator=gen)  # int scores
    got = grpo_advantages(rewards, ids)
    assert got.dtype == torch.float32
    perm = torch.randperm(ids.numel(), generator=gen)
    torch.testing.assert_close(grpo_advantages(rewards[perm], ids[perm]), got[perm])


def test_grpo_empty_input_and_no_grad():
    for spec in (4, torch.zeros(0, dtype=torch.int64), []):
        got = grpo_advantages(torch.zeros(0, dtype=torch.float64), spec)
        assert got.shape == (0,) and got.dtype == torch.float64
    r = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert not grpo_advantages(r, 4).requires_grad


@pytest.mark.parametrize(
    "rewards, spec, kwargs, match",
    [
        (torch.zeros(6), 4, {}, "dividing"),
        (torch.zeros(6), 0, {}, "dividing"),
        (torch.zeros(6), torch.zeros(5, dtype=torch.int64), {}, "one id per sample"),
        (torch.zeros(6), torch.zeros(6), {}, "integer"),
        (torch.zeros(6), ["a"] * 6, {}, "string uids"),
        (torch.zeros(2, 3), 3, {}, "1-D"),
        (torch.tensor([0.0, float("nan")]), 2, {}, "finite"),
        (torch.zeros(4), 2, {"eps": -1.0}, "eps"),
    ],
)
def test_grpo_bad_input_raises(rewards, spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        grpo_advantages(rewards, spec, **kwargs)


# ---------------------------------------------------------------- dynamic sampling


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["binary", "levels"])
def test_filter_matches_naive_unequal_shuffled(seed, kind):
    gen = torch.Generator().manual_seed(seed)
    ids = random_group_ids(gen, 50, 5)
    values = random_rewards(gen, ids.numel(), kind)
    keep_groups, keep_samples, group_ids = dynamic_sampling_filter(values, ids)
    ref_groups, ref_samples, ref_ids = naive_filter(values.tolist(), ids.tolist())
    assert keep_groups.tolist() == ref_groups and keep_samples.tolist() == ref_samples
    assert group_ids.tolist() == ref_ids
    # A kept group is exactly one with a nonzero GRPO advantage somewhere.
    adv = grpo_advantages(values, ids).tolist()
    nonzero = {g: any(adv[i] != 0 for i in m) for g, m in naive_groups(ids.tolist()).items()}
    assert keep_samples.tolist() == [nonzero[g] for g in ids.tolist()]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", [1, 4, 16])
def test_filter_fixed_group_size(seed, group_size):
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(8 * group_size, generator=gen) < 0.8  # bool "acc"
    keep_groups, keep_samples, group_ids = dynamic_sampling_filter(values, group_size)
    ids = [i // group_size for i in range(values.numel())]
    ref_groups, ref_samples, _ = naive_filter(values.tolist(), ids)
    assert keep_groups.tolist() == ref_groups and keep_samples.tolist() == ref_samples
    assert group_ids.tolist() == list(range(8))
    if group_size == 1:
        assert not keep_groups.any()


def test_filter_empty_and_bad_input():
    keep_groups, keep_samples, group_ids = dynamic_sampling_filter(torch.zeros(0), 16)
    assert keep_groups.numel() == keep_samples.numel() == group_ids.numel() == 0
    with pytest.raises(ValueError, match="finite"):
        dynamic_sampling_filter(torch.tensor([1.0, float("inf")]), 2)
    with pytest.raises(ValueError, match="dividing"):
        dynamic_sampling_filter(torch.zeros(5), 2)


@pytest.mark.parametrize("seed", SEEDS)
def test_dynamic_sampling_rounds_reach_target_in_order(seed):
    gen = torch.Generator().manual_seed(seed)
    target, max_rounds, per_round = 20, 10, 12
    kept: list = []
    rounds = 0
    while True:
        step = dynamic_sampling_step(kept, target_num_groups=target, rounds_done=rounds, max_rounds=max_rounds)
        assert not (step.generate_more and step.exhausted)
        if not step.generate_more:
            break
        rounds += 1
        keep = (torch.rand(per_round, generator=gen) < 0.5).tolist()
        kept += [(rounds, j) for j in range(per_round) if keep[j]]
    # Naive: rounds needed until the running count reaches the target.
    assert not step.exhausted and len(kept) >= target
    assert step.selected == kept[:target] and len(step.selected) == target
    assert rounds <= max_rounds


def test_dynamic_sampling_exhausted_and_tensors():
    ids = torch.arange(7)
    step = dynamic_sampling_step(ids, target_num_groups=8, rounds_done=3, max_rounds=3)
    assert step.exhausted and not step.generate_more and torch.equal(step.selected, ids)
    step = dynamic_sampling_step(ids, target_num_groups=8, rounds_done=2, max_rounds=3)
    assert step.generate_more and not step.exhausted
    step = dynamic_sampling_step(ids, target_num_groups=5, rounds_done=9, max_rounds=3)
    assert not step.generate_more and not step.exhausted and step.selected.tolist() == [0, 1, 2, 3, 4]
    step = dynamic_sampling_step([], target_num_groups=1, rounds_done=0, max_rounds=1)
    assert step.generate_more and step.selected == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_num_groups": 0, "rounds_done": 0, "max_rounds": 1},
        {"target_num_groups": 4, "rounds_done": -1, "max_rounds": 1},
        {"target_num_groups": 4, "rounds_done": 0, "max_rounds": 0},
        {"target_num_groups": 4.0, "rounds_done": 0, "max_rounds": 1},
        {"target_num_groups": True, "rounds_done": 0, "max_rounds": 1},
    ],
)
def test_dynamic_sampling_step_bad_input_raises(kwargs):
    with pytest.raises(ValueError):
        dynamic_sampling_step([1, 2], **kwargs)


# ---------------------------------------------------------------- overlong penalty


@pytest.mark.parametrize("seed", SEEDS)
def test_overlong_matches_naive(seed):
    gen = torch.Generator().manual_seed(seed)
    max_len = int(torch.randint(10, 30000, (1,), generator=gen))
    buffer = int(torch.randint(1, max_len + 1, (1,), generator=gen))
    factor = float(torch.rand(1, generator=gen)) * 2
    edges = [0, max_len, max_len - buffer, max(max_len - buffer - 1, 0), min(max_len - buffer + 1, max_len)]
    lengths = torch.cat([torch.tensor(edges), torch.randint(0, max_len + 1, (200,), generator=gen)])
    got = overlong_penalty(lengths, max_response_length=max_len, buffer_length=buffer, penalty_factor=factor)
    ref = [naive_overlong(x, max_len, buffer, factor) for x in lengths.tolist()]
    assert got.dtype == torch.float32 and got.shape == lengths.shape
    torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    got64 = overlong_penalty(lengths.double(), max_response_length=max_len, buffer_length=buffer, penalty_factor=factor)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, torch.tensor(ref, dtype=torch.float64), rtol=1e-13, atol=1e-13)


def test_overlong_spec_recipe_edges():
    lengths = torch.tensor([0, 100, 16383, 16384, 16385, 18432, 20479, 20480])
    got = overlong_penalty(lengths, max_response_length=20480, buffer_length=4096).tolist()
    assert got[:4] == [0.0, 0.0, 0.0, 0.0]
    assert got[4] == pytest.approx(-1 / 4096) and got[5] == pytest.approx(-0.5)
    assert got[6] == pytest.approx(-4095 / 4096) and got[7] == -1.0
    assert all(str(x) != "-0.0" for x in got)  # no negative zeros
    full = overlong_penalty(torch.tensor([0, 5, 10]), max_response_length=10, buffer_length=10, penalty_factor=2.0)
    assert full.tolist() == [0.0, -1.0, -2.0]
    assert overlong_penalty(torch.zeros(0), max_response_length=4, buffer_length=2).shape == (0,)


@pytest.mark.parametrize(
    "lengths, kwargs, match",
    [
        (torch.tensor([1]), {"max_response_length": 10, "buffer_length": 11}, "buffer_length"),
        (torch.tensor([1]), {"max_response_length": 10, "buffer_length": 0}, "buffer_length"),
        (torch.tensor([1]), {"max_response_length": 0, "buffer_length": 1}, "max_response_length"),
        (torch.tensor([1]), {"max_response_length": 10, "buffer_length": 4, "penalty_factor": -1.0}, "penalty_factor"),
        (torch.tensor([11]), {"max_response_length": 10, "buffer_length": 4}, "exceeds"),
        (torch.tensor([-1]), {"max_response_length": 10, "buffer_length": 4}, ">= 0"),
        ([3], {"max_response_length": 10, "buffer_length": 4}, "tensor"),
    ],
)
def test_overlong_bad_input_raises(lengths, kwargs, match):
    with pytest.raises(ValueError, match=match):
        overlong_penalty(lengths, **kwargs)
