"""A model initialised once at (1, 1), saved, and loaded by the actor at other layouts.

The reference saves its freshly initialised actor (and, after one FIPO step, a second checkpoint);
every layout loads the checkpoint through ``Actor.load`` (dist_checkpointing reshards) and must
give the same per-token log-probs, and the same next step as the uninterrupted reference.
"""

import pytest
import torch

from tests.dist.launcher import launch
from tests.helpers import ACTOR_HF, ACTOR_LOSS, ACTOR_SETTINGS, actor_per_sample, actor_prepare, actor_samples

LAYOUTS = [(2, 1, None, False), (1, 2, None, False), (2, 2, None, False), (2, 1, None, True)]


def _actor(tp, pp, vpp, sp, extra=None):
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch

    groups = G.init_distributed(tp=tp, pp=pp, vpp=vpp, seed=11)
    settings = dict(ACTOR_SETTINGS, sequence_parallel=sp, max_tokens_per_micro_batch=64, **(extra or {}))
    return Actor(Qwen2Arch.from_hf(ACTOR_HF), groups, ActorSettings(**settings)), groups


def run_reference(root, extra=None):
    """One process, the reference (a launch worker; tests/gpu/test_actor_gpu.py runs it with bf16 settings)."""
    from megatron_fipo.mcore import groups as G

    actor, _ = _actor(1, 1, None, False, extra)
    prompts, responses = actor_samples()
    actor.save(root + "/init")
    logp = actor.compute_logprobs(prompts, responses)
    prepared = actor_prepare(actor, prompts, responses, actor_per_sample(responses, logp), list(range(len(prompts))))
    actor.train_step(prepared, ACTOR_LOSS)
    actor.save(root + "/step1", extra={"note": "after one step"})
    second = actor.train_step(prepared, ACTOR_LOSS)
    after = actor.compute_logprobs(prompts, responses)
    G.destroy()
    return [lp.tolist() for lp in logp], second, [lp.tolist() for lp in after]


def run_layouts(root, reference_logp, extra=None):
    """Every layout of ``LAYOUTS`` on 4 processes (a launch worker; tests/gpu/test_actor_gpu.py runs it with bf16 settings)."""
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.checkpoint import latest_checkpoint

    prompts, responses = actor_samples()
    per_sample = actor_per_sample(responses, [torch.tensor(lp) for lp in reference_logp])
    out = []
    for layout in LAYOUTS:
        actor, groups = _actor(*layout, extra)
        actor.load(latest_checkpoint(root + "/init"), load_optimizer=False)
        logp = actor.compute_logprobs(prompts, responses)
        saved_extra = actor.load(latest_checkpoint(root + "/step1"))
        mine = list(range(groups.dp_rank, len(prompts), groups.dp_size))
        second = actor.train_step(actor_prepare(actor, prompts, responses, per_sample, mine), ACTOR_LOSS)
        after = actor.compute_logprobs(prompts, responses)
        out.append(([lp.tolist() for lp in logp], second, [lp.tolist() for lp in after], saved_extra, actor.steps))
        G.destroy(process_group=False)
    G.destroy()
    return out


@pytest.mark.timeout(600)
def test_checkpoint_loads_at_other_layouts_and_resumes(tmp_path):
    root = str(tmp_path)
    (ref,) = launch(run_reference, 1, root, timeout=240)
    ref_logp, ref_second, ref_after = ref
    results = launch(run_layouts, 4, root, ref_logp, timeout=480)
    for rank_results in results:
        for layout, (logp, second, after, extra, steps) in zip(LAYOUTS, rank_results):
            for a, b in zip(logp, ref_logp):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5, msg=str(layout))
            assert extra == {"note": "after one step"} and steps == 2, layout
            for key in ("loss", "grad_norm", "kept_tokens", "influence_weight_mean", "lr"):
                assert second[key] == pytest.approx(ref_second[key], rel=1e-4, abs=1e-6), (layout, key)
            for a, b in zip(after, ref_after):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=2e-5, msg=str(layout))
