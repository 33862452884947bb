"""The weight-update half of the CPU server: SGLang's weight routes and the reader of their tensor payloads.

Owns ``WeightRoutes`` (the mix-in ``cpu_server.CPUServer`` inherits: ``/begin_weight_update``,
``/end_weight_update``, ``/update_weights_from_tensor``, ``/init_weights_update_group``,
``/update_weights_from_distributed``), ``load_named_tensors`` (one element of SGLang's
``serialized_named_tensors`` -> ``(name, tensor, source pid)``, through a restricted unpickler)
and ``RequestError`` (a request the server refuses: HTTP 400). Must not import megatron,
megatron_fipo.mcore or sglang.

* ``/begin_weight_update`` and ``/end_weight_update`` bracket every sync (SGLang 0.5.23 refuses
  weight updates outside such a session; so does this server).
* ``/update_weights_from_tensor``: ``serialized_named_tensors`` (one element per TP rank: base64
  of a ``ForkingPickler`` pickle of ``[(name, tensor)]``, CPU tensors in torch's ``file_system``
  shared memory), ``load_format`` (None or ``"direct"``), ``flush_cache``, ``weight_version``.
  Every TP rank's element is unpickled (identical strings once: they are the same handles), all
  ranks must carry the same names and values (a real TP rank would cut its shard from them; a
  disagreement is an error answer and loads nothing), and rank 0's tensors are copied into the
  model before the answer (the sender may then reuse its buffer).
* ``/init_weights_update_group`` (``master_address``, ``master_port``, ``rank_offset``,
  ``world_size``, ``group_name``, ``backend`` = gloo) joins the group with one member per TP rank
  (``rank_offset + r``, threads); ``/update_weights_from_distributed`` (``names``, ``dtypes``,
  ``shapes``, ``group_name``, ``flush_cache``, ``weight_version``) receives rank 0's broadcasts in
  order on every member, checks the members agree and loads them. The group is
  ``sglang_weights.tcp_gloo_group``, which ``SGLangEngine`` also uses where sglang is not installed.

Weight updates: buckets arrive one request at a time; they are copied in through
``cpu_engine.WeightUpdate`` (unknown, duplicated or mis-shaped names are an error answer), and
the update is complete - ``weight_version`` set, ``/generate`` served again - when every
parameter of the model has arrived since the first bucket of that version. A bucket with another
``weight_version`` starts a new update; a failed bucket leaves the model refusing to generate
until a complete update arrives (never samples from a mix of versions: the decode loop waits, and
new ``/generate`` requests are refused unless the server is paused). Every bucket is copied under
the server's lock, which the decode loop holds through each iteration, so weights change only
between decode steps. A weight call that arrives while requests are live and the server is not
paused is counted (``writes_under_requests``); paused (``in_place`` / ``retract``) is the in-flight
path and is not. An update that completes with a new ``weight_version`` first records a version
event for every live request with output (``Batcher.record_version_change``: its spans).

Where each weight came from (``weight_sources`` of ``/fipo_stats``, one record per TP rank and
name, the latest update): for ``update_weights_from_tensor`` the pid of the process that put the
tensor into shared memory. torch's ``file_system`` strategy (``reductions.reduce_storage`` ->
``UntypedStorage._share_filename_cpu_``) moves a storage into a POSIX shared-memory segment named
by ATen's ``NewProcessWideShmHandle()``, ``/torch_<pid>_<random>_<counter>``, and a storage
already in shared memory keeps its name when pickled again; the payload carries that name
(``rebuild_storage_filename``'s ``handle``), which the restricted unpickler here reads. For the
distributed path the record is the group's rank-0 address (``master_address:master_port``). Each
complete update also prints one line, ``fipo-cpu-server update {json}``, with the sources per TP
rank, so the server's log keeps the record after the server is gone.

The mix-in reads the server's ``lock``, ``engine``, ``tp_size``, ``batcher`` and the counters
``CPUServer.__init__`` sets, and calls its ``_flush`` and ``_requests_under_write``.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import pickle
import re
import threading
from collections.abc import Callable, Mapping, Sequence

import torch

_SHM_NAME = re.compile(r"^/torch_(\d+)_\d+_\d+$")  # ATen's NewProcessWideShmHandle()
_LOAD_FORMATS = (None, "direct")
# routes whose errors SGLang answers as {"success": false, "message": ...}; the others as {"error": {"message": ...}}
WEIGHT_ROUTES = {"update_weights_from_tensor", "init_weights_update_group", "update_weights_from_distributed",
                 "begin_weight_update", "end_weight_update"}


class RequestError(ValueError):
    """A request the server refuses (answered with HTTP 400)."""


# ---------------------------------------------------------------------------------------------- payloads
class _PayloadUnpickler(pickle.Unpickler):
    """Unpickles SGLang's weight payload, allowing only torch's shared-memory tensor rebuilders.

    Records the creating process of every shared-memory segment it opens (``pids``: storage data
    pointer -> pid, from the segment's name).
    """

    _REBUILDERS = {"rebuild_tensor", "rebuild_typed_storage", "rebuild_typed_storage_child", "rebuild_parameter",
                   "rebuild_parameter_with_state"}

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.pids: dict[int, int] = {}

    def find_class(self, module: str, name: str):
        from torch.multiprocessing import reductions

        if module == "torch.multiprocessing.reductions":
            if name == "rebuild_storage_filename":
                return self._rebuild_storage_filename
            if name in self._REBUILDERS:
                return getattr(reductions, name)
            if name in ("rebuild_cuda_tensor", "rebuild_event"):
                raise RequestError("the payload holds CUDA IPC handles: the CPU server loads CPU tensors only")
            if name == "rebuild_storage_fd":
                raise RequestError("the payload's tensors are shared by file descriptor, which a separate server "
                                   "cannot open: serialize them under torch's 'file_system' sharing strategy "
                                   "(sglang_weights.serialize_named_tensors does)")
        if module == "torch" and (name in ("Tensor", "Size") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
            return getattr(torch.storage, name)
        if module == "torch.nn.parameter" and name == "Parameter":
            return torch.nn.Parameter
        raise RequestError(f"unexpected object {module}.{name} in a weight payload (expected [(name, tensor)])")

    def _rebuild_storage_filename(self, cls, manager, handle, size, dtype=None):
        from torch.multiprocessing import reductions

        name = handle.decode() if isinstance(handle, bytes) else str(handle)
        match = _SHM_NAME.match(name)
        if match is None:
            raise RequestError(f"shared-memory segment {name!r} is not named /torch_<pid>_...: cannot tell "
                               "which process the tensor came from")
        storage = reductions.rebuild_storage_filename(cls, manager, handle, size, dtype)
        self.pids[storage.data_ptr()] = int(match.group(1))
        return storage


def load_named_tensors(payload) -> list[tuple[str, torch.Tensor, int]]:
    """One ``serialized_named_tensors`` element -> ``[(name, tensor, pid of the process that shared it)]``.

    The tensors map the sender's shared memory (no copy); copy them before answering.
    """
    if isinstance(payload, str):
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as err:
            raise RequestError(f"a serialized_named_tensors element is not base64: {err}") from None
    elif isinstance(payload, (bytes, bytearray)):
        data = bytes(payload)
    else:
        raise RequestError(f"a serialized_named_tensors element is a {type(payload).__name__}, not a base64 string")
    unpickler = _PayloadUnpickler(data)
    try:
        named = unpickler.load()
    except RequestError:
        raise
    except Exception as err:  # a truncated or foreign pickle, a segment already unlinked
        raise RequestError(f"cannot unpickle a weight payload: {type(err).__name__}: {err}") from None
    if not isinstance(named, list) or not all(
            isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor) for item in named):
        raise RequestError("a weight payload must be a list of (name, tensor) pairs")
    out = []
    for name, tensor in named:
        pid = unpickler.pids.get(tensor.untyped_storage().data_ptr())
        if pid is None:
            raise RequestError(f"weight {name!r} is not in torch shared memory")
        out.append((name, tensor, pid))
    return out


def check_ranks_agree(per_rank: Sequence[Sequence[tuple]], what: str) -> None:
    """Every TP rank's ``[(name, tensor, ...)]`` must equal rank 0's (names, dtypes, shapes, values)."""
    first = {item[0]: item[1] for item in per_rank[0]}
    if len(first) != len(per_rank[0]):
        raise RequestError(f"{what}: TP rank 0 received a weight name twice")
    for rank, named in enumerate(per_rank[1:], 1):
        mine = {item[0]: item[1] for item in named}
        if mine.keys() != first.keys() or len(mine) != len(named):
            raise RequestError(f"{what}: TP rank {rank} received weights {sorted(mine)[:5]}..., TP rank 0 "
                               f"{sorted(first)[:5]}... (the ranks must receive the same names)")
        for name, tensor in mine.items():
            ref = first[name]
            if tensor.dtype != ref.dtype or tensor.shape != ref.shape or not torch.equal(tensor, ref):
                raise RequestError(f"{what}: TP rank {rank} received a different {name!r} than TP rank 0")


# ---------------------------------------------------------------------------------------------- routes
class WeightRoutes:
    """The weight routes of ``CPUServer`` (see the module docstring); a mix-in, not used alone."""

    def begin_weight_update(self, body: Mapping) -> dict:
        with self.lock:
            self.writes_under_requests += self._requests_under_write()
            if self.session_open:
                raise RequestError("a weight-update session is already open")
            self.session_open = True
        return {"success": True, "message": "Success"}

    def end_weight_update(self, body: Mapping) -> dict:
        with self.lock:
            if not self.session_open:
                raise RequestError("no weight-update session is open")
            self.session_open, self.sessions = False, self.sessions + 1
        return {"success": True, "message": "Success"}

    def _check_session(self, route: str) -> None:
        with self.lock:  # a trainer must never change the weights under a running request (train.ahead)
            self.writes_under_requests += self._requests_under_write()
        if not self.session_open:  # SGLang's words
            raise RequestError(f"{route} must run between begin_weight_update() and end_weight_update()")

    def update_weights_from_tensor(self, body: Mapping) -> dict:
        self._check_session("update_weights_from_tensor")
        payloads = body.get("serialized_named_tensors")
        if not isinstance(payloads, list) or len(payloads) != self.tp_size:
            raise RequestError(f"serialized_named_tensors must hold one element per TP rank ({self.tp_size}), "
                               f"got {type(payloads).__name__} of {len(payloads) if isinstance(payloads, list) else '-'}")
        if body.get("load_format") not in _LOAD_FORMATS:
            raise RequestError(f"load_format {body.get('load_format')!r} is not supported (None or 'direct')")
        decoded: dict = {}
        per_rank = []
        for payload in payloads:  # identical strings are the same handles: unpickle them once
            key = payload if isinstance(payload, (str, bytes)) else id(payload)
            if key not in decoded:
                decoded[key] = load_named_tensors(payload)
            per_rank.append(decoded[key])
        check_ranks_agree(per_rank, "update_weights_from_tensor")
        sources = {(rank, name): {"via": "tensor", "pid": pid}
                   for rank, named in enumerate(per_rank) for name, _, pid in named}
        return self._load([(n, t) for n, t, _ in per_rank[0]], sources, body)

    def init_weights_update_group(self, body: Mapping) -> dict:
        from megatron_fipo.rollout.sglang_weights import tcp_gloo_group

        try:
            address, port = str(body["master_address"]), int(body["master_port"])
            offset, world, group = int(body["rank_offset"]), int(body["world_size"]), str(body["group_name"])
        except (KeyError, TypeError, ValueError) as err:
            raise RequestError(f"init_weights_update_group needs master_address, master_port, rank_offset, "
                               f"world_size and group_name: {err!r}") from None
        if body.get("backend", "gloo") != "gloo":
            raise RequestError(f"the CPU server joins gloo groups only, not {body.get('backend')!r}")
        if not (0 < offset and offset + self.tp_size <= world):
            raise RequestError(f"ranks {offset}..{offset + self.tp_size - 1} do not fit a group of {world} "
                               "whose rank 0 is the trainer")
        members: list = [None] * self.tp_size
        errors = self._in_threads(lambda r: members.__setitem__(r, tcp_gloo_group(
            f"tcp://{address}:{port}", world, offset + r, group)))
        if errors:
            raise RequestError(f"joining the weight-update group {group!r} at {address}:{port} failed: {errors}")
        self.groups[group] = (members, f"{address}:{port}")
        return {"success": True, "message": f"joined {group!r} as ranks {offset}..{offset + self.tp_size - 1}"}

    def update_weights_from_distributed(self, body: Mapping) -> dict:
        self._check_session("update_weights_from_distributed")
        group = body.get("group_name")
        if group not in self.groups:
            raise RequestError(f"no weight-update group {group!r}: call init_weights_update_group first")
        if body.get("load_format") not in _LOAD_FORMATS:
            raise RequestError(f"load_format {body.get('load_format')!r} is not supported (None or 'direct')")
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)
                and len(names) == len(dtypes) == len(shapes)):
            raise RequestError("names, dtypes and shapes must be lists of one length")
        types = [getattr(torch, str(d), None) for d in dtypes]
        if not all(isinstance(t, torch.dtype) for t in types):
            raise RequestError(f"unknown dtypes in {dtypes}")
        members, master = self.groups[group]
        received: list[list] = [[] for _ in members]

        def receive(rank: int) -> None:
            for name, dtype, shape in zip(names, types, shapes):
                tensor = torch.empty([int(s) for s in shape], dtype=dtype)
                members[rank](tensor, 0)
                received[rank].append((str(name), tensor))

        errors = self._in_threads(receive)
        if errors:
            raise RequestError(f"receiving the broadcasts of group {group!r} failed: {errors}")
        check_ranks_agree(received, "update_weights_from_distributed")
        sources = {(rank, name): {"via": "distributed", "master": master}
                   for rank, named in enumerate(received) for name, _ in named}
        return self._load(received[0], sources, body)

    def _load(self, named: list[tuple[str, torch.Tensor]], sources: dict, body: Mapping) -> dict:
        """Copy ``named`` into the model as part of the update to ``body['weight_version']``."""
        version = body.get("weight_version")
        version = None if version is None else str(version)
        with self.lock:
            if self.engine.health()["released"]:
                raise RequestError("the server's memory is released: resume_memory_occupation before a weight "
                                   "update (SGLang would write into released memory)")
            if self.pending is None or self.pending[0] != version:
                self.pending = (version, self.engine.begin_update())
            update = self.pending[1]
            try:
                update.load(named)
            except BaseException:
                self.pending = None  # the model is a mix now: only a complete update serves again
                raise
            for (rank, name), source in sources.items():
                self.sources[(rank, name)] = dict(source, weight_version=version)
            missing = update.missing()
            if not missing:
                self.updates += 1
                update.finish(self.updates)
                self.pending = None
                self.batcher.cond.notify_all()  # the decode loop may go on
                if version is not None and version != self.weight_version:
                    self.batcher.record_version_change(self.weight_version)
                    self.weight_version = version
                self._log_update(version)
            if body.get("flush_cache", True):
                self._flush()
        state = (f"update to weight version {version} complete" if not missing else
                 f"{len(missing)} weights of version {version} still to come")
        return {"success": True, "message": f"loaded {len(named)} tensors; {state}"}

    def _log_update(self, version) -> None:
        """One line per complete update on stdout (the server's log): where every TP rank's weights came
        from, so a run's locality can be read after the server is gone."""
        sources = sorted({(rank, src.get("pid"), src.get("master")) for (rank, _), src in self.sources.items()
                          if src.get("weight_version") == version}, key=str)
        print("fipo-cpu-server update " + json.dumps({
            "weight_version": version, "sources": [{"tp_rank": r, "pid": pid, "master": m} for r, pid, m in sources],
            "writes_under_requests": self.writes_under_requests}),
            flush=True)

    def _in_threads(self, fn: Callable[[int], None]) -> list[str]:
        """Run ``fn(tp_rank)`` for every TP rank in its own thread; the errors as strings."""
        errors: list[str] = []

        def guarded(rank):
            try:
                fn(rank)
            except Exception as err:
                errors.append(f"TP rank {rank}: {type(err).__name__}: {err}")

        threads = [threading.Thread(target=guarded, args=(r,), daemon=True) for r in range(self.tp_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return errors
