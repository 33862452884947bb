"""Launch the FIPO job of ``slurm/fipo.sbatch`` through NeMo-Run.

Usage (from the repository root, on a machine that can ``sbatch``, or through SSH)::

    python slurm/launch_nemo_run.py --config examples/qwen2.5-32b-fipo.yaml --nodes 16 \\
        --image /shared/images/megatron-fipo.sqsh --mounts /shared:/shared --account ACCT --partition batch
    python slurm/launch_nemo_run.py ... --nodes 20 --rollout-nodes 4          # disaggregated SGLang
    python slurm/launch_nemo_run.py ... --dry-run                             # print the generated sbatch
    python slurm/launch_nemo_run.py --executor local --config examples/qwen2.5-7b-fipo.yaml   # this node
    python slurm/launch_nemo_run.py --config examples/demo_cpu.yaml --nodes 2 --partition cpu \
        --venv /shared/megatron_fipo/.venv --gpus-per-node 0 --procs-per-node 1      # no container, no GPUs

Owns the translation of the job into NeMo-Run objects: a ``SlurmExecutor`` with the container image
(pyxis) or, with ``--venv``, none (the steps run the venv's interpreter in the shipped code's
directory), one task per node running ``python slurm/fipo_job.py train ...`` on the training nodes
and, when ``--rollout-nodes`` > 0, a second task group running ``fipo_job.py sglang ...`` on the
last nodes (``srun --relative``), exactly the commands of ``fipo.sbatch``; or a ``LocalExecutor``
running the trainer on this node's GPUs. ``--gpus-per-node 0`` asks Slurm for no GPUs (nodes of a
CPU partition) and then needs ``--procs-per-node``; ``--account`` is left out of the sbatch script
when none is given.

Departs from ``fipo.sbatch`` only where NeMo-Run's sbatch template decides: code is shipped with
its ``GitArchivePackager`` (the committed files of this checkout, run from ``/nemo_run/code`` in the
container, or from the experiment's ``code`` directory without one), srun logs go to the
experiment directory, and requeueing is NeMo-Run's: ``--signal USR1@300`` ends the steps 300 s
before the time limit and the template requeues any failed run while ``SLURM_RESTART_COUNT <
--retries`` (the restarted trainer resumes from its latest checkpoint, as with the sbatch script).
``nemo_run`` is imported lazily, so ``--help`` works without it.
"""
from __future__ import annotations

import argparse
import glob
import os
import shlex
import sys
import tempfile
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASTER_PORT = '"${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"'  # expanded in the job, as in fipo.sbatch
LOG_DIR = '"${FIPO_LOG_DIR:-logs/fipo-$SLURM_JOB_ID}"'
SETUP = ('export FIPO_NODES="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)"\n'
         f'mkdir -p {LOG_DIR}')


def job_config_path(path: str) -> str:
    """The config as the job sees it: relative to the repository (the job's working directory) when inside it."""
    full = os.path.abspath(path)
    return os.path.relpath(full, REPO) if full.startswith(REPO + os.sep) else full


def job_python(args: argparse.Namespace, *, local: bool = False) -> str:
    """The interpreter of the steps: ``--python``; else the venv's (``--venv``); else this one (local) or
    the image's ``python3``."""
    if args.python:
        return args.python
    if args.venv:
        return os.path.join(os.path.abspath(args.venv), "bin", "python")
    return sys.executable if local else "python3"


def role_command(args: argparse.Namespace, role: str, *, local: bool = False) -> str:
    """The shell command one task runs: ``PYTHON slurm/fipo_job.py ROLE ...`` (arguments quoted); on Slurm
    ``exec``-ed by NeMo-Run's task script, so that the signals Slurm sends to the step (USR1 before the time
    limit, TERM on a requeue) reach ``fipo_job.py``, not a shell that USR1 would kill."""
    words = [shlex.quote(w) for w in (job_python(args, local=local), "slurm/fipo_job.py", role,
                                      "--config", job_config_path(args.config), "--rollout-nodes",
                                      str(args.rollout_nodes), "--gpus-per-node", str(args.gpus_per_node))]
    if args.procs_per_node is not None:
        words += ["--procs-per-node", str(args.procs_per_node)]
    if local:
        words += ["--hosts", "localhost"]
    else:
        words += ["--master-port", MASTER_PORT]
    if role == "sglang":
        words += ["--log-dir", LOG_DIR]
    return " ".join((["exec"] if not local else []) + words + ["--"] + [shlex.quote(o) for o in args.overrides])


def _script(command: str):
    import nemo_run as run

    return run.Script(inline=command)


ENV_PASSED = ("FIPO_IFNAME", "FIPO_SGLANG_LAUNCHER", "FIPO_SGLANG_PORT", "FIPO_MASTER_ADDR", "FIPO_CONNECT_TIMEOUT_S",
              "FIPO_LOG_DIR", "MASTER_PORT", "OMP_NUM_THREADS")
"""This environment's variables that the job gets (``export`` lines of the sbatch script) when set."""


def slurm_executor(args: argparse.Namespace, nodes: int, srun_args: Sequence[str], *, dry_run: bool = False):
    """A ``SlurmExecutor`` for ``nodes`` nodes whose srun gets ``srun_args``: pyxis with ``--image``,
    no container with ``--venv``; no ``--account`` line without one, no GPU request for 0 GPUs.

    A dry run packages nothing (the rendered sbatch does not depend on the packager).
    """
    import nemo_run as run

    if args.ssh_host:
        tunnel = run.SSHTunnel(host=args.ssh_host, user=args.ssh_user or os.environ.get("USER", ""),
                               job_dir=args.job_dir)
    else:
        # NeMo-Run writes the job files under <base>/experiments and submits them from the tunnel's job_dir:
        # locally both must be the same directory
        tunnel = run.LocalTunnel(job_dir=os.path.join(args.job_dir or run.config.get_nemorun_home(), "experiments"))
    env = {k: shlex.quote(os.environ[k]) for k in ENV_PASSED if os.environ.get(k)}
    return run.SlurmExecutor(
        account=args.account or None, partition=args.partition, nodes=nodes, ntasks_per_node=1,
        gpus_per_node=args.gpus_per_node or None, exclusive=True, time=args.time, signal="USR1@300",
        container_image=None if args.venv else args.image, container_mounts=list(args.mounts), env_vars=env,
        setup_lines=SETUP,
        srun_args=list(srun_args), tunnel=tunnel, packager=run.Packager() if dry_run else run.GitArchivePackager(), retries=args.retries,
        job_name_prefix=f"{args.job_name}-")


def check_args(args: argparse.Namespace) -> None:
    """``ValueError`` for launcher arguments that cannot make a job."""
    if args.executor == "local" and args.rollout_nodes:
        raise ValueError("--executor local runs one node: colocated only (no --rollout-nodes)")
    if args.executor == "slurm" and not (args.image or args.venv):
        raise ValueError("the Slurm executor needs --image (a container image, or FIPO_CONTAINER_IMAGE) or --venv "
                         "(a virtual environment every node sees)")
    if args.venv and not os.path.isfile(os.path.join(args.venv, "bin", "python")) and not args.dry_run:
        raise ValueError(f"--venv {args.venv}: no bin/python there")
    if args.gpus_per_node < 0 or (args.procs_per_node is not None and args.procs_per_node < 1):
        raise ValueError("--gpus-per-node must be >= 0 and --procs-per-node >= 1")
    if not args.gpus_per_node and args.procs_per_node is None:
        raise ValueError("--gpus-per-node 0 (nodes without GPUs) needs --procs-per-node N, the training processes "
                         "per node")
    if not 0 <= args.rollout_nodes < args.nodes:
        raise ValueError(f"--rollout-nodes={args.rollout_nodes} must leave training nodes among --nodes={args.nodes}")


def add_tasks(exp, args: argparse.Namespace, *, dry_run: bool = False) -> None:
    """Add the job to an entered ``run.Experiment``: one task, or SGLang + trainer as a task group."""
    import nemo_run as run

    check_args(args)
    if args.executor == "local":
        exp.add(_script(role_command(args, "train", local=True)), executor=run.LocalExecutor(), name="train")
        return
    train_nodes, n = args.nodes - args.rollout_nodes, args.rollout_nodes
    train = slurm_executor(args, args.nodes, [f"--nodes={train_nodes}", f"--ntasks={train_nodes}",
                                              "--ntasks-per-node=1", "--relative=0"], dry_run=dry_run)
    if not n:
        exp.add(_script(role_command(args, "train")), executor=train, name="train")
        return
    sglang = slurm_executor(args, args.nodes, [f"--nodes={n}", f"--ntasks={n}", "--ntasks-per-node=1",
                                               f"--relative={train_nodes}"], dry_run=dry_run)
    exp.add([_script(role_command(args, "sglang")), _script(role_command(args, "train"))],
            executor=[sglang, train], name="fipo")


def experiment(args: argparse.Namespace, base_dir: Optional[str] = None):
    import nemo_run as run

    return run.Experiment(args.job_name, base_dir=base_dir, clean_mode=True, enable_goodbye_message=False)


def render_files(args: argparse.Namespace) -> tuple[str, dict]:
    """``(sbatch text, {task script name: text})`` NeMo-Run generates for a Slurm job; nothing is submitted."""
    with tempfile.TemporaryDirectory() as base:
        with experiment(args, base_dir=base) as exp:
            add_tasks(exp, args, dry_run=True)
            exp.dryrun(log=False, delete_exp_dir=False)
        sbatch = sorted(glob.glob(os.path.join(base, "**", "*_sbatch.sh"), recursive=True))
        if len(sbatch) != 1:
            raise RuntimeError(f"NeMo-Run wrote {len(sbatch)} sbatch scripts, expected 1")
        scripts = {}
        for path in [sbatch[0]] + glob.glob(os.path.join(base, "**", "scripts", "*.sh"), recursive=True):
            with open(path, encoding="utf-8") as fh:
                scripts[os.path.basename(path)] = fh.read()
    return scripts.pop(os.path.basename(sbatch[0])), scripts


def render(args: argparse.Namespace) -> str:
    """What ``--dry-run`` prints: the sbatch script and the task scripts it runs (Slurm), or the command (local)."""
    if args.executor == "local":
        check_args(args)
        return role_command(args, "train", local=True)
    sbatch, scripts = render_files(args)
    return sbatch + "".join(f"\n# ---- /nemo_run/scripts/{name} ----\n{text}" for name, text in sorted(scripts.items()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (see examples/)")
    p.add_argument("--executor", choices=["slurm", "local"], default="slurm")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the allocation (training + rollout)")
    p.add_argument("--rollout-nodes", type=int, default=0, help="last N nodes run SGLang (disaggregated)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="0: nodes without GPUs (needs --procs-per-node)")
    p.add_argument("--procs-per-node", type=int, help="training processes per node (default: one per GPU)")
    p.add_argument("--image", default=os.environ.get("FIPO_CONTAINER_IMAGE"), help="container image (pyxis)")
    p.add_argument("--mounts", nargs="*", default=[], help="container mounts, e.g. /shared:/shared")
    p.add_argument("--venv", help="run without a container, with this virtual environment (on a filesystem "
                   "every node sees)")
    p.add_argument("--python", help="interpreter of the steps (default: the venv's, else the image's python3)")
    p.add_argument("--account", default=os.environ.get("SLURM_ACCOUNT"), help="Slurm account (default: none)")
    p.add_argument("--partition", default=os.environ.get("SLURM_PARTITION"))
    p.add_argument("--time", default="04:00:00")
    p.add_argument("--retries", type=int, default=20, help="requeues after a failure or the time limit")
    p.add_argument("--job-name", default="fipo")
    p.add_argument("--ssh-host", help="submit through SSH to this login node")
    p.add_argument("--ssh-user")
    p.add_argument("--job-dir", help="with --ssh-host: the experiment directory on the cluster; without: where "
                   "the experiments are written, <job-dir>/experiments (default: NeMo-Run's home, NEMORUN_HOME)")
    p.add_argument("--dry-run", action="store_true", help="print the generated sbatch (or command), submit nothing")
    p.add_argument("overrides", nargs="*", help="dotted config overrides after --, e.g. -- train.steps=10")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import nemo_run  # noqa: F401
    except ImportError as err:
        print(f"launch_nemo_run: nemo_run is not importable ({err}); pip install 'nemo-run==0.11.1' "
              "'leptonai<0.47'", file=sys.stderr)
        return 2
    try:
        if args.dry_run:
            print(render(args))
            return 0
        os.chdir(REPO)  # the GitArchivePackager ships this repository
        with experiment(args, base_dir=None if args.ssh_host else args.job_dir) as exp:
            add_tasks(exp, args)
            exp.run(detach=args.executor == "slurm", tail_logs=args.executor == "local")
    except ValueError as err:
        print(f"launch_nemo_run: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
