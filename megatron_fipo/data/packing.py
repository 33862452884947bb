"""Packing rollouts into THD micro-batches, and dynamic micro-batching by token budget.

Owns ``pack_samples`` (concatenate prompt + response token sequences without padding, with
``cu_seqlens``, per-sequence position ids, next-token labels shifted *within* each sequence
before any sharding, and per-token training tensors placed at the label positions) and
``plan_micro_batches`` (split samples into micro-batches under a token budget, balanced, with a
fixed count when several ranks must agree on it).

Imports torch and the stdlib only: no torch.distributed, no megatron, no config objects.

Alignment contract: position ``p`` of a packed batch predicts ``labels[p]``, the token at
``p + 1`` of the same sequence; ``loss_mask[p]`` is 1 when that label is a response token.
A per-response-token value ``v[j]`` (for response token ``j``) is stored at the position that
predicts it, so the trainer's per-token log-probs, old log-probs and advantages line up with
no further shifting. The last position of each sequence has no label (mask 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import torch


@dataclass
class PackedBatch:
    """One packed (THD) micro-batch.

    Attributes:
        tokens: ``[N]`` int64 input ids, sequences concatenated.
        position_ids: ``[N]`` int64, restarting at 0 for each sequence.
        labels: ``[N]`` int64 next token within the sequence (0 on each sequence's last position).
        loss_mask: ``[N]`` float32, 1 where ``labels`` is a response token.
        cu_seqlens: ``[S + 1]`` int32 sequence offsets.
        sample_index: indices of the packed samples in the caller's list, in packing order.
        per_token: ``{name: [N] float32}`` per-response-token values at their label positions
            (zero elsewhere), e.g. ``old_logp``, ``advantages``.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    sample_index: List[int]
    per_token: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max()) if self.cu_seqlens.numel() > 1 else 0

    def place(self, per_sample: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-response-token values of the packed samples (``sample_index`` order) -> ``[N]`` float32
        at the positions that predict those tokens, zero elsewhere (the inverse of ``response_values``)."""
        out = torch.zeros(self.num_tokens, dtype=torch.float32)
        if len(per_sample) != len(self.sample_index):
            raise ValueError(f"{len(per_sample)} value lists for {len(self.sample_index)} packed samples")
        mask = self.loss_mask.bool()
        parts = [torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in per_sample]
        for s, part in enumerate(parts):
            lo, hi = int(self.cu_seqlens[s]), int(self.cu_seqlens[s + 1])
            if part.numel() != int(self.loss_mask[lo:hi].sum()):
                raise ValueError(f"sample {self.sample_index[s]}: {part.numel()} values for "
                                 f"{int(self.loss_mask[lo:hi].sum())} response tokens")
        out[mask] = torch.cat(parts) if parts else out[mask]
        return out

    def response_values(self, values: torch.Tensor) -> List[torch.Tensor]:
        """Split a ``[N]`` per-position tensor back into per-sample response-token tensors."""
        out = []
        for s in range(len(self.sample_index)):
            lo, hi = int(self.cu_seqlens[s]), int(self.cu_seqlens[s + 1])
            out.append(values[lo:hi][self.loss_mask[lo:hi].bool()])
        return out


def pack_samples(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    per_token: Optional[Mapping[str, Sequence[torch.Tensor]]] = None,
    *,
    indices: Optional[Sequence[int]] = None,
) -> PackedBatch:
    """Pack ``prompt + response`` token sequences into one THD batch.

    Args:
        prompts: token ids per sample (at least one token each).
        responses: response token ids per sample (may be empty).
        per_token: ``{name: [tensor of len(response_i) for each sample]}`` values per response
            token (old log-probs, advantages, rollout log-probs, ...).
        indices: which samples to pack, in order (default: all).

    Returns:
        PackedBatch (see the module docstring for the alignment contract).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    indices = list(range(len(prompts))) if indices is None else list(indices)
    per_token = dict(per_token or {})
    tokens, positions, labels, mask, lengths = [], [], [], [], []
    values: Dict[str, list] = {k: [] for k in per_token}
    for i in indices:
        p, r = torch.as_tensor(prompts[i], dtype=torch.int64), torch.as_tensor(responses[i], dtype=torch.int64)
        if p.numel() < 1:
            raise ValueError(f"sample {i}: the prompt must have at least one token")
        ids = torch.cat([p, r])
        n = ids.numel()
        tokens.append(ids)
        positions.append(torch.arange(n))
        labels.append(torch.cat([ids[1:], ids.new_zeros(1)]))
        m = torch.zeros(n, dtype=torch.float32)
        m[p.numel() - 1:n - 1] = 1.0
        mask.append(m)
        lengths.append(n)
        for name, seqs in per_token.items():
            v = torch.as_tensor(seqs[i], dtype=torch.float32).reshape(-1)
            if v.numel() != r.numel():
                raise ValueError(f"sample {i}: per_token[{name!r}] has {v.numel()} values for {r.numel()} response tokens")
            placed = torch.zeros(n, dtype=torch.float32)
            placed[p.numel() - 1:n - 1] = v
            values[name].append(placed)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)

    def cat(parts, dtype):
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)

    return PackedBatch(
        tokens=cat(tokens, torch.int64), position_ids=cat(positions, torch.int64),
        labels=cat(labels, torch.int64), loss_mask=cat(mask, torch.float32), cu_seqlens=cu,
        sample_index=indices, per_token={k: cat(v, torch.float32) for k, v in values.items()},
    )


def plan_micro_batches(
    lengths: Sequence[int], max_tokens: int, *, num_micro_batches: Optional[int] = None
) -> List[List[int]]:
    """Split samples into micro-batches of at most ``max_tokens`` tokens, balanced by tokens.

    Longest-first greedy: each sample goes to the micro-batch with the fewest tokens that still
    has room. With ``num_micro_batches`` unset the count is the smallest ``k >= ceil(total /
    max_tokens)`` for which this fits; set it to force a count (e.g. the maximum over
    data-parallel ranks, so every rank runs the same number of pipeline micro-batches).
    Micro-batches keep the samples' original order inside; an empty micro-batch can only occur
    when ``num_micro_batches`` exceeds the number of samples.

    Args:
        lengths: tokens per sample (prompt + response).
        max_tokens: token budget per micro-batch.
        num_micro_batches: force exactly this many micro-batches.

    Returns:
        ``[[sample indices], ...]``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"sample {i} has {n} tokens, more than the micro-batch budget max_tokens={max_tokens}: "
                         f"raise the budget to at least prompt + response length")
    if num_micro_batches is not None:
        if num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
        plan = _greedy(lengths, max_tokens, num_micro_batches)
        if plan is None:
            raise ValueError(f"{len(lengths)} samples ({sum(lengths)} tokens) do not fit in {num_micro_batches} "
                             f"micro-batches of {max_tokens} tokens")
        return plan
    k = max(1, -(-sum(lengths) // max_tokens))
    while True:
        plan = _greedy(lengths, max_tokens, k)
        if plan is not None:
            return plan
        k += 1


def _greedy(lengths: Sequence[int], max_tokens: int, k: int) -> Optional[List[List[int]]]:
    bins: List[List[int]] = [[] for _ in range(k)]
    load = [0] * k
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        fits = [b for b in range(k) if load[b] + lengths[i] <= max_tokens]
        if not fits:
            return None
        b = min(fits, key=lambda j: (load[j], j))
        bins[b].append(i)
        load[b] += lengths[i]
    return [sorted(b) for b in bins]
