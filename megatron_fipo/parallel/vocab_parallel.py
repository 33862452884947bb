"""Per-token log-probs and entropy over a vocabulary sharded across tensor-parallel ranks.

Owns ``vocab_parallel_logprobs`` (log-softmax of the label token from this rank's vocab shard
of the logits, with the normaliser all-reduced over the TP group; padded vocab rows excluded)
and ``chunked_token_logprobs`` (the output projection and that log-prob computed chunk by chunk
over tokens under activation checkpointing, so full-vocabulary fp32 logits never exist for the
whole packed batch: peak memory is one chunk's ``[chunk, V / tp]`` logits).

Imports torch and torch.distributed only; every collective takes an explicit ``group``.

Departs from Megatron's ``vocab_parallel_cross_entropy``: the padded vocabulary rows (Megatron
rounds the vocab up for TP divisibility) are masked out of the softmax, so log-probs equal the HF
model's and the rollout engine's, and the backward pass needs no collective.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogProb(torch.autograd.Function):
    """logp[i] = logits[i, label[i]] - logsumexp(logits[i, :real_vocab]) over all shards."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, real_vocab, group):
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))
        local_vocab = x.shape[-1]
        ids = torch.arange(vocab_start, vocab_start + local_vocab, device=x.device)
        x = x.masked_fill(ids >= real_vocab, float("-inf"))
        row_max = _all_reduce(x.max(dim=-1).values, dist.ReduceOp.MAX, group)
        shifted = x - row_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), dist.ReduceOp.SUM, group)
        local_label = labels - vocab_start
        owned = (local_label >= 0) & (local_label < local_vocab)
        picked = shifted.gather(-1, local_label.clamp(0, local_vocab - 1).unsqueeze(-1)).squeeze(-1)
        target = _all_reduce(torch.where(owned, picked, torch.zeros_like(picked)), dist.ReduceOp.SUM, group)
        probs = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(probs, local_label, owned)
        ctx.input_dtype = logits.dtype
        return target - sum_exp.log()

    @staticmethod
    def backward(ctx, grad):
        probs, local_label, owned = ctx.saved_tensors
        grad = grad.to(probs.dtype)
        grad_logits = probs * (-grad.unsqueeze(-1))
        rows = torch.nonzero(owned, as_tuple=True)[0]
        grad_logits[rows, local_label[rows]] += grad[rows]
        return grad_logits.to(ctx.input_dtype), None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    group: Optional[dist.ProcessGroup],
    with_entropy: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-prob of ``labels`` (and the entropy) from this rank's vocab shard of the logits.

    Args:
        logits: ``[N, V_local]`` this rank's columns ``[vocab_start, vocab_start + V_local)`` of
            the logits (any float dtype; computed in float32, or float64 for float64 input).
        labels: ``[N]`` int64 global token ids (< ``vocab_size``).
        vocab_start: first global vocab id of this shard.
        vocab_size: the real vocabulary size; ids at or above it (TP padding) are excluded.
        group: the tensor-parallel group (None or size 1: unsharded).
        with_entropy: also return the (no-grad) entropy of the distribution per token.

    Returns:
        ``(logp [N] with grad, entropy [N] or None)``, float32 (float64 for float64 logits).
    """
    logp = _VocabParallelLogProb.apply(logits, labels, vocab_start, vocab_size, group)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            x = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
            ids = torch.arange(vocab_start, vocab_start + x.shape[-1], device=x.device)
            x = x.masked_fill(ids >= vocab_size, float("-inf"))
            row_max = _all_reduce(x.max(dim=-1).values, dist.ReduceOp.MAX, group)
            shifted = x - row_max.unsqueeze(-1)
            exp = shifted.exp()
            stats = torch.stack([exp.sum(-1), torch.where(exp > 0, exp * shifted, torch.zeros_like(exp)).sum(-1)])
            _all_reduce(stats, dist.ReduceOp.SUM, group)
            entropy = stats[0].log() - stats[1] / stats[0]
    return logp, entropy


class _CopyToGroup(torch.autograd.Function):
    """Identity forward, gradient all-reduced over ``group`` backward (column-parallel input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        return _all_reduce(grad, dist.ReduceOp.SUM, ctx.group), None


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    group: Optional[dist.ProcessGroup],
    chunk_tokens: int = 4096,
    with_entropy: bool = False,
    reduce_hidden_grad: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Output projection + vocab-parallel log-probs, chunk by chunk over tokens.

    Each chunk's logits are recomputed in the backward pass (activation checkpointing), so the
    peak is one ``[chunk_tokens, V_local]`` float32 block, not the whole batch's logits.

    Args:
        hidden: ``[N, H]`` final hidden states, the full token range on every TP rank (gather a
            sequence-parallel shard first).
        weight: ``[V_local, H]`` this rank's rows of the output (or tied embedding) weight.
        labels: ``[N]`` global token ids.
        vocab_start: first global vocab id of this rank's rows.
        vocab_size: real vocabulary size (padded rows excluded from the softmax).
        group: tensor-parallel group; the gradient w.r.t. ``hidden`` is all-reduced over it.
        chunk_tokens: tokens per chunk (>= 1).
        with_entropy: also return the per-token entropy (no grad).
        reduce_hidden_grad: all-reduce the gradient w.r.t. ``hidden`` over ``group`` (a
            column-parallel input). Pass False when ``hidden`` came from a sequence-parallel
            all-gather whose backward already reduce-scatters.

    Returns:
        ``(logp [N], entropy [N] or None)``, float32 (float64 for float64 inputs).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} tokens but labels {labels.shape[0]}")
    if reduce_hidden_grad:
        hidden = _CopyToGroup.apply(hidden, group)

    def chunk_fn(h, w, y):
        logp, entropy = vocab_parallel_logprobs(h @ w.t(), y, vocab_start=vocab_start, vocab_size=vocab_size,
                                                group=group, with_entropy=with_entropy)
        return logp, entropy if with_entropy else logp.detach()[:0]

    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            logp, entropy = checkpoint(chunk_fn, h, weight, y, use_reentrant=False)
        else:
            logp, entropy = chunk_fn(h, weight, y)
        logps.append(logp)
        entropies.append(entropy)
    empty = hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
    logp = torch.cat(logps) if logps else empty
    if not with_entropy:
        return logp, None
    return logp, torch.cat(entropies) if entropies else empty
