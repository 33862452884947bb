"""Megatron's load-balanced context-parallel layout of packed (THD) batches: pure index math.

Owns ``CPLayout`` and ``build_cp_layout``. Every sequence of a packed micro-batch is padded at its
end to a multiple of ``align`` (``2 * cp``, times ``tp`` under sequence parallelism) and split
into ``2 * cp`` equal chunks; context-parallel rank ``r`` owns chunks ``r`` and ``2 * cp - 1 - r``
of every sequence, so each rank holds the same number of tokens and of causal-attention work.
A rank's local tokens are laid out sequence by sequence, chunk ``r`` then chunk ``2cp - 1 - r``
(Transformer Engine's ``thd_get_partitioned_indices`` order, which its CP attention expects).

The layout gives each rank's token indices into the padded packed array, the chunk boundaries
of its local tokens, each local token's sequence and position, and the permutation to and from
the full (unpadded) packed sequence (``shard`` / ``unshard``). Anything computed per token on the
full packed batch before sharding (labels shifted inside each sequence, loss masks, advantages,
old log-probs) is sharded with the same indices, so no value crosses a chunk boundary wrongly.

Imports torch only: no torch.distributed (no collectives here), no megatron, no config objects.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_fipo.config.conventions import cp_alignment


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenation of ``arange(starts[i], starts[i] + lengths[i])`` over i (int64)."""
    lengths = lengths.to(torch.int64)
    total = int(lengths.sum())
    offsets = torch.cumsum(lengths, 0) - lengths
    return torch.repeat_interleave(starts.to(torch.int64) - offsets, lengths, output_size=total) + torch.arange(total)


def _cumsum0(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths.to(torch.int64), 0)])


@dataclass(frozen=True, eq=False)
class CPLayout:
    """The context-parallel layout of one packed micro-batch, seen from CP rank ``rank``.

    Attributes:
        cp: context-parallel size.
        rank: this rank in the context-parallel group.
        lengths: ``[S]`` int64 real sequence lengths (zero allowed).
        padded_lengths: ``[S]`` int64 lengths padded to a multiple of ``2 * cp`` (and of the
            alignment asked for); padding tokens are appended at each sequence's end.
    """

    cp: int
    rank: int
    lengths: torch.Tensor
    padded_lengths: torch.Tensor

    # ------------------------------------------------------------------ sizes and offsets
    @property
    def num_sequences(self) -> int:
        return int(self.lengths.numel())

    @property
    def num_chunks(self) -> int:
        """Chunks per sequence: ``2 * cp``."""
        return 2 * self.cp

    @property
    def owned_chunks(self) -> tuple:
        """The two chunk indices this rank owns in every sequence."""
        return self.rank, 2 * self.cp - 1 - self.rank

    @functools.cached_property
    def chunk_lengths(self) -> torch.Tensor:
        """``[S]`` tokens per chunk of each sequence (every chunk of a sequence is this long)."""
        return self.padded_lengths // (2 * self.cp)

    @functools.cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """``[S + 1]`` int64 offsets of the real (unpadded) packed sequences."""
        return _cumsum0(self.lengths)

    @functools.cached_property
    def padded_cu_seqlens(self) -> torch.Tensor:
        """``[S + 1]`` int64 offsets of the padded sequences in the full padded packed array."""
        return _cumsum0(self.padded_lengths)

    @property
    def num_tokens(self) -> int:
        """Real tokens of the micro-batch (all ranks together)."""
        return int(self.lengths.sum())

    @property
    def num_padded_tokens(self) -> int:
        return int(self.padded_lengths.sum())

    @property
    def num_local_tokens(self) -> int:
        """Tokens on each rank (the same on every rank): ``num_padded_tokens / cp``."""
        return self.num_padded_tokens // self.cp

    @property
    def max_padded_length(self) -> int:
        return int(self.padded_lengths.max()) if self.num_sequences else 0

    @functools.cached_property
    def local_chunk_cu_seqlens(self) -> torch.Tensor:
        """``[2S + 1]`` offsets of the local chunks: sequence 0 chunk ``r``, chunk ``2cp-1-r``, sequence 1 ..."""
        return _cumsum0(self.chunk_lengths.repeat_interleave(2))

    # ------------------------------------------------------------------ token indices
    def local_indices(self, rank: Optional[int] = None) -> torch.Tensor:
        """``[num_local_tokens]`` indices into the padded packed array of ``rank``'s tokens (default: this rank)."""
        if rank is None or rank == self.rank:
            return self._own_indices
        if not 0 <= rank < self.cp:
            raise ValueError(f"rank {rank} is outside the context-parallel group of size {self.cp}")
        return local_token_indices(self.padded_cu_seqlens, self.cp, rank)

    @functools.cached_property
    def _own_indices(self) -> torch.Tensor:
        """This rank's ``local_indices``, computed once (every sharded tensor of a micro-batch uses them)."""
        return local_token_indices(self.padded_cu_seqlens, self.cp, self.rank)

    @functools.cached_property
    def padding_index(self) -> torch.Tensor:
        """``[num_tokens]`` slot of each real packed token in the padded packed array."""
        return _ranges(self.padded_cu_seqlens[:-1], self.lengths)

    @functools.cached_property
    def local_sequence_ids(self) -> torch.Tensor:
        """``[num_local_tokens]`` the sequence each local token belongs to."""
        return torch.repeat_interleave(torch.arange(self.num_sequences), 2 * self.chunk_lengths,
                                       output_size=self.num_local_tokens)

    @functools.cached_property
    def local_positions(self) -> torch.Tensor:
        """``[num_local_tokens]`` position of each local token inside its (padded) sequence."""
        return self.local_indices() - self.padded_cu_seqlens[:-1][self.local_sequence_ids]

    @functools.cached_property
    def local_is_real(self) -> torch.Tensor:
        """``[num_local_tokens]`` bool, False on the padding appended to each sequence."""
        return self.local_positions < self.lengths[self.local_sequence_ids]

    # ------------------------------------------------------------------ permutations
    def to_padded(self, x: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """Real packed ``[N, ...]`` -> padded packed ``[N_pad, ...]`` with ``fill`` on the padding."""
        self._check_full(x)
        out = x.new_full((self.num_padded_tokens, *x.shape[1:]), fill)
        out[self.padding_index] = x
        return out

    def shard(self, x: torch.Tensor, fill: float | int = 0, *, rank: Optional[int] = None) -> torch.Tensor:
        """This rank's ``[num_local_tokens, ...]`` share of a real packed ``[N, ...]`` tensor."""
        return self.to_padded(x, fill)[self.local_indices(rank)]

    def unshard(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Every rank's local tensor (in CP-rank order) -> the real packed ``[N, ...]`` tensor."""
        if len(parts) != self.cp:
            raise ValueError(f"unshard needs one part per context-parallel rank ({self.cp}), got {len(parts)}")
        first = parts[0]
        out = first.new_zeros((self.num_padded_tokens, *first.shape[1:]))
        for r, part in enumerate(parts):
            if part.shape[0] != self.num_local_tokens:
                raise ValueError(f"part {r} has {part.shape[0]} tokens, the layout gives each rank "
                                 f"{self.num_local_tokens}")
            out[self.local_indices(r)] = part
        return out[self.padding_index]

    def _check_full(self, x: torch.Tensor) -> None:
        if x.shape[0] != self.num_tokens:
            raise ValueError(f"expected the {self.num_tokens} real packed tokens, got {x.shape[0]}")


def local_token_indices(padded_cu_seqlens: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Indices into the padded packed array of CP rank ``rank``'s tokens (chunks r, 2cp-1-r per sequence).

    Args:
        padded_cu_seqlens: ``[S + 1]`` offsets of sequences padded to multiples of ``2 * cp``.
        cp: context-parallel size.
        rank: the CP rank.

    Returns:
        ``[sum(padded) / cp]`` int64.
    """
    cu = padded_cu_seqlens.to(torch.int64).cpu()
    padded = cu[1:] - cu[:-1]
    if bool((padded % (2 * cp)).any()):
        raise ValueError(f"padded sequence lengths must be multiples of 2*cp = {2 * cp}, got {padded.tolist()}")
    chunk = padded // (2 * cp)
    starts = torch.stack([cu[:-1] + rank * chunk, cu[:-1] + (2 * cp - 1 - rank) * chunk], 1).reshape(-1)
    return _ranges(starts, chunk.repeat_interleave(2))


def local_token_coordinates(padded_cu_seqlens: torch.Tensor, cp: int, rank: int) -> tuple:
    """``(sequence ids, positions in the sequence)`` of CP rank ``rank``'s local tokens, both ``[n]`` int64.

    What a context-parallel attention needs to mask in global positions, from the padded offsets
    alone (``PackedSeqParams.cu_seqlens_q_padded``).
    """
    cu = padded_cu_seqlens.to(torch.int64).cpu()
    idx = local_token_indices(cu, cp, rank)
    seq = torch.bucketize(idx, cu[1:], right=True)
    return seq, idx - cu[:-1][seq]


def build_cp_layout(lengths: torch.Tensor | Sequence[int], cp: int, rank: int, *, align: Optional[int] = None) -> CPLayout:
    """The CP layout of packed sequences of ``lengths`` for CP rank ``rank``.

    Args:
        lengths: ``[S]`` real sequence lengths (or ``cu_seqlens`` via ``layout_from_cu_seqlens``).
        cp: context-parallel size (>= 1; 1 gives the identity layout, padded to even lengths).
        rank: this rank in the CP group.
        align: pad every sequence to a multiple of this (a multiple of ``2 * cp``); default
            ``conventions.cp_alignment(cp)``. Under sequence parallelism pass ``cp_alignment(cp, tp, True)``
            so each rank's tokens split over TP.

    Returns:
        CPLayout.
    """
    if cp < 1 or not 0 <= rank < cp:
        raise ValueError(f"need cp >= 1 and 0 <= rank < cp, got cp={cp}, rank={rank}")
    if align is None:  # cp = 1 is never cut by the actor, but its identity layout still has 2 chunks
        align = cp_alignment(cp) if cp > 1 else 2
    align = int(align)
    if align < 1 or align % (2 * cp):
        raise ValueError(f"align must be a positive multiple of 2*cp = {2 * cp}, got {align}")
    lengths = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1).cpu()
    if bool((lengths < 0).any()):
        raise ValueError(f"sequence lengths must be >= 0, got {lengths.tolist()}")
    padded = -(-lengths // align) * align
    return CPLayout(cp=cp, rank=rank, lengths=lengths, padded_lengths=padded)


def layout_from_cu_seqlens(cu_seqlens: torch.Tensor, cp: int, rank: int, *, align: Optional[int] = None) -> CPLayout:
    """``build_cp_layout`` from ``[S + 1]`` packed offsets."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64).cpu()
    if cu.dim() != 1 or cu.numel() < 1 or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must be 1-D offsets starting at 0, got {cu.tolist()}")
    return build_cp_layout(cu[1:] - cu[:-1], cp, rank, align=align)
