"""future_kl_cp on gloo (cp = 1, 2, 4 in one world-4 launch) against the single-process scan.

Each case is a random ragged pack (lengths in [1, 300], some shorter than 2*cp, some empty), a
random mask and random signal; every rank shards the full signal with the layout, runs the
distributed scan and returns its local values; the parent unshards them and compares with
``discounted_suffix_sum`` on the full pack and with a naive float64 loop.
"""

import pytest
import torch

from tests.dist.launcher import launch

CASES = 6
GAMMAS = [2.0 ** (-1.0 / 32), 2.0 ** (-1.0 / 4), 1.0, 0.0]


def _case(seed: int, dtype):
    gen = torch.Generator().manual_seed(seed)
    s = int(torch.randint(1, 9, (1,), generator=gen))
    lengths = torch.randint(1, 301, (s,), generator=gen)
    lengths[torch.rand(s, generator=gen) < 0.2] = int(torch.randint(1, 8, (1,), generator=gen))  # < 2*cp
    if s > 2:
        lengths[1] = 0  # an empty sequence in the pack
    n = int(lengths.sum())
    signal = torch.randn(n, generator=gen, dtype=dtype)
    mask = torch.rand(n, generator=gen) < 0.8
    signal = torch.where(mask, signal, torch.zeros_like(signal))
    if seed % 3 == 0:
        signal[:50] = 0.0  # an all-masked stretch (a whole short sequence, or a prefix)
    return lengths, signal, GAMMAS[seed % len(GAMMAS)]


def _worker(seeds):
    import torch.distributed as dist

    from megatron_fipo.parallel.cp_layout import build_cp_layout
    from megatron_fipo.parallel.cp_scan import future_kl_cp

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    groups = {1: None, 4: dist.group.WORLD}
    pair = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups[2] = pair[rank // 2]
    out = {}
    for cp in (1, 2, 4):
        cp_rank = rank % cp
        for seed in seeds:
            for dtype in (torch.float64, torch.float32):
                lengths, signal, gamma = _case(seed, dtype)
                layout = build_cp_layout(lengths, cp, cp_rank, align=2 * cp * (1 + seed % 2))
                local = future_kl_cp(layout.shard(signal), gamma, layout, groups[cp])
                out[(cp, seed, str(dtype))] = (cp_rank, local)
    dist.destroy_process_group()
    return out


def _naive(signal, lengths, gamma):
    out, offset = [], 0
    values = signal.double().tolist()
    for n in lengths.tolist():
        seq = values[offset:offset + n]
        acc, rev = 0.0, []
        for v in reversed(seq):
            acc = v + gamma * acc
            rev.append(acc)
        out += rev[::-1]
        offset += n
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.timeout(300)
def test_future_kl_cp_matches_single_process():
    from megatron_fipo.algo.future_kl import discounted_suffix_sum
    from megatron_fipo.parallel.cp_layout import build_cp_layout

    seeds = list(range(100, 100 + CASES))
    results = launch(_worker, 4, seeds, timeout=240)
    checked = 0
    for cp in (1, 2, 4):
        for seed in seeds:
            for dtype in (torch.float64, torch.float32):
                lengths, signal, gamma = _case(seed, dtype)
                key = (cp, seed, str(dtype))
                # the ranks of one CP group: cp=2 -> ranks {0, 1} (and {2, 3}), cp=4 -> all
                for base in range(0, 4, cp):
                    parts = [None] * cp
                    for r in range(base, base + cp):
                        cp_rank, local = results[r][key]
                        parts[cp_rank] = local
                    layout = build_cp_layout(lengths, cp, 0, align=2 * cp * (1 + seed % 2))
                    got = layout.unshard(parts)
                    cu = layout.cu_seqlens
                    ref = discounted_suffix_sum(signal, gamma, cu_seqlens=cu)
                    naive = _naive(signal, lengths, gamma)
                    assert got.dtype == dtype
                    scale = max(float(naive.abs().max()) if naive.numel() else 0.0, 1.0)
                    if dtype == torch.float64:
                        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12 * scale)
                        torch.testing.assert_close(got, naive, rtol=1e-12, atol=1e-12 * scale)
                    else:
                        torch.testing.assert_close(got.double(), naive, rtol=1e-6, atol=1e-6 * scale)
                    checked += 1
    assert checked == (4 + 2 + 1) * CASES * 2  # CP groups per size: 4 of cp=1, 2 of cp=2, 1 of cp=4
