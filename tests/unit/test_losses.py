"""fipo_policy_loss against a naive per-token reference written from the spec."""

import math

import pytest
import torch

from megatron_fipo.algo.losses import fipo_policy_loss, summarize_policy_metrics
from tests.helpers import fresh_seeds, random_policy_batch


def naive_fipo(logp, old_logp, adv, mask, *, decay_rate=32.0, c=10.0, eps_low=0.2, eps_high=0.28,
               clip_ratio=0.2, high_only=True, safety=10.0, negative_only=False, use_influence=True,
               drop_filter=True):
    """Spec steps 1-9 with Python loops, one token at a time (autograd through each token)."""
    gamma = 2.0 ** (-1.0 / decay_rate)
    rows, length = logp.shape
    losses = [[None] * length for _ in range(rows)]
    kept = torch.zeros(rows, length, dtype=torch.bool)
    weights = torch.ones(rows, length, dtype=torch.float64)
    fkl = torch.zeros(rows, length, dtype=torch.float64)
    dropped = []
    for b in range(rows):
        a = float(adv[b])
        d = [min(max(float((logp[b, t] - old_logp[b, t]).detach()), -20.0), 20.0) for t in range(length)]
        r = [math.exp(v) for v in d]
        signal = []
        for t in range(length):
            participates = True if c is None else r[t] <= c or (negative_only and a >= 0)
            signal.append(d[t] if (mask[b, t] and participates) else 0.0)
        lower_clips = 0
        for t in range(length):
            future = sum(gamma ** (k - t) * signal[k] for k in range(t, length))
            fkl[b, t] = future
            if use_influence:
                lo, hi = ((1.0 if high_only else 1.0 - clip_ratio), 1.0 + clip_ratio) if clip_ratio else (0.0, 10.0)
                f = min(max(math.exp(future), lo), hi)
                if a < 0 and r[t] > safety:
                    f = min(max(f, 0.8), 1.0)
            else:
                f = 1.0
            weights[b, t] = f
            wa = a * f
            ratio = torch.exp(torch.clamp(logp[b, t] - old_logp[b, t], -20.0, 20.0))
            l1 = -wa * ratio
            l2 = -wa * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            lc = torch.maximum(l1, l2)
            loss = torch.minimum(lc, torch.tensor(-wa * c, dtype=lc.dtype)) if (c is not None and wa < 0) else lc
            losses[b][t] = loss
            if mask[b, t] and c is not None and a < 0 and r[t] > c:
                lower_clips += 1
        drop = drop_filter and lower_clips >= 2
        dropped.append(drop)
        for t in range(length):
            kept[b, t] = bool(mask[b, t]) and not drop
    total = sum(losses[b][t] for b in range(rows) for t in range(length) if kept[b, t])
    per_token = torch.stack([torch.stack([losses[b][t] if kept[b, t] else losses[b][t] * 0
                                          for t in range(length)]) for b in range(rows)])
    return per_token, kept, weights, fkl, torch.tensor(dropped), total


SETTINGS = [
    {},
    dict(use_influence=False),
    dict(use_influence=False, drop_filter=False),  # DAPO
    dict(drop_filter=False),
    dict(high_only=False),
    dict(negative_only=True),
    dict(clip_ratio=0.0),
    dict(decay_rate=4.0, safety=2.0),
    dict(c=None, eps_high=0.2, use_influence=False, drop_filter=False),  # GRPO
]


def _ours(batch, s):
    return fipo_policy_loss(
        batch["logp"], batch["old_logp"], batch["advantages"], batch["response_mask"],
        decay_rate=s.get("decay_rate", 32.0), dual_clip_c=s.get("c", 10.0), clip_low=0.2,
        clip_high=s.get("eps_high", 0.28), future_kl_clip_ratio=s.get("clip_ratio", 0.2),
        future_kl_clip_high_only=s.get("high_only", True), safety_thresh=s.get("safety", 10.0),
        negative_only_mask=s.get("negative_only", False), use_influence=s.get("use_influence", True),
        drop_filter=s.get("drop_filter", True))


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "fipo")
@pytest.mark.parametrize("seed", fresh_seeds(3, base=21))
@pytest.mark.parametrize("length", [1, 7, 40])
def test_matches_naive_reference_and_gradients(setting, seed, length):
    gen = torch.Generator().manual_seed(seed * 31 + length)
    batch = random_policy_batch(gen, batch=5, length=length, spike_prob=0.15, empty_rows=1)
    out = _ours(batch, setting)
    ref_tok, ref_kept, ref_w, ref_f, ref_drop, ref_total = naive_fipo(
        batch["logp"], batch["old_logp"], batch["advantages"], batch["response_mask"].bool(), **setting)
    mask = batch["response_mask"].bool()
    assert torch.equal(out.kept_mask, ref_kept)
    assert torch.equal(out.dropped_sequences, ref_drop)
    torch.testing.assert_close(out.per_token_loss, ref_tok, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.future_kl[mask], ref_f[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.influence_weight[mask], ref_w[mask], rtol=1e-12, atol=1e-12)
    assert float(out.sums["kept_tokens"]) == float(ref_kept.sum())
    denom = max(int(ref_kept.sum()), 1)
    (grad,) = torch.autograd.grad(out.loss(denom), batch["logp"])
    if isinstance(ref_total, torch.Tensor):
        (ref_grad,) = torch.autograd.grad(ref_total / denom, batch["logp"])
    else:  # nothing kept: the reference loss is the constant 0
        ref_grad = torch.zeros_like(grad)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert torch.all(grad[~out.kept_mask] == 0)


def test_influence_off_is_dapo_and_first_minibatch_is_dapo():
    gen = torch.Generator().manual_seed(5)
    batch = random_policy_batch(gen, batch=6, length=30)
    dapo = _ours(batch, dict(use_influence=False))
    assert torch.all(dapo.influence_weight == 1)
    # First mini-batch of a step: logp == old_logp, so F == 0 and f == 1 -> FIPO equals DAPO.
    same = dict(batch, logp=batch["old_logp"].clone().requires_grad_(True))
    fipo = _ours(same, {})
    dapo = _ours(same, dict(use_influence=False))
    assert torch.all(fipo.future_kl == 0)
    torch.testing.assert_close(fipo.per_token_loss, dapo.per_token_loss, rtol=0, atol=0)


def test_drop_filter_needs_two_dual_clipped_negative_tokens():
    old = torch.zeros(3, 6, dtype=torch.float64)
    logp = old.clone()
    big = math.log(10.0) + 0.5
    logp[0, 1] = big  # one token past c in a negative sequence: kept
    logp[1, 1] = logp[1, 4] = big  # two: dropped
    logp[2, 1] = logp[2, 4] = big  # two, but positive advantage: kept
    adv = torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)
    out = fipo_policy_loss(logp.requires_grad_(True), old, adv, torch.ones(3, 6))
    assert out.dropped_sequences.tolist() == [False, True, False]
    assert out.kept_mask.sum(1).tolist() == [6, 0, 6]
    assert out.sums["dropped_sequences"].item() == 1
    assert out.sums["participation_masked"].item() == 5
    # the masked tokens contribute nothing to Future-KL: F is zero everywhere here
    assert torch.all(out.future_kl == 0)
    off = fipo_policy_loss(logp, old, adv, torch.ones(3, 6), drop_filter=False)  # DAPO / GRPO keep every token
    assert off.dropped_sequences.tolist() == [False] * 3 and off.kept_mask.all()
    assert off.sums["dropped_sequences"].item() == 0 and off.sums["kept_tokens"].item() == 18


def test_influence_weight_bounds_and_safety_override():
    length = 8
    old = torch.zeros(2, length, dtype=torch.float64)
    logp = torch.full((2, length), 0.5, dtype=torch.float64)  # F large -> exp(F) clipped at 1.2
    logp[0, 3] = math.log(12.0)  # ratio 12 > safety 10 and > c: masked from F, safety override
    out = fipo_policy_loss(logp.requires_grad_(True), old, torch.tensor([-1.0, 1.0], dtype=torch.float64),
                           torch.ones(2, length))
    w = out.influence_weight
    assert torch.allclose(w[1], torch.full((length,), 1.2, dtype=torch.float64))
    assert w[0, 3].item() == 1.0  # clamp(1.2, 0.8, 1.0)
    assert out.sums["safety_overrides"].item() == 1
    sym = fipo_policy_loss(-logp.detach().requires_grad_(True), old, torch.tensor([1.0, 1.0]),
                           torch.ones(2, length), future_kl_clip_high_only=False)
    assert sym.influence_weight.min().item() == pytest.approx(0.8)


@pytest.mark.parametrize("seed", fresh_seeds(4, base=23))
def test_packed_equals_padded(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = random_policy_batch(gen, batch=6, length=50, spike_prob=0.1, empty_rows=1)
    mask = batch["response_mask"].bool()
    lengths = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    logp_packed = batch["logp"].detach()[mask].requires_grad_(True)
    packed = fipo_policy_loss(logp_packed, batch["old_logp"][mask], batch["advantages"],
                              torch.ones_like(logp_packed), cu_seqlens=cu)
    padded = _ours(batch, {})
    torch.testing.assert_close(packed.per_token_loss, padded.per_token_loss[mask], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(packed.future_kl, padded.future_kl[mask], rtol=1e-12, atol=1e-13)
    assert torch.equal(packed.kept_mask, padded.kept_mask[mask])
    assert torch.equal(packed.dropped_sequences, padded.dropped_sequences)
    for key in padded.sums:
        if key != "sequences":
            assert packed.sums[key].item() == pytest.approx(padded.sums[key].item(), rel=1e-12, abs=1e-12), key
    (g_packed,) = torch.autograd.grad(packed.loss(100.0), logp_packed)
    (g_padded,) = torch.autograd.grad(padded.loss(100.0), batch["logp"])
    torch.testing.assert_close(g_packed, g_padded[mask], rtol=1e-12, atol=1e-14)


def test_global_denominator_makes_micro_batch_split_irrelevant():
    gen = torch.Generator().manual_seed(8)
    batch = random_policy_batch(gen, batch=8, length=20)
    whole = _ours(batch, {})
    denom = whole.sums["kept_tokens"]
    (g_whole,) = torch.autograd.grad(whole.loss(denom), batch["logp"])
    grads = []
    for part in (slice(0, 3), slice(3, 8)):
        sub = {k: (v[part].detach().requires_grad_(True) if k == "logp" else v[part]) for k, v in batch.items()}
        out = _ours(sub, {})
        grads.append(torch.autograd.grad(out.loss(denom), sub["logp"])[0])
    torch.testing.assert_close(torch.cat(grads), g_whole, rtol=1e-12, atol=1e-15)


def test_metrics_sums_and_extremes():
    gen = torch.Generator().manual_seed(9)
    batch = random_policy_batch(gen, batch=4, length=25, spike_prob=0.1)
    out = _ours(batch, {})
    mask = batch["response_mask"].bool()
    d = (batch["logp"] - batch["old_logp"]).detach().clamp(-20, 20)
    assert out.sums["response_tokens"].item() == mask.sum().item()
    assert out.sums["ppo_kl"].item() == pytest.approx((-d[mask]).sum().item())
    assert out.sums["participation_masked"].item() == (d[mask] > math.log(10)).sum().item()
    assert out.maxes["influence_weight_max"].item() == out.influence_weight[mask].max().item()
    assert out.mins["influence_weight_min"].item() == out.influence_weight[mask].min().item()
    assert out.sums["influence_weight"].item() == pytest.approx(out.influence_weight[mask].sum().item())
    empty = fipo_policy_loss(torch.zeros(2, 3, requires_grad=True), torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    assert empty.sums["kept_tokens"].item() == 0
    assert empty.maxes["influence_weight_max"].item() == -math.inf
    loss = empty.loss()
    assert loss.item() == 0 and loss.requires_grad


def test_bf16_inputs_compute_in_fp32():
    gen = torch.Generator().manual_seed(10)
    batch = random_policy_batch(gen, batch=2, length=10, dtype=torch.float32)
    logp = batch["logp"].detach().bfloat16().requires_grad_(True)
    out = fipo_policy_loss(logp, batch["old_logp"].bfloat16(), batch["advantages"], batch["response_mask"])
    assert out.per_token_loss.dtype == torch.float32
    (g,) = torch.autograd.grad(out.loss(), logp)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dual_clip_c=1.0), "dual_clip_c"),
        (dict(decay_rate=0.0), "decay_rate"),
        (dict(clip_low=1.0), "clip_low"),
        (dict(future_kl_clip_ratio=1.5), "future_kl_clip_ratio"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        fipo_policy_loss(x, x, torch.ones(2), torch.ones(2, 3), **kwargs)


def test_bad_shapes_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        fipo_policy_loss(x, torch.zeros(2, 4), torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="advantages"):
        fipo_policy_loss(x, x, torch.ones(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="packed"):
        fipo_policy_loss(x, x, torch.ones(2), torch.ones(2, 3), cu_seqlens=torch.tensor([0, 3, 6]))


def test_summarize_policy_metrics_means_over_response_tokens():
    gen = torch.Generator().manual_seed(12)
    batch = random_policy_batch(gen, batch=5, length=30, spike_prob=0.1)
    out = _ours(batch, {})
    summary = summarize_policy_metrics(out.sums, out.maxes, out.mins)
    mask = batch["response_mask"].bool()
    assert summary["influence_weight_mean"] == pytest.approx(out.influence_weight[mask].mean().item())
    assert summary["future_kl_mean"] == pytest.approx(out.future_kl[mask].mean().item())
    assert summary["dropped_sequence_frac"] == pytest.approx(out.dropped_sequences.float().mean().item())
    assert summary["influence_weight_max"] == out.influence_weight[mask].max().item()
    empty = fipo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.zeros(1, 2))
    summary = summarize_policy_metrics(empty.sums, empty.maxes, empty.mins)
    assert summary["pg_clipfrac"] == 0 and math.isnan(summary["influence_weight_max"])


def test_metric_key_constants_match_the_output():
    from megatron_fipo.algo.losses import MAX_KEYS, MIN_KEYS, SUM_KEYS

    gen = torch.Generator().manual_seed(13)
    out = _ours(random_policy_batch(gen, batch=2, length=5), {})
    assert tuple(out.sums) == SUM_KEYS and tuple(out.maxes) == MAX_KEYS and tuple(out.mins) == MIN_KEYS
