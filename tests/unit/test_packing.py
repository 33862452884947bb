"""THD packing and token-budget micro-batching against direct per-sample computation."""

import random

import pytest
import torch

from megatron_fipo.data.packing import pack_samples, plan_micro_batches
from tests.helpers import fresh_seeds


def _random_samples(rng: random.Random, n: int):
    prompts = [[rng.randrange(100) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    responses = [[rng.randrange(100) for _ in range(rng.randint(0, 7))] for _ in range(n)]
    old = [torch.tensor([rng.random() for _ in r]) for r in responses]
    return prompts, responses, old


@pytest.mark.parametrize("seed", fresh_seeds(5, base=41))
def test_pack_labels_masks_and_values_align_per_sequence(seed):
    rng = random.Random(seed)
    prompts, responses, old = _random_samples(rng, rng.randint(1, 6))
    order = list(range(len(prompts)))
    rng.shuffle(order)
    batch = pack_samples(prompts, responses, {"old_logp": old}, indices=order)
    assert batch.sample_index == order
    for s, i in enumerate(order):
        lo, hi = int(batch.cu_seqlens[s]), int(batch.cu_seqlens[s + 1])
        ids = prompts[i] + responses[i]
        assert batch.tokens[lo:hi].tolist() == ids
        assert batch.position_ids[lo:hi].tolist() == list(range(len(ids)))
        for t in range(len(ids)):  # position t predicts token t + 1 of the same sequence
            is_response_label = t + 1 < len(ids) and t + 1 >= len(prompts[i])
            assert batch.loss_mask[lo + t].item() == float(is_response_label)
            if t + 1 < len(ids):
                assert batch.labels[lo + t].item() == ids[t + 1]
            if is_response_label:
                j = t + 1 - len(prompts[i])
                assert batch.per_token["old_logp"][lo + t].item() == pytest.approx(old[i][j].item())
    back = batch.response_values(batch.per_token["old_logp"])
    for s, i in enumerate(order):
        torch.testing.assert_close(back[s], old[i].float())
    assert int(batch.loss_mask.sum()) == sum(len(responses[i]) for i in order)


def test_pack_errors():
    with pytest.raises(ValueError, match="prompt"):
        pack_samples([[]], [[1]])
    with pytest.raises(ValueError, match="response tokens"):
        pack_samples([[1]], [[2, 3]], {"old_logp": [torch.zeros(1)]})
    empty = pack_samples([], [])
    assert empty.num_tokens == 0 and empty.cu_seqlens.tolist() == [0]


@pytest.mark.parametrize("seed", fresh_seeds(10, base=42))
def test_micro_batches_respect_budget_and_cover_every_sample_once(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 40))]
    budget = rng.randint(50, 200)
    plan = plan_micro_batches(lengths, budget)
    assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in mb) <= budget for mb in plan)
    assert all(mb == sorted(mb) for mb in plan)
    lower = -(-sum(lengths) // budget)
    assert len(plan) >= lower
    # forcing a larger count (another rank needs more micro-batches) still covers everything
    forced = plan_micro_batches(lengths, budget, num_micro_batches=len(plan) + 2)
    assert len(forced) == len(plan) + 2
    assert sorted(i for mb in forced for i in mb) == list(range(len(lengths)))


def test_micro_batch_balance_and_errors():
    plan = plan_micro_batches([10, 10, 10, 10], 20)
    assert [len(mb) for mb in plan] == [2, 2]
    with pytest.raises(ValueError, match="budget"):
        plan_micro_batches([5, 30], 20)
    with pytest.raises(ValueError, match="do not fit"):
        plan_micro_batches([15, 15, 15], 20, num_micro_batches=2)
