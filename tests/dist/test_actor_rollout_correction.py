"""Actor.train_step with a rollout correction: the rollout log-probs kept by ``prepare`` reach the loss.

One process (gloo, world size 1), the tiny Qwen2 of the actor tests, a mini-batch whose rollout
log-probs differ from the old log-probs. From the same weights, a ``none`` step and a ``token_tis``
step report different losses, each equal to ``fipo_policy_loss`` on the policy's log-probs with the
same inputs; the correction's metrics appear only with the correction on.
"""

import pytest
import torch

from tests.dist.launcher import launch
from tests.helpers import ACTOR_HF, ACTOR_LOSS, ACTOR_SETTINGS, actor_per_sample, actor_samples


def _worker():
    from megatron_fipo.data.batches import MiniBatch
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch
    from tests.dist import tiny_gpt as T

    groups = G.init_distributed(tp=1, pp=1, seed=7)
    actor = Actor(Qwen2Arch.from_hf(ACTOR_HF), groups, ActorSettings(**ACTOR_SETTINGS, max_tokens_per_micro_batch=40))
    initial = T.full_weights(actor.chunks)
    prompts, responses = actor_samples(seed=3)
    logp = [lp.detach() for lp in actor.compute_logprobs(prompts, responses)]
    old, adv = actor_per_sample(responses, logp, seed=4)
    gen = torch.Generator().manual_seed(5)
    rollout = [o + 0.5 * torch.randn(len(o), generator=gen) for o in old]  # an engine a few versions behind
    out = {"logp": logp, "old": old, "adv": adv, "rollout": rollout}
    for mode in ("none", "token_tis"):
        T.load_full_weights(actor.chunks, initial, groups)  # both steps from the same weights
        prepared = actor.prepare(MiniBatch(prompts, responses, adv, rollout), old_logp=old)
        out[mode] = actor.train_step(prepared, dict(ACTOR_LOSS, rollout_correction=mode))
    G.destroy()
    return out


@pytest.mark.timeout(240)
def test_train_step_applies_the_correction_from_prepared_rollout_logp():
    from megatron_fipo.algo.losses import fipo_policy_loss, summarize_policy_metrics

    (res,) = launch(_worker, 1, timeout=200)
    lengths = [len(lp) for lp in res["logp"]]
    width = max(lengths)
    rows = lambda values: torch.stack([torch.nn.functional.pad(v.double(), (0, width - len(v))) for v in values])
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).double()
    want = {}
    for mode in ("none", "token_tis"):
        ref = fipo_policy_loss(rows(res["logp"]), rows(res["old"]), res["adv"].double(), mask,
                               rollout_logp=rows(res["rollout"]), rollout_correction=mode, **ACTOR_LOSS)
        want[mode] = summarize_policy_metrics(ref.sums, ref.maxes, ref.mins)
        want[mode]["loss"] = float(ref.loss())
        got = res[mode]
        for key, value in want[mode].items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (mode, key)
    assert set(res["token_tis"]) - set(res["none"]) == {"correction_weight_mean", "correction_masked_frac",
                                                         "correction_ratio_max"}
    assert abs(res["token_tis"]["loss"] - res["none"]["loss"]) > 1e-3  # the correction changed the loss
    assert 0 < want["token_tis"]["correction_weight_mean"] != 1
    for key in ("kept_tokens", "influence_weight_mean", "future_kl_mean", "pg_clipfrac"):  # the FIPO rule
        assert res["token_tis"][key] == res["none"][key], key
