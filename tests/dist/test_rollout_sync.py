"""The correctness gate: after a weight sync the CPU engine's log-probs equal the Megatron actor's (fp32, 1e-5).

An ``Actor`` at (tp, pp) in {(1, 1), (2, 1), (1, 2)} loads a tiny random HF Qwen2 (tied and untied),
takes one FIPO optimizer step (so its weights differ from the HF files the engine started from),
and streams its weights to a ``CPUEngine`` on rank 0: through the trainer's ``Run.sync_weights`` and
directly through ``export_hf_state`` with small buckets in one reused buffer. The engine then
samples responses; the actor's ``compute_logprobs`` on the same tokens must match the engine's
per-token log-probs within 1e-5, and the mismatch metrics must report it. Before the sync the
engine must disagree (the test can fail).
"""
import random
import types

import pytest
import torch

from tests.dist.launcher import launch
from tests.hf_tiny import tiny_hf_model


def _check(hf_dir, tp, pp):
    import torch.distributed as dist

    from megatron_fipo.algo.mismatch import logprob_mismatch_sums, summarize_mismatch
    from megatron_fipo.bridge.hf_export import export_hf_state
    from megatron_fipo.bridge.hf_import import load_hf_into_chunks
    from megatron_fipo.config.schema import load_config
    from megatron_fipo.data.batches import MiniBatch
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch
    from megatron_fipo.rollout.cpu_engine import CPUEngine
    from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams
    from megatron_fipo.train.run import Run
    from megatron_fipo.train.weight_sync import WeightSync

    groups = G.init_distributed(tp=tp, pp=pp, seed=3)
    arch = Qwen2Arch.from_hf(hf_dir)
    actor = Actor(arch, groups, ActorSettings(lr=1e-2, warmup_steps=0, max_tokens_per_micro_batch=64))
    offsets, _ = actor.bridge_layout()
    load_hf_into_chunks(hf_dir, actor.named_local_parameters(), arch, tp_rank=groups.tp_rank, tp_size=groups.tp_size,
                        padded_vocab=actor.padded_vocab, layer_offsets=offsets)
    rng = random.Random(0)
    prompts = [[rng.randrange(arch.vocab_size) for _ in range(rng.randint(1, 5))] for _ in range(4)]
    responses = [[rng.randrange(arch.vocab_size) for _ in range(rng.randint(1, 8))] for _ in range(4)]
    old = actor.compute_logprobs(prompts, responses)
    adv = torch.tensor([1.0 if i % 2 else -1.0 for i in range(len(responses))])
    actor.train_step(actor.prepare(MiniBatch(prompts, responses, adv, old)), {})
    engine = CPUEngine(hf_dir) if groups.rank == 0 else None
    requests = [GenerationRequest(tuple(p), SamplingParams(n=2, max_new_tokens=6, seed=11)) for p in prompts]

    def sample_and_compare():
        out = [None]
        if engine is not None:
            out[0] = engine.generate(requests)
        dist.broadcast_object_list(out, src=0)
        flat = [s for g in out[0] for s in g]
        logp = actor.compute_logprobs([list(s.prompt_ids) for s in flat], [s.token_ids for s in flat])
        mine, theirs = torch.cat(logp), torch.cat([torch.tensor(s.logprobs) for s in flat])
        return float((mine - theirs).abs().max()), summarize_mismatch(logprob_mismatch_sums(mine, theirs)), \
            {s.weight_version for s in flat}

    before = sample_and_compare()
    cfg = load_config(None, ["rollout.bucket_mb=1"])
    sync = WeightSync(actor, groups, arch, {}, params_dtype="float32", bucket_mb=cfg.rollout.bucket_mb)
    services = types.SimpleNamespace(engine=engine) if engine is not None else None
    run = Run(cfg, groups, actor, sync, "(none)", services=services)
    run.sync_weights(version=1)  # the trainer's path: the non-finite check, then the bucket stream
    assert sync.version == 1
    after_trainer_sync = sample_and_compare()
    # again through small buckets that reuse one buffer (the producer overwrites it after each bucket)
    buffer = torch.empty((16 << 10) // 4)
    stream = export_hf_state(actor.named_local_parameters(), arch, groups=groups, layer_offsets=offsets,
                             dtype=torch.float32, bucket_bytes=16 << 10, reuse_buffer=buffer)
    if engine is not None:
        engine.update_weights(stream, 2)
    else:
        for _ in stream:
            pass
    after_small_buckets = sample_and_compare()
    if engine is not None:
        engine.shutdown()
    G.destroy()
    return before, after_trainer_sync, after_small_buckets


@pytest.mark.parametrize("tied", [False, True])
def test_engine_matches_actor_after_sync(tmp_path, tied):
    hf_dir = tiny_hf_model(str(tmp_path / "hf"), seed=5, tie_word_embeddings=tied, vocab_size=203 if tied else 201)
    for tp, pp, world in [(1, 1, 1), (2, 1, 2), (1, 2, 2)]:
        results = launch(_check, world, hf_dir, tp, pp, timeout=300)
        before, synced, small = results[0]
        assert before[0] > 1e-3, "the optimizer step should have moved the actor away from the HF weights"
        assert before[1]["rollout/token_mult_prob_error"] > 1.0
        for max_diff, metrics, versions in (synced, small):
            assert max_diff < 1e-5, (tp, pp, max_diff)
            assert metrics["rollout/logprob_abs_diff"] < 1e-5
            assert metrics["rollout/token_mult_prob_error"] == pytest.approx(1.0, abs=1e-5)
        assert synced[2] == {1} and small[2] == {2}
        assert all(r == results[0] for r in results)  # every rank compared the same samples
