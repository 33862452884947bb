"""The FIPO policy loss (and DAPO / GRPO as settings of it), per token.

Owns ``fipo_policy_loss``: probability shift, participation mask, Future-KL, influence weight,
safety override, DAPO dual-clip surrogate with clip-higher, and the sequence-drop filter, exactly
as the released FIPO code computes them (``docs/algorithm.md`` states every formula). DAPO and GRPO
are settings of the same function: ``use_influence=False, drop_filter=False`` is the release's DAPO
baseline (verl's vanilla loss) exactly.

Imports torch and ``algo.future_kl`` only: no torch.distributed, no megatron, no config objects.

Departures from the released code:
- Aggregation is left to the caller: the loss returns per-token losses that are zero outside the
  kept tokens, and the caller divides their sum by the *global* kept-token count of the
  mini-batch (summed over data- and context-parallel ranks), not the per-micro-batch mean, so
  the gradient does not depend on how the batch is split. ``PolicyLossOutput.loss`` divides by
  a denominator you pass (the local kept-token count when omitted).
- Future-KL is an O(T) blocked scan on packed or padded tokens instead of an O(T^2) matmul.
- Metrics are returned as sums / maxima / minima so they can be reduced across ranks exactly.
- The drop filter is a setting (``drop_filter``); the release applies it in its FIPO loss only, so
  FIPO turns it on and DAPO / GRPO turn it off.
- ``dual_clip_c=None`` disables the dual clip, the participation mask and (having no dual-clipped
  token to count) the drop filter: plain PPO clipping; ``negative_only_mask=True`` applies the participation mask to
  negative-advantage tokens only (the paper's Eq. 5; the released code masks every token).
- Decoupled rollout correction (``algo.rollout_correction``, not in the release): a detached factor on
  the per-token loss from ``old_logp - rollout_logp``; everything else still uses ``old_logp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch

from megatron_fipo.algo.future_kl import discounted_suffix_sum, sequence_lengths
from megatron_fipo.algo.rollout_correction import (CORRECTION_MAX_KEYS, CORRECTION_SUM_KEYS,  # noqa: F401 (re-exported)
                                                   ROLLOUT_CORRECTIONS, correction_weight, fill_correction_metrics,
                                                   validate_correction)

SUM_KEYS = (
    "response_tokens", "kept_tokens", "sequences", "dropped_sequences", "pg_clipfrac", "pg_clipfrac_lower",
    "ppo_kl", "participation_masked", "safety_overrides", "influence_weight", "influence_clipped_high",
    "influence_clipped_low", "future_kl",
)
"""Keys of ``PolicyLossOutput.sums`` (fixed, so ranks can reduce them as one vector)."""
MAX_KEYS = ("influence_weight_max", "ratio_max")
MIN_KEYS = ("influence_weight_min",)
LOG_RATIO_CLAMP = 20.0
SAFETY_CLAMP = (0.8, 1.0)
UNCLIPPED_INFLUENCE_MAX = 10.0  # the release's cap when future_kl_clip_ratio == 0


@dataclass
class PolicyLossOutput:
    """Per-token results and reducible metrics of one micro-batch.

    Attributes:
        per_token_loss: ``[B, T]`` or ``[N]`` float, differentiable w.r.t. ``logp``; zero outside
            ``kept_mask``.
        kept_mask: bool, response tokens of sequences that survived the drop filter.
        influence_weight: float, ``f_t`` after clipping and the safety override (1 for DAPO).
        future_kl: float, ``F_t`` (stop-grad).
        ratio: float, ``r_t`` (detached).
        dropped_sequences: ``[B]`` or ``[S]`` bool, sequences removed by the drop filter.
        sums: 0-dim float64 tensors to all-reduce with SUM (token counts, clip counts, ...).
        maxes: 0-dim float64 tensors to all-reduce with MAX (``-inf`` when nothing counted).
        mins: 0-dim float64 tensors to all-reduce with MIN (``+inf`` when nothing counted).
        correction_weight: float, the detached rollout-correction factor ``w_t`` (1 outside the
            response; 0 where masked), None when ``rollout_correction="none"``.
    """

    per_token_loss: torch.Tensor
    kept_mask: torch.Tensor
    influence_weight: torch.Tensor
    future_kl: torch.Tensor
    ratio: torch.Tensor
    dropped_sequences: torch.Tensor
    sums: Dict[str, torch.Tensor] = field(default_factory=dict)
    maxes: Dict[str, torch.Tensor] = field(default_factory=dict)
    mins: Dict[str, torch.Tensor] = field(default_factory=dict)
    correction_weight: Optional[torch.Tensor] = None

    def loss(self, denominator: Optional[float | torch.Tensor] = None) -> torch.Tensor:
        """``per_token_loss.sum() / denominator``.

        Args:
            denominator: the global kept-token count of the mini-batch (summed over micro-batches,
                data- and context-parallel ranks). Defaults to this micro-batch's kept tokens.
                A zero denominator (nothing kept anywhere) gives a zero loss with a graph.
        """
        if denominator is None:
            denominator = self.sums["kept_tokens"]
        denominator = torch.as_tensor(denominator, dtype=self.per_token_loss.dtype)
        return self.per_token_loss.sum() / denominator.clamp(min=1).to(self.per_token_loss.device)


def fipo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    decay_rate: float = 32.0,
    dual_clip_c: Optional[float] = 10.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    future_kl_clip_ratio: float = 0.2,
    future_kl_clip_high_only: bool = True,
    safety_thresh: float = 10.0,
    negative_only_mask: bool = False,
    use_influence: bool = True,
    drop_filter: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    sequences: Optional["SequenceIndex"] = None,
    rollout_logp: Optional[torch.Tensor] = None,
    rollout_correction: str = "none",
    correction_cap: float = 2.0,
    correction_bounds: Sequence[float] = (0.5, 5.0),
) -> PolicyLossOutput:
    """FIPO per-token policy loss; DAPO with ``use_influence=False, drop_filter=False``.

    Denominator: none applied here. Divide ``per_token_loss.sum()`` by the global kept-token count
    (``sums["kept_tokens"]`` all-reduced over micro-batches and dp x cp ranks), e.g. with
    ``PolicyLossOutput.loss(denominator)``: token-mean over kept tokens.

    Args:
        logp: ``[B, T]`` (or packed ``[N]`` with ``cu_seqlens``) current log-probs of the sampled
            tokens, with grad. Computed in float32 at least.
        old_logp: same shape, log-probs under the rollout policy recomputed by the trainer.
        advantages: same shape (broadcast per sequence), or one value per sequence ``[B]``/``[S]``.
        response_mask: same shape, 1 on response tokens, 0 on prompt and padding.
        decay_rate: Future-KL half-life in tokens; ``gamma = 2 ** (-1 / decay_rate)``.
        dual_clip_c: dual-clip threshold ``c`` (> 1), also the participation / drop threshold on
            the ratio; ``None`` disables all three.
        clip_low: ``eps_low``; the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.
        clip_high: ``eps_high`` (clip-higher).
        future_kl_clip_ratio: influence weight clipped to ``[1 - ratio, 1 + ratio]`` (``[1, 1 + ratio]``
            with ``future_kl_clip_high_only``); 0 means only ``exp(F) <= 10`` as in the release.
        future_kl_clip_high_only: see above.
        safety_thresh: where ``A < 0`` and ``r > safety_thresh`` the weight is clamped to [0.8, 1].
        negative_only_mask: participation mask on negative-advantage tokens only (paper Eq. 5).
        use_influence: False sets the influence weight to 1 everywhere (DAPO).
        drop_filter: remove from the loss every sequence with two or more dual-clipped
            negative-advantage tokens (``A < 0`` and ``r > dual_clip_c``), as the released FIPO loss
            does. False keeps every response token (the release's DAPO baseline); under context
            parallelism it also skips the per-sequence count's all-reduce.
        cu_seqlens: ``[S + 1]`` int offsets when the inputs are packed 1-D tokens.
        sequences: a ``SequenceIndex`` for the tokens instead of ``cu_seqlens`` (everything that
            spans a sequence: the Future-KL scan, the per-sequence drop counts, sequence metrics).
            The context-parallel loss passes one whose scan and counts span the CP group
            (``parallel.cp_loss``); the default is built from the shape and ``cu_seqlens``.
        rollout_logp: same shape, the rollout engine's log-probs of the sampled tokens; required
            by every ``rollout_correction`` but ``"none"``, read on response tokens only. Never
            used for the ratio, Future-KL, the clips, the safety override or the drop filter:
            those keep ``old_logp``.
        rollout_correction: ``"none"`` (the loss as above, bit for bit) or a mode of
            ``algo.rollout_correction``: a detached factor ``w_t`` from ``rho_t = pi_old / pi_rollout``
            on the per-token loss of kept tokens (truncated or masked, per token or per sequence; 1
            on a sequence without response tokens). The denominator is unchanged: a masked token
            (``w = 0``) still counts in ``kept_tokens``, so the loss does not depend on the layout.
        correction_cap: ``C`` (> 0) of the truncating modes.
        correction_bounds: ``(lo, hi)`` with ``0 <= lo < hi`` of the masking modes.

    Returns:
        PolicyLossOutput. Metric sums count response tokens (``response_tokens``), kept tokens,
        sequences, dropped sequences, ratio-clipped tokens (``pg_clipfrac``), dual-clipped
        negative tokens (``pg_clipfrac_lower``), ``ppo_kl`` (sum of ``old_logp - logp``),
        masked-out tokens (``participation_masked``), safety overrides, influence-weight sum and
        clip counts, and the Future-KL sum, all over response tokens. With a rollout correction
        also ``CORRECTION_SUM_KEYS`` (the sum of ``w_t`` and the count of ``w_t == 0`` over response
        tokens) and ``CORRECTION_MAX_KEYS`` (the largest ``rho_t``); never with ``"none"``.
    """
    if sequences is not None and cu_seqlens is not None:
        raise ValueError("pass either cu_seqlens or sequences (a SequenceIndex), not both")
    _validate(logp, old_logp, response_mask, decay_rate, dual_clip_c, clip_low, clip_high,
              future_kl_clip_ratio, cu_seqlens is not None or (sequences is not None and sequences.packed))
    validate_correction(rollout_correction, correction_cap, correction_bounds, rollout_logp, logp.shape)
    seq = sequences if sequences is not None else SequenceIndex(response_mask.shape, cu_seqlens, logp.device)
    adv = seq.broadcast(advantages, logp.shape).to(torch.promote_types(logp.dtype, torch.float32))
    mask = response_mask.bool()
    logp = logp.to(adv.dtype)
    log_ratio = torch.clamp(logp - old_logp.to(adv.dtype), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    d = log_ratio.detach()

    over_c = d > math.log(dual_clip_c) if dual_clip_c is not None else torch.zeros_like(mask)
    masked_out = over_c & (adv < 0) if negative_only_mask else over_c
    signal = torch.where(mask & ~masked_out, d, torch.zeros_like(d))
    future_kl = seq.suffix_sum(signal, 2.0 ** (-1.0 / decay_rate))

    lo, hi = _influence_bounds(future_kl_clip_ratio, future_kl_clip_high_only)
    safety = (adv < 0) & (ratio.detach() > safety_thresh)
    if use_influence:
        weight = torch.clamp(torch.exp(future_kl), min=lo, max=hi)
        weight = torch.where(safety, weight.clamp(*SAFETY_CLAMP), weight)
    else:
        weight = torch.ones_like(future_kl)
    weighted_adv = adv * weight

    loss1 = -weighted_adv * ratio
    loss2 = -weighted_adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    if dual_clip_c is not None:
        loss3 = -weighted_adv * dual_clip_c
        per_token = torch.where(weighted_adv < 0, torch.minimum(clipped, loss3), clipped)
        lower_clipped = (adv < 0) & (clipped.detach() > loss3) & mask
    else:
        per_token = clipped
        lower_clipped = torch.zeros_like(mask)
    if drop_filter:
        dropped = seq.count(lower_clipped) > 1
    else:  # no per-sequence count, so no collective under CP
        dropped = torch.zeros(seq.num_sequences, dtype=torch.bool, device=mask.device)
    kept = mask & ~seq.expand(dropped)
    correction = None
    if rollout_correction != "none":  # a detached factor; the denominator (kept tokens) is unchanged
        correction, rho = correction_weight(old_logp.to(adv.dtype), rollout_logp.to(adv.dtype), mask, seq,
                                             rollout_correction, correction_cap, correction_bounds,
                                             clamp=LOG_RATIO_CLAMP)
        per_token = per_token * correction
    per_token_loss = torch.where(kept, per_token, torch.zeros_like(per_token))

    out = PolicyLossOutput(per_token_loss, kept, weight, future_kl, ratio.detach(), dropped,
                           correction_weight=correction)
    _fill_metrics(out, mask, d, loss1.detach() < loss2.detach(), lower_clipped, masked_out,
                  safety & mask if use_influence else torch.zeros_like(mask), lo, hi, seq)
    if correction is not None:
        fill_correction_metrics(out, mask, correction, rho)
    return out


def _influence_bounds(clip_ratio: float, high_only: bool) -> tuple[float, float]:
    if clip_ratio == 0.0:
        return 0.0, UNCLIPPED_INFLUENCE_MAX
    return (1.0 if high_only else 1.0 - clip_ratio), 1.0 + clip_ratio


def _fill_metrics(out, mask, d, ratio_clipped, lower_clipped, masked_out, safety, lo, hi, seq):
    f64 = torch.float64

    def total(t: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, t, torch.zeros_like(t)).sum(dtype=f64).detach()

    w = out.influence_weight
    out.sums.update(
        response_tokens=mask.sum(dtype=f64),
        kept_tokens=out.kept_mask.sum(dtype=f64),
        sequences=seq.sequence_total(torch.ones(seq.num_sequences, dtype=f64, device=mask.device)),
        dropped_sequences=seq.sequence_total(out.dropped_sequences.to(f64)),
        pg_clipfrac=total(ratio_clipped),
        pg_clipfrac_lower=lower_clipped.sum(dtype=f64),
        ppo_kl=total(-d),
        participation_masked=total(masked_out),
        safety_overrides=safety.sum(dtype=f64),
        influence_weight=total(w),
        influence_clipped_high=total(w >= hi - 1e-7),
        influence_clipped_low=total(w <= lo + 1e-7),
        future_kl=total(out.future_kl),
    )
    inf = torch.tensor(math.inf, dtype=w.dtype, device=w.device)
    out.maxes.update(
        influence_weight_max=torch.where(mask, w, -inf).amax().to(f64) if w.numel() else -inf.to(f64),
        ratio_max=torch.where(mask, out.ratio, -inf).amax().to(f64) if w.numel() else -inf.to(f64),
    )
    out.mins.update(
        influence_weight_min=torch.where(mask, w, inf).amin().to(f64) if w.numel() else inf.to(f64),
    )


class SequenceIndex:
    """What spans a sequence, for padded ``[B, T]`` or packed ``[N]`` tokens of one process.

    The policy loss goes through this interface for everything that is not per token: the
    Future-KL scan, per-sequence counts (the drop filter), per-sequence broadcasts and the
    sequence metrics. A distributed layout supplies a subclass (``parallel.cp_loss``).

    Args:
        shape: the token shape, ``[B, T]`` or ``[N]``.
        cu_seqlens: ``[S + 1]`` offsets for packed tokens, None for padded rows.
        device: where index tensors live.
    """

    def __init__(self, shape: torch.Size, cu_seqlens: Optional[torch.Tensor], device):
        self.packed = cu_seqlens is not None
        self.cu_seqlens = cu_seqlens
        if self.packed:
            self.lengths = sequence_lengths(cu_seqlens, shape[0], device)
            self.num_sequences = int(self.lengths.numel())
            self.ids = torch.repeat_interleave(torch.arange(self.num_sequences, device=device), self.lengths)
        else:
            self.num_sequences = int(shape[0])

    def suffix_sum(self, signal: torch.Tensor, gamma: float) -> torch.Tensor:
        """Future-KL ``F_t = sum_{k >= t} gamma^(k - t) signal_k`` within each sequence (no grad)."""
        return discounted_suffix_sum(signal, gamma, cu_seqlens=self.cu_seqlens)

    def sequence_total(self, per_seq: torch.Tensor) -> torch.Tensor:
        """0-dim float64 sum of a per-sequence metric (a sequence counted once over ranks)."""
        return per_seq.sum(dtype=torch.float64)

    def count(self, flags: torch.Tensor) -> torch.Tensor:
        """Number of True flags per sequence: ``[B]`` or ``[S]`` int64."""
        if not self.packed:
            return flags.sum(dim=-1)
        counts = torch.zeros(self.num_sequences, dtype=torch.int64, device=flags.device)
        return counts.index_add_(0, self.ids, flags.to(torch.int64))

    def sum_per_sequence(self, values: torch.Tensor) -> torch.Tensor:
        """Float64 sum of per-token values over each sequence: ``[B, T(, K)]`` or ``[N(, K)]`` -> ``[S(, K)]``.

        A trailing dimension ``K`` sums several quantities at once (one collective under CP).
        """
        values = values.to(torch.float64)
        if not self.packed:
            return values.sum(dim=1)
        totals = torch.zeros((self.num_sequences, *values.shape[1:]), dtype=torch.float64, device=values.device)
        return totals.index_add_(0, self.ids, values)

    def expand(self, per_seq: torch.Tensor) -> torch.Tensor:
        """Per-sequence values to per-token values."""
        return per_seq[self.ids] if self.packed else per_seq.unsqueeze(-1)

    def broadcast(self, advantages: torch.Tensor, token_shape: torch.Size) -> torch.Tensor:
        if advantages.shape == token_shape:
            return advantages.detach()
        if advantages.dim() == 1 and advantages.shape[0] == self.num_sequences:
            return self.expand(advantages.detach()).expand(token_shape)
        raise ValueError(
            f"advantages must have the token shape {tuple(token_shape)} or one value per sequence "
            f"[{self.num_sequences}], got {tuple(advantages.shape)}"
        )


def _validate(logp, old_logp, response_mask, decay_rate, dual_clip_c, clip_low, clip_high,
              future_kl_clip_ratio, packed):
    if logp.shape != old_logp.shape or logp.shape != response_mask.shape:
        raise ValueError(
            f"logp, old_logp and response_mask must have the same shape, got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(response_mask.shape)}"
        )
    expected_dim = 1 if packed else 2
    if logp.dim() != expected_dim:
        raise ValueError(
            f"expected {'packed [N] tokens (cu_seqlens given)' if packed else '[B, T] tokens'}, "
            f"got shape {tuple(logp.shape)}"
        )
    if not decay_rate > 0:
        raise ValueError(f"decay_rate (Future-KL half-life in tokens) must be > 0, got {decay_rate}")
    if dual_clip_c is not None and not dual_clip_c > 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (default 10) or None to disable, got {dual_clip_c}")
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if not 0.0 <= future_kl_clip_ratio < 1.0:
        raise ValueError(f"future_kl_clip_ratio must be in [0, 1), got {future_kl_clip_ratio}")


def summarize_policy_metrics(
    sums: Dict[str, float | torch.Tensor],
    maxes: Dict[str, float | torch.Tensor],
    mins: Dict[str, float | torch.Tensor],
) -> Dict[str, float]:
    """Turn (already reduced) metric sums / extremes of ``fipo_policy_loss`` into loggable means.

    Token fractions and means divide by ``response_tokens``, the dropped-sequence fraction by
    ``sequences``; extremes with nothing counted (``+-inf``) become NaN. The rollout correction's
    ``correction_weight_mean`` and ``correction_masked_frac`` appear only when ``sums`` holds
    ``CORRECTION_SUM_KEYS`` (``correction_ratio_max`` only when ``maxes`` holds it).

    Args:
        sums, maxes, mins: as in ``PolicyLossOutput``, summed / maxed / minned over micro-batches
            and ranks.

    Returns:
        ``{"pg_clipfrac": ..., "influence_weight_mean": ..., ...}`` of Python floats.
    """
    s = {k: float(v) for k, v in sums.items()}
    tokens = max(s["response_tokens"], 1.0)
    out = {
        "pg_clipfrac": s["pg_clipfrac"] / tokens,
        "pg_clipfrac_lower": s["pg_clipfrac_lower"] / tokens,
        "ppo_kl": s["ppo_kl"] / tokens,
        "participation_masked_frac": s["participation_masked"] / tokens,
        "safety_override_frac": s["safety_overrides"] / tokens,
        "influence_weight_mean": s["influence_weight"] / tokens,
        "influence_clip_high_frac": s["influence_clipped_high"] / tokens,
        "influence_clip_low_frac": s["influence_clipped_low"] / tokens,
        "future_kl_mean": s["future_kl"] / tokens,
        "kept_tokens": s["kept_tokens"],
        "response_tokens": s["response_tokens"],
        "dropped_sequences": s["dropped_sequences"],
        "dropped_sequence_frac": s["dropped_sequences"] / max(s["sequences"], 1.0),
    }
    if "correction_weight" in s:
        out["correction_weight_mean"] = s["correction_weight"] / tokens
        out["correction_masked_frac"] = s["correction_masked"] / tokens
    for key, value in list(maxes.items()) + list(mins.items()):
        v = float(value)
        out[key] = v if math.isfinite(v) else float("nan")
    return out
