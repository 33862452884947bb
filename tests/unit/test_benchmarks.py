"""The benchmarks run (smoke tests at --quick size; figures are reported, never asserted as timings)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_quick(script: str, out: pathlib.Path) -> dict:
    """Run ``benchmarks/<script> --quick --json out`` and return the JSON it wrote."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Summary" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.timeout(180)
def test_future_kl_benchmark_quick(tmp_path):
    rows = run_quick("future_kl.py", tmp_path / "fkl.json")["results"]
    assert [r["length"] for r in rows] == [256, 1024]
    for row in rows:  # accuracy is a correctness property, unlike the timings
        assert row["accuracy_rel_max_err"]["ours_fp32"] < 1e-5
        assert row["accuracy_rel_max_err"]["ours_fp64"] < 1e-12
        assert row["time_ms"]["ours"] > 0 and row["time_ms"]["baseline"] > 0


@pytest.mark.timeout(180)
def test_bridge_benchmark_quick(tmp_path):
    result = run_quick("bridge.py", tmp_path / "bridge.json")
    assert result["hf_bytes"] > 0 and result["export_gbps"] > 0 and result["memcpy_gbps"] > 0


def test_cpu_engine_benchmark_quick(tmp_path):
    result = run_quick("cpu_engine.py", tmp_path / "engine.json")["results"]
    assert result["tokens"] == 4 * 2 * 8 and result["ours_tokens_per_s"] > 0 and result["hf_tokens_per_s"] > 0


@pytest.mark.timeout(180)
def test_cp_scan_benchmark_quick(tmp_path):
    rows = run_quick("cp_scan.py", tmp_path / "cp_scan.json")["results"]
    assert [(r["lengths"], r["cp"]) for r in rows] == [([2048], 2), ([700, 1001, 347], 2)]
    for row in rows:  # bytes and F are correctness properties; the timings are only reported
        cp, b = row["cp"], row["bytes_per_rank"]
        local_tokens = sum(-(-n // (2 * cp)) * 2 * cp for n in row["lengths"]) // cp
        assert row["num_local_tokens"] == local_tokens
        # counted from the collectives the workers called, equal to the formulas (fp32)
        assert b["ours"]["counted"] == b["ours"]["formula"] == 2 * len(row["lengths"]) * 4
        assert b["gather"]["counted"] == b["gather"]["formula"] == local_tokens * 4
        assert 0 < b["ours"]["counted"] < b["gather"]["counted"]
        assert row["bytes_agree"] and row["F_agree"]
        assert row["F_max_abs"] > 0.1  # a non-trivial F, so the comparison means something
        assert row["F_max_abs_diff"] < 1e-5 * row["F_max_abs"]
        assert max(row["F_max_abs_err_vs_fp64"].values()) < 1e-5 * row["F_max_abs"]
        assert row["time_ms"]["ours"] > 0 and row["time_ms"]["gather"] > 0


@pytest.mark.timeout(180)
def test_node_sync_benchmark_quick(tmp_path):
    result = run_quick("node_sync.py", tmp_path / "node_sync.json")
    funnel, local = result["funnel"], result["node_local"]
    # bytes are a correctness property of the plan (timings are only reported): each node receives the
    # other node's stage once, the funnel at least that plus the whole model per remote receiver
    assert local["bytes_into_node"]["0"] > 0 and local["bytes_into_node"]["1"] > 0
    assert sum(funnel["bytes_into_node"].values()) > 2 * sum(local["bytes_into_node"].values())
    assert result["qwen2.5_32b"]["node_local_max_gib_into_a_node"] < result["qwen2.5_32b"]["funnel_gib_into_a_node"]


def test_dp_balance_benchmark_quick(tmp_path):
    result = run_quick("dp_balance.py", tmp_path / "dp_balance.json")
    assert [(r["dp"], r["seed"]) for r in result["results"]] == [(4, 0), (4, 1), (8, 0), (8, 1)]
    for row in result["results"]:  # balance is a property of the split; the timings are only reported
        m = row["max_over_mean"]
        assert 1.0 <= m["balanced"] <= min(m["round_robin"], 1.05)
        assert row["split_ms"] > 0
    assert all(s["target_met"] for s in result["summary"].values())


@pytest.mark.timeout(180)
def test_convert_memory_benchmark_quick(tmp_path):
    result = run_quick("convert_memory.py", tmp_path / "convert_memory.json")
    model = result["model"]
    assert model["parameters"] > 0 and model["bytes_in_output_dtype"] == 2 * model["parameters"]
    (runs,) = result["runs"].values()  # this checkout only
    assert runs["floor"]["returncode"] == 0 and runs["floor"]["max_rss"] > 0
    assert sorted(runs) == ["a", "d", "floor"]  # --quick: both directions, the export verified
    for case in "ad":  # every conversion ran, wrote something and was measured; the figures are only reported
        row = runs[case]
        assert row["returncode"] == 0, row.get("stderr_tail")
        assert row["output_bytes"] > 0 and row["max_rss"] >= row["peak_rss_anon"] > 0 and row["wall_s"] > 0
        assert row["peak_tree_pss"] > 0 and isinstance(row["bound_met"], bool)
        assert row["report"]["dtype"] == "bfloat16"
    assert runs["a"]["report"]["contents"] == "model" and "verify_max_abs_diff" not in runs["a"]["report"]
    assert runs["d"]["report"]["verify_max_abs_diff"] < 1e-3
