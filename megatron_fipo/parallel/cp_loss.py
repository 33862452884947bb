"""The FIPO policy loss on one context-parallel rank's tokens, with nothing gathered.

Owns ``CPSequenceIndex`` (the ``algo.losses.SequenceIndex`` of a CP rank: per-sequence counts and
sums all-reduced over the CP group, the Future-KL scan done by ``parallel.cp_scan.future_kl_cp``,
sequence metrics counted once, on CP rank 0) and ``cp_policy_loss``.

Each CP rank computes the per-token loss of the tokens it owns. The only cross-rank quantities of
the FIPO loss are Future-KL (a distributed scan exchanging ``2 * cp`` scalars per sequence) and the
drop filter's per-sequence count of dual-clipped negative tokens (one all-reduce of ``S`` integers),
so every rank reaches the same drop decision for a sequence. With ``drop_filter=False`` (DAPO, GRPO)
nothing is counted and that all-reduce is skipped on every rank of the group alike. The sequence-level
rollout corrections (``seq_tis``, ``seq_mis``, ``geo_mis``) add one all-reduce of ``2 S`` floats (each
sequence's summed log ratio and response-token count), on every rank of the group alike; the
token-level ones and ``"none"`` add nothing. The caller divides the local loss sum
by the kept-token count summed over the data- and context-parallel ranks (Megatron's
``finalize_model_grads`` does with ``calculate_per_token_loss``), so loss and gradients do not
depend on how the batch is split over (dp, cp). Peers instead all-gather the log-probs of whole
sequences to every CP rank and compute the loss redundantly there.

Imports torch, torch.distributed and algo / parallel modules; every collective takes an explicit group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_fipo.algo.losses import PolicyLossOutput, SequenceIndex, fipo_policy_loss
from megatron_fipo.parallel.cp_layout import CPLayout
from megatron_fipo.parallel.cp_scan import future_kl_cp


class CPSequenceIndex(SequenceIndex):
    """Sequences of a packed micro-batch spread over a CP group, seen from one rank.

    Args:
        layout: the micro-batch's ``CPLayout`` for this rank.
        group: the context-parallel process group (None only when ``layout.cp == 1``).
        device: where index tensors live.
    """

    def __init__(self, layout: CPLayout, group: Optional[dist.ProcessGroup], device):
        self.layout, self.group = layout, group
        self.packed = True
        self.cu_seqlens = None
        self.num_sequences = layout.num_sequences
        self.ids = layout.local_sequence_ids.to(device)

    def count(self, flags: torch.Tensor) -> torch.Tensor:
        """Flags per sequence over all CP ranks (one all-reduce of ``S`` int64)."""
        counts = super().count(flags)
        if self.layout.cp > 1:
            dist.all_reduce(counts, group=self.group)
        return counts

    def sum_per_sequence(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence float64 sums over all CP ranks (one all-reduce of ``S`` (x ``K``) floats)."""
        totals = super().sum_per_sequence(values)
        if self.layout.cp > 1:
            dist.all_reduce(totals, group=self.group)
        return totals

    def suffix_sum(self, signal: torch.Tensor, gamma: float) -> torch.Tensor:
        return future_kl_cp(signal, gamma, self.layout, self.group)

    def sequence_total(self, per_seq: torch.Tensor) -> torch.Tensor:
        """Counted on CP rank 0 only, so a SUM over the data- and context-parallel ranks counts a sequence once."""
        total = per_seq.sum(dtype=torch.float64)
        return total if self.layout.rank == 0 else torch.zeros_like(total)


def cp_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    layout: CPLayout,
    group: Optional[dist.ProcessGroup],
    **loss_kwargs,
) -> PolicyLossOutput:
    """``algo.losses.fipo_policy_loss`` on this CP rank's local tokens.

    Denominator: none applied here; divide ``per_token_loss.sum()`` by ``sums["kept_tokens"]``
    all-reduced over micro-batches and the data x context-parallel ranks. Metric sums reduce with
    SUM over those ranks (``sequences`` / ``dropped_sequences`` are counted on CP rank 0 only),
    extremes with MAX / MIN.

    Args:
        logp, old_logp, advantages, response_mask: ``[layout.num_local_tokens]`` this rank's
            tokens in the layout's local order (``layout.shard`` of the full packed tensors;
            zero mask on padding).
        layout: the micro-batch's CP layout for this rank.
        group: the context-parallel group.
        **loss_kwargs: the settings of ``fipo_policy_loss`` (decay_rate, clips, ...).

    Returns:
        PolicyLossOutput over the local tokens; ``dropped_sequences`` is ``[S]`` and equal on
        every rank of the CP group.
    """
    if logp.dim() != 1 or logp.shape[0] != layout.num_local_tokens:
        raise ValueError(f"expected this rank's [{layout.num_local_tokens}] local tokens, got {tuple(logp.shape)}")
    if "cu_seqlens" in loss_kwargs or "sequences" in loss_kwargs:
        raise ValueError("cp_policy_loss takes its sequences from the layout; do not pass cu_seqlens / sequences")
    return fipo_policy_loss(logp, old_logp, advantages, response_mask,
                            sequences=CPSequenceIndex(layout, group, logp.device), **loss_kwargs)
