"""Run directories protect themselves (``megatron_fipo.train.rundir``): classification, refusal, history, complete runs."""
import json
import os

import pytest
import yaml

from megatron_fipo.config.schema import Config, load_config, save_config
from megatron_fipo.train import rundir as R
from megatron_fipo.mcore.checkpoint_integrity import MARKER

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "demo_cpu.yaml")


def _run(tmp_path, *overrides, step=30, metrics=()):
    """A run directory as the trainer leaves it: config.yaml, one complete checkpoint at ``step``, metrics.jsonl."""
    run = str(tmp_path / "run")
    cfg = load_config(CONFIG, [f"train.run_dir={run}", *overrides])
    os.makedirs(os.path.join(run, "checkpoints", f"iter_{step:07d}"))
    with open(os.path.join(run, "checkpoints", f"iter_{step:07d}", MARKER), "w") as fh:
        json.dump({"step": step}, fh)
    save_config(cfg, os.path.join(run, "config.yaml"))
    with open(os.path.join(run, "metrics.jsonl"), "w") as fh:
        for record in metrics:
            fh.write(json.dumps(record) + "\n")
    return run


def _files(run):
    out = {}
    for root, _, names in os.walk(run):
        for n in names:
            with open(os.path.join(root, n), "rb") as fh:
                out[os.path.relpath(os.path.join(root, n), run)] = fh.read()
    return out


def test_every_schema_key_is_classified_once():
    keys = set(R.all_keys(Config()))
    assert R.DEFINING | R.RESUMABLE <= keys, sorted((R.DEFINING | R.RESUMABLE) - keys)
    assert not R.DEFINING & R.RESUMABLE, sorted(R.DEFINING & R.RESUMABLE)
    unclassified = keys - R.DEFINING - R.RESUMABLE
    assert not unclassified, f"classify {sorted(unclassified)} in megatron_fipo/train/rundir.py"
    for key in ("algo.use_influence", "algo.drop_filter", "model.hf_path", "data.train_files", "rollout.n",
                "rollout.temperature", "optim.lr", "train.seed", "train.prompts_per_step"):
        assert key in R.DEFINING, key
    for key in ("train.steps", "eval.every_steps", "eval.n", "log.progress", "checkpoint.every_steps",
                "parallel.tp", "parallel.cp"):  # checkpoints reshard: a resume at another layout is exact
        assert key in R.RESUMABLE, key


def test_changed_algorithm_refuses_with_one_line_and_touches_nothing(tmp_path):
    run = _run(tmp_path)
    before = _files(run)
    cfg = load_config(CONFIG, [f"train.run_dir={run}", "algo.use_influence=false", "train.steps=10"])
    with pytest.raises(R.RunDirRefused) as err:
        R.check_run_dir(cfg)
    line = str(err.value)
    assert "\n" not in line and isinstance(err.value, ValueError)
    assert "algo.use_influence: true -> false" in line and "train.steps" not in line
    assert "train.run_dir=" in line and "--allow-changed algo.use_influence" in line
    assert _files(run) == before


def test_allow_changed_is_accepted_and_recorded(tmp_path):
    run = _run(tmp_path, step=10)
    cfg = load_config(CONFIG, [f"train.run_dir={run}", "algo.decay_rate=16", "train.steps=20"])
    assert R.check_run_dir(cfg, ["algo.decay_rate"]) is None
    with open(os.path.join(run, R.HISTORY_FILE)) as fh:
        (record,) = [json.loads(line) for line in fh]
    assert record["step"] == 10 and record["allowed"] == ["algo.decay_rate"]
    assert record["changed"] == {"algo.decay_rate": [32.0, 16.0], "train.steps": [30, 20]}
    with open(os.path.join(run, "config.yaml")) as fh:
        assert yaml.safe_load(fh)["algo"]["decay_rate"] == 32.0  # what the checkpoints were made with
    assert R.check_run_dir(cfg) is None  # the recorded change now counts: no second refusal, no second record
    with open(os.path.join(run, R.HISTORY_FILE)) as fh:
        assert len(fh.readlines()) == 1


def test_resumable_change_goes_to_history_not_config(tmp_path):
    run = _run(tmp_path, step=10)
    config_before = _files(run)["config.yaml"]
    cfg = load_config(CONFIG, [f"train.run_dir={run}", "train.steps=40", "eval.every_steps=2"])
    assert R.check_run_dir(cfg, rank=1) is None and not os.path.exists(os.path.join(run, R.HISTORY_FILE))
    assert R.check_run_dir(cfg) is None
    with open(os.path.join(run, R.HISTORY_FILE)) as fh:
        (record,) = [json.loads(line) for line in fh]
    assert set(record["changed"]) == {"train.steps", "eval.every_steps"} and record["allowed"] == []
    assert "time" in record and _files(run)["config.yaml"] == config_before


def test_unknown_allow_changed_key_is_an_error(tmp_path):
    cfg = load_config(CONFIG, [f"train.run_dir={_run(tmp_path)}"])
    with pytest.raises(ValueError, match="algo.nope"):
        R.check_run_dir(cfg, ["algo.nope"])


def test_fresh_run_dir_and_resume_never_pass(tmp_path):
    cfg = load_config(CONFIG, [f"train.run_dir={tmp_path / 'new'}", "algo.use_influence=false"])
    assert R.check_run_dir(cfg) is None
    run = _run(tmp_path)
    cfg = load_config(CONFIG, [f"train.run_dir={run}", "algo.use_influence=false", "checkpoint.resume=never"])
    assert R.check_run_dir(cfg) is None


def test_complete_run_reports_its_last_heldout_figures(tmp_path):
    metrics = [{"step": 0, "eval/avg@4": 0.33125, "eval/cons@4": 0.8, "eval/pass@4": 0.9},
               {"step": 20, "eval/avg@4": 0.73375, "eval/cons@4": 0.955, "eval/pass@4": 1.0,
                "eval/response_length_mean": 7.0},
               {"step": 30, "train/acc_mean": 0.5}]
    run = _run(tmp_path, metrics=metrics)
    line = R.check_run_dir(load_config(CONFIG, [f"train.run_dir={run}"]))
    assert "\n" not in line and "already complete (step 30" in line
    assert "step 20: avg@4 0.7338  cons@4 0.9550  pass@4 1.0000" in line
    assert R.check_run_dir(load_config(CONFIG, [f"train.run_dir={run}", "train.steps=31"])) is None


def test_cli_refusal_exits_2_with_one_line(tmp_path, capsys):
    from megatron_fipo.cli import main

    run = _run(tmp_path)
    args = ["train", "--config", CONFIG, f"train.run_dir={run}", "algo.use_influence=false", "train.steps=10"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "algo.use_influence: true -> false" in err
    # --allow-changed KEY... followed by overrides: the overrides are still overrides
    from megatron_fipo.cli import build_parser
    parsed = build_parser().parse_args(["train", "--config", CONFIG, "--allow-changed", "algo.use_influence",
                                        "algo.use_influence=false"])
    assert parsed.allow_changed == ["algo.use_influence", "algo.use_influence=false"]


def test_a_key_missing_from_an_older_config_is_not_a_change(tmp_path):
    run = _run(tmp_path, step=10)
    path = os.path.join(run, "config.yaml")
    with open(path) as fh:
        data = yaml.safe_load(fh)
    del data["algo"]["correction_cap"]  # as if written before the key existed
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh)
    assert R.check_run_dir(load_config(CONFIG, [f"train.run_dir={run}", "algo.correction_cap=3.0"])) is None
    with pytest.raises(R.RunDirRefused, match="algo.clip_high: 0.28 -> 0.3"):
        R.check_run_dir(load_config(CONFIG, [f"train.run_dir={run}", "algo.clip_high=0.3"]))


def test_eval_line_figures_names_the_at_k_metrics_only():
    line = R.eval_line_figures({"eval/avg@4": 0.5, "eval/cons@4": 0.75, "eval/pass@4": 1,
                                "eval/response_length_mean": 9.0, "train/acc_mean": 0.1})
    assert line == "avg@4 0.5000  cons@4 0.7500  pass@4 1.0000"
    assert R.eval_line_figures({"train/acc_mean": 0.1}) == ""
