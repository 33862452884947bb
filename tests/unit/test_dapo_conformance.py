"""DAPO (the DAPO recipe's loss settings) against the released baseline's loss, in fp64.

The FIPO release's DAPO baseline is verl's vanilla policy loss: ratio ``r = exp(clamp(logp - old, -20,
20))``, DAPO clip ``[1 - 0.2, 1 + 0.28]``, dual clip ``c`` on negative advantages, token-mean over
ALL response tokens, nothing dropped. ``release_vanilla_loss`` below restates that with a Python
loop, one token at a time, and the tests take the loss settings from
``examples/qwen2.5-32b-dapo.yaml`` itself, so the recipe (and not only the function) is checked.
"""

import math
import os

import pytest
import torch

from megatron_fipo.algo.losses import fipo_policy_loss
from megatron_fipo.config.schema import load_config
from tests.helpers import fresh_seeds, random_cu_seqlens

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "qwen2.5-32b-dapo.yaml")


def dapo_settings() -> dict:
    return load_config(RECIPE).algo.loss_kwargs()


def release_vanilla_loss(logp, old_logp, adv, mask, *, eps_low=0.2, eps_high=0.28, c=10.0):
    """Token-mean over every response token of the dual-clipped DAPO surrogate (0 when there is none).

    Args: 1-D float64 tensors over tokens (``logp`` with grad); ``adv`` per token; ``mask`` bool.
    """
    total, count = torch.zeros((), dtype=torch.float64), 0
    for t in range(logp.shape[0]):
        if not bool(mask[t]):
            continue
        a = float(adv[t])
        ratio = torch.exp(torch.clamp(logp[t] - old_logp[t], -20.0, 20.0))
        clipped = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high))
        total = total + (torch.minimum(clipped, torch.tensor(-a * c, dtype=torch.float64)) if a < 0 else clipped)
        count += 1
    return total / count if count else total + 0.0 * logp.sum()


def _check(logp, old, adv_tokens, mask, ours):
    """Our loss (divided by the response-token count) and its gradient w.r.t. ``logp`` equal the reference's."""
    kw = dapo_settings()
    ref = release_vanilla_loss(logp.reshape(-1), old.reshape(-1), adv_tokens, mask.reshape(-1), eps_low=kw["clip_low"], eps_high=kw["clip_high"],
                               c=kw["dual_clip_c"])
    (ref_grad,) = torch.autograd.grad(ref, logp)
    out = ours(logp)
    loss = out.loss(max(int(mask.sum()), 1))  # the global token count; here one micro-batch holds everything
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert not bool(out.dropped_sequences.any())


def test_recipe_settings_are_the_release_baseline():
    kw = dapo_settings()
    assert (kw["use_influence"], kw["drop_filter"]) == (False, False)
    assert (kw["clip_low"], kw["clip_high"], kw["dual_clip_c"]) == (0.2, 0.28, 10.0)


def test_minimal_case_from_review():
    """A = -1, r = [12, 12, 1], c = 10: the release gives loss (10 + 10 + 1) / 3 = 7, gradient [0, 0, 1/3]."""
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.log(torch.tensor([[12.0, 12.0, 1.0]], dtype=torch.float64)).requires_grad_(True)
    out = fipo_policy_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 3), **dapo_settings())
    loss = out.loss(3)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == pytest.approx(7.0, rel=1e-14)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 1.0 / 3.0]], dtype=torch.float64), rtol=1e-14, atol=1e-15)
    assert out.dropped_sequences.tolist() == [False] and out.sums["kept_tokens"].item() == 3


def _random_tokens(gen, n):
    """Old log-probs and log-ratios with many tokens past the dual-clip threshold ``log 10`` (either way)."""
    old = -torch.rand(n, generator=gen, dtype=torch.float64) * 3.0
    delta = torch.randn(n, generator=gen, dtype=torch.float64) * 0.4
    spikes = torch.rand(n, generator=gen, dtype=torch.float64) < 0.25
    big = math.log(10.0) + torch.rand(n, generator=gen, dtype=torch.float64) * 3.0
    delta = torch.where(spikes, big * torch.where(torch.rand(n, generator=gen) < 0.8, 1.0, -1.0), delta)
    return old, old + delta


@pytest.mark.parametrize("seed", fresh_seeds(6, base=41))
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (4, 9), (2, 64)], ids=lambda s: "x".join(map(str, s)))
def test_padded_rows_match_the_release(seed, shape):
    rows, length = shape
    gen = torch.Generator().manual_seed(seed * 7 + rows * 100 + length)
    old, logp = (t.reshape(rows, length) for t in _random_tokens(gen, rows * length))
    lengths = torch.randint(0, length + 1, (rows,), generator=gen)
    lengths[0] = 0 if seed % 2 else lengths[0]  # an empty response row (or an all-empty batch)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    adv = torch.randn(rows, generator=gen, dtype=torch.float64) - 0.5  # mostly negative: the filter would fire
    adv[torch.rand(rows, generator=gen) < 0.2] = 0.0
    logp = logp.requires_grad_(True)
    _check(logp, old, adv.unsqueeze(1).expand(rows, length).reshape(-1), mask,
           lambda lp: fipo_policy_loss(lp, old, adv, mask.double(), **dapo_settings()))


@pytest.mark.parametrize("seed", fresh_seeds(6, base=42))
@pytest.mark.parametrize("num_seqs, max_len", [(1, 1), (5, 1), (6, 40)])
def test_packed_sequences_match_the_release(seed, num_seqs, max_len):
    gen = torch.Generator().manual_seed(seed * 13 + num_seqs * 100 + max_len)
    cu = random_cu_seqlens(gen, num_seqs, max_len, allow_empty=True)  # zero-length sequences too
    lengths = cu[1:] - cu[:-1]
    n = int(cu[-1])
    old, logp = _random_tokens(gen, n)
    prompt = torch.cat([torch.arange(int(l)) < int(torch.randint(0, int(l) + 1, (1,), generator=gen))
                        for l in lengths]) if n else torch.zeros(0, dtype=torch.bool)
    mask = ~prompt  # prompt tokens (and their log-probs) are in the pack but outside the loss
    adv = torch.randn(num_seqs, generator=gen, dtype=torch.float64) - 0.5
    logp = logp.requires_grad_(True)
    _check(logp, old, adv.repeat_interleave(lengths), mask,
           lambda lp: fipo_policy_loss(lp, old, adv, mask.double(), cu_seqlens=cu, **dapo_settings()))


def test_fipo_keeps_its_drop_filter():
    """The FIPO recipe still drops the review's sequence: the filter is a setting, on for FIPO."""
    fipo = load_config(os.path.join(os.path.dirname(RECIPE), "qwen2.5-32b-fipo.yaml")).algo.loss_kwargs()
    assert fipo["drop_filter"] is True
    logp = torch.log(torch.tensor([[12.0, 12.0, 1.0]], dtype=torch.float64)).requires_grad_(True)
    out = fipo_policy_loss(logp, torch.zeros(1, 3, dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64),
                           torch.ones(1, 3), **fipo)
    assert out.dropped_sequences.tolist() == [True] and out.loss(3).item() == 0.0
