"""What one node of a FIPO Slurm job runs: ``torchrun`` on training nodes, SGLang servers on rollout nodes.

Usage (inside an allocation, one task per node; ``slurm/fipo.sbatch`` and
``slurm/launch_nemo_run.py`` both run exactly these commands)::

    python slurm/fipo_job.py train  --config CFG [--rollout-nodes R] [--gpus-per-node 8] [-- overrides...]
    python slurm/fipo_job.py train  --config CFG --gpus-per-node 0 --procs-per-node 2 ...   # CPU nodes
    python slurm/fipo_job.py sglang --config CFG --rollout-nodes R [--log-dir DIR] [-- overrides...]
    python slurm/fipo_job.py train  --print ...     # show the command and environment, run nothing

Owns the node-side launch logic, so both launchers share one definition of the job:
the allocation's hosts (``FIPO_NODES``, else ``scontrol show hostnames``) split into training nodes
(the first ones) and ``--rollout-nodes`` SGLang nodes (the last ones); their addresses (Slurm's
``NodeAddr`` from ``scontrol show node``: node names need not resolve); rendezvous
(``MASTER_ADDR`` = the first training node's address, or ``FIPO_MASTER_ADDR``; static
``--node-rank`` = the task's ``SLURM_PROCID``), checked before torchrun starts: an address that
does not resolve, is not the master's own, or cannot be reached within ``FIPO_CONNECT_TIMEOUT_S``
(45 s) ends the node with one line naming it; the NCCL / Gloo interface (``FIPO_IFNAME``, else the
interface that routes to another node's address); ``--resume`` after a requeue
(``SLURM_RESTART_COUNT > 0``); in disaggregated mode the SGLang server command lines from
``rollout.sglang`` of the same config (``tp_size`` GPUs each, ``gpus_per_node / tp_size`` servers
per node; on nodes without GPUs ``procs_per_node / tp_size`` servers, e.g. the CPU server through
``FIPO_SGLANG_LAUNCHER``) and the ``rollout.urls`` (node addresses) handed to the trainer. The
config is validated for the training world size (nodes x ``--procs-per-node``, which is the GPUs per
node unless the nodes have none) before anything starts.

torchrun runs in this process (``torch.distributed.run``): when Slurm ends the step (requeue,
preemption, cancellation, time limit) each node prints one line saying so and from which
checkpoint the run resumes, instead of torchrun's ``SignalException`` traceback, and a requeued
node exits 0. SIGUSR1 to the step (NeMo-Run's ``--signal USR1@300`` before the time limit; the
sbatch script signals only its batch shell) reaches this process alone (torchrun's workers inherit
it blocked): the first node creates the trainer's stop file, the trainer stops after its current
step with a checkpoint, and each node exits 1 (unless that was the last step) so that NeMo-Run's
template requeues the job. ``FIPO_TORCHRUN`` names another launcher to exec instead (the tests'
stand-in).

Imports only ``megatron_fipo.config.schema`` / ``plan`` at module level (the SGLang role also uses the
rollout package's server process); not part of the installed package, it runs from a checkout or
the image's ``/opt/megatron_fipo``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from typing import Mapping, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_fipo.config.schema import Config, load_config, validate  # noqa: E402

DEFAULT_MASTER_PORT = 29500
DEFAULT_SGLANG_PORT = 30000
CONNECT_TIMEOUT_S = 45.0  # an unreachable master ends the job within a minute
LAUNCHER_KEYS = ("rollout.engine", "rollout.mode", "rollout.urls")


@dataclasses.dataclass(frozen=True)
class Job:
    """One job's launch settings (the same on every node).

    Attributes:
        config: YAML config path; ``overrides``: dotted ``key=value`` overrides of the user.
        hosts: every node of the allocation, in Slurm order.
        addresses: each host's address (Slurm's ``NodeAddr``); empty: the names themselves.
        gpus_per_node: 0 for nodes without GPUs (CPU training and CPU rollout servers).
        procs_per_node: training processes per node; None: one per GPU (required without GPUs).
        rollout_nodes: > 0 runs SGLang on the last ``rollout_nodes`` hosts (disaggregated).
        restart: ``SLURM_RESTART_COUNT`` (> 0 after a requeue: the trainer resumes).
    """

    config: str
    overrides: tuple = ()
    hosts: tuple = ("localhost",)
    gpus_per_node: int = 8
    rollout_nodes: int = 0
    master_port: int = DEFAULT_MASTER_PORT
    sglang_port: int = DEFAULT_SGLANG_PORT
    restart: int = 0
    procs_per_node: Optional[int] = None
    addresses: tuple = ()

    def __post_init__(self):
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.procs_per_node is None and not self.gpus_per_node:
            raise ValueError("nodes without GPUs (--gpus-per-node=0) need the training processes per node: "
                             "--procs-per-node N (FIPO_PROCS_PER_NODE in fipo.sbatch)")
        if self.procs < 1:
            raise ValueError(f"--procs-per-node must be >= 1, got {self.procs}")
        if self.gpus_per_node and self.procs != self.gpus_per_node:
            raise ValueError(f"one training process per GPU: --procs-per-node={self.procs} must equal "
                             f"--gpus-per-node={self.gpus_per_node} (or run on nodes without GPUs: --gpus-per-node=0)")
        if self.addresses and len(self.addresses) != len(self.hosts):
            raise ValueError(f"{len(self.addresses)} addresses for {len(self.hosts)} hosts")
        if not 0 <= self.rollout_nodes < len(self.hosts):
            raise ValueError(f"--rollout-nodes={self.rollout_nodes} must leave at least one of the "
                             f"{len(self.hosts)} node(s) {list(self.hosts)} for training")
        for item in self.overrides:
            if item.partition("=")[0].strip() in LAUNCHER_KEYS and self.rollout_nodes:
                raise ValueError(f"override {item!r}: with --rollout-nodes the launcher sets "
                                 f"{', '.join(LAUNCHER_KEYS)} itself")

    @property
    def train_hosts(self) -> tuple:
        return self.hosts[:len(self.hosts) - self.rollout_nodes]

    @property
    def rollout_hosts(self) -> tuple:
        return self.hosts[len(self.hosts) - self.rollout_nodes:]

    @property
    def procs(self) -> int:
        """Training processes per node (torchrun's ``--nproc-per-node``)."""
        return self.gpus_per_node if self.procs_per_node is None else self.procs_per_node

    @property
    def slots(self) -> int:
        """What rollout servers are laid out over on a rollout node: its GPUs, or without GPUs its processes."""
        return self.gpus_per_node or self.procs

    def address(self, host: str) -> str:
        """``host``'s address (Slurm's ``NodeAddr``; the name itself when unknown)."""
        return dict(zip(self.hosts, self.addresses)).get(host, host)

    @property
    def master_addr(self) -> str:
        return self.address(self.train_hosts[0])

    @property
    def world_size(self) -> int:
        return len(self.train_hosts) * self.procs


def sglang_layout(config: Config, gpus_per_node: int, what: str = "GPUs") -> tuple[int, int, dict]:
    """``(tp_size, servers per node, other server arguments)`` from ``rollout.sglang``.

    ``gpus_per_node``: the node's GPUs, or on a node without GPUs its processes (``what``).
    """
    tp, args = config.rollout.sglang_server_args()
    if not isinstance(tp, int) or tp < 1 or gpus_per_node % tp:
        raise ValueError(f"rollout.sglang.tp_size={tp!r} must be a positive divisor of the {gpus_per_node} "
                         f"{what} per node")
    for key in ("model_path", "host", "port", "base_gpu_id"):
        if key in args:
            raise ValueError(f"rollout.sglang.{key} is set by the launcher; remove it from the config")
    return tp, gpus_per_node // tp, args


def _layout(job: Job, config: Config) -> tuple[int, int, dict]:
    return sglang_layout(config, job.slots, "GPUs" if job.gpus_per_node else "processes (no GPUs)")


def rollout_urls(job: Job, config: Config) -> list[str]:
    """The SGLang servers of the rollout nodes at their addresses, in host order (``rollout.urls``)."""
    _, per_node, _ = _layout(job, config)
    return [f"http://{job.address(host)}:{job.sglang_port + i}" for host in job.rollout_hosts for i in range(per_node)]


def train_overrides(job: Job, config: Config) -> list[str]:
    """The user's overrides, plus the disaggregated rollout settings when there are rollout nodes."""
    out = list(job.overrides)
    if job.rollout_nodes:
        out += ["rollout.engine=sglang", "rollout.mode=disaggregated",
                "rollout.urls=[" + ",".join(rollout_urls(job, config)) + "]"]
    return out


def resolve(job: Job) -> Config:
    """The config as the trainer will see it, validated for the training world size."""
    config = load_config(job.config, train_overrides(job, load_config(job.config, job.overrides)))
    for message in validate(config, world_size=job.world_size):
        print(f"[fipo_job] warning: {message}", file=sys.stderr)
    if job.rollout_nodes:
        _layout(job, config)
    return config


def torchrun_argv(job: Job, config: Config, node_rank: int) -> list[str]:
    """``torchrun ... -m megatron_fipo train ...`` of training node ``node_rank`` (static rendezvous)."""
    nodes = len(job.train_hosts)
    if not 0 <= node_rank < nodes:
        raise ValueError(f"node rank {node_rank} is not one of the {nodes} training node(s)")
    resume = ["--resume"] if job.restart > 0 else []
    return ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={job.procs}", f"--node-rank={node_rank}",
            f"--master-addr={job.master_addr}", f"--master-port={job.master_port}",
            "-m", "megatron_fipo", "train", *resume, "--config", job.config, *train_overrides(job, config)]


def sglang_argvs(job: Job, config: Config, launcher: Sequence[str]) -> list[list[str]]:
    """One ``sglang.launch_server`` command per server of a rollout node (GPUs ``i*tp .. (i+1)*tp - 1``;
    no ``--base-gpu-id`` on a node without GPUs)."""
    from megatron_fipo.rollout.sglang_server import server_argv

    tp, per_node, extra = _layout(job, config)
    return [[*launcher, "--model-path", config.model.hf_path, "--host", "0.0.0.0", "--port", str(job.sglang_port + i),
             "--tp-size", str(tp), *(["--base-gpu-id", str(i * tp)] if job.gpus_per_node else []), *server_argv(extra)]
            for i in range(per_node)]


def route_interface(host: str) -> Optional[str]:
    """Name of the local network interface whose address routes to ``host`` (Linux), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((socket.gethostbyname(host), 9))  # UDP connect: no packet is sent
            local = sock.getsockname()[0]
        import fcntl
        import struct

        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                try:
                    packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue
            if socket.inet_ntoa(packed[20:24]) == local:
                return name
    except (OSError, ImportError):
        return None
    return None


def node_env(job: Job, base: Mapping[str, str], this_host: Optional[str] = None) -> dict:
    """The process environment of a node: rendezvous, NCCL / Gloo interface, Megatron's CUDA setting.

    The interface is ``FIPO_IFNAME``, else the one that routes from ``this_host`` to another node's
    address (the master's, or from the master to a peer's: its own name may resolve to a loopback
    address); a loopback answer on a multi-node job is ignored (NCCL / Gloo then choose).
    """
    env = dict(base)
    master = job.train_hosts[0]
    env.update(MASTER_ADDR=job.master_addr, MASTER_PORT=str(job.master_port))
    peer = master if this_host != master else next((h for h in job.hosts if h != master), master)
    ifname = env.get("FIPO_IFNAME") or route_interface(job.address(peer))
    if ifname and not (ifname == "lo" and len(set(job.hosts)) > 1):
        env.setdefault("NCCL_SOCKET_IFNAME", ifname)
        env.setdefault("GLOO_SOCKET_IFNAME", ifname)
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron's TP / SP communication overlap needs it
    env.setdefault("NCCL_DEBUG", "WARN")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def hosts_from_env(env: Mapping[str, str]) -> tuple:
    """The allocation's hosts: ``FIPO_NODES`` (comma / space separated), else ``scontrol show hostnames``."""
    if env.get("FIPO_NODES", "").strip():
        return tuple(env["FIPO_NODES"].replace(",", " ").split())
    nodelist = env.get("SLURM_JOB_NODELIST")
    if nodelist and shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return tuple(out.stdout.split())
    raise ValueError("no hosts: set FIPO_NODES (comma-separated, allocation order) or run inside a Slurm job "
                     "with scontrol available")


def node_addresses(hosts: Sequence[str], env: Mapping[str, str]) -> tuple:
    """Each host's ``NodeAddr`` from ``scontrol show node`` inside a Slurm job; the names themselves
    outside one (``--hosts``, no ``SLURM_JOB_ID`` or no ``scontrol``)."""
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if not env.get("SLURM_JOB_ID") or not scontrol:
        return tuple(hosts)
    proc = subprocess.run([scontrol, "-o", "show", "node", ",".join(hosts)], capture_output=True, text=True,
                          timeout=60, env=dict(env))
    if proc.returncode:
        raise ValueError(f"scontrol show node {','.join(hosts)} failed: {proc.stderr.strip() or proc.returncode}")
    found = dict(re.findall(r"NodeName=(\S+)\s.*?\bNodeAddr=(\S+)", proc.stdout))
    return tuple(found.get(h) or h for h in hosts)


def check_rendezvous(job: Job, this_host: str, timeout: float = CONNECT_TIMEOUT_S, source: str = "NodeAddr") -> None:
    """``ValueError`` (one line naming it) when the rendezvous address cannot work from ``this_host``.

    Every node: it must resolve. The master (first training node): it must be one of its own
    addresses (torchrun's store listens there). The others: a TCP connection to it must be answered
    within ``timeout`` seconds; a refusal counts as an answer (the master's store may not listen yet:
    torchrun then waits for it), a timeout or an unreachable network does not.
    """
    addr, port, master = job.master_addr, job.master_port, job.train_hosts[0]
    what = f"rendezvous address {addr} of {master} ({source})"
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"the {what} does not resolve on {this_host}: {err.strerror}") from None
    if this_host == master:
        for family, _, _, _, sockaddr in infos:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((sockaddr[0], 0))
                    return
                except OSError:
                    continue
        raise ValueError(f"the {what} is not an address of {this_host} itself, where torchrun's store listens")
    deadline, last = time.monotonic() + timeout, None
    while True:
        left = deadline - time.monotonic()
        try:
            socket.create_connection((addr, port), timeout=max(1.0, min(5.0, left))).close()
            return
        except ConnectionRefusedError:
            return  # the host answered; its store starts with torchrun there
        except OSError as err:
            last = err
        if left <= 0:
            raise ValueError(f"the {what} cannot be reached from {this_host} within {timeout:.0f}s: "
                             f"{last.strerror or last!r}")
        time.sleep(min(1.0, max(left, 0)))


def task_index(env: Mapping[str, str]) -> int:
    """This task's index in its step (one task per node): ``SLURM_PROCID``, 0 outside Slurm."""
    return int(env.get("SLURM_PROCID", "0"))


def job_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> Job:
    hosts = tuple(args.hosts.replace(",", " ").split()) if args.hosts else hosts_from_env(env)
    addresses = hosts if args.hosts else node_addresses(hosts, env)
    if env.get("FIPO_MASTER_ADDR"):
        addresses = (env["FIPO_MASTER_ADDR"], *addresses[1:])
    return Job(config=args.config, overrides=tuple(args.overrides), hosts=hosts, gpus_per_node=args.gpus_per_node,
               procs_per_node=args.procs_per_node, rollout_nodes=args.rollout_nodes, master_port=args.master_port,
               sglang_port=args.sglang_port, restart=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
               addresses=addresses)


def torchrun_command(env: Mapping[str, str]) -> list[str]:
    """``torchrun`` on PATH, else next to this interpreter, else ``python -m torch.distributed.run``."""
    found = shutil.which("torchrun", path=env.get("PATH")) or shutil.which(
        "torchrun", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def run_train(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    job = job_from_args(args, env)
    config = resolve(job)
    _print_plan(job, config)
    rank = task_index(env)
    argv = torchrun_argv(job, config, rank)
    host = job.train_hosts[rank]
    env = node_env(job, env, host)
    if args.print:
        print(shlex.join(argv))
        for key in ("MASTER_ADDR", "MASTER_PORT", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
            print(f"{key}={env.get(key, '')}")
        return 0
    if len(job.train_hosts) > 1:
        check_rendezvous(job, host, float(env.get("FIPO_CONNECT_TIMEOUT_S") or CONNECT_TIMEOUT_S),
                         "FIPO_MASTER_ADDR" if env.get("FIPO_MASTER_ADDR") else "NodeAddr")
    if env.get("FIPO_TORCHRUN") or not _torch_launcher_importable():
        argv = (shlex.split(env["FIPO_TORCHRUN"]) if env.get("FIPO_TORCHRUN") else torchrun_command(env)) + argv[1:]
        print(f"[fipo_job] {host}: {shlex.join(argv)}", flush=True)
        os.execvpe(argv[0], argv, env)
    print(f"[fipo_job] {host}: {shlex.join(argv)}", flush=True)
    stop_file = env.get("FIPO_STOP_FILE") or os.path.join(config.train.run_dir, "STOP")
    usr1 = TimeLimitStop(host, stop_file if rank == 0 else None, lambda: time_limit_line(config, host))
    return run_torchrun(argv[1:], env, lambda signum: stopped_line(job, config, env, host, signum), usr1)


def _torch_launcher_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch.distributed.run") is not None
    except ImportError:
        return False


class _ShutdownNoise:
    """Drops torch elastic's per-signal warnings ("Received ... death signal", "Sending process ...
    closing signal ...", "Got termination signal"): the node's own line replaces them."""

    MESSAGES = ("Received %s death signal, shutting down workers", "Sending process %s closing signal %s",
                "Got termination signal: %s")

    def filter(self, record) -> bool:
        return record.msg not in self.MESSAGES


class TimeLimitStop:
    """SIGUSR1 for this process only. ``install()`` (before torchrun starts its workers) gives it a
    handler and blocks it in the main thread, whose mask the workers inherit: the signal Slurm sends
    to every process of the step cannot kill them; a helper thread keeps it deliverable here. The
    handler creates ``stop_file`` (the first node's; None on the others). ``result()`` after
    torchrun returned 0: ``(line, exit code)`` from ``finished()`` when the signal came, else None."""

    def __init__(self, host: str, stop_file: Optional[str], finished):
        self.host, self.stop_file, self.finished, self.received = host, stop_file, finished, False

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGUSR1, self._handle)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

        def receiver():  # a thread that takes the signal (the main thread's is blocked) for the handler
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
            threading.Event().wait()

        threading.Thread(target=receiver, name="fipo-usr1", daemon=True).start()

    def _handle(self, signum, frame) -> None:
        if self.received:
            return
        self.received = True
        if self.stop_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.stop_file)), exist_ok=True)
            open(self.stop_file, "a").close()
            what = f"created the trainer's stop file {self.stop_file}"
        else:
            what = "the first node asks the trainer to stop"
        _say(f"[fipo_job] {self.host}: SIGUSR1 (time limit near): {what}; training stops after its current "
             "step with a checkpoint")

    def result(self):
        return self.finished() if self.received else None


_AGENT_STORES: list = []  # (TCPStore, node rank, nodes) of this process's torchrun rendezvous
_DEPARTED = "fipo_job/agents_departed"


def _keep_agent_stores() -> None:
    """Keep a reference to the static rendezvous' TCPStore after torchrun returns (see ``_depart``)."""
    try:
        from torch.distributed.elastic.rendezvous import static_tcp_rendezvous as static
    except ImportError:
        return
    cls = static.StaticTCPRendezvous
    if getattr(cls.next_rendezvous, "_fipo_kept", False):
        return
    original = cls.next_rendezvous

    def next_rendezvous(self):
        info = original(self)
        if getattr(self, "_store", None) is not None:
            _AGENT_STORES.append((self._store, self.rank, self.world_size))
        return info

    next_rendezvous._fipo_kept = True
    cls.next_rendezvous = next_rendezvous


def _depart(timeout: float = 10.0) -> None:
    """The first node keeps its rendezvous store up until every node's torchrun has finished its exit
    barrier: otherwise a node still reading the barrier's answer finds the store gone and torchrun
    logs a ``DistNetworkError`` traceback although every worker succeeded."""
    import datetime

    for store, rank, nodes in _AGENT_STORES:
        try:
            store.set_timeout(datetime.timedelta(seconds=timeout))
            store.add(_DEPARTED, 1)
            deadline = time.monotonic() + timeout
            while rank == 0 and store.add(_DEPARTED, 0) < nodes and time.monotonic() < deadline:
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - the store is gone: nothing left to wait for
            pass
    _AGENT_STORES.clear()


def _say(line: str) -> None:
    """One line to stderr in one write (nodes that share a log file interleave whole writes)."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (line + "\n").encode())


def run_torchrun(args: Sequence[str], env: Mapping[str, str], on_signal, usr1: Optional[TimeLimitStop] = None) -> int:
    """``torchrun ARGS`` in this process (``torch.distributed.run.main``), with ``env`` as the environment.

    Failures behave as torchrun's (its exception and summary, exit 1). A signal that ends the agent
    (SIGTERM from Slurm: requeue, preemption, cancellation, time limit) ends it with the line
    ``on_signal(signum)`` returns, ``(line, exit code)``, and no traceback. ``usr1``: SIGUSR1 stops
    the trainer after its step (``TimeLimitStop``); the exit code is then its ``result()``'s.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    os.environ.clear()
    os.environ.update(env)
    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).addFilter(_ShutdownNoise())
    sys.argv = ["torchrun", *args]
    if usr1 is not None:
        usr1.install()
    _keep_agent_stores()
    try:
        torchrun_main(list(args))
    except SignalException as err:
        _AGENT_STORES.clear()  # the other nodes are being stopped too: nobody to wait for
        line, code = on_signal(int(err.sigval))
        _say(line)
        return code
    except BaseException:
        _depart()
        raise
    _depart()
    stopped = usr1.result() if usr1 is not None else None
    if stopped:
        _say(stopped[0])
        return stopped[1]
    return 0


def time_limit_line(config: Config, host: str) -> tuple[str, int]:
    """After a SIGUSR1 stop: the node's line and exit code (1 so that a launcher that requeues failed
    runs requeues this one; 0 when the run has reached ``train.steps`` anyway)."""
    from megatron_fipo.mcore.checkpoint_integrity import latest_checkpoint

    latest = latest_checkpoint(os.path.join(config.train.run_dir, "checkpoints"))
    step = re.search(r"iter_0*(\d+)$", latest or "")
    if step and int(step.group(1)) >= config.train.steps:
        return f"[fipo_job] {host}: the run reached its last step ({step.group(1)}) as the time limit neared", 0
    return (f"[fipo_job] {host}: training stopped for the time limit; {resume_point(config)}; exit 1 so that the "
            "job is requeued", 1)


def slurm_job_state(env: Mapping[str, str]) -> dict:
    """``JobState`` / ``Restarts`` / ``Reason`` of this Slurm job (``scontrol show job``); {} outside Slurm or on error."""
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if not env.get("SLURM_JOB_ID") or not scontrol:
        return {}
    try:
        proc = subprocess.run([scontrol, "-o", "show", "job", env["SLURM_JOB_ID"]], capture_output=True, text=True,
                              timeout=10, env=dict(env))
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(re.findall(r"\b(JobState|Restarts|Reason)=(\S+)", proc.stdout)) if proc.returncode == 0 else {}


def resume_point(config: Config) -> str:
    """Where the next start of this run continues: the latest complete checkpoint of ``train.run_dir``."""
    resume = config.checkpoint.resume
    if resume == "never":
        return "checkpoint.resume=never: the next start begins again at step 1"
    if resume != "auto":
        return f"the next start loads {resume} (checkpoint.resume)"
    from megatron_fipo.mcore.checkpoint_integrity import latest_checkpoint

    latest = latest_checkpoint(os.path.join(config.train.run_dir, "checkpoints"))
    if latest is None:
        return f"no checkpoint in {config.train.run_dir} yet: the next start begins at step 1"
    step = re.search(r"iter_0*(\d+)$", latest)
    return f"the next start resumes from {latest}" + (f" (step {step.group(1)})" if step else "")


def stopped_line(job: Job, config: Config, env: Mapping[str, str], host: str, signum: int) -> tuple[str, int]:
    """The node's line when a signal ended its training step, and its exit code (0 when Slurm requeued
    the job: the step did what was asked; 128 + signal otherwise)."""
    import signal as signals

    try:
        name = signals.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    state = slurm_job_state(env)
    job_id = env.get("SLURM_JOB_ID")
    if state and int(state.get("Restarts", "0") or 0) > job.restart:
        what, code = f"job {job_id} was requeued or preempted (restart {state['Restarts']} follows)", 0
    elif state:
        what, code = f"job {job_id} is {state.get('JobState', '?')}", 128 + signum
    else:
        what, code = "stopped", 128 + signum
    return f"[fipo_job] {host}: training step ended by {name}: {what}; {resume_point(config)}", code


def run_sglang(args: argparse.Namespace) -> int:
    """Start this rollout node's servers and restart one that dies, ``rollout.max_restarts`` times per server
    (the trainer routes around it meanwhile and feeds it at its next weight sync: rollout/sglang_failover.py);
    past that, exit non-zero (killing the rest) with its log tail."""
    from megatron_fipo.rollout.sglang_server import ServerProcess, default_launcher

    env = dict(os.environ)
    job = job_from_args(args, env)
    if not job.rollout_nodes:
        raise ValueError("the sglang role needs --rollout-nodes >= 1")
    config = resolve(job)
    index = task_index(env)
    if not 0 <= index < job.rollout_nodes:
        raise ValueError(f"task {index} is not one of the {job.rollout_nodes} rollout node(s)")
    host = job.rollout_hosts[index]
    address = job.address(host)
    launcher = shlex.split(env["FIPO_SGLANG_LAUNCHER"]) if env.get("FIPO_SGLANG_LAUNCHER") else default_launcher()
    argvs = sglang_argvs(job, config, launcher)
    if args.print:
        print("\n".join(shlex.join(a) for a in argvs))
        return 0
    servers = [ServerProcess(a, f"http://{address}:{job.sglang_port + i}",
                             os.path.join(args.log_dir, f"sglang-{host}-{i}.log"), env=node_env(job, env, host))
               for i, a in enumerate(argvs)]
    for s in servers:
        print(f"[fipo_job] {host}: {shlex.join(s.argv)} > {s.log_path}", flush=True)
        s.start()
    while True:
        while all(s.alive() for s in servers):
            time.sleep(args.poll_s)
        dead = next(s for s in servers if not s.alive())
        if dead.restarts >= config.rollout.max_restarts:
            break
        dead.restarts += 1
        print(f"[fipo_job] SGLang server {dead.url} exited; restarting it (restart {dead.restarts} of "
              f"rollout.max_restarts={config.rollout.max_restarts}); log tail ({dead.log_path}):\n{dead.tail()}",
              flush=True)
        dead.kill()
        dead.start()
    print(f"[fipo_job] SGLang server {dead.url} exited and rollout.max_restarts={config.rollout.max_restarts} "
          f"restart(s) are used up; log tail ({dead.log_path}):\n{dead.tail()}", flush=True)
    for s in servers:
        s.kill()
    return 1


def _print_plan(job: Job, config: Config) -> None:
    """The layout and memory estimate, when the model's config.json is readable from here (node 0 only)."""
    if task_index(os.environ) != 0 or not os.path.isfile(os.path.join(config.model.hf_path, "config.json")):
        return
    from megatron_fipo.config.hf_model import read_hf_config
    from megatron_fipo.plan import format_plan, plan

    try:
        report = plan(config, job.world_size, read_hf_config(config.model.hf_path), gpus_per_node=job.procs)
    except (ValueError, KeyError) as err:
        raise ValueError(f"the config does not fit {job.world_size} training processes: {err}") from None
    print(format_plan(report), file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    for role, func in (("train", run_train), ("sglang", run_sglang)):
        p = sub.add_parser(role)
        p.add_argument("--config", required=True, help="YAML config (see examples/)")
        p.add_argument("--rollout-nodes", type=int, default=0, help="last N nodes run SGLang (disaggregated)")
        p.add_argument("--gpus-per-node", type=int, default=8, help="0: nodes without GPUs (give --procs-per-node)")
        p.add_argument("--procs-per-node", type=int, default=None,
                       help="training processes per node (default: one per GPU); on nodes without GPUs also "
                       "what rollout servers are laid out over")
        p.add_argument("--hosts", help="comma-separated hosts of the allocation (default: FIPO_NODES / scontrol)")
        p.add_argument("--master-port", type=int, default=DEFAULT_MASTER_PORT)
        p.add_argument("--sglang-port", type=int, default=DEFAULT_SGLANG_PORT, help="first SGLang port of a node")
        p.add_argument("--log-dir", default="logs", help="SGLang server logs (sglang role)")
        p.add_argument("--poll-s", type=float, default=5.0, help=argparse.SUPPRESS)
        p.add_argument("--print", action="store_true", help="print the command(s) and environment, run nothing")
        p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=10")
        p.set_defaults(func=func)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"fipo_job {args.role}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
