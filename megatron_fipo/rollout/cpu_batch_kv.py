"""The running batch's KV cache for the CPU server's batcher, and the two batched forwards that use it.

Owns ``BatchKV`` (one ``transformers.DynamicCache`` for every running request, rows left-padded to
one width, with the attention mask that says which columns are real), ``prefill`` (a forward of
new sequences, left-padded among themselves) and ``decode`` (one token per running row). Must not
import megatron, megatron_fipo.mcore or sglang.

Layout: row ``b`` holds its sequence's keys and values in the last ``mask[b].sum()`` columns; the
columns before are padding (masked, zeroed). Position ids are explicit (a row's real token count),
so a row computes what an unpadded forward of its own sequence computes, up to fp32 rounding of
the different shapes. Admitted rows are merged in by left-padding the narrower cache
(``merge``); finished or aborted rows are cut out (``select``), and columns that are padding in
every remaining row are dropped, so the width stays the longest running sequence.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch


class BatchKV:
    """Per-layer keys / values ``[B, heads, W, head_dim]`` of a ``DynamicCache`` plus the mask ``[B, W]``."""

    def __init__(self, cache, mask: torch.Tensor):
        self.cache, self.mask = cache, mask

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def positions(self) -> torch.Tensor:
        """``[B, 1]``: the position of each row's next token (its real tokens so far)."""
        return self.mask.sum(-1, keepdim=True)

    def select(self, rows: Sequence[int]) -> Optional["BatchKV"]:
        """Keep ``rows`` (in that order); None when none is kept."""
        if not rows:
            return None
        index = torch.tensor(list(rows))
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.mask = self.mask[index]
        self._trim()
        return self

    def merge(self, other: Optional["BatchKV"]) -> "BatchKV":
        """This batch's rows, then ``other``'s, at the wider of the two widths."""
        if other is None:
            return self
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        return self

    def _trim(self) -> None:
        used = (self.mask.sum(0) > 0).nonzero()
        first = int(used[0]) if len(used) else self.width
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` (mask ``[B, W]`` or keys ``[B, H, W, D]``) with zero columns prepended up to ``width``."""
    dim = 1 if t.dim() == 2 else 2
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@torch.no_grad()
def prefill(model, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, BatchKV]:
    """One forward of ``sequences`` (left-padded): the fp32 logits after each one's last token ``[N, V]``
    and their cache."""
    from transformers import DynamicCache

    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for b, seq in enumerate(sequences):
        ids[b, width - len(seq):] = torch.tensor(list(seq))
        mask[b, width - len(seq):] = 1
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   past_key_values=cache, use_cache=True).logits[:, -1].float()
    if not bool(mask.all()):  # padding columns hold whatever the masked rows computed: zero them
        real = mask.bool()[:, None, :, None]
        for layer in cache.layers:
            layer.keys = torch.where(real, layer.keys, 0.0)
            layer.values = torch.where(real, layer.values, 0.0)
    return logits, BatchKV(cache, mask)


@torch.no_grad()
def decode(model, kv: BatchKV, tokens: Sequence[int]) -> torch.Tensor:
    """Feed one token per row of ``kv`` (its cache grows by one column); the fp32 logits ``[B, V]``."""
    positions = kv.positions()
    kv.mask = torch.cat([kv.mask, torch.ones(len(kv), 1, dtype=kv.mask.dtype)], dim=1)
    return model(input_ids=torch.tensor(list(tokens))[:, None], attention_mask=kv.mask, position_ids=positions,
                 past_key_values=kv.cache, use_cache=True).logits[:, -1].float()
