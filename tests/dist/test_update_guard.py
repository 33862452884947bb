"""The non-finite update guard (mcore.update_guard) at tp=2 x dp=2: a poisoned step changes nothing, on every rank.

Only the last rank is poisoned (a NaN in its reduced gradient; an infinite lr in its optimizer),
so the other ranks see a healthy step and must still agree to skip or roll back. Parameters,
Adam moments, the Adam step count and the lr schedule must be bit-identical afterwards, both when
the optimizer has no state yet (first step) and when it has; a clean step afterwards still trains.
"""
import math

import pytest
import torch

from tests.dist.launcher import launch
from tests.helpers import ACTOR_HF, ACTOR_LOSS, ACTOR_SETTINGS, actor_per_sample, actor_prepare, actor_samples


def _state(actor):
    from megatron_fipo.mcore.update_guard import inner_optimizers

    params = {n: p.detach().clone() for n, p in actor.named_local_parameters()}
    opt = [{i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in o.state[p].items()}
            for i, p in enumerate(q for g in o.param_groups for q in g["params"]) if p in o.state}
           for o in inner_optimizers(actor.optimizer)]
    return params, opt, [g["lr"] for o in inner_optimizers(actor.optimizer) for g in o.param_groups], actor.steps


def _same(a, b) -> list:
    """Differences between two ``_state``s (empty when bit-identical)."""
    out = [n for n in a[0] if not torch.equal(a[0][n], b[0][n])]
    if [sorted(x) for x in a[1]] != [sorted(x) for x in b[1]]:
        out.append("optimizer state keys")
    else:
        for x, y in zip(a[1], b[1]):
            for i in x:
                out += [f"opt.{i}.{k}" for k in x[i] if not (torch.equal(x[i][k], y[i][k]) if
                                                               isinstance(x[i][k], torch.Tensor) else x[i][k] == y[i][k])]
    return out + (["lr"] if a[2] != b[2] else []) + (["steps"] if a[3] != b[3] else [])


def _poisoned_steps():
    from megatron_fipo.mcore import actor as actor_mod
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch
    from megatron_fipo.mcore.update_guard import inner_optimizers

    groups = G.init_distributed(tp=2, pp=1, seed=7)
    actor = Actor(Qwen2Arch.from_hf(ACTOR_HF), groups, ActorSettings(**ACTOR_SETTINGS))
    prompts, responses = actor_samples()
    per_sample = actor_per_sample(responses, [lp.detach() for lp in actor.compute_logprobs(prompts, responses)])
    mine = list(range(groups.dp_rank, len(prompts), groups.dp_size))
    batch = (actor_prepare(actor, prompts, responses, per_sample, mine), ACTOR_LOSS)
    real, poison = actor_mod.guarded_step, [None]

    def guarded_step(optimizer, params, *args):  # poisons the last rank after the gradient all-reduce
        groups_lr = [g for o in inner_optimizers(optimizer) for g in o.param_groups]
        saved = [g["lr"] for g in groups_lr]
        if groups.rank == groups.world_size - 1:
            if poison[0] == "grad":
                params[0].main_grad.view(-1)[0] = float("nan")
            elif poison[0] == "lr":
                for g in groups_lr:
                    g["lr"] = float("inf")
        try:
            return real(optimizer, params, *args)
        finally:
            for g, lr in zip(groups_lr, saved):
                g["lr"] = lr

    actor_mod.guarded_step = guarded_step
    out = {}
    for name, kind in [("lr_first", "lr"), ("clean", None), ("grad", "grad"), ("lr", "lr"), ("after", None)]:
        poison[0] = kind
        before = _state(actor)
        metrics = actor.train_step(*batch)
        after = _state(actor)
        out[name] = dict(diff=_same(before, after), metrics=metrics,
                         finite=not actor.nonfinite_tensors(optimizer_state=True))
    G.destroy()
    return out


@pytest.mark.timeout(600)
def test_poisoned_step_on_one_rank_leaves_every_rank_untouched():
    results = launch(_poisoned_steps, 4, timeout=540)
    for rank, out in enumerate(results):
        for name, flag in [("lr_first", "nonfinite_update"), ("grad", "nonfinite_grad"), ("lr", "nonfinite_update")]:
            got = out[name]
            assert got["diff"] == [], (rank, name, got["diff"][:5])
            assert got["metrics"]["skipped"] == 1.0 and got["metrics"][flag] == 1.0, (rank, name, got["metrics"])
            assert got["finite"], (rank, name)
        for name in ("clean", "after"):  # healthy steps still train
            got = out[name]
            assert got["metrics"]["skipped"] == 0.0 and got["finite"], (rank, name, got["metrics"])
            assert got["metrics"]["nonfinite_grad"] == got["metrics"]["nonfinite_update"] == 0.0
            assert len(got["diff"]) > 10 and math.isfinite(got["metrics"]["grad_norm"]), (rank, name)
