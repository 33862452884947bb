"""The CPU server's scheduler: one decode loop that serves every running request together (continuous batching).

Owns ``Batcher`` (the loop thread, the waiting queue, the running batch, pause / continue / abort,
weight-version events, the step counters) and ``Job`` (one ``/generate`` request's state). Must not
import megatron, megatron_fipo.mcore or sglang.

The loop (a daemon thread) repeats, holding the server's lock (``cond``'s) for the whole iteration:
admit waiting requests while fewer than ``max_running`` run (one batched prefill of prompt +
output so far, which also draws their next token), then one decode step of the whole running
batch (``cpu_batch_kv``: left padding, attention mask, explicit positions). Requests that stop
(a ``stop_token_ids`` token, kept) or reach ``max_new_tokens`` leave the batch and get their
answer at once. Every request samples with its own generator, seeded ``sampling_seed`` as
``CPUEngine`` seeds a request's sample 0, and draws exactly once per token, so its tokens do not
depend on what else runs (its log-probs only up to the fp32 rounding of the batch shapes). The
loop waits (``cond``) while paused, while the model cannot serve (memory released, a weight update
part-way: its buckets land between steps, never inside a forward) or while there is nothing to do.
Control calls (pause, continue, abort, weight loads) take the same lock, so they act between two
iterations.

Pause modes (SGLang 0.5 ``io_struct.PauseGenerationReqInput``; new requests queue while paused,
in any mode, until ``continue_``):

* ``abort``: every running and waiting request ends now with its output so far and
  ``finish_reason`` ``{"type": "abort", ...}``.
* ``retract``: running requests go back to the front of the waiting queue with their output and
  generator; their KV is dropped and recomputed by the prefill that re-admits them after
  ``continue_`` (with the weights served then).
* ``in_place``: the loop stops; the running batch keeps its KV (after a weight update the old
  weights' KV of the tokens so far is attended by the new weights, as in SGLang).

Emulated timing (``decode_step_ms``): on a GPU a decode step is memory-bound, so up to the batch
capacity it costs about the same with 1 or ``max_running`` requests. Each decode step here takes at
least ``decode_step_ms``: the remainder is slept after the step, with the lock released (control
calls and new requests get in as they would between GPU steps), and the requests that ended in
the step are answered after it. Prefill is not emulated: an admission's prefill takes its real
CPU time and is not counted in the step. The counters (``stats``): decode steps, the sum over
steps of the running batch's size (decode-slot utilisation = ``running_sum / (decode_steps *
max_running)``, also reported), the largest batch, tokens generated, prefills, tokens recomputed
after retraction, retracted and aborted requests, pauses and time paused.
"""
from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_fipo import quiet_warnings
from megatron_fipo.rollout.cpu_accounting import PrefixCache, version_spans, versions_meta
from megatron_fipo.rollout.cpu_batch_kv import BatchKV, decode, prefill
from megatron_fipo.rollout.cpu_engine import row_generator, sample_rows
from megatron_fipo.rollout.engine import EngineError, SamplingParams

PAUSE_MODES = ("abort", "retract", "in_place")
# SGLang's finish reasons of an aborted running request (FINISH_ABORT) and of an aborted queued one
ABORTED_RUNNING = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
ABORTED_WAITING = {"type": "abort", "message": "Abort in waiting queue"}


@dataclass(eq=False)
class Job:
    """One ``/generate`` request: its input, its output so far and, once done, its answer (or error)."""

    prompt: tuple[int, ...]
    params: SamplingParams
    rid: str
    return_logprob: bool = False
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    events: list[tuple[str, int]] = field(default_factory=list)  # (old weight version, output tokens then)
    cached: Optional[int] = None  # prefix-cache hit at its first prefill
    answer: Optional[dict] = None
    error: Optional[str] = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.generator = row_generator(self.params, 0)


class Batcher:
    """The decode loop of the module docstring, started at construction.

    Args:
        model: the HF causal LM (its weights are changed only under ``cond``'s lock).
        cond: a condition on the server's lock (an ``RLock``): every method takes it.
        unusable: called under the lock; the reason the model cannot serve now, or None.
        version: called under the lock; the weight version served now (answers' spans).
        cache: the prefix-cache counters (``cpu_accounting.PrefixCache``).
        max_running: requests decoded together at most.
        decode_step_ms: the least time of one decode step (emulated timing).
    """

    def __init__(self, model, cond: threading.Condition, *, unusable: Callable[[], Optional[str]],
                 version: Callable[[], str], cache: PrefixCache, max_running: int = 64, decode_step_ms: float = 0.0):
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        quiet_warnings.install()  # the batch KV path passes the same renamed cache argument as CPUEngine
        if decode_step_ms < 0:
            raise ValueError(f"decode_step_ms must be >= 0, got {decode_step_ms}")
        self.model, self.cond, self.unusable, self.version, self.cache = model, cond, unusable, version, cache
        self.max_running, self.decode_step_s = max_running, decode_step_ms / 1000.0
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.kv: Optional[BatchKV] = None
        self.paused: Optional[str] = None
        self._paused_at = 0.0
        self._stop = False
        self._ended: Optional[list[Job]] = None  # jobs ended by the loop's current iteration
        self.counters = dict(decode_steps=0, running_sum=0, max_batch=0, tokens=0, prefills=0, prefill_rows=0,
                             recomputed_tokens=0, retracted=0, aborted=0, pauses=0, paused_s=0.0, version_events=0)
        self.thread = threading.Thread(target=self._loop, name="cpu-batcher", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ requests
    def submit(self, job: Job) -> Job:
        """Queue ``job`` (refused at once if the model cannot serve and the server is not paused)."""
        with self.cond:
            if self._stop:
                raise EngineError("the CPU server's batcher is stopped")
            reason = None if self.paused else self.unusable()
            if reason:
                raise EngineError(reason)
            if any(j.rid == job.rid for j in self.live()):
                raise ValueError(f"a request with rid {job.rid!r} is already running")
            self.waiting.append(job)
            self.cond.notify_all()
        return job

    def live(self) -> list[Job]:
        """Running then waiting requests."""
        with self.cond:
            return [*self.running, *self.waiting]

    # ------------------------------------------------------------------ control
    def pause(self, mode: str) -> None:
        """Pause in ``mode`` (module docstring); acts between two iterations of the loop."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        with self.cond:
            if self.paused is None:
                self._paused_at = time.monotonic()
                self.counters["pauses"] += 1
            self.paused = mode
            if mode == "abort":
                self.abort(abort_all=True)
            elif mode == "retract" and self.running:
                self.counters["retracted"] += len(self.running)
                self.waiting.extendleft(reversed(self.running))
                self.running, self.kv = [], None

    def continue_(self) -> None:
        with self.cond:
            if self.paused is not None:
                self.counters["paused_s"] += time.monotonic() - self._paused_at
                self.paused = None
            self.cond.notify_all()

    def abort(self, rid: str = "", abort_all: bool = False) -> int:
        """End the requests whose rid starts with ``rid`` (SGLang matches prefixes), or all; the number ended."""
        with self.cond:
            if not abort_all and not rid:
                return 0  # SGLang ignores it: an empty prefix would match every request
            hit = lambda j: abort_all or j.rid.startswith(rid)  # noqa: E731
            keep = [b for b, j in enumerate(self.running) if not hit(j)]
            ended = [j for j in self.running if hit(j)]
            for job in ended:
                self._finish(job, dict(ABORTED_RUNNING))
            if ended:
                self.running = [self.running[b] for b in keep]
                self.kv = self.kv.select(keep) if self.kv is not None else None
            queued = [j for j in self.waiting if hit(j)]
            self.waiting = deque(j for j in self.waiting if not hit(j))
            for job in queued:
                self._finish(job, dict(ABORTED_WAITING))
            self.counters["aborted"] += len(ended) + len(queued)
            return len(ended) + len(queued)

    def record_version_change(self, old: str) -> None:
        """The served version is about to change from ``old``: every live request with output records it."""
        with self.cond:
            for job in self.live():
                if job.tokens:
                    job.events.append((old, len(job.tokens)))
                    self.counters["version_events"] += 1

    def flush_refusal(self, deferred: bool = False) -> Optional[str]:
        """Why the prefix cache may not be flushed now (SGLang's rule), or None: not while requests run, nor
        while requests wait unless paused; a deferred flush (``/flush_cache?timeout=``) waits for no
        request waiting at all."""
        with self.cond:
            if self.running or (self.waiting and (deferred or not self.paused)):
                return (f"Cache not flushed because there are pending requests. #queue-req: {len(self.waiting)}, "
                        f"#running-req: {len(self.running)}")
            return None

    def stats(self) -> dict:
        with self.cond:
            out = dict(self.counters, max_running=self.max_running, decode_step_ms=self.decode_step_s * 1000.0,
                       running_batch=len(self.running), waiting=len(self.waiting), paused=self.paused)
            if self.paused is not None:
                out["paused_s"] += time.monotonic() - self._paused_at
            steps = self.counters["decode_steps"]
            out["slot_utilisation"] = self.counters["running_sum"] / (steps * self.max_running) if steps else 0.0
            return out

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still live end with an error."""
        with self.cond:
            self._stop = True
            self._fail_all("the CPU server's batcher was stopped")
            self.cond.notify_all()
        self.thread.join(timeout)

    # ------------------------------------------------------------------ the loop
    def _ready(self) -> bool:
        if self._stop:
            return True
        return not self.paused and bool(self.running or self.waiting) and not self.unusable()

    def _loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(self._ready)
                if self._stop:
                    return
                started, self._ended = None, []
                try:
                    self._admit()
                    if self.running:
                        started = time.monotonic()
                        self._decode()
                except Exception as err:  # a bug or a broken model: every live request fails, the loop goes on
                    traceback.print_exc()
                    self._fail_all(f"the CPU server's decode loop failed: {type(err).__name__}: {err}")
                    started = None
                ended, self._ended = self._ended, None
            if started is not None:
                rest = self.decode_step_s - (time.monotonic() - started)
                if rest > 0:
                    time.sleep(rest)
            for job in ended:  # answered when the step's (emulated) time is over
                job.done.set()

    def _admit(self) -> None:
        room = self.max_running - len(self.running)
        if room <= 0 or not self.waiting:
            return
        jobs = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        sequences = [list(j.prompt) + j.tokens for j in jobs]
        for job, seq in zip(jobs, sequences):
            if job.cached is None:
                job.cached = self.cache.prefill(job.prompt)
            else:  # re-admitted after a retraction: prompt + output so far computed again
                self.counters["recomputed_tokens"] += len(seq)
        logits, kv = prefill(self.model, sequences)
        self.counters["prefills"] += 1
        self.counters["prefill_rows"] += len(jobs)
        keep = self._sample(jobs, logits)
        if keep:
            kv = kv.select(keep) if len(keep) < len(jobs) else kv
            self.kv = kv if self.kv is None else self.kv.merge(kv)
            self.running += [jobs[b] for b in keep]

    def _decode(self) -> None:
        logits = decode(self.model, self.kv, [j.tokens[-1] for j in self.running])
        n = len(self.running)
        self.counters["decode_steps"] += 1
        self.counters["running_sum"] += n
        self.counters["max_batch"] = max(self.counters["max_batch"], n)
        keep = self._sample(self.running, logits)
        if len(keep) < n:
            self.running = [self.running[b] for b in keep]
            self.kv = self.kv.select(keep)

    def _sample(self, jobs: list[Job], logits: torch.Tensor) -> list[int]:
        """Draw each job's next token; jobs that end are answered. The indices of those that go on."""
        params = [j.params for j in jobs]
        token, logp = sample_rows(logits, torch.tensor([p.temperature for p in params], dtype=torch.float32)[:, None],
                                  torch.tensor([p.top_k for p in params])[:, None],
                                  torch.tensor([p.top_p for p in params], dtype=torch.float32)[:, None],
                                  [j.generator for j in jobs])
        keep = []
        for b, job in enumerate(jobs):
            t = int(token[b])
            job.tokens.append(t)
            job.logprobs.append(float(logp[b]))
            if t in job.params.stop_token_ids:
                self._finish(job, {"type": "stop", "matched": t})
            elif len(job.tokens) >= job.params.max_new_tokens:
                self._finish(job, {"type": "length", "length": job.params.max_new_tokens})
            else:
                keep.append(b)
        self.counters["tokens"] += len(jobs)
        return keep

    def _finish(self, job: Job, reason: dict) -> None:
        n = len(job.tokens)
        if reason["type"] != "abort":  # its KV: prompt + output but the last token (never fed)
            self.cache.insert(job.prompt + tuple(job.tokens[:-1]))
        meta = {"id": job.rid, "finish_reason": reason, "prompt_tokens": len(job.prompt), "completion_tokens": n,
                "cached_tokens": job.cached or 0, **versions_meta(version_spans(job.events, self.version(), n), n)}
        if job.return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(job.logprobs, job.tokens)]
        job.answer = {"output_ids": list(job.tokens), "meta_info": meta}
        if self._ended is not None:  # inside an iteration of the loop: answered after its step
            self._ended.append(job)
        else:
            job.done.set()

    def _fail_all(self, message: str) -> None:
        for job in [*self.running, *self.waiting]:
            job.error = message
            job.done.set()
        self.running, self.waiting, self.kv = [], deque(), None
