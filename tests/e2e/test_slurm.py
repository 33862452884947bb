"""The launchers through a real Slurm: a private two-node cluster on this host (``tests/slurm_cluster.py``).

Nodes ``n1`` / ``n2`` at 127.0.0.2 / 127.0.0.3 (names that do not resolve: the addresses come from
``scontrol show node``), no GPUs: ``sbatch --gpus-per-node=0`` with one training process per node
(``FIPO_PROCS_PER_NODE=1``), the CPU demo at the e2e tests' small settings.

* ``slurm/fipo.sbatch`` on two nodes completes, both nodes train, and every step's metrics equal
  those of ``torchrun --nproc-per-node=2`` on this host (the same layout: dp=2), timings aside.
* ``scontrol requeue`` mid-run: each node's log ends with one line naming the checkpoint the run
  resumes from (no traceback); the job runs again, resumes, and the metrics equal the uninterrupted
  run's. The time-limit path (``scancel --batch --signal=USR1``: stop file, checkpoint, self-requeue)
  resumes exactly too.
* A rendezvous address that does not resolve fails the job within a minute with one line naming it.
* Disaggregated: one training node, one rollout node running ``megatron_fipo.rollout.cpu_server``.
* NeMo-Run's ``SlurmExecutor`` through its local tunnel, without a container (``--venv``).

Skipped, with what to install, where the Slurm daemons are missing (``tools/bootstrap.sh`` installs
them as root with apt-get).
"""
import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import DEMO_CONFIG, REPO, SMALL_RUN, demo_overrides, read_records
from tests.slurm_cluster import SlurmCluster, free_port, missing

_MISSING = missing()
pytestmark = [pytest.mark.skipif(_MISSING is not None, reason=f"needs a local Slurm: {_MISSING}"),
              pytest.mark.timeout(1200)]  # the first test builds the demo (session fixture) and the reference
STEPS = ["train.steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=3"]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The private cluster, up for this module; stopped (every job and daemon ended, by pid) whatever happens."""
    with SlurmCluster(str(tmp_path_factory.mktemp("slurm"))) as c:
        yield c


def _summary(what, job, info, records=None):
    """One line per job for the test log (``pytest -rA``): its id, final state, requeues and what was compared."""
    steps = f"; {len(records)} steps equal key by key (time/, perf/ aside)" if records is not None else ""
    print(f"[slurm] {what}: job {job} {info['JobState']} Restarts={info['Restarts']} ExitCode={info['ExitCode']}{steps}")


def _strip(records):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in records]


def _job_env(tmp_path, **extra):
    return {"FIPO_PYTHON": sys.executable, "FIPO_PROCS_PER_NODE": "1", "FIPO_LOG_DIR": str(tmp_path / "logs"),
            "FIPO_POLL_S": "1", "FIPO_IFNAME": "lo", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", **extra}


def _submit(cluster, tmp_path, overrides, *args, env=None):
    """``sbatch --nodes=2 --gpus-per-node=0 slurm/fipo.sbatch ARGS --config demo_cpu.yaml OVERRIDES``; the job id."""
    return cluster.sbatch(["--nodes=2", "--gpus-per-node=0", f"--output={tmp_path}/batch-%j.out", "slurm/fipo.sbatch",
                           *args, "--config", DEMO_CONFIG, *overrides], env=_job_env(tmp_path, **(env or {})))


def _logs(tmp_path, pattern="*.log"):
    return {os.path.basename(p): open(p, errors="replace").read()
            for p in sorted(glob.glob(os.path.join(tmp_path, "logs", pattern)))}


def _restart_log(tmp_path, restart, role="train"):
    """Every node's output of one restart: ``srun --output=...-%N.log`` names files by host name, which is this
    host for both nodes here, so the nodes share one file; their lines carry the Slurm node name."""
    return "".join(_logs(tmp_path, f"{role}-r{restart}-*.log").values())


def _output(tmp_path, job_id):
    path = tmp_path / f"batch-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_done(cluster, tmp_path, job_id, timeout=600):
    info = cluster.wait_job(job_id, DONE, timeout=timeout)
    return info, _output(tmp_path, job_id) + "".join(f"\n--- {k}\n{v[-3000:]}" for k, v in _logs(tmp_path).items())


def _wait_for_file(path, cluster, job_id, timeout=600):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} {state} before {path} appeared"
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory):
    """``torchrun --nproc-per-node=2`` of the demo on this host: the layout of the two-node jobs (dp=2)."""
    run = str(tmp_path_factory.mktemp("torchrun") / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           f"--master-port={free_port()}", "-m", "megatron_fipo", "train", "--config", DEMO_CONFIG,
           *demo_overrides(demo, run, *SMALL_RUN, *STEPS)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    records = read_records(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    return records


def test_sbatch_on_two_cpu_nodes_equals_torchrun(cluster, demo, tmp_path, reference):
    run = str(tmp_path / "run")
    job = _submit(cluster, tmp_path, demo_overrides(demo, run, *SMALL_RUN, *STEPS))
    info, out = _wait_done(cluster, tmp_path, job)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), out
    log = _restart_log(tmp_path, 0)
    for rank, node in enumerate(("n1", "n2")):  # both nodes ran torchrun at the first node's NodeAddr
        assert f"[fipo_job] {node}: torchrun --nnodes=2 --nproc-per-node=1 --node-rank={rank} --master-addr=127.0.0.2 " \
            in log, out
    assert "Traceback" not in log, out
    assert "0 GPU(s) and 1 training process(es) per node" in _output(tmp_path, job)
    records = read_records(run)
    assert all(r["train/dp_cost_max_over_mean"] >= 1.0 for r in records)  # dp=2: a rank on each node
    assert _strip(records) == _strip(reference)
    _summary("sbatch on n1+n2 vs torchrun --nproc-per-node=2", job, info, records)
    assert os.path.isdir(os.path.join(run, "hf")) and os.path.isdir(os.path.join(run, "checkpoints", "iter_0000003"))


def test_requeue_mid_run_reads_clean_and_resumes_exactly(cluster, demo, tmp_path, reference):
    run = str(tmp_path / "run")
    job = _submit(cluster, tmp_path, demo_overrides(demo, run, *SMALL_RUN, *STEPS))
    _wait_for_file(os.path.join(run, "checkpoints", "iter_0000001", "fipo_checkpoint.json"), cluster, job)
    cluster.run(["scontrol", "requeue", str(job)])
    info, out = _wait_done(cluster, tmp_path, job)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), out
    assert _strip(read_records(run)) == _strip(reference), out
    _summary("scontrol requeue after checkpoint 1", job, info, reference)
    stopped, resumed = _restart_log(tmp_path, 0), _restart_log(tmp_path, 1)
    for node in ("n1", "n2"):  # the stopped restart: one line per node, the checkpoint it resumes from
        lines = [line for line in stopped.splitlines() if line.startswith(f"[fipo_job] {node}: training step ended")]
        assert len(lines) == 1, stopped[-3000:]
        m = re.fullmatch(rf"\[fipo_job\] {node}: training step ended by SIGTERM: job {job} was requeued or preempted "
                         rf"\(restart 1 follows\); the next start resumes from (\S+/iter_(\d+)) \(step (\d+)\)", lines[0])
        assert m and os.path.isdir(m.group(1)) and int(m.group(2)) == int(m.group(3)) >= 1, lines[0]
    assert "Traceback" not in stopped and "SignalException" not in stopped, stopped[-3000:]
    assert "resumed from" in resumed and "Traceback" not in resumed, out
    assert f"job {job} was requeued or preempted" in _output(tmp_path, job), out
    assert "Exited with exit code" not in _output(tmp_path, job), out  # a requeued node exits 0


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(cluster, demo, tmp_path, reference):
    run = str(tmp_path / "run")
    job = _submit(cluster, tmp_path, demo_overrides(demo, run, *SMALL_RUN, *STEPS), env={"FIPO_STOP_WAIT_S": "300"})
    _wait_for_file(os.path.join(run, "checkpoints", "iter_0000001", "fipo_checkpoint.json"), cluster, job)
    cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])  # what Slurm sends 300 s before the limit
    info, out = _wait_done(cluster, tmp_path, job)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), out
    assert "the trainer stopped with a checkpoint" in out and f"requeueing job {job}" in out, out
    assert _strip(read_records(run)) == _strip(reference), out
    _summary("scancel --batch --signal=USR1 after checkpoint 1", job, info, reference)
    assert "Traceback" not in _restart_log(tmp_path, 0) + _restart_log(tmp_path, 1), out


def test_an_unresolvable_rendezvous_address_fails_the_job_within_a_minute(cluster, tmp_path):
    start = time.monotonic()  # no model or data needed: the nodes stop before torchrun
    job = _submit(cluster, tmp_path, demo_overrides(str(tmp_path / "no-demo"), str(tmp_path / "run"), *SMALL_RUN),
                  env={"FIPO_MASTER_ADDR": "no-such-node.invalid"})
    info, out = _wait_done(cluster, tmp_path, job, timeout=120)
    assert info["JobState"] == "FAILED" and time.monotonic() - start < 60, out
    _summary(f"FIPO_MASTER_ADDR=no-such-node.invalid, failed after {time.monotonic() - start:.0f}s", job, info)
    log = _restart_log(tmp_path, 0)
    # the first node to find it says so; srun --kill-on-bad-exit may end the other before it does
    assert re.search(r"^fipo_job train: error: the rendezvous address no-such-node.invalid of n1 \(FIPO_MASTER_ADDR\) "
                     r"does not resolve on n[12]: ", log, re.M), out
    assert "Traceback" not in log, out


def test_disaggregated_rollout_node_runs_cpu_servers(cluster, demo, tmp_path):
    """n1 trains (one process), n2 runs one CPU SGLang-protocol server: two concurrent job steps; the trainer
    reaches the server at n2's NodeAddr and every step's metrics equal the in-process CPU engine's."""
    run = str(tmp_path / "run")
    port = free_port()
    extra = ["train.steps=2", "checkpoint.export_hf=false"]
    job = _submit(cluster, tmp_path, demo_overrides(demo, run, *SMALL_RUN, *extra), "--mode", "disaggregated",
                  "--rollout-nodes", "1",
                  env={"FIPO_SGLANG_LAUNCHER": f"{sys.executable} -m megatron_fipo.rollout.cpu_server",
                       "FIPO_SGLANG_PORT": str(port)})
    info, out = _wait_done(cluster, tmp_path, job)
    assert info["JobState"] == "COMPLETED", out
    _summary("disaggregated (n1 trains, n2 serves)", job, info)
    assert f"rollout.urls=[http://127.0.0.3:{port}]" in _restart_log(tmp_path, 0), out
    assert "fipo-cpu-server" in _logs(tmp_path, "sglang-n2-0.log").get("sglang-n2-0.log", ""), out  # its server
    records = read_records(run)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:  # after every sync the server samples the trainer's weights
        assert r["rollout/token_mult_prob_error"] == pytest.approx(1.0, abs=1e-5), r["step"]
    ref_run = str(tmp_path / "in_process")
    proc = subprocess.run([sys.executable, "-m", "megatron_fipo", "train", "--config", DEMO_CONFIG,
                           *demo_overrides(demo, ref_run, *SMALL_RUN, *extra)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for got, want in zip(records, read_records(ref_run), strict=True):
        for key in ("train/loss", "train/reward_mean", "train/kept_tokens", "train/response_length_mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (got["step"], key)


def test_nemo_run_slurm_executor_without_a_container(cluster, demo, tmp_path, reference):
    """``slurm/launch_nemo_run.py --venv``: NeMo-Run's own sbatch template, submitted through its local tunnel,
    runs the committed code (its GitArchivePackager) with this venv's interpreter on both nodes. Its time-limit
    path: USR1 to the job steps (``--signal USR1@300``; here ``scancel --signal=USR1``) stops the trainer after
    its step with a checkpoint, the template requeues the job, and the run resumes exactly."""
    pytest.importorskip("nemo_run")
    run = str(tmp_path / "run")
    env = {**cluster.env, **_job_env(tmp_path), "NEMORUN_HOME": str(tmp_path / "nemo_home")}
    cmd = [sys.executable, os.path.join(REPO, "slurm", "launch_nemo_run.py"), "--config", DEMO_CONFIG, "--nodes", "2",
           "--venv", os.path.dirname(os.path.dirname(sys.executable)), "--gpus-per-node", "0", "--procs-per-node", "1",
           "--partition", "cpu", "--time", "00:30:00", "--retries", "1", "--job-name", "fipo-nemo",
           "--job-dir", str(tmp_path / "nemo_jobs"), "--", *demo_overrides(demo, run, *SMALL_RUN, *STEPS)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = cluster.run(["scontrol", "-o", "show", "job"]).stdout
    ids = [int(m) for m in re.findall(r"JobId=(\d+) JobName=fipo-nemo-train\b", jobs)]
    assert len(ids) == 1, jobs
    sbatch = "".join(open(p).read() for p in glob.glob(str(tmp_path / "nemo_jobs" / "**" / "*_sbatch.sh"),
                                                       recursive=True))
    assert "--account" not in sbatch and "--gpus-per-node" not in sbatch and "--container-image" not in sbatch, sbatch
    # USR1 to the steps, as Slurm does 300 s before the limit, once the workers load the model (fipo_job.py takes
    # the signal from then on): the trainer stops after step 1 with its checkpoint
    deadline = time.monotonic() + 300
    while "Loading weights" not in "".join(open(p, errors="replace").read() for p in glob.glob(
            str(tmp_path / "nemo_jobs" / "**" / f"log-*_{ids[0]}_0.out"), recursive=True)):
        assert time.monotonic() < deadline and cluster.job(ids[0])["JobState"] in ("PENDING", "RUNNING"), \
            cluster.job(ids[0])
        time.sleep(0.2)
    cluster.run(["scancel", "--signal=USR1", str(ids[0])])
    info = cluster.wait_job(ids[0], DONE, timeout=600)
    logs = {p: open(p, errors="replace").read()
            for p in sorted(glob.glob(str(tmp_path / "nemo_jobs" / "**" / "*.out"), recursive=True))}
    text = "".join(logs.values())
    outs = "".join(f"\n--- {p}\n{t[-3000:]}" for p, t in logs.items())
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), outs
    assert "[fipo_job] n1: SIGUSR1 (time limit near): created the trainer's stop file" in text, outs
    for node in ("n1", "n2"):  # NeMo-Run's srun is unbuffered (-u): the nodes' lines may run into each other
        assert re.search(rf"\[fipo_job\] {node}: training stopped for the time limit; the next start resumes from "
                         rf"\S+/iter_0000001 \(step 1\); exit 1 so that the job is requeued", text), outs
    assert "Traceback" not in text, outs
    assert _strip(read_records(run)) == _strip(reference), outs
    _summary("NeMo-Run --venv, USR1 to the steps while step 1 ran", ids[0], info, reference)


_ABANDONED = """
import sys, time
sys.path.insert(0, {repo!r})
from tests.slurm_cluster import SlurmCluster
c = SlurmCluster({root!r}).start()
job = c.sbatch(["--nodes=2", "--output={root}/job.out", {script!r}])
c.wait_job(job, ("RUNNING",), timeout=60)
print(c.supervisor.pid, flush=True)
time.sleep(600)
"""


def test_a_dead_test_process_leaves_no_slurm_process_behind(tmp_path):
    """The process that started a cluster dies (SIGKILL: no fixture teardown) while a job step runs whose
    processes ignore SIGTERM: the daemons, the detached slurmstepd and every job process still end."""
    import psutil

    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsrun --ntasks-per-node=1 bash -c 'trap \"\" TERM; echo started; sleep 600'\n")
    code = _ABANDONED.format(repo=REPO, root=str(tmp_path / "cluster"), script=str(script))
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        supervisor = psutil.Process(int(owner.stdout.readline()))

        def below():
            out = []
            for p in supervisor.children(recursive=True):
                try:
                    out.append((p, " ".join(p.cmdline())))
                except psutil.Error:
                    pass
            return out

        deadline = time.monotonic() + 60
        while sum("sleep 600" in cmd for _, cmd in below()) < 2:  # one task per node
            assert time.monotonic() < deadline, [cmd for _, cmd in below()]
            time.sleep(0.5)
        procs = below()
        assert any(cmd.startswith("slurmstepd") for _, cmd in procs), [cmd for _, cmd in procs]
    finally:
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait()
    gone, alive = psutil.wait_procs([supervisor, *(p for p, _ in procs)], timeout=90)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
