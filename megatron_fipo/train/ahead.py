"""Generation ahead of training: global rank 0's rollout producer for ``rollout.max_staleness`` = k >= 1.

Owns ``RolloutAhead`` (a background thread that collects the experience of future steps with the
weights the engine holds, while the actor trains on the current step), ``staleness_metrics`` and
the in-flight batches' checkpoint file (``save_in_flight`` / ``load_in_flight``). With k = 0 none
of this runs: the trainer collects each step's experience itself, as it always did.

The schedule (``rollout.stale_policy = wait``, the default) is fixed by the step numbers, not by
timing, so a run is reproducible and a resumed run equals an uninterrupted one:

* the batch of step ``s`` is generated with the weights synced after step ``max(0, s - 1 - k)``:
  after step ``u`` is finished (synced, evaluated, saved: ``advance(u)``) the producer may generate
  up to step ``u + k + 1``; at a fresh start steps ``1 .. k + 1`` are generated with the initial weights;
* before the weights change (``hold``: the sync after step ``u``, an evaluation, a checkpoint, a
  colocated release) the trainer waits until every batch up to step ``u + k`` is complete and the
  producer is idle, so weights never change under a running request and every sample is exactly
  ``min(s - 1, k)`` versions old when it is trained.

``stale_policy = drop``: the producer may generate one step further ahead (up to ``u + k + 2``),
so the engine waits less for the trainer; a batch it starts before the trainer's next sync is then
``k + 1`` versions old at its step, and its groups older than k are dropped when the step takes
them (``rollout/stale_dropped_groups``). Which batches those are depends on timing: such a run is
not reproducible run to run.

A checkpoint holds the completed batches of the steps after it (``rollouts_in_flight.pt``, written
by rank 0 into the checkpoint directory before it is published), and the data loader's position
after them, so a resumed run trains on exactly what the interrupted one would have.

Thread roles: the producer thread alone uses the engine (generation), the loader and the reward
pool while it runs; the trainer's thread uses them only while it holds the producer (``hold``).
Errors in the producer are raised in the trainer's thread at its next ``take`` or ``hold``.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Callable, Optional

import torch

from megatron_fipo.train.experience import Experience, collect_experience, even_groups
from megatron_fipo.rollout.engine import EngineError

IN_FLIGHT_FILE = "rollouts_in_flight.pt"
STALE_POLICIES = ("wait", "drop")


class RolloutAhead:
    """Rank 0's producer of future steps' experience (see the module docstring).

    Args:
        services: ``services.RolloutServices`` (engine, loader, reward pool).
        config: the run config (``rollout.max_staleness`` >= 1, ``rollout.stale_policy``).
        dp_size: data-parallel size (the kept groups split evenly over it).
        done_step: the last completed training step (0 for a fresh run).
        version: ``() -> int``, the weight version the engine must hold (``WeightSync.version``).
        restored: batches of steps after ``done_step`` read from the checkpoint.

    The producer starts held: call ``advance(done_step)`` once the engine may generate (after the
    evaluation at step 0, if any).
    """

    def __init__(self, services, config, *, dp_size: int, done_step: int, version: Callable[[], int],
                 restored: Optional[dict] = None):
        ro = config.rollout
        if ro.max_staleness < 1 or ro.stale_policy not in STALE_POLICIES:
            raise ValueError(f"RolloutAhead needs rollout.max_staleness >= 1 and stale_policy in {STALE_POLICIES}")
        self.services, self.config, self.dp_size, self.version = services, config, dp_size, version
        self.k, self.policy, self.last_step = ro.max_staleness, ro.stale_policy, config.train.steps
        self.ready: dict[int, Experience] = {s: e for s, e in (restored or {}).items() if s > done_step}
        self.next_step = max([done_step, *self.ready]) + 1  # the first step not generated yet
        self.allowed = done_step  # the last step the producer may generate (set by advance)
        self.held, self.running, self.closed = True, False, False
        self.error: Optional[BaseException] = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="rollout-ahead", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ trainer side
    def take(self, step: int) -> tuple[Experience, float]:
        """The experience of ``step`` (waiting for it) and the seconds waited."""
        start = time.perf_counter()
        with self.cond:
            if self.allowed < step:  # only before the first advance: nothing would ever produce it
                raise RuntimeError(f"step {step} was taken before the producer was allowed to generate it")
            self.cond.wait_for(lambda: step in self.ready or self.error is not None or self.closed)
            if step not in self.ready:  # a batch already generated is served before a later batch's error
                self._raise_error()
                raise RuntimeError("the rollout producer was closed")
            exp = self.ready.pop(step)
        return exp, time.perf_counter() - start

    def hold(self) -> None:
        """Wait until the producer is idle and (``wait`` policy) every batch it may generate is done; it
        then stays idle until ``advance``. Idempotent. Call before the engine's weights change and before
        the trainer's thread uses the engine, the loader or the reward pool."""
        with self.cond:
            if self.held:
                return
            if self.policy == "wait":  # the schedule's batches first: which weights draw a step never depends on timing
                self.cond.wait_for(lambda: self.next_step > self.allowed or self.error is not None or self.closed)
            self.held = True  # no new batch starts from now on
            self.cond.notify_all()
            self.cond.wait_for(lambda: not self.running or self.error is not None)
            self._raise_error()

    def advance(self, done_step: int) -> None:
        """Step ``done_step`` is finished (synced, evaluated, saved): generate up to its step ``+ k + 1``."""
        with self.cond:
            self._raise_error()
            self.allowed = min(done_step + self.k + 1 + (self.policy == "drop"), self.last_step)
            self.held = False
            self.cond.notify_all()

    def in_flight(self) -> dict[int, Experience]:
        """The completed batches of steps not trained yet (call while held)."""
        with self.cond:
            if self.running:
                raise RuntimeError("in_flight() while a batch is being generated: hold() first")
            return dict(self.ready)

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the batch being generated (the engine's shutdown ends it sooner)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.thread.join(timeout)

    # ------------------------------------------------------------------ producer side
    def _may_start(self) -> bool:
        return self.closed or (not self.held and self.next_step <= self.allowed)

    def _loop(self) -> None:
        cfg, services = self.config, self.services
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(self._may_start)
                    if self.closed:
                        return
                    step, self.running = self.next_step, True
                engine = services.engine
                if engine.weight_version != self.version():
                    raise EngineError(f"the engine holds weight version {engine.weight_version}, the actor "
                                      f"synced {self.version()}: a weight update was lost")
                exp = collect_experience(engine, services.draw, services.score, services.decode, cfg, step,
                                         dp_size=self.dp_size, progress=False, submit=services.submit_score)
                with self.cond:  # one step: a trainer that sees the producer idle also sees the batch it made
                    self.ready[step], self.next_step, self.running = exp, step + 1, False
                    self.cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - handed to the trainer's thread
            with self.cond:
                self.error = err
                self.running = False
                self.cond.notify_all()

    def _raise_error(self) -> None:
        if self.error is not None:
            raise EngineError(f"rollout generation ahead of training failed: {type(self.error).__name__}: "
                              f"{self.error}") from self.error


def staleness_metrics(exp: Experience, version: int, k: int, dp_size: int) -> tuple[Experience, dict]:
    """Drop the groups more than ``k`` versions older than ``version``; the age metrics of what was generated.

    Age of a sample = ``version`` (the weights the step trains from) minus the version that drew it.
    Returns the experience without the dropped groups (then trimmed again so that its samples split
    evenly over ``dp_size`` ranks) and ``rollout/staleness_mean`` / ``_max``, the histogram
    ``rollout/staleness_frac_{a}`` for a = 0 .. k (over the kept samples) and
    ``rollout/stale_dropped_groups``.
    """
    ages = [version - v for v in exp.versions]
    n = exp.n
    keep = [g for g in range(exp.num_groups) if max(ages[g * n:(g + 1) * n], default=0) <= k]
    dropped = exp.num_groups - len(keep)
    if dropped:
        exp = exp.select_groups(keep[:even_groups(len(keep), n, dp_size)])
        ages = [version - v for v in exp.versions]
    out = {"rollout/staleness_mean": sum(ages) / len(ages) if ages else 0.0,
           "rollout/staleness_max": float(max(ages, default=0)),
           "rollout/stale_dropped_groups": float(dropped)}
    counts = Counter(ages)
    for a in range(k + 1):
        out[f"rollout/staleness_frac_{a}"] = counts.get(a, 0) / len(ages) if ages else 0.0
    return exp, out


# ---------------------------------------------------------------------------------------- checkpoint file
def save_in_flight(path: str, batches: dict[int, Experience]) -> None:
    """Write the in-flight batches (``{step: Experience}``) to ``path`` (a file in a checkpoint being saved)."""
    torch.save({"format": 1, "batches": {s: e.to_state() for s, e in batches.items()}}, path)


def load_in_flight(checkpoint_dir: Optional[str]) -> dict[int, Experience]:
    """The in-flight batches saved with a checkpoint ({} when it holds none, e.g. a max_staleness=0 run's)."""
    if not checkpoint_dir:
        return {}
    path = os.path.join(checkpoint_dir, IN_FLIGHT_FILE)
    if not os.path.exists(path):
        return {}
    state = torch.load(path, weights_only=True)
    if state.get("format") != 1:
        raise ValueError(f"{path}: unknown in-flight rollout format {state.get('format')!r}")
    return {int(s): Experience.from_state(e) for s, e in state["batches"].items()}
