"""The context-parallel Future-KL scan: FIPO's discounted suffix sum over sequences split across CP ranks.

Owns ``future_kl_cp``. Under Megatron's load-balanced layout (``parallel.cp_layout``) a rank holds
chunks ``r`` and ``2cp - 1 - r`` of every sequence, so a token's future spans every rank. The
recurrence ``F_t = D_t + gamma * F_{t+1}`` composes over chunks: a chunk's values are its local
scan plus ``gamma^(distance to its end + 1) * carry``, where the carry is the discounted total of
all later chunks. So each rank (a) scans its two chunks per sequence locally
(``algo.future_kl.discounted_suffix_sum``), (b) all-gathers every chunk's discounted total over the
CP group: ``2`` scalars per sequence from each rank, ``2 * cp`` per sequence in all (chunk lengths
are known from the layout), and (c) folds the totals of the later chunks into each chunk's carry
(``chunk_carries``, ``add_carry``). Peers all-gather the per-token log-ratios of whole sequences
instead (``T`` values per sequence).

Imports torch, torch.distributed and algo/parallel modules only; the one collective takes an
explicit ``group``. Runs under ``no_grad`` (Future-KL is stop-grad in FIPO).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_fipo.algo.future_kl import add_carry, chunk_carries, discounted_suffix_sum
from megatron_fipo.parallel.cp_layout import CPLayout


def future_kl_cp(signal: torch.Tensor, gamma: float, layout: CPLayout,
                 group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """``F_t = sum_{k >= t} gamma^(k - t) * D_k`` within each sequence, for this rank's tokens.

    Equals ``discounted_suffix_sum(D_full, gamma, cu_seqlens=layout.cu_seqlens)`` sharded with
    ``layout.shard`` (exact in float64 up to summation order, within rounding in float32), when
    every CP rank calls it with its own ``signal`` and the same layout (but its own ``rank``).

    Args:
        signal: ``[layout.num_local_tokens]`` float32/float64 local ``D_t`` (zero on padding and
            masked tokens), in the layout's local order.
        gamma: discount in ``[0, 1]``.
        layout: the micro-batch's CP layout, with this process's CP rank.
        group: the context-parallel process group (None or size 1: nothing to exchange).

    Returns:
        ``[num_local_tokens]`` in ``signal``'s dtype (float32 for half inputs), no grad.
    """
    if signal.dim() != 1 or signal.shape[0] != layout.num_local_tokens:
        raise ValueError(f"signal must be this rank's [{layout.num_local_tokens}] local tokens, "
                         f"got shape {tuple(signal.shape)}")
    size = 1 if group is None else dist.get_world_size(group)
    if size != layout.cp:
        raise ValueError(f"the layout is for cp={layout.cp} but the group has {size} ranks")
    with torch.no_grad():
        chunk_cu = layout.local_chunk_cu_seqlens.to(signal.device)
        local = discounted_suffix_sum(signal, gamma, cu_seqlens=chunk_cu)
        if layout.cp == 1:
            # chunks 0 and 1 of each sequence are both here: fold chunk 1's total into chunk 0
            totals = _chunk_totals(local, chunk_cu).view(1, -1, 2)
        else:
            totals = _gather_totals(_chunk_totals(local, chunk_cu), layout, group)
        s, c = layout.num_sequences, layout.num_chunks
        lengths = layout.chunk_lengths.to(signal.device).unsqueeze(-1).expand(s, c)
        carries = chunk_carries(_global_chunk_order(totals, layout.cp), lengths, gamma)  # [S, 2cp]
        mine = carries[:, list(layout.owned_chunks)].reshape(-1)  # local chunk order
        return add_carry(local, mine, gamma, cu_seqlens=chunk_cu)


def _chunk_totals(local: torch.Tensor, chunk_cu: torch.Tensor) -> torch.Tensor:
    """Scan value at each local chunk's first token (0 for an empty chunk): ``[2S]``."""
    starts = chunk_cu[:-1]
    nonempty = chunk_cu[1:] > starts
    first = local[starts.clamp(max=max(local.shape[0] - 1, 0))] if local.numel() else local.new_zeros(starts.shape)
    return torch.where(nonempty, first, torch.zeros_like(first))


def _gather_totals(totals: torch.Tensor, layout: CPLayout, group) -> torch.Tensor:
    """All-gather ``[2S]`` chunk totals from every CP rank -> ``[cp, S, 2]``."""
    parts = [torch.empty_like(totals) for _ in range(layout.cp)]
    dist.all_gather(parts, totals.contiguous(), group=group)
    return torch.stack(parts).view(layout.cp, layout.num_sequences, 2)


def _global_chunk_order(totals: torch.Tensor, cp: int) -> torch.Tensor:
    """``[cp, S, 2]`` (rank q holds chunks q and 2cp-1-q) -> ``[S, 2cp]`` in sequence order."""
    s = totals.shape[1]
    out = totals.new_zeros(s, 2 * cp)
    ranks = torch.arange(cp, device=totals.device)
    out[:, ranks] = totals[:, :, 0].T
    out[:, 2 * cp - 1 - ranks] = totals[:, :, 1].T
    return out


def scan_bytes_per_rank(layout: CPLayout, itemsize: int = 4) -> int:
    """Bytes one rank sends in ``future_kl_cp``'s all-gather: two chunk totals per sequence."""
    return 0 if layout.cp == 1 else 2 * layout.num_sequences * itemsize
