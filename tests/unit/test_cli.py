"""The console entry point: ``megatron-fipo score``."""

import json
import os
import subprocess
import sys

import pytest

from megatron_fipo.cli import main


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_score_reports_avg_cons_pass(tmp_path, capsys):
    rows = [
        {"ground_truth": "42", "responses": ["so Answer: 42", "Answer: 41", "Answer: 42"]},
        {"ground_truth": "\\frac{1}{2}", "responses": ["Answer: 1/3", "Answer: 7", "nothing"]},
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, rows)
    assert main(["score", str(src), "--workers", "0", "--output", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["avg@3"] == pytest.approx((2 / 3 + 0) / 2)
    assert metrics["cons@3"] == pytest.approx(0.5)
    assert metrics["pass@3"] == pytest.approx(0.5)
    assert metrics["responses"] == 6
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written[0]["acc"] == [True, False, True] and written[1]["preds"][2] == "[INVALID]"


@pytest.mark.parametrize("content, message", [
    ('{"ground_truth": "1"}\n', "responses"),
    ("not json\n", "not valid JSON"),
    ('{"ground_truth": "1", "responses": []}\n', "empty"),
    ("\n", "no rows"),
])
def test_score_bad_rows_name_the_line(tmp_path, capsys, content, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    assert main(["score", str(src), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert message in err


def test_score_non_utf8_file_names_the_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"ground_truth": "1", "responses": ["a"]}\n{"ground_truth": "\xff", "responses": ["a"]}\n')
    assert main(["score", str(src), "--workers", "0"]) == 2
    assert f"{src}:2: not UTF-8 text (byte 0xff at column 19)" in capsys.readouterr().err


def test_module_entry_point_runs(tmp_path):
    src = tmp_path / "in.jsonl"
    _write(src, [{"ground_truth": "3", "responses": ["Answer: 3"]}])
    proc = subprocess.run([sys.executable, "-m", "megatron_fipo", "score", str(src), "--workers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["avg@1"] == 1.0


def _hf_config(tmp_path, **kw):
    cfg = dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, vocab_size=152064,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, **kw)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path / "config.json")


def test_plan_prints_layout_and_memory(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("parallel:\n  tp: 4\n  pp: 2\nmodel:\n  params_dtype: bfloat16\n")
    assert main(["plan", "--config", str(tmp_path / "c.yaml"), "--world-size", "16",
                 "--hf-config", _hf_config(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["dp"], report["nodes"], report["tp"]) == (2, 2, 4)
    assert set(report["memory_gib"]) >= {"weights", "grads", "optimizer", "activations", "total"}
    assert main(["plan", "--config", str(tmp_path / "c.yaml"), "--world-size", "16",
                 "--hf-config", _hf_config(tmp_path), "parallel.pp=1"]) == 0
    assert "tp=4 pp=1 cp=1 dp=4" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--world-size", "12"], "not a multiple of tp"),
    (["--world-size", "16", "parallel.tp=8"], "does not divide the model's 28 attention heads"),
    (["--world-size", "16", "parallel.tpp=8"], "did you mean 'parallel.tp'"),
    (["--world-size", "0"], "world size must be >= 1, got 0"),
    (["--world-size", "-8"], "world size must be >= 1, got -8"),
    (["--world-size", "16", "parallel.pp=0"], "parallel.pp must be >= 1, got 0"),
    (["--world-size", "16", "parallel.cp=0"], "parallel.cp must be >= 1, got 0"),
    (["--world-size", "16", "parallel.tp=0"], "parallel.tp must be >= 1, got 0"),
    (["--world-size", "16", "--gpus-per-node", "0"], "--gpus-per-node must be >= 1, got 0"),
    (["--world-size", "16", "--gpu-gib", "0"], "--gpu-gib must be > 0, got 0"),
    (["--world-size", "16", "optim.lr=.inf"], "optim.lr must be a finite number"),
])
def test_plan_rejects_impossible_layouts(tmp_path, capsys, args, message):
    (tmp_path / "c.yaml").write_text("parallel:\n  tp: 4\n  pp: 2\n")
    assert main(["plan", "--config", str(tmp_path / "c.yaml"), "--hf-config", _hf_config(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_plan_reads_exponent_floats_and_reports_yaml_errors_with_position(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("parallel:\n  tp: 4\n  pp: 2\noptim:\n  lr: 1e-6\n")
    assert main(["plan", "--config", str(tmp_path / "c.yaml"), "--hf-config", _hf_config(tmp_path),
                 "--world-size", "16", "optim.adam_eps=1E-8", "--json"]) == 0
    capsys.readouterr()
    (tmp_path / "c.yaml").write_text("parallel:\n  tp: 4\n  pp 2\n")
    assert main(["plan", "--config", str(tmp_path / "c.yaml"), "--hf-config", _hf_config(tmp_path),
                 "--world-size", "16"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'c.yaml'}:4:1: could not find expected ':'" in err and len(err.strip().splitlines()) == 1


def test_train_rejects_bad_config_before_starting(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("algo:\n  use_influense: false\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "did you mean 'algo.use_influence'" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


BAD_HF_CONFIGS = [
    ('{"hidden_size": 64, "model_type": "qwen2\t"}', "config.json:1:41: not valid JSON (Invalid control character at)"),
    ('{"hidden_size": 64, "num_hidden_layers": 2}', "config.json: missing num_attention_heads, intermediate_size, "
                                                    "vocab_size (a Qwen2 config.json needs hidden_size, "),
    ('{"hidden_size": 64, "num_hidden_layers": 0, "num_attention_heads": 4, "intermediate_size": 8, '
     '"vocab_size": 9}', "config.json: num_hidden_layers must be a positive integer, got 0"),
    ("[1, 2]", "config.json: an HF config must be a JSON object, got list"),
]


def _bad_hf_dir(tmp_path, text):
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(text)
    return hf


@pytest.mark.parametrize("text, message", BAD_HF_CONFIGS)
def test_plan_and_train_name_a_broken_hf_config(tmp_path, capsys, text, message):
    hf = _bad_hf_dir(tmp_path, text)
    (tmp_path / "c.yaml").write_text(f"model:\n  hf_path: {hf}\ndata:\n  train_files: [x.jsonl]\n")
    for argv in (["plan", "--config", str(tmp_path / "c.yaml"), "--world-size", "1"],
                 ["train", "--config", str(tmp_path / "c.yaml")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{hf / message}" in err and "re-download" in err and "Traceback" not in err, err


def test_convert_names_a_broken_hf_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")  # convert's single-process environment is not needed: it fails first
    text, message = BAD_HF_CONFIGS[1]
    hf = _bad_hf_dir(tmp_path, text)
    assert main(["convert", "--from-hf", str(hf), "--to-mcore", str(tmp_path / "out")]) == 2
    assert f"{hf / message}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, call", [
    (["convert", "--from-hf", "h", "--to-mcore", "m", "--tp", "2", "--verify"],
     ("hf_to_mcore", ("h", "m"), {"dtype": None, "tp": 2, "pp": 1, "verify": True, "verify_tol": 1e-3})),
    (["convert", "--from-mcore", "m", "--to-hf", "h", "--pp", "2", "--dtype", "bfloat16", "--hf-config", "c",
      "--tokenizer", "t", "--verify-tol", "0.5"],
     ("mcore_to_hf", ("m", "h"), {"hf_config": "c", "tokenizer": "t", "dtype": "bfloat16", "tp": 1, "pp": 2,
                                  "verify": False, "verify_tol": 0.5})),
])
def test_convert_maps_its_flags_onto_the_library_and_prints_its_report(capsys, monkeypatch, argv, call):
    import megatron_fipo.convert as C

    calls = []
    for name in ("hf_to_mcore", "mcore_to_hf"):
        monkeypatch.setattr(C, name, lambda *a, _name=name, **k: calls.append((_name, a, k)) or {"written": "w"})
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 0
    assert calls == [call]
    assert capsys.readouterr().out == '{"written": "w"}\n'
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 prints
    assert main(argv) == 0
    assert capsys.readouterr().out == ""


def _train_setup(tmp_path, monkeypatch, rows=3):
    """A tiny HF model, ``rows`` problems and a train config; starting a process group fails the test."""
    from megatron_fipo.mcore import groups
    from tests.hf_tiny import tiny_hf_model

    def no_process_group(*a, **k):
        raise AssertionError("a process group started before the bad input was found")

    monkeypatch.setattr(groups, "init_distributed", no_process_group)
    hf = tiny_hf_model(str(tmp_path / "hf"), num_hidden_layers=2)
    data = tmp_path / "train.jsonl"
    _write(data, [{"prompt": f"{i}+1=", "answer": i + 1} for i in range(rows)])
    (tmp_path / "c.yaml").write_text(
        f"model:\n  hf_path: {hf}\ndata:\n  train_files: [{data}]\nrollout:\n  n: 2\n  max_prompt_length: 16\n"
        f"  max_response_length: 16\nalgo:\n  overlong_buffer: 4\ntrain:\n  prompts_per_step: 2\n"
        f"  mini_batch_prompts: 2\n  run_dir: {tmp_path / 'run'}\n")
    return ["train", "--config", str(tmp_path / "c.yaml")], hf, data


@pytest.mark.parametrize("override, message", [
    ("train.prompts_per_step=100000000", "train.prompts_per_step=100000000 is more than the 3 usable problems in "
                                         "data.train_files"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last must be >= 1 or null"),
    ("optim.lr=.inf", "optim.lr must be a finite number"),
])
def test_train_rejects_bad_input_before_any_process_group(tmp_path, capsys, monkeypatch, override, message):
    argv, _, _ = _train_setup(tmp_path, monkeypatch)
    capsys.readouterr()
    assert main(argv + [override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_train_names_a_non_utf8_data_row_and_a_truncated_model(tmp_path, capsys, monkeypatch):
    argv, hf, data = _train_setup(tmp_path, monkeypatch)
    capsys.readouterr()
    good = data.read_bytes()
    data.write_bytes(good + b'{"prompt": "\xff", "answer": 1}\n')
    assert main(argv) == 2
    assert f"{data}: 1 bad row(s): row 3: not UTF-8 text (byte 0xff at line 4, column 13)" in capsys.readouterr().err
    data.write_bytes(good)
    weights = os.path.join(hf, "model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(1000)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{weights}: not a readable safetensors file" in err and "re-download" in err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "m", "--data", "d.jsonl", "--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    (["eval", "--model", "m", "--data", "d.jsonl", "--temperature", "-1"], "argument --temperature: must be > 0"),
    (["eval", "--model", "m", "--data", "d.jsonl", "--n", "0"], "argument --n: must be >= 1, got 0"),
    (["eval", "--model", "m", "--data", "d.jsonl", "--timeout", "nan"], "argument --timeout: must be > 0, got nan"),
    (["score", "in.jsonl", "--k", "0"], "argument --k: must be >= 1, got 0"),
    (["score", "in.jsonl", "--workers", "-1"], "argument --workers: must be >= 0, got -1"),
    (["convert", "--from-hf", "a", "--to-mcore", "b", "--tp", "0"], "argument --tp: must be >= 1, got 0"),
    (["convert", "--from-hf", "a", "--to-mcore", "b", "--pp", "x"], "argument --pp: must be an integer, got 'x'"),
])
def test_numeric_options_are_checked_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_world_size_error_names_torchrun():
    from megatron_fipo.mcore.groups import world_size_error

    alone = world_size_error(1, 2)
    assert alone.startswith("world size 1 is not divisible by tp*pp*cp = 2")
    assert "torchrun --nproc-per-node 2" in alone and "\n" not in alone
    assert "torchrun" in world_size_error(6, 4) and "multiple of 4" in world_size_error(6, 4)


def test_initialize_without_torchrun_names_it(monkeypatch):
    """The check runs before Megatron is touched: a single process asking for tp=2 gets the torchrun line."""
    import torch.distributed as dist

    from megatron_fipo.mcore import groups

    monkeypatch.setattr(groups, "_init_process_group", lambda backend, timeout: None)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    with pytest.raises(ValueError, match=r"launch with torchrun --nproc-per-node 2 "):
        groups.init_distributed(tp=2, pp=1, cp=1)
