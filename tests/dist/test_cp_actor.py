"""The Megatron actor under context parallelism against a single-process (cp = 1) run.

A world-1 reference (tp = pp = cp = 1), then every CP layout in one world-4 launch, all with the
same initial weights (copied, tests/dist/tiny_gpt.py) and the same global batch (ragged samples,
some shorter than 2 * cp): log-probs (forward), the FIPO loss, its metrics and the gradient norm of
two optimizer steps, and the parameters after them (so the gradients) must agree. The (dp, cp)
factorisations (4, 1), (2, 2), (1, 4) of world size 4 show the loss and gradient are invariant to
how the batch is split over data- and context-parallel ranks; tp / pp / sequence parallelism are
combined with cp = 2 on top.

The trainer's token-balanced split (``Experience.split`` and ``shares``, long-tailed lengths, unequal sample
counts per rank) is checked the same way at dp = 2 (world 2) and dp = 2 x tp = 2, dp = 2 x cp = 2
(world 4).
"""

import pytest
import torch

from tests.dist.launcher import launch
from tests.helpers import (
    ACTOR_HF,
    ACTOR_LOSS,
    ACTOR_SETTINGS,
    actor_long_tailed,
    actor_per_sample,
    actor_prepare,
    actor_samples,
)

LAYOUTS = [  # (tp, pp, cp, sequence_parallel, micro-batch token budget)
    (1, 1, 1, False, 40),  # (dp, cp) = (4, 1)
    (1, 1, 2, False, 48),  # (2, 2)
    (1, 1, 4, False, 1000),  # (1, 4)
    (2, 1, 2, False, 64),  # tp x cp
    (2, 1, 2, True, 64),  # tp x cp with sequence parallelism (sequences padded to 2 * cp * tp)
    (1, 2, 2, False, 40),  # pp x cp (1F1B, variable lengths)
]
# Adam with a large eps makes the first update nearly linear in the gradient (lr * g / (|g| + eps)), so
# the parameters after the steps compare the gradients themselves, not just their signs.
SETTINGS = dict(ACTOR_SETTINGS, lr=0.05, adam_eps=1.0)
STEP_KEYS = ("loss", "kept_tokens", "response_tokens", "pg_clipfrac", "influence_weight_mean", "future_kl_mean",
             "grad_norm", "update_norm", "entropy", "dropped_sequences", "ppo_kl")


# the balanced split of actor_long_tailed(): (tp, pp, cp, sp, budget) per world size, dp = 2 in each
BALANCED_LAYOUTS = {2: [(1, 1, 1, False, 240)], 4: [(2, 1, 1, False, 400), (1, 1, 2, False, 240)]}


def _run(tp, pp, cp, sp, budget, weights, extra=None, balanced=False):
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch
    from tests.dist import tiny_gpt as T

    extra = dict(extra or {})
    use_te = extra.pop("use_te", None)  # an Actor argument (the GPU tests force the local spec with it)
    groups = G.init_distributed(tp=tp, pp=pp, cp=cp, seed=7)
    actor = Actor(Qwen2Arch.from_hf(ACTOR_HF), groups,
                  ActorSettings(**ACTOR_SETTINGS, sequence_parallel=sp, max_tokens_per_micro_batch=budget, **extra),
                  use_te=use_te)
    initial = T.full_weights(actor.chunks) if weights is None else None
    if weights is not None:
        T.load_full_weights(actor.chunks, weights, groups)
    if balanced:  # the trainer's split: Experience.split on the costs at the model's hidden size
        exp = actor_long_tailed()
        logp = actor.compute_logprobs(exp.prompts, exp.responses)
        exp.rollout_logp, exp.advantages = actor_per_sample(exp.responses, [lp.detach() for lp in logp])
        split = exp.split(exp.num_groups, groups.dp_size, costs=exp.costs(ACTOR_HF["hidden_size"]))
        (mb,) = exp.shares(split, groups.dp_size)[groups.dp_rank].mini_batches
        prepared, local = actor.prepare(mb, old_logp=mb.rollout_logp), len(mb)
    else:
        prompts, responses = actor_samples(seed=3, n=8)
        logp = actor.compute_logprobs(prompts, responses)
        mine = list(range(groups.dp_rank, len(prompts), groups.dp_size))
        prepared = actor_prepare(actor, prompts, responses, actor_per_sample(responses, [lp.detach() for lp in logp]),
                                 mine)
        local = len(mine)
    steps = [actor.train_step(prepared, ACTOR_LOSS) for _ in range(2)]
    return dict(logp=[lp.tolist() for lp in logp], steps=steps, initial=initial, samples=local), actor, groups


def run_reference(extra=None, balanced=False):
    """One process, the reference (a launch worker; tests/gpu/test_cp_gpu.py runs it with bf16 settings)."""
    from megatron_fipo.mcore import groups as G
    from tests.dist import tiny_gpt as T

    result, actor, _ = _run(1, 1, 1, False, 240 if balanced else 30, None, extra, balanced)
    result["final"] = T.full_weights(actor.chunks)
    G.destroy()
    return result


def run_layouts(weights, final, extra=None, layouts=None, balanced=False):
    """Every layout of ``layouts`` (default ``LAYOUTS``, on 4 processes) in one launch (a launch worker;
    tests/gpu/test_cp_gpu.py runs it with bf16 settings); ``balanced``: on the trainer's split."""
    from megatron_fipo.mcore import groups as G
    from tests.dist import tiny_gpt as T

    out = []
    for layout in layouts or LAYOUTS:
        result, actor, groups = _run(*layout, weights, extra, balanced)
        result["diff"] = T.max_weight_diff(actor.chunks, final, groups)
        out.append(result)
        G.destroy(process_group=False)
    G.destroy()
    return out


@pytest.mark.timeout(900)
def test_cp_layouts_match_single_process():
    (ref,) = launch(run_reference, 1, timeout=240)
    results = launch(run_layouts, 4, ref["initial"], ref["final"], timeout=800)
    for rank, rank_results in enumerate(results):
        for layout, got in zip(LAYOUTS, rank_results):
            for a, b in zip(got["logp"], ref["logp"]):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5, msg=str(layout))
            for step, (s, r) in enumerate(zip(got["steps"], ref["steps"])):
                for key in STEP_KEYS:
                    assert s[key] == pytest.approx(r[key], rel=1e-4, abs=1e-5), (layout, rank, step, key)
            assert got["diff"] < 2e-5, (layout, rank, got["diff"])
    first, second = ref["steps"]
    assert first["update_norm"] > 0 and second["grad_norm"] > 0 and second["influence_weight_mean"] != 1.0


@pytest.mark.timeout(900)
def test_balanced_split_matches_single_process():
    """The trainer's token-balanced split (uneven sample counts per rank) leaves the loss, the grad norm and
    the updated weights those of one process, at dp = 2 alone and with tp = 2 or cp = 2."""
    exp = actor_long_tailed()
    split = exp.split(exp.num_groups, 2, costs=exp.costs(ACTOR_HF["hidden_size"]))
    assert split != exp.split(exp.num_groups, 2)
    counts = sorted(len(part) for part in split[0])
    assert counts[0] < counts[1]  # a rank holding a long sample gets fewer samples
    (ref,) = launch(run_reference, 1, None, True, timeout=240)
    for world, layouts in BALANCED_LAYOUTS.items():
        results = launch(run_layouts, world, ref["initial"], ref["final"], None, layouts, True, timeout=600)
        for rank, rank_results in enumerate(results):
            for layout, got in zip(layouts, rank_results):
                for a, b in zip(got["logp"], ref["logp"]):
                    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5, msg=str(layout))
                for step, (s, r) in enumerate(zip(got["steps"], ref["steps"])):
                    for key in STEP_KEYS:
                        assert s[key] == pytest.approx(r[key], rel=1e-4, abs=1e-5), (world, layout, rank, step, key)
                assert got["diff"] < 2e-5, (world, layout, rank, got["diff"])
        assert {got["samples"] for rank_results in results for got in rank_results} == set(counts)
    first, second = ref["steps"]
    assert first["update_norm"] > 0 and second["grad_norm"] > 0 and second["influence_weight_mean"] != 1.0
