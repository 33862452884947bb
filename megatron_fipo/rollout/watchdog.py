"""The parent of each SGLang server process: it ends the server's process group when the trainer dies, SIGKILL included.

``python watchdog.py --fd N [--grace S] -- <server argv...>``, started by ``sglang_server.ServerProcess``
(run by file path, so it needs neither the package on ``sys.path`` nor anything beyond the stdlib).
It leads its own process group, runs the server as its child in that group, and waits on both
the server and the read end ``N`` of a pipe whose only write end the trainer process holds:

* the pipe reaches EOF when every write end is closed, that is when the trainer process is gone,
  however it died. Signals and ``atexit`` cannot cover SIGKILL or an OOM kill, and
  ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits (servers are
  restarted from short-lived pool threads), so the pipe is the process-level signal. Then it
  SIGTERMs the group, SIGKILLs it after ``--grace`` seconds and so dies with it;
* when the server exits by itself, the watchdog exits the same way (the exit code, or the same
  signal), so the trainer sees the server's own exit status;
* SIGTERM / SIGINT / SIGHUP reach the whole group (``ServerProcess.kill`` signals the group): the
  watchdog ignores them for itself and keeps waiting, so it exits after the server, never before it.
  A signal sent to the watchdog's pid alone is not forwarded; signal the group.

POSIX only. Imports nothing from the project.
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fd", type=int, required=True, help="read end of the trainer's pipe")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL of the group")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the server's argv")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no server command after --")
    return args


def pipe_closed(fd: int, timeout: float) -> bool:
    """Whether every write end of the pipe is closed (waits up to ``timeout`` seconds)."""
    poller = select.poll()  # not select(): the trainer's fd numbers can exceed FD_SETSIZE
    poller.register(fd, select.POLLIN)
    if not poller.poll(timeout * 1000):
        return False
    try:
        return os.read(fd, 4096) == b""  # the trainer never writes: readable means EOF
    except OSError:
        return True


def end_group(server: subprocess.Popen, grace: float) -> None:
    """SIGTERM the group (the server and whatever it started), SIGKILL it after ``grace``: the watchdog dies too."""
    os.killpg(os.getpgrp(), signal.SIGTERM)  # our own handler ignores it
    try:
        server.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(os.getpgrp(), signal.SIGKILL)


def exit_like(returncode: int) -> None:
    """Exit with ``returncode`` as ``Popen`` reports it: ``-N`` means killed by signal N, so die by N."""
    if returncode >= 0:
        sys.exit(returncode)
    sig = -returncode
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a SIGSEGV'd server: no core of the watchdog
    except (ImportError, ValueError, OSError):
        pass
    try:  # our handlers, and Python's own (SIGINT, SIGPIPE ignored), would stop the signal
        signal.signal(sig, signal.SIG_DFL)
    except (OSError, ValueError):  # SIGKILL, SIGSTOP: always default
        pass
    os.kill(os.getpid(), sig)
    time.sleep(1.0)  # a signal that does not terminate (never the case for a dead server)
    sys.exit(128 + sig)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if os.getpgrp() != os.getpid():  # ServerProcess starts us in a new session already; be sure for other callers
        os.setpgid(0, 0)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: None)
    # The server inherits stdin/stdout/stderr (the log) but not the pipe: close_fds is the default.
    try:
        server = subprocess.Popen(args.command)
    except OSError as err:  # e.g. no such launcher: the log says so, the exit code is the shell's 127
        print(f"watchdog: cannot start {args.command[0]}: {err}", file=sys.stderr, flush=True)
        sys.exit(127)
    while server.poll() is None:
        if pipe_closed(args.fd, timeout=0.5):
            end_group(server, args.grace)
    if pipe_closed(args.fd, timeout=0):  # nobody left to reap what the server started (ServerProcess.kill would)
        os.killpg(os.getpgrp(), signal.SIGKILL)
    exit_like(server.returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
