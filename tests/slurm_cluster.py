"""A private two-node Slurm cluster on this machine, for the end-to-end launcher tests.

``SlurmCluster(root).start()`` writes a ``slurm.conf``, a munge key and the daemons' state and logs
under ``root`` and starts ``munged``, ``slurmctld`` and two ``slurmd`` (``slurmd -N n1`` and
``-N n2``) on loopback addresses (``NodeAddr=127.0.0.2`` / ``127.0.0.3``, node names that are not
host names) and free ports; ``stop()`` cancels every job and ends them all. Slurm's defaults
otherwise, except the credential lifetime (``cred_expire``, 10 s instead of 120: a requeued job
waits that long before it starts again) and the scheduler's period (2 s instead of 60: when the
requeued job may start, the next pass starts it). ``env`` is the
environment a client needs (``SLURM_CONF``; ``sbatch``, ``srun``, ``scontrol``, ``scancel`` are
Debian's). No cgroups (``proctrack/linuxproc``, ``task/none``), no accounting, root runs
everything: what a CI container allows.

The daemons run in the foreground under a supervisor process (``python -m tests.slurm_cluster
supervise ROOT``) that is a child subreaper: the job steps' ``slurmstepd`` processes (which
detach from ``slurmd``) and everything they start are reparented to it, so on ``stop()`` (SIGTERM
to the supervisor, by pid) it ends the daemons and then every process still below it, and waits
for them. The supervisor also ends everything when the process that started it dies
(``PR_SET_PDEATHSIG``), so a killed test run leaves nothing behind.

``missing()`` says what to install when the Debian packages are not there (the tests skip with
that line); ``tools/bootstrap.sh`` installs them where it runs as root with ``apt-get``.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue")
INSTALL = "apt-get install slurmctld slurmd slurm-client munge (Debian; tools/bootstrap.sh does it as root)"
NODES = (("n1", "127.0.0.2"), ("n2", "127.0.0.3"))


def missing() -> Optional[str]:
    """None when a private cluster can run here, else one line saying what is missing and what to install."""
    sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    absent = [n for n in DAEMONS if not shutil.which(n, path=sbin)] + [n for n in CLIENTS if not shutil.which(n)]
    if absent:
        return f"no {', '.join(absent)}: {INSTALL}"
    if os.geteuid() != 0:
        return "the private Slurm cluster runs its daemons as root (SlurmUser=root); run the tests as root"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


class SlurmCluster:
    """Two nodes ``n1`` (127.0.0.2) and ``n2`` (127.0.0.3) in partition ``cpu``, each with ``cpus`` CPUs.

    Attributes:
        root: the cluster's directory (config, munge key and socket, state, logs).
        env: ``os.environ`` plus ``SLURM_CONF``: run the Slurm clients with it.
    """

    def __init__(self, root: str, cpus: int = 2, kill_wait: int = 30, cred_expire: int = 10):
        self.root = os.path.abspath(root)
        self.cpus, self.kill_wait, self.cred_expire = cpus, kill_wait, cred_expire
        self.conf = os.path.join(self.root, "slurm.conf")
        self.log_dir = os.path.join(self.root, "log")
        self.supervisor: Optional[subprocess.Popen] = None
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del self.env[key]  # a test run inside a Slurm job must not leak its job into this cluster

    # ------------------------------------------------------------------ config
    def write_config(self) -> None:
        for sub in ("munge", "state", "log", "spool"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(os.path.join(self.root, "munge"), 0o700)
        key = os.path.join(self.root, "munge", "munge.key")
        if not os.path.exists(key):
            with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as fh:
                fh.write(os.urandom(1024))
        ports = [free_port()] + [free_port(addr) for _, addr in NODES]
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(f"NodeName={name} NodeAddr={addr} Port={port} CPUs={self.cpus} "
                          f"RealMemory=2000 State=UNKNOWN" for (name, addr), port in zip(NODES, ports[1:]))
        r = self.root
        text = f"""# written by tests/slurm_cluster.py
ClusterName=fipotest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
AuthType=auth/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire={self.cred_expire}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/spool/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait={self.kill_wait}
MinJobAge=3600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
MailProg=/bin/true
{nodes}
PartitionName=cpu Nodes={",".join(n for n, _ in NODES)} Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w", encoding="utf-8") as fh:
            fh.write(text)
        open(os.path.join(r, "plugstack.conf"), "w").close()

    def commands(self) -> list[list[str]]:
        """The daemons' command lines, in start order (all in the foreground)."""
        m = os.path.join(self.root, "munge")
        munged = [_sbin("munged"), "-F", "--force", f"--socket={m}/munge.socket", f"--key-file={m}/munge.key",
                  f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed", f"--log-file={self.log_dir}/munged.log"]
        ctld = [_sbin("slurmctld"), "-D", "-i", "-f", self.conf]
        return [munged, ctld] + [[_sbin("slurmd"), "-D", "-f", self.conf, "-N", name] for name, _ in NODES]

    # ------------------------------------------------------------------ life
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self.write_config()
        spec = os.path.join(self.root, "daemons.json")
        with open(spec, "w", encoding="utf-8") as fh:
            json.dump({"commands": self.commands(), "munge_socket": os.path.join(self.root, "munge", "munge.socket"),
                       "env": {"SLURM_CONF": self.conf}}, fh)
        out = open(os.path.join(self.log_dir, "supervisor.log"), "ab")
        self.supervisor = subprocess.Popen([sys.executable, "-m", "tests.slurm_cluster", "supervise", spec], cwd=REPO,
                                           env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        try:
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_idle(self, timeout: float) -> None:
        """Wait until both nodes are up and idle (``sinfo``-free: ``scontrol show node``)."""
        deadline = time.monotonic() + timeout
        states = {}
        while time.monotonic() < deadline:
            if self.supervisor.poll() is not None:
                raise RuntimeError(f"the Slurm daemons exited: {self.tail()}")
            states = self.node_states()
            if states and all(s.split("+")[0] == "IDLE" for s in states.values()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the nodes are not idle after {timeout:.0f}s ({states}): {self.tail()}")

    def node_states(self) -> dict:
        proc = self.run(["scontrol", "-o", "show", "node"], check=False, timeout=20)
        return dict(re.findall(r"NodeName=(\S+).*?State=(\S+)", proc.stdout)) if proc.returncode == 0 else {}

    def stop(self, timeout: float = 60.0) -> None:
        """Cancel every job, wait for them to end, then stop the supervisor (it ends the rest). Idempotent."""
        if self.supervisor is None:
            return
        try:
            if self.supervisor.poll() is None:
                self.run(["scancel", "--full", "--user=root"], check=False, timeout=20)
                deadline = time.monotonic() + timeout / 2
                while time.monotonic() < deadline and self.jobs_alive():
                    time.sleep(0.5)
        finally:
            if self.supervisor.poll() is None:
                self.supervisor.send_signal(signal.SIGTERM)
                try:
                    self.supervisor.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.supervisor.kill()  # its children get SIGKILL from PR_SET_PDEATHSIG
                    self.supervisor.wait()
            self.supervisor = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ clients
    def run(self, argv, *, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def jobs_alive(self) -> list:
        proc = self.run(["squeue", "-h", "-o", "%i %T"], check=False, timeout=20)
        return proc.stdout.split("\n") if proc.returncode == 0 and proc.stdout.strip() else []

    def sbatch(self, argv, *, cwd: str = REPO, env: Optional[dict] = None) -> int:
        """Submit ``sbatch --parsable ARGV``; returns the job id."""
        proc = self.run(["sbatch", "--parsable", *argv], cwd=cwd, env={**self.env, **(env or {})})
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ``NodeList``, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)], timeout=20).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"),
                 timeout: float = 600, poll: float = 1.0) -> dict:
        """Poll until the job is in one of ``states``; returns its record. ``TimeoutError`` with the state otherwise."""
        deadline, info = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s: {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        out = []
        for name in sorted(os.listdir(self.log_dir)) if os.path.isdir(self.log_dir) else []:
            with open(os.path.join(self.log_dir, name), errors="replace") as fh:
                out.append(f"--- {name}\n" + "".join(fh.readlines()[-lines:]))
        return "\n".join(out)


# ---------------------------------------------------------------------------------------------- supervisor
def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def supervise(spec_path: str) -> int:
    """Run the daemons of ``spec_path`` in the foreground; on SIGTERM (or the parent's death) end them
    (slurmd, slurmctld, then munged) and then every process left below this one, and wait for all."""
    import psutil

    _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the test process died -> SIGTERM to us
    _prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: detached slurmstepd and job processes are reparented here
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    env = {**os.environ, **spec["env"]}
    daemons = []
    try:
        for i, argv in enumerate(spec["commands"]):
            daemons.append(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL))
            print(f"[slurm_cluster] started pid {daemons[-1].pid}: {' '.join(argv)}", flush=True)
            if i == 0:  # munged must be listening before slurmctld authenticates anything
                deadline = time.monotonic() + 20
                while not os.path.exists(spec["munge_socket"]) and time.monotonic() < deadline:
                    time.sleep(0.05)
        while not stopping:
            dead = [d for d in daemons if d.poll() is not None]
            if dead:
                print(f"[slurm_cluster] {dead[0].args[0]} exited with {dead[0].returncode}: stopping", flush=True)
                break
            _reap_orphans(daemons)
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for d in reversed(daemons):  # slurmd, slurmctld, munged
            if d.poll() is None:
                d.terminate()
                try:
                    d.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    d.kill()
                    d.wait()
        for attempt in range(3):  # whatever the daemons left: slurmstepd, job steps
            rest = psutil.Process().children(recursive=True)
            if not rest:
                break
            for p in rest:
                try:
                    print(f"[slurm_cluster] ending leftover pid {p.pid}: {' '.join(p.cmdline())[:200]}", flush=True)
                    p.send_signal(signal.SIGTERM if attempt == 0 else signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(rest, timeout=10)
            _reap_orphans(daemons)
        print("[slurm_cluster] stopped", flush=True)
    return 0


def _reap_orphans(daemons) -> None:
    """``waitpid`` the exited children that are not ``daemons`` (processes reparented to this subreaper)."""
    import psutil

    own = {d.pid for d in daemons}
    for child in psutil.Process().children():
        if child.pid not in own:
            try:
                os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pass


if __name__ == "__main__":
    if sys.argv[1:2] == ["supervise"] and len(sys.argv) == 3:
        sys.exit(supervise(sys.argv[2]))
    if sys.argv[1:2] == ["up"] and len(sys.argv) == 3:  # by hand: bring a cluster up in DIR until ^C
        cluster = SlurmCluster(sys.argv[2]).start()
        print(f"export SLURM_CONF={cluster.conf}   # ^C stops the cluster", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            cluster.stop()
        sys.exit(0)
    print("usage: python -m tests.slurm_cluster up DIR", file=sys.stderr)
    sys.exit(2)
