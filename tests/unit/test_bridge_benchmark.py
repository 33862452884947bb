"""benchmarks/bridge.py runs (smoke test at --quick size; timings are reported, never asserted)."""
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_bridge_benchmark_quick(tmp_path):
    out = tmp_path / "bridge.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bridge.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Summary" in proc.stdout
    result = json.loads(out.read_text())
    assert result["hf_bytes"] > 0 and result["export_gbps"] > 0 and result["memcpy_gbps"] > 0
