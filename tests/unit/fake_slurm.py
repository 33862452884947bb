"""A fake Slurm on PATH for the launcher tests: ``srun``, ``scontrol``, ``hostname``, ``sleep``, ``torchrun``.

What it stands for that the real two-node cluster of ``tests/slurm_cluster.py`` cannot show: nodes of
8 GPUs and three-node layouts, with the exact commands and environment each node gets. The real
cluster runs the CPU demo through the same scripts (``tests/e2e/test_slurm.py``).

``install(bin_dir, log)`` writes the executables; every call is recorded as one JSON line in ``log``
(``read(log)`` returns them). ``srun`` runs its command once per task like a one-task-per-node step
(``--nodes/--ntasks/--relative`` or ``-w`` over ``FAKE_SLURM_NODES``; ``SLURM_PROCID``,
``SLURM_NODEID``, ``SLURMD_NODENAME`` set; ``--output`` patterns ``%N %j %t`` honoured; container
flags recorded and ignored) and forwards SIGTERM / SIGINT to its tasks. ``scontrol show node``
answers each node's ``NodeAddr`` (``FAKE_SLURM_ADDRS``, default 127.0.1.1, 127.0.1.2, ...: local
addresses, so the rendezvous checks pass), ``scontrol show job`` a running job with
``FAKE_SLURM_RESTARTS`` restarts. ``torchrun`` (``FIPO_TORCHRUN``, the launcher ``fipo_job.py``
execs instead of running torch's in-process) records its
argv and the launch environment, waits for ``FAKE_WAIT_FOR_SGLANG`` server records (a trainer waits
for its servers), then sleeps ``FAKE_TORCHRUN_SLEEP`` and exits ``FAKE_TORCHRUN_RC``.
``sglang`` stands for ``python -m sglang.launch_server`` (``FIPO_SGLANG_LAUNCHER``): it records, waits
to be killed and fails after ``FAKE_SGLANG_SECONDS`` (30). ``sleep`` is shortened to 0.05 s (NeMo-Run's template sleeps a
minute between checks). Every process that may outlive its parent records its pid (``kill_all``).
"""
from __future__ import annotations

import json
import os
import signal
import sys

ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "CUDA_DEVICE_MAX_CONNECTIONS",
            "SLURM_PROCID", "SLURMD_NODENAME", "FIPO_NODES", "SLURM_RESTART_COUNT", "FIPO_STOP_FILE")

_RECORD = '''
import json, os, sys, time
def record(kind, **kw):
    line = json.dumps({"kind": kind, "pid": os.getpid(), **kw}) + "\\n"
    fd = os.open(os.environ["FAKE_SLURM_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, line.encode()); os.close(fd)
'''

_SRUN = _RECORD + r'''
import signal, subprocess
VALUED = {"--nodes", "-N", "--ntasks", "-n", "--ntasks-per-node", "--relative", "-r", "-w", "--nodelist", "--output",
          "-o", "--error", "-e", "--container-image", "--container-mounts", "--container-workdir", "--chdir"}
argv, opts, i = sys.argv[1:], {}, 0
while i < len(argv) and argv[i].startswith("-"):
    key, eq, value = argv[i].partition("=")
    if not eq and key in VALUED:
        value, i = argv[i + 1], i + 1
    opts[key] = value if (eq or key in VALUED) else True
    i += 1
command = argv[i:]
nodes = os.environ["FAKE_SLURM_NODES"].split(",")
if "-w" in opts or "--nodelist" in opts:
    hosts = (opts.get("-w") or opts["--nodelist"]).split(",")
else:
    first = int(opts.get("--relative", opts.get("-r", 0)))
    hosts = nodes[first:first + int(opts.get("--nodes", opts.get("-N", len(nodes) - first)))]
record("srun", argv=sys.argv[1:], opts=opts, hosts=hosts, command=command)
procs = []
for rank, host in enumerate(hosts):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_NODEID=str(rank), SLURMD_NODENAME=host,
               SLURM_STEP_NUM_NODES=str(len(hosts)))
    out = opts.get("--output") or opts.get("-o")
    stdout = None
    if out:
        path = out.replace("%N", host).replace("%j", os.environ.get("SLURM_JOB_ID", "0")).replace("%t", str(rank))
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        stdout = open(path, "a")
    procs.append(subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None))
    record("task", task_pid=procs[-1].pid)
def forward(signum, frame):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0) if all(c >= 0 for c in codes) else 143)
'''

_SCONTROL = _RECORD + r'''
record("scontrol", argv=sys.argv[1:])
args = [a for a in sys.argv[1:] if a != "-o"]
nodes = os.environ["FAKE_SLURM_NODES"].split(",")
if args[:2] == ["show", "hostnames"]:
    print("\n".join(nodes))
elif args[:2] == ["show", "node"]:
    addrs = os.environ.get("FAKE_SLURM_ADDRS", "").split(",") if os.environ.get("FAKE_SLURM_ADDRS") else [
        f"127.0.1.{i + 1}" for i in range(len(nodes))]
    wanted = args[2].split(",") if len(args) > 2 else nodes
    for name, addr in zip(nodes, addrs):
        if name in wanted:
            print(f"NodeName={name} Arch=x86_64 CoresPerSocket=8 NodeAddr={addr} NodeHostName={name} Version=22.05")
elif args[:2] == ["show", "job"]:
    print(f"JobId={args[2]} JobName=fipo JobState=RUNNING Reason=None Requeue=1 "
          f"Restarts={os.environ.get('FAKE_SLURM_RESTARTS', os.environ.get('SLURM_RESTART_COUNT', '0'))}")
'''

_TORCHRUN = _RECORD + r'''
keys = %r
record("torchrun", argv=sys.argv[1:], host=os.environ.get("SLURMD_NODENAME"), env={k: os.environ.get(k) for k in keys})
deadline = time.monotonic() + 300  # generous: on a loaded 2-core machine two interpreters start per server
while time.monotonic() < deadline and int(os.environ.get("FAKE_WAIT_FOR_SGLANG", "0")) > sum(
        '"kind": "sglang"' in line for line in open(os.environ["FAKE_SLURM_LOG"])):
    time.sleep(0.05)
end = time.monotonic() + float(os.environ.get("FAKE_TORCHRUN_SLEEP", "0"))
stop = os.environ.get("FIPO_STOP_FILE") if os.environ.get("FAKE_TORCHRUN_STOPS") else None
while time.monotonic() < end:  # a trainer that honours the stop file ends after its "step"
    if stop and os.path.exists(stop):
        record("torchrun_stop", host=os.environ.get("SLURMD_NODENAME"))
        break
    time.sleep(0.05)
sys.exit(int(os.environ.get("FAKE_TORCHRUN_RC", "0")))
''' % (ENV_KEYS,)

_SGLANG = _RECORD + r'''
record("sglang", argv=sys.argv[1:], host=os.environ.get("SLURMD_NODENAME"))
print("fake sglang: loading the model", flush=True)
time.sleep(float(os.environ.get("FAKE_SGLANG_SECONDS", "30")))
print("fake sglang: CUDA out of memory", flush=True)
sys.exit(1)
'''

_HOSTNAME = _RECORD + r'''
print(os.environ.get("SLURMD_NODENAME", "fake-host"))
'''

_SLEEP = "import time\ntime.sleep(0.05)\n"


def install(bin_dir: str, log: str) -> dict:
    """Write the fake executables into ``bin_dir``; returns the environment that puts them first on PATH."""
    os.makedirs(bin_dir, exist_ok=True)
    for name, body in (("srun", _SRUN), ("scontrol", _SCONTROL), ("torchrun", _TORCHRUN), ("sglang", _SGLANG),
                       ("hostname", _HOSTNAME), ("sleep", _SLEEP)):
        path = os.path.join(bin_dir, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(f"#!{sys.executable}\n{body}")
        os.chmod(path, 0o755)
    return {"PATH": bin_dir + os.pathsep + os.environ["PATH"], "FAKE_SLURM_LOG": log,
            "FIPO_SGLANG_LAUNCHER": os.path.join(bin_dir, "sglang"), "FIPO_TORCHRUN": os.path.join(bin_dir, "torchrun")}


def read(log: str) -> list[dict]:
    if not os.path.exists(log):
        return []
    with open(log, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and its command line contains ``marker`` (a pid reused since is left alone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return marker.encode() in fh.read()
    except OSError:
        return False


def kill_all(log: str, marker: str) -> None:
    """SIGKILL every recorded process still running this test's fakes (``marker``: their directory)."""
    for rec in read(log):
        for pid in (rec.get("pid"), rec.get("task_pid")):
            if pid and pid != os.getpid() and (alive(pid, marker) or alive(pid, "fipo_job.py")):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
