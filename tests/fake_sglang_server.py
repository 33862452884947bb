"""A stand-in SGLang server for CPU tests: the same HTTP endpoints and request / response schemas.

``python tests/fake_sglang_server.py --model-path X --host H --port P --tp-size N [...]`` (unknown
SGLang arguments are ignored). It really deserializes ``update_weights_from_tensor`` payloads
(shared-memory CPU tensors of the same host) for each TP rank, really joins the weight-update
gloo group (one member per TP rank) and receives the broadcasts, and records a checksum of every
received tensor per TP rank (``GET /fake_state``). Like SGLang 0.5.23 it refuses weight updates
outside a ``/begin_weight_update`` ... ``/end_weight_update`` session. ``/generate`` samples
deterministically from a hash of (received weights, prompt, ``sampling_seed``), so a weight sync
visibly changes outputs.
``/fake_state`` also counts ``/generate`` requests per prompt (``prompts``: JSON of the ids ->
count) and the prompt tokens an ideal prefix cache would prefill (``prefill_tokens``: a prompt
counts the first time it arrives after a ``/flush_cache``), so tests can see where prompts went.

Failure knobs: ``--die-after-requests N`` (exit hard on the N-th ``/generate``),
``--fail-endpoint NAME`` (answer ``success: false``), ``--never-healthy``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB = 100


class State:
    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.version = "default"
        self.checksums = {r: {} for r in range(args.tp_size)}
        self.requests = 0
        self.released = False
        self.groups = None  # per TP rank: broadcast callables
        self.flushes = 0
        self.session_open, self.sessions = False, 0  # weight-update sessions: open now, closed so far
        self.prompts: dict = {}  # JSON of the prompt ids -> /generate requests
        self.cached: set = set()  # prompts an ideal prefix cache holds (emptied by /flush_cache)
        self.prefill_tokens = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.checksums, sort_keys=True).encode()).hexdigest()


def _checksum(tensor) -> str:
    import torch

    t = tensor.detach().contiguous().cpu()
    t = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def make_handler(state: State):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *a):
            sys.stdout.write("fake-sglang: " + fmt % a + "\n")
            sys.stdout.flush()

        def _send(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                return self._send(503 if state.args.never_healthy else 200, {})
            if self.path == "/get_model_info":  # SGLang's fields this project reads (weight_version)
                return self._send(200, {"model_path": state.args.model_path, "is_generation": True,
                                        "weight_version": state.version})
            if self.path == "/fake_state":
                with state.lock:
                    snapshot = json.dumps({"weight_version": state.version, "checksums": state.checksums,
                                           "requests": state.requests, "released": state.released,
                                           "flushes": state.flushes, "prompts": state.prompts,
                                           "prefill_tokens": state.prefill_tokens,
                                           "session_open": state.session_open, "sessions": state.sessions})
                return self._send(200, json.loads(snapshot))
            self._send(404, {"error": self.path})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            name = self.path.split("?", 1)[0].strip("/")  # /flush_cache?timeout=S: the route's name
            if name == state.args.fail_endpoint:
                return self._send(400, {"success": False, "message": f"injected failure in {name}"})  # as SGLang
            handler = getattr(self, "_" + name, None)
            if handler is None:
                return self._send(404, {"error": self.path})
            if name.startswith("update_weights_from_") and not state.session_open:  # SGLang's words
                return self._send(400, {"success": False, "message": f"{name} must run between "
                                        "begin_weight_update() and end_weight_update()"})
            self._send(200, handler(body))

        def _begin_weight_update(self, body):
            if state.session_open:
                return {"success": False, "message": "a weight-update session is already open"}
            state.session_open = True
            return {"success": True, "message": "Success"}

        def _end_weight_update(self, body):
            if not state.session_open:
                return {"success": False, "message": "no weight-update session is open"}
            state.session_open, state.sessions = False, state.sessions + 1
            return {"success": True, "message": "Success"}

        def _generate(self, body):
            with state.lock:
                state.requests += 1
                if state.args.die_after_requests and state.requests >= state.args.die_after_requests:
                    sys.stdout.write("fake-sglang: dying as asked\n")
                    sys.stdout.flush()
                    os._exit(3)
                key = json.dumps(body["input_ids"])
                state.prompts[key] = state.prompts.get(key, 0) + 1
                if key not in state.cached:
                    state.cached.add(key)
                    state.prefill_tokens += len(body["input_ids"])
            p = body["sampling_params"]
            seed = p.get("sampling_seed", random.random())
            rng = random.Random(f"{state.digest()}|{body['input_ids']}|{seed}")
            pairs, reason = [], {"type": "length", "length": p["max_new_tokens"]}
            for _ in range(p["max_new_tokens"]):
                tok = rng.randrange(VOCAB)
                pairs.append([-3 * rng.random(), tok, None])
                if tok in p.get("stop_token_ids", []):
                    reason = {"type": "stop", "matched": tok}
                    break
            return {"text": "", "output_ids": [t for _, t, _ in pairs],
                    "meta_info": {"output_token_logprobs": pairs, "finish_reason": reason,
                                  "weight_version": state.version, "completion_tokens": len(pairs)}}

        def _update_weights_from_tensor(self, body):
            from megatron_fipo.rollout.sglang_weights import deserialize_named_tensors

            payloads = body["serialized_named_tensors"]
            if len(payloads) != state.args.tp_size:
                return {"success": False, "message": f"{len(payloads)} payloads for tp_size {state.args.tp_size}"}
            for rank, payload in enumerate(payloads):
                for n, t in deserialize_named_tensors(payload):
                    state.checksums[rank][n] = _checksum(t)
            state.version = body.get("weight_version") or state.version
            return {"success": True, "message": "ok"}

        def _init_weights_update_group(self, body):
            from megatron_fipo.rollout.sglang_weights import tcp_gloo_group

            init = f"tcp://{body['master_address']}:{body['master_port']}"
            groups = [None] * state.args.tp_size

            def join(r):
                groups[r] = tcp_gloo_group(init, body["world_size"], body["rank_offset"] + r, body["group_name"])

            threads = [threading.Thread(target=join, args=(r,)) for r in range(state.args.tp_size)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            state.groups = groups
            return {"success": True, "message": "joined"}

        def _update_weights_from_distributed(self, body):
            import torch

            if state.groups is None:
                return {"success": False, "message": "no weights update group"}

            def receive(r):
                for n, dt, shape in zip(body["names"], body["dtypes"], body["shapes"]):
                    t = torch.empty(shape, dtype=getattr(torch, dt))
                    state.groups[r](t, 0)
                    state.checksums[r][n] = _checksum(t)

            errors = []

            def guarded(r):
                try:
                    receive(r)
                except Exception as err:  # reported like SGLang does: success false
                    errors.append(repr(err))

            threads = [threading.Thread(target=guarded, args=(r,)) for r in range(state.args.tp_size)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                return {"success": False, "message": "; ".join(errors)}
            state.version = body.get("weight_version") or state.version
            return {"success": True, "message": "ok"}

        def _release_memory_occupation(self, body):
            state.released = True
            return {"success": True, "message": "released"}

        def _resume_memory_occupation(self, body):
            state.released = False
            return {"success": True, "message": "resumed"}

        def _flush_cache(self, body):
            with state.lock:
                state.flushes += 1
                state.cached.clear()
            return {"success": True, "message": "flushed"}

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--die-after-requests", type=int, default=0)
    parser.add_argument("--fail-endpoint", default="")
    parser.add_argument("--never-healthy", action="store_true")
    args, unknown = parser.parse_known_args()
    print(f"fake-sglang: serving {args.model_path} on {args.host}:{args.port} tp={args.tp_size} "
          f"(ignoring {unknown})", flush=True)
    ThreadingHTTPServer((args.host, args.port), make_handler(State(args))).serve_forever()


if __name__ == "__main__":
    main()
