"""A small JSON-over-HTTP front: one threading HTTP server answering a ``handle(method, path, body)`` callable.

Owns ``serve``. The CPU server (``rollout/cpu_server.py``) puts its SGLang routes behind it; the
front decodes the JSON body (a bad body is a 400 with SGLang's ``{"error": {"message": ...}}``),
calls ``handle`` and writes its ``(status, answer)``: a dict as JSON, a str as text, None empty.
Standard library only.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handle = Callable[[str, str, Mapping], "tuple[int, Any]"]


def serve(handle: Handle, host: str, port: int, *, log_prefix: str = "cpu-sglang: ") -> ThreadingHTTPServer:
    """A threading HTTP server answering ``handle``'s routes at ``host:port`` (call ``serve_forever``)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            sys.stdout.write(log_prefix + fmt % args + "\n")
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
            self._send(*handle(method, self.path, body))

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
