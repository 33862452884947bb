"""SGLang server processes and their HTTP API, for ``sglang_engine``: launch, health, logs, restart, kill.

Owns ``ServerProcess`` (one ``sglang.launch_server`` process in its own process group, its log
file, health polling with a deadline, the log tail in every error, kill on shutdown, at
interpreter exit and on SIGTERM; each server runs under ``watchdog.py``, which ends its group
when this process is gone, SIGKILL included) and ``post_json`` / ``get`` (stdlib HTTP with
timeouts; SGLang's weight endpoints answer ``{"success": bool, "message": str}``, turned into
``EngineError`` on failure). Does not import sglang: it runs a command line.
"""
from __future__ import annotations

import atexit
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from megatron_fipo.rollout.engine import EngineError

_LIVE: "weakref.WeakSet[ServerProcess]" = weakref.WeakSet()
_WATCHDOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "watchdog.py")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_argv(server_args: Mapping[str, Any]) -> list[str]:
    """``{"mem_fraction_static": 0.7, "enable_memory_saver": True}`` -> ``--mem-fraction-static 0.7 --enable-memory-saver``."""
    argv = []
    for key, value in server_args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def request(url: str, payload: Optional[Mapping] = None, *, timeout: float) -> Any:
    """GET (``payload`` None) or POST JSON; returns the decoded JSON (or text). Raises ``OSError`` subclasses."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {},
                                 method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read().decode() or "null"
    except http.client.HTTPException as err:  # e.g. IncompleteRead: the server died mid-answer
        raise ConnectionError(f"{url}: {err!r}") from err
    try:
        return json.loads(body)
    except ValueError:
        return body


def post_checked(url: str, payload: Mapping, *, timeout: float, what: str) -> dict:
    """POST to a weight / memory endpoint; ``EngineError`` unless it answers success."""
    try:
        out = request(url, payload, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise EngineError(f"{what} at {url}: HTTP {err.code}: {err.read().decode(errors='replace')[:500]}") from err
    except OSError as err:
        raise EngineError(f"{what} at {url}: {err}") from err
    if isinstance(out, dict) and out.get("success") is False:
        raise EngineError(f"{what} at {url} failed: {out.get('message', out)}")
    return out if isinstance(out, dict) else {"success": True, "message": out}


class ServerProcess:
    """One SGLang server: ``argv`` run in its own process group with stdout+stderr to ``log_path``.

    ``proc`` is the group's leader, ``watchdog.py``, which runs ``argv`` as its child and exits
    with its exit status; it holds the read end of a pipe whose write end only this process
    holds, and ends the group when that pipe has no writer left (this process died).

    Args:
        argv: the full command (launcher prefix + ``--host --port`` + server arguments).
        url: ``http://host:port`` it will serve.
        log_path: the server's log file (appended across restarts).
        env: extra environment (e.g. ``CUDA_VISIBLE_DEVICES``).
    """

    def __init__(self, argv: Sequence[str], url: str, log_path: str, env: Optional[Mapping[str, str]] = None):
        self.argv, self.url, self.log_path = list(argv), url, log_path
        self.env = dict(env or {})
        self.proc: Optional[subprocess.Popen] = None
        self.restarts = 0
        self._watch: Optional[int] = None  # write end of the watchdog pipe, open while the server may run

    def start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._close_watch()
            read_end, self._watch = os.pipe()  # both non-inheritable: only this server gets the read end
            try:
                self.proc = subprocess.Popen(watchdog_argv(read_end, self.argv), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env={**os.environ, **self.env},
                                             start_new_session=True, pass_fds=(read_end,))
            except BaseException:
                self._close_watch()
                raise
            finally:
                os.close(read_end)
        _LIVE.add(self)
        _install_sigterm_handler()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, timeout: float) -> None:
        """Poll ``/health`` until it answers 200; ``EngineError`` with the log tail on exit or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise EngineError(f"SGLang server {self.url} exited with code {self.proc.returncode} while starting; "
                                  f"log tail ({self.log_path}):\n{self.tail()}")
            try:
                request(self.url + "/health", timeout=5)
                return
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise EngineError(f"SGLang server {self.url} not healthy after {timeout:.0f} s; log tail ({self.log_path}):\n"
                          f"{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(self.log_path) - 16384))
                return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds; idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # children left in the group (e.g. SGLang's scheduler processes)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._close_watch()
        self.proc = None

    def _close_watch(self) -> None:
        if self._watch is not None:
            os.close(self._watch)
            self._watch = None


def watchdog_argv(read_fd: int, argv: Sequence[str], grace: float = 5.0) -> list[str]:
    """``argv`` run under ``watchdog.py``, which ends the server's group when ``read_fd``'s pipe has no writer left."""
    return [sys.executable, _WATCHDOG, "--fd", str(read_fd), "--grace", str(grace), "--", *argv]


def default_launcher() -> list[str]:
    return [sys.executable, "-m", "sglang.launch_server"]


@atexit.register
def _kill_all() -> None:
    for server in list(_LIVE):
        server.kill(grace=2.0)


_PREVIOUS_SIGTERM: list = []


def _install_sigterm_handler() -> None:
    """On SIGTERM (scheduler preemption, ``kill``) kill the servers, then behave as before.

    The servers run in their own sessions, so a signal to the trainer does not reach them, and
    ``atexit`` does not run on a signal death: without this they would outlive the trainer.
    """
    import threading

    if _PREVIOUS_SIGTERM or threading.current_thread() is not threading.main_thread():
        return
    _PREVIOUS_SIGTERM.append(signal.getsignal(signal.SIGTERM))

    def handler(signum, frame):
        _kill_all()
        previous = _PREVIOUS_SIGTERM[0]
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
