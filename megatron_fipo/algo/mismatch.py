"""Trainer-vs-rollout log-prob mismatch: the correctness gate between the actor and the engine.

Owns ``logprob_mismatch_sums`` (metric sums over the sampled tokens of a batch, reducible across
ranks by summing / taking maxima) and ``summarize_mismatch`` (the sums -> the reported means).
Imports torch only.

Reported metrics (per training step, over every sampled response token):

* ``rollout/logprob_abs_diff``: mean ``|logp_trainer - logp_rollout|`` (slime's
  ``train_rollout_logprob_abs_diff``).
* ``rollout/token_mult_prob_error``: mean ``exp(|logp_trainer - logp_rollout|)``, 1.0 when the two
  agree (NeMo-RL's ``token_mult_prob_error``; NeMo-RL masks inside the ``exp``, which gives the
  same mean over the masked tokens).
* ``rollout/logprob_diff_mean``: mean signed ``logp_trainer - logp_rollout`` (a drift that the
  absolute value hides: e.g. a temperature applied on one side only).
* ``rollout/logprob_abs_diff_max``: the largest absolute difference.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

SUM_KEYS = ("abs_diff_sum", "diff_sum", "mult_error_sum", "tokens")
MAX_KEYS = ("abs_diff_max",)


def logprob_mismatch_sums(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor,
                          mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sums of the mismatch metrics over the masked tokens.

    Args:
        trainer_logp: ``[...]`` log-probs of the sampled tokens recomputed by the trainer.
        rollout_logp: same shape, the engine's log-probs of the same tokens.
        mask: same shape, nonzero on the tokens to count (default: all).

    Returns:
        float64 scalars ``SUM_KEYS`` (sums and the token count: reduce by summing) and
        ``MAX_KEYS`` (reduce by max; 0 when no token is counted).
    """
    if trainer_logp.shape != rollout_logp.shape:
        raise ValueError(f"trainer log-probs {tuple(trainer_logp.shape)} and rollout log-probs "
                         f"{tuple(rollout_logp.shape)} must have the same shape")
    diff = trainer_logp.detach().double() - rollout_logp.detach().double()
    keep = torch.ones_like(diff, dtype=torch.bool) if mask is None else mask.to(diff.device).bool()
    if keep.shape != diff.shape:
        raise ValueError(f"mask {tuple(keep.shape)} does not match the log-probs {tuple(diff.shape)}")
    d = diff[keep]
    return {
        "abs_diff_sum": d.abs().sum(),
        "diff_sum": d.sum(),
        "mult_error_sum": torch.exp(d.abs()).sum(),
        "tokens": torch.tensor(float(d.numel()), dtype=torch.float64),
        "abs_diff_max": d.abs().max() if d.numel() else torch.zeros((), dtype=torch.float64),
    }


def summarize_mismatch(sums: Mapping[str, torch.Tensor | float], prefix: str = "rollout/") -> dict[str, float]:
    """Reduced sums -> the reported metrics (NaN-free: all zeros / ones when no token was counted)."""
    n = float(sums["tokens"])
    mean = (lambda key, empty: float(sums[key]) / n if n else empty)
    return {
        f"{prefix}logprob_abs_diff": mean("abs_diff_sum", 0.0),
        f"{prefix}logprob_diff_mean": mean("diff_sum", 0.0),
        f"{prefix}token_mult_prob_error": mean("mult_error_sum", 1.0),
        f"{prefix}logprob_abs_diff_max": float(sums["abs_diff_max"]),
    }
