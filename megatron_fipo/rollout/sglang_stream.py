"""Streaming generation on SGLang servers: sample jobs one at a time, pause / continue / abort, token versions.

Owns ``Streaming`` (the mix-in ``SGLangEngine`` inherits for the long tail: ``submit`` one sample
job and get a future, ``pause_generation`` / ``continue_generation`` / ``abort_running``,
``stream_stats``), ``StreamRouter`` (group-affine, least-outstanding-token placement of jobs that
arrive one by one) and ``span_versions`` (SGLang's ``meta_info.weight_versions`` spans -> the
weight version of every output token). Used by ``train/pool.py``; the batch path
(``SGLangEngine.generate_groups``) does not go through here.

SGLang 0.5.23 semantics this relies on (``io_struct.PauseGenerationReqInput``, the pinned wheel):

* ``/pause_generation`` ``mode="abort"`` ends every running and waiting request: each
  ``/generate`` answers with its output so far and ``finish_reason.type == "abort"``; the server
  stays paused (new requests wait) until ``/continue_generation``.
* ``mode="retract"`` stops the scheduler and moves running requests back to the waiting queue,
  their output kept and their KV cache dropped: after ``/continue_generation`` the cache of prompt
  + output so far is recomputed with the weights served then. This is the mode of in-flight weight
  updates (``sglang_weights.WeightUpdates``): every token after an update is computed entirely by
  the new weights, so each token's rollout log-prob is the one its own version gives, and the
  prefix cache may be flushed while paused.
* A request's answer carries ``meta_info.weight_versions``: runs ``{"version", "start", "end"}`` of
  its output tokens (``end`` exclusive); SGLang reports ``"default"`` before any update set a
  version, read here as version 0. A server without spans (older SGLang) reports one
  ``weight_version``: every token is then that version.

Counters (``stream_stats``, cumulative over every ``/generate`` of the engine, batch path included;
the trainer takes per-step differences): output tokens per server, prompt and cached (prefix-hit)
tokens, aborted answers, and the time integral of requests running per server, each server's count
capped at its capacity (``slots_per_server``: SGLang's ``max_running_requests`` when given, else
``max_in_flight`` / servers; requests beyond it wait in the server's queue): integral / (wall time x
capacity) is the engine-side stand-in for decode-slot use; and the dead-server counters
(``sglang_failover.Failover.failover_counts``).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

from megatron_fipo.rollout.engine import EngineError, GenerationRequest, Sample
from megatron_fipo.rollout.sglang_failover import ServerDied

PAUSE_MODES = ("abort", "retract", "in_place")


def pause_payload(mode: str) -> dict:
    """``/pause_generation`` (``PauseGenerationReqInput``); ``/continue_generation`` takes ``{}``
    (``ContinueGenerationReqInput``'s defaults)."""
    if mode not in PAUSE_MODES:
        raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
    return {"mode": mode}


def span_versions(meta: Mapping[str, Any], num_tokens: int) -> Optional[list[int]]:
    """The weight version of each of ``num_tokens`` output tokens from ``meta_info``; None without version info.

    Spans must tile ``[0, num_tokens)`` in order; a gap, an overlap or a span past the end is an
    ``EngineError`` (never a silent guess about which weights produced a token).
    """
    spans = meta.get("weight_versions")
    if spans is None:
        version = meta.get("weight_version")
        return None if version is None else [_version(version)] * num_tokens
    out: list[int] = []
    for span in spans:
        start, end = int(span["start"]), int(span["end"])
        if start != len(out) or end < start or end > num_tokens:
            raise EngineError(f"weight_versions spans {list(spans)} do not tile the {num_tokens} output tokens")
        out += [_version(span["version"])] * (end - start)
    if len(out) != num_tokens:
        raise EngineError(f"weight_versions spans {list(spans)} cover {len(out)} of {num_tokens} output tokens")
    return out


def _version(value) -> int:
    if value in (None, "default"):  # SGLang's value before any update named a version
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EngineError(f"weight version {value!r} is not a step number (the trainer names versions by "
                          "step)") from None


class StreamRouter:
    """Places jobs that arrive one at a time: a group's jobs stay on the server its first job went to
    (its prompt is prefilled once there, and a continuation finds its prefix cached), a new group goes
    to the live server with the fewest outstanding tokens (ties: lowest index). A dead server is
    excluded (its groups find a new home) until it is included again. Thread-safe."""

    def __init__(self, servers: int):
        self.load = [0] * servers
        self.home: dict[Any, int] = {}
        self.excluded: set[int] = set()
        self._lock = threading.Lock()

    def place(self, group: Any, tokens: int) -> int:
        with self._lock:
            server = self.home.get(group) if group is not None else None
            if server is None:
                live = [s for s in range(len(self.load)) if s not in self.excluded] or list(range(len(self.load)))
                server = min(live, key=lambda s: (self.load[s], s))
                if group is not None:
                    self.home[group] = server
            self.load[server] += tokens
            return server

    def exclude(self, server: int) -> None:
        with self._lock:
            self.excluded.add(server)
            self.home = {g: s for g, s in self.home.items() if s != server}

    def include(self, server: int) -> None:
        with self._lock:
            self.excluded.discard(server)

    def done(self, server: int, tokens: int) -> None:
        with self._lock:
            self.load[server] -= tokens

    def forget(self, group: Any) -> None:
        """The group is complete: its next job (if any) may go anywhere."""
        with self._lock:
            self.home.pop(group, None)


class Streaming:
    """The streaming routes of ``SGLangEngine`` (see the module docstring); a mix-in, not used alone.

    Reads the engine's ``urls``, ``max_in_flight``, ``server_args``, ``timeout`` and ``_check_open``, and runs jobs
    through its ``_sample`` (retries, restarts) with version checks off (``strict=False``); a job whose server
    died moves to a live one (``sglang_failover``).
    """

    def _stream_init(self) -> None:
        self._stream_lock = threading.Lock()
        self._router = StreamRouter(len(self.urls))
        self._executor: Optional[ThreadPoolExecutor] = None
        self._counts = {"tokens": [0] * len(self.urls), "prompt_tokens": 0, "cached_tokens": 0, "aborted": 0,
                        "busy_s": [0.0] * len(self.urls)}
        self._running = [0] * len(self.urls)  # requests in flight per server (every path: _sample counts)
        self.slots_per_server = max(int(self.server_args.get("max_running_requests") or 0)
                                    or self.max_in_flight // len(self.urls), 1)
        self._busy_since = time.monotonic()

    def submit(self, req: GenerationRequest, j: int = 0, *, group: Any = None) -> "Future[Sample]":
        """Start sample ``j`` of ``req`` (seed ``req.params.seed + j``) and return its future.

        ``group``: samples with the same key go to one server (see ``StreamRouter``). The sample may
        span weight versions (``Sample.token_versions``) and ends ``"abort"`` when the servers were
        paused with ``abort`` (``abort_running``): its tokens so far are in it.
        """
        self._check_open()
        with self._stream_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="sglang-stream")
            executor = self._executor
        tokens = len(req.prompt_ids) + req.params.max_new_tokens
        return executor.submit(self._stream_job, self._router.place(group, tokens), req, j, group, tokens)

    def _stream_job(self, server: int, req: GenerationRequest, j: int, group: Any, tokens: int) -> Sample:
        """One sample job; when its server dies it moves, with its seed, to the group's new (live) server."""
        try:
            while True:
                try:
                    return self._sample(server, req, 0, j, False)
                except ServerDied as died:
                    self._router.done(server, tokens)
                    self._router.exclude(died.server)
                    server = self._router.place(group, tokens)
                    self._count("rerouted_requests")
        finally:
            self._router.done(server, tokens)

    def forget_group(self, group: Any) -> None:
        self._router.forget(group)

    def _busy(self, server: int, delta: int) -> None:
        """Integrate the requests in flight per server over time, then change ``server``'s count by ``delta``."""
        with self._stream_lock:
            now = time.monotonic()
            for s, running in enumerate(self._running):  # a server runs at most its capacity; the rest wait
                self._counts["busy_s"][s] += min(running, self.slots_per_server) * (now - self._busy_since)
            self._busy_since = now
            self._running[server] += delta

    def _note(self, replica: int, meta: Mapping[str, Any], num_tokens: int, aborted: bool) -> None:
        with self._stream_lock:
            c = self._counts
            c["tokens"][replica] += num_tokens
            c["prompt_tokens"] += int(meta.get("prompt_tokens") or 0)
            c["cached_tokens"] += int(meta.get("cached_tokens") or 0)
            c["aborted"] += int(aborted)

    def stream_stats(self) -> dict:
        """Cumulative counters (see the module docstring) and the time they were read (``time``)."""
        self._busy(0, 0)
        with self._stream_lock:
            c = self._counts
            out = {"tokens": list(c["tokens"]), "prompt_tokens": c["prompt_tokens"],
                   "cached_tokens": c["cached_tokens"], "aborted": c["aborted"], "busy_s": list(c["busy_s"]),
                   "time": time.monotonic()}
        return {**out, **self.failover_counts()}

    # ------------------------------------------------------------------ pause / continue
    def pause_generation(self, mode: str, urls: Optional[Sequence[str]] = None) -> None:
        """Pause ``urls`` (default: the live servers; one found dead on the way is excluded)."""
        self._post_live("/pause_generation", pause_payload(mode), urls)

    def continue_generation(self, urls: Optional[Sequence[str]] = None) -> None:
        self._post_live("/continue_generation", {}, urls)

    def abort_running(self) -> None:
        """End every running request now (each answers with its tokens so far, ``finish_reason`` abort)
        and let new requests run again: SGLang's pause ``abort``, then ``continue``."""
        self._check_open()
        try:
            self.pause_generation("abort")
        finally:
            self.continue_generation()

    def _stream_shutdown(self) -> None:
        with self._stream_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
