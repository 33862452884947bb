"""Exact reduction of metric sums and extremes across ranks.

Owns ``reduce_metrics``: sums all-reduced with SUM, maxima with MAX and minima with MIN over each
given process group in turn (one collective per kind and group, values packed in one float64
vector in a fixed key order). Ranks that hold no value for a key (e.g. pipeline stages other than
the last, which computes the loss) pass the neutral element: 0 for sums, ``-inf`` for maxima,
``+inf`` for minima. So reducing over the pipeline group and then the data(-context)-parallel group
gives every rank the metrics of the whole mini-batch.

Imports torch and torch.distributed only; every collective takes an explicit group.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

Metrics = Dict[str, float]


def _vector(values: Mapping[str, object], keys: Sequence[str], neutral: float, sign: float = 1.0) -> torch.Tensor:
    return torch.tensor([sign * float(values[k]) if k in values else neutral for k in keys], dtype=torch.float64)


def reduce_metrics(
    sums: Mapping[str, object],
    maxes: Mapping[str, object],
    mins: Mapping[str, object],
    *,
    sum_keys: Sequence[str],
    max_keys: Sequence[str] = (),
    min_keys: Sequence[str] = (),
    groups: Sequence[Optional[dist.ProcessGroup]] = (),
    device: Optional[torch.device] = None,
) -> Tuple[Metrics, Metrics, Metrics]:
    """All-reduce metric dictionaries over ``groups``, one group after another.

    Args:
        sums, maxes, mins: this rank's values (0-dim tensors or numbers); missing keys count as
            the neutral element.
        sum_keys, max_keys, min_keys: the key order, identical on every rank.
        groups: process groups to reduce over (None entries and size-1 groups are skipped).
        device: where the collective buffers live (``cuda`` for NCCL; CPU by default).

    Returns:
        ``(sums, maxes, mins)`` as dicts of Python floats, equal on every rank of the groups.
    """
    s = _vector(sums, sum_keys, 0.0)
    e = torch.cat([_vector(maxes, max_keys, -math.inf), _vector(mins, min_keys, -math.inf, sign=-1.0)])
    if device is not None:
        s, e = s.to(device), e.to(device)
    for group in groups:
        if group is None or dist.get_world_size(group) == 1:
            continue
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
        if e.numel():
            dist.all_reduce(e, op=dist.ReduceOp.MAX, group=group)
    s, e = s.tolist(), e.tolist()
    n = len(max_keys)
    return (dict(zip(sum_keys, s)), dict(zip(max_keys, e[:n])),
            {k: -v for k, v in zip(min_keys, e[n:])})
