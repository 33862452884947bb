"""The decoupled rollout correction of fipo_policy_loss against a naive reference written from its definition.

``rho_t = exp(clamp(old_t - rollout_t, -20, 20))`` on response tokens; token_tis ``min(rho_t, C)``,
token_mis ``1[lo <= rho_t <= hi]``, seq_tis ``min(exp(sum log rho), C)``, seq_mis
``1[lo <= exp(sum log rho) <= hi]``, geo_mis ``1[lo <= exp(mean log rho) <= hi]`` per sequence; a
sequence without response tokens has weight 1. The factor multiplies the per-token loss of kept
tokens, detached, with the kept-token denominator unchanged; everything FIPO computes from the
probability shift (ratio, Future-KL, influence weight, clips, drop filter) stays on ``old_logp``.
"""

import math

import pytest
import torch

from megatron_fipo.algo.losses import (CORRECTION_MAX_KEYS, CORRECTION_SUM_KEYS, MAX_KEYS, ROLLOUT_CORRECTIONS,
                                       SUM_KEYS, fipo_policy_loss, summarize_policy_metrics)
from tests.helpers import fresh_seeds, random_policy_batch
from tests.unit.test_losses import naive_fipo

MODES = [m for m in ROLLOUT_CORRECTIONS if m != "none"]
KNOBS = [dict(), dict(correction_cap=0.7, correction_bounds=(0.8, 1.25)), dict(correction_cap=5.0,
                                                                              correction_bounds=(0.0, 2.0))]


def naive_weights(old, rollout, mask, mode, cap=2.0, bounds=(0.5, 5.0)):
    """``[B, T]`` correction weights and ``rho`` from the definitions, one Python float at a time."""
    lo, hi = bounds
    rows, length = old.shape
    w = [[1.0] * length for _ in range(rows)]
    rho = [[1.0] * length for _ in range(rows)]
    for b in range(rows):
        logs = []
        for t in range(length):
            if mask[b, t]:
                lr = min(max(float(old[b, t]) - float(rollout[b, t]), -20.0), 20.0)
                logs.append(lr)
                rho[b][t] = math.exp(lr)
                if mode == "token_tis":
                    w[b][t] = min(rho[b][t], cap)
                elif mode == "token_mis":
                    w[b][t] = 1.0 if lo <= rho[b][t] <= hi else 0.0
        if mode in ("seq_tis", "seq_mis", "geo_mis") and logs:
            total = sum(logs)
            if mode == "seq_tis":
                seq_w = min(math.exp(total), cap)
            else:
                stat = math.exp(total if mode == "seq_mis" else total / len(logs))
                seq_w = 1.0 if lo <= stat <= hi else 0.0
            for t in range(length):
                if mask[b, t]:  # reported as 1 outside the response (where the loss is 0 anyway)
                    w[b][t] = seq_w
    return torch.tensor(w, dtype=torch.float64), torch.tensor(rho, dtype=torch.float64)


def _batch(seed, rows, length, *, empty_rows=1, junk_outside=True):
    gen = torch.Generator().manual_seed(seed)
    batch = random_policy_batch(gen, batch=rows, length=length, spike_prob=0.15, empty_rows=empty_rows)
    old, mask = batch["old_logp"], batch["response_mask"].bool()
    noise = torch.randn(rows, length, generator=gen, dtype=torch.float64) * 0.2
    far = torch.rand(rows, length, generator=gen, dtype=torch.float64) < 0.1
    noise = torch.where(far, torch.randn(rows, length, generator=gen, dtype=torch.float64) * 3.0, noise)
    rollout = old - noise
    if junk_outside:  # positions outside the response must not matter, whatever they hold
        rollout = torch.where(mask, rollout, torch.full_like(rollout, float("nan")))
    batch["rollout_logp"] = rollout
    return batch


def _loss(batch, **kw):
    return fipo_policy_loss(batch["logp"], batch["old_logp"], batch["advantages"], batch["response_mask"],
                            decay_rate=8.0, **kw)


@pytest.mark.parametrize("knobs", KNOBS, ids=["defaults", "tight", "loose"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", fresh_seeds(2, base=61))
@pytest.mark.parametrize("length", [1, 9, 37])
def test_matches_naive_reference_values_metrics_and_gradients(mode, knobs, seed, length):
    batch = _batch(seed * 97 + length, rows=6, length=length)
    mask = batch["response_mask"].bool()
    out = _loss(batch, rollout_logp=batch["rollout_logp"], rollout_correction=mode, **knobs)
    plain = _loss(batch)
    ref_w, ref_rho = naive_weights(batch["old_logp"], batch["rollout_logp"], mask, mode, **{
        {"correction_cap": "cap", "correction_bounds": "bounds"}[k]: v for k, v in knobs.items()})

    # the weights, on response tokens (1 elsewhere)
    torch.testing.assert_close(out.correction_weight, ref_w, rtol=1e-12, atol=1e-12)
    # per-token loss = w * the naive FIPO loss of kept tokens (the reference of tests/unit/test_losses.py)
    ref_tok, ref_kept, _, _, ref_drop, _ = naive_fipo(batch["logp"], batch["old_logp"], batch["advantages"],
                                                      mask, decay_rate=8.0)
    torch.testing.assert_close(out.per_token_loss, ref_w * ref_tok, rtol=1e-12, atol=1e-12)
    # the FIPO rule: everything computed from the probability shift is untouched by the correction
    for name in ("future_kl", "influence_weight", "ratio", "kept_mask", "dropped_sequences"):
        assert torch.equal(getattr(out, name), getattr(plain, name)), name
    assert torch.equal(out.kept_mask, ref_kept) and torch.equal(out.dropped_sequences, ref_drop)
    # the denominator is unchanged: masked tokens still count
    assert float(out.sums["kept_tokens"]) == float(plain.sums["kept_tokens"]) == float(ref_kept.sum())
    # metrics
    assert float(out.sums["correction_weight"]) == pytest.approx(float(ref_w[mask].sum()), rel=1e-12, abs=1e-12)
    assert float(out.sums["correction_masked"]) == float((ref_w[mask] == 0).sum())
    want_max = float(ref_rho[mask].max()) if mask.any() else -math.inf
    assert float(out.maxes["correction_ratio_max"]) == pytest.approx(want_max, rel=1e-12)
    for key in SUM_KEYS:
        assert torch.equal(out.sums[key], plain.sums[key]), key
    assert tuple(out.sums) == SUM_KEYS + CORRECTION_SUM_KEYS and tuple(out.maxes) == MAX_KEYS + CORRECTION_MAX_KEYS
    # gradient w.r.t. logp: w_t times the uncorrected gradient, with the same denominator
    denom = max(int(ref_kept.sum()), 1)
    (grad,) = torch.autograd.grad(out.loss(denom), batch["logp"])
    (plain_grad,) = torch.autograd.grad(plain.loss(denom), batch["logp"])
    torch.testing.assert_close(grad, ref_w * plain_grad, rtol=1e-12, atol=1e-15)
    if ref_kept.any():
        total = (ref_w * ref_tok)[ref_kept].sum()
        (ref_grad,) = torch.autograd.grad(total / denom, batch["logp"])
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_modes_weight_and_mask_something():
    """The random cases above are not vacuous: with the settings used there, each mode keeps and
    changes (the masking modes: zeroes) tokens of both kinds of sequences somewhere."""
    batch = _batch(7, rows=12, length=37, empty_rows=0)
    mask = batch["response_mask"].bool()
    for mode in MODES:
        w = torch.cat([_loss(batch, rollout_logp=batch["rollout_logp"], rollout_correction=mode,
                             **knobs).correction_weight[mask] for knobs in KNOBS])
        assert (w != 1).any() and ((w == 1).any() or mode.endswith("tis")), mode
        if mode.endswith("mis"):
            assert (w == 0).any() and (w == 1).any(), mode
        else:
            assert ((w > 0) & (w != 1)).any(), mode


@pytest.mark.parametrize("seed", fresh_seeds(3, base=62))
def test_none_equals_omitting_the_argument_bit_for_bit(seed):
    batch = _batch(seed, rows=5, length=23)
    for kw in (dict(rollout_correction="none"), dict(rollout_correction="none", rollout_logp=batch["rollout_logp"],
                                                     correction_cap=0.3, correction_bounds=(0.9, 1.1))):
        out, plain = _loss(batch, **kw), _loss(batch)
        assert out.correction_weight is None
        for name in ("per_token_loss", "future_kl", "influence_weight", "ratio", "kept_mask", "dropped_sequences"):
            assert torch.equal(getattr(out, name), getattr(plain, name)), name
        for got, want in ((out.sums, plain.sums), (out.maxes, plain.maxes), (out.mins, plain.mins)):
            assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
        g1 = torch.autograd.grad(out.loss(), batch["logp"])[0]
        g0 = torch.autograd.grad(plain.loss(), batch["logp"])[0]
        assert torch.equal(g1, g0)
        summary = summarize_policy_metrics(out.sums, out.maxes, out.mins)
        assert not any(k.startswith("correction") for k in summary)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", fresh_seeds(3, base=63))
def test_packed_equals_padded_with_prompts_empty_and_length_one_sequences(mode, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 30, (7,), generator=gen)
    lengths[0], lengths[1] = 1, 0  # a one-token sequence and an empty one
    prompts = [int(torch.randint(0, int(n) + 1, (1,), generator=gen)) for n in lengths]  # some all-prompt
    rows, length = len(lengths), int(lengths.max())
    batch = _batch(seed + 5, rows=rows, length=length, empty_rows=0, junk_outside=False)
    pos = torch.arange(length).unsqueeze(0)
    mask = ((pos >= torch.tensor(prompts).unsqueeze(1)) & (pos < lengths.unsqueeze(1))).double()
    batch["response_mask"] = mask
    valid = pos < lengths.unsqueeze(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    logp = batch["logp"].detach()[valid].requires_grad_(True)
    packed = fipo_policy_loss(logp, batch["old_logp"][valid], batch["advantages"], mask[valid], cu_seqlens=cu,
                              decay_rate=8.0, rollout_logp=batch["rollout_logp"][valid], rollout_correction=mode)
    padded = _loss(batch, rollout_logp=batch["rollout_logp"], rollout_correction=mode)
    ref_w, _ = naive_weights(batch["old_logp"], batch["rollout_logp"], mask.bool(), mode)
    torch.testing.assert_close(packed.correction_weight, ref_w[valid], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed.per_token_loss, padded.per_token_loss[valid], rtol=1e-12, atol=1e-12)
    for key in SUM_KEYS + CORRECTION_SUM_KEYS:
        assert float(packed.sums[key]) == pytest.approx(float(padded.sums[key]), rel=1e-12, abs=1e-12), key
    assert float(packed.maxes["correction_ratio_max"]) == float(padded.maxes["correction_ratio_max"])
    g = torch.autograd.grad(packed.loss(), logp)[0]
    g_pad = torch.autograd.grad(padded.loss(), batch["logp"])[0]
    torch.testing.assert_close(g, g_pad[valid], rtol=1e-12, atol=1e-15)


def test_all_masked_and_no_response_tokens():
    batch = _batch(11, rows=4, length=12, empty_rows=0)
    out = _loss(batch, rollout_logp=batch["rollout_logp"], rollout_correction="token_mis",
                correction_bounds=(50.0, 60.0))  # every token outside
    mask = batch["response_mask"].bool()
    assert torch.all(out.per_token_loss == 0) and torch.all(out.correction_weight[mask] == 0)
    assert float(out.sums["correction_masked"]) == float(mask.sum())
    assert float(out.sums["kept_tokens"]) == float(_loss(batch).sums["kept_tokens"]) > 0  # denominator unchanged
    assert torch.all(torch.autograd.grad(out.loss(), batch["logp"])[0] == 0)
    summary = summarize_policy_metrics(out.sums, out.maxes, out.mins)
    assert summary["correction_masked_frac"] == 1.0 and summary["correction_weight_mean"] == 0.0
    # no response token anywhere: weight 1 (never masked, whatever the bounds / cap), nothing counted
    empty = dict(batch, response_mask=torch.zeros_like(batch["response_mask"]))
    for mode in MODES:
        out = _loss(empty, rollout_logp=batch["rollout_logp"], rollout_correction=mode, correction_cap=0.5,
                    correction_bounds=(2.0, 3.0))
        assert torch.all(out.correction_weight == 1), mode
        assert float(out.sums["correction_weight"]) == 0 and out.maxes["correction_ratio_max"] == -math.inf
        summary = summarize_policy_metrics(out.sums, out.maxes, out.mins)
        assert summary["correction_weight_mean"] == 0 and math.isnan(summary["correction_ratio_max"])


def test_summary_keys():
    batch = _batch(12, rows=5, length=20)
    out = _loss(batch, rollout_logp=batch["rollout_logp"], rollout_correction="token_tis")
    mask = batch["response_mask"].bool()
    summary = summarize_policy_metrics(out.sums, out.maxes, out.mins)
    plain = summarize_policy_metrics(*(lambda o: (o.sums, o.maxes, o.mins))(_loss(batch)))
    assert set(summary) - set(plain) == {"correction_weight_mean", "correction_masked_frac", "correction_ratio_max"}
    assert summary["correction_weight_mean"] == pytest.approx(out.correction_weight[mask].mean().item(), rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rollout_correction="token_is"), r"one of \['none', 'token_tis', 'token_mis', 'seq_tis', 'seq_mis', 'geo_mis'\]"),
    (dict(rollout_correction="auto"), "resolve 'auto'"),
    (dict(rollout_correction="token_tis"), "needs rollout_logp"),
    (dict(rollout_correction="seq_tis", rollout_logp=torch.zeros(2, 4)), "shape of logp"),
    (dict(correction_cap=0.0), "correction_cap"),
    (dict(correction_bounds=(1.0, 1.0)), "correction_bounds"),
    (dict(correction_bounds=(-0.1, 1.0)), "correction_bounds"),
    (dict(correction_bounds=(0.5,)), "correction_bounds"),
])
def test_bad_settings_raise(kwargs, match):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        fipo_policy_loss(x, x, torch.ones(2), torch.ones(2, 3), **kwargs)


# ---------------------------------------------------------------------------------------------- config
def test_auto_resolves_by_max_staleness():
    from megatron_fipo.config.schema import Config, load_config

    assert Config().algo.rollout_correction == "auto" and Config().rollout.max_staleness == 0
    assert Config().loss_kwargs()["rollout_correction"] == "none"
    for k, want in ((0, "none"), (1, "token_tis"), (3, "token_tis")):
        cfg = load_config(None, [f"rollout.max_staleness={k}"])
        assert cfg.loss_kwargs()["rollout_correction"] == want
        assert cfg.algo.resolved_correction(k) == want
    for mode in MODES + ["none"]:  # an explicit mode is kept at any staleness
        for k in (0, 2):
            assert load_config(None, [f"algo.rollout_correction={mode}", f"rollout.max_staleness={k}"]) \
                .loss_kwargs()["rollout_correction"] == mode
    kw = load_config(None, ["algo.correction_bounds=[1, 4]", "algo.correction_cap=3"]).loss_kwargs()
    assert kw["correction_bounds"] == (1.0, 4.0) and kw["correction_cap"] == 3.0
    assert {"rollout_correction", "correction_cap", "correction_bounds"} <= set(Config().loss_kwargs())


def test_config_mode_names_match_the_loss():
    from megatron_fipo.config.checks import ROLLOUT_CORRECTIONS as CONFIG_MODES

    assert CONFIG_MODES == ("auto",) + ROLLOUT_CORRECTIONS


@pytest.mark.parametrize("override, match", [
    ("algo.rollout_correction=tis", "algo.rollout_correction must be one of"),
    ("algo.correction_cap=0", "algo.correction_cap must be > 0"),
    ("algo.correction_cap=-1.5", "algo.correction_cap must be > 0"),
    ("algo.correction_bounds=[5, 0.5]", "algo.correction_bounds must be"),
    ("algo.correction_bounds=[0.5]", "algo.correction_bounds must be"),
    ("algo.correction_bounds=[-1, 2]", "algo.correction_bounds must be"),
    ("algo.correction_bounds=[a, 2]", "algo.correction_bounds must be"),
    ("rollout.max_staleness=-1", "rollout.max_staleness must be >= 0"),
])
def test_config_validation_errors(override, match):
    from megatron_fipo.config.schema import load_config, validate

    with pytest.raises(ValueError, match=match):
        validate(load_config(None, [override]), for_training=False)


def test_config_accepts_every_mode():
    from megatron_fipo.config.schema import load_config, validate

    for mode in ("auto",) + ROLLOUT_CORRECTIONS:
        validate(load_config(None, [f"algo.rollout_correction={mode}", "algo.correction_cap=0.5",
                                    "algo.correction_bounds=[0, 1.5]", "rollout.max_staleness=2"]),
                 for_training=False)
