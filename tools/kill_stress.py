"""SIGKILL the trainer at random moments after its first checkpoint and check that no process outlives it.

Usage: ``python tools/kill_stress.py [--kills 10] [--engine cpu|sglang] [--demo build/demo] [--seed 0]
[--window 20] [--grace 20] [--json OUT]``.

Each round runs ``python -m megatron_fipo train`` on the CPU demo (a small run, a checkpoint every
step, two reward workers; with ``--engine sglang`` generation goes through the CPU SGLang-protocol
server, started under its watchdog) in a new session, waits for the first complete checkpoint (its
marker file), then a random delay in ``[0, --window]`` seconds (so some kills land in a later save,
some in generation or training), and SIGKILLs the trainer process alone, as the OOM killer would.
Until the kill, the trainer's descendants are collected from ``/proc`` every 0.2 s: every process in
its session or process group, or whose parent chain leads to it (servers start their own session),
each known by pid and start time. Every one of them (megatron-core's checkpoint helpers, reward
workers, multiprocessing's resource tracker, servers and their watchdogs) must be gone within
``--grace`` seconds; one that is not is reported with its command line, then killed by pid so that
the next round starts clean. Exit status: 0 when no round left a process, 1 otherwise.

The tests load ``descendants`` / ``running`` from this file (tests/e2e: the kill tests). Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["rollout.n=4", "train.prompts_per_step=8", "train.mini_batch_prompts=4", "eval.every_steps=0",
         "eval.at_start=false", "log.progress=false", "log.tensorboard=false", "train.reward_workers=2",
         "train.steps=500", "checkpoint.every_steps=1", "checkpoint.keep_last=2", "checkpoint.export_hf=false"]
POLL_S = 0.2  # how often the descendants are collected before the kill
SGLANG = ["rollout.engine=sglang", f"rollout.launcher=[{sys.executable},-m,megatron_fipo.rollout.cpu_server]"]


# ------------------------------------------------------------------------------ /proc
def _stat(pid: int) -> tuple[int, int, int, int, str] | None:
    """``(ppid, pgrp, session, start time, state)`` of ``pid`` from ``/proc/<pid>/stat``, None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
    return int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]), fields[0]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int) -> dict[tuple[int, int], str]:
    """``{(pid, start time): command line}`` of every live process in ``root``'s session or process group,
    or whose parent chain leads to ``root`` (``root`` itself excluded)."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            table[int(name)] = st
    out = {}
    for pid, (ppid, pgrp, sid, start, state) in table.items():
        if pid == root or state == "Z":
            continue
        related, seen = root in (pgrp, sid), set()
        while not related and ppid > 1 and ppid not in seen:
            seen.add(ppid)
            related = ppid == root
            ppid = table[ppid][0] if ppid in table else 0
        if related:
            out[(pid, start)] = _cmdline(pid)
    return out


def running(procs: dict[tuple[int, int], str]) -> dict[tuple[int, int], str]:
    """Those of ``procs`` (from ``descendants``) still running: same pid and start time, not a zombie."""
    out = {}
    for (pid, start), cmd in procs.items():
        st = _stat(pid)
        if st is not None and st[3] == start and st[4] != "Z":
            out[(pid, start)] = cmd
    return out


def wait_gone(procs: dict, grace: float) -> dict:
    """Wait up to ``grace`` seconds for ``procs`` to end; returns those still running."""
    deadline = time.monotonic() + grace
    while (left := running(procs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_all(procs: dict) -> None:
    """SIGKILL each of ``procs`` still running, by pid."""
    for pid, _ in running(procs):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ------------------------------------------------------------------------------ one round
def one_round(args, rng: random.Random, run_dir: str) -> dict:
    cmd = [sys.executable, "-m", "megatron_fipo", "train", "--config", os.path.join(REPO, "examples", "demo_cpu.yaml"),
           f"model.hf_path={args.demo}/base", f"data.train_files=[{args.demo}/train.jsonl]",
           f"eval.files=[{args.demo}/test.jsonl]", f"train.run_dir={run_dir}", *SMALL,
           *(SGLANG if args.engine == "sglang" else [])]
    log = open(os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + ".log"), "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    seen: dict = {}
    start = time.monotonic()
    try:
        first = os.path.join(run_dir, "checkpoints", "iter_0000001", "fipo_checkpoint.json")
        while not os.path.exists(first):
            if proc.poll() is not None or time.monotonic() - start > args.timeout:
                raise RuntimeError(f"the trainer ended or overran before its first checkpoint (see {log.name})")
            seen.update(descendants(proc.pid))
            time.sleep(POLL_S)
        first_at, delay = time.monotonic(), rng.uniform(0.0, args.window)
        while time.monotonic() < first_at + delay and proc.poll() is None:
            seen.update(descendants(proc.pid))
            time.sleep(POLL_S)
        seen.update(descendants(proc.pid))
        if proc.poll() is not None:
            raise RuntimeError(f"the trainer ended by itself (code {proc.returncode}, see {log.name})")
        steps = sorted(d for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.startswith("iter_"))
        saving = any(".tmp-" in d for d in steps)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        seen.update(descendants(proc.pid))  # its session and group outlive it
        left = wait_gone(seen, args.grace)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_all(seen)
        log.close()
    return {"delay_s": round(delay, 2), "checkpoints": [d for d in steps if ".tmp-" not in d], "mid_save": saving,
            "descendants": sorted(cmd[:90] for cmd in seen.values()),
            "left": [f"{pid} {cmd}" for (pid, _), cmd in left.items()]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--engine", choices=["cpu", "sglang"], default="cpu")
    parser.add_argument("--demo", default=os.path.join(REPO, "build", "demo"), help="built if missing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=float, default=20.0, help="kill up to this many s after the first checkpoint")
    parser.add_argument("--grace", type=float, default=20.0, help="seconds every descendant has to end")
    parser.add_argument("--timeout", type=float, default=600.0, help="s a round may wait for its first checkpoint")
    parser.add_argument("--work", default=None, help="run directories (default: a new temporary directory)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.demo, "demo_info.json")):
        sys.path.insert(0, REPO)
        from megatron_fipo.data.demo_task import build_demo

        build_demo(args.demo)
    import tempfile

    work = args.work or tempfile.mkdtemp(prefix="kill_stress_")
    os.makedirs(work, exist_ok=True)
    rng, rounds = random.Random(args.seed), []
    for k in range(args.kills):
        t0 = time.monotonic()
        result = one_round(args, rng, os.path.join(work, f"round{k}"))
        rounds.append({**result, "round_s": round(time.monotonic() - t0, 1)})
        print(f"kill {k + 1}/{args.kills}: {result['delay_s']:.1f} s after the first checkpoint "
              f"({'mid-save, ' if result['mid_save'] else ''}complete: {', '.join(result['checkpoints'])}); "
              f"{len(result['descendants'])} descendants seen, "
              f"{'none left' if not result['left'] else 'LEFT: ' + '; '.join(result['left'])}", flush=True)
    failed = sum(bool(r["left"]) for r in rounds)
    print(f"Summary: {args.kills} SIGKILLs ({args.engine} engine), {failed} left a process behind")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"engine": args.engine, "seed": args.seed, "window_s": args.window, "rounds": rounds}, fh,
                      indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
