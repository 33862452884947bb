"""A process pool that scores rewards with a per-item wall-clock bound.

Owns ``RewardPool`` (reusable across trainer steps; ``score`` blocks, ``submit`` returns a
``PendingScores`` at once so the caller can keep generating) and ``score_batch`` (one-shot). A worker
past ``timeout_s`` on one item is killed and replaced, so hostile output or a pathological
math-verify parse never wedges training. Workers die with the process that started them, even
when it is SIGKILLed (``_die_with_parent``).

Imports the stdlib and ``algo.rewards`` only: no torch, no torch.distributed, no config objects.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from multiprocessing.connection import wait as _wait_connections
from typing import Callable, Mapping, Sequence, Union

from megatron_fipo.algo.rewards import ERROR, REWARD_FNS, TIMEOUT, RewardResult, as_text, make_result

_BOOT_TIMEOUT_S = 120.0

RewardFn = Union[str, Callable[[str, str], RewardResult]]


def _resolve(reward_fn: RewardFn) -> Callable[[str, str], RewardResult]:
    if callable(reward_fn):
        return reward_fn
    if isinstance(reward_fn, str) and reward_fn in REWARD_FNS:
        return REWARD_FNS[reward_fn]
    raise ValueError(f"unknown reward {reward_fn!r}: use one of {sorted(REWARD_FNS)} or a callable")


def _as_result(value: object) -> RewardResult:
    if isinstance(value, Mapping) and "score" in value:  # verl-style dict
        value = RewardResult(float(value["score"]), bool(value.get("acc", value["score"] > 0)), str(value.get("pred", "")))
    if isinstance(value, RewardResult):
        return value
    raise ValueError(f"a reward function must return RewardResult or a dict with 'score', got {type(value).__name__}")


# ----------------------------------------------------------------------------- process pool
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int, pdeathsig: bool) -> None:
    """End this worker when the process that started it dies, SIGKILL included.

    An idle worker would also see EOF on its pipe, but one busy in a reward function never looks,
    so a killed trainer would leave it (and through it multiprocessing's resource tracker, which
    waits for every holder of its pipe) running under init. Linux: ``prctl(PR_SET_PDEATHSIG)``,
    which fires when the parent *thread* that started us exits, so only when that was the main
    thread (``pdeathsig``); elsewhere, or without prctl, a daemon thread polls ``getppid()``.
    """
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent:  # the parent died before the signal was armed
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="reward-worker-parent-watch", daemon=True).start()


def _worker_main(conn, parent: int, pdeathsig: bool) -> None:
    """Worker loop: say ready, then score one pickled ``(fn, response, gt)`` at a time until EOF."""
    _die_with_parent(parent, pdeathsig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn.send(("ready", None))
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            fn, response, ground_truth = pickle.loads(payload)
            reply = ("ok", _as_result(fn(response, ground_truth)))
        except Exception:
            reply = ("err", traceback.format_exc(limit=20))
        conn.send(reply)


class _Worker:
    """One spawned worker, the parent's end of its pipe, and the item it is scoring."""

    def __init__(self, ctx) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        pdeathsig = threading.current_thread() is threading.main_thread()  # see _die_with_parent
        self.proc = ctx.Process(target=_worker_main, args=(child_conn, os.getpid(), pdeathsig), daemon=True,
                                name="reward-worker")
        self.proc.start()
        child_conn.close()
        self.ready, self.item = False, None
        self.deadline = time.monotonic() + _BOOT_TIMEOUT_S

    def stop(self) -> None:
        """Close the pipe (an idle worker exits on EOF), then terminate / kill, and reap."""
        self.conn.close()
        self.proc.join(0.5 if self.ready and self.item is None else 0)
        for end in (self.proc.terminate, self.proc.kill):
            if self.proc.is_alive():
                end()
                self.proc.join(2.0)


def _stop_workers(workers: list[_Worker]) -> None:
    while workers:
        workers.pop().stop()


class RewardPool:
    """Scores ``(response, ground_truth)`` pairs in spawned workers; reuse it across calls.

    A worker scores one item at a time. An item still running ``timeout_s`` after it was handed
    out scores -1 with ``pred == "[TIMEOUT]"``, and its worker is killed and replaced; a worker
    that dies mid-item gives ``"[ERROR]"``; an exception in the reward function fails its
    submission: ``score`` (or that submission's ``PendingScores.result``) raises ``RuntimeError``
    with the worker's traceback, other submissions go on. ``submit`` queues a batch and returns at
    once; the queue is worked off whenever the caller calls into the pool. Workers are spawned (safe beside torch / CUDA
    threads), so callables must be module-level and scripts need an ``if __name__ == "__main__"``
    guard. ``num_workers=0`` scores in-process with no pool-level time bound. Not thread-safe;
    ``close()`` (or ``with``) terminates and reaps every worker.

    Args:
        num_workers: worker processes (>= 0), started on first use.
        timeout_s: per-item wall-clock bound in seconds (> 0).
    """

    def __init__(self, num_workers: int, timeout_s: float) -> None:
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0 (0 = in-process), got {num_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self.num_workers, self.timeout_s = num_workers, float(timeout_s)
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._queue: deque = deque()  # (PendingScores, index, fn, (response, ground truth)) not handed out yet
        self._close = weakref.finalize(self, _stop_workers, self._workers)

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Terminate and reap all workers; the pool cannot be used afterwards."""
        self._close()

    def score(self, reward_fn: RewardFn, responses: Sequence[str], ground_truths: Sequence[str]) -> list[RewardResult]:
        """Score ``responses[i]`` against ``ground_truths[i]``; ``submit(...).result()``.

        Args:
            reward_fn: ``"dapo_math"``, ``"boxed_math"`` or a module-level ``fn(response, gt)``
                returning a ``RewardResult`` (or a verl-style dict).
            responses: decoded model outputs.
            ground_truths: reference answers, one per response.

        Returns:
            One ``RewardResult`` per item, in order.
        """
        return self.submit(reward_fn, responses, ground_truths).result()

    def submit(self, reward_fn: RewardFn, responses: Sequence[str], ground_truths: Sequence[str]) -> "PendingScores":
        """Queue the items and hand out what idle workers can take; returns without waiting.

        The workers score while the caller does other work; the pool has no thread of its own, so
        finished items are collected (and queued ones handed out, deadlines enforced) whenever the
        caller calls ``submit`` or ``PendingScores.result``. Submissions are scored first come,
        first served. With ``num_workers=0`` the items are scored here, before returning. Same
        arguments as ``score``.
        """
        if not self._close.alive:
            raise RuntimeError("this RewardPool is closed; create a new one")
        fn = _resolve(reward_fn)
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths: pass one per response")
        items = [(as_text(r, f"responses[{i}]"), as_text(g, f"ground_truths[{i}]", allow_numbers=True))
                 for i, (r, g) in enumerate(zip(responses, ground_truths))]
        pending = PendingScores(self, len(items))
        if self.num_workers == 0:
            pending.results[:] = [_as_result(fn(r, g)) for r, g in items]
            pending.left = 0
            return pending
        try:
            pickle.dumps(fn)
        except Exception as exc:
            raise ValueError(f"{fn!r} cannot be sent to a worker: use a module-level function or num_workers=0") from exc
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx))
        self._queue.extend((pending, i, fn, item) for i, item in enumerate(items))
        self._guarded(block=False)
        return pending

    def _wait(self, pending: "PendingScores") -> None:
        while not pending.finished:
            if not self._close.alive:
                raise RuntimeError("this RewardPool was closed before the items were scored")
            self._guarded(block=True)

    def _guarded(self, block: bool) -> None:
        """One ``_pump``; after an abort (a worker that could not start, SIGTERM unwinding) every
        unfinished submission fails and the busy workers are stopped (they would answer items
        nobody waits for); the next ``submit`` refills the pool."""
        try:
            self._pump(block)
        except BaseException as exc:
            for pending, *_ in [*self._queue, *(w.item for w in self._workers if w.item is not None)]:
                pending.fail(RuntimeError(f"scoring was aborted: {exc!r}"))
            self._queue.clear()
            _stop_workers([w for w in self._workers if w.item is not None])  # no spawning while unwinding
            self._workers[:] = [w for w in self._workers if w.item is None]  # in place: the finalizer holds it
            raise

    def _pump(self, block: bool) -> None:
        """Hand queued items to idle workers, then collect replies (waiting for the next reply or
        deadline when ``block``), until nothing more can be handed out."""
        while True:
            for i, worker in enumerate(self._workers):
                while self._queue and self._queue[0][0].finished:  # a failed submission's leftovers
                    self._queue.popleft()
                if self._queue and worker.ready and worker.item is None:
                    pending, idx, fn, item = self._queue.popleft()
                    try:
                        worker.conn.send_bytes(pickle.dumps((fn, *item)))
                        worker.item, worker.deadline = (pending, idx), time.monotonic() + self.timeout_s
                    except OSError:  # died while idle: retry the item on a fresh worker
                        self._queue.appendleft((pending, idx, fn, item))
                        self._replace(i)
            if not self._poll(block) or block:
                return

    def _replace(self, i: int) -> None:
        self._workers[i].stop()
        self._workers[i] = _Worker(self._ctx)

    def _poll(self, block: bool) -> bool:
        """Wait (``block``: for the next reply or deadline; else not at all); store replies, time
        out or replace workers. True when a worker became free."""
        waiting = [w for w in self._workers if w.item is not None or not w.ready]
        if not waiting:
            if block:
                raise RuntimeError("internal error: a submission is unfinished but no worker holds its items")
            return False
        timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic()) if block else 0.0
        ready, freed = set(_wait_connections([w.conn for w in waiting], timeout)), False
        for i, worker in enumerate(self._workers):
            if worker.conn in ready:
                try:
                    kind, value = worker.conn.recv()
                except (EOFError, OSError):
                    if worker.item is None:
                        raise RuntimeError(f"a reward worker exited while starting (exit code {worker.proc.exitcode})")
                    _store(worker.item, make_result(False, ERROR))
                    self._replace(i)
                    continue
                if kind == "err":
                    pending, idx = worker.item
                    pending.fail(RuntimeError(f"the reward function raised on item {idx}:\n{value}"))
                elif kind == "ok":
                    _store(worker.item, value)
                worker.ready, worker.item, freed = True, None, True
            elif worker in waiting and worker.deadline <= time.monotonic():
                if worker.item is None:
                    raise RuntimeError(f"a reward worker did not start within {_BOOT_TIMEOUT_S} s")
                _store(worker.item, make_result(False, TIMEOUT))
                self._replace(i)
        return freed


def _store(item: tuple["PendingScores", int], result: RewardResult) -> None:
    pending, idx = item
    if not pending.finished:
        pending.results[idx] = result
        pending.left -= 1


class PendingScores:
    """The results of one ``RewardPool.submit``, in submission order once ``result()`` returns."""

    def __init__(self, pool: RewardPool, size: int) -> None:
        self._pool, self.results, self.left, self.error = pool, [None] * size, size, None

    @property
    def finished(self) -> bool:
        """Every item is scored, or the submission failed."""
        return self.left == 0 or self.error is not None

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.error = error

    def result(self) -> list[RewardResult]:
        """Wait for every item (the pool scores other submissions meanwhile); raise the submission's error."""
        self._pool._wait(self)
        if self.error is not None:
            raise self.error
        return list(self.results)


def score_batch(reward_fn: RewardFn, responses: Sequence[str], ground_truths: Sequence[str], *,
                num_workers: int, timeout_s: float) -> list[RewardResult]:
    """One-shot ``RewardPool(num_workers, timeout_s).score(...)``, closed before returning.

    A trainer should keep one ``RewardPool`` open instead: workers are spawned once.

    Args:
        reward_fn: ``"dapo_math"``, ``"boxed_math"`` or a module-level ``fn(response, gt)``.
        responses: decoded model outputs.
        ground_truths: reference answers, one per response.
        num_workers: worker processes; 0 scores in-process (no pool-level time bound).
        timeout_s: per-item wall-clock bound in seconds.

    Returns:
        One ``RewardResult`` per item, in order.
    """
    with RewardPool(num_workers, timeout_s) as pool:
        return pool.score(reward_fn, responses, ground_truths)
