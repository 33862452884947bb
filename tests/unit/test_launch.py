"""The Slurm launchers: slurm/fipo.sbatch and slurm/launch_nemo_run.py run under a fake Slurm
(tests/unit/fake_slurm.py) for 2-3 nodes, with the exact commands each node would run, and
slurm/fipo_job.py's node logic directly."""
import importlib.util
import json
import os
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
    return [[f"--nnodes={train_nodes}", "--nproc-per-node=8", f"--node-rank={rank}", "--master-addr=gpu01",
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
            "MASTER_ADDR": "gpu01", "MASTER_PORT": "29742", "NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0",
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
    assert [r["argv"] for r in cluster.records("scontrol")] == [["show", "hostnames", "gpu[01-02]"]]


def test_disaggregated_starts_sglang_servers_and_hands_their_urls(tmp_path):
    cluster = FakeCluster(tmp_path, 3)
    cluster.overrides.append("rollout.sglang={tp_size: 4, mem_fraction_static: 0.85}")
    rc = cluster.run(cluster.sbatch("--mode", "disaggregated", "--rollout-nodes", "1", "--config", RECIPE,
                                    *cluster.overrides), FAKE_WAIT_FOR_SGLANG="2")
    assert rc == 0, cluster.output()
    urls = "rollout.urls=[http://gpu03:30000,http://gpu03:30001]"
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
    assert "SGLang server http://gpu02:30000 exited" in log and "CUDA out of memory" in log  # the server's log tail
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
                     "python3 slurm/fipo_job.py train --config examples/qwen2.5-7b-fipo.yaml"):
        assert expected in out
    assert launcher.main(["--executor", "local", "--config", RECIPE_PATH, "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().endswith("--gpus-per-node 8 --hosts localhost --")
    assert launcher.main(["--config", RECIPE_PATH, "--dry-run"]) == 2
    assert "--image" in capsys.readouterr().err
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
