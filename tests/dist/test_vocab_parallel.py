"""Vocab-parallel log-probs / entropy at tp = 2 and 3 (gloo) against a single-process log_softmax."""

import pytest
import torch

from megatron_fipo.parallel.vocab_parallel import chunked_token_logprobs, vocab_parallel_logprobs
from tests.dist.launcher import launch

# (seed, tokens, hidden, real vocab, chunk): the last rank's shard is all padding in some cases
CASES = [(0, 37, 8, 50, 16), (1, 1, 4, 7, 4), (2, 64, 16, 129, 64), (3, 10, 8, 30, 3), (4, 0, 8, 30, 4)]


def _case(seed, tokens, hidden, vocab, world):
    gen = torch.Generator().manual_seed(seed)
    local = -(-vocab // world) + (seed % 2) * 8  # sometimes more padding than one shard holds
    h = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(local * world, hidden, generator=gen, dtype=torch.float64)
    y = torch.randint(0, vocab, (tokens,), generator=gen)
    g = torch.randn(tokens, generator=gen, dtype=torch.float64)
    return h, w, y, g, local


def reference(seed, tokens, hidden, vocab, world):
    h, w, y, g, local = _case(seed, tokens, hidden, vocab, world)
    h.requires_grad_(True)
    w.requires_grad_(True)
    logits = h @ w[:vocab].t()
    logsm = torch.log_softmax(logits, -1)
    logp = logsm.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    if tokens:
        (logp * g).sum().backward()
        return logp.detach(), entropy.detach(), h.grad, w.grad
    return logp.detach(), entropy.detach(), torch.zeros_like(h), torch.zeros_like(w)


def _worker(cases):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    out = []
    for seed, tokens, hidden, vocab, chunk in cases:
        h, w, y, g, local = _case(seed, tokens, hidden, vocab, world)
        h.requires_grad_(True)
        shard = w[rank * local:(rank + 1) * local].clone().requires_grad_(True)
        logp, entropy = chunked_token_logprobs(h, shard, y, vocab_start=rank * local, vocab_size=vocab,
                                               group=group, chunk_tokens=chunk, with_entropy=True)
        if tokens:
            (logp * g).sum().backward()
        out.append((logp.detach(), entropy, h.grad if tokens else torch.zeros_like(h),
                    shard.grad if tokens else torch.zeros_like(shard)))
    dist.destroy_process_group()
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3])
def test_tp_sharded_logprobs_match_full_softmax(world):
    results = launch(_worker, world, CASES, timeout=180)
    for i, (seed, tokens, hidden, vocab, _chunk) in enumerate(CASES):
        ref_logp, ref_ent, ref_hgrad, ref_wgrad = reference(seed, tokens, hidden, vocab, world)
        local = -(-vocab // world) + (seed % 2) * 8
        for rank, per_case in enumerate(results):
            logp, entropy, hgrad, wgrad = per_case[i]
            torch.testing.assert_close(logp, ref_logp, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(entropy, ref_ent, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(hgrad, ref_hgrad, rtol=1e-12, atol=1e-12)
            rows = ref_wgrad[rank * local:(rank + 1) * local]
            torch.testing.assert_close(wgrad, rows, rtol=1e-12, atol=1e-12)
            assert torch.all(wgrad[max(0, vocab - rank * local):] == 0)  # padded rows get no gradient


def test_single_process_matches_log_softmax_for_any_chunking():
    for seed, tokens, hidden, vocab, chunk in CASES:
        ref_logp, ref_ent, ref_hgrad, ref_wgrad = reference(seed, tokens, hidden, vocab, 1)
        h, w, y, g, _ = _case(seed, tokens, hidden, vocab, 1)
        h.requires_grad_(True)
        w.requires_grad_(True)
        for size in (1, chunk, 1000):
            logp, entropy = chunked_token_logprobs(h, w, y, vocab_start=0, vocab_size=vocab, group=None,
                                                   chunk_tokens=size, with_entropy=True)
            torch.testing.assert_close(logp.detach(), ref_logp, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(entropy, ref_ent, rtol=1e-12, atol=1e-12)
            if tokens:
                hg, wg = torch.autograd.grad((logp * g).sum(), (h, w))
                torch.testing.assert_close(hg, ref_hgrad, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(wg[:vocab], ref_wgrad[:vocab], rtol=1e-12, atol=1e-12)


def test_bf16_logits_compute_in_fp32_and_no_grad_path():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 11, generator=gen).bfloat16()
    y = torch.randint(0, 11, (5,), generator=gen)
    logp, entropy = vocab_parallel_logprobs(logits, y, vocab_start=0, vocab_size=11, group=None, with_entropy=True)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, y[:, None]).squeeze(-1)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref)
    with torch.no_grad():
        h = torch.randn(4, 3, generator=gen)
        logp, entropy = chunked_token_logprobs(h, torch.randn(6, 3, generator=gen), torch.tensor([0, 1, 2, 3]),
                                               vocab_start=0, vocab_size=6, group=None, chunk_tokens=3)
        assert entropy is None and logp.shape == (4,) and not logp.requires_grad
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_token_logprobs(h, h, y[:4], vocab_start=0, vocab_size=3, group=None, chunk_tokens=0)
