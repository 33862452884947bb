"""rollout.cpu_engine against full forward passes of the same HF model."""
import pytest
import torch

from megatron_fipo.rollout.cpu_engine import CPUEngine
from megatron_fipo.rollout.engine import EngineError, GenerationRequest, SamplingParams
from tests.hf_tiny import tiny_hf_model


@pytest.fixture(scope="module", params=["untied", "tied"])
def hf(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    kw = dict(tie_word_embeddings=True, vocab_size=203) if request.param == "tied" else {}
    path = tiny_hf_model(str(tmp_path_factory.mktemp(request.param)), seed=3, **kw)
    return path, AutoModelForCausalLM.from_pretrained(path).eval()


def _full_logp(model, prompt, tokens, temperature=1.0):
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float() / temperature, -1)
    return lp[len(prompt) - 1:-1], lp[len(prompt) - 1:-1].gather(1, torch.tensor(tokens)[:, None])[:, 0]


def _requests(temperature=1.0, seed=0, **kw):
    lengths = (1, 5, 2, 9)
    return [GenerationRequest(tuple((7 * L + i) % 150 + 1 for i in range(L)),
                              SamplingParams(n=3, temperature=temperature, max_new_tokens=10, seed=seed + 100 * L, **kw))
            for L in lengths]


@pytest.mark.parametrize("temperature, kw", [(1.0, {}), (0.7, dict(top_p=0.8, top_k=30))])
def test_logprobs_equal_a_full_forward(hf, temperature, kw):
    path, model = hf
    out = CPUEngine(path, max_batch_rows=5).generate(_requests(temperature, **kw))
    assert [len(g) for g in out] == [3, 3, 3, 3]
    for ri, group in enumerate(out):
        for j, s in enumerate(group):
            assert (s.request_index, s.sample_index, s.weight_version) == (ri, j, 0)
            _, ref = _full_logp(model, s.prompt_ids, s.token_ids, temperature)
            assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-5), (ri, j)


def test_seeds_reproduce_independently_of_batch(hf):
    path, _ = hf
    eng = CPUEngine(path)
    reqs = _requests(seed=4)
    together = eng.generate(reqs)
    alone = eng.generate([reqs[2]])
    assert [s.token_ids for s in alone[0]] == [s.token_ids for s in together[2]]
    other = eng.generate(_requests(seed=5))
    assert [s.token_ids for g in other for s in g] != [s.token_ids for g in together for s in g]
    assert len({tuple(s.token_ids) for s in together[3]}) > 1  # samples of a request differ (seed + j)


def test_top_k_one_is_greedy_and_top_k_respected(hf):
    path, model = hf
    eng = CPUEngine(path)
    for s in [s for g in eng.generate(_requests(top_k=1)) for s in g]:
        full, _ = _full_logp(model, s.prompt_ids, s.token_ids)
        assert s.token_ids == full.argmax(-1).tolist()
    for s in [s for g in eng.generate(_requests(top_p=1e-6)) for s in g]:
        full, _ = _full_logp(model, s.prompt_ids, s.token_ids)
        assert s.token_ids == full.argmax(-1).tolist()
    for s in [s for g in eng.generate(_requests(top_k=3, seed=9)) for s in g]:
        full, _ = _full_logp(model, s.prompt_ids, s.token_ids)
        top3 = full.topk(3, dim=-1).indices
        assert all(t in top3[i].tolist() for i, t in enumerate(s.token_ids))


def test_stop_tokens_and_length(hf):
    path, _ = hf
    eng = CPUEngine(path)
    free = eng.generate(_requests(seed=1))
    stop = free[1][0].token_ids[3]  # a token this sample emits: it must end there
    out = eng.generate([GenerationRequest(free[1][0].prompt_ids, SamplingParams(
        n=3, max_new_tokens=10, seed=_requests(seed=1)[1].params.seed, stop_token_ids=(stop,)))])
    assert out[0][0].finish_reason == "stop" and out[0][0].token_ids == free[1][0].token_ids[:len(out[0][0].token_ids)]
    for s in out[0]:
        if stop in s.token_ids:
            assert s.finish_reason == "stop" and s.token_ids.index(stop) == len(s.token_ids) - 1
        else:
            assert s.finish_reason == "length" and len(s.token_ids) == 10
    assert any(s.finish_reason == "stop" for g in eng.generate(
        [GenerationRequest(r.prompt_ids, SamplingParams(n=3, max_new_tokens=10, seed=r.params.seed, stop_token_ids=(stop,)))
         for r in _requests(seed=1)]) for s in g)
    assert all(len(s.token_ids) == 10 and s.finish_reason == "length" for g in free for s in g)


def _stream_of(model, bucket_elems=3000):
    """The state dict of ``model`` in buckets that reuse one buffer (like the bridge)."""
    buffer = torch.empty(bucket_elems)
    bucket, used = [], 0
    for name, p in model.named_parameters():
        if used + p.numel() > bucket_elems and bucket:
            yield bucket
            buffer.fill_(float("nan"))  # the producer overwrites its buffer after the consumer is done
            bucket, used = [], 0
        if p.numel() > bucket_elems:
            bucket.append((name, p.detach().clone()))
        else:
            view = buffer[used:used + p.numel()].view(p.shape)
            view.copy_(p.detach())
            bucket.append((name, view))
            used += p.numel()
    if bucket:
        yield bucket


def test_update_weights_serves_the_new_model(hf, tmp_path):
    from transformers import AutoModelForCausalLM

    path, model = hf
    tied = model.config.tie_word_embeddings
    other_dir = tiny_hf_model(str(tmp_path / "other"), seed=11, **(dict(tie_word_embeddings=True, vocab_size=203)
                                                                   if tied else {}))
    other = AutoModelForCausalLM.from_pretrained(other_dir).eval()
    eng = CPUEngine(path)
    before = eng.generate(_requests(seed=2))
    eng.update_weights(_stream_of(other), version=7)
    after = eng.generate(_requests(seed=2))
    assert [s.token_ids for g in before for s in g] != [s.token_ids for g in after for s in g]
    for s in [s for g in after for s in g]:
        assert s.weight_version == 7
        _, ref = _full_logp(other, s.prompt_ids, s.token_ids)
        assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-5)


def test_bad_streams_are_rejected(hf):
    path, model = hf
    eng = CPUEngine(path)
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    for stream, match in [
        ([named[:-1]], "missing"),
        ([named + [("model.extra.weight", torch.zeros(1))]], "unknown"),
        ([named, named[:1]], "duplicated"),
        ([[(named[0][0], torch.zeros(3, 3))] + named[1:]], "shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            eng.update_weights(iter(stream), version=3)
        assert eng.weight_version == 0
        with pytest.raises(EngineError, match="failed part-way"):  # never samples from mixed weights
            eng.generate([GenerationRequest((1,), SamplingParams(max_new_tokens=2))])
        assert not eng.health()["ok"]
    eng.update_weights(iter([named]), version=4)
    assert eng.generate([GenerationRequest((1,), SamplingParams(max_new_tokens=2))])[0][0].weight_version == 4


def test_errors_and_lifecycle(hf):
    path, _ = hf
    eng = CPUEngine(path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.generate([GenerationRequest((10_000,))])
    with pytest.raises(ValueError, match="positions"):
        eng.generate([GenerationRequest((1,), SamplingParams(max_new_tokens=10_000))])
    for bad in (dict(n=0), dict(temperature=0), dict(top_p=0), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    eng.release()
    assert not eng.health()["ok"]
    with pytest.raises(EngineError, match="resume"):
        eng.generate([GenerationRequest((1,))])
    eng.resume()
    assert eng.health()["ok"]
    assert len(eng.generate([GenerationRequest((1,), SamplingParams(max_new_tokens=4))])[0][0].token_ids) <= 4
    with eng:
        pass
    eng.shutdown()
    with pytest.raises(EngineError, match="shut down"):
        eng.generate([GenerationRequest((1,))])
