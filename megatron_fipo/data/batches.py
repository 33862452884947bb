"""The typed hand-off from the rollout phase to the actor: one rank's share of a step, per mini-batch.

Owns ``MiniBatch`` (the samples of one optimizer step on one data-parallel rank, with one
advantage per sequence) and ``RankShare`` (a rank's mini-batches of a step). Built on rank 0 by
``experience.Experience.shares`` and scattered; the actor packs each mini-batch once
(``mcore.micro_batches``). Advantages stay one per sequence until the loss broadcasts them over
the sequence's tokens (``algo.losses.SequenceIndex.broadcast``).

Imports torch only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch


@dataclass
class MiniBatch:
    """This data-parallel rank's samples of one mini-batch (one optimizer step)."""

    prompts: List[List[int]]
    """Prompt token ids per sample (at least one token each)."""
    responses: List[List[int]]
    """Response token ids per sample (may be empty)."""
    advantages: torch.Tensor
    """``[n]`` float32 advantage per sample (GRPO: the same for every token of the sample)."""
    rollout_logp: List[torch.Tensor]
    """The engine's float32 log-prob of every response token, per sample (for the mismatch metrics)."""

    def __post_init__(self):
        n = len(self.prompts)
        if len(self.responses) != n or len(self.rollout_logp) != n or tuple(self.advantages.shape) != (n,):
            raise ValueError(f"a mini-batch of {n} prompts needs as many responses ({len(self.responses)}), "
                             f"rollout log-prob lists ({len(self.rollout_logp)}) and advantages "
                             f"{tuple(self.advantages.shape)}")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_tokens(self) -> int:
        """Prompt + response tokens of the samples."""
        return sum(len(p) + len(r) for p, r in zip(self.prompts, self.responses))


@dataclass
class RankShare:
    """One data-parallel rank's part of a training step (identical on the ranks of a model-parallel group)."""

    mini_batches: List[MiniBatch] = field(default_factory=list)
    """In optimizer-step order; empty when the step has nothing to train on."""

    @property
    def num_samples(self) -> int:
        return sum(len(mb) for mb in self.mini_batches)

    @property
    def num_tokens(self) -> int:
        return sum(mb.num_tokens for mb in self.mini_batches)
