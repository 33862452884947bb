"""data.demo_task: tokenizer, problems, the idempotent and atomic build, and that build unchanged."""
import hashlib
import json
import os
import random

import pytest
import torch

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


def _first_warmup(tokenizer, rows, *, seed, warmup_steps, batch_size=64, lr=3e-3, label_smoothing=0.0):
    """The addition demo's warm-up loop as first written, before ``data/longtail_task.py`` shared it (the reference)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **D.MODEL)
    model = Qwen2ForCausalLM(config).float()
    pairs = [D.encode_pair(tokenizer, r) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for _ in range(warmup_steps):
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(batch_size)]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for i, (p, r) in enumerate(batch):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
        logits = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tokenizer.pad_token_id)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=-100, label_smoothing=label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_addition_build_is_unchanged(tmp_path):
    """The build the addition demo always made: the same rows, info and vocabulary, and weights bit-identical
    to the first warm-up loop's (the helpers it now shares with the long-tailed demo change nothing)."""
    from safetensors.torch import load_file

    out = tmp_path / "demo"
    D.build_demo(str(out), n_train=64, n_test=8, warmup_steps=3, label_smoothing=0.1)
    digests = {f: hashlib.sha256((out / f).read_bytes()).hexdigest()[:16]
               for f in ("train.jsonl", "test.jsonl", D.INFO)}
    assert digests == {"train.jsonl": "0bb0d1555ff3a311", "test.jsonl": "a8f7e151afa60546", D.INFO: "c4a083423762d691"}
    vocab = json.loads((out / "base" / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab == {t: i for i, t in enumerate(list(D.SPECIAL) + sorted(set(D.CHARS)))}
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    reference = _first_warmup(D.build_tokenizer(), train, seed=0, warmup_steps=3, label_smoothing=0.1).state_dict()
    saved = load_file(str(out / "base" / "model.safetensors"))
    assert set(saved) <= set(reference)
    for name, tensor in saved.items():
        assert torch.equal(tensor, reference[name]), name
