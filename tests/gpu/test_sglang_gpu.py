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
