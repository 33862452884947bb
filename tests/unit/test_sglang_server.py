"""rollout.sglang_server.ServerProcess and rollout/watchdog.py: server processes never outlive the trainer.

The stand-in server answers every GET with 200 (so ``wait_healthy`` passes) and first starts a
sleeping child of its own, like SGLang's scheduler processes; ``ignore-term`` makes it ignore
SIGTERM so only the SIGKILL after the grace period ends it.
"""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_fipo.rollout.engine import EngineError
from megatron_fipo.rollout.sglang_server import ServerProcess, free_port, watchdog_argv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STANDIN = r"""
import http.server, signal, subprocess, sys, time
if "ignore-term" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _standin(tmp_path, name, *extra):
    port = free_port()
    return ServerProcess([sys.executable, "-c", STANDIN, str(port), *extra], f"http://127.0.0.1:{port}",
                         str(tmp_path / f"{name}.log"))


def _gone(procs, timeout):
    """Wait until every process has exited (a zombie counts: nobody may reap orphans in a container)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _kill_groups(procs):
    for pgid in {p.info for p in procs}:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _count(procs):
    """(stand-in servers, their children) among ``procs``."""
    cmds = [p.cmdline() for p in procs]
    cmds = [c for c in cmds if not any(a.endswith("watchdog.py") for a in c)]
    return (sum("serve_forever" in " ".join(c) for c in cmds),
            sum(c[-1] == "import time; time.sleep(600)" for c in cmds))


def _record(root_pid):
    """Every descendant of ``root_pid``, each tagged with its process group for the cleanup."""
    procs = psutil.Process(root_pid).children(recursive=True)
    for p in procs:
        p.info = os.getpgid(p.pid)
    return procs


def test_sigkill_of_the_trainer_ends_every_server_process(tmp_path):
    # The second server starts in a thread that has exited by the time the trainer dies: its
    # server must live on until then (no tie to the starting thread), and die after.
    code = (f"import sys, threading, time; sys.path.insert(0, {REPO!r})\n"
            f"from tests.unit.test_sglang_server import _standin\n"
            f"import pathlib; tmp = pathlib.Path({str(tmp_path)!r})\n"
            f"servers = [_standin(tmp, 'a'), _standin(tmp, 'b', 'ignore-term')]\n"
            f"servers[0].start()\n"
            f"t = threading.Thread(target=servers[1].start); t.start(); t.join()\n"
            f"for s in servers: s.wait_healthy(60)\n"
            f"time.sleep(1.0)\n"
            f"assert all(s.alive() for s in servers)\n"
            f"print('ready', flush=True)\n"
            f"time.sleep(600)\n")
    trainer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    procs = []
    try:
        assert trainer.stdout.readline().strip() == "ready"
        procs = _record(trainer.pid)
        assert _count(procs) == (2, 2), procs  # and their watchdogs
        trainer.kill()
        trainer.wait(timeout=30)
        assert not _gone(procs, timeout=20)  # includes the SIGTERM-ignoring server, SIGKILLed after the grace
    finally:
        trainer.kill()
        trainer.wait()
        _kill_groups(procs)


def test_kill_ends_the_group_and_the_pipe_does_not_leak_into_other_servers(tmp_path):
    servers = [_standin(tmp_path, "a"), _standin(tmp_path, "b")]
    procs = []
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_healthy(60)
        time.sleep(0.5)
        procs = _record(os.getpid())
        procs = [p for p in procs if p.info in {s.proc.pid for s in servers}]
        assert _count(procs) == (2, 2) and len(procs) == 6, procs  # with the 2 watchdogs
        if os.path.isdir("/proc/self/fd"):  # the write end of a's pipe is held by this process only
            pipe = f"pipe:[{os.fstat(servers[0]._watch).st_ino}]"
            holders = [p.pid for p in procs for fd in os.listdir(f"/proc/{p.pid}/fd")
                       if os.readlink(f"/proc/{p.pid}/fd/{fd}") == pipe]
            assert holders == [servers[0].proc.pid], holders  # only a's watchdog, holding the read end
        servers[0].kill()
        assert not _gone([p for p in procs if p.info == procs[0].info], timeout=10)
        assert servers[1].alive()
        servers[1].kill()
        assert not _gone(procs, timeout=10)
        assert servers[0].proc is None and servers[0]._watch is None
    finally:
        for s in servers:
            s.kill(grace=0.5)
        _kill_groups(procs)


@pytest.mark.parametrize("exit_code, statement", [
    (3, "sys.exit(3)"),
    (-9, "os.kill(os.getpid(), 9)"),
    (-13, "import signal; signal.signal(13, signal.SIG_DFL); os.kill(os.getpid(), 13)"),  # Python ignores SIGPIPE
])
def test_a_server_that_exits_is_reported_with_its_exit_status_and_log(tmp_path, exit_code, statement):
    server = ServerProcess([sys.executable, "-c", f"import os, sys; print('boom', flush=True); {statement}"],
                           f"http://127.0.0.1:{free_port()}", str(tmp_path / "s.log"))
    try:
        server.start()
        with pytest.raises(EngineError, match=f"(?s)exited with code {exit_code} while starting.*boom"):
            server.wait_healthy(60)
        assert server.proc.returncode == exit_code and not server.alive()
    finally:
        server.kill()


def test_a_launcher_that_cannot_run_is_reported_with_the_reason(tmp_path):
    server = ServerProcess([str(tmp_path / "no-such-launcher")], "http://127.0.0.1:1", str(tmp_path / "s.log"))
    try:
        server.start()
        with pytest.raises(EngineError, match="(?s)exited with code 127 while starting.*cannot start.*No such file"):
            server.wait_healthy(60)
    finally:
        server.kill()


def test_the_watchdog_ends_the_group_when_the_pipe_has_no_writer(tmp_path):
    read_end, write_end = os.pipe()
    marker = tmp_path / "started"
    argv = watchdog_argv(read_end, [sys.executable, "-c", f"import signal, time; signal.signal(signal.SIGTERM, "
                                    f"signal.SIG_IGN); open({str(marker)!r}, 'w').close(); time.sleep(600)"],
                         grace=0.5)
    watchdog = subprocess.Popen(argv, pass_fds=(read_end,), start_new_session=True)
    os.close(read_end)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert watchdog.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        (server,) = psutil.Process(watchdog.pid).children()
        time.sleep(1.0)
        assert watchdog.poll() is None and server.is_running()
        os.close(write_end)
        write_end = None
        assert watchdog.wait(timeout=10) == -signal.SIGKILL  # SIGTERM ignored: the group got SIGKILL after the grace
        assert not _gone([server], timeout=10)
    finally:
        if write_end is not None:
            os.close(write_end)
        try:
            os.killpg(watchdog.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        watchdog.wait()
