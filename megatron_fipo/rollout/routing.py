"""Prompt-affine, least-outstanding-token routing of sample jobs over rollout servers.

Owns ``PromptRouter``: which sample job starts next and on which server. Pure bookkeeping (no
HTTP, no threads), so an engine drives it from one thread and tests drive it with a chosen
completion order.

Rules:

* All ``n`` samples of a request go to one server, so the server's prefix (radix) cache holds the
  prompt once and every sample after the first skips its prefill.
* A request is assigned when its first sample starts, to the server with the fewest outstanding
  tokens; ties go to the lowest server index. A request's outstanding tokens are its prompt
  length plus ``max_new_tokens`` per unfinished sample; the last sample's finish also removes the
  prompt. The assignments are therefore a function of the order in which samples finish.
* At most ``max_in_flight`` samples run at once (over all servers); samples start in request
  order, sample by sample, as slots free.
* A dead server is routed around: ``exclude(server)`` moves each unfinished request assigned to it,
  with its outstanding tokens, to the live server with the fewest outstanding tokens (in request
  order), and no request is assigned to it until ``include(server)``. The engine resubmits the
  samples that were running there to the request's new server (same seeds: the same samples).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """One sample to start: ``sample`` of ``request`` on ``server``."""

    request: int
    sample: int
    server: int


class PromptRouter:
    """Dispatches the samples of ``requests`` (``(prompt_tokens, n, max_new_tokens)`` each) to ``servers``.

    Call ``dispatch()`` for the jobs to start now, and ``finish(request)`` once per finished sample
    (then ``dispatch()`` again). ``assignment[r]`` is request ``r``'s server (None until its first
    sample starts); ``load[s]`` is server ``s``'s outstanding tokens.
    """

    def __init__(self, requests: Sequence[tuple[int, int, int]], servers: int, max_in_flight: int,
                 excluded: Sequence[int] = ()):
        if servers < 1 or max_in_flight < 1:
            raise ValueError(f"servers and max_in_flight must be >= 1, got {servers} and {max_in_flight}")
        for i, (prompt, n, max_new) in enumerate(requests):
            if prompt < 1 or n < 1 or max_new < 1:
                raise ValueError(f"request {i}: prompt tokens, n and max_new_tokens must be >= 1, "
                                 f"got {(prompt, n, max_new)}")
        self.requests = [tuple(map(int, r)) for r in requests]
        self.max_in_flight = max_in_flight
        self.load = [0] * servers
        self.assignment: list = [None] * len(self.requests)
        self._left = [n for _, n, _ in self.requests]  # unfinished samples per request
        self._running = [0] * len(self.requests)
        self._next = (0, 0)  # the next (request, sample) to start
        self.in_flight = 0
        self.live = [s not in set(excluded) for s in range(servers)]
        """Servers that may be assigned requests (``exclude`` / ``include``)."""
        if not any(self.live):
            raise ValueError(f"no live server among {servers} (excluded: {sorted(set(excluded))})")

    def _least_loaded(self) -> int:
        return min((s for s in range(len(self.load)) if self.live[s]), key=lambda s: (self.load[s], s))

    def exclude(self, server: int) -> dict[int, int]:
        """``server`` is dead: its unfinished requests move to live servers; returns ``{request: new server}``.
        ``ValueError`` if it was the last live server (nothing to route to)."""
        if not self.live[server]:
            return {}
        if sum(self.live) == 1:
            raise ValueError(f"server {server} is the last live server: nothing to route its requests to")
        self.live[server] = False
        moved = {}
        for r, (prompt, _, max_new) in enumerate(self.requests):
            if self.assignment[r] == server and self._left[r] > 0:
                outstanding = prompt + self._left[r] * max_new
                target = self._least_loaded()
                self.load[server] -= outstanding
                self.load[target] += outstanding
                self.assignment[r] = moved[r] = target
        return moved

    def include(self, server: int) -> None:
        """``server`` is back (serving the current weights): new requests may go to it again."""
        self.live[server] = True

    def dispatch(self) -> list[Job]:
        """The jobs to start now (as many as free slots allow, in request order)."""
        jobs = []
        r, j = self._next
        while self.in_flight < self.max_in_flight and r < len(self.requests):
            prompt, n, max_new = self.requests[r]
            if j == 0:
                server = self._least_loaded()
                self.assignment[r] = server
                self.load[server] += prompt + n * max_new
            jobs.append(Job(r, j, self.assignment[r]))
            self._running[r] += 1
            self.in_flight += 1
            r, j = (r, j + 1) if j + 1 < n else (r + 1, 0)
        self._next = (r, j)
        return jobs

    def finish(self, request: int) -> bool:
        """A sample of ``request`` finished; True when it was the request's last one."""
        if not 0 <= request < len(self.requests) or self._running[request] == 0:
            raise ValueError(f"request {request} has no running sample to finish")
        server, (prompt, _, max_new) = self.assignment[request], self.requests[request]
        self._running[request] -= 1
        self._left[request] -= 1
        self.in_flight -= 1
        self.load[server] -= max_new + (prompt if self._left[request] == 0 else 0)
        return self._left[request] == 0

    @property
    def done(self) -> bool:
        """Every sample has started and finished."""
        return self._next[0] == len(self.requests) and self.in_flight == 0
