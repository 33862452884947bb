"""cp_policy_loss on gloo (cp = 2 and 4 in one world-4 launch) against the single-process packed loss.

Random ragged packs (some sequences shorter than 2*cp), prompt/response masks, log-ratio spikes
past the dual-clip threshold (so the participation mask, the safety override and the drop filter
all fire, with drop decisions that need tokens of several ranks), advantages of both signs. Each
rank computes the loss of its shard and the gradient w.r.t. its local log-probs; the parent
unshards per-token results and gradients and compares them, and the summed metric sums, with
``fipo_policy_loss`` on the whole pack.
"""

import math

import pytest
import torch

from tests.dist.launcher import launch

SEEDS = list(range(40, 46))
SETTINGS = [dict(), dict(use_influence=False), dict(use_influence=False, drop_filter=False),  # DAPO
            dict(future_kl_clip_high_only=False, decay_rate=4.0),
            dict(dual_clip_c=None, clip_high=0.2),
            dict(negative_only_mask=True)]


def _case(seed):
    gen = torch.Generator().manual_seed(seed)
    s = int(torch.randint(2, 8, (1,), generator=gen))
    lengths = torch.randint(1, 200, (s,), generator=gen)
    lengths[0] = int(torch.randint(1, 8, (1,), generator=gen))
    n = int(lengths.sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    prompt = [int(torch.randint(0, max(int(l) // 2, 1), (1,), generator=gen)) for l in lengths]
    mask = torch.cat([(torch.arange(int(l)) >= p).double() for l, p in zip(lengths, prompt)])
    old = -torch.rand(n, generator=gen, dtype=torch.float64) * 3
    delta = torch.randn(n, generator=gen, dtype=torch.float64) * 0.3
    spikes = torch.rand(n, generator=gen, dtype=torch.float64) < 0.004 * (1 + seed % 3)
    delta = torch.where(spikes, math.log(10.0) + 0.5 + torch.rand(n, generator=gen, dtype=torch.float64), delta)
    adv_seq = torch.randn(s, generator=gen, dtype=torch.float64)
    adv = adv_seq.repeat_interleave(lengths)
    return dict(lengths=lengths, cu=cu, logp=old + delta, old=old, adv=adv, mask=mask)


def _worker():
    import torch.distributed as dist

    from megatron_fipo.parallel.cp_layout import build_cp_layout
    from megatron_fipo.parallel.cp_loss import cp_policy_loss

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    groups = {2: [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2], 4: dist.group.WORLD}
    out = {}
    for cp in (2, 4):
        for seed in SEEDS:
            c = _case(seed)
            layout = build_cp_layout(c["lengths"], cp, rank % cp)
            for i, settings in enumerate(SETTINGS):
                logp = layout.shard(c["logp"]).requires_grad_(True)
                res = cp_policy_loss(logp, layout.shard(c["old"]), layout.shard(c["adv"]), layout.shard(c["mask"]),
                                     layout=layout, group=groups[cp], **settings)
                res.per_token_loss.sum().backward()
                out[(cp, seed, i)] = dict(
                    cp_rank=rank % cp, loss=res.per_token_loss.detach(), kept=res.kept_mask, weight=res.influence_weight,
                    fkl=res.future_kl, grad=logp.grad, dropped=res.dropped_sequences,
                    sums={k: float(v) for k, v in res.sums.items()}, maxes={k: float(v) for k, v in res.maxes.items()},
                    mins={k: float(v) for k, v in res.mins.items()})
    dist.destroy_process_group()
    return out


@pytest.mark.timeout(300)
def test_cp_loss_matches_single_process():
    from megatron_fipo.algo.losses import fipo_policy_loss
    from megatron_fipo.parallel.cp_layout import build_cp_layout

    results = launch(_worker, 4, timeout=240)
    drops = 0
    for cp in (2, 4):
        for seed in SEEDS:
            c = _case(seed)
            layout = build_cp_layout(c["lengths"], cp, 0)
            for i, settings in enumerate(SETTINGS):
                logp = c["logp"].clone().requires_grad_(True)
                ref = fipo_policy_loss(logp, c["old"], c["adv"], c["mask"], cu_seqlens=c["cu"], **settings)
                ref.per_token_loss.sum().backward()
                for base in range(0, 4, cp):
                    got = {r["cp_rank"]: r for r in (results[q][(cp, seed, i)] for q in range(base, base + cp))}
                    parts = [got[r] for r in range(cp)]
                    for name, want in (("loss", ref.per_token_loss.detach()), ("kept", ref.kept_mask),
                                       ("weight", ref.influence_weight), ("fkl", ref.future_kl), ("grad", logp.grad)):
                        full = layout.unshard([p[name] for p in parts])
                        torch.testing.assert_close(full, want, rtol=1e-12, atol=1e-12, msg=f"{cp} {seed} {i} {name}")
                    for p in parts:  # the drop decision is the same on every CP rank
                        assert p["dropped"].tolist() == ref.dropped_sequences.tolist()
                    for key, want in ref.sums.items():
                        assert sum(p["sums"][key] for p in parts) == pytest.approx(float(want), rel=1e-12, abs=1e-9), key
                    for key, want in ref.maxes.items():
                        assert max(p["maxes"][key] for p in parts) == pytest.approx(float(want), rel=1e-12), key
                    for key, want in ref.mins.items():
                        assert min(p["mins"][key] for p in parts) == pytest.approx(float(want), rel=1e-12), key
                drops += int(ref.dropped_sequences.sum())
    assert drops > 0  # the drop filter fired in some cases (so its cross-rank count is exercised)
