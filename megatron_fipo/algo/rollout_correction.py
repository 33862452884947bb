"""Decoupled rollout correction: a detached factor on FIPO's per-token loss from pi_old / pi_rollout.

Owns the modes (``ROLLOUT_CORRECTIONS``), ``correction_weight`` (per token: truncated ``token_tis``,
masking ``token_mis``; per sequence: ``seq_tis``, ``seq_mis``, geometric-mean ``geo_mis``), its metric
keys and checks. Used by ``algo.losses.fipo_policy_loss``, which multiplies its per-token loss by the
weight and keeps the trainer's recomputed log-probs for everything else (``docs/algorithm.md``).

With ``rho_t = exp(clamp(old_logp_t - rollout_logp_t, -20, 20))`` over response tokens (1 elsewhere):
``token_tis`` ``w_t = min(rho_t, C)``; ``token_mis`` ``w_t = 1[lo <= rho_t <= hi]``; ``seq_tis``
``w = min(exp(sum_t log rho_t), C)`` on every token of the sequence; ``seq_mis``
``w = 1[lo <= exp(sum_t log rho_t) <= hi]``; ``geo_mis`` ``w = 1[lo <= exp(mean_t log rho_t) <= hi]``.
A sequence without response tokens has ``w = 1``.

Imports torch only; the per-sequence sums go through the loss's ``SequenceIndex`` (one all-reduce
over the CP group under context parallelism).
"""
from __future__ import annotations

import math

import torch

CORRECTION_SUM_KEYS = ("correction_weight", "correction_masked")
"""Extra keys of ``PolicyLossOutput.sums`` when a rollout correction is on (never with ``"none"``)."""
CORRECTION_MAX_KEYS = ("correction_ratio_max",)
"""Extra keys of ``PolicyLossOutput.maxes`` when a rollout correction is on."""
ROLLOUT_CORRECTIONS = ("none", "token_tis", "token_mis", "seq_tis", "seq_mis", "geo_mis")
"""The ``rollout_correction`` modes of ``fipo_policy_loss`` (the config also has ``auto``)."""


def correction_weight(old_logp, rollout_logp, mask, seq, mode, cap, bounds, *, clamp: float):
    """``(w, rho)``: the rollout correction's detached factor per token and ``rho_t`` (1 outside the response),
    with the log ratio clamped to ``[-clamp, clamp]`` (the loss's ``LOG_RATIO_CLAMP``).

    Only response tokens are read: outside ``mask`` the log ratio is 0, whatever ``rollout_logp``
    holds there. The sequence modes sum each sequence's log ratios and count its response tokens with
    ``seq.sum_per_sequence`` (under context parallelism one all-reduce over the CP group, so every
    rank sees the whole sequence).
    """
    with torch.no_grad():
        log_rho = torch.clamp(old_logp - rollout_logp, -clamp, clamp)
        log_rho = torch.where(mask, log_rho, torch.zeros_like(log_rho))
        rho = torch.exp(log_rho)
        lo, hi = (float(b) for b in bounds)
        if mode == "token_tis":
            w = torch.clamp(rho, max=cap)
        elif mode == "token_mis":
            w = ((rho >= lo) & (rho <= hi)).to(rho.dtype)
        else:
            per_seq = seq.sum_per_sequence(torch.stack([log_rho.double(), mask.double()], dim=-1))
            total, tokens = per_seq[..., 0], per_seq[..., 1]
            if mode == "seq_tis":
                w_seq = torch.clamp(torch.exp(total), max=cap)
            else:
                stat = torch.exp(total if mode == "seq_mis" else total / tokens.clamp(min=1))
                w_seq = ((stat >= lo) & (stat <= hi)).double()
            w = seq.expand(w_seq.to(rho.dtype)).expand(rho.shape)
        w = torch.where(mask, w, torch.ones_like(w))  # so a sequence without response tokens has weight 1
    return w, rho


def fill_correction_metrics(out, mask, w, rho):
    """Add ``CORRECTION_SUM_KEYS`` / ``CORRECTION_MAX_KEYS`` to a ``PolicyLossOutput``'s sums / maxes."""
    f64 = torch.float64
    out.sums.update(
        correction_weight=torch.where(mask, w, torch.zeros_like(w)).sum(dtype=f64),
        correction_masked=(mask & (w == 0)).sum(dtype=f64),
    )
    neg_inf = torch.tensor(-math.inf, dtype=rho.dtype, device=rho.device)
    out.maxes.update(
        correction_ratio_max=torch.where(mask, rho, neg_inf).amax().to(f64) if rho.numel() else neg_inf.to(f64),
    )


def validate_correction(mode, cap, bounds, rollout_logp, shape):
    """``ValueError`` for an unknown mode, a bad cap or bounds, or missing / mis-shaped rollout log-probs."""
    if mode not in ROLLOUT_CORRECTIONS:
        hint = " (resolve 'auto' with AlgoConfig.resolved_correction first)" if mode == "auto" else ""
        raise ValueError(f"rollout_correction must be one of {list(ROLLOUT_CORRECTIONS)}, got {mode!r}{hint}")
    if not cap > 0:
        raise ValueError(f"correction_cap (the truncation C of token_tis / seq_tis) must be > 0, got {cap}")
    if len(bounds) != 2 or not 0.0 <= bounds[0] < bounds[1]:
        raise ValueError(f"correction_bounds must be (lo, hi) with 0 <= lo < hi, got {tuple(bounds)}")
    if mode == "none":
        return
    if rollout_logp is None:
        raise ValueError(f"rollout_correction={mode!r} needs rollout_logp (the rollout engine's log-probs)")
    if rollout_logp.shape != shape:
        raise ValueError(f"rollout_logp must have the shape of logp {tuple(shape)}, got {tuple(rollout_logp.shape)}")
