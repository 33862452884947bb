"""The console entry point: ``megatron-fipo score``."""

import json
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


def test_module_entry_point_runs(tmp_path):
    src = tmp_path / "in.jsonl"
    _write(src, [{"ground_truth": "3", "responses": ["Answer: 3"]}])
    proc = subprocess.run([sys.executable, "-m", "megatron_fipo", "score", str(src), "--workers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["avg@1"] == 1.0
