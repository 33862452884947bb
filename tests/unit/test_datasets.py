"""data.datasets: parquet / jsonl loading, bad-row reports, prompt encoding, resumable loader."""
import json

import pytest

from megatron_fipo.data.datasets import PromptLoader, encode_prompts, load_problems


def _row(i, content="What is 1+1?", gt="2"):
    return {"data_source": "math_dapo", "prompt": [{"role": "user", "content": content}], "ability": "MATH",
            "reward_model": {"style": "rule", "ground_truth": gt}, "extra_info": {"index": i}}


def _jsonl(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_parquet_layout(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [_row(i, f"q{i}", str(i)) for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")  # prompt: list<struct<role, content>>
    probs = load_problems(str(tmp_path / "d.parquet"))
    assert [(p.messages, p.ground_truth, p.row, p.uid) for p in probs] == \
        [((("user", f"q{i}"),), str(i), i, f"d.parquet:{i}") for i in range(5)]


def test_jsonl_fallback_fields(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"prompt": "plain", "answer": 7}, {"prompt": "p", "ground_truth": "x"}, ""])
    probs = load_problems(path)
    assert [(p.messages, p.ground_truth) for p in probs] == [((("user", "plain"),), "7"), ((("user", "p"),), "x")]


BAD = [
    ("not json {", "not valid JSON"),
    ({"reward_model": {"ground_truth": "1"}}, "missing or empty 'prompt'"),
    ({"prompt": [], "reward_model": {"ground_truth": "1"}}, "missing or empty 'prompt'"),
    ({"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}}, "string 'role' and 'content'"),
    ({"prompt": [{"role": "user", "content": 3}], "reward_model": {"ground_truth": "1"}}, "string 'role'"),
    ({"prompt": "q"}, "missing 'reward_model.ground_truth'"),
    ({"prompt": "q", "reward_model": {"ground_truth": "  "}}, "missing 'reward_model.ground_truth'"),
    ([1, 2], "must be an object"),
]


@pytest.mark.parametrize("bad, reason", BAD)
def test_bad_rows_reported_with_row_numbers(tmp_path, bad, reason):
    rows = [_row(0), _row(1), bad if isinstance(bad, str) else bad, _row(3)]
    path = _jsonl(tmp_path / "b.jsonl", [r if not isinstance(r, list) else json.dumps(r) for r in rows])
    with pytest.raises(ValueError, match=f"row 2: .*{reason}"):
        load_problems(path)
    with pytest.warns(UserWarning, match=f"1 bad row.*row 2: .*{reason}"):
        probs = load_problems(path, on_bad_row="skip")
    assert [p.row for p in probs] == [0, 1, 3]


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_problems(str(tmp_path / "none.jsonl"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="unknown data file type"):
        load_problems(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="no usable rows"):
        load_problems(_jsonl(tmp_path / "e.jsonl", ["{}"]), on_bad_row="skip")
    many = _jsonl(tmp_path / "m.jsonl", ["{}"] * 9 + [json.dumps(_row(9))])
    with pytest.raises(ValueError, match="9 bad row.*and 4 more"):
        load_problems(many)


def _tokenizer(template=True):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", "<u>", "<a>"] + list("abcdefghijklmnopqrstuvwxyz0123456789+=?\n "))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<u>", "<a>"]})
    if template:
        fast.chat_template = "{% for m in messages %}<u>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    return fast, vocab


def test_encode_prompts_with_chat_template_and_too_long(tmp_path):
    tok, vocab = _tokenizer()
    probs = load_problems(_jsonl(tmp_path / "p.jsonl", [_row(0, "ab"), _row(1, "abcdefgh"), _row(2, "c")]))
    assert encode_prompts(probs[:1], tok, max_prompt_tokens=10) == [[vocab["<u>"], vocab["a"], vocab["b"], vocab["<a>"]]]
    with pytest.raises(ValueError, match="row 1: 10 tokens > max_prompt_length 6"):
        encode_prompts(probs, tok, max_prompt_tokens=6)
    with pytest.warns(UserWarning, match="too-long"):
        out = encode_prompts(probs, tok, max_prompt_tokens=6, on_too_long="skip")
    assert out[1] is None and out[2] == [vocab["<u>"], vocab["c"], vocab["<a>"]]
    with pytest.raises(ValueError, match="every prompt"):
        encode_prompts(probs, tok, max_prompt_tokens=1, on_too_long="skip")


def test_encode_without_chat_template(tmp_path):
    tok, vocab = _tokenizer(template=False)
    probs = load_problems(_jsonl(tmp_path / "p.jsonl", [_row(0, "ab")]))
    assert encode_prompts(probs, tok, max_prompt_tokens=10) == [[vocab["a"], vocab["b"]]]


def test_loader_epochs_and_determinism():
    items = list(range(10))
    a, b = PromptLoader(items, batch_size=4, seed=1), PromptLoader(items, batch_size=4, seed=1)
    first = [a.next_batch() for _ in range(5)]  # 20 items: two full epochs
    assert first == [b.next_batch() for _ in range(5)]
    flat = [x for batch in first for x in batch]
    assert sorted(flat[:10]) == items and sorted(flat[10:]) == items and flat[:10] != flat[10:]
    assert PromptLoader(items, batch_size=4, seed=2).next_batch(10) != flat[:10]


@pytest.mark.parametrize("draws", [0, 1, 3, 7])
def test_loader_resume_is_exact(draws):
    items = [f"p{i}" for i in range(7)]
    a = PromptLoader(items, batch_size=3, seed=5)
    for _ in range(draws):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch(k) for k in (3, 5, 1, 9)]
    b = PromptLoader(items, batch_size=3, seed=5)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert [b.next_batch(k) for k in (3, 5, 1, 9)] == expected
    with pytest.raises(ValueError, match="data files or data.seed changed"):
        PromptLoader(items[:5], batch_size=3, seed=5).load_state_dict(state)


def test_loader_bad_args():
    with pytest.raises(ValueError):
        PromptLoader([], batch_size=1)
    with pytest.raises(ValueError):
        PromptLoader([1], batch_size=0)


def test_non_utf8_row_names_the_file_and_line(tmp_path):
    path = tmp_path / "u.jsonl"
    good = json.dumps(_row(0)).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + good.replace(b"1+1", b"1\xff1") + b"\n" + good + b"\n")
    with pytest.raises(ValueError, match=f"{path}: 1 bad row.*row 2: not UTF-8 text \\(byte 0xff at line 3, column"):
        load_problems(str(path))
    with pytest.warns(UserWarning, match="row 2: not UTF-8"):
        assert [p.row for p in load_problems(str(path), on_bad_row="skip")] == [0, 1, 3]


def test_corrupt_parquet_names_the_file(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=f"{path}: not a readable parquet file"):
        load_problems(str(path))
