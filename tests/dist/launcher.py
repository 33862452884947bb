"""Run one Python function in N local gloo processes and gather what each rank returns.

Owns: process launch for the multi-process tests in tests/dist (and any other test that needs
torch.distributed on CPU). The parent imports the standard library and torch.distributed (for the
rendezvous store); the workers import whatever the launched function's file imports.

How it works: the function is named by its file path and name (so test modules need not be a
package), its arguments are pickled into a temporary directory, and N `python launcher.py`
workers are started in one new process group with the torchrun environment
(MASTER_ADDR=127.0.0.1, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE; OMP_NUM_THREADS=1 unless set).
As under torchrun, the parent hosts the rendezvous TCPStore (bound to port 0, so concurrent
launches never race for a port) and the workers join it as clients
(TORCHELASTIC_USE_AGENT_STORE=True), so ``init_process_group("gloo")`` with env:// works
unchanged; workers do not initialise torch.distributed themselves, the launched function does.
Each worker pickles ("ok", value) or ("error", formatted traceback) for its rank.

No process is left behind: the parent enforces a hard timeout and kills the whole process group
on timeout, after the first failing rank (following a short grace period, since the others are
usually blocked in a collective) and on any exception of its own; workers also exit by
themselves when the launching process disappears (e.g. killed by pytest-timeout).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[2]


class DistributedTestError(RuntimeError):
    """A rank raised, died, or the launch timed out; the message carries each rank's story."""


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    failure_grace: float = 10.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` in ``world_size`` fresh processes and return their results.

    Args:
        fn: a module-level function of an importable file (looked up by file path and name).
        world_size: number of processes (ranks 0..world_size-1).
        *args, **kwargs: picklable arguments, identical on every rank.
        timeout: hard limit in seconds for the whole launch.
        env: extra environment variables for the workers.
        failure_grace: seconds the other ranks get to finish after one rank failed.

    Returns:
        list of the per-rank return values (must be picklable), indexed by rank.

    Raises:
        DistributedTestError: on timeout, a nonzero exit, or an exception in any rank; the
            message includes each failing rank's traceback and the tail of its output.
    """
    from torch.distributed import TCPStore

    source = Path(sys.modules[fn.__module__].__file__).resolve()
    store = TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=timeout))
    with tempfile.TemporaryDirectory(prefix="dist_launch_") as tmp:
        tmpdir = Path(tmp)
        with open(tmpdir / "job.pkl", "wb") as f:
            pickle.dump((str(source), fn.__qualname__, args, kwargs), f)
        procs = []
        try:
            procs = _start_workers(tmpdir, world_size, store.port, env or {})
            status = _wait(procs, timeout, failure_grace)
        finally:
            _kill_group(procs)
            del store
        return _collect(tmpdir, world_size, procs, status)


def _start_workers(tmpdir: Path, world_size: int, port: int, extra_env: dict[str, str]) -> list:
    base = dict(os.environ)
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS=base.get("OMP_NUM_THREADS", "1"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(_REPO_ROOT), base.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
        _DIST_LAUNCH_PARENT=str(os.getpid()),
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    base.update(extra_env)
    procs = []
    for rank in range(world_size):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        # Rank 0 leads a new process group; the others join it, so one killpg ends them all
        # (preexec_fn rather than Popen's process_group, which needs Python >= 3.11).
        pgid = 0 if rank == 0 else procs[0].pid
        with open(tmpdir / f"rank{rank}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, __file__, str(tmpdir), str(rank)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=functools.partial(os.setpgid, 0, pgid),  # noqa: PLW1509 - setpgid only
            ))
    return procs


def _wait(procs: list, timeout: float, grace: float) -> str:
    deadline, status = time.monotonic() + timeout, "timeout"
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return "done"
        if status == "timeout" and any(c not in (None, 0) for c in codes):
            deadline, status = min(deadline, time.monotonic() + grace), "failed"
        time.sleep(0.05)
    return status


def _kill_group(procs: list) -> None:
    if not procs:
        return
    try:
        os.killpg(procs[0].pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
        p.wait()


def _collect(tmpdir: Path, world_size: int, procs: list, status: str) -> list[Any]:
    results, problems = [], []
    for rank in range(world_size):
        out = tmpdir / f"rank{rank}.out"
        log_tail = (tmpdir / f"rank{rank}.log").read_text(errors="replace")[-3000:]
        if out.exists():
            with open(out, "rb") as f:
                kind, value = pickle.load(f)
            if kind == "ok":
                results.append(value)
                continue
            problems.append(f"--- rank {rank} raised:\n{value}\n--- rank {rank} output tail:\n{log_tail}")
        else:
            problems.append(
                f"--- rank {rank} gave no result (exit code {procs[rank].returncode}, "
                f"launch {status}); output tail:\n{log_tail}"
            )
        results.append(None)
    if problems:
        head = {"timeout": "timed out", "failed": "failed (survivors killed after the grace period)"}
        raise DistributedTestError(
            f"distributed launch {head.get(status, 'failed')}:\n" + "\n".join(problems))
    return results


def _exit_with_parent(parent: int) -> None:
    """End this worker if the launching process dies without killing us (e.g. SIGKILL)."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _worker_main(tmpdir: str, rank: str) -> None:
    if "_DIST_LAUNCH_PARENT" in os.environ:
        _exit_with_parent(int(os.environ["_DIST_LAUNCH_PARENT"]))
    out = Path(tmpdir) / f"rank{rank}.out"
    try:
        with open(Path(tmpdir) / "job.pkl", "rb") as f:
            source, qualname, args, kwargs = pickle.load(f)
        spec = importlib.util.spec_from_file_location(f"_dist_job_{Path(source).stem}", source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        fn = module
        for part in qualname.split("."):
            fn = getattr(fn, part)
        result = ("ok", fn(*args, **kwargs))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        result = ("error", traceback.format_exc())
    try:
        payload = pickle.dumps(result)
    except Exception:  # noqa: BLE001 - an unpicklable return value is the test's bug
        payload = pickle.dumps(("error", traceback.format_exc()))
        result = ("error", None)
    with open(str(out) + ".tmp", "wb") as f:
        f.write(payload)
    os.replace(str(out) + ".tmp", out)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gloo/atexit hooks can block on peers that already left.
    os._exit(0 if result[0] == "ok" else 1)


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
