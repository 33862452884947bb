"""Plain builder functions shared by the tests (no fixture chains)."""

from __future__ import annotations

import math

import torch


def fresh_seeds(n: int, base: int = 0) -> list[int]:
    """``n`` distinct seeds; a different set per test module via ``base``."""
    return [base * 1000 + i for i in range(n)]


def random_cu_seqlens(gen: torch.Generator, num_seqs: int, max_len: int, *, allow_empty: bool = True) -> torch.Tensor:
    """``[S + 1]`` int64 offsets of ``num_seqs`` random lengths in ``[0 or 1, max_len]``."""
    low = 0 if allow_empty else 1
    lengths = torch.randint(low, max_len + 1, (num_seqs,), generator=gen)
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])


def random_policy_batch(
    gen: torch.Generator,
    batch: int,
    length: int,
    *,
    dtype: torch.dtype = torch.float64,
    drift: float = 0.3,
    spike_prob: float = 0.05,
    empty_rows: int = 0,
) -> dict:
    """Random inputs for the policy loss on ``[B, T]`` padded rows.

    Log-ratios are ``N(0, drift)`` with a fraction ``spike_prob`` of tokens pushed above
    ``log(10)`` (ratios past the dual-clip threshold, which trigger the participation mask, the
    safety override and, twice in a negative sequence, the drop filter). Each row has a random
    response length (right padding); the first ``empty_rows`` rows have no response token.
    Advantages are per sequence, of both signs (and some zeros).
    """
    old = -torch.rand(batch, length, generator=gen, dtype=dtype) * 3.0
    delta = torch.randn(batch, length, generator=gen, dtype=dtype) * drift
    spikes = torch.rand(batch, length, generator=gen, dtype=dtype) < spike_prob
    delta = torch.where(spikes, math.log(10.0) + 0.1 + torch.rand(batch, length, generator=gen, dtype=dtype) * 3, delta)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[:empty_rows] = 0
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).to(dtype)
    adv = torch.randn(batch, generator=gen, dtype=dtype)
    adv[torch.rand(batch, generator=gen) < 0.1] = 0.0
    return {
        "logp": (old + delta).requires_grad_(True),
        "old_logp": old,
        "advantages": adv,
        "response_mask": mask,
    }


def alive_processes(procs: list) -> list:
    """The ``psutil.Process`` objects of ``procs`` still running (zombies, reaped or not, count as gone)."""
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out
