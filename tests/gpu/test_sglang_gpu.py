"""The SGLang engine with a real SGLang server on a tiny random Qwen2 (GPU image only; skipped without CUDA).

Generates, checks SGLang's per-token log-probs against an HF forward of the same weights, syncs
another model's weights colocated (CUDA-IPC payloads) and disaggregated (NCCL group), and checks
the served model changed to exactly the new weights (log-probs against the new model's forward).
"""
import pytest
import torch

from megatron_fipo.rollout.engine import GenerationRequest, SamplingParams
from tests.hf_tiny import tiny_hf_model


def _hf_logp(model, prompt, tokens):
    ids = torch.tensor([list(prompt) + list(tokens)], device="cuda")
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return lp[len(prompt) - 1:-1].gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0].cpu()


def _check(engine, model, atol):
    out = engine.generate([GenerationRequest((1, 5, 9, 2), SamplingParams(n=4, max_new_tokens=16, seed=3))])
    for s in out[0]:
        assert torch.allclose(torch.tensor(s.logprobs), _hf_logp(model, s.prompt_ids, s.token_ids), atol=atol)
    return out


@pytest.mark.gpu
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_real_sglang_generate_and_sync(tmp_path, mode):
    pytest.importorskip("sglang")
    from transformers import AutoModelForCausalLM

    from megatron_fipo.rollout.sglang_engine import SGLangEngine

    base = tiny_hf_model(str(tmp_path / "base"), seed=1, vocab_size=256)
    other = AutoModelForCausalLM.from_pretrained(tiny_hf_model(str(tmp_path / "other"), seed=2, vocab_size=256)).cuda()
    model = AutoModelForCausalLM.from_pretrained(base).cuda()
    args = {"dtype": "float32", "mem_fraction_static": 0.2, "enable_memory_saver": mode == "colocated",
            "disable_cuda_graph": True}
    with SGLangEngine(base, mode=mode, server_args=args, log_dir=str(tmp_path / "logs")) as engine:
        _check(engine, model, atol=1e-3)
        if mode == "colocated":
            engine.release()
            engine.resume()
        stream = [[(n, p.detach()) for n, p in other.named_parameters()]]
        engine.update_weights(iter(stream), version=1)
        out = _check(engine, other, atol=1e-3)
        assert all(s.weight_version == 1 for s in out[0])


@pytest.mark.gpu
@pytest.mark.timeout(1800)
def test_real_sglang_inflight_update_spans_and_ages(tmp_path):
    """In-flight update on a real server: long samples submitted through the streaming interface, a weight
    update (pause retract, session, flush, continue) while they run; each sample's spans must tile its
    tokens, the tokens after the update must be version 1, and their log-probs the new model's (the
    KV cache is recomputed after retract), the tokens before version 0 with the old model's."""
    pytest.importorskip("sglang")
    import time

    from transformers import AutoModelForCausalLM

    from megatron_fipo.rollout.sglang_engine import SGLangEngine

    shape = dict(vocab_size=256, max_position_embeddings=1024)
    base = tiny_hf_model(str(tmp_path / "base"), seed=1, **shape)
    other = AutoModelForCausalLM.from_pretrained(tiny_hf_model(str(tmp_path / "other"), seed=2, **shape)).cuda()
    model = AutoModelForCausalLM.from_pretrained(base).cuda()
    args = {"dtype": "float32", "mem_fraction_static": 0.2, "disable_cuda_graph": True}
    with SGLangEngine(base, mode="disaggregated", server_args=args, log_dir=str(tmp_path / "logs"),
                      inflight_updates=True) as engine:
        reqs = [GenerationRequest((1, 5, 9, 2 + i), SamplingParams(max_new_tokens=400, seed=10 + i)) for i in range(8)]
        futures = [engine.submit(r, 0, group=i) for i, r in enumerate(reqs)]
        time.sleep(0.5)
        engine.update_weights(iter([[(n, p.detach()) for n, p in other.named_parameters()]]), version=1)
        samples = [f.result(timeout=600) for f in futures]
    spanning = [s for s in samples if len(set(s.versions())) > 1]
    assert spanning, "no sample ran through the update (make max_new_tokens longer)"
    for s in samples:
        versions = s.versions()
        assert versions == sorted(versions) and set(versions) <= {0, 1}
        k = versions.index(1) if 1 in versions else len(versions)
        old = _hf_logp(model, s.prompt_ids, s.token_ids)[:k]
        new = _hf_logp(other, s.prompt_ids, s.token_ids)[k:]
        assert torch.allclose(torch.tensor(s.logprobs[:k]), old, atol=1e-3)
        assert torch.allclose(torch.tensor(s.logprobs[k:]), new, atol=1e-3)
