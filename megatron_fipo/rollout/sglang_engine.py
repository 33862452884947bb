"""The SGLang rollout engine: owned server replicas, HTTP generation, colocated and disaggregated weight sync.

Owns ``SGLangEngine``, ``serialize_named_tensors`` (SGLang's ``MultiprocessingSerializer`` format,
built with torch's ``ForkingPickler``), ``tcp_gloo_group`` and the request bodies it sends
(``generate_payload``, ``tensor_update_payload``, ``init_group_payload``,
``distributed_update_payload``; tests/unit/test_sglang_schema.py checks them against the pinned
SGLang wheel's request classes). The only module that imports sglang, and only lazily (for
``init_custom_process_group`` in disaggregated mode): on CPU every other path is exercised
against ``tests/fake_sglang_server.py``, which speaks the same endpoints.

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
* Every sync is one weight-update session per server: ``/begin_weight_update``, the buckets,
  ``/end_weight_update`` (SGLang refuses updates outside a session), then ``/flush_cache``. The
  update requests send SGLang's defaults explicitly: no flush per bucket (``flush_cache`` and so
  ``torch_empty_cache`` off), ``load_format`` None (named tensors, not SGLang's flattened bucket),
  ``selector`` ``"all"`` (the served model and, under speculative decoding, the draft model).
* Colocated sync: every bucket is pickled once as CUDA-IPC handles (the bucket's tensors are
  views of one buffer, so one handle) and the same string is sent to each of the replica's TP
  ranks (``serialized_named_tensors``); the call returns after SGLang has copied the weights, and
  only then is the next bucket requested, so a reused buffer is safe. CPU tensors (tests, CPU
  servers) use the ``file_system`` sharing strategy (fd passing needs a shared ``multiprocessing``
  authkey that a separate server lacks) and one copy per replica (a receiver unlinks the shared
  memory).
* Disaggregated sync: ``/init_weights_update_group`` once (this process is rank 0; replica ``i``'s
  TP ranks follow), then per bucket ``/update_weights_from_distributed`` (names, dtypes,
  shapes) posted in background threads while this process broadcasts each tensor in order.
* Failures: a replica whose process died is restarted (``max_restarts``) and its unfinished
  requests re-issued; its weights are then re-synced through ``resync`` (a callable returning
  ``(stream, version)``), and without one a restart after an update is an ``EngineError`` -
  never a silent fall back to stale weights. Every error carries the server's log tail.
"""
from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Optional

import torch

from megatron_fipo.rollout.engine import (
    EngineError,
    GenerationRequest,
    RolloutEngine,
    Sample,
    WeightStream,
    progress_bar,
)
from megatron_fipo.rollout.routing import PromptRouter
from megatron_fipo.rollout.sglang_server import (
    ServerProcess,
    default_launcher,
    free_port,
    post_checked,
    request,
    server_argv,
)


def serialize_named_tensors(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    """``[(name, tensor)]`` -> base64 of a ``ForkingPickler`` pickle (handles, not data), as SGLang reads it."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as tmp

    if any(not t.is_cuda for _, t in named):
        tmp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    ForkingPickler(buf).dump([(str(n), t) for n, t in named])
    return base64.b64encode(buf.getvalue()).decode()


def bucket_payload(bucket: Sequence[tuple[str, torch.Tensor]]) -> tuple[str, list]:
    """A bucket serialized for one server TP rank, and the tensors the payload points at.

    CUDA-IPC handles of the bucket's own tensors (any number of receivers may open them), or on CPU
    shared memory of a copy, since the server that opens a shared-memory segment unlinks it (so one
    copy per receiver). The caller keeps the returned tensors alive until the server has answered:
    freed earlier, their memory is gone before the server opens it.
    """
    sent = list(bucket) if all(t.is_cuda for _, t in bucket) else [(n, t.clone()) for n, t in bucket]
    return serialize_named_tensors(sent), sent


def deserialize_named_tensors(payload: str) -> list:
    """Inverse of ``serialize_named_tensors`` (what the server does), for tests and debugging."""
    import pickle

    import torch.multiprocessing  # noqa: F401 - registers the tensor reductions

    return pickle.loads(base64.b64decode(payload))


WEIGHT_GROUP = "fipo_weights"  # the name of the disaggregated weight-update group
# What every weight-update request says besides its tensors (see the module docstring).
_UPDATE_OPTIONS = {"flush_cache": False, "torch_empty_cache": False, "load_format": None, "selector": "all"}


def generate_payload(req: GenerationRequest, j: int) -> dict:
    """The ``/generate`` body of sample ``j`` of ``req`` (SGLang's ``GenerateReqInput``)."""
    p = req.params
    sampling = {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k or -1,
                "max_new_tokens": p.max_new_tokens, "stop_token_ids": list(p.stop_token_ids)}
    if p.seed is not None:
        sampling["sampling_seed"] = p.seed + j
    return {"input_ids": list(req.prompt_ids), "sampling_params": sampling, "return_logprob": True}


def tensor_update_payload(per_rank: Sequence[str], version: int) -> dict:
    """``/update_weights_from_tensor`` (``UpdateWeightsFromTensorReqInput``): one serialized bucket per TP rank."""
    return {"serialized_named_tensors": list(per_rank), "weight_version": str(version), **_UPDATE_OPTIONS}


def init_group_payload(master_address: str, master_port: int, rank_offset: int, world_size: int,
                       backend: str, group_name: str = WEIGHT_GROUP) -> dict:
    """``/init_weights_update_group`` (``InitWeightsUpdateGroupReqInput``): the server's TP ranks join as
    ``rank_offset ...``."""
    return {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend}


def distributed_update_payload(bucket: Sequence[tuple[str, torch.Tensor]], version: int,
                               group_name: str = WEIGHT_GROUP) -> dict:
    """``/update_weights_from_distributed`` (``UpdateWeightsFromDistributedReqInput``): what is broadcast next."""
    return {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).replace("torch.", "") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket], "group_name": group_name,
            "weight_version": str(version), **_UPDATE_OPTIONS}


def tcp_gloo_group(init_method: str, world_size: int, rank: int, group_name: str, backend: str = "gloo"):
    """A gloo group outside the default process group; returns ``broadcast(tensor, src=0)``."""
    import datetime

    import torch.distributed as dist

    host, port = init_method.removeprefix("tcp://").rsplit(":", 1)
    store = dist.TCPStore(host, int(port), world_size, is_master=rank == 0, timeout=datetime.timedelta(seconds=300))
    pg = dist.ProcessGroupGloo(dist.PrefixStore(group_name, store), rank, world_size,
                               datetime.timedelta(seconds=300))
    return lambda tensor, src=0: pg.broadcast(tensor, src).wait()


def _sglang_group(init_method: str, world_size: int, rank: int, group_name: str, backend: str):
    """SGLang's own ``init_custom_process_group`` where sglang is installed (the GPU image); without it (a
    CPU machine talking to ``rollout.cpu_server``) the same TCP-rendezvous gloo group, ``tcp_gloo_group``."""
    import importlib.util

    import torch.distributed as dist

    if importlib.util.find_spec("sglang") is None:
        return tcp_gloo_group(init_method, world_size, rank, group_name, backend)
    from sglang.srt.utils import init_custom_process_group

    pg = init_custom_process_group(backend=backend, init_method=init_method, world_size=world_size, rank=rank,
                                   group_name=group_name)
    return lambda tensor, src=0: dist.broadcast(tensor, src=src, group=pg)


def routable_address(url: str) -> str:
    """This machine's IPv4 address on the route to the host of ``url`` (``127.0.0.1`` for a local server).

    A UDP ``connect`` picks the outgoing interface without sending a packet. The rank-0 trainer
    advertises this address to remote SGLang servers as the weight-sync group's master.
    """
    host = urllib.parse.urlsplit(url if "//" in url else f"http://{url}").hostname
    if not host:
        raise ValueError(f"cannot read a host from the SGLang server url {url!r}")
    try:
        ip = socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except socket.gaierror as err:
        raise ValueError(f"cannot resolve the SGLang server host {host!r} ({err}); set rollout.sync_host") from None
    if ipaddress.ip_address(ip).is_loopback:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((ip, 9))
        except OSError as err:
            raise ValueError(f"no route to the SGLang server {host} ({err}); set rollout.sync_host") from None
        return sock.getsockname()[0]


class SGLangEngine(RolloutEngine):
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
        max_restarts: restarts allowed per replica.
        resync: ``() -> (stream, version)`` to re-sync a restarted replica.
        group_factory: builds the disaggregated group (default: SGLang's ``init_custom_process_group``).
    """

    def __init__(self, model_path: str, *, replicas: int = 1, tp_size: int = 1,
                 server_args: Optional[Mapping[str, Any]] = None, mode: str = "colocated", urls: Sequence[str] = (),
                 launch_cmd: Optional[Sequence[str]] = None, host: str = "127.0.0.1", log_dir: str = "sglang_logs",
                 max_restarts: int = 1, startup_timeout: float = 900.0, request_timeout: float = 3600.0,
                 max_in_flight: int = 256, resync: Optional[Callable[[], tuple]] = None,
                 group_factory: Optional[Callable] = None, backend: Optional[str] = None,
                 sync_host: Optional[str] = None, weight_group: str = WEIGHT_GROUP):
        if mode not in ("colocated", "disaggregated"):
            raise ValueError(f"mode must be 'colocated' or 'disaggregated', got {mode!r}")
        if replicas < 1 or tp_size < 1 or max_in_flight < 1 or max_restarts < 0:
            raise ValueError("replicas, tp_size and max_in_flight must be >= 1, max_restarts >= 0")
        self.mode, self.tp_size, self.resync, self.weight_group = mode, tp_size, resync, weight_group
        self.max_restarts, self.startup_timeout, self.timeout = max_restarts, startup_timeout, request_timeout
        self.max_in_flight, self.host = max_in_flight, host
        self.group_factory = group_factory or _sglang_group
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self._lock, self._broadcast, self._closed = threading.Lock(), None, False
        self.weight_version = 0
        self.servers: list[Optional[ServerProcess]] = []
        self.sync_host = sync_host or (routable_address(urls[0]) if urls else host)
        if urls:
            self.urls = [u.rstrip("/") for u in urls]
            self.servers = [None] * len(self.urls)
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
                       sync_host=rollout.sync_host)
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
        router = PromptRouter([(len(r.prompt_ids), r.params.n, r.params.max_new_tokens) for r in requests],
                              len(self.urls), self.max_in_flight)
        groups: list[list] = [[None] * req.params.n for req in requests]
        total = sum(req.params.n for req in requests)
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.max_in_flight, total)))
        running: dict = {}

        def start() -> None:
            for job in router.dispatch():
                running[pool.submit(self._sample, job.server, requests[job.request], job.request, job.sample)] = job

        try:
            with progress_bar(total, "generate", progress) as bar:
                start()
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    complete = []
                    for fut in sorted(done, key=lambda f: (running[f].request, running[f].sample)):
                        job = running.pop(fut)
                        groups[job.request][job.sample] = fut.result()
                        bar.update(1)
                        if router.finish(job.request):
                            complete.append(job.request)
                        start()
                    for ri in complete:
                        yield ri, groups[ri]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _sample(self, replica: int, req: GenerationRequest, ri: int, j: int) -> Sample:
        payload = generate_payload(req, j)
        attempts = 0
        while True:
            try:
                out = request(self.urls[replica] + "/generate", payload, timeout=self.timeout)
                return self._parse(out, req, ri, j, replica)
            except OSError as err:
                attempts += 1
                if attempts > 3 + self.max_restarts:
                    raise EngineError(f"generation at {self.urls[replica]} keeps failing: {err}") from err
                self._recover(replica, err)

    def _parse(self, out: Mapping, req: GenerationRequest, ri: int, j: int, replica: int) -> Sample:
        meta = out.get("meta_info", {}) if isinstance(out, Mapping) else {}
        pairs = meta.get("output_token_logprobs")
        if pairs is None:
            raise EngineError(f"{self.urls[replica]}/generate answered without output_token_logprobs: {str(out)[:300]}")
        version = meta.get("weight_version")  # SGLang reports "default" until a weight update sets it
        version = "0" if version == "default" else version
        if version is not None and str(version) != str(self.weight_version):
            raise EngineError(f"{self.urls[replica]} sampled with weight version {version}, "
                              f"the engine holds {self.weight_version}")
        reason = (meta.get("finish_reason") or {}).get("type", "abort")
        return Sample(req.prompt_ids, [int(t) for _, t, *_ in pairs], [float(lp) for lp, *_ in pairs],
                      reason if reason in ("stop", "length") else "abort", self.weight_version, ri, j)

    def _recover(self, replica: int, err: Exception) -> None:
        """After a failed call: restart a dead owned server (and re-sync it), or back off briefly."""
        with self._lock:
            server = self.servers[replica]
            if server is None or server.alive():
                time.sleep(0.5)
                return
            tail = server.tail()
            if server.restarts >= self.max_restarts:
                raise EngineError(f"SGLang server {server.url} died (exit {server.proc.returncode}) and "
                                  f"max_restarts={self.max_restarts} is used up; log tail:\n{tail}") from err
            if self.weight_version != 0 and self.resync is None:
                raise EngineError(f"SGLang server {server.url} died and was restarted with the base weights, but "
                                  f"it served version {self.weight_version} and no resync callback was given; "
                                  f"log tail:\n{tail}") from err
            server.restarts += 1
            server.kill()
            server.start()
            server.wait_healthy(self.startup_timeout)
            if self.weight_version != 0:
                stream, version = self.resync()
                self._push(stream, version, only=[replica])

    # ------------------------------------------------------------------ weights
    def update_weights(self, stream: WeightStream, version: int) -> None:
        self._check_open()
        with self._lock:
            self._push(stream, int(version), only=range(len(self.urls)))
            self.weight_version = int(version)

    def _push(self, stream: WeightStream, version: int, only) -> None:
        urls = [self.urls[i] for i in only]
        if self.mode == "disaggregated":
            self._ensure_group()
        self._open_sessions(urls)
        try:
            for bucket in stream:
                if self.mode == "colocated":
                    for url in urls:  # one payload per replica (bucket_payload: a CPU copy per receiver)
                        payload, held = bucket_payload(bucket)  # held until the server has answered
                        self._post(url, "/update_weights_from_tensor",
                                   tensor_update_payload([payload] * self.tp_size, version))
                        del held
                else:
                    self._broadcast_bucket(bucket, version, urls)
        except BaseException:
            self._close_sessions(urls)
            raise
        self._end_sessions(urls)

    def _post(self, url: str, route: str, payload: Optional[Mapping] = None) -> dict:
        return post_checked(url + route, payload or {}, timeout=self.timeout, what=route[1:])

    def begin_update(self) -> None:
        """Open a weight-update session on every replica, before ``push_tensor_payloads`` (node-local sync)."""
        self._check_open()
        self._open_sessions(self.urls)

    def _open_sessions(self, urls) -> None:
        """``/begin_weight_update`` on each of ``urls``; if one fails, the ones opened are closed again."""
        opened: list = []
        try:
            for url in urls:
                self._post(url, "/begin_weight_update")
                opened.append(url)
        except BaseException:
            self._close_sessions(opened)
            raise

    def _end_sessions(self, urls) -> None:
        """A sync's end on each of ``urls``: close the session, flush the prefix cache."""
        for url in urls:
            self._post(url, "/end_weight_update")
            self._post(url, "/flush_cache")

    def push_tensor_payloads(self, payloads: Sequence[Sequence[str]], version: int) -> None:
        """One bucket of a node-local colocated sync: ``payloads[i]`` holds replica i's serialized tensors, one
        string per TP rank, each built by the trainer rank on that TP rank's GPU (``serialize_named_tensors``),
        so every SGLang TP rank opens handles to tensors on its own GPU. Between ``begin_update`` and
        ``finish_update``; a failure closes the sessions."""
        if len(payloads) != len(self.urls) or any(len(p) != self.tp_size for p in payloads):
            raise ValueError(f"expected {len(self.urls)} replicas x {self.tp_size} TP-rank payloads, got "
                             f"{[len(p) for p in payloads]}")
        try:
            for url, per_rank in zip(self.urls, payloads):
                self._post(url, "/update_weights_from_tensor", tensor_update_payload(per_rank, version))
        except BaseException:
            self._close_sessions(self.urls)
            raise

    def finish_update(self, version: int) -> None:
        """After the last bucket of ``push_tensor_payloads``: close the sessions, flush the prefix caches;
        ``version`` is served."""
        self._end_sessions(self.urls)
        self.weight_version = int(version)

    def abort_update(self) -> None:
        """Close every replica's weight-update session after a sync failed elsewhere (other nodes, the stream)."""
        self._close_sessions(self.urls)

    def _close_sessions(self, urls) -> None:
        for url in urls:  # so that a later sync can open them again; the first error is the one raised
            with contextlib.suppress(EngineError, OSError):
                self._post(url, "/end_weight_update")

    def send_stage(self, stream: WeightStream, version: int) -> None:
        """One pipeline stage's buckets over this engine's own weight-update group (``weight_group``), from the
        stage that holds them: disaggregated syncs without a relay through rank 0. Between the driver's
        ``begin_update`` and ``finish_update``; stages take turns (a server serves one group at a time)."""
        self._check_open()
        self._ensure_group()
        for bucket in stream:
            self._broadcast_bucket(bucket, version, self.urls)

    def adopt_version(self, version: int) -> None:
        """The driver's engine, after every node fed its own servers: they now serve ``version`` (each
        ``/generate`` answer is checked against it)."""
        self._check_open()
        self.weight_version = int(version)

    def _ensure_group(self) -> None:
        if self._broadcast is not None:
            return
        port, world = free_port(self.sync_host), 1 + self.tp_size * len(self.urls)
        init = f"tcp://{self.sync_host}:{port}"
        errors: list = []
        threads = [threading.Thread(target=_post_into, args=(
            errors, url + "/init_weights_update_group",
            init_group_payload(self.sync_host, port, 1 + i * self.tp_size, world, self.backend, self.weight_group),
            self.timeout))
            for i, url in enumerate(self.urls)]
        for t in threads:
            t.start()
        self._broadcast = self.group_factory(init, world, 0, self.weight_group, self.backend)
        for t in threads:
            t.join(self.timeout)
        if errors:
            self._broadcast = None
            raise errors[0]

    def _broadcast_bucket(self, bucket, version: int, urls) -> None:
        meta = distributed_update_payload(bucket, version, self.weight_group)
        errors: list = []
        threads = [threading.Thread(target=_post_into, args=(errors, url + "/update_weights_from_distributed", meta,
                                                            self.timeout)) for url in urls]
        for t in threads:
            t.start()
        for _, tensor in bucket:
            self._broadcast(tensor.contiguous())
        for t in threads:
            t.join(self.timeout)
            if t.is_alive():
                raise EngineError("update_weights_from_distributed did not answer in time")
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ lifecycle
    def release(self) -> None:
        self._check_open()
        for url in self.urls:
            self._post(url, "/release_memory_occupation")

    def resume(self) -> None:
        self._check_open()
        for url in self.urls:
            self._post(url, "/resume_memory_occupation")

    def health(self) -> dict:
        replicas = []
        for url, server in zip(self.urls, self.servers):
            try:
                request(url + "/health", timeout=10)
                ok = True
            except OSError:
                ok = False
            replicas.append({"url": url, "ok": ok and (server is None or server.alive()),
                             "restarts": server.restarts if server else 0})
        return {"ok": not self._closed and all(r["ok"] for r in replicas), "weight_version": self.weight_version,
                "replicas": replicas}

    def shutdown(self) -> None:
        self._closed = True
        for server in self.servers:
            if server is not None:
                server.kill()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the SGLang engine was shut down")


def _post_into(errors: list, url: str, payload: Mapping, timeout: float) -> None:
    try:
        post_checked(url, payload, timeout=timeout, what=url.rsplit("/", 1)[-1])
    except EngineError as err:
        errors.append(err)


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
