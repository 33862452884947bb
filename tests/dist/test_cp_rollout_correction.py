"""The rollout correction under context parallelism (gloo, cp = 2) against the single-process packed loss.

Every mode (the token modes need nothing from other ranks; the sequence modes sum each sequence's
log ratios over the CP group with one all-reduce) on random ragged packs with prompts, one-token
and prompt-only sequences, rollout log-probs that differ from the trainer's (junk outside the
response) and tight and default bounds, so sequences are both kept and masked. Each rank computes
its shard's loss, weights and gradient; the parent unshards them and compares them, and the summed
metrics, with ``fipo_policy_loss`` on the whole pack.
"""

import math

import pytest
import torch

from tests.dist.launcher import launch

SEEDS = (70, 71, 72)
MODES = ("token_tis", "token_mis", "seq_tis", "seq_mis", "geo_mis")
KNOBS = (dict(decay_rate=8.0), dict(decay_rate=8.0, correction_cap=0.7, correction_bounds=(0.8, 1.25)))


def _case(seed):
    gen = torch.Generator().manual_seed(seed)
    s = int(torch.randint(3, 8, (1,), generator=gen))
    lengths = torch.randint(1, 80, (s,), generator=gen)
    lengths[0], lengths[1] = 1, int(torch.randint(2, 5, (1,), generator=gen))  # shorter than 2 * cp chunks
    n = int(lengths.sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    prompt = [int(torch.randint(0, max(int(l) // 2, 1), (1,), generator=gen)) for l in lengths]
    prompt[1] = int(lengths[1])  # a sequence without response tokens
    mask = torch.cat([(torch.arange(int(l)) >= p).double() for l, p in zip(lengths, prompt)])
    old = -torch.rand(n, generator=gen, dtype=torch.float64) * 3
    delta = torch.randn(n, generator=gen, dtype=torch.float64) * 0.3
    spikes = torch.rand(n, generator=gen, dtype=torch.float64) < 0.01
    delta = torch.where(spikes, math.log(10.0) + 0.5 + torch.rand(n, generator=gen, dtype=torch.float64), delta)
    noise = torch.randn(n, generator=gen, dtype=torch.float64) * 0.15
    far = torch.rand(n, generator=gen, dtype=torch.float64) < 0.05
    noise = torch.where(far, torch.randn(n, generator=gen, dtype=torch.float64) * 2.0, noise)
    rollout = torch.where(mask.bool(), old - noise, torch.full_like(old, float("nan")))
    adv = torch.randn(s, generator=gen, dtype=torch.float64).repeat_interleave(lengths)
    return dict(lengths=lengths, cu=cu, logp=old + delta, old=old, rollout=rollout, adv=adv, mask=mask)


def _worker():
    import torch.distributed as dist

    from megatron_fipo.parallel.cp_layout import build_cp_layout
    from megatron_fipo.parallel.cp_loss import cp_policy_loss

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {}
    for seed in SEEDS:
        c = _case(seed)
        layout = build_cp_layout(c["lengths"], 2, rank)
        for mode in MODES:
            for i, knobs in enumerate(KNOBS):
                logp = layout.shard(c["logp"]).requires_grad_(True)
                res = cp_policy_loss(logp, layout.shard(c["old"]), layout.shard(c["adv"]), layout.shard(c["mask"]),
                                     layout=layout, group=dist.group.WORLD, rollout_logp=layout.shard(c["rollout"]),
                                     rollout_correction=mode, **knobs)
                res.per_token_loss.sum().backward()
                out[(seed, mode, i)] = dict(loss=res.per_token_loss.detach(), w=res.correction_weight, grad=logp.grad,
                                            mask=layout.shard(c["mask"]).bool(),
                                            sums={k: float(v) for k, v in res.sums.items()},
                                            maxes={k: float(v) for k, v in res.maxes.items()})
    dist.destroy_process_group()
    return out


@pytest.mark.timeout(120)
def test_cp_rollout_correction_matches_single_process():
    from megatron_fipo.algo.losses import fipo_policy_loss
    from megatron_fipo.parallel.cp_layout import build_cp_layout

    results = launch(_worker, 2, timeout=100)
    masked_sequences = 0
    for seed in SEEDS:
        c = _case(seed)
        layout = build_cp_layout(c["lengths"], 2, 0)
        for mode in MODES:
            for i, knobs in enumerate(KNOBS):
                logp = c["logp"].clone().requires_grad_(True)
                ref = fipo_policy_loss(logp, c["old"], c["adv"], c["mask"], cu_seqlens=c["cu"], rollout_logp=c["rollout"],
                                       rollout_correction=mode, **knobs)
                ref.per_token_loss.sum().backward()
                parts = [r[(seed, mode, i)] for r in results]
                mask = c["mask"].bool()
                for name, want in (("loss", ref.per_token_loss.detach()), ("grad", logp.grad)):
                    full = layout.unshard([p[name] for p in parts])
                    torch.testing.assert_close(full, want, rtol=1e-12, atol=1e-12, msg=f"{seed} {mode} {i} {name}")
                w = layout.unshard([p["w"] for p in parts])
                torch.testing.assert_close(w[mask], ref.correction_weight[mask], rtol=1e-12, atol=1e-12,
                                           msg=f"{seed} {mode} {i} weight")
                for key, want in ref.sums.items():
                    got = sum(p["sums"][key] for p in parts)
                    assert got == pytest.approx(float(want), rel=1e-12, abs=1e-9), (seed, mode, i, key)
                for key, want in ref.maxes.items():
                    assert max(p["maxes"][key] for p in parts) == pytest.approx(float(want), rel=1e-12), key
                if mode in ("seq_mis", "geo_mis"):
                    ids = torch.repeat_interleave(torch.arange(len(c["lengths"])), c["lengths"])
                    masked_sequences += int(ids[mask & (ref.correction_weight == 0)].unique().numel())
    assert masked_sequences > 0  # the cross-rank sums decided some sequences
