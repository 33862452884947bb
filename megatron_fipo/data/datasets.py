"""Prompt datasets: DAPO-Math-17k / AIME parquet and jsonl problems, chat-template encoding, the prompt loader.

Owns ``Problem``, ``load_problems`` (rows validated one by one: a bad row is reported with its
file and row number and either fails the load or is skipped with a warning, never mangled),
``encode_prompts`` and ``PromptLoader`` (deterministic per-epoch shuffling with an exact
``state_dict`` for resume). Must not import megatron, torch.distributed or trainer code; the
tokenizer is any object with ``apply_chat_template`` / ``encode`` (duck-typed).

Accepted row layout (verl / DAPO): ``prompt`` is a list of ``{"role", "content"}`` messages (or,
in jsonl, a plain string taken as one user message); the ground truth is
``reward_model.ground_truth``, or a top-level ``ground_truth`` / ``answer`` as a fallback (numbers
are turned into strings); ``data_source`` is optional.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

MAX_LISTED = 5


@dataclass(frozen=True)
class Problem:
    """One prompt with its verifiable answer.

    Attributes:
        messages: ``((role, content), ...)`` chat messages.
        ground_truth: the reference answer.
        data_source: e.g. ``"math_dapo"``, ``"aime"``.
        row: 0-based row number in its file.
        uid: ``"<file basename>:<row>"``.
    """

    messages: tuple
    ground_truth: str
    data_source: str
    row: int
    uid: str


def read_rows(path: str) -> Iterable[tuple[int, Any]]:
    """``(row number, row dict or an Exception)`` of a parquet or jsonl file."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:  # pragma: no cover - pyarrow is a dependency
            raise ValueError("reading parquet needs pyarrow (pip install pyarrow)") from err
        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses for a damaged file
            raise ValueError(f"{path}: not a readable parquet file ({err}); re-download or re-create it") from None
        yield from enumerate(table.to_pylist())
    elif ext in (".jsonl", ".json"):
        with open(path, "rb") as fh:
            for i, raw in enumerate(fh):
                try:
                    line = utf8_line(raw, i + 1)
                except ValueError as err:
                    yield i, err
                    continue
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as err:
                    yield i, ValueError(f"not valid JSON ({err.msg})")
    else:
        raise ValueError(f"{path}: unknown data file type {ext!r} (use .parquet or .jsonl)")


def utf8_line(raw: bytes, line: Optional[int] = None) -> str:
    """One line of a text file; ``ValueError("not UTF-8 text (byte 0xff at [line L, ]column C)")`` otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        column = len(raw[:err.start].decode("utf-8", errors="replace")) + 1
        where = f"line {line}, column {column}" if line is not None else f"column {column}"
        raise ValueError(f"not UTF-8 text (byte {raw[err.start]:#04x} at {where}); re-save the file as UTF-8") from None


def _parse(row: Any, index: int, name: str) -> Problem:
    """A row -> ``Problem``; raises ``ValueError(reason)``."""
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, got {type(row).__name__}")
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError("missing or empty 'prompt' (a list of chat messages)")
    messages = []
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("every prompt message needs string 'role' and 'content'")
        messages.append((m["role"], m["content"]))
    reward_model = row.get("reward_model") if isinstance(row.get("reward_model"), dict) else {}
    gt = reward_model.get("ground_truth", row.get("ground_truth", row.get("answer")))
    if isinstance(gt, (int, float)) and not isinstance(gt, bool):
        gt = str(gt)
    if not isinstance(gt, str) or not gt.strip():
        raise ValueError("missing 'reward_model.ground_truth' (or 'ground_truth' / 'answer')")
    return Problem(tuple(messages), gt, str(row.get("data_source") or ""), index, f"{name}:{index}")


def load_problems(paths: str | Sequence[str], *, on_bad_row: str = "error") -> list[Problem]:
    """Problems of one or more files, in file order.

    Args:
        paths: parquet / jsonl file(s).
        on_bad_row: ``"error"`` raises on any bad row (listing the first few with reasons);
            ``"skip"`` warns once per file with the count and the first few row numbers.

    Returns:
        the valid problems.

    Raises:
        ValueError: a missing file, an unknown extension, bad rows under ``"error"``, or no usable row.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("no data files given")
    out: list[Problem] = []
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"data file {path!r} does not exist")
        name, bad = os.path.basename(path), []
        for index, row in read_rows(path):
            try:
                out.append(_parse(row, index, name))
            except ValueError as err:
                bad.append((index, str(err)))
        _report(path, bad, on_bad_row, "bad row")
    if not out:
        raise ValueError(f"no usable rows in {paths}")
    return out


def _report(path: str, bad: list, policy: str, what: str) -> None:
    if not bad:
        return
    listed = "; ".join(f"row {i}: {reason}" for i, reason in bad[:MAX_LISTED])
    more = f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
    message = f"{path}: {len(bad)} {what}(s): {listed}{more}"
    if policy == "error":
        raise ValueError(message + "; fix them or set on_bad_row / on_too_long to 'skip'")
    warnings.warn(message + "; skipped", stacklevel=3)


def encode_prompts(problems: Sequence[Problem], tokenizer, *, max_prompt_tokens: int,
                   on_too_long: str = "error") -> list[Optional[list[int]]]:
    """Prompt token ids through the tokenizer's chat template (with the generation prompt).

    Tokenizers without a chat template get the message contents joined by newlines. Prompts
    longer than ``max_prompt_tokens`` raise (``"error"``, listing the rows) or come back as None
    (``"skip"``, with one warning).

    Returns:
        one id list (or None) per problem.
    """
    if on_too_long not in ("error", "skip"):
        raise ValueError(f"on_too_long must be 'error' or 'skip', got {on_too_long!r}")
    out, long = [], []
    for p in problems:
        ids = _chat_ids(tokenizer, p.messages)
        if len(ids) > max_prompt_tokens:
            long.append((p.row, f"{len(ids)} tokens > max_prompt_length {max_prompt_tokens} ({p.uid})"))
            ids = None
        out.append(ids)
    _report("prompts", long, on_too_long, "too-long prompt")
    if not any(ids is not None for ids in out):
        raise ValueError("every prompt is longer than max_prompt_length")
    return out


def _chat_ids(tokenizer, messages) -> list[int]:
    msgs = [{"role": r, "content": c} for r, c in messages]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = tokenizer.encode("\n".join(c for _, c in messages), add_special_tokens=False)
    ids = list(ids)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return [int(t) for t in ids]


class PromptLoader:
    """Endless, deterministically shuffled batches of items, resumable exactly.

    Epoch ``e`` visits every item once in the order of ``random.Random(seed + e).shuffle``;
    batches run across epoch boundaries (no item dropped, none repeated within an epoch).

    Args:
        items: anything indexable (prompt items).
        batch_size: default batch size of ``next_batch``.
        seed: shuffle seed.
    """

    def __init__(self, items: Sequence[Any], *, batch_size: int, seed: int = 0):
        if not items:
            raise ValueError("PromptLoader needs at least one item")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.items, self.batch_size, self.seed = list(items), batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, k: Optional[int] = None) -> list[Any]:
        """The next ``k`` items (default ``batch_size``)."""
        k = self.batch_size if k is None else k
        out = []
        while len(out) < k:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(k - len(out), len(self._order) - self.position)
            out += [self.items[i] for i in self._order[self.position:self.position + take]]
            self.position += take
        return out

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_items": len(self.items)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_items") != len(self.items) or state.get("seed") != self.seed:
            raise ValueError(f"loader state is for {state.get('num_items')} items with seed {state.get('seed')}, "
                             f"but this data has {len(self.items)} items with seed {self.seed}: "
                             "the data files or data.seed changed since the checkpoint")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
