"""tools/prepare_data.py: DAPO-Math-17k-like parquet (verl layout, repeated rows) and plain AIME-like
jsonl into the trainer's layout, read back by the trainer's loader and scored by the DAPO reward."""
import importlib.util
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_fipo.algo.rewards import dapo_math_reward
from megatron_fipo.data.datasets import load_problems

spec = importlib.util.spec_from_file_location(
    "prepare_data", os.path.join(os.path.dirname(__file__), "..", "..", "tools", "prepare_data.py"))
prepare_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_data)


def _dapo_row(i, answer):
    return {"data_source": "math_dapo", "ability": "MATH", "extra_info": {"index": str(i)},
            "prompt": [{"role": "user", "content": prepare_data.DAPO_TEMPLATE.format(problem=f"What is {i}+{i}?")}],
            "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"}}


def test_dapo_parquet_is_deduplicated_and_read_back(tmp_path, capsys):
    rows = [_dapo_row(i % 3, str(2 * (i % 3))) for i in range(12)]  # 3 problems, 4 copies each
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo.parquet")
    out = tmp_path / "data" / "train.parquet"
    assert prepare_data.main([str(tmp_path / "dapo.parquet"), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"rows_in": 12, "rows_out": 3, "duplicates_dropped": 9, "bad_rows_skipped": 0,
                      "problems_read_back": 3, "out": str(out)}
    problems = load_problems(str(out))
    assert [p.ground_truth for p in problems] == ["0", "2", "4"] and problems[1].data_source == "math_dapo"
    assert problems[1].messages == (("user", rows[1]["prompt"][0]["content"]),)


def test_plain_aime_rows_get_the_dapo_prompt(tmp_path, capsys):
    src = tmp_path / "aime2025.jsonl"
    src.write_text(json.dumps({"problem": "Find 6*7.", "answer": 42}) + "\n"
                   + json.dumps({"question": "Find 2^10.", "answer": "1024"}) + "\n")
    out = tmp_path / "aime-2025.parquet"
    assert prepare_data.main([str(src), "--out", str(out), "--data-source", "aime2025"]) == 0
    problems = load_problems(str(out))
    assert [(p.data_source, p.ground_truth) for p in problems] == [("aime2025", "42"), ("aime2025", "1024")]
    content = problems[0].messages[0][1]
    assert "Find 6*7." in content and content.endswith('after "Answer:".')
    assert dapo_math_reward("6*7 = 42.\nAnswer: 42", problems[0].ground_truth).acc  # the reward finds it
    assert prepare_data.main(["--check", str(out), str(out)]) == 0
    assert json.loads(capsys.readouterr().out.split("}\n", 1)[1]) == {"problems": 4, "data_sources": ["aime2025"]}


def test_bad_rows_fail_by_default_and_are_skipped_on_request(tmp_path, capsys):
    src = tmp_path / "mixed.jsonl"
    src.write_text("\n".join([json.dumps({"problem": "ok?", "answer": "1"}), json.dumps({"problem": "no answer"}),
                              "not json", json.dumps({"prompt": [{"role": "user"}], "answer": "2"})]) + "\n")
    out = str(tmp_path / "o.parquet")
    assert prepare_data.main([str(src), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "3 bad row(s)" in err and "row 1: no answer" in err and "row 2: not valid JSON" in err
    assert not os.path.exists(out)
    assert prepare_data.main([str(src), "--out", out, "--skip-bad"]) == 0
    assert json.loads(capsys.readouterr().out)["bad_rows_skipped"] == 3
    with pytest.raises(ValueError, match="does not exist"):
        prepare_data.convert([str(tmp_path / "missing.parquet")], data_source="")
