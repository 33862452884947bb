"""The long tail: continuous rollouts with over-sampling, partial rollouts and in-flight weight updates (rank 0).

Owns ``RolloutPool`` (``rollout.partial``: the groups in flight on the SGLang servers, carried from
step to step), the per-step figures users watch (``age_metrics``, ``engine_metrics``,
``count_metrics``) and the pool's checkpoint file (``POOL_FILE``). Composition of
``algo`` functions and the engine's streaming interface (``rollout/sglang_stream.py``); no
megatron, no process groups.

A step's batch (``collect``):

* The pool keeps ``ceil(oversample * prompts_per_step)`` groups in flight (``n`` samples each, one
  ``/generate`` per sample, a group's samples on one server). New prompts are drawn to top it up;
  at most ``max_gen_rounds`` times that many per step (dynamic sampling's bound on rounds).
* A group is scored when its ``n`` samples are finished; overlong shaping and dynamic sampling
  apply as in ``experience.collect_experience``. As soon as ``prompts_per_step`` kept groups are
  complete, the batch is formed from the first ones to complete; the other complete groups wait
  for the next step, and the groups still generating carry over (they are not waited for).
* With ``rollout.max_staleness`` k >= 1 the pool is topped up for the next step as soon as a
  batch is formed, so the servers generate while the actor trains: those samples start with
  weights one version behind the ones the next step trains from. No sample starts with weights
  more than k versions behind the trainer's; a sample that runs long keeps going across updates,
  each token carrying the version that produced it (``Sample.token_versions``) and its own
  rollout log-prob, so the age of its oldest tokens is not bounded by k. Nothing is dropped or
  truncated for age, so long answers are trained like short ones.

Weight changes: with ``rollout.inflight_updates`` the engine pauses its servers (``retract``)
around the update and the running samples simply continue. Otherwise (colocated servers, which
free their memory for training; or disaggregated without in-flight updates), ``interrupt`` aborts
every running sample before the weights change: each comes back with its tokens so far, and the
next ``collect`` continues it from prompt + partial response with a new request, its earlier tokens'
log-probs and versions kept. A checkpoint interrupts too, and holds every unfinished sample
(tokens, log-probs, versions, seeds) and the complete groups not yet trained, so a resumed run
continues them. Which samples land in which step depends on timing: runs with the pool are not
reproducible run to run (``max_staleness=0`` without ``partial`` is, bit for bit).
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from megatron_fipo.algo.advantages import dynamic_sampling_filter
from megatron_fipo.rollout.engine import EngineError, GenerationRequest, Sample, SamplingParams
from megatron_fipo.train.experience import (Experience, PromptItem, RoundStats, assemble, even_groups, rollout_seed,
                                            shaped_scores)

POOL_FILE = "rollout_pool.pt"


@dataclass
class _Piece:
    """One sample of a group: its tokens so far (all pieces), and the request running now."""

    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    versions: list = field(default_factory=list)
    restarts: int = 0  # continuations so far
    finish: Optional[str] = None  # "stop" / "length" once finished
    future: Any = None


@dataclass
class _Group:
    gid: int
    item: PromptItem
    seed: int
    pieces: list
    scores: Optional[torch.Tensor] = None  # once scored
    acc: Optional[torch.Tensor] = None

    @property
    def finished(self) -> bool:
        return all(p.finish is not None for p in self.pieces)


class RolloutPool:
    """Rank 0's groups in flight (see the module docstring).

    Args:
        services: ``services.RolloutServices`` (an engine with ``submit`` / ``abort_running``).
        config: the run config (``rollout.partial``; ``oversample``, ``max_staleness``, ``inflight_updates``).
        dp_size: data-parallel size (the batch splits evenly over it).
        state: a checkpoint's pool (``state_dict``), continued.
    """

    def __init__(self, services, config, *, dp_size: int, state: Optional[dict] = None):
        self.services, self.config, self.dp_size = services, config, dp_size
        ro, tr = config.rollout, config.train
        self.want = math.ceil(ro.oversample * tr.prompts_per_step)
        self.groups: dict[int, _Group] = {}  # generating, or finished and not yet scored
        self.complete: list[_Group] = []  # scored and kept, waiting for a batch (completion order)
        self.next_gid = 0
        self.counts = Counter()  # cumulative token counts (aborted, wasted, ...)
        if state:
            self._restore(state)

    # ------------------------------------------------------------------ a step's batch
    def collect(self, step: int) -> Experience:
        """Wait until ``prompts_per_step`` kept groups are complete (or no more may be drawn); the batch of ``step``."""
        ro, algo, target = self.config.rollout, self.config.algo, self.config.train.prompts_per_step
        start, drawn, carried_in, at_start = time.perf_counter(), 0, len(self.complete), len(self.groups)
        stats = RoundStats()
        continued = self._continue_partials()
        while len(self.complete) < target:
            rounds = algo.max_gen_rounds if algo.dynamic_sampling else 1
            drawn += self._top_up(step, budget=rounds * self.want - drawn)
            running = [p.future for g in self.groups.values() for p in g.pieces if p.future is not None]
            if not running:
                break  # nothing left to wait for: the prompts per step could not all be kept
            done, _ = wait(running, timeout=5.0, return_when=FIRST_COMPLETED)
            self._score(self._harvest(done), stats)
        batch, self.complete = self.complete[:target], self.complete[target:]
        if len(batch) < target and algo.dynamic_sampling and algo.on_exhausted == "error":
            raise RuntimeError(f"step {step}: only {len(batch)} of {target} prompt groups had varying rewards "
                               f"after {drawn} prompts (algo.max_gen_rounds); raise it or set "
                               "algo.on_exhausted=train_short")
        batch = batch[:even_groups(len(batch), ro.n, self.dp_size)]
        for g in batch:
            self.services.engine.forget_group(g.gid)
        if ro.max_staleness >= 1:
            self._top_up(step + 1, budget=self.want)  # the next step's samples generate while this one trains
        exp = assemble([(self._samples(g), g.scores) for g in batch], ro.n, algo)
        exp.metrics = {**stats.summary(), "train/kept_groups": float(len(batch)),
                       "train/gen_rounds": drawn / max(self.want, 1), "rollout/groups_carried_in": float(carried_in),
                       "rollout/groups_unfinished_in": float(at_start),
                       "rollout/continued_samples": float(sum(p.restarts > 0 for g in batch for p in g.pieces)),
                       "rollout/continued_started": float(continued),
                       "rollout/partial_carried": float(sum(p.finish is None for g in self.groups.values()
                                                            for p in g.pieces)),
                       "rollout/groups_in_flight": float(len(self.groups)),
                       **length_metrics("trained", [len(r) for r in exp.responses]),
                       **length_metrics("generated", [int(x) for x in stats.lengths_seen()]),
                       "time/generate_s": time.perf_counter() - start}
        return exp

    def _top_up(self, step: int, budget: int) -> int:
        """Draw and start new groups until ``want`` are in flight or waiting (at most ``budget``); how many."""
        ro = self.config.rollout
        k = min(max(budget, 0), self.want - len(self.groups) - len(self.complete))
        if k <= 0:
            return 0
        items = list(self.services.draw(k))
        for i, item in enumerate(items):
            gid = self.next_gid
            self.next_gid += 1
            group = _Group(gid, item, rollout_seed(self.config.train.seed, step, 0, gid, ro.n),
                           [_Piece() for _ in range(ro.n)])
            self.groups[gid] = group
            for j in range(ro.n):
                self._start(group, j)
        return len(items)

    def _start(self, group: _Group, j: int) -> None:
        """(Re)start sample ``j`` of ``group`` from its tokens so far."""
        ro, piece = self.config.rollout, group.pieces[j]
        left = ro.max_response_length - len(piece.tokens)
        seed = group.seed + j if not piece.tokens else (group.seed + j) * 1_000_003 + len(piece.tokens)
        params = SamplingParams(n=1, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                max_new_tokens=left, stop_token_ids=tuple(ro.stop_token_ids), seed=seed % (1 << 62))
        request = GenerationRequest(tuple(group.item.prompt_ids) + tuple(piece.tokens), params)
        piece.future = self.services.engine.submit(request, 0, group=group.gid)

    def _continue_partials(self) -> int:
        """Continue every unfinished sample that is not running (aborted at the last boundary, or restored from
        a checkpoint) from its prompt and partial response; how many were."""
        started = 0
        for group in self.groups.values():
            for j, piece in enumerate(group.pieces):
                if piece.finish is None and piece.future is None:
                    piece.restarts += 1
                    self._start(group, j)
                    started += 1
        return started

    def _harvest(self, done) -> list[_Group]:
        """Fold the finished requests into their samples; the groups that just finished all ``n``."""
        finished = []
        for group in list(self.groups.values()):
            was = group.finished
            for j, piece in enumerate(group.pieces):
                if piece.future is None or piece.future not in done:
                    continue
                sample: Sample = piece.future.result()  # an engine error ends the step here
                piece.future = None
                self._append(piece, sample)
                if sample.finish_reason == "abort":  # aborted by the server itself: continue it now
                    self.counts["aborted_tokens"] += len(sample.token_ids)
                    if piece.finish is None:
                        piece.restarts += 1
                        self._start(group, j)
            if group.finished and not was:
                finished.append(group)
        return finished

    def _append(self, piece: _Piece, sample: Sample) -> None:
        piece.tokens += list(sample.token_ids)
        piece.logprobs += list(sample.logprobs)
        piece.versions += sample.versions()
        if sample.finish_reason != "abort":
            piece.finish = sample.finish_reason
        elif len(piece.tokens) >= self.config.rollout.max_response_length:
            piece.finish = "length"

    def _score(self, finished: list[_Group], stats: RoundStats) -> None:
        ro, algo = self.config.rollout, self.config.algo
        decode, gt = self.services.decode, lambda g: [g.item.ground_truth] * ro.n
        pending = [(g, self.services.submit_score([decode(p.tokens) for p in g.pieces], gt(g))) for g in finished]
        for group, scores in pending:
            results = scores.result()
            lengths = torch.tensor([len(p.tokens) for p in group.pieces], dtype=torch.float64)
            score, acc = shaped_scores(results, lengths, self.config)
            group.scores, group.acc = score, acc
            stats.add(score, acc, lengths, [p.finish for p in group.pieces], self.config.rollout.n)
            del self.groups[group.gid]
            metric = acc if algo.filter_metric == "acc" else score
            if not algo.dynamic_sampling or bool(dynamic_sampling_filter(metric, ro.n).keep_groups[0]):
                self.complete.append(group)
            else:
                self.counts["wasted_tokens"] += int(lengths.sum())
                self.counts["filtered_groups"] += 1
                self.services.engine.forget_group(group.gid)

    @staticmethod
    def _samples(group: _Group) -> list[Sample]:
        out = []
        for j, p in enumerate(group.pieces):
            versions = tuple(p.versions) if len(set(p.versions)) > 1 else ()
            out.append(Sample(tuple(group.item.prompt_ids), list(p.tokens), list(p.logprobs), p.finish,
                              p.versions[0] if p.versions else 0, group.gid, j, versions))
        return out

    # ------------------------------------------------------------------ weight changes, checkpoints
    def interrupt(self) -> None:
        """Abort every running sample (each returns its tokens so far) and wait for the answers; the next
        ``collect`` continues them. Before weights change without in-flight updates, and before a checkpoint."""
        running = [p.future for g in self.groups.values() for p in g.pieces if p.future is not None]
        if not running:
            return
        self.services.engine.abort_running()
        wait(running, timeout=600.0)
        for group in self.groups.values():
            for piece in group.pieces:
                if piece.future is not None:
                    if not piece.future.done():
                        raise EngineError("a sample did not answer within 600 s of the servers' abort")
                    sample = piece.future.result()
                    piece.future = None
                    self.counts["aborted_tokens"] += len(sample.token_ids) if sample.finish_reason == "abort" else 0
                    self._append(piece, sample)
        finished = [g for g in self.groups.values() if g.finished]
        if finished:  # their scores count in no step's train/ metrics; they wait for the next batch
            self._score(finished, RoundStats())

    def state_dict(self) -> dict:
        """Every unfinished and waiting group (call after ``interrupt``): tensors, lists and numbers only."""
        if any(p.future is not None for g in self.groups.values() for p in g.pieces):
            raise RuntimeError("RolloutPool.state_dict() with samples running: interrupt() first")

        def group_state(g: _Group) -> dict:
            return {"gid": g.gid, "prompt_ids": list(g.item.prompt_ids), "ground_truth": g.item.ground_truth,
                    "uid": g.item.uid, "seed": g.seed, "scores": g.scores, "acc": g.acc,
                    "pieces": [{"tokens": p.tokens, "logprobs": p.logprobs, "versions": p.versions,
                                "restarts": p.restarts, "finish": p.finish} for p in g.pieces]}

        return {"format": 1, "next_gid": self.next_gid, "counts": dict(self.counts),
                "generating": [group_state(g) for g in self.groups.values()],
                "complete": [group_state(g) for g in self.complete]}

    def _restore(self, state: dict) -> None:
        if state.get("format") != 1:
            raise ValueError(f"unknown rollout pool format {state.get('format')!r}")

        def group(s: dict) -> _Group:
            pieces = [_Piece(list(p["tokens"]), list(p["logprobs"]), list(p["versions"]), int(p["restarts"]),
                             p["finish"]) for p in s["pieces"]]
            return _Group(int(s["gid"]), PromptItem(tuple(s["prompt_ids"]), s["ground_truth"], s["uid"]),
                          int(s["seed"]), pieces, s["scores"], s["acc"])

        self.next_gid = int(state["next_gid"])
        self.counts = Counter(state.get("counts", {}))
        self.groups = {g.gid: g for g in map(group, state["generating"])}
        self.complete = [group(s) for s in state["complete"]]

    def close(self) -> None:
        for group in self.groups.values():
            for piece in group.pieces:
                if piece.future is not None:
                    piece.future.cancel()


def length_metrics(kind: str, lengths: list[int]) -> dict:
    """Mean, median and 90th percentile of response lengths: ``rollout/{kind}_length_*``. The pool
    logs them for the samples trained in a step and for those finished (scored) in it, so a run shows
    whether carrying the long tail over biases training toward short answers."""
    if not lengths:
        return {}
    t = torch.tensor(lengths, dtype=torch.float64)
    return {f"rollout/{kind}_length_mean": float(t.mean()), f"rollout/{kind}_length_p50": float(t.quantile(0.5)),
            f"rollout/{kind}_length_p90": float(t.quantile(0.9))}


def age_metrics(exp: Experience, version: int, k: int) -> dict:
    """Token ages (``version`` minus the version that made each trained token) and sample start ages."""
    ages = [version - v for versions in exp.token_versions for v in versions]
    starts = [version - v for v in exp.versions]
    out = {"rollout/staleness_mean": sum(starts) / len(starts) if starts else 0.0,
           "rollout/staleness_max": float(max(starts, default=0)),
           "rollout/token_age_mean": sum(ages) / len(ages) if ages else 0.0,
           "rollout/token_age_max": float(max(ages, default=0))}
    counts = Counter(ages)
    for a in range(k + 1):
        out[f"rollout/token_age_frac_{a}"] = counts.get(a, 0) / len(ages) if ages else 0.0
    out[f"rollout/token_age_frac_over_{k}"] = sum(c for a, c in counts.items() if a > k) / len(ages) if ages else 0.0
    return out


def engine_metrics(before: dict, after: dict, capacity: int) -> dict:
    """The SGLang engine's figures between two ``stream_stats`` readings: generated tokens (and per second),
    decode-slot use (requests in flight over ``capacity`` per server), prefix-cache hits, server shares, and dead
    servers routed around (``rollout.sglang_failover``: deaths, rerouted requests, rejoins; servers live now)."""
    tokens = [b - a for a, b in zip(before["tokens"], after["tokens"])]
    wall = max(after["time"] - before["time"], 1e-9)
    busy = [b - a for a, b in zip(before["busy_s"], after["busy_s"])]
    out = {"rollout/generated_tokens": float(sum(tokens)), "perf/generated_tokens_per_s": sum(tokens) / wall,
           "rollout/slot_util": sum(busy) / (wall * capacity * len(busy)) if capacity else 0.0}
    prompt = after["prompt_tokens"] - before["prompt_tokens"]
    out["rollout/prefix_cache_hit"] = (after["cached_tokens"] - before["cached_tokens"]) / prompt if prompt else 0.0
    for i, t in enumerate(tokens):
        out[f"rollout/server{i}_token_share"] = t / sum(tokens) if sum(tokens) else 0.0
    for key in ("server_deaths", "rerouted_requests", "server_rejoins"):  # dead servers routed around
        out[f"rollout/{key}"] = float(after.get(key, 0) - before.get(key, 0))
    if "servers_live" in after:
        out["rollout/servers_live"] = float(after["servers_live"])
    return out


def count_metrics(before: Mapping, after: Mapping) -> dict:
    """The pool's token and group counts between two readings of ``RolloutPool.counts``."""
    return {f"rollout/{key}": float(after.get(key, 0) - before.get(key, 0))
            for key in ("aborted_tokens", "wasted_tokens", "filtered_groups")}


def save_pool(path: str, state: dict) -> None:
    torch.save(state, path)


def load_pool(checkpoint_dir: Optional[str]) -> Optional[dict]:
    """The pool saved with a checkpoint (None when it holds none)."""
    if not checkpoint_dir or not os.path.exists(os.path.join(checkpoint_dir, POOL_FILE)):
        return None
    return torch.load(os.path.join(checkpoint_dir, POOL_FILE), weights_only=True)
