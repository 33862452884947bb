"""GRPO group advantages and the DAPO scaffolding around them.

Owns the per-sequence quantities of the recipe in ``docs/algorithm.md``:
``grpo_advantages`` (``(R - mean_g) / (std_g + eps)`` within each prompt group, or mean-only),
``dynamic_sampling_filter`` and ``dynamic_sampling_step`` (DAPO's ``filter_groups``: keep groups
whose rewards are not all equal, regenerate up to a cap on rounds, trim to the target),
and ``overlong_penalty`` (DAPO's soft overlong reward shaping). Advantages stay one per sequence;
the loss broadcasts them over response tokens (``algo.losses.SequenceIndex``).

Imports torch and the stdlib only: no torch.distributed, no numpy, no megatron, no config
objects. Everything is a pure function of tensors / lists; no trainer state.

Departs from verl (the reference implementation of GRPO / DAPO) in three documented ways:

* A group whose rewards are all equal gets advantage exactly 0. That includes groups of size 1:
  verl sets ``mean = 0, std = 1`` for them, which passes the raw reward ``R / (1 + eps)``
  through as the advantage; here a lone sample has no group baseline and gets 0.
* "All equal" is decided exactly (group max == group min), not by ``std > 0`` on a float std
  that rounding can make ``1e-17`` for a group of identical non-dyadic values (``0.1``).
* The dynamic-sampling filter drops singleton groups (verl keeps them), consistently with
  their zero advantage.

The std is the unbiased one (``torch.std`` default, Bessel's correction ``n - 1``), like verl's
GRPO. Group statistics are computed with ``index_add_`` / ``scatter_reduce`` (no Python loop over
groups), in the input's dtype for float32 / float64.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence, TypeVar, Union

import torch


GroupSpec = Union[int, torch.Tensor, Sequence[int]]
"""A fixed group size ``n`` (samples ``[g * n, (g + 1) * n)`` form group ``g``), or one
integer group id per sample (any ints, any order, groups of unequal size)."""

_Items = TypeVar("_Items")


class GroupFilter(NamedTuple):
    """Result of ``dynamic_sampling_filter``.

    Attributes:
        keep_groups: ``[G]`` bool, one per group in order of first appearance in the batch.
        keep_samples: ``[N]`` bool, ``keep_groups`` of each sample's group.
        group_ids: ``[G]`` int64, the id of each group in the same order (``0..G-1`` for a fixed
            group size).
    """

    keep_groups: torch.Tensor
    keep_samples: torch.Tensor
    group_ids: torch.Tensor


class DynamicSamplingStep(NamedTuple):
    """Result of ``dynamic_sampling_step``.

    Attributes:
        generate_more: fewer kept groups than the target and rounds remain: run another round.
        exhausted: fewer kept groups than the target and ``max_rounds`` are used up. The caller
            decides whether to raise or to train on the short batch ``selected``.
        selected: the first ``target_num_groups`` kept groups (all of them when short), same
            type as the input, order preserved.
    """

    generate_more: bool
    exhausted: bool
    selected: object


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids_or_group_size: GroupSpec,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO advantages, normalised within each prompt group.

    ``A_i = (R_i - mean_g) / (std_g + eps)`` for sample ``i`` of group ``g``, with the unbiased
    std (``n - 1``); ``normalize_std=False`` gives ``A_i = R_i - mean_g`` (Dr.GRPO). Groups whose
    rewards are all equal (every group of size 1 among them) get exactly 0, never nan/inf.

    Args:
        rewards: ``[N]`` per-sequence scores. float32 / float64 are computed and returned in
            their dtype; other dtypes (half, int, bool) in float32.
        group_ids_or_group_size: a fixed group size ``n`` dividing ``N`` (contiguous groups), or
            ``[N]`` integer group ids (tensor or sequence; any values, any order).
        normalize_std: divide by ``std_g + eps`` (GRPO) or not (Dr.GRPO).
        eps: added to the std, ``>= 0`` (spec: ``1e-6``).

    Returns:
        ``[N]`` advantages in the compute dtype, without grad.

    Raises:
        ValueError: non-1-D or non-finite rewards, bad group spec, negative eps.
    """
    r = _check_values(rewards, "rewards")
    if not (math.isfinite(float(eps)) and float(eps) >= 0.0):
        raise ValueError(f"eps must be a finite number >= 0 (spec: 1e-6), got {eps}")
    index, group_ids = _group_index(r.shape[0], group_ids_or_group_size, r.device)
    num_groups = group_ids.numel()
    with torch.no_grad():
        count = torch.bincount(index, minlength=num_groups).to(r.dtype)
        mean = r.new_zeros(num_groups).index_add_(0, index, r) / count.clamp(min=1)
        dev = r - mean[index]
        if normalize_std:
            sq = r.new_zeros(num_groups).index_add_(0, index, dev * dev)
            std = torch.sqrt(sq / (count - 1).clamp(min=1))
            dev = dev / (std[index] + float(eps))
        constant = _group_constant(r, index, num_groups)
        return torch.where(constant[index], torch.zeros((), dtype=r.dtype), dev)


def dynamic_sampling_filter(
    rewards_or_metric: torch.Tensor, group_ids_or_group_size: GroupSpec
) -> GroupFilter:
    """DAPO dynamic sampling: keep the groups whose values are not all equal (reward std > 0).

    Groups of size 1 are dropped (their GRPO advantage is 0; verl keeps them).

    Args:
        rewards_or_metric: ``[N]`` per-sample score or metric (DAPO filters on ``acc`` or the
            score); any real dtype, finite.
        group_ids_or_group_size: as in ``grpo_advantages``.

    Returns:
        ``GroupFilter(keep_groups [G] bool, keep_samples [N] bool, group_ids [G] int64)``,
        groups in order of first appearance.

    Raises:
        ValueError: non-1-D or non-finite values, bad group spec.
    """
    v = _check_values(rewards_or_metric, "rewards_or_metric", fallback=torch.float64)
    index, group_ids = _group_index(v.shape[0], group_ids_or_group_size, v.device)
    keep_groups = ~_group_constant(v, index, group_ids.numel())
    return GroupFilter(keep_groups, keep_groups[index], group_ids)


def dynamic_sampling_step(
    kept_groups: _Items, *, target_num_groups: int, rounds_done: int, max_rounds: int
) -> DynamicSamplingStep:
    """Decide whether to generate another round, and trim the accumulated groups to the target.

    Call after each generation round with everything kept so far (round 1's kept groups, then
    round 2's, ...). DAPO: target 512 prompts, at most 10 rounds.

    Args:
        kept_groups: anything with ``len`` and slicing (list of group records, tensor of
            group ids / indices), one entry per kept group, in generation order.
        target_num_groups: prompts per training step, ``>= 1``.
        rounds_done: generation rounds run so far, ``>= 0``.
        max_rounds: cap on generation rounds, ``>= 1``.

    Returns:
        ``DynamicSamplingStep(generate_more, exhausted, selected)`` with
        ``selected = kept_groups[:target_num_groups]``.

    Raises:
        ValueError: non-integer or out-of-range counts.
    """
    _check_int(target_num_groups, "target_num_groups", 1)
    _check_int(rounds_done, "rounds_done", 0)
    _check_int(max_rounds, "max_rounds", 1)
    short = len(kept_groups) < target_num_groups
    return DynamicSamplingStep(
        generate_more=short and rounds_done < max_rounds,
        exhausted=short and rounds_done >= max_rounds,
        selected=kept_groups[:target_num_groups],
    )


def overlong_penalty(
    response_lengths: torch.Tensor,
    *,
    max_response_length: int,
    buffer_length: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO soft overlong punishment, to be added to the score.

    ``min(-(len - (max_len - buffer)) / buffer, 0) * factor``: 0 up to ``max_len - buffer``
    tokens, then linear down to ``-factor`` at ``max_len``.

    Args:
        response_lengths: ``[...]`` response token counts in ``[0, max_response_length]``
            (int or float).
        max_response_length: the rollout's response cap, ``>= 1`` (spec: 20480).
        buffer_length: the soft zone, ``1 <= buffer_length <= max_response_length`` (spec: 4096).
        penalty_factor: penalty at ``max_len``, ``>= 0`` (spec: 1.0).

    Returns:
        Penalties ``<= 0`` of the input's shape; float64 for float64 input, else float32.

    Raises:
        ValueError: bad sizes or factor, or lengths outside ``[0, max_response_length]``.
    """
    _check_int(max_response_length, "max_response_length", 1)
    _check_int(buffer_length, "buffer_length", 1)
    if buffer_length > max_response_length:
        raise ValueError(
            f"buffer_length ({buffer_length}) must be <= max_response_length ({max_response_length})"
        )
    factor = float(penalty_factor)
    if not (math.isfinite(factor) and factor >= 0.0):
        raise ValueError(f"penalty_factor must be a finite number >= 0, got {penalty_factor}")
    if not isinstance(response_lengths, torch.Tensor) or response_lengths.is_complex():
        raise ValueError("response_lengths must be a real tensor of token counts")
    lengths = response_lengths.detach().to(torch.float64)
    if lengths.numel() and not (torch.isfinite(lengths).all() and lengths.min() >= 0):
        raise ValueError("response_lengths must be finite and >= 0")
    if lengths.numel() and lengths.max() > max_response_length:
        raise ValueError(
            f"response length {int(lengths.max())} exceeds max_response_length "
            f"{max_response_length}: pass the rollout engine's response cap"
        )
    exceed = lengths - (max_response_length - buffer_length)
    penalty = torch.clamp(-exceed / buffer_length, max=0.0) * factor + 0.0  # + 0.0: no -0.0
    out_dtype = torch.float64 if response_lengths.dtype == torch.float64 else torch.float32
    return penalty.to(out_dtype)


def _check_values(x: torch.Tensor, name: str, fallback: torch.dtype = torch.float32) -> torch.Tensor:
    """1-D, finite, detached; float32/float64 kept, anything else as ``fallback``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.is_complex():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 1-D real tensor [N] (one value per sequence), got {shape}")
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(fallback)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite; got nan/inf at positions "
                         f"{torch.nonzero(~torch.isfinite(x)).flatten()[:8].tolist()}")
    return x


def _check_int(value: object, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _group_index(n: int, spec: GroupSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense group index ``[n]`` (groups numbered by first appearance) and the ``[G]`` ids."""
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        if spec < 1 or n % spec != 0:
            raise ValueError(
                f"group size must be a positive integer dividing the sample count {n}, got {spec}; "
                "pass per-sample group ids for groups of unequal size"
            )
        index = torch.arange(n, device=device) // int(spec)
        return index, torch.arange(n // int(spec), device=device)
    try:
        ids = spec if isinstance(spec, torch.Tensor) else torch.as_tensor(list(spec))
        if ids.numel() == 0:
            ids = ids.to(torch.int64)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(
            "group ids must be an int, or [N] integers (map string uids to ints first)"
        ) from err
    if ids.dim() != 1 or ids.numel() != n or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"group ids must be a 1-D integer tensor with one id per sample ({n}), got "
            f"{ids.dtype} {tuple(ids.shape)}"
        )
    uniq, inverse = torch.unique(ids.to(device=device, dtype=torch.int64), return_inverse=True)
    positions = torch.arange(n, device=device)
    first = torch.full((uniq.numel(),), n, dtype=torch.int64, device=device)
    first = first.scatter_reduce(0, inverse, positions, "amin", include_self=True)
    order = torch.argsort(first)  # sorted-unique slot of the k-th group to appear
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)
    return rank[inverse], uniq[order]


def _group_constant(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[G]`` bool: every value of the group is equal (exactly; always true for size 1)."""
    empty = x.new_zeros(num_groups)
    hi = empty.scatter_reduce(0, index, x, "amax", include_self=False)
    lo = empty.scatter_reduce(0, index, x, "amin", include_self=False)
    return hi == lo
