"""The SGLang rollout engine: owned server replicas, HTTP generation, routing, restarts.

Owns ``SGLangEngine`` and ``generate_payload`` (the ``/generate`` body; tests/unit/test_sglang_schema.py
checks it against the pinned SGLang wheel's request classes). The weight-update half (sessions,
CUDA-IPC and shared-memory payloads, the disaggregated group) is the ``WeightUpdates`` mix-in of
``rollout/sglang_weights.py``, the only module that imports sglang. On CPU every path is exercised
against ``rollout/cpu_server.py`` and ``tests/fake_sglang_server.py``, which speak the same endpoints.

Design (SGLang 0.5.23 HTTP API, the pin of tools/sglang_pin.txt):

* One server per rollout data-parallel replica (``replicas``), each with ``tp_size`` GPUs
  (``--base-gpu-id``); one HTTP ``/generate`` request per sample, ``sampling_seed = seed + j``,
  ``return_logprob``, ``max_in_flight`` in flight. Tokens and log-probs come from
  ``meta_info.output_token_logprobs`` (the matched stop token included).
* Routing (``rollout.routing.PromptRouter``): all ``n`` samples of a prompt go to one replica,
  so its radix cache prefills the prompt once; each prompt goes to the replica with the fewest
  outstanding tokens when its first sample starts. Seeds do not depend on the replica, so the
  samples do not depend on routing or on the number of replicas.
* Streaming: ``generate_groups`` yields each prompt's group as soon as its samples are done
  (the trainer scores it while the others generate); ``generate`` collects them in request order.
* Colocated release / resume need the server flags ``enable_memory_saver`` (package
  ``torch_memory_saver``) and, to keep the weights across a release, ``enable_weights_cpu_backup``
  (SGLang >= 0.5.3); the trainer re-syncs after every training phase in any case.
* Failures (``rollout.sglang_failover``): a dead server is routed around - its requests go, with
  their seeds, to the live servers, the routers skip it, its owner restarts it (``max_restarts``
  per server; an ``EngineError`` past that), and it rejoins only with the current weights. With no
  live server an owned one is restarted in place and re-synced through ``resync`` (a callable
  returning ``(stream, version)``; without one a restart after an update is an ``EngineError`` -
  never a silent fall back to stale weights). Every error carries the server's log tail.
"""
from __future__ import annotations

import os
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Optional

import torch

from megatron_fipo.rollout.engine import EngineError, GenerationRequest, RolloutEngine, Sample, progress_bar
from megatron_fipo.rollout.routing import Job, PromptRouter
from megatron_fipo.rollout.sglang_server import (
    ServerProcess,
    default_launcher,
    free_port,
    request,
    server_argv,
)
from megatron_fipo.rollout.sglang_failover import Failover, ServerDied
from megatron_fipo.rollout.sglang_stream import Streaming, span_versions
from megatron_fipo.rollout.sglang_weights import WEIGHT_GROUP, WeightUpdates, routable_address, sglang_group


def generate_payload(req: GenerationRequest, j: int) -> dict:
    """The ``/generate`` body of sample ``j`` of ``req`` (SGLang's ``GenerateReqInput``)."""
    p = req.params
    sampling = {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k or -1,
                "max_new_tokens": p.max_new_tokens, "stop_token_ids": list(p.stop_token_ids)}
    if p.seed is not None:
        sampling["sampling_seed"] = p.seed + j
    return {"input_ids": list(req.prompt_ids), "sampling_params": sampling, "return_logprob": True}


class SGLangEngine(Failover, Streaming, WeightUpdates, RolloutEngine):
    """Rollouts from SGLang servers (see the module docstring).

    Args:
        model_path: HF model directory the servers load (the base weights, version 0).
        replicas: servers to launch; ``tp_size``: GPUs per server.
        server_args: extra SGLang server arguments (``--key value``), passed through.
        mode: ``"colocated"`` (CUDA-IPC weight sync, memory release) or ``"disaggregated"`` (NCCL).
        urls: attach to running servers instead of launching (not owned: never killed/restarted).
        sync_host: the address the servers reach this process at for the disaggregated weight-sync
            group (default: ``host`` for launched servers; for attached ``urls``, this machine's
            address on the route to the first server, so remote rollout nodes can connect).
        launch_cmd: argv prefix replacing ``python -m sglang.launch_server``.
        log_dir: one log file per replica.
        max_restarts: restarts allowed per replica (by this engine, of the servers it launched).
        resync: ``() -> (stream, version)`` to re-sync a restarted replica.
        group_factory: builds the disaggregated group (default: SGLang's ``init_custom_process_group``).
    """

    def __init__(self, model_path: str, *, replicas: int = 1, tp_size: int = 1,
                 server_args: Optional[Mapping[str, Any]] = None, mode: str = "colocated", urls: Sequence[str] = (),
                 launch_cmd: Optional[Sequence[str]] = None, host: str = "127.0.0.1", log_dir: str = "sglang_logs",
                 max_restarts: int = 1, startup_timeout: float = 900.0, request_timeout: float = 3600.0,
                 max_in_flight: int = 256, resync: Optional[Callable[[], tuple]] = None,
                 group_factory: Optional[Callable] = None, backend: Optional[str] = None,
                 sync_host: Optional[str] = None, weight_group: str = WEIGHT_GROUP, inflight_updates: bool = False):
        if mode not in ("colocated", "disaggregated"):
            raise ValueError(f"mode must be 'colocated' or 'disaggregated', got {mode!r}")
        if replicas < 1 or tp_size < 1 or max_in_flight < 1 or max_restarts < 0:
            raise ValueError("replicas, tp_size and max_in_flight must be >= 1, max_restarts >= 0")
        self.mode, self.tp_size, self.resync, self.weight_group = mode, tp_size, resync, weight_group
        self.max_restarts, self.startup_timeout, self.timeout = max_restarts, startup_timeout, request_timeout
        self.max_in_flight, self.host = max_in_flight, host
        self.group_factory = group_factory or sglang_group
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self._lock, self._broadcast, self._closed = threading.Lock(), None, False
        self.weight_version, self.inflight_updates = 0, inflight_updates
        self.server_args = dict(server_args or {})
        self.servers: list[Optional[ServerProcess]] = []
        self.sync_host = sync_host or (routable_address(urls[0]) if urls else host)
        if urls:
            self.urls = [u.rstrip("/") for u in urls]
            self.servers = [None] * len(self.urls)
            self._stream_init()
            self._failover_init()
            for url in self.urls:
                _wait_url(url, startup_timeout)
            return
        prefix = list(launch_cmd) if launch_cmd else default_launcher()
        self.urls = []
        for i in range(replicas):
            port = free_port(host)
            argv = prefix + ["--model-path", model_path, "--host", host, "--port", str(port), "--tp-size",
                             str(tp_size), "--base-gpu-id", str(i * tp_size)] + server_argv(server_args or {})
            self.urls.append(f"http://{host}:{port}")
            self.servers.append(ServerProcess(argv, self.urls[-1], os.path.join(log_dir, f"sglang_replica{i}.log")))
        self._stream_init()
        self._failover_init()
        try:
            for s in self.servers:
                s.start()
            for s in self.servers:
                s.wait_healthy(startup_timeout)
        except BaseException:
            self.shutdown()
            raise

    @classmethod
    def from_config(cls, model_path: str, rollout, **kwargs) -> "SGLangEngine":
        """From ``config.RolloutConfig`` (``sglang`` holds the server arguments; ``tp_size`` among them);
        ``kwargs`` override (e.g. ``replicas`` and ``urls`` for a node's own servers)."""
        tp, args = rollout.sglang_server_args()
        options = dict(replicas=rollout.replicas, urls=tuple(rollout.urls), launch_cmd=tuple(rollout.launcher) or None,
                       sync_host=rollout.sync_host, inflight_updates=bool(getattr(rollout, "inflight_updates", False)))
        options.update(kwargs)
        return cls(model_path, tp_size=int(tp), server_args=args, mode=rollout.mode, max_restarts=rollout.max_restarts,
                   **options)

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerationRequest], *, progress: bool = False) -> list[list[Sample]]:
        out: list = [None] * len(requests)
        for ri, group in self.generate_groups(requests, progress=progress):
            out[ri] = group
        return out

    def generate_groups(self, requests: Sequence[GenerationRequest], *,
                        progress: bool = False) -> Iterator[tuple[int, list[Sample]]]:
        """Yields each request's group as soon as its samples are done (routing: ``rollout.routing``).

        One HTTP request per sample, ``max_in_flight`` at once; the router sees the finished samples
        one by one, in the order this thread observes them, and the jobs they free start at once,
        before the finished groups are yielded. Leaving early (an error, or a consumer that stops
        iterating) cancels what has not started and waits for the running requests.
        """
        self._check_open()
        if self.excluded_servers():
            self._probe_rejoin()
        if not self.live_servers():
            raise EngineError(f"every rollout server is down ({', '.join(self.urls)})")
        router = PromptRouter([(len(r.prompt_ids), r.params.n, r.params.max_new_tokens) for r in requests],
                              len(self.urls), self.max_in_flight, excluded=self.excluded_servers())
        groups: list[list] = [[None] * req.params.n for req in requests]
        total = sum(req.params.n for req in requests)
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.max_in_flight, total)))
        running: dict = {}

        def run(job: Job) -> None:
            running[pool.submit(self._sample, job.server, requests[job.request], job.request, job.sample)] = job

        def start() -> None:
            for job in router.dispatch():
                run(job)

        try:
            with progress_bar(total, "generate", progress) as bar:
                start()
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    complete = []
                    for fut in sorted(done, key=lambda f: (running[f].request, running[f].sample)):
                        job = running.pop(fut)
                        try:
                            groups[job.request][job.sample] = fut.result()
                        except ServerDied:  # resubmitted (same seed) to the request's server among the live ones
                            _follow(router, self.live_servers())
                            run(Job(job.request, job.sample, router.assignment[job.request]))
                            self._count("rerouted_requests")
                            continue
                        bar.update(1)
                        if router.finish(job.request):
                            complete.append(job.request)
                        start()
                    for ri in complete:
                        yield ri, groups[ri]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _sample(self, replica: int, req: GenerationRequest, ri: int, j: int, strict: bool = True) -> Sample:
        """Sample ``j`` of ``req`` on ``replica``: ``ServerDied`` when it is (or turns out) dead and another
        server is live, transient errors retried, a refused request (4xx) an ``EngineError`` at once."""
        payload = generate_payload(req, j)
        attempts = 0
        while True:
            if replica in self._excluded:
                self._server_died(replica, None)  # raises ServerDied, or returns once a server is back
                continue
            self._busy(replica, +1)
            try:
                out = request(self.urls[replica] + "/generate", payload, timeout=self.timeout)
                return self._parse(out, req, ri, j, replica, strict)
            except OSError as err:
                if isinstance(err, urllib.error.HTTPError) and 400 <= err.code < 500:  # refused: not retried
                    raise EngineError(f"{self.urls[replica]}/generate refused the request (HTTP {err.code}): "
                                      f"{_error_message(err)}") from None
                if self._is_dead(replica):
                    self._server_died(replica, err)
                    continue
                attempts += 1
                if attempts > 3 + self.max_restarts:
                    raise EngineError(f"generation at {self.urls[replica]} keeps failing: {err}") from err
                time.sleep(0.5)
            finally:
                self._busy(replica, -1)

    def _parse(self, out: Mapping, req: GenerationRequest, ri: int, j: int, replica: int, strict: bool) -> Sample:
        """One ``/generate`` answer -> ``Sample``. ``strict`` (the batch path): every token must come from the
        weights the engine holds; otherwise (streaming) each token carries the version of its span."""
        meta = out.get("meta_info", {}) if isinstance(out, Mapping) else {}
        pairs = meta.get("output_token_logprobs")
        if pairs is None:
            raise EngineError(f"{self.urls[replica]}/generate answered without output_token_logprobs: {str(out)[:300]}")
        tokens, logprobs = [int(t) for _, t, *_ in pairs], [float(lp) for lp, *_ in pairs]
        versions = span_versions(meta, len(tokens))
        if strict and versions is not None and any(v != self.weight_version for v in versions):
            raise EngineError(f"{self.urls[replica]} sampled with weight version(s) {sorted(set(versions))}, "
                              f"the engine holds {self.weight_version}")
        reason = (meta.get("finish_reason") or {}).get("type", "abort")
        reason = reason if reason in ("stop", "length") else "abort"
        self._note(replica, meta, len(tokens), reason == "abort")
        if strict or not versions:
            return Sample(req.prompt_ids, tokens, logprobs, reason, self.weight_version, ri, j)
        return Sample(req.prompt_ids, tokens, logprobs, reason, versions[0], ri, j,
                      tuple(versions) if len(set(versions)) > 1 else ())

    # ------------------------------------------------------------------ lifecycle
    def release(self) -> None:
        self._check_open()
        self._post_live("/release_memory_occupation")

    def resume(self) -> None:
        self._check_open()
        self._post_live("/resume_memory_occupation")

    # ------------------------------------------------------------------ weight syncs around dead servers
    def update_weights(self, stream, version: int) -> None:
        """The funnel sync (``WeightUpdates``) to the servers that can take it (``Failover._sync_targets``:
        dead owned ones restarted first); each then serves ``version`` and is routed to again."""
        self._check_open()
        with self._lock:
            targets = self._sync_targets()
            self._push(stream, int(version), only=targets)
            self.weight_version = int(version)
        for i in targets:
            self._rejoin(i)

    def begin_update(self) -> None:
        """A node-local or by-stage sync's start: dead owned servers are restarted first (bounded)."""
        self._check_open()
        self._restart_dead()
        super().begin_update()

    def finish_update(self, version: int) -> None:
        super().finish_update(version)
        for i in self.excluded_servers():
            if self.servers[i] is not None:  # restarted by begin_update and fed by this sync
                self._rejoin(i)

    def adopt_version(self, version: int) -> None:
        super().adopt_version(version)
        if self.excluded_servers():
            self._probe_rejoin()  # restarted and fed by their own node

    def health(self) -> dict:
        replicas, excluded = [], {self.urls[i] for i in self.excluded_servers()}
        for url, server in zip(self.urls, self.servers):
            try:
                request(url + "/health", timeout=10)
                ok = True
            except OSError:
                ok = False
            replicas.append({"url": url, "ok": ok and (server is None or server.alive()),
                             "restarts": server.restarts if server else 0, "excluded": url in excluded})
        return {"ok": not self._closed and all(r["ok"] for r in replicas), "weight_version": self.weight_version,
                "replicas": replicas}

    def shutdown(self) -> None:
        self._closed = True
        self._stream_shutdown()
        for server in self.servers:
            if server is not None:
                server.kill()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the SGLang engine was shut down")


def _follow(router: PromptRouter, live: list) -> None:
    """The router's live servers := ``live`` (none live: unchanged, and the job's own server brings one back)."""
    if live:
        for s in live:
            router.include(s)
        for s in range(len(router.live)):
            if s not in live:
                router.exclude(s)


def _error_message(err) -> str:
    """The server's explanation in an HTTP error's body (SGLang: ``{"error": {"message": ...}}`` or
    ``{"message": ...}``), else the body's start."""
    import json

    try:
        body = err.read().decode(errors="replace")
    except OSError:
        return str(err)
    try:
        data = json.loads(body)
    except ValueError:
        return body[:500] or str(err)
    if isinstance(data, dict):
        inner = data.get("error")
        message = inner.get("message") if isinstance(inner, dict) else data.get("message") or data.get("detail")
        if message:
            return str(message)[:2000]
    return body[:500]


def _wait_url(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            request(url + "/health", timeout=5)
            return
        except OSError as err:
            if time.monotonic() > deadline:
                raise EngineError(f"SGLang server {url} (not launched by us) is not healthy: {err}") from err
            time.sleep(0.5)
