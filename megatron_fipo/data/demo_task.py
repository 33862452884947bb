"""The embedded demo's task: two-number addition answered as ``Answer: N``, a character tokenizer, a tiny Qwen2.

Owns the problem generator (rows in the DAPO-Math-17k layout, scored by ``dapo_math_reward``),
``build_tokenizer`` (an HF fast tokenizer with a chat template, built offline with
``tokenizers``), ``build_base_model`` (a tiny random ``Qwen2ForCausalLM`` given a short supervised
warm-up, so it starts with partial accuracy when sampling at temperature 1) and ``build_demo``
(all of it written to a directory atomically and idempotently). The tokenizer, the warm-up, the
row and model writers and the atomic build (``build_atomically``) take the task's characters,
model shape and responses as arguments: the long-tailed demo (``data/longtail_task.py``) reuses
them. Must not import megatron, torch.distributed or any trainer / rollout module.

Why it is RL-learnable in minutes on a CPU: the warm-up is trained with label smoothing, so the
base model knows the answer (greedy accuracy near 1) but keeps a tenth of its probability on every
token of the answer spread over wrong characters, which puts its sampled accuracy at temperature 1
near a third. FIPO / DAPO sharpen that distribution: held-out Avg@4 rises by 0.3 or more within 15
steps on every seed tried, far above the end-to-end test's threshold of 0.1.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile

import torch

SPECIAL = ("<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>")
CHARS = "0123456789+= Answer:"
CHAT_TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=192, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
             tie_word_embeddings=True, hidden_act="silu")
INFO = "demo_info.json"


def problems(seed: int, n_train: int, n_test: int, max_operand: int = 49) -> tuple[list[dict], list[dict]]:
    """Disjoint train / test rows ``a+b=`` with ground truth ``a+b`` (DAPO-Math-17k layout)."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    if n_train + n_test > len(pairs):
        raise ValueError(f"only {len(pairs)} distinct problems with operands <= {max_operand}")
    random.Random(seed).shuffle(pairs)

    def row(i, a, b):
        return {"data_source": "demo_arith", "prompt": [{"role": "user", "content": f"{a}+{b}="}], "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(a + b)}, "extra_info": {"index": i}}

    rows = [row(i, a, b) for i, (a, b) in enumerate(pairs[:n_train + n_test])]
    return rows[:n_train], rows[n_train:]


def build_tokenizer(chars: str = CHARS):
    """Character-level ``PreTrainedTokenizerFast`` over ``chars`` (eos ``<|endoftext|>``, pad ``<|pad|>``,
    chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL) + sorted(set(chars)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def response_text(answer: str) -> str:
    return f"Answer: {answer}"


def encode_chat(tokenizer, row: dict, response: str) -> tuple[list[int], list[int]]:
    """Prompt ids of a row (chat template) and the ids of ``response`` + eos."""
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
    if hasattr(prompt, "keys"):
        prompt = prompt["input_ids"]
    ids = tokenizer.encode(response, add_special_tokens=False)
    return list(prompt), list(ids) + [tokenizer.eos_token_id]


def encode_pair(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """Prompt ids (chat template) and response ids (answer + eos) of a row."""
    return encode_chat(tokenizer, row, response_text(row["reward_model"]["ground_truth"]))


def _warmup_loss(model, tokenizer, batch, label_smoothing: float):
    """Mean cross-entropy of a batch's response tokens (teacher forcing, right padding)."""
    width = max(len(p) + len(r) for p, r in batch)
    ids = torch.full((len(batch), width), tokenizer.pad_token_id)
    labels = torch.full((len(batch), width), -100)
    for i, (p, r) in enumerate(batch):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
    logits = model(input_ids=ids, attention_mask=(labels != -100) | (ids != tokenizer.pad_token_id)).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100, label_smoothing=label_smoothing)


def _micro_batches(batch: list, max_tokens: int) -> list[list]:
    """Consecutive runs of ``batch`` (sorted by length) of at most ``max_tokens`` padded tokens (one row at least)."""
    out, cur = [], []
    for pair in batch:
        if cur and (len(cur) + 1) * (len(pair[0]) + len(pair[1])) > max_tokens:
            out.append(cur)
            cur = []
        cur.append(pair)
    return out + [cur]


def _backward(model, tokenizer, batch, label_smoothing: float, micro_batch_tokens: int | None):
    """Back-propagate the batch's mean response-token loss (in micro-batches when a budget is given); return it."""
    if micro_batch_tokens is None:
        loss = _warmup_loss(model, tokenizer, batch, label_smoothing)
        loss.backward()
        return loss.detach()
    labelled = sum(len(r) for _, r in batch)
    total = 0.0
    for chunk in _micro_batches(sorted(batch, key=lambda pr: len(pr[0]) + len(pr[1])), micro_batch_tokens):
        part = _warmup_loss(model, tokenizer, chunk, label_smoothing) * (sum(len(r) for _, r in chunk) / labelled)
        part.backward()
        total += part.detach()
    return total


def build_base_model(tokenizer, rows: list[dict], *, seed: int, warmup_steps: int, batch_size: int = 64,
                     lr: float = 3e-3, label_smoothing: float = 0.0, progress: bool = False,
                     model_config: dict = MODEL, encode=encode_pair, micro_batch_tokens: int | None = None):
    """A tiny random Qwen2 trained ``warmup_steps`` steps (teacher forcing, loss on response tokens).

    ``label_smoothing`` is the cross-entropy's: the model is taught to leave that share of its
    probability spread over the other tokens.
    ``progress`` shows a bar of the warm-up steps (with the loss) on stderr.
    ``model_config`` is the ``Qwen2Config`` shape (``MODEL``); ``encode(tokenizer, row)`` gives a
    row's prompt and response ids (``encode_pair``). ``micro_batch_tokens`` (None: one forward per
    step) sorts each step's batch by length and runs it in micro-batches of at most that many padded
    tokens, the gradient accumulated with each micro-batch's mean weighted by its share of the
    batch's labels: the same loss, without padding every row to the batch's longest (what
    long-tailed responses need).
    """
    from tqdm.auto import tqdm
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **model_config)
    model = Qwen2ForCausalLM(config).float()
    pairs = [encode(tokenizer, r) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    bar = tqdm(total=warmup_steps, desc="demo: supervised warm-up", unit="step", disable=not progress)
    for _ in range(warmup_steps):
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(batch_size)]
        opt.zero_grad()
        loss = _backward(model, tokenizer, batch, label_smoothing, micro_batch_tokens)
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


def _complete(out_dir: str, spec: dict) -> bool:
    try:
        with open(os.path.join(out_dir, INFO), encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        return False
    files = ("train.jsonl", "test.jsonl", "base/config.json", "base/tokenizer.json")
    return info.get("spec") == spec and all(os.path.exists(os.path.join(out_dir, f)) for f in files)


def write_rows(out_dir: str, train: list[dict], test: list[dict]) -> None:
    """``train.jsonl`` and ``test.jsonl`` in ``out_dir``, one JSON row a line."""
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


def save_base(out_dir: str, model, tokenizer) -> str:
    """The HF model and tokenizer written to ``out_dir/base``; returns that directory."""
    base = os.path.join(out_dir, "base")
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


def build_atomically(out_dir: str, spec: dict, populate, *, force: bool = False) -> dict:
    """Build a demo directory with ``populate(tmp_dir) -> dict`` unless a complete one has ``spec``.

    Idempotent (a complete directory whose ``demo_info.json`` holds the same ``spec`` is reused
    unless ``force``) and atomic (``populate`` fills a temporary sibling directory, which is renamed
    into place once ``demo_info.json`` = ``{"spec": spec, **populate(tmp_dir)}`` is written).

    Returns:
        the ``demo_info.json`` contents.
    """
    if not force and _complete(out_dir, spec):
        with open(os.path.join(out_dir, INFO), encoding="utf-8") as fh:
            return json.load(fh)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-build-", dir=parent)
    try:
        info = {"spec": spec, **populate(tmp)}
        with open(os.path.join(tmp, INFO), "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return info


def build_demo(out_dir: str, *, seed: int = 0, n_train: int = 2000, n_test: int = 200, warmup_steps: int = 1000,
               label_smoothing: float = 0.1, force: bool = False, evaluate=None, progress: bool = False) -> dict:
    """Write ``base/`` (HF model + tokenizer), ``train.jsonl``, ``test.jsonl`` and ``demo_info.json``.

    Idempotent (a complete directory built with the same arguments is reused unless ``force``)
    and atomic (built in a temporary sibling directory, then renamed into place).

    Args:
        out_dir: target directory.
        seed, n_train, n_test, warmup_steps, label_smoothing: the build's specification.
        force: rebuild even if complete.
        evaluate: optional ``fn(base_dir, test_rows) -> dict`` whose result is stored in the info.
        progress: show the warm-up's progress bar on stderr.

    Returns:
        the ``demo_info.json`` contents.
    """
    spec = {"seed": seed, "n_train": n_train, "n_test": n_test, "warmup_steps": warmup_steps,
            "label_smoothing": label_smoothing, "model": MODEL}

    def populate(tmp: str) -> dict:
        train, test = problems(seed, n_train, n_test)
        write_rows(tmp, train, test)
        tokenizer = build_tokenizer()
        model = build_base_model(tokenizer, train, seed=seed, warmup_steps=warmup_steps,
                                 label_smoothing=label_smoothing, progress=progress)
        base = save_base(tmp, model, tokenizer)
        return evaluate(base, test) if evaluate else {}

    return build_atomically(out_dir, spec, populate, force=force)
