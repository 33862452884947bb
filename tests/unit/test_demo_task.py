"""data.demo_task: tokenizer, problems, the idempotent and atomic build."""
import json
import os

import pytest

from megatron_fipo.algo.rewards import dapo_math_reward
from megatron_fipo.data import demo_task as D


def test_problems_are_correct_and_disjoint():
    train, test = D.problems(3, 300, 50)
    seen = set()
    for row in train + test:
        a, b = row["prompt"][0]["content"].rstrip("=").split("+")
        assert row["reward_model"]["ground_truth"] == str(int(a) + int(b))
        seen.add(row["prompt"][0]["content"])
    assert len(seen) == 350
    assert D.problems(3, 300, 50) == (train, test) and D.problems(4, 300, 50) != (train, test)
    with pytest.raises(ValueError, match="distinct problems"):
        D.problems(0, 2500, 1)


def test_tokenizer_round_trip_chat_template_and_reward():
    tok = D.build_tokenizer()
    row = D.problems(0, 1, 0)[0][0]
    prompt, response = D.encode_pair(tok, row)
    content = row["prompt"][0]["content"]
    assert prompt == [tok.convert_tokens_to_ids("<|user|>")] + [tok.convert_tokens_to_ids(c) for c in content] + \
        [tok.convert_tokens_to_ids("<|assistant|>")]
    assert response[-1] == tok.eos_token_id
    text = tok.decode(response, skip_special_tokens=True)
    assert text == f"Answer: {row['reward_model']['ground_truth']}"
    assert dapo_math_reward(text, row["reward_model"]["ground_truth"]).score == 1.0
    assert dapo_math_reward(tok.decode(response[:-2], skip_special_tokens=True),
                            row["reward_model"]["ground_truth"]).score == -1.0


def test_build_is_idempotent_and_atomic(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "demo")
    calls = []
    info = D.build_demo(out, n_train=64, n_test=8, warmup_steps=2, evaluate=lambda d, rows: calls.append(d) or {"x": 1})
    assert info["x"] == 1 and len(calls) == 1
    assert AutoTokenizer.from_pretrained(os.path.join(out, "base")).eos_token == "<|endoftext|>"
    AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"))
    stamp = os.path.getmtime(os.path.join(out, "train.jsonl"))
    assert D.build_demo(out, n_train=64, n_test=8, warmup_steps=2) == info  # reused
    assert os.path.getmtime(os.path.join(out, "train.jsonl")) == stamp
    os.remove(os.path.join(out, "base", "config.json"))  # a damaged directory is rebuilt
    D.build_demo(out, n_train=64, n_test=8, warmup_steps=2)
    assert os.path.exists(os.path.join(out, "base", "config.json"))
    D.build_demo(out, n_train=32, n_test=8, warmup_steps=2)  # another spec is rebuilt
    assert len(open(os.path.join(out, "train.jsonl")).read().splitlines()) == 32
    assert json.load(open(os.path.join(out, D.INFO)))["spec"]["n_train"] == 32
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".demo-build-")]  # no temp dirs left


def test_build_shows_warmup_progress(tmp_path, capsys):
    D.build_demo(str(tmp_path / "demo"), n_train=16, n_test=4, warmup_steps=3, progress=True)
    err = capsys.readouterr().err
    assert "demo: supervised warm-up" in err and "3/3" in err and "loss=" in err
    D.build_demo(str(tmp_path / "quiet"), n_train=16, n_test=4, warmup_steps=3)
    assert "warm-up" not in capsys.readouterr().err
