"""An SGLang-protocol HTTP server on CPU: a continuously batching HF model behind the SGLang routes this project uses.

Owns ``CPUServer`` (the routes, as methods on decoded JSON bodies; the weight routes are its
``WeightRoutes`` mix-in, ``rollout/cpu_server_weights.py``; the decode loop is its ``Batcher``,
``rollout/cpu_batcher.py``) and the command line (``main``; the HTTP front is
``rollout/http_front.py``). Must not import megatron, megatron_fipo.mcore or sglang (it stands in
for SGLang where there is none).

Run it by hand to try the trainer's SGLang path without GPUs (unknown SGLang server arguments
are accepted and ignored, so ``SGLangEngine`` can launch it with SGLang's argv through
``launch_cmd``)::

    python -m megatron_fipo.rollout.cpu_server --model-path runs/demo_cpu/hf --port 30000 [--tp-size 2] \\
        [--max-running 64] [--decode-step-ms 20]
    curl -s localhost:30000/generate -H 'Content-Type: application/json' \\
        -d '{"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 8, "sampling_seed": 1}, "return_logprob": true}'

Routes (SGLang 0.5 ``http_server.py``; request fields as in its ``io_struct``):

* ``POST /generate``: ``input_ids`` (one prompt), ``sampling_params`` (``temperature``, ``top_p``,
  ``top_k`` with -1 = off, ``max_new_tokens``, ``stop_token_ids``, ``sampling_seed``, ``n`` = 1),
  ``return_logprob``, ``rid`` (the request's id, for ``/abort_request``; default a fresh uuid).
  Requests are decoded together, at most ``--max-running`` at a time, by one loop
  (``cpu_batcher``); the sample draws from its own generator seeded ``sampling_seed``, so its
  tokens are those of ``CPUEngine.generate`` of that prompt with ``SamplingParams(seed=sampling_seed,
  n=1)`` whatever else runs (its log-probs equal up to fp32 rounding of the batch shapes). Answer:
  ``output_ids`` and ``meta_info`` (``id``, ``finish_reason`` ``{"type": "stop", "matched": token}``,
  ``{"type": "length", "length": max_new_tokens}`` or ``{"type": "abort", "message": ...}``,
  ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``, ``weight_version`` (of the last
  token), ``weight_versions`` (runs ``{"version", "start", "end"}`` of the output tokens,
  ``rollout/cpu_accounting.py``), ``output_token_logprobs`` ``[[logprob, token, null]]`` when
  ``return_logprob``, ``e2e_latency``). Errors: HTTP 400 ``{"error": {"message": ...}}``.
* ``POST /pause_generation`` ``{"mode": "abort" | "retract" | "in_place"}`` (default abort, as
  SGLang), ``POST /continue_generation`` ``{}``: ``Batcher.pause`` / ``continue_`` (what each mode
  does is in ``cpu_batcher``); new ``/generate`` requests queue while paused. Both answer SGLang's
  ``{"message": ..., "status": "ok"}``. ``POST /abort_request`` ``{"rid", "abort_all"}`` ends the
  requests whose rid starts with ``rid`` (SGLang matches prefixes), or all: each answers with its
  output so far and ``finish_reason`` abort; the answer is empty (200), as SGLang's.
* The weight routes (``/begin_weight_update``, ``/end_weight_update``, ``/update_weights_from_tensor``,
  ``/init_weights_update_group``, ``/update_weights_from_distributed``): ``WeightRoutes`` of
  ``rollout/cpu_server_weights.py``, whose docstring says what each takes and how an update completes.
  They take the lock the decode loop holds through each iteration, so they land between decode
  steps; while an update is part-way the loop waits. Paused (``in_place`` / ``retract``) is the
  in-flight update path; an update that completes with a new ``weight_version`` records a version
  event for every live request with output (its spans).
* ``POST /release_memory_occupation`` / ``/resume_memory_occupation`` gate ``/generate`` (and
  weight updates) as ``CPUEngine.release`` / ``resume`` do (running requests wait); release also
  empties the prefix cache (SGLang frees the KV cache). ``POST /flush_cache`` empties it, refused
  as SGLang refuses it while requests run (an ``in_place`` pause included) or wait unpaused; with
  ``?timeout=S`` (SGLang's deferred flush) it waits until no request runs or waits, at most S seconds.
  ``GET /health`` (200, empty; 503 under ``--never-healthy``), ``GET /get_model_info``
  (``model_path``, ``tokenizer_path``, ``is_generation``, ``preferred_sampling_params``,
  ``weight_version``).
* Project extension: ``GET /fipo_stats``, for tests and users: requests served, the prefix-cache
  counters (``cpu_accounting.PrefixCache``), the weight version, a pending update, the
  weight-source record, ``writes_under_requests`` (weight-update calls that arrived while requests
  were live and the server not paused: a trainer that generates ahead without in-flight updates
  must keep it 0; every update's log line carries it too), and the batcher's counters
  (``Batcher.stats``: decode steps, running-batch sum, tokens, pauses, time paused, ...).

Departures from SGLang: one prompt per ``/generate`` (no batch lists, no ``text``: no tokenizer,
no ``stream``); sampling parameters other than those above are refused, not ignored; stopping only
at ``stop_token_ids`` (SGLang also stops at the model's EOS unless ``ignore_eos``; the trainer
always passes its stop ids); no greedy ``temperature`` 0 (the CPU engine samples only); no
``text`` in answers; the model runs in fp32 whatever ``--dtype`` says; the weight version is set
when an update is complete, not per bucket; memory release takes no ``tags``; the weight-update
group is gloo only; the prefix cache is counted, not reused (every prefill is computed in full);
the decode-step time is emulated (``--decode-step-ms``, ``cpu_batcher``).

Threads: the server's torch runs one intra-op thread unless ``--torch-threads`` says otherwise
(0: torch's default). The CPU server shares its cores with the trainer's ranks; measured on a
loaded 2-core host, 64 batched requests took 0.4 s with one thread and 5-12 s with two (every
batched op waits for a second thread that has no core), against 6 s one at a time.

Failure knobs (as ``tests/fake_sglang_server.py``): ``--die-after-requests N`` (exit hard on the
N-th ``/generate``), ``--fail-endpoint NAME`` (that route answers an error), ``--never-healthy``.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from megatron_fipo.rollout.cpu_accounting import PrefixCache
from megatron_fipo.rollout.cpu_batcher import PAUSE_MODES, Batcher, Job
from megatron_fipo.rollout.cpu_engine import CPUEngine, WeightUpdate
from megatron_fipo.rollout.cpu_server_weights import WEIGHT_ROUTES, RequestError, WeightRoutes
from megatron_fipo.rollout.engine import EngineError, GenerationRequest, SamplingParams
from megatron_fipo.rollout.http_front import serve

_SAMPLING_KEYS = {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "sampling_seed", "n"}
# the body fields each control route reads (SGLang's PauseGenerationReqInput, ContinueGenerationReqInput,
# AbortReq; tests/unit/test_sglang_schema.py checks them against the pinned wheel); others are refused
CONTROL_FIELDS = {"pause_generation": {"mode"}, "continue_generation": {"torch_empty_cache"},
                  "abort_request": {"rid", "abort_all"}}
# route -> (HTTP methods, the method of CPUServer answering it)
ROUTES = {"generate": (("POST", "PUT"), "generate"), "pause_generation": (("POST",), "pause_generation"),
          "continue_generation": (("POST",), "continue_generation"), "abort_request": (("POST",), "abort_request"),
          **{name: (("POST",), name) for name in ("begin_weight_update", "end_weight_update",
                                                  "update_weights_from_tensor", "init_weights_update_group",
                                                  "update_weights_from_distributed")},
          "release_memory_occupation": (("GET", "POST"), "release_memory_occupation"),
          "resume_memory_occupation": (("GET", "POST"), "resume_memory_occupation"),
          "flush_cache": (("GET", "POST"), "flush_cache"), "health": (("GET",), "health"),
          "health_generate": (("GET",), "health"), "get_model_info": (("GET",), "get_model_info"),
          "fipo_stats": (("GET",), "stats")}
QUERY_PARAMS = {"flush_cache": {"timeout"}}  # SGLang's query parameters (``/flush_cache?timeout=S``)
PAUSED = {"message": "Generation paused successfully.", "status": "ok"}  # SGLang's answers
CONTINUED = {"message": "Generation continued successfully.", "status": "ok"}
GENERATE_FIELDS = {"input_ids", "sampling_params", "return_logprob", "rid", "stream", "text", "input_embeds",
                   "image_data"}  # read by /generate (the last four only to refuse them)


class CPUServer(WeightRoutes):
    """The routes of the module docstring on one ``CPUEngine``'s model; ``handle`` dispatches one request.

    Args:
        model_path: HF checkpoint directory (loaded in fp32).
        tp_size: tensor-parallel ranks simulated (payload elements, group members).
        tokenizer_path: reported by ``/get_model_info`` (default ``model_path``, as SGLang).
        max_running: requests decoded together at most (SGLang's ``--max-running-requests``).
        decode_step_ms: the least time of one decode step (``cpu_batcher``: emulated GPU timing).
        die_after_requests, fail_endpoint, never_healthy: the failure knobs.
    """

    def __init__(self, model_path: str, *, tp_size: int = 1, tokenizer_path: Optional[str] = None,
                 max_running: int = 64, decode_step_ms: float = 0.0,
                 die_after_requests: int = 0, fail_endpoint: str = "", never_healthy: bool = False):
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        self.model_path, self.tokenizer_path = model_path, tokenizer_path or model_path
        self.tp_size = tp_size
        self.die_after_requests, self.fail_endpoint, self.never_healthy = die_after_requests, fail_endpoint, never_healthy
        self.engine = CPUEngine(model_path)
        self.lock = threading.RLock()  # the model, the batcher's state and every counter below
        self.weight_version = "default"  # SGLang's value until an update sets one
        self.requests = self.flushes = self.updates = self.writes_under_requests = 0
        self.prefix = PrefixCache()
        self.sources: dict[tuple[int, str], dict] = {}
        self.groups: dict[str, tuple[list[Callable], str]] = {}
        self.pending: Optional[tuple[Optional[str], WeightUpdate]] = None
        self.session_open = False
        self.sessions = 0
        self.batcher = Batcher(self.engine.model, threading.Condition(self.lock), unusable=self._unusable,
                               version=lambda: self.weight_version, cache=self.prefix, max_running=max_running,
                               decode_step_ms=decode_step_ms)
        self.routes: dict[str, tuple[tuple[str, ...], Callable[[Mapping], Any]]] = {
            name: (methods, getattr(self, attr)) for name, (methods, attr) in ROUTES.items()}

    # ------------------------------------------------------------------ dispatch
    def handle(self, method: str, path: str, body: Mapping) -> tuple[int, Any]:
        """``(HTTP status, answer)``: a dict (JSON), a str (text) or None (empty)."""
        name, _, query = path.partition("?")
        name = name.strip("/")
        route = self.routes.get(name)
        if route is None or method not in route[0]:
            return 404, {"error": {"message": f"no route {method} {path}"}}
        if route[1] == self.health and self.never_healthy:
            return 503, None
        try:
            if name == self.fail_endpoint:
                raise RequestError(f"injected failure in {name}")
            params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
            if set(params) - QUERY_PARAMS.get(name, set()):
                raise RequestError(f"{name} takes no query parameter {sorted(set(params) - QUERY_PARAMS.get(name, set()))}")
            return 200, route[1](body, **params) if params else route[1](body)
        except (RequestError, EngineError, ValueError) as err:
            return 400, self._error(name, str(err))
        except Exception as err:  # a bug or an environment failure: the answer carries the traceback
            traceback.print_exc()
            return 500, self._error(name, f"{type(err).__name__}: {err}\n{traceback.format_exc()}")

    @staticmethod
    def _error(name: str, message: str) -> dict:
        if name in WEIGHT_ROUTES or name.endswith("_memory_occupation"):
            return {"success": False, "message": message}
        return {"error": {"message": message}}

    def close(self) -> None:
        """Stop the decode loop (requests still live end with an error)."""
        self.batcher.stop()

    # ------------------------------------------------------------------ generation
    def generate(self, body: Mapping) -> dict:
        with self.lock:
            self.requests += 1
            if self.die_after_requests and self.requests >= self.die_after_requests:
                print(f"cpu-sglang: dying as asked (request {self.requests})", flush=True)
                os._exit(3)
        start = time.monotonic()
        prompt, params, return_logprob = self._parse_generate(body)
        rid = body.get("rid")
        if rid is not None and not isinstance(rid, str):
            raise RequestError(f"rid must be one string (one prompt per request), got {type(rid).__name__}")
        self.engine._validate(0, GenerationRequest(prompt, params))
        job = self.batcher.submit(Job(prompt, params, rid or uuid.uuid4().hex, return_logprob))
        job.done.wait()
        if job.error is not None:
            raise EngineError(job.error)
        job.answer["meta_info"]["e2e_latency"] = time.monotonic() - start
        return job.answer

    def _unusable(self) -> Optional[str]:
        try:
            self.engine._check_usable()
        except EngineError as err:
            return str(err)
        return None

    def _requests_under_write(self) -> bool:
        """Whether a weight write now would land under running requests (live, and the server not paused)."""
        return self.batcher.paused is None and bool(self.batcher.live())

    # ------------------------------------------------------------------ pause, continue, abort
    @staticmethod
    def _control_body(name: str, body: Mapping) -> None:
        unknown = sorted(set(body) - CONTROL_FIELDS[name])
        if unknown:
            raise RequestError(f"{name} does not implement {unknown} (it reads {sorted(CONTROL_FIELDS[name])})")

    def pause_generation(self, body: Mapping) -> dict:
        self._control_body("pause_generation", body)
        mode = body.get("mode", "abort")
        if mode not in PAUSE_MODES:
            raise RequestError(f"mode must be one of {list(PAUSE_MODES)}, got {mode!r}")
        self.batcher.pause(mode)
        return dict(PAUSED)

    def continue_generation(self, body: Mapping) -> dict:
        self._control_body("continue_generation", body)
        self.batcher.continue_()
        return dict(CONTINUED)

    def abort_request(self, body: Mapping) -> None:
        self._control_body("abort_request", body)
        rid, abort_all = body.get("rid") or "", body.get("abort_all", False)
        if not isinstance(rid, str) or not isinstance(abort_all, bool):
            raise RequestError("rid must be a string and abort_all a bool")
        self.batcher.abort(rid, abort_all)
        return None

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
            self.batcher.cond.notify_all()

    def flush_cache(self, body: Mapping, timeout: str = "0") -> str:
        """SGLang's flush: at once, or refused while requests run (``timeout`` 0); with ``timeout`` S > 0
        deferred until nothing runs or waits (paused or not), failing after S seconds."""
        wait = float(timeout)
        if not wait >= 0.0:
            raise RequestError(f"timeout must be >= 0, got {timeout!r}")
        deadline = time.monotonic() + wait
        while True:
            with self.lock:
                refusal = self.batcher.flush_refusal(deferred=wait > 0)
                if refusal is None:
                    self._flush()
                    return "Cache flushed.\n"
            if wait <= 0:
                raise RequestError(refusal)
            if time.monotonic() >= deadline:
                raise RequestError("Timed out waiting for idle state.")
            time.sleep(0.01)

    def _flush(self) -> None:
        self.prefix.clear()
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
                    "prefill_tokens": self.prefix.prefill_tokens, "cached_tokens": self.prefix.cached_tokens,
                    "cached_prompts": self.prefix.sequences, "flushes": self.flushes,
                    "weight_version": self.weight_version, "released": self.engine.health()["released"],
                    "pending_update": pending, "session_open": self.session_open, "sessions": self.sessions,
                    "running": len(self.batcher.live()), "writes_under_requests": self.writes_under_requests,
                    "batcher": self.batcher.stats(),
                    "weight_sources": [dict(tp_rank=rank, name=name, **source)
                                       for (rank, name), source in sorted(self.sources.items())]}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m megatron_fipo.rollout.cpu_server", allow_abbrev=False,
                                     description="An SGLang-protocol server on CPU (unknown SGLang arguments "
                                                 "are ignored).")
    parser.add_argument("--model-path", required=True, help="HF Qwen2 checkpoint directory")
    parser.add_argument("--tokenizer-path", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1)
    parser.add_argument("--max-running", "--max-running-requests", dest="max_running", type=int, default=64,
                        help="requests decoded together at most (SGLang's --max-running-requests)")
    parser.add_argument("--decode-step-ms", type=float, default=0.0,
                        help="least time of one decode step: emulated GPU timing (rollout/cpu_batcher.py)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default); see the module docstring")
    parser.add_argument("--die-after-requests", type=int, default=0, help="exit hard on the N-th /generate")
    parser.add_argument("--fail-endpoint", default="", help="this route answers an error")
    parser.add_argument("--never-healthy", action="store_true", help="/health answers 503")
    args, unknown = parser.parse_known_args(argv)
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
    server = CPUServer(args.model_path, tp_size=args.tp_size, tokenizer_path=args.tokenizer_path,
                       max_running=args.max_running, decode_step_ms=args.decode_step_ms,
                       die_after_requests=args.die_after_requests, fail_endpoint=args.fail_endpoint,
                       never_healthy=args.never_healthy)
    http = serve(server.handle, args.host, args.port)
    print(f"cpu-sglang: serving {args.model_path} at http://{args.host}:{args.port}, tp_size {args.tp_size}, "
          f"max_running {args.max_running}, decode_step_ms {args.decode_step_ms}, pid {os.getpid()} "
          f"(ignoring {unknown})", flush=True)
    try:
        http.serve_forever()
    finally:
        http.server_close()


if __name__ == "__main__":
    main()
