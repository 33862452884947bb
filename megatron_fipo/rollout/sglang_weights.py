"""The weight-update half of the SGLang engine: request bodies, tensor payloads, update sessions, groups.

Owns ``WeightUpdates`` (the mix-in ``SGLangEngine`` inherits: ``update_weights``, the node-local
``begin_update`` / ``push_tensor_payloads`` / ``finish_update`` / ``abort_update``, the per-stage
``send_stage`` and ``adopt_version``), ``serialize_named_tensors`` (SGLang's
``MultiprocessingSerializer`` format, built with torch's ``ForkingPickler``), ``bucket_payload``,
``tcp_gloo_group``, ``routable_address`` and the weight request bodies (``tensor_update_payload``,
``init_group_payload``, ``distributed_update_payload``; tests/unit/test_sglang_schema.py checks
them against the pinned SGLang wheel's request classes). The only module that imports sglang,
and only lazily (``init_custom_process_group`` in disaggregated mode).

Design (SGLang 0.5.23 HTTP API, the pin of tools/sglang_pin.txt):

* Every sync is one weight-update session per server: ``/begin_weight_update``, the buckets,
  ``/end_weight_update`` (SGLang refuses updates outside a session), then ``/flush_cache``
  (``flush_route``: deferred until the server is idle, or at once when it is paused). The
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

* In-flight updates (``inflight_updates``, disaggregated): each server is paused with ``retract``
  before its session opens and continued after its cache is flushed, so generation never drains
  and no weight is written under a running forward (``rollout/sglang_stream.py`` says why retract).

The mix-in reads the engine's ``urls``, ``tp_size``, ``mode``, ``timeout``, ``sync_host``,
``backend``, ``weight_group``, ``group_factory``, ``inflight_updates`` and ``weight_version``, and
guards pushes with its ``_lock``.
"""
from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import socket
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Optional

import torch

from megatron_fipo.rollout.engine import EngineError, WeightStream
from megatron_fipo.rollout.sglang_server import free_port, post_checked


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
FLUSH_WAIT_S = 300.0  # how long a server may take to become idle before its cache is flushed (requests aborted)


def flush_route(paused: bool) -> str:
    """The ``/flush_cache`` request that ends a sync. SGLang flushes only an idle server. Paused with
    ``retract`` it is idle at once (its waiting requests hold no KV), and the flush must be immediate:
    SGLang's deferred flush waits for an empty waiting queue, which a paused server never has. Not
    paused, requests may still be leaving (an abort takes effect at the scheduler's next iteration),
    so ``timeout`` asks SGLang to defer the flush until the server is idle instead of refusing it."""
    return "/flush_cache" if paused else f"/flush_cache?timeout={FLUSH_WAIT_S:g}"


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


def sglang_group(init_method: str, world_size: int, rank: int, group_name: str, backend: str):
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


class WeightUpdates:
    """The weight-update routes of ``SGLangEngine`` (see the module docstring); a mix-in, not used alone."""

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
        return post_checked(url + route, payload or {}, timeout=self.timeout + FLUSH_WAIT_S,
                            what=route[1:].split("?")[0])

    def begin_update(self) -> None:
        """Open a weight-update session on every replica, before ``push_tensor_payloads`` (node-local sync)."""
        self._check_open()
        self._open_sessions(self.urls)

    def _open_sessions(self, urls) -> None:
        """``/begin_weight_update`` on each of ``urls``; if one fails, the ones opened are closed again.

        With in-flight updates each server is first paused with ``retract`` (its running requests wait,
        their KV dropped) and continued by ``_end_sessions`` / ``_close_sessions``."""
        opened: list = []
        try:
            for url in urls:
                if self.inflight_updates:
                    self.pause_generation("retract", [url])
                opened.append(url)
                self._post(url, "/begin_weight_update")
        except BaseException:
            self._close_sessions(opened)
            raise

    def _end_sessions(self, urls) -> None:
        """A sync's end on each of ``urls``: close the session, flush the prefix cache (allowed while paused
        with ``retract``: the continued requests then recompute their KV with the new weights), continue."""
        for url in urls:
            self._post(url, "/end_weight_update")
            self._post(url, flush_route(paused=self.inflight_updates))
            if self.inflight_updates:
                self.continue_generation([url])

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
            if self.inflight_updates:
                with contextlib.suppress(EngineError, OSError):
                    self.continue_generation([url])

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


def _post_into(errors: list, url: str, payload: Mapping, timeout: float) -> None:
    try:
        post_checked(url, payload, timeout=timeout, what=url.rsplit("/", 1)[-1])
    except EngineError as err:
        errors.append(err)
