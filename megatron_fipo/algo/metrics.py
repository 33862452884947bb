"""Evaluation metrics over ``n`` sampled answers per problem: Avg@k, Cons@k and Pass@k.

Owns ``avg_at_k`` (mean accuracy), ``cons_at_k`` (majority vote over extracted answers),
``pass_at_k`` (chance that at least one of ``k`` samples is correct) and ``eval_metrics``, which
averages the three over problems (``docs/algorithm.md``, recipe table, evaluation row: AIME, 32 samples).
Values are fractions in ``[0, 1]`` (the paper reports percentages).

Pure Python: the stdlib, and ``rewards`` for the no-answer markers that do not vote. No torch,
no torch.distributed, no megatron, no config objects.

Departs from verl, which estimates these metrics by bootstrap resampling of ``k`` out of ``n``
samples: Pass@k here is the exact unbiased estimator ``1 - C(n - c, k) / C(n, k)`` (Chen et
al., 2021), computed as a product so it stays accurate for ``n`` up to thousands; Avg@k is the
mean over all ``n`` samples (an unbiased estimate of the expected accuracy for any ``k``); Cons@k
is one majority vote over the first ``k`` samples (with ``k == n``, the reported setting, all
three use every sample).
"""

from __future__ import annotations

from typing import Sequence

from megatron_fipo.algo.rewards import NO_ANSWER_PREDS


def _check_k(n: int, k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an int with 1 <= k <= n = {n} (the samples per problem), got {k!r}")


def avg_at_k(accs: Sequence[bool]) -> float:
    """Mean accuracy of one problem's samples.

    Args:
        accs: per-sample correctness (bool or 0/1), at least one.

    Returns:
        The fraction of correct samples.
    """
    if len(accs) == 0:
        raise ValueError("avg_at_k needs at least one sample")
    return sum(1 for acc in accs if acc) / len(accs)


def majority_index(preds: Sequence[str]) -> int | None:
    """Index of the first sample whose answer wins the majority vote.

    Rule: answers in ``rewards.NO_ANSWER_PREDS`` (``[INVALID]``, ``[TIMEOUT]``, ``[ERROR]``,
    empty) do not vote; the most frequent remaining answer wins; among equally frequent answers
    the one seen first wins.

    Args:
        preds: per-sample extracted (normalised) answers.

    Returns:
        The index of the winning answer's first occurrence, or None if nothing voted.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, pred in enumerate(preds):
        if pred in NO_ANSWER_PREDS:
            continue
        counts[pred] = counts.get(pred, 0) + 1
        first.setdefault(pred, i)
    if not counts:
        return None
    best = max(counts.values())
    return min(first[pred] for pred, count in counts.items() if count == best)


def cons_at_k(preds: Sequence[str], accs: Sequence[bool]) -> float:
    """Majority-vote accuracy of one problem (see ``majority_index`` for the voting rule).

    The vote is correct when the winning answer's first sample is correct (with exact-match
    rewards every sample of an answer has the same ``acc``). No valid answer scores 0.

    Args:
        preds: per-sample extracted answers.
        accs: per-sample correctness, same length.

    Returns:
        1.0 or 0.0.
    """
    if len(preds) != len(accs) or len(preds) == 0:
        raise ValueError(f"cons_at_k needs equal, non-zero numbers of preds and accs, got {len(preds)} and {len(accs)}")
    winner = majority_index(preds)
    return 1.0 if winner is not None and accs[winner] else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k of one problem: ``1 - C(n - c, k) / C(n, k)``.

    Computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``: no big binomials, accurate in
    float64 for any ``n`` (every factor is in ``[0, 1)``).

    Args:
        n: samples drawn (>= 1).
        c: correct samples among them (``0 <= c <= n``).
        k: budget (``1 <= k <= n``).

    Returns:
        The probability that a random ``k``-subset of the samples holds a correct one.
    """
    for name, value in (("n", n), ("c", c)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    _check_k(n, k)
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def eval_metrics(samples: Sequence[Sequence[tuple[str, bool]]], k: int | None = None) -> dict[str, float]:
    """Avg@k, Cons@k and Pass@k averaged over problems.

    Args:
        samples: per problem, its ``(pred, acc)`` pairs (``n >= 1`` per problem; ``n`` may vary).
        k: the budget, ``1 <= k <= n`` for every problem; default: the smallest ``n``.

    Returns:
        ``{"avg@k": ..., "cons@k": ..., "pass@k": ...}`` with the actual ``k`` in the keys
        (e.g. ``"pass@32"``), each the unweighted mean over problems.
    """
    if len(samples) == 0 or any(len(problem) == 0 for problem in samples):
        raise ValueError("eval_metrics needs at least one problem and at least one sample per problem")
    k = min(len(problem) for problem in samples) if k is None else k
    totals = {"avg": 0.0, "cons": 0.0, "pass": 0.0}
    for problem in samples:
        _check_k(len(problem), k)
        preds = [pred for pred, _ in problem]
        accs = [bool(acc) for _, acc in problem]
        totals["avg"] += avg_at_k(accs)
        totals["cons"] += cons_at_k(preds[:k], accs[:k])
        totals["pass"] += pass_at_k(len(accs), sum(accs), k)
    return {f"{name}@{k}": total / len(samples) for name, total in totals.items()}
