"""The benchmarks run (smoke test: small sizes; figures are reported, never asserted as timings)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_future_kl_benchmark_quick(tmp_path):
    out = tmp_path / "fkl.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "future_kl.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Summary" in proc.stdout
    rows = json.loads(out.read_text())["results"]
    assert [r["length"] for r in rows] == [256, 1024]
    for row in rows:  # accuracy is a correctness property, unlike the timings
        assert row["accuracy_rel_max_err"]["ours_fp32"] < 1e-5
        assert row["accuracy_rel_max_err"]["ours_fp64"] < 1e-12
        assert row["time_ms"]["ours"] > 0 and row["time_ms"]["baseline"] > 0
