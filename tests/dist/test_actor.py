"""The Megatron actor at several (tp, pp, dp, sp) layouts against a single-process (1, 1) run.

Two launches: the reference at world size 1, then every layout in one world-4 launch. The same
initial weights are copied into each layout (tests/dist/tiny_gpt.py), the same samples are split
over the data-parallel ranks, and micro-batch token budgets differ between runs: log-probs, the
policy-loss metrics, the grad norm and the parameters after two FIPO steps must all agree.
"""

import pytest
import torch

from tests.dist.launcher import launch
from tests.helpers import ACTOR_HF, ACTOR_LOSS, ACTOR_SETTINGS, actor_per_sample, actor_prepare, actor_samples

LAYOUTS = [  # (tp, pp, vpp, sequence_parallel, micro-batch token budget)
    (2, 1, None, False, 40),
    (1, 2, None, False, 64),
    (2, 2, None, False, 1000),
    (2, 1, None, True, 48),
    (2, 2, 2, True, 20),  # interleaved 1F1B + sequence parallel
    # interleaved at dp = 2: the second dp rank has num_microbatches == pp (all warm-up on the
    # first stage), which deadlocked gloo when shape sends were waited for (cpu_compat)
    (1, 2, 2, False, 20),
]


def _run(tp, pp, vpp, sp, budget, weights, tie=False, extra=None):
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch
    from tests.dist import tiny_gpt as T

    groups = G.init_distributed(tp=tp, pp=pp, vpp=vpp, seed=7)
    arch = Qwen2Arch.from_hf(dict(ACTOR_HF, tie_word_embeddings=tie))
    settings = dict(ACTOR_SETTINGS, sequence_parallel=sp, max_tokens_per_micro_batch=budget, **(extra or {}))
    actor = Actor(arch, groups, ActorSettings(**settings))
    initial = T.full_weights(actor.chunks) if weights is None else weights
    if weights is not None:
        T.load_full_weights(actor.chunks, weights, groups)
    prompts, responses = actor_samples()
    logp = actor.compute_logprobs(prompts, responses)
    mine = list(range(groups.dp_rank, len(prompts), groups.dp_size))
    prepared = actor_prepare(actor, prompts, responses, actor_per_sample(responses, [lp.detach() for lp in logp]), mine)
    steps = [actor.train_step(prepared, ACTOR_LOSS) for _ in range(2)]
    result = dict(logp=[lp.tolist() for lp in logp], steps=steps, initial=initial,
                  final=T.full_weights(actor.chunks) if groups.world_size == 1 else None, diff=None)
    return result, actor, groups


def run_reference(tie, extra=None):
    """One process, the reference (a launch worker; tests/gpu/test_actor_gpu.py runs it with bf16 settings)."""
    import torch.distributed as dist

    from megatron_fipo.mcore import groups as G

    result, _, _ = _run(1, 1, None, False, 30, None, tie, extra)
    G.destroy()
    assert not dist.is_initialized()
    return result


def run_layouts(weights, final, tie, extra=None):
    """Every layout of ``LAYOUTS`` on 4 processes (a launch worker; tests/gpu/test_actor_gpu.py runs it with bf16 settings)."""
    from megatron_fipo.mcore import groups as G
    from tests.dist import tiny_gpt as T

    out = []
    for layout in LAYOUTS:
        result, actor, groups = _run(*layout, weights, tie, extra)
        result["diff"] = T.max_weight_diff(actor.chunks, final, groups)
        result["initial"] = None
        out.append(result)
        G.destroy(process_group=False)
    G.destroy()
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_layouts_match_single_process(tie):
    (ref,) = launch(run_reference, 1, tie, timeout=240)
    results = launch(run_layouts, 4, ref["initial"], ref["final"], tie, timeout=480)
    for rank_results in results:
        for layout, got in zip(LAYOUTS, rank_results):
            for a, b in zip(got["logp"], ref["logp"]):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5, msg=str(layout))
            for step, (s, r) in enumerate(zip(got["steps"], ref["steps"])):
                for key in ("loss", "kept_tokens", "pg_clipfrac", "influence_weight_mean", "future_kl_mean",
                            "grad_norm", "update_norm", "entropy", "dropped_sequences"):
                    assert s[key] == pytest.approx(r[key], rel=1e-4, abs=1e-5), (layout, step, key)
            assert got["diff"] < 2e-5, (layout, got["diff"])
    # the run did something: FIPO weights moved and differ from 1 after the first step
    first, second = ref["steps"]
    assert first["update_norm"] > 0 and second["grad_norm"] > 0
    assert first["influence_weight_mean"] != 1.0



@pytest.mark.timeout(300)
def test_activation_recomputation_changes_nothing():
    recompute = {"recompute": {"recompute_granularity": "full", "recompute_method": "uniform",
                               "recompute_num_layers": 1}}
    (plain,) = launch(run_reference, 1, False, timeout=240)
    (ref,) = launch(run_reference, 1, False, recompute, timeout=240)
    for a, b in zip(ref["logp"], plain["logp"]):
        assert a == b
    for s, r in zip(ref["steps"], plain["steps"]):
        assert s["loss"] == r["loss"] and s["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-6)


def run_one(weights, extra):
    """The tiny actor at one process from ``weights`` (None: its own initialisation): log-probs, two FIPO steps."""
    from megatron_fipo.mcore import groups as G

    result, _, _ = _run(1, 1, None, False, 30, weights, False, extra)
    G.destroy()
    return result


def check_bf16_follows_fp32() -> None:
    """The actor in bf16 against fp32 from the same initial weights, on this machine's device (CPU or one GPU):
    log-probs within bf16 rounding, two kept steps with close losses and grad norms."""
    (fp32,) = launch(run_one, 1, None, None, timeout=300)
    (bf16,) = launch(run_one, 1, fp32["initial"], {"params_dtype": "bfloat16"}, timeout=300)
    for a, b in zip(bf16["logp"], fp32["logp"]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=5e-2)
    assert max(abs(x - y) for a, b in zip(bf16["logp"], fp32["logp"]) for x, y in zip(a, b)) > 0  # bf16 did run
    for s16, s32 in zip(bf16["steps"], fp32["steps"]):
        assert s16["skipped"] == 0.0
        assert s16["loss"] == pytest.approx(s32["loss"], rel=5e-2, abs=1e-2)
        assert s16["grad_norm"] == pytest.approx(s32["grad_norm"], rel=1e-1)


@pytest.mark.timeout(300)
def test_bf16_actor_on_cpu_follows_fp32():
    """bf16 parameters train on CPU (Megatron's distributed optimizer keeps the fp32 master weights there;
    its plain mixed-precision optimizer accepts only CUDA tensors): the GPU check's CPU substitute."""
    check_bf16_follows_fp32()
