"""The long-tailed CPU demo's task: remainders by repeated subtraction, written out step by step.

Owns the problem generator (``problems``: rows in the DAPO-Math-17k layout, scored by
``dapo_math_reward``), the written chain (``chain``), the step-count distribution
(``step_weights``), the model shape (``MODEL``) and ``build_demo`` (tokenizer, warmed-up base
model, train / test rows, written atomically and idempotently). The tokenizer, the supervised
warm-up and the atomic build are the addition demo's (``data/demo_task.py``), given this task's
characters, model shape and responses. Must not import megatron, torch.distributed or any
trainer / rollout module.

The task: ``"93%7="`` asks for 93 mod 7, and the response subtracts 7 until what is left is
smaller than 7, one written step at a time: ``"93-7=86;86-7=79;...;9-7=2;Answer: 2"``. A problem
with quotient ``s`` needs ``s`` steps (about ten characters each), and ``s`` is drawn from a
power law (``P(s) ~ s ** -ALPHA`` on ``1..MAX_STEPS``): about three quarters of the problems need
one to three steps (responses of 16 to 40 tokens), two to four in a hundred need 20 to 32 (200 to
358 tokens), so response lengths are long-tailed the way reasoning traces are (max / median about
11 over the held-out references, the characters being the tokens).

Why it is RL-learnable in minutes on a CPU: every step is local (copy the last number and the
divisor, subtract, compare with the divisor), so the tiny model (hidden 64, 2 layers) learns it
in a 3000-step warm-up; the warm-up's label smoothing (0.03) leaves a small share of probability
on wrong characters at every token, so an error somewhere in a long chain is likely and sampled
accuracy at temperature 1 falls with the number of steps, as a reasoning model's does with the
length of its trace. Measured with ``tools/make_demo.py --task longtail`` (seed 0): greedy 0.785,
sampled 0.295 (0.42 on one to three steps, 0.07 on four to nine, 0.02 on ten or more); the
sampled responses' lengths have median 28, p90 88 and max 384 tokens (the cap; 348 among those
that stop). ``examples/demo_longtail_cpu.yaml`` raises held-out Avg@4 from 0.30 to 0.56 in 30
steps.
"""
from __future__ import annotations

import random

from megatron_fipo.data.demo_task import (
    build_atomically,
    build_base_model,
    build_tokenizer,
    encode_chat,
    save_base,
    write_rows,
)

CHARS = "0123456789%-=; Answer:"
MAX_STEPS = 32          # the longest chain, in subtraction steps
ALPHA = 1.75            # P(steps = s) proportional to s ** -ALPHA
MAX_DIVISOR = 99
MAX_NUMBER = 999        # every number of a chain has at most three digits
MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=192, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
             tie_word_embeddings=True, hidden_act="silu")
DATA_SOURCE = "demo_longtail"
WARMUP_MICRO_BATCH_TOKENS = 4096  # the warm-up pads each length-sorted micro-batch, not the batch, to its longest


def step_weights(max_steps: int = MAX_STEPS, alpha: float = ALPHA) -> list[float]:
    """Probabilities of 1..``max_steps`` steps, proportional to ``s ** -alpha``."""
    w = [s ** -alpha for s in range(1, max_steps + 1)]
    total = sum(w)
    return [x / total for x in w]


def chain(number: int, divisor: int) -> str:
    """The written response: ``number`` minus ``divisor`` until below it, then ``Answer: remainder``."""
    if not (0 < divisor <= number):
        raise ValueError(f"need 0 < divisor <= number, got {number}%{divisor}")
    steps = []
    while number >= divisor:
        steps.append(f"{number}-{divisor}={number - divisor}")
        number -= divisor
    return ";".join(steps) + f";Answer: {number}"


def response_of(row: dict) -> str:
    """The reference response of a row (its chain)."""
    number, divisor = row["prompt"][0]["content"].rstrip("=").split("%")
    return chain(int(number), int(divisor))


def encode_pair(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """Prompt ids (chat template) and response ids (the chain + eos) of a row."""
    return encode_chat(tokenizer, row, response_of(row))


def problems(seed: int, n_train: int, n_test: int, *, max_steps: int = MAX_STEPS,
             alpha: float = ALPHA) -> tuple[list[dict], list[dict]]:
    """Disjoint train / test rows ``N%k=`` with ground truth ``N mod k`` (DAPO-Math-17k layout).

    Each problem draws its step count ``s`` from ``step_weights``, a divisor ``k`` uniform on
    ``2..min(MAX_DIVISOR, MAX_NUMBER // (s + 1))`` and a remainder uniform on ``0..k-1``; ``N = s * k + r``.
    A problem already drawn is drawn again. ``extra_info`` records the index and ``steps``.
    """
    if max_steps < 1 or MAX_NUMBER // (max_steps + 1) < 2:
        raise ValueError(f"max_steps must be in 1..{MAX_NUMBER // 2 - 1}, got {max_steps}")
    rng = random.Random(seed)
    counts = list(range(1, max_steps + 1))
    weights = step_weights(max_steps, alpha)
    capacity = sum(sum(range(2, min(MAX_DIVISOR, MAX_NUMBER // (s + 1)) + 1)) for s in counts)
    if n_train + n_test > capacity // 4:
        raise ValueError(f"{n_train + n_test} problems asked for; draw at most {capacity // 4} "
                         f"of the {capacity} distinct ones")
    seen, rows = set(), []
    while len(rows) < n_train + n_test:
        s = rng.choices(counts, weights)[0]
        k = rng.randint(2, min(MAX_DIVISOR, MAX_NUMBER // (s + 1)))
        number = s * k + rng.randrange(k)
        if (number, k) in seen:
            continue
        seen.add((number, k))
        rows.append({"data_source": DATA_SOURCE, "prompt": [{"role": "user", "content": f"{number}%{k}="}],
                     "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(number % k)},
                     "extra_info": {"index": len(rows), "steps": s}})
    return rows[:n_train], rows[n_train:]


def build_demo(out_dir: str, *, seed: int = 0, n_train: int = 4000, n_test: int = 200, warmup_steps: int = 3000,
               label_smoothing: float = 0.03, force: bool = False, evaluate=None, progress: bool = False) -> dict:
    """Write ``base/`` (HF model + tokenizer), ``train.jsonl``, ``test.jsonl`` and ``demo_info.json``.

    Idempotent and atomic as ``demo_task.build_demo`` (``demo_task.build_atomically``); the spec
    records the task, so an addition demo in ``out_dir`` is rebuilt.

    Args:
        out_dir: target directory.
        seed, n_train, n_test, warmup_steps, label_smoothing: the build's specification.
        force: rebuild even if complete.
        evaluate: optional ``fn(base_dir, test_rows) -> dict`` whose result is stored in the info.
        progress: show the warm-up's progress bar on stderr.

    Returns:
        the ``demo_info.json`` contents.
    """
    spec = {"task": "longtail", "seed": seed, "n_train": n_train, "n_test": n_test, "warmup_steps": warmup_steps,
            "label_smoothing": label_smoothing, "max_steps": MAX_STEPS, "alpha": ALPHA, "max_divisor": MAX_DIVISOR,
            "max_number": MAX_NUMBER, "chars": CHARS, "model": MODEL, "micro_batch_tokens": WARMUP_MICRO_BATCH_TOKENS}

    def populate(tmp: str) -> dict:
        train, test = problems(seed, n_train, n_test)
        write_rows(tmp, train, test)
        tokenizer = build_tokenizer(CHARS)
        model = build_base_model(tokenizer, train, seed=seed, warmup_steps=warmup_steps,
                                 label_smoothing=label_smoothing, progress=progress,
                                 model_config=MODEL, encode=encode_pair,
                                 micro_batch_tokens=WARMUP_MICRO_BATCH_TOKENS)
        base = save_base(tmp, model, tokenizer)
        return evaluate(base, test) if evaluate else {}

    return build_atomically(out_dir, spec, populate, force=force)
