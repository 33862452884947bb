"""tools/sglang_request_check.py: the engine's requests through the pinned SGLang's own request classes.

The check runs SGLang's code (pydantic validation with SGLang's schemas, ``GenerateReqInput``'s
normalisation, ``SamplingParams.normalize`` / ``verify``) in a child process over the unpacked wheel
and four small wheels bootstrap downloads (tools/sglang_check_pin.txt). One run checks every request
of the engine and requests that SGLang must refuse, so the check is shown to be able to fail.
"""
import base64
import os
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import sglang_request_check  # noqa: E402
import sglang_wheel  # noqa: E402

pytestmark = pytest.mark.timeout(300)

GOOD_PAYLOAD = base64.b64encode(b"rank0").decode()
# (route, body) SGLang refuses, and a part of the reason it gives
REFUSED = [
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"top_k": 0, "max_new_tokens": 4}}, "top_k"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"temperature": -1.0, "max_new_tokens": 4}}, "temperature"),
    ("/pause_generation", {"mode": "drain"}, "mode"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": ["not base64!"], "weight_version": "1"}, "base64"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": [GOOD_PAYLOAD], "flush_cache": "maybe"}, "flush_cache"),
    ("/init_weights_update_group", {"master_address": "10.0.0.1", "rank_offset": 1, "world_size": 2,
                                    "group_name": "g", "backend": "nccl"}, "master_port"),
    ("/flush_cache?timeout=-1", {}, ">= 0"),
]


def test_the_engines_requests_pass_sglangs_classes_and_bad_ones_are_refused():
    engine = sglang_wheel.engine_requests()
    report = sglang_request_check.run_check(engine + [[route, "POST", body] for route, body, _ in REFUSED])
    assert len(report) == len(engine) + len(REFUSED)
    accepted, refused = report[:len(engine)], report[len(engine):]
    assert all(r["ok"] for r in accepted), "\n".join(f"{r['route']}: {r['error']}" for r in accepted if not r["ok"])
    assert {r["class"] for r in accepted} >= {"GenerateReqInput", "PauseGenerationReqInput",
                                              "UpdateWeightsFromTensorReqInput", "UpdateWeightsFromDistributedReqInput"}
    for row, (route, _, reason) in zip(refused, REFUSED):
        assert not row["ok"], f"SGLang's classes accepted the bad request to {route}"
        assert reason in row["error"], (route, row["error"])


def test_a_missing_dependency_wheelhouse_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sglang_request_check, "SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setattr(sglang_request_check, "DEP_WHEELS", str(tmp_path / "none"))
    with pytest.raises(SystemExit, match="run bash tools/bootstrap.sh"):
        sglang_request_check.prepare(sglang_wheel.wheel_path())
