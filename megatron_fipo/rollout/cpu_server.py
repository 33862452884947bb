"""An SGLang-protocol HTTP server on CPU: the CPU engine behind the SGLang routes this project uses.

Owns ``CPUServer`` (the routes, as methods on decoded JSON bodies), ``load_named_tensors`` (one
element of SGLang's ``serialized_named_tensors`` -> ``(name, tensor, source pid)``), the HTTP
front (``serve``) and the command line (``main``). Must not import megatron, megatron_fipo.mcore
or sglang (it stands in for SGLang where there is none).

Run it by hand to try the trainer's SGLang path without GPUs (unknown SGLang server arguments
are accepted and ignored, so ``SGLangEngine`` can launch it with SGLang's argv through
``launch_cmd``)::

    python -m megatron_fipo.rollout.cpu_server --model-path runs/demo_cpu/hf --port 30000 [--tp-size 2]
    curl -s localhost:30000/generate -H 'Content-Type: application/json' \\
        -d '{"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 8, "sampling_seed": 1}, "return_logprob": true}'

Routes (SGLang 0.5 ``http_server.py``; request fields as in its ``io_struct``):

* ``POST /generate``: ``input_ids`` (one prompt), ``sampling_params`` (``temperature``, ``top_p``,
  ``top_k`` with -1 = off, ``max_new_tokens``, ``stop_token_ids``, ``sampling_seed``, ``n`` = 1),
  ``return_logprob``. The sample is ``CPUEngine.generate`` of that prompt with
  ``SamplingParams(seed=sampling_seed, n=1)``; requests run one at a time under one lock, so an
  answer does not depend on which requests arrived together. Answer: ``output_ids`` and
  ``meta_info`` (``id``, ``finish_reason`` ``{"type": "stop", "matched": token}`` or ``{"type":
  "length", "length": max_new_tokens}``, ``prompt_tokens``, ``completion_tokens``,
  ``cached_tokens``, ``weight_version``, ``output_token_logprobs`` ``[[logprob, token, null]]``
  when ``return_logprob``, ``e2e_latency``). Errors: HTTP 400 ``{"error": {"message": ...}}``.
* ``POST /begin_weight_update`` and ``/end_weight_update`` bracket every sync (SGLang 0.5.23 refuses
  weight updates outside such a session; so does this server).
* ``POST /update_weights_from_tensor``: ``serialized_named_tensors`` (one element per TP rank:
  base64 of a ``ForkingPickler`` pickle of ``[(name, tensor)]``, CPU tensors in torch's
  ``file_system`` shared memory), ``load_format`` (None or ``"direct"``), ``flush_cache``,
  ``weight_version``. Every TP rank's element is unpickled (identical strings once: they are the
  same handles), all ranks must carry the same names and values (a real TP rank would cut its
  shard from them; a disagreement is an error answer and loads nothing), and rank 0's tensors are
  copied into the model before the answer (the sender may then reuse its buffer).
* ``POST /init_weights_update_group`` (``master_address``, ``master_port``, ``rank_offset``,
  ``world_size``, ``group_name``, ``backend`` = gloo) joins the group with one member per TP rank
  (``rank_offset + r``, threads); ``POST /update_weights_from_distributed`` (``names``,
  ``dtypes``, ``shapes``, ``group_name``, ``flush_cache``, ``weight_version``) receives rank 0's
  broadcasts in order on every member, checks the members agree and loads them.
* ``POST /release_memory_occupation`` / ``/resume_memory_occupation`` gate ``/generate`` (and
  weight updates) as ``CPUEngine.release`` / ``resume`` do; release also empties the prefix cache
  (SGLang frees the KV cache). ``POST /flush_cache`` empties it. ``GET /health`` (200, empty;
  503 under ``--never-healthy``), ``GET /get_model_info`` (``model_path``, ``tokenizer_path``,
  ``is_generation``, ``preferred_sampling_params``, ``weight_version``).
* Project extension: ``GET /fipo_stats``, for tests and users: requests served, the prefix-cache
  counters, the weight version, a pending update, the weight-source record, and
  ``writes_under_requests``: weight-update calls that arrived while a ``/generate`` was running
  (a trainer that generates ahead must keep it 0; every update's log line carries it too).

Weight updates: buckets arrive one request at a time; they are copied in through
``cpu_engine.WeightUpdate`` (unknown, duplicated or mis-shaped names are an error answer), and
the update is complete - ``weight_version`` set, ``/generate`` served again - when every
parameter of the model has arrived since the first bucket of that version. A bucket with another
``weight_version`` starts a new update; a failed bucket leaves the model refusing to generate
until a complete update arrives (never samples from a mix of versions).

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

Prefix-cache model (for counting, not for speed): the set of prompts prefilled since the last
flush. A prompt in it costs 0 prefill tokens (``cached_tokens`` = its length), otherwise its length
(then it joins the set); ``/flush_cache``, a weight update with ``flush_cache`` (SGLang's default
true) and a release empty it.

Departures from SGLang: one prompt per ``/generate`` (no batch lists, no ``text``: no tokenizer,
no ``stream``); sampling parameters other than those above are refused, not ignored; stopping only
at ``stop_token_ids`` (SGLang also stops at the model's EOS unless ``ignore_eos``; the trainer
always passes its stop ids); no greedy ``temperature`` 0 (the CPU engine samples only); no
``text`` in answers; the model runs in fp32 whatever ``--dtype`` says; the weight version is set
when an update is complete, not per bucket; memory release takes no ``tags``; the gloo group is
``sglang_engine.tcp_gloo_group``, which ``SGLangEngine`` also uses where sglang is not installed.

Failure knobs (as ``tests/fake_sglang_server.py``): ``--die-after-requests N`` (exit hard on the
N-th ``/generate``), ``--fail-endpoint NAME`` (that route answers an error), ``--never-healthy``.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import os
import pickle
import re
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import torch

from megatron_fipo.rollout.cpu_engine import CPUEngine, WeightUpdate
from megatron_fipo.rollout.engine import EngineError, GenerationRequest, SamplingParams

_SHM_NAME = re.compile(r"^/torch_(\d+)_\d+_\d+$")  # ATen's NewProcessWideShmHandle()
_SAMPLING_KEYS = {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "sampling_seed", "n"}
_LOAD_FORMATS = (None, "direct")
# routes whose errors SGLang answers as {"success": false, "message": ...}; the others as {"error": {"message": ...}}
_WEIGHT_ROUTES = {"update_weights_from_tensor", "init_weights_update_group", "update_weights_from_distributed",
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
                                   "(sglang_engine.serialize_named_tensors does)")
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


def _check_ranks_agree(per_rank: Sequence[Sequence[tuple]], what: str) -> None:
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


# ---------------------------------------------------------------------------------------------- server
class CPUServer:
    """The routes of the module docstring on one ``CPUEngine``; ``handle`` dispatches one request.

    Args:
        model_path: HF checkpoint directory (loaded in fp32).
        tp_size: tensor-parallel ranks simulated (payload elements, group members).
        tokenizer_path: reported by ``/get_model_info`` (default ``model_path``, as SGLang).
        die_after_requests, fail_endpoint, never_healthy: the failure knobs.
    """

    def __init__(self, model_path: str, *, tp_size: int = 1, tokenizer_path: Optional[str] = None,
                 die_after_requests: int = 0, fail_endpoint: str = "", never_healthy: bool = False):
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        self.model_path, self.tokenizer_path = model_path, tokenizer_path or model_path
        self.tp_size = tp_size
        self.die_after_requests, self.fail_endpoint, self.never_healthy = die_after_requests, fail_endpoint, never_healthy
        self.engine = CPUEngine(model_path)
        self.lock = threading.Lock()  # the model and every counter below
        self.weight_version = "default"  # SGLang's value until an update sets one
        self.requests = self.prefill_tokens = self.cached_tokens = self.flushes = self.updates = 0
        self.running = self.writes_under_requests = 0  # generate calls in progress; weight writes while any was
        self.prefilled: set[tuple[int, ...]] = set()
        self.sources: dict[tuple[int, str], dict] = {}
        self.groups: dict[str, tuple[list[Callable], str]] = {}
        self.pending: Optional[tuple[Optional[str], WeightUpdate]] = None
        self.session_open = False
        self.sessions = 0
        self.routes: dict[str, tuple[tuple[str, ...], Callable[[Mapping], Any]]] = {
            "generate": (("POST", "PUT"), self.generate),
            "begin_weight_update": (("POST",), self.begin_weight_update),
            "end_weight_update": (("POST",), self.end_weight_update),
            "update_weights_from_tensor": (("POST",), self.update_weights_from_tensor),
            "init_weights_update_group": (("POST",), self.init_weights_update_group),
            "update_weights_from_distributed": (("POST",), self.update_weights_from_distributed),
            "release_memory_occupation": (("GET", "POST"), self.release_memory_occupation),
            "resume_memory_occupation": (("GET", "POST"), self.resume_memory_occupation),
            "flush_cache": (("GET", "POST"), self.flush_cache),
            "health": (("GET",), self.health),
            "health_generate": (("GET",), self.health),
            "get_model_info": (("GET",), self.get_model_info),
            "fipo_stats": (("GET",), self.stats),
        }

    # ------------------------------------------------------------------ dispatch
    def handle(self, method: str, path: str, body: Mapping) -> tuple[int, Any]:
        """``(HTTP status, answer)``: a dict (JSON), a str (text) or None (empty)."""
        name = path.split("?", 1)[0].strip("/")
        route = self.routes.get(name)
        if route is None or method not in route[0]:
            return 404, {"error": {"message": f"no route {method} {path}"}}
        if route[1] == self.health and self.never_healthy:
            return 503, None
        try:
            if name == self.fail_endpoint:
                raise RequestError(f"injected failure in {name}")
            return 200, route[1](body)
        except (RequestError, EngineError, ValueError) as err:
            return 400, self._error(name, str(err))
        except Exception as err:  # a bug or an environment failure: the answer carries the traceback
            traceback.print_exc()
            return 500, self._error(name, f"{type(err).__name__}: {err}\n{traceback.format_exc()}")

    @staticmethod
    def _error(name: str, message: str) -> dict:
        if name in _WEIGHT_ROUTES or name.endswith("_memory_occupation"):
            return {"success": False, "message": message}
        return {"error": {"message": message}}

    # ------------------------------------------------------------------ generation
    def generate(self, body: Mapping) -> dict:
        with self.lock:
            self.requests += 1
            if self.die_after_requests and self.requests >= self.die_after_requests:
                print(f"cpu-sglang: dying as asked (request {self.requests})", flush=True)
                os._exit(3)
        start = time.monotonic()
        prompt, params, return_logprob = self._parse_generate(body)
        request = GenerationRequest(prompt, params)
        with self.lock:
            self.running += 1
        try:
            return self._answer(prompt, params, request, return_logprob, start)
        finally:
            with self.lock:
                self.running -= 1

    def _answer(self, prompt, params, request, return_logprob: bool, start: float) -> dict:
        with self.lock:
            sample = self.engine.generate([request])[0][0]
            cached = prompt in self.prefilled
            if cached:
                self.cached_tokens += len(prompt)
            else:
                self.prefilled.add(prompt)
                self.prefill_tokens += len(prompt)
            version = self.weight_version
        tokens = sample.token_ids
        reason = ({"type": "stop", "matched": tokens[-1]} if sample.finish_reason == "stop"
                  else {"type": "length", "length": params.max_new_tokens})
        meta = {"id": uuid.uuid4().hex, "finish_reason": reason, "prompt_tokens": len(prompt),
                "completion_tokens": len(tokens), "cached_tokens": len(prompt) if cached else 0,
                "weight_version": version, "e2e_latency": time.monotonic() - start}
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(sample.logprobs, tokens)]
        return {"output_ids": tokens, "meta_info": meta}

    @staticmethod
    def _parse_generate(body: Mapping) -> tuple[tuple[int, ...], SamplingParams, bool]:
        for key in ("text", "input_embeds", "image_data"):
            if body.get(key) is not None:
                raise RequestError(f"the CPU server takes input_ids only (got {key!r}: it has no tokenizer)")
        if body.get("stream"):
            raise RequestError("the CPU server does not stream")
        ids = body.get("input_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in ids):
            raise RequestError("input_ids must be one non-empty list of token ids (no batches)")
        sp = body.get("sampling_params") or {}
        if not isinstance(sp, Mapping):
            raise RequestError("sampling_params must be an object")
        unknown = sorted(set(sp) - _SAMPLING_KEYS)
        if unknown:
            raise RequestError(f"sampling parameters {unknown} are not implemented by the CPU server "
                               f"(it takes {sorted(_SAMPLING_KEYS)})")
        if sp.get("n", 1) != 1:
            raise RequestError("n must be 1 (one request per sample, with its own sampling_seed)")
        top_k = sp.get("top_k", -1)
        if not isinstance(top_k, int) or (top_k < 1 and top_k != -1):
            raise RequestError(f"top_k must be -1 (disable), or at least 1, got {top_k!r}")
        seed = sp.get("sampling_seed")
        try:
            params = SamplingParams(n=1, temperature=float(sp.get("temperature", 1.0)),
                                    top_p=float(sp.get("top_p", 1.0)), top_k=0 if top_k == -1 else top_k,
                                    max_new_tokens=sp.get("max_new_tokens", 128),
                                    stop_token_ids=tuple(sp.get("stop_token_ids") or ()),
                                    seed=None if seed is None else int(seed))
        except (TypeError, ValueError) as err:
            raise RequestError(f"bad sampling_params: {err}") from None
        return tuple(ids), params, bool(body.get("return_logprob", False))

    # ------------------------------------------------------------------ weights
    def begin_weight_update(self, body: Mapping) -> dict:
        with self.lock:
            self.writes_under_requests += bool(self.running)
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
        with self.lock:  # a trainer must never change the weights under a running request (rollout_ahead)
            self.writes_under_requests += bool(self.running)
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
        _check_ranks_agree(per_rank, "update_weights_from_tensor")
        sources = {(rank, name): {"via": "tensor", "pid": pid}
                   for rank, named in enumerate(per_rank) for name, _, pid in named}
        return self._load([(n, t) for n, t, _ in per_rank[0]], sources, body)

    def init_weights_update_group(self, body: Mapping) -> dict:
        from megatron_fipo.rollout.sglang_engine import tcp_gloo_group

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
        _check_ranks_agree(received, "update_weights_from_distributed")
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
                if version is not None:
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

    # ------------------------------------------------------------------ memory, cache, info
    def release_memory_occupation(self, body: Mapping) -> None:
        if body.get("tags") is not None:
            raise RequestError("the CPU server releases everything: tags must be None")
        with self.lock:
            self.engine.release()
            self._flush()

    def resume_memory_occupation(self, body: Mapping) -> None:
        if body.get("tags") is not None:
            raise RequestError("the CPU server resumes everything: tags must be None")
        with self.lock:
            self.engine.resume()

    def flush_cache(self, body: Mapping) -> str:
        with self.lock:
            self._flush()
        return "Cache flushed.\n"

    def _flush(self) -> None:
        self.prefilled.clear()
        self.flushes += 1

    def health(self, body: Mapping) -> None:
        return None

    def get_model_info(self, body: Mapping) -> dict:
        return {"model_path": self.model_path, "tokenizer_path": self.tokenizer_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": self.weight_version}

    def stats(self, body: Mapping) -> dict:
        with self.lock:
            pending = None if self.pending is None else {"weight_version": self.pending[0],
                                                         "missing": len(self.pending[1].missing())}
            return {"pid": os.getpid(), "tp_size": self.tp_size, "requests": self.requests,
                    "prefill_tokens": self.prefill_tokens, "cached_tokens": self.cached_tokens,
                    "cached_prompts": len(self.prefilled), "flushes": self.flushes,
                    "weight_version": self.weight_version, "released": self.engine.health()["released"],
                    "pending_update": pending, "session_open": self.session_open, "sessions": self.sessions,
                    "running": self.running, "writes_under_requests": self.writes_under_requests,
                    "weight_sources": [dict(tp_rank=rank, name=name, **source)
                                       for (rank, name), source in sorted(self.sources.items())]}


# ---------------------------------------------------------------------------------------------- HTTP
def serve(server: CPUServer, host: str, port: int) -> ThreadingHTTPServer:
    """A threading HTTP server answering ``server``'s routes at ``host:port`` (call ``serve_forever``)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            sys.stdout.write("cpu-sglang: " + fmt % args + "\n")
            sys.stdout.flush()

        def _answer(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw.strip() else {}
                if not isinstance(body, dict):
                    raise ValueError("the request body must be a JSON object")
            except ValueError as err:
                return self._send(400, {"error": {"message": f"bad JSON body: {err}"}})
            self._send(*server.handle(method, self.path, body))

        def _send(self, code: int, answer: Any) -> None:
            if answer is None:
                data, kind = b"", "text/plain"
            elif isinstance(answer, str):
                data, kind = answer.encode(), "text/plain; charset=utf-8"
            else:
                data, kind = json.dumps(answer).encode(), "application/json"
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._answer("GET")

        def do_POST(self):
            self._answer("POST")

        def do_PUT(self):
            self._answer("PUT")

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # SGLangEngine keeps up to max_in_flight (256) requests open

    return Server((host, port), Handler)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m megatron_fipo.rollout.cpu_server", allow_abbrev=False,
                                     description="An SGLang-protocol server on CPU (unknown SGLang arguments "
                                                 "are ignored).")
    parser.add_argument("--model-path", required=True, help="HF Qwen2 checkpoint directory")
    parser.add_argument("--tokenizer-path", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1)
    parser.add_argument("--die-after-requests", type=int, default=0, help="exit hard on the N-th /generate")
    parser.add_argument("--fail-endpoint", default="", help="this route answers an error")
    parser.add_argument("--never-healthy", action="store_true", help="/health answers 503")
    args, unknown = parser.parse_known_args(argv)
    server = CPUServer(args.model_path, tp_size=args.tp_size, tokenizer_path=args.tokenizer_path,
                       die_after_requests=args.die_after_requests, fail_endpoint=args.fail_endpoint,
                       never_healthy=args.never_healthy)
    http = serve(server, args.host, args.port)
    print(f"cpu-sglang: serving {args.model_path} at http://{args.host}:{args.port}, tp_size {args.tp_size}, "
          f"pid {os.getpid()} (ignoring {unknown})", flush=True)
    try:
        http.serve_forever()
    finally:
        http.server_close()


if __name__ == "__main__":
    main()
