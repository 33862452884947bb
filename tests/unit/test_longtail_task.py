"""data.longtail_task: the remainder chains, their long-tailed lengths, the reward on them, the tiny build."""
import importlib.util
import json
import os
import statistics

import pytest
import torch

from megatron_fipo.algo.rewards import dapo_math_reward
from megatron_fipo.data import demo_task as D
from megatron_fipo.data import longtail_task as L


@pytest.fixture(scope="module")
def rows():
    return L.problems(0, 4000, 200)


@pytest.fixture(scope="module")
def tok():
    return D.build_tokenizer(L.CHARS)


def _parts(row):
    number, divisor = row["prompt"][0]["content"].rstrip("=").split("%")
    return int(number), int(divisor)


def test_rows_are_well_formed_and_their_chains_correct(rows):
    train, test = rows
    for i, row in enumerate(train + test):
        assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
        assert row["data_source"] == "demo_longtail" and row["ability"] == "math"
        assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].endswith("=")
        number, divisor = _parts(row)
        assert 2 <= divisor <= L.MAX_DIVISOR and divisor <= number <= L.MAX_NUMBER
        assert row["reward_model"] == {"style": "rule", "ground_truth": str(number % divisor)}
        assert row["extra_info"] == {"index": i, "steps": number // divisor}
        steps, answer = L.response_of(row).rsplit(";", 1)
        assert answer == f"Answer: {number % divisor}"
        current = number
        for step in steps.split(";"):  # every written step subtracts the divisor from the last result
            left, result = step.split("=")
            a, k = left.split("-")
            assert (int(a), int(k), int(result)) == (current, divisor, current - divisor) and int(result) >= 0
            current = int(result)
        assert current == number % divisor and len(steps.split(";")) == row["extra_info"]["steps"]


def test_chain_examples_and_bad_input():
    assert L.chain(9, 7) == "9-7=2;Answer: 2"
    assert L.chain(21, 7) == "21-7=14;14-7=7;7-7=0;Answer: 0"
    with pytest.raises(ValueError):
        L.chain(5, 7)
    with pytest.raises(ValueError):
        L.chain(5, 0)


def test_train_and_test_are_disjoint_and_seeded(rows):
    train, test = rows
    prompts = [r["prompt"][0]["content"] for r in train + test]
    assert len(set(prompts)) == len(prompts) == 4200
    assert L.problems(0, 4000, 200) == rows and L.problems(1, 4000, 200) != rows
    assert L.problems(0, 300, 20)[0] == train[:300]  # a prefix of the same draw
    with pytest.raises(ValueError, match="problems asked for"):
        L.problems(0, 10 ** 6, 1)


def test_step_counts_and_lengths_are_long_tailed(rows, tok):
    """About three quarters of the problems need 1-3 steps, a few in a hundred 20-32; responses 16 to ~350 tokens."""
    weights = L.step_weights()
    assert len(weights) == L.MAX_STEPS and sum(weights) == pytest.approx(1.0)
    assert sum(weights[:3]) > 0.75 and 0.02 < sum(weights[19:]) < 0.03
    for part in rows:
        steps = [r["extra_info"]["steps"] for r in part]
        lengths = [len(L.encode_pair(tok, r)[1]) for r in part]
        assert 0.6 < sum(s <= 3 for s in steps) / len(steps) < 0.85
        assert 0.01 < sum(s >= 20 for s in steps) / len(steps) < 0.06
        assert max(steps) >= 28
        assert min(lengths) <= 20 and 300 <= max(lengths) <= 358
        assert max(lengths) / statistics.median(lengths) >= 8
    train_steps = [r["extra_info"]["steps"] for r in rows[0]]
    assert min(train_steps) == 1 and max(train_steps) == L.MAX_STEPS


def test_tokenizer_covers_the_task_and_the_reward_scores_it(rows, tok):
    row = rows[1][0]
    prompt, response = L.encode_pair(tok, row)
    assert tok.pad_token_id not in prompt + response  # no character fell to the unknown token (pad)
    assert [prompt[0], prompt[-1]] == tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert tok.decode(prompt[1:-1]) == row["prompt"][0]["content"]
    assert response[-1] == tok.eos_token_id
    text = tok.decode(response, skip_special_tokens=True)
    truth = row["reward_model"]["ground_truth"]
    assert text == L.response_of(row) and dapo_math_reward(text, truth).score == 1.0
    wrong = text[:-len(truth)] + str(int(truth) + 1)
    assert dapo_math_reward(wrong, truth).score == -1.0
    assert dapo_math_reward(text.rsplit(";", 1)[0], truth).score == -1.0  # the chain without its answer
    longest = max(rows[0] + rows[1], key=lambda r: len(L.response_of(r)))
    assert len(L.response_of(longest)) + 1 <= 358  # the longest possible chain + eos: within the 384-token cap
    assert dapo_math_reward(L.response_of(longest), longest["reward_model"]["ground_truth"]).score == 1.0


def test_micro_batched_warmup_matches_one_batch(tok, rows):
    """``micro_batch_tokens`` only splits the forward: the same loss and gradient (up to rounding) as one batch."""
    pairs = [L.encode_pair(tok, r) for r in rows[0][:24]]
    model = D.build_base_model(tok, rows[0][:1], seed=0, warmup_steps=0, model_config=L.MODEL, encode=L.encode_pair)
    results = []
    for budget in (None, 512):
        model.zero_grad()
        loss = D._backward(model, tok, pairs, 0.03, budget)
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (split_loss, split_grads) = results
    assert len(D._micro_batches(sorted(pairs, key=lambda pr: len(pr[0]) + len(pr[1])), 512)) > 2
    torch.testing.assert_close(split_loss, loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_micro_batches_respect_the_token_budget():
    batch = [([1], [2] * n) for n in (1, 2, 3, 7, 7, 30)]  # sorted by length
    chunks = D._micro_batches(batch, 16)
    assert [x for c in chunks for x in c] == batch
    for c in chunks:
        assert len(c) == 1 or len(c) * max(len(p) + len(r) for p, r in c) <= 16


def test_build_is_idempotent_and_fits_the_positions(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    out = str(tmp_path / "lt")
    calls = []
    info = L.build_demo(out, n_train=64, n_test=8, warmup_steps=2, evaluate=lambda d, r: calls.append(d) or {"x": 1})
    assert info["x"] == 1 and len(calls) == 1 and info["spec"]["task"] == "longtail"
    config = AutoConfig.from_pretrained(os.path.join(out, "base"))
    assert config.max_position_embeddings >= 16 + 384  # the example's max_prompt_length + max_response_length
    assert 64 <= config.hidden_size <= 128 and 2 <= config.num_hidden_layers <= 4
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "base"))
    test = [json.loads(line) for line in open(os.path.join(out, "test.jsonl"))]
    assert [len(L.encode_pair(tok, r)[0]) for r in test] and max(len(L.encode_pair(tok, r)[0]) for r in test) <= 16
    stamp = os.path.getmtime(os.path.join(out, "train.jsonl"))
    assert L.build_demo(out, n_train=64, n_test=8, warmup_steps=2) == info  # reused
    assert os.path.getmtime(os.path.join(out, "train.jsonl")) == stamp
    D.build_demo(out, n_train=16, n_test=4, warmup_steps=1)  # the addition demo in its place: rebuilt
    assert "task" not in json.load(open(os.path.join(out, D.INFO)))["spec"]
    L.build_demo(out, n_train=64, n_test=8, warmup_steps=2)
    assert json.load(open(os.path.join(out, D.INFO)))["spec"]["task"] == "longtail"
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".demo-build-")]


def _make_demo():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "make_demo.py")
    spec = importlib.util.spec_from_file_location("make_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_demo_reports_the_length_tail_and_accuracy_by_steps():
    tool = _make_demo()
    assert tool.TASKS["addition"][0] == "build/demo" and tool.TASKS["longtail"][0] == "build/demo_longtail"
    stats = tool.sampled_lengths([16, 20, 30, 40, 384], [True, True, True, True, False])
    assert stats["sampled_len_median"] == 30 and stats["sampled_len_max"] == 384
    assert stats["sampled_len_max_over_median"] == 12.8 and stats["sampled_len_max_stopped"] == 40
    assert stats["sampled_truncated_frac"] == 0.2 and stats["sampled_len_p90"] == 40
    assert tool.by_steps([1, 0, 1, 0, 0], [1, 3, 5, 12, 25]) == {
        "1-3": {"acc": 0.5, "samples": 2}, "4-9": {"acc": 1.0, "samples": 1},
        "10-19": {"acc": 0.0, "samples": 1}, "20+": {"acc": 0.0, "samples": 1}}
