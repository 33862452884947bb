"""Dead SGLang servers routed around: detection, exclusion, restarts, rejoining, and their counters.

Owns ``Failover`` (the mix-in ``SGLangEngine`` inherits, first in its bases) and ``ServerDied``
(raised by a sample job whose server is dead while another is live: the caller resubmits the
sample, with the same seed, to a live server). Used by ``sglang_engine`` (the batch path) and
``sglang_stream`` (the streaming path).

What happens when a server dies (a call to it fails and it is dead: an owned server's process
has exited, an attached server's ``/health`` does not answer):

* It is excluded: no request goes to it (``PromptRouter.exclude`` / ``StreamRouter.exclude``), and
  its requests are resubmitted to the live servers (``rerouted_requests``). Seeds do not depend on
  the server, so no sample is lost, duplicated or changed (bit for bit on the CPU server; on
  SGLang with deterministic inference).
* It is restarted by its owner, at most ``max_restarts`` times per server (then an ``EngineError``
  says so and ends the run): an engine that launched it and generates on it starts it again at
  once (disaggregated); a node's engine (colocated: each node's first rank owns its node's servers
  and does not generate) finds it dead at the next weight sync (``begin_update``) and restarts it
  there, before the node's weights reach it. A server the run did not launch (``rollout.urls``) is
  restarted by its launcher; the engine takes it back when it answers again.
* It rejoins only with the current weights: after a weight update that reached it
  (``update_weights``, ``finish_update``), or when its ``/get_model_info`` ``weight_version`` is the
  engine's (``adopt_version`` after a node-local sync, and the start of every ``generate``; the
  base weights are version 0). The disaggregated weight-update group is rebuilt over the servers a
  sync reaches (a fresh group name: the others still hold the old group).
* When no server is live, an owned server is brought back in place (restarted if need be, its
  weights re-synced through ``resync`` when the engine holds an update, else an ``EngineError``);
  with no owned server the run ends: "every rollout server is down".
* Not covered: a server that dies during a weight sync fails that sync (and the run); the by-stage
  sync (disaggregated, pp > 1) rebuilds only the driver's group, so a restarted server there fails
  the next sync of the other stages.

Counters (``failover_counts``, cumulative; ``stream_stats`` carries them): ``server_deaths``,
``rerouted_requests``, ``server_restarts`` (by this engine), ``server_rejoins``, ``servers_live``.

Reads the engine's ``urls``, ``servers``, ``max_restarts``, ``startup_timeout``, ``timeout``, ``resync``,
``weight_version``, ``mode``, ``tp_size``, ``sync_host``, ``backend``, ``weight_group``,
``group_factory``, ``_router``, ``_lock`` and ``_push``.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Optional

from megatron_fipo.rollout.engine import EngineError
from megatron_fipo.rollout.sglang_server import free_port, request


class ServerDied(Exception):
    """The sample's server is dead and another server is live: resubmit the sample there."""

    def __init__(self, server: int):
        super().__init__(f"server {server} is dead")
        self.server = server


def _served_version(value) -> Optional[int]:
    """A server's ``weight_version`` as a step number (SGLang's ``"default"``: 0); None when unreadable."""
    if value in (None, "default"):
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _say(message: str) -> None:
    print(f"[fipo] rollout: {message}", file=sys.stderr, flush=True)


class Failover:
    """The dead-server routes of ``SGLangEngine`` (see the module docstring); a mix-in, not used alone."""

    def _failover_init(self) -> None:
        self._fail_lock = threading.Lock()  # the sets and counters below
        self._restart_lock = threading.Lock()  # one restart decision at a time (kill + start under it)
        self._excluded: set[int] = set()
        self._lives = [0] * len(self.urls)  # bumped at every death: the weight-update group's members' identity
        self._started = [0] * len(self.urls)  # the life each owned server's process was started for
        self._fail_counts = {"server_deaths": 0, "rerouted_requests": 0, "server_restarts": 0, "server_rejoins": 0}
        self._members: Optional[tuple] = None  # the servers the current sync reaches
        self._group_key: Optional[tuple] = None
        self._group_base, self._group_round = self.weight_group, 0

    # ------------------------------------------------------------------ state
    def live_servers(self) -> list[int]:
        with self._fail_lock:
            return [i for i in range(len(self.urls)) if i not in self._excluded]

    def excluded_servers(self) -> list[int]:
        with self._fail_lock:
            return sorted(self._excluded)

    def failover_counts(self) -> dict:
        with self._fail_lock:
            return {**self._fail_counts, "servers_live": len(self.urls) - len(self._excluded)}

    def _count(self, key: str, k: int = 1) -> None:
        with self._fail_lock:
            self._fail_counts[key] += k

    def _is_dead(self, replica: int) -> bool:
        """Its process is gone (an owned server), or it does not answer ``/health`` (its watchdog may not
        have seen the server's exit yet)."""
        server = self.servers[replica]
        if server is not None and not server.alive():
            return True
        try:
            request(self.urls[replica] + "/health", timeout=10)
            return False
        except OSError:
            return True

    def _exclude(self, replica: int, why: object = None) -> bool:
        """Mark ``replica`` dead; True when it was live until now (a death, counted once)."""
        with self._fail_lock:
            if replica in self._excluded:
                return False
            self._excluded.add(replica)
            self._lives[replica] += 1
            self._fail_counts["server_deaths"] += 1
            live = len(self.urls) - len(self._excluded)
        self._router.exclude(replica)
        _say(f"server {self.urls[replica]} is down ({why}); {live} of {len(self.urls)} server(s) take its requests")
        return True

    def _rejoin(self, replica: int) -> None:
        with self._fail_lock:
            if replica not in self._excluded:
                return
            self._excluded.discard(replica)
            self._fail_counts["server_rejoins"] += 1
        self._router.include(replica)
        _say(f"server {self.urls[replica]} rejoined with weight version {self.weight_version}")

    # ------------------------------------------------------------------ a sample job's server died
    def _server_died(self, replica: int, err: Optional[BaseException]) -> None:
        """After a call to dead ``replica`` failed (or before one to an excluded server): raise ``ServerDied``
        when another server is live, else bring a server back in place (and return: retry) or fail."""
        if self._exclude(replica, err):
            self._restart(replica, wait=False)  # an owned server starts again at once (bounded)
        if self.live_servers():
            raise ServerDied(replica)
        self._revive(replica, err)

    def _restart(self, replica: int, wait: bool) -> bool:
        """Start owned ``replica`` again unless its process was started after its last recorded death
        (``max_restarts`` per server; ``EngineError`` past it); with ``wait``, until it is healthy. False for
        a server this engine does not own."""
        server = self.servers[replica]
        if server is None:
            return False
        with self._restart_lock:
            if self._started[replica] == self._lives[replica] and not server.alive():
                with self._fail_lock:
                    self._lives[replica] += 1  # a restarted process died too
                    self._fail_counts["server_deaths"] += 1
            if self._started[replica] != self._lives[replica]:  # the process we know of died (or is dying)
                if server.restarts >= self.max_restarts:
                    code = server.proc.returncode if server.proc is not None else None
                    raise EngineError(f"SGLang server {server.url} died (exit {code}) and rollout.max_restarts="
                                      f"{self.max_restarts} restart(s) are used up: it keeps dying; log tail "
                                      f"({server.log_path}):\n{server.tail()}")
                server.restarts += 1
                self._count("server_restarts")
                _say(f"restarting server {server.url} (restart {server.restarts} of {self.max_restarts})")
                server.kill()
                server.start()
                self._started[replica] = self._lives[replica]
        if wait:
            server.wait_healthy(self.startup_timeout)
        return True

    def _revive(self, replica: int, err: Optional[BaseException]) -> None:
        """No live server: bring ``replica`` (or an owned server already restarted) back with the current weights."""
        with self._lock:
            if self.live_servers():
                return  # another job brought one back meanwhile
            owned = [i for i in self.excluded_servers() + [replica] if self.servers[i] is not None]
            if not owned:
                raise EngineError(f"every rollout server is down ({', '.join(self.urls)}): nothing to route "
                                  f"{self.urls[replica]}'s requests to (last error: {err})") from err
            started = [i for i in owned if self.servers[i].alive()]  # restarted earlier: the first to be back
            target = next((i for i in started if i != replica),
                          started[0] if started else replica if replica in owned else owned[0])
            server = self.servers[target]
            if self.weight_version != 0 and self.resync is None:
                raise EngineError(f"every rollout server is down; SGLang server {server.url} would restart with the "
                                  f"base weights, but the engine serves version {self.weight_version} and no resync "
                                  f"callback was given; log tail:\n{server.tail()}") from err
            self._restart(target, wait=True)
            if self.weight_version != 0:
                stream, version = self.resync()
                self._push(stream, version, only=[target])
            self._rejoin(target)

    # ------------------------------------------------------------------ weight syncs and rejoining
    def _sync_targets(self) -> list[int]:
        """The servers a funnel sync reaches: the live ones, owned ones restarted now (bounded), and attached
        excluded ones that answer again (their launcher restarted them)."""
        targets = []
        for i in range(len(self.urls)):
            if i not in self._excluded and self._is_dead(i):  # died since the last call to it
                server = self.servers[i]
                self._exclude(i, f"exit {server.proc.returncode if server.proc else None}" if server else "no answer")
            if i not in self._excluded:
                targets.append(i)
            elif self._restart(i, wait=True) or not self._is_dead(i):
                targets.append(i)
        if not targets:
            raise EngineError(f"every rollout server is down at the weight sync ({', '.join(self.urls)})")
        return targets

    def _restart_dead(self) -> None:
        """A node-local sync's start: every owned server up (restarted if its process is gone, bounded)."""
        for i, server in enumerate(self.servers):
            if server is not None and not server.alive():
                self._exclude(i, f"exit {server.proc.returncode if server.proc is not None else None}")
            if i in self._excluded:
                self._restart(i, wait=True)

    def _probe_rejoin(self) -> None:
        """Excluded servers that answer and serve the engine's weight version rejoin."""
        for i in self.excluded_servers():
            if self.servers[i] is not None and not self.servers[i].alive():
                continue
            try:
                info = request(self.urls[i] + "/get_model_info", timeout=10)
            except OSError:
                continue
            version = info.get("weight_version", "?") if isinstance(info, dict) else "?"
            if _served_version(version) == self.weight_version:
                self._rejoin(i)

    def _push(self, stream, version: int, only) -> None:
        self._members = tuple(only)
        try:
            super()._push(stream, version, only)
        finally:
            self._members = None

    def _ensure_group(self) -> None:
        """The disaggregated weight-update group over the servers this sync reaches (all, outside ``_push``),
        rebuilt under a fresh name when they changed or one of them died since it was built."""
        members = self._members if self._members is not None else tuple(range(len(self.urls)))
        key = tuple((i, self._lives[i]) for i in members)
        if self._broadcast is not None and key == self._group_key:
            return
        if self._group_key is not None:
            self._group_round += 1
            self.weight_group = f"{self._group_base}_{self._group_round}"
        self._broadcast = None
        self._build_group([self.urls[i] for i in members])
        self._group_key = key

    def _build_group(self, urls: Sequence[str]) -> None:
        from megatron_fipo.rollout.sglang_weights import _post_into, init_group_payload

        port, world = free_port(self.sync_host), 1 + self.tp_size * len(urls)
        errors: list = []
        threads = [threading.Thread(target=_post_into, args=(
            errors, url + "/init_weights_update_group",
            init_group_payload(self.sync_host, port, 1 + k * self.tp_size, world, self.backend, self.weight_group),
            self.timeout)) for k, url in enumerate(urls)]
        for t in threads:
            t.start()
        self._broadcast = self.group_factory(f"tcp://{self.sync_host}:{port}", world, 0, self.weight_group,
                                             self.backend)
        for t in threads:
            t.join(self.timeout)
        if errors:
            self._broadcast = None
            raise errors[0]

    # ------------------------------------------------------------------ posts to every live server
    def _post_live(self, route: str, payload: Optional[dict] = None, urls: Optional[Sequence[str]] = None) -> None:
        """``route`` on each of ``urls`` (default: the live servers); a server found dead on the way is excluded."""
        for url in urls if urls is not None else [self.urls[i] for i in self.live_servers()]:
            try:
                self._post(url, route, payload)
            except EngineError as err:
                i = self.urls.index(url)
                if not self._is_dead(i):
                    raise
                self._exclude(i, err)
