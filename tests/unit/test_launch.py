"""The Slurm launchers: slurm/fipo.sbatch and slurm/launch_nemo_run.py run under a fake Slurm
(tests/unit/fake_slurm.py) for 2-3 nodes of 8 GPUs, with the exact commands each node would run, and
slurm/fipo_job.py's node logic directly (node addresses, rendezvous checks, nodes without GPUs, the
line a stopped step prints). The real two-node Slurm runs in tests/e2e/test_slurm.py."""
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.unit import fake_slurm

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SBATCH = os.path.join(ROOT, "slurm", "fipo.sbatch")
RECIPE = "examples/qwen2.5-7b-fipo.yaml"  # relative to ROOT, the working directory of the jobs
RECIPE_PATH = os.path.join(ROOT, RECIPE)
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                 vocab_size=152064, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
JOB_ID = 4242  # MASTER_PORT = 29500 + 4242 % 1000


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "slurm", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


fipo_job = _load("fipo_job")


def _tool(name):
    path = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    assert path, f"{name} not found: it comes with the test extra (pip install -e '.[test]')"
    return path


class FakeCluster:
    """A fake allocation of ``nodes`` hosts; ``run`` executes a batch script under it."""

    def __init__(self, tmp_path, nodes):
        self.tmp, self.nodes = tmp_path, [f"gpu{i + 1:02d}" for i in range(nodes)]
        self.bin, self.log = str(tmp_path / "fakebin"), str(tmp_path / "slurm.jsonl")
        hf = tmp_path / "Qwen2.5-7B"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps(QWEN25_7B))
        self.overrides = [f"model.hf_path={hf}", f"data.train_files=[{tmp_path / 'dapo.parquet'}]",
                          f"train.run_dir={tmp_path / 'run'}"]
        self.env = {**os.environ, **fake_slurm.install(self.bin, self.log), "SLURM_JOB_ID": str(JOB_ID),
                    "SLURM_JOB_NODELIST": f"gpu[01-{nodes:02d}]", "FAKE_SLURM_NODES": ",".join(self.nodes),
                    "FIPO_PYTHON": sys.executable, "FIPO_POLL_S": "0.1", "FIPO_IFNAME": "ib0",
                    "FIPO_LOG_DIR": str(tmp_path / "logs")}
        self.env.pop("MASTER_PORT", None)

    def start(self, argv, **env):
        out = open(self.tmp / "batch.out", "a")
        return subprocess.Popen(argv, cwd=ROOT, env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT)

    def run(self, argv, timeout=120, **env):
        proc = self.start(argv, **env)
        try:
            proc.wait(timeout=timeout)
        finally:
            fake_slurm.kill_all(self.log, self.bin)
        return proc.returncode

    def records(self, kind):
        return [r for r in fake_slurm.read(self.log) if r["kind"] == kind]

    def output(self):
        return (self.tmp / "batch.out").read_text()

    def sbatch(self, *args):
        return ["bash", SBATCH, *args]


def _torchrun_expected(cluster, train_nodes, extra=(), resume=False):
    return [[f"--nnodes={train_nodes}", "--nproc-per-node=8", f"--node-rank={rank}", "--master-addr=127.0.1.1",
             "--master-port=29742", "-m", "megatron_fipo", "train", *(["--resume"] if resume else []),
             "--config", RECIPE, *cluster.overrides, *extra] for rank in range(train_nodes)]


def test_sbatch_scripts_pass_bash_n_and_shellcheck():
    subprocess.run(["bash", "-n", SBATCH], check=True)
    proc = subprocess.run([_tool("shellcheck"), "--shell=bash", SBATCH], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_colocated_two_nodes_run_torchrun_on_each_node(tmp_path):
    cluster = FakeCluster(tmp_path, 2)
    assert cluster.run(cluster.sbatch("--config", RECIPE, *cluster.overrides)) == 0, cluster.output()
    runs = sorted(cluster.records("torchrun"), key=lambda r: r["host"])
    assert [r["host"] for r in runs] == ["gpu01", "gpu02"]
    assert [r["argv"] for r in runs] == _torchrun_expected(cluster, 2)
    for r in runs:
        assert r["env"] | {"SLURM_PROCID": None} == {
            "MASTER_ADDR": "127.0.1.1", "MASTER_PORT": "29742", "NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0",
            "CUDA_DEVICE_MAX_CONNECTIONS": "1", "SLURM_PROCID": None, "SLURMD_NODENAME": r["host"],
            "FIPO_NODES": "gpu01,gpu02", "SLURM_RESTART_COUNT": None,
            "FIPO_STOP_FILE": str(tmp_path / "logs" / "stop-r0")}
    (step,) = cluster.records("srun")
    assert step["opts"] | {"--output": None} == {"--nodes": "2", "--ntasks": "2", "--ntasks-per-node": "1",
                                                 "--relative": "0", "--kill-on-bad-exit": "1",
                                                 "--open-mode": "append", "--output": None}
    assert step["command"][:3] == [sys.executable, "slurm/fipo_job.py", "train"]
    logs = sorted(os.listdir(tmp_path / "logs"))
    assert logs == ["train-r0-gpu01.log", "train-r0-gpu02.log"]  # one log per node
    assert "tp=4 pp=1 cp=2 dp=2" in (tmp_path / "logs" / "train-r0-gpu01.log").read_text()  # the plan, node 0
    calls = [r["argv"] for r in cluster.records("scontrol")]
    assert calls == [["show", "hostnames", "gpu[01-02]"]] + [["-o", "show", "node", "gpu01,gpu02"]] * 2  # per node


def test_disaggregated_starts_sglang_servers_and_hands_their_urls(tmp_path):
    cluster = FakeCluster(tmp_path, 3)
    cluster.overrides.append("rollout.sglang={tp_size: 4, mem_fraction_static: 0.85}")
    rc = cluster.run(cluster.sbatch("--mode", "disaggregated", "--rollout-nodes", "1", "--config", RECIPE,
                                    *cluster.overrides), FAKE_WAIT_FOR_SGLANG="2")
    assert rc == 0, cluster.output()
    urls = "rollout.urls=[http://127.0.1.3:30000,http://127.0.1.3:30001]"  # gpu03's NodeAddr
    extra = ["rollout.engine=sglang", "rollout.mode=disaggregated", urls]
    assert sorted(r["argv"] for r in cluster.records("torchrun")) == _torchrun_expected(cluster, 2, extra)
    servers = sorted(cluster.records("sglang"), key=lambda r: r["argv"])
    hf = cluster.overrides[0].split("=", 1)[1]
    assert [(r["host"], r["argv"]) for r in servers] == [
        ("gpu03", ["--model-path", hf, "--host", "0.0.0.0", "--port", str(30000 + i), "--tp-size", "4",
                   "--base-gpu-id", str(4 * i), "--mem-fraction-static", "0.85"]) for i in range(2)]
    steps = {r["command"][2]: r for r in cluster.records("srun")}
    assert (steps["sglang"]["opts"]["--relative"], steps["sglang"]["hosts"]) == ("2", ["gpu03"])
    assert (steps["train"]["opts"]["--relative"], steps["train"]["hosts"]) == ("0", ["gpu01", "gpu02"])
    assert all(not fake_slurm.alive(r["pid"], cluster.bin) for r in servers)  # stopped with the trainer
    assert sorted(os.listdir(tmp_path / "logs")) == ["sglang-gpu03-0.log", "sglang-gpu03-1.log",
                                                     "sglang-r0-gpu03.log", "train-r0-gpu01.log", "train-r0-gpu02.log"]


def test_a_dead_sglang_server_ends_the_job_with_its_log(tmp_path):
    cluster = FakeCluster(tmp_path, 2)
    rc = cluster.run(cluster.sbatch("--mode", "disaggregated", "--rollout-nodes", "1", "--config", RECIPE,
                                    *cluster.overrides, "rollout.sglang={tp_size: 8}"),
                     FAKE_SGLANG_SECONDS="0.5", FAKE_TORCHRUN_SLEEP="60")
    assert rc == 1 and "the SGLang step exited" in cluster.output()
    log = (tmp_path / "logs" / "sglang-r0-gpu02.log").read_text()
    assert "SGLang server http://127.0.1.2:30000 exited" in log and "CUDA out of memory" in log  # the server's log tail
    assert all(not fake_slurm.alive(r["pid"], cluster.bin) for r in cluster.records("torchrun"))  # trainer stopped


def _wait_for(cluster, kind, count, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while len(cluster.records(kind)) < count:
        assert proc.poll() is None, cluster.output()
        assert time.monotonic() < deadline, cluster.output()
        time.sleep(0.1)


@pytest.mark.parametrize("restart, requeued, honours_stop", [(0, True, True), (3, False, True), (0, True, False)])
def test_usr1_before_the_time_limit_requeues_and_the_requeued_run_resumes(tmp_path, restart, requeued, honours_stop):
    cluster = FakeCluster(tmp_path, 2)
    stops = {"FAKE_TORCHRUN_STOPS": "1"} if honours_stop else {}
    proc = cluster.start(cluster.sbatch("--config", RECIPE, *cluster.overrides), FAKE_TORCHRUN_SLEEP="60",
                         SLURM_RESTART_COUNT=str(restart), FIPO_MAX_REQUEUES="3", FIPO_STOP_WAIT_S="20", **stops)
    try:
        _wait_for(cluster, "torchrun", 2, proc)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=60) == 0, cluster.output()
    finally:
        fake_slurm.kill_all(cluster.log, cluster.bin)
    stop_file = str(tmp_path / "logs" / f"stop-r{restart}")
    assert {r["env"]["FIPO_STOP_FILE"] for r in cluster.records("torchrun")} == {stop_file}
    # the trainer was asked to stop after its step (it checkpoints) before the job was requeued
    assert len(cluster.records("torchrun_stop")) == (2 if honours_stop else 0)
    assert ("the trainer stopped with a checkpoint" in cluster.output()) == honours_stop, cluster.output()
    assert ("did not stop within 20s" in cluster.output()) == (not honours_stop)
    calls = [r["argv"] for r in cluster.records("scontrol") if r["argv"][0] == "requeue"]
    assert calls == ([["requeue", str(JOB_ID)]] if requeued else [])
    assert all(not fake_slurm.alive(r["pid"], cluster.bin) for r in cluster.records("torchrun"))  # steps stopped
    assert all(("--resume" in r["argv"]) == (restart > 0) for r in cluster.records("torchrun"))


@pytest.mark.parametrize("args, message", [
    ((), "--config is required"),
    (("--config", RECIPE, "--rollout-nodes", "1"), "--rollout-nodes needs --mode disaggregated"),
    (("--config", RECIPE, "--mode", "disaggregated", "--rollout-nodes", "2"), "leave no training node"),
    (("--config", RECIPE, "--mode", "split"), "--mode must be colocated or disaggregated"),
])
def test_sbatch_rejects_bad_arguments(tmp_path, args, message):
    cluster = FakeCluster(tmp_path, 2)
    assert cluster.run(cluster.sbatch(*args)) == 2
    assert message in cluster.output() and not cluster.records("srun")


def test_a_config_that_does_not_fit_fails_before_torchrun(tmp_path):
    cluster = FakeCluster(tmp_path, 2)
    assert cluster.run(cluster.sbatch("--config", RECIPE, *cluster.overrides, "parallel.tp=3")) != 0
    assert not cluster.records("torchrun")
    assert "world size 16 is not a multiple of tp*pp*cp" in (tmp_path / "logs" / "train-r0-gpu01.log").read_text()


# ---------------------------------------------------------------------------------------------- NeMo-Run
def _nemo(monkeypatch, *argv):
    pytest.importorskip("nemo_run")
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # NeMo-Run's local shell (invoke) reads stdin
    launcher = _load("launch_nemo_run")
    return launcher, launcher.build_parser().parse_args(list(argv))


def _run_nemo_sbatch(cluster, args, launcher, **env):
    """Execute NeMo-Run's generated sbatch under the fake Slurm (its /nemo_run mount: a local directory)."""
    sbatch, scripts = launcher.render_files(args)
    mount = cluster.tmp / "nemo_run"
    (mount / "scripts").mkdir(parents=True)
    for name, text in scripts.items():
        (mount / "scripts" / name).write_text(text)
    path = cluster.tmp / "nemo.sbatch"
    path.write_text(sbatch.replace("/nemo_run/", f"{mount}/"))
    return cluster.run(["bash", str(path)], PATH=f"{cluster.bin}:{os.path.dirname(sys.executable)}:"
                       + os.environ["PATH"], **env)


@pytest.mark.parametrize("rollout_nodes", [0, 1])
def test_nemo_run_job_runs_the_same_commands_as_the_sbatch(tmp_path, monkeypatch, rollout_nodes):
    nodes, mode = 2 + rollout_nodes, ["--mode", "disaggregated", "--rollout-nodes", "1"] if rollout_nodes else []
    (tmp_path / "sbatch").mkdir()
    ours = FakeCluster(tmp_path / "sbatch", nodes)
    ours.overrides += ["rollout.sglang={tp_size: 4, mem_fraction_static: 0.85}"] if rollout_nodes else []
    wait = {"FAKE_WAIT_FOR_SGLANG": str(2 * rollout_nodes)}
    assert ours.run(ours.sbatch(*mode, "--config", RECIPE, *ours.overrides), **wait) == 0, ours.output()
    (tmp_path / "nemo").mkdir()
    theirs = FakeCluster(tmp_path / "nemo", nodes)
    theirs.overrides = ours.overrides  # the same model / data / run paths
    launcher, args = _nemo(monkeypatch, "--config", RECIPE_PATH, "--nodes", str(nodes), "--rollout-nodes", str(rollout_nodes),
                           "--image", "megatron-fipo.sqsh", "--account", "acct", "--", *ours.overrides)
    assert _run_nemo_sbatch(theirs, args, launcher, **wait) == 0, theirs.output()

    def commands(cluster, kind):  # the stop file (graceful stop before a requeue) is the sbatch's own
        return sorted((r.get("host"), r["argv"], r.get("env") and {k: v for k, v in r["env"].items()
                                                                    if k != "FIPO_STOP_FILE"})
                      for r in cluster.records(kind))

    assert commands(theirs, "torchrun") == commands(ours, "torchrun") and len(commands(ours, "torchrun")) == 2
    assert commands(theirs, "sglang") == commands(ours, "sglang") and len(commands(ours, "sglang")) == 2 * rollout_nodes

    def steps(cluster):
        return sorted((r["command"][1:3], r["hosts"]) for r in cluster.records("srun") if "fipo_job.py" in r["command"][1:])

    assert [(c[1:], h) for c, h in steps(theirs)] == [(c[1:], h) for c, h in steps(ours)]


def test_nemo_run_dry_run_prints_the_sbatch(monkeypatch, capsys):
    launcher, _ = _nemo(monkeypatch, "--config", RECIPE_PATH, "--image", "x")
    assert launcher.main(["--config", RECIPE_PATH, "--nodes", "2", "--image", "img.sqsh", "--account", "a",
                          "--dry-run", "--", "train.steps=3"]) == 0
    out = capsys.readouterr().out
    for expected in ("#SBATCH --nodes=2", "#SBATCH --signal=USR1@300", "--container-image img.sqsh",
                     "export TORCHX_MAX_RETRIES=20", 'scontrol requeue "$SLURM_JOB_ID"',
                     "exec python3 slurm/fipo_job.py train --config examples/qwen2.5-7b-fipo.yaml"):
        assert expected in out
    assert launcher.main(["--executor", "local", "--config", RECIPE_PATH, "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().endswith("--gpus-per-node 8 --hosts localhost --")
    assert launcher.main(["--config", RECIPE_PATH, "--dry-run"]) == 2
    assert "--image" in capsys.readouterr().err and "#SBATCH --account" not in out.replace("--account=a", "")
    assert launcher.main(["--executor", "local", "--rollout-nodes", "1", "--nodes", "2", "--config", RECIPE_PATH,
                          "--dry-run"]) == 2


def test_nemo_run_launcher_help_does_not_need_nemo_run():
    code = ("import sys, runpy; sys.modules['nemo_run'] = None; sys.argv = ['launch_nemo_run.py', '--help']; "
            f"runpy.run_path({os.path.join(ROOT, 'slurm', 'launch_nemo_run.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--rollout-nodes" in proc.stdout, proc.stderr
    code = code.replace("'--help'", "'--config', 'x.yaml'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nemo_run is not importable" in proc.stderr


# ---------------------------------------------------------------------------------------------- fipo_job
def test_job_rejects_impossible_splits_and_launcher_keys():
    with pytest.raises(ValueError, match="must leave at least one"):
        fipo_job.Job(config=RECIPE_PATH, hosts=("a", "b"), rollout_nodes=2)
    with pytest.raises(ValueError, match="the launcher sets"):
        fipo_job.Job(config=RECIPE_PATH, hosts=("a", "b"), rollout_nodes=1, overrides=("rollout.urls=[http://x:1]",))
    job = fipo_job.Job(config=RECIPE_PATH, hosts=("a", "b", "c"), rollout_nodes=1)
    with pytest.raises(ValueError, match="positive divisor of the 8 GPUs"):
        fipo_job.sglang_layout(fipo_job.load_config(RECIPE_PATH, ["rollout.sglang.tp_size=3"]), 8)
    with pytest.raises(ValueError, match="set by the launcher"):
        fipo_job.sglang_layout(fipo_job.load_config(RECIPE_PATH, ["rollout.sglang.port=1"]), 8)
    with pytest.raises(ValueError, match="node rank 2 is not one of the 2"):
        fipo_job.torchrun_argv(job, fipo_job.load_config(RECIPE_PATH), 2)
    assert (job.train_hosts, job.rollout_hosts, job.world_size) == (("a", "b"), ("c",), 16)


def test_hosts_and_interface_detection():
    assert fipo_job.hosts_from_env({"FIPO_NODES": "n1, n2,n3"}) == ("n1", "n2", "n3")
    with pytest.raises(ValueError, match="set FIPO_NODES"):
        fipo_job.hosts_from_env({"PATH": ""})
    assert fipo_job.route_interface("127.0.0.1") == "lo"
    env = fipo_job.node_env(fipo_job.Job(config=RECIPE_PATH, hosts=("127.0.0.1",)), {"NCCL_SOCKET_IFNAME": "ib0"})
    assert (env["NCCL_SOCKET_IFNAME"], env["GLOO_SOCKET_IFNAME"], env["MASTER_ADDR"]) == ("ib0", "lo", "127.0.0.1")
    two = fipo_job.Job(config=RECIPE_PATH, hosts=("127.0.0.1", "127.0.0.2"))  # loopback on a multi-node job: unset
    env = fipo_job.node_env(two, {}, "127.0.0.1")
    assert "GLOO_SOCKET_IFNAME" not in env and env["MASTER_ADDR"] == "127.0.0.1"
    assert fipo_job.node_env(two, {"FIPO_IFNAME": "eth7"}, "127.0.0.2")["GLOO_SOCKET_IFNAME"] == "eth7"


def test_print_mode_shows_the_command_without_running(tmp_path, capsys):
    hf = tmp_path / "m"
    hf.mkdir()
    overrides = [f"model.hf_path={hf}", "data.train_files=[d.parquet]"]
    assert fipo_job.main(["train", "--print", "--hosts", "h1", "--config", RECIPE_PATH, "--", *overrides]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("torchrun --nnodes=1 --nproc-per-node=8 --node-rank=0 --master-addr=h1")
    assert fipo_job.main(["sglang", "--print", "--hosts", "h1", "--config", RECIPE_PATH, "--", *overrides]) == 2
    assert "needs --rollout-nodes" in capsys.readouterr().err


def test_nemo_run_venv_cpu_job_without_account(monkeypatch, capsys, tmp_path):
    """No image: the venv's interpreter in the shipped code's directory; 0 GPUs: no GPU request and the
    processes per node on the command line; no --account line when none is given."""
    launcher, _ = _nemo(monkeypatch, "--config", RECIPE_PATH, "--image", "x")
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    venv = tmp_path / "venv"
    assert launcher.main(["--config", RECIPE_PATH, "--nodes", "2", "--venv", str(venv), "--gpus-per-node", "0",
                          "--procs-per-node", "2", "--partition", "cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--account" not in out and "--gpus-per-node=" not in out and "--container-image" not in out, out
    assert "#SBATCH --partition=cpu" in out and "--chdir" in out
    assert (f"{venv}/bin/python slurm/fipo_job.py train --config examples/qwen2.5-7b-fipo.yaml --rollout-nodes 0 "
            "--gpus-per-node 0 --procs-per-node 2 --master-port") in out
    assert launcher.main(["--config", RECIPE_PATH, "--venv", str(venv), "--gpus-per-node", "0", "--dry-run"]) == 2
    assert "needs --procs-per-node" in capsys.readouterr().err
    assert launcher.main(["--config", RECIPE_PATH, "--venv", str(venv), "--python", "/opt/py/bin/python3",
                          "--dry-run"]) == 0
    assert "/opt/py/bin/python3 slurm/fipo_job.py train" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- nodes without GPUs
def test_cpu_nodes_train_with_processes_per_node_and_cpu_rollout_servers(tmp_path, capsys):
    job = fipo_job.Job(config=RECIPE_PATH, hosts=("a", "b", "c"), gpus_per_node=0, procs_per_node=2, rollout_nodes=1)
    assert (job.procs, job.world_size, job.slots) == (2, 4, 2)
    config = fipo_job.load_config(RECIPE_PATH, ["rollout.sglang.tp_size=1"])
    assert fipo_job.torchrun_argv(job, config, 1)[1:5] == ["--nnodes=2", "--nproc-per-node=2", "--node-rank=1",
                                                           "--master-addr=a"]
    argvs = fipo_job.sglang_argvs(job, config, ["cpu-server"])
    assert [a[a.index("--port") + 1] for a in argvs] == ["30000", "30001"]
    assert all("--base-gpu-id" not in a for a in argvs)  # no GPUs to place the servers on
    assert fipo_job.rollout_urls(job, config) == ["http://c:30000", "http://c:30001"]
    with pytest.raises(ValueError, match="positive divisor of the 2 processes"):
        fipo_job.rollout_urls(job, fipo_job.load_config(RECIPE_PATH, ["rollout.sglang.tp_size=4"]))
    with pytest.raises(ValueError, match="need the training processes per node"):
        fipo_job.Job(config=RECIPE_PATH, gpus_per_node=0)
    with pytest.raises(ValueError, match="one training process per GPU"):
        fipo_job.Job(config=RECIPE_PATH, gpus_per_node=8, procs_per_node=2)
    hf = tmp_path / "m"
    hf.mkdir()
    assert fipo_job.main(["train", "--print", "--hosts", "h1,h2", "--gpus-per-node", "0", "--procs-per-node", "4",
                          "--config", RECIPE_PATH, "--", f"model.hf_path={hf}", "data.train_files=[d.parquet]",
                          "parallel.tp=1", "parallel.cp=1"]) == 0
    assert capsys.readouterr().out.startswith("torchrun --nnodes=2 --nproc-per-node=4 --node-rank=0 --master-addr=h1")


def test_sbatch_on_cpu_nodes_passes_the_processes_per_node(tmp_path):
    cluster = FakeCluster(tmp_path, 2)
    rc = cluster.run(cluster.sbatch("--config", "examples/demo_cpu.yaml", *cluster.overrides),
                     SLURM_GPUS_PER_NODE="0", FIPO_PROCS_PER_NODE="2")
    assert rc == 0, cluster.output()
    assert "0 GPU(s) and 2 training process(es) per node" in cluster.output()
    runs = cluster.records("torchrun")
    assert sorted(r["argv"][1] for r in runs) == ["--nproc-per-node=2"] * 2
    (step,) = cluster.records("srun")
    words = step["command"]
    assert words[words.index("--gpus-per-node") + 1] == "0" and words[words.index("--procs-per-node") + 1] == "2"
    assert cluster.run(cluster.sbatch("--config", RECIPE), SLURM_GPUS_PER_NODE="0", FIPO_PROCS_PER_NODE="x") == 2
    assert "FIPO_PROCS_PER_NODE must be a number" in cluster.output()


def test_sbatch_header_lists_every_variable_it_and_fipo_job_read():
    text = open(SBATCH).read()
    header = text[:text.index("#SBATCH")]
    used = set(re.findall(r"\b(FIPO_[A-Z_]+)", text + open(os.path.join(ROOT, "slurm", "fipo_job.py")).read()))
    used -= {"FIPO_NODES", "FIPO_STOP_FILE", "FIPO_TORCHRUN"}  # set by the script itself / the tests' stand-in
    assert {"FIPO_POLL_S", "FIPO_PROCS_PER_NODE", "FIPO_MASTER_ADDR"} <= used
    assert not [v for v in sorted(used) if f"#   {v}" not in header]


# ---------------------------------------------------------------------------------------------- node addresses
def test_node_addresses_come_from_slurm(tmp_path):
    env = {**os.environ, **fake_slurm.install(str(tmp_path / "bin"), str(tmp_path / "log.jsonl")),
           "SLURM_JOB_ID": "7", "FAKE_SLURM_NODES": "n1,n2,n3", "FAKE_SLURM_ADDRS": "10.0.0.11,10.0.0.12,10.0.0.13"}
    assert fipo_job.node_addresses(("n1", "n3"), env) == ("10.0.0.11", "10.0.0.13")
    assert fipo_job.node_addresses(("n1", "zz"), env) == ("10.0.0.11", "zz")  # unknown to Slurm: the name
    assert fipo_job.node_addresses(("n1",), {"PATH": env["PATH"]}) == ("n1",)  # outside a job: the names
    parser = fipo_job.build_parser()
    args = parser.parse_args(["train", "--config", RECIPE_PATH, "--rollout-nodes", "1"])
    job = fipo_job.job_from_args(args, {**env, "FIPO_NODES": "n1,n2,n3"})
    assert (job.master_addr, job.address("n3")) == ("10.0.0.11", "10.0.0.13")
    job = fipo_job.job_from_args(args, {**env, "FIPO_NODES": "n1,n2,n3", "FIPO_MASTER_ADDR": "ib-n1"})
    assert (job.master_addr, job.address("n2")) == ("ib-n1", "10.0.0.12")
    config = fipo_job.load_config(RECIPE_PATH, ["rollout.sglang.tp_size=8"])
    assert fipo_job.rollout_urls(job, config) == ["http://10.0.0.13:30000"]
    assert fipo_job.node_env(job, {}, "n2")["MASTER_ADDR"] == "ib-n1"


def test_rendezvous_address_problems_end_the_node_with_one_line(monkeypatch):
    job = fipo_job.Job(config=RECIPE_PATH, hosts=("n1", "n2"), addresses=("no-such-node.invalid", "127.0.0.3"))
    with pytest.raises(ValueError, match=r"rendezvous address no-such-node.invalid of n1 \(NodeAddr\) does not "
                                         r"resolve on n2"):
        fipo_job.check_rendezvous(job, "n2")
    job = fipo_job.Job(config=RECIPE_PATH, hosts=("n1", "n2"), addresses=("192.0.2.1", "127.0.0.3"))
    with pytest.raises(ValueError, match=r"192.0.2.1 of n1 \(NodeAddr\) is not an address of n1 itself"):
        fipo_job.check_rendezvous(job, "n1")  # TEST-NET-1: never this host's
    job = fipo_job.Job(config=RECIPE_PATH, hosts=("n1", "n2"), addresses=("127.0.0.2", "127.0.0.3"),
                       master_port=fake_port())
    fipo_job.check_rendezvous(job, "n1")  # a loopback address is the host's own
    fipo_job.check_rendezvous(job, "n2", timeout=5)  # refused (nothing listens yet): the host answers

    def unreachable(address, timeout=None):
        raise TimeoutError("timed out")

    monkeypatch.setattr(fipo_job.socket, "create_connection", unreachable)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"127.0.0.2 of n1 \(FIPO_MASTER_ADDR\) cannot be reached from n2 within 2s"):
        fipo_job.check_rendezvous(job, "n2", timeout=2, source="FIPO_MASTER_ADDR")
    assert time.monotonic() - start < 10


def fake_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- a stopped step
def test_the_stopped_line_names_the_checkpoint_the_run_resumes_from(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "iter_0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "fipo_checkpoint.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("iter_0000002")
    config = fipo_job.load_config(RECIPE_PATH, [f"train.run_dir={run}"])
    job = fipo_job.Job(config=RECIPE_PATH, hosts=("n1", "n2"), restart=1)
    env = {**os.environ, **fake_slurm.install(str(tmp_path / "bin"), str(tmp_path / "log.jsonl")),
           "SLURM_JOB_ID": "12", "FAKE_SLURM_NODES": "n1,n2", "FAKE_SLURM_RESTARTS": "2"}
    line, code = fipo_job.stopped_line(job, config, env, "n2", signal.SIGTERM)
    assert code == 0 and line == (f"[fipo_job] n2: training step ended by SIGTERM: job 12 was requeued or preempted "
                                  f"(restart 2 follows); the next start resumes from {ckpt} (step 2)")
    line, code = fipo_job.stopped_line(job, config, {**env, "FAKE_SLURM_RESTARTS": "1"}, "n1", signal.SIGTERM)
    assert code == 143 and "job 12 is RUNNING" in line
    fresh = fipo_job.load_config(RECIPE_PATH, [f"train.run_dir={tmp_path / 'new'}"])
    line, _ = fipo_job.stopped_line(job, fresh, {"PATH": ""}, "n1", signal.SIGINT)
    assert line.endswith("ended by SIGINT: stopped; no checkpoint in " + str(tmp_path / "new") +
                         " yet: the next start begins at step 1")


_STUB = """
import sys, time
print("worker up", flush=True)
time.sleep(120)
"""


def _signal_once_worker_up(code: str, sig: int):
    """Runs ``python -c code`` in its own session, sends ``sig`` to its process group once it prints
    "worker up", and returns (the process, its whole output); the group is SIGKILLed if it outlives this."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while "worker up" not in "".join(lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            lines.append(proc.stdout.readline())
        os.killpg(proc.pid, sig)
        return proc, "".join(lines) + proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_torchrun_in_process_ends_on_sigterm_with_one_line_and_no_traceback(tmp_path):
    """Slurm signals every process of the step (proctrack): torchrun's agent, run in fipo_job's process,
    and its worker. The node prints its own line, not torchrun's SignalException traceback."""
    script = tmp_path / "worker.py"
    script.write_text(_STUB)
    code = ("import os, sys; sys.path.insert(0, {slurm!r}); import fipo_job; "
            "sys.exit(fipo_job.run_torchrun(['--nnodes=1', '--nproc-per-node=1', '--master-port={port}', {script!r}], "
            "dict(os.environ), lambda s: ('[fipo_job] stopped by %d' % s, 0)))").format(
        slurm=os.path.join(ROOT, "slurm"), port=fake_port(), script=str(script))
    proc, out = _signal_once_worker_up(code, signal.SIGTERM)  # what proctrack does: every process of the step
    assert proc.returncode == 0, out
    assert "[fipo_job] stopped by 15" in out
    assert "Traceback" not in out and "SignalException" not in out and "death signal" not in out, out


_STOPPING_STUB = """
import os, sys, time
print("worker up", flush=True)
deadline = time.time() + 120
while not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.05)
print("worker saw the stop file", flush=True)
"""


def test_sigusr1_to_the_step_stops_the_trainer_through_its_stop_file(tmp_path):
    """NeMo-Run's --signal USR1@300 reaches every process of the step: the workers survive it (blocked),
    the first node's fipo_job creates the stop file, the worker ends after it, and the node exits 1 (requeue)."""
    script, stop = tmp_path / "worker.py", tmp_path / "run" / "STOP"
    script.write_text(_STOPPING_STUB)
    code = ("import os, sys; sys.path.insert(0, {slurm!r}); import fipo_job; "
            "usr1 = fipo_job.TimeLimitStop('n1', {stop!r}, lambda: ('[fipo_job] n1: stopped for the time limit', 1)); "
            "sys.exit(fipo_job.run_torchrun(['--nnodes=1', '--nproc-per-node=1', '--master-port={port}', {script!r}, "
            "{stop!r}], dict(os.environ), lambda s: ('killed by %d' % s, 9), usr1))").format(
        slurm=os.path.join(ROOT, "slurm"), port=fake_port(), script=str(script), stop=str(stop))
    proc, out = _signal_once_worker_up(code, signal.SIGUSR1)
    assert proc.returncode == 1, out
    assert "worker saw the stop file" in out and f"created the trainer's stop file {stop}" in out, out
    assert "[fipo_job] n1: stopped for the time limit" in out and "Traceback" not in out, out


def test_two_nodes_end_without_exit_barrier_noise(tmp_path):
    """Two torchrun agents (static rendezvous, as on two nodes) whose workers succeed: the first node keeps its
    store up until the other has left torchrun's exit barrier, so neither logs a DistNetworkError traceback."""
    script = tmp_path / "worker.py"
    script.write_text("print('worker done', flush=True)\n")
    port = fake_port()
    code = ("import os, sys; sys.path.insert(0, {slurm!r}); import fipo_job; "
            "sys.exit(fipo_job.run_torchrun(['--nnodes=2', '--nproc-per-node=1', '--node-rank=' + sys.argv[1], "
            "'--master-addr=127.0.0.1', '--master-port={port}', {script!r}], dict(os.environ), "
            "lambda s: ('killed by %d' % s, 9)))").format(slurm=os.path.join(ROOT, "slurm"), port=port,
                                                          script=str(script))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for rank in (0, 1)]
    from tests.helpers import communicate_all

    outs = communicate_all(procs, timeout=120)
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "worker done" in out, out
        assert "Traceback" not in out and "exit barrier" not in out and "recvValue" not in out, out
