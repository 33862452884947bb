"""Advantages stay one per sequence until the loss: the loss broadcasts them exactly like per-token ones.

The actor hands ``fipo_policy_loss`` / ``cp_policy_loss`` one advantage per packed sequence
(``mcore.micro_batches.RankMicroBatch.advantages``); the per-token form must stay accepted and give
bit-identical results. Also: ``PackedBatch.place`` puts per-response-token values where
``response_values`` reads them.
"""

import pytest
import torch

from megatron_fipo.algo.losses import fipo_policy_loss
from megatron_fipo.data.packing import pack_samples


def _packed(seed):
    gen = torch.Generator().manual_seed(seed)
    prompts = [[1] * int(torch.randint(1, 5, (), generator=gen)) for _ in range(5)]
    responses = [[2] * int(torch.randint(0, 9, (), generator=gen)) for _ in range(5)]
    batch = pack_samples(prompts, responses)
    n = batch.num_tokens
    logp, old = -torch.rand(n, generator=gen, dtype=torch.float64), -torch.rand(n, generator=gen, dtype=torch.float64)
    return batch, logp, old, torch.randn(5, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_packed_per_sequence_equals_per_token(seed):
    batch, logp, old, adv = _packed(seed)
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
    per_token = torch.repeat_interleave(adv, lengths)
    kw = dict(cu_seqlens=batch.cu_seqlens, decay_rate=4.0, dual_clip_c=3.0)
    a = fipo_policy_loss(logp, old, adv, batch.loss_mask, **kw)
    b = fipo_policy_loss(logp, old, per_token, batch.loss_mask, **kw)
    torch.testing.assert_close(a.per_token_loss, b.per_token_loss, rtol=0, atol=0)
    assert {k: float(v) for k, v in a.sums.items()} == {k: float(v) for k, v in b.sums.items()}


def test_padded_per_sequence_equals_per_token():
    gen = torch.Generator().manual_seed(0)
    logp, old = -torch.rand(3, 7, generator=gen), -torch.rand(3, 7, generator=gen)
    mask, adv = (torch.rand(3, 7, generator=gen) > 0.3).float(), torch.randn(3, generator=gen)
    a = fipo_policy_loss(logp, old, adv, mask)
    b = fipo_policy_loss(logp, old, adv.unsqueeze(1).expand(3, 7), mask)
    torch.testing.assert_close(a.per_token_loss, b.per_token_loss, rtol=0, atol=0)


def test_wrong_advantage_shape_is_refused():
    batch, logp, old, adv = _packed(0)
    with pytest.raises(ValueError, match="one value per sequence"):
        fipo_policy_loss(logp, old, adv[:3], batch.loss_mask, cu_seqlens=batch.cu_seqlens)


def test_place_inverts_response_values():
    batch, _, _, _ = _packed(1)
    values = [torch.arange(len(v), dtype=torch.float32) + 10 * i
              for i, v in enumerate(batch.response_values(batch.loss_mask))]
    placed = batch.place(values)
    assert [v.tolist() for v in batch.response_values(placed)] == [v.tolist() for v in values]
    assert float(placed[~batch.loss_mask.bool()].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="values for"):
        batch.place([v[:-1] if len(v) else v for v in values] if any(len(v) for v in values) else values[:-1])
