"""tools/compare_metrics.py: equal runs compare equal, timings aside; any other change is reported."""
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import compare_metrics  # noqa: E402


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_equal_runs_differ_only_in_timings(tmp_path, capsys):
    a = [{"step": 0, "eval/avg@4": 0.3}, {"step": 1, "train/loss": 1.5, "time/step_s": 2.0, "perf/tokens_per_s": 9.0}]
    b = [{"step": 0, "eval/avg@4": 0.3}, {"step": 1, "train/loss": 1.5, "time/step_s": 3.0, "perf/tokens_per_s": 7.0}]
    assert compare_metrics.main([_write(tmp_path / "a", a), _write(tmp_path / "b", b)]) == 0
    assert "identical" in capsys.readouterr().out


def test_a_changed_value_a_missing_key_and_a_missing_step_are_reported(tmp_path, capsys):
    a = [{"step": 0, "eval/avg@4": 0.3}, {"step": 1, "train/loss": 1.5, "train/kl": 0.1}, {"step": 2, "x": 1}]
    b = [{"step": 0, "eval/avg@4": 0.30000001}, {"step": 1, "train/loss": 1.5}]
    assert compare_metrics.main([_write(tmp_path / "a", a), _write(tmp_path / "b", b)]) == 1
    out = capsys.readouterr().out
    assert "step 0: eval/avg@4 0.3 != 0.30000001" in out
    assert "step 1: key train/kl only in first" in out
    assert "step 2: only in first" in out
    assert compare_metrics.main([_write(tmp_path / "a", a[:2]), _write(tmp_path / "b", b), "--ignore-prefix",
                                 "eval/", "--ignore-prefix", "train/kl"]) == 0
