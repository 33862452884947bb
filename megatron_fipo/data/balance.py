"""Token-balanced data-parallel split: what a sample costs to train on, and how to share a mini-batch fairly.

Owns ``sample_cost`` (a sample's forward/backward cost in token units, attention included),
``balanced_partition`` (Karmarkar-Karp largest differencing over ``k`` parts) and
``max_over_mean`` (how uneven a split is). ``experience.split_step`` uses them to deal each
mini-batch's samples to the data-parallel ranks; the trainer logs the result as
``train/dp_cost_max_over_mean``.

Why: a step waits for its slowest data-parallel rank. FIPO responses run from a few hundred
tokens to the 20,480-token cap, so dealing samples round-robin leaves some ranks with more long
samples than others (``benchmarks/dp_balance.py``, the 32B recipe's 1,024-sample mini-batch: max /
mean rank cost 1.02-1.10 at dp = 4, 1.06-1.16 at dp = 8; balanced: 1.0000). The loss is
unaffected by the split: its denominator is the kept-token count of the whole mini-batch
(``mcore.actor``).

Pure Python (no torch).
"""
from __future__ import annotations

import heapq
import math
from typing import List, Sequence

ATTENTION_WEIGHT = 20.2
"""``c`` in ``sample_cost``: per-layer linear FLOPs / (h * causal-attention FLOPs / L), see there."""


def sample_cost(prompt_len: int, response_len: int, hidden_size: int) -> float:
    """A sample's training cost in token units: ``L + L**2 / (c * h)``, ``L = prompt_len + response_len``.

    Derivation, one Qwen2 decoder layer, hidden size ``h``, MLP size ``f``, one packed sequence of
    ``L`` tokens, forward FLOPs (a multiply-add is 2 FLOPs), grouped-query attention ignored
    (K and V projections taken as ``h x h``):

    * projections Q, K, V, O: ``4 * 2 * L * h**2``; SwiGLU MLP (gate, up ``h -> f``, down
      ``f -> h``): ``3 * 2 * L * h * f``. Linear part: ``2 * L * (4 * h**2 + 3 * h * f)``.
    * causal attention: query ``i`` meets ``i + 1`` keys, ``sum = L (L + 1) / 2 ~ L**2 / 2``
      pairs; ``Q K^T`` and ``softmax(.) V`` cost ``2 * h`` FLOPs per pair each:
      ``2 * L**2 * h`` (the flash kernels skip the masked half).

    Ratio attention / linear = ``2 L**2 h / (2 L (4 h**2 + 3 h f)) = L / (c h)`` with
    ``c = 4 + 3 f / h``. Qwen2.5 has ``f / h = 5.4`` (32B: 27648 / 5120; 7B: 18944 / 3584 = 5.29),
    so ``c = 4 + 16.2 = 20.2`` (``ATTENTION_WEIGHT``). Dividing the per-layer FLOPs by
    ``2 * c * h**2`` leaves ``L + L**2 / (c h)``; the backward pass is about twice the forward for
    both parts, so the ratio, and the cost up to a constant factor, holds for a training step and
    for the old-log-prob pass alike. Not counted: GQA (for 32B, 40 query / 8 KV heads, the K and
    V projections are ``h x h/5``: ``c = 2.4 + 16.2 = 18.6``), norms, RoPE and the vocabulary
    projection (linear in ``L``, about 2% of the linear FLOPs of the 64-layer 32B): a few percent
    on the quadratic weight, which moves a balanced split's max / mean by far less than that.

    At ``h = 5120`` a 20,480-token sample costs ``L * (1 + 0.198)``: attention adds ~20% to the
    longest samples and ~1% at 1,000 tokens, so long samples weigh more than their token count.
    """
    if prompt_len < 0 or response_len < 0 or hidden_size <= 0:
        raise ValueError(f"sample_cost needs non-negative lengths and a positive hidden size, got prompt_len="
                         f"{prompt_len}, response_len={response_len}, hidden_size={hidden_size}")
    length = float(prompt_len + response_len)
    return length + length * length / (ATTENTION_WEIGHT * hidden_size)


def balanced_partition(costs: Sequence[float], k: int) -> List[List[int]]:
    """Split item indices into ``k`` parts of near-equal cost (Karmarkar-Karp largest differencing).

    Every item starts as a ``k``-tuple of bins (its own bin and ``k - 1`` empty ones). Repeatedly
    the two tuples with the largest spread (largest bin sum - smallest) are merged, bin by bin, one
    tuple's largest bin with the other's smallest, until one tuple is left: its bins are the parts.
    Its largest part is at most ``(4/3 - 1/(3k))`` times the optimum (Michiels et al., "Performance
    ratios for the Karmarkar-Karp differencing method", 2007) and, on many items, typically within
    a small fraction of the mean. O(n log n + n k log k) time.

    Args:
        costs: non-negative, finite cost per item (``sample_cost``).
        k: number of parts (>= 1).

    Returns:
        ``k`` lists of indices, each sorted ascending, together holding every index once; ordered
        by their smallest index (part 0 holds index 0), empty parts last. ``k == 1`` returns
        ``[list(range(n))]``. Deterministic: ties are broken by index, never by hash or address.
        Every part is nonempty when ``len(costs) >= k``: within a tuple, empty bins (sum 0) sort
        below nonempty ones, even those of sum 0, so merging tuples with ``p`` and ``q`` nonempty
        bins pairs nonempty with empty bins first and gives ``min(p + q, k)`` nonempty bins; by
        induction a tuple of ``m`` items has ``min(m, k)``. With fewer than ``k`` items,
        ``k - len(costs)`` parts are empty.
    """
    if k < 1:
        raise ValueError(f"balanced_partition needs k >= 1 parts, got {k}")
    n = len(costs)
    for i, c in enumerate(costs):
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"balanced_partition needs finite non-negative costs; item {i} costs {c}")
    if k == 1:
        return [list(range(n))]
    if n == 0:
        return [[] for _ in range(k)]
    # A bin: (sum, tag, members). tag = 0 for a nonempty bin, 1 for an empty one, then the smallest
    # member, so sorting by (-sum, tag, first) puts empty bins last among equal sums. Members are a
    # cons tree ((left, right) tuples or an int) so a merge is O(1); flattened once at the end.
    heap = []
    for i, c in enumerate(costs):
        bins = [(float(c), 0, i, i)] + [(0.0, 1, n, None)] * (k - 1)
        heapq.heappush(heap, (-float(c), i, bins))  # spread = c - 0; ties: the tuple's smallest index
    while len(heap) > 1:
        _, id_a, a = heapq.heappop(heap)
        _, id_b, b = heapq.heappop(heap)
        merged = [_join(x, y) for x, y in zip(a, reversed(b))]  # a descending, b ascending
        merged.sort(key=lambda bin_: (-bin_[0], bin_[1], bin_[2]))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), min(id_a, id_b), merged))
    parts = [sorted(_flatten(members)) for _, _, _, members in heap[0][2]]
    return sorted(parts, key=lambda p: (not p, p[0] if p else 0))


def max_over_mean(costs: Sequence[float], parts: Sequence[Sequence[int]]) -> float:
    """The largest part's cost over the mean part cost (1.0 = perfectly even; 1.0 when everything costs 0)."""
    totals = [sum(costs[i] for i in part) for part in parts]
    mean = sum(totals) / max(len(totals), 1)
    return max(totals) / mean if mean > 0 else 1.0


def _join(x: tuple, y: tuple) -> tuple:
    """Two bins as one (sum, tag, smallest member, member tree)."""
    if x[3] is None:
        return y
    if y[3] is None:
        return x
    return (x[0] + y[0], 0, min(x[2], y[2]), (x[3], y[3]))


def _flatten(members) -> List[int]:
    out, stack = [], [members]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        if isinstance(node, int):
            out.append(node)
        else:
            stack.extend(node)
    return out
