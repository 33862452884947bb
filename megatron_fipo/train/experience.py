"""One training step's experience: generation rounds, rewards, overlong shaping, GRPO advantages, dynamic sampling.

Owns ``collect_experience`` (run on global rank 0, which drives the rollout engine), the
``Experience`` it returns (and its ``shares``, one per data-parallel rank: ``data.batches.RankShare``),
``rollout_seed`` and ``split_step`` (the data-parallel split of each mini-batch:
token-balanced by ``data.balance``). Composition of ``algo`` functions and a ``RolloutEngine``; no
megatron, no process groups.

DAPO's loop, as in the spec: draw ``prompts_per_step`` prompts, sample ``n`` responses each,
score them, add the overlong penalty, drop groups whose ``acc`` (or score) does not vary, and
repeat with fresh prompts (at most ``max_gen_rounds`` rounds) until ``prompts_per_step`` groups
are kept; the kept groups are trimmed to that target. Advantages are computed on the kept groups
(a group's advantage depends only on its own rewards, so this equals computing them first).
Departure: every round draws ``prompts_per_step`` prompts (DAPO draws a 3x larger first batch).

Within a round the engine streams groups (``RolloutEngine.generate_groups``, completion order)
and each is submitted for scoring at once; groups and rewards are then put back in request order,
so the experience and its metrics do not depend on which group finished first.
"""
from __future__ import annotations

import math
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from megatron_fipo.algo.advantages import (
    dynamic_sampling_filter,
    dynamic_sampling_step,
    grpo_advantages,
    overlong_penalty,
)
from megatron_fipo.data.balance import balanced_partition, max_over_mean, sample_cost
from megatron_fipo.data.batches import MiniBatch, RankShare
from megatron_fipo.rollout.engine import EngineError, GenerationRequest, SamplingParams


@dataclass
class PromptItem:
    """A tokenized problem: what the loader hands to the rollout."""

    prompt_ids: tuple
    ground_truth: str
    uid: str = ""


@dataclass
class Experience:
    """The kept groups of one step, ``n`` consecutive samples per prompt.

    Attributes:
        prompts, responses: token ids per sample.
        rollout_logp: the engine's log-prob of every response token, per sample (float32).
        advantages: ``[N]`` float32 GRPO advantage per sample.
        n: samples per prompt.
        versions: the weight version that drew each sample.
        metrics: ``train/...`` rollout metrics (over every generated sample, all rounds).
    """

    prompts: list = field(default_factory=list)
    responses: list = field(default_factory=list)
    rollout_logp: list = field(default_factory=list)
    advantages: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    n: int = 1
    metrics: dict = field(default_factory=dict)
    versions: list = field(default_factory=list)
    """The weight version that drew each sample (``Sample.weight_version``: its first token's)."""
    token_versions: list = field(default_factory=list)
    """Per sample, the weight version of every response token (``Sample.versions()``)."""

    @property
    def num_groups(self) -> int:
        return len(self.prompts) // self.n

    def select_groups(self, groups: Sequence[int]) -> "Experience":
        """The experience of prompt groups ``groups`` only (in that order; same metrics)."""
        idx = [g * self.n + j for g in groups for j in range(self.n)]
        return Experience([self.prompts[i] for i in idx], [self.responses[i] for i in idx],
                          [self.rollout_logp[i] for i in idx], self.advantages[idx], self.n, dict(self.metrics),
                          [self.versions[i] for i in idx],
                          [self.token_versions[i] for i in idx] if self.token_versions else [])

    def to_state(self) -> dict:
        """Tensors, lists and numbers only (``torch.save`` with ``weights_only`` loading)."""
        return {"prompts": self.prompts, "responses": self.responses, "rollout_logp": self.rollout_logp,
                "advantages": self.advantages, "n": self.n, "metrics": self.metrics, "versions": self.versions,
                "token_versions": self.token_versions}

    @classmethod
    def from_state(cls, state: dict) -> "Experience":
        versions = list(state["versions"])
        token_versions = state.get("token_versions") or [[v] * len(r) for v, r in zip(versions, state["responses"])]
        return cls(state["prompts"], state["responses"], state["rollout_logp"], state["advantages"], int(state["n"]),
                   dict(state["metrics"]), versions, list(token_versions))

    def costs(self, hidden_size: int) -> list:
        """Each sample's training cost (``data.balance.sample_cost``: tokens plus attention)."""
        return [sample_cost(len(p), len(r), hidden_size) for p, r in zip(self.prompts, self.responses)]

    def split(self, mini_batch_prompts: int, dp_size: int, *,
              costs: Optional[Sequence[float]] = None) -> list[list[list[int]]]:
        """Sample indices per mini-batch, per data-parallel rank (``split_step``): balanced on ``costs``
        (the trainer's: ``costs(hidden_size)``), round-robin without."""
        return split_step(len(self.prompts), self.n, mini_batch_prompts, dp_size, costs=costs)

    def shares(self, split: list[list[list[int]]], dp_size: int) -> list[RankShare]:
        """The ``RankShare`` of every data-parallel rank of a ``split`` (rank ``r``: item ``r``)."""
        return [RankShare([self._mini_batch(parts[r]) for parts in split]) for r in range(dp_size)]

    def _mini_batch(self, idx: list) -> MiniBatch:
        return MiniBatch(prompts=[self.prompts[i] for i in idx], responses=[self.responses[i] for i in idx],
                         advantages=self.advantages[idx], rollout_logp=[self.rollout_logp[i] for i in idx])


def rollout_seed(base: int, step: int, round_: int, index: int, n: int) -> int:
    """Seed of request ``index`` of generation round ``round_`` of ``step`` (its sample j uses ``+ j``).

    Deterministic in its arguments, so a resumed run samples exactly what the interrupted one would.
    """
    return ((((base * 1_000_003 + step) * 131 + round_) * 1_000_033 + index * n) % (1 << 62))


def collect_experience(engine, draw: Callable[[int], Sequence[Any]], score: Callable, decode: Callable,
                       config, step: int, *, dp_size: int = 1, progress: bool = False,
                       submit: Optional[Callable] = None) -> Experience:
    """Generate, score and filter until a step's worth of informative groups is collected.

    Args:
        engine: a ``RolloutEngine`` holding the current weights.
        draw: ``draw(k)`` -> ``k`` prompt items (``.prompt_ids``, ``.ground_truth``) from the loader.
        score: ``score(texts, ground_truths)`` -> ``RewardResult`` list (the reward pool).
        decode: token ids -> text.
        config: the run ``Config`` (``rollout``, ``algo``, ``train`` sections).
        step: the training step (seeds the sampling).
        dp_size: data-parallel size; the kept groups are trimmed to a multiple that splits evenly.
        progress: show the engine's progress bar.
        submit: ``score`` without waiting: ``submit(texts, ground_truths)`` -> an object whose
            ``result()`` is ``score``'s answer (``RewardPool.submit``). Each group is submitted as
            the engine finishes it, so rewards are computed while other groups generate. Default:
            ``score`` at submission.

    Returns:
        ``Experience`` (possibly with zero groups when nothing informative was generated); equal
        whatever order the engine finishes the groups in.
    """
    ro, algo, target = config.rollout, config.algo, config.train.prompts_per_step
    submit = submit or _scored_at_once(score)
    kept, stats, rounds = [], RoundStats(), 0
    while True:
        rounds += 1
        items = list(draw(target))
        groups, results = _generate_round(engine, items, submit, decode, config, step, rounds, progress)
        lengths = torch.tensor([len(s.token_ids) for g in groups for s in g], dtype=torch.float64)
        scores, acc = shaped_scores(results, lengths, config)
        stats.add(scores, acc, lengths, [s.finish_reason for g in groups for s in g], ro.n)
        metric = acc if algo.filter_metric == "acc" else scores
        keep = dynamic_sampling_filter(metric, ro.n).keep_groups if algo.dynamic_sampling \
            else torch.ones(len(groups), dtype=torch.bool)
        kept += [(groups[g], scores[g * ro.n:(g + 1) * ro.n]) for g in range(len(groups)) if keep[g]]
        if not algo.dynamic_sampling:
            break
        decision = dynamic_sampling_step(kept, target_num_groups=target, rounds_done=rounds,
                                         max_rounds=algo.max_gen_rounds)
        if not decision.generate_more:
            break
    if len(kept) < target and algo.dynamic_sampling:
        if algo.on_exhausted == "error":
            raise RuntimeError(f"step {step}: only {len(kept)} of {target} prompt groups had varying rewards after "
                               f"{rounds} generation rounds (algo.max_gen_rounds); raise it or set "
                               "algo.on_exhausted=train_short")
        warnings.warn(f"step {step}: dynamic sampling kept {len(kept)} of {target} groups after {rounds} rounds; "
                      "training on the short batch", stacklevel=2)
    kept = kept[:even_groups(min(len(kept), target), ro.n, dp_size)]
    exp = assemble(kept, ro.n, algo)
    exp.metrics = {**stats.summary(), "train/gen_rounds": float(rounds), "train/kept_groups": float(len(kept))}
    return exp


def _generate_round(engine, items, submit: Callable, decode: Callable, config, step: int, round_: int,
                    progress: bool) -> tuple[list, list]:
    """The round's groups and rewards, both in request order; each group goes to ``submit`` as it arrives."""
    ro = config.rollout
    requests = [GenerationRequest(it.prompt_ids, SamplingParams(
        n=ro.n, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k, max_new_tokens=ro.max_response_length,
        stop_token_ids=tuple(ro.stop_token_ids), seed=rollout_seed(config.train.seed, step, round_, i, ro.n)))
        for i, it in enumerate(items)]
    groups: list = [None] * len(items)
    pending: list = [None] * len(items)
    for i, group in engine.generate_groups(requests, progress=progress):
        if not 0 <= i < len(items) or groups[i] is not None:
            raise EngineError(f"the engine returned request {i} of {len(items)} twice or out of range")
        groups[i] = group
        pending[i] = submit([decode(s.token_ids) for s in group], [items[i].ground_truth] * len(group))
    missing = [i for i, g in enumerate(groups) if g is None]
    if missing:
        raise EngineError(f"the engine did not return request(s) {missing[:5]} of {len(items)}")
    return groups, [r for p in pending for r in p.result()]


def shaped_scores(results, lengths: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, acc)`` float64 of reward results: the reward plus the overlong penalty on ``lengths``
    (``algo.overlong_buffer`` > 0), and the correctness."""
    ro, algo = config.rollout, config.algo
    scores = torch.tensor([r.score for r in results], dtype=torch.float64)
    if algo.overlong_buffer > 0:
        scores = scores + overlong_penalty(lengths, max_response_length=ro.max_response_length,
                                           buffer_length=algo.overlong_buffer,
                                           penalty_factor=algo.overlong_penalty_factor).double()
    return scores, torch.tensor([float(r.acc) for r in results], dtype=torch.float64)


def _scored_at_once(score: Callable) -> Callable:
    """``submit`` from a blocking ``score``: scores at submission, returns a done future."""
    def submit(texts, ground_truths) -> Future:
        done: Future = Future()
        done.set_result(score(texts, ground_truths))
        return done

    return submit


def even_groups(num_groups: int, n: int, dp_size: int) -> int:
    """Largest group count <= num_groups whose samples split evenly over dp_size ranks."""
    quantum = dp_size // math.gcd(n, dp_size)
    return num_groups - num_groups % quantum


def assemble(kept, n: int, algo) -> Experience:
    """``[(n samples, their n scores)]`` per kept group -> ``Experience`` with GRPO advantages."""
    exp = Experience(n=n)
    if not kept:
        return exp
    for samples, _ in kept:
        for s in samples:
            exp.prompts.append(list(s.prompt_ids))
            exp.responses.append(list(s.token_ids))
            exp.rollout_logp.append(torch.tensor(s.logprobs, dtype=torch.float32))
            exp.versions.append(int(s.weight_version))
            exp.token_versions.append(s.versions())
    scores = torch.cat([sc for _, sc in kept])
    exp.advantages = grpo_advantages(scores, n, normalize_std=algo.normalize_adv_std).float()
    return exp


class RoundStats:
    """Rollout metrics (``train/...``) over every sample generated and scored in one step: all the
    rounds of ``generate_experience``, or the groups ``train.pool.RolloutPool`` scored while
    collecting a step's batch."""

    def __init__(self):
        self.scores, self.acc, self.lengths, self.truncated, self.group_acc = [], [], [], 0, []
        self.start = time.perf_counter()

    def add(self, scores, acc, lengths, finish_reasons, n: int) -> None:
        self.scores.append(scores)
        self.acc.append(acc)
        self.lengths.append(lengths)
        self.truncated += sum(r == "length" for r in finish_reasons)
        self.group_acc.append(acc.view(-1, n).mean(dim=1))

    def lengths_seen(self) -> torch.Tensor:
        return torch.cat(self.lengths) if self.lengths else torch.zeros(0)

    def summary(self) -> dict:
        if not self.scores:
            return {"train/generated_samples": 0.0, "time/generate_s": time.perf_counter() - self.start}
        scores, acc, lengths = torch.cat(self.scores), torch.cat(self.acc), torch.cat(self.lengths)
        group_acc = torch.cat(self.group_acc)
        return {
            "train/reward_mean": float(scores.mean()), "train/acc_mean": float(acc.mean()),
            "train/response_length_mean": float(lengths.mean()), "train/response_length_max": float(lengths.max()),
            "train/truncated_frac": self.truncated / max(len(lengths), 1),
            "train/solve_all_frac": float((group_acc == 1).double().mean()),
            "train/solve_none_frac": float((group_acc == 0).double().mean()),
            "train/generated_samples": float(len(lengths)),
            "time/generate_s": time.perf_counter() - self.start,
        }


def split_step(num_samples: int, n: int, mini_batch_prompts: int, dp_size: int, *,
               costs: Optional[Sequence[float]] = None) -> list[list[list[int]]]:
    """Sample indices per mini-batch, per data-parallel rank: ``out[m][r]``, ascending.

    Mini-batch ``m`` holds prompt groups ``[m * M, (m + 1) * M)``. With ``costs`` (one per sample,
    ``data.balance.sample_cost``) its samples are shared over the ranks by
    ``data.balance.balanced_partition``, so every rank gets about the same work (sample counts may
    differ; the loss does not care: its denominator is the mini-batch's kept-token count over all
    ranks). Without, they are dealt round-robin (rank ``r``: positions ``r, r + dp, ...``; the
    benchmark's baseline). At ``dp_size == 1`` both give every sample, in order.
    """
    if dp_size < 1 or mini_batch_prompts < 1 or n < 1:
        raise ValueError(f"split_step needs dp_size, mini_batch_prompts and n >= 1, got {dp_size}, "
                         f"{mini_batch_prompts}, {n}")
    if costs is not None and len(costs) != num_samples:
        raise ValueError(f"{len(costs)} sample costs for {num_samples} samples")
    per_mb = mini_batch_prompts * n
    out = []
    for start in range(0, num_samples, per_mb):
        idx = list(range(start, min(start + per_mb, num_samples)))
        if costs is None:
            out.append([idx[r::dp_size] for r in range(dp_size)])
        else:
            out.append([[idx[j] for j in part] for part in balanced_partition([costs[i] for i in idx], dp_size)])
    return out


def split_balance(costs: Sequence[float], split: list[list[list[int]]]) -> float:
    """The worst mini-batch's max rank cost / mean rank cost (``train/dp_cost_max_over_mean``); 1.0 if none."""
    return max((max_over_mean(costs, parts) for parts in split), default=1.0)


def evaluate_items(engine, items: Sequence[Any], score: Callable, decode: Callable, *, n: int, temperature: float,
                   top_p: float, max_new_tokens: int, stop_token_ids: Sequence[int], seed: int,
                   progress: bool = False) -> tuple[dict, list]:
    """Avg@n / Cons@n / Pass@n of the engine's weights on ``items`` (the same seeds at every call).

    Returns:
        ``({"eval/avg@n": ..., "eval/cons@n": ..., "eval/pass@n": ..., "eval/response_length_mean": ...},
        per-problem records ``{"uid", "ground_truth", "responses", "preds", "acc"}``).
    """
    from megatron_fipo.algo.metrics import eval_metrics
    from megatron_fipo.rollout.engine import check_weight_version

    params = dict(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                  stop_token_ids=tuple(stop_token_ids))
    requests = [GenerationRequest(it.prompt_ids, SamplingParams(**params, seed=rollout_seed(seed, 0, 0, i, n)))
                for i, it in enumerate(items)]
    groups = engine.generate(requests, progress=progress)
    check_weight_version(groups, engine.weight_version)
    texts = [decode(x.token_ids) for g in groups for x in g]
    results = score(texts, [it.ground_truth for it in items for _ in range(n)])
    records = []
    for i, it in enumerate(items):
        rs = results[i * n:(i + 1) * n]
        records.append({"uid": getattr(it, "uid", str(i)), "ground_truth": it.ground_truth,
                        "responses": texts[i * n:(i + 1) * n], "preds": [r.pred for r in rs], "acc": [r.acc for r in rs]})
    out = {f"eval/{k}": v for k, v in eval_metrics([list(zip(r["preds"], r["acc"])) for r in records], k=n).items()}
    lengths = [len(x.token_ids) for g in groups for x in g]
    out["eval/response_length_mean"] = sum(lengths) / max(len(lengths), 1)
    return out, records
