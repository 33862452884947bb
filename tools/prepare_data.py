"""Convert and validate prompt files for training and evaluation (DAPO-Math-17k, AIME 2024 / 2025).

Usage::

    # verl / DAPO layout already (DAPO-Math-17k, DAPO's AIME-2024): validate, drop duplicate rows
    python tools/prepare_data.py dapo-math-17k/data/*.parquet --out /shared/fipo/data/dapo-math-17k.parquet
    # plain problem / answer rows (e.g. an AIME 2025 jsonl): wrap them in DAPO's "Answer:" prompt
    python tools/prepare_data.py aime2025.jsonl --out /shared/fipo/data/aime-2025.parquet --data-source aime2025
    # only check files the trainer will read
    python tools/prepare_data.py --check /shared/fipo/data/*.parquet

Owns the conversion into the row layout ``megatron_fipo.data.datasets`` reads (``prompt`` = chat
messages, ``reward_model.ground_truth``, ``data_source``; other columns are dropped): rows already
in that layout keep their messages; rows with a question (``problem`` / ``question``) and an ``answer`` get DAPO's prompt
(``DAPO_TEMPLATE``, the instruction DAPO-Math-17k's prompts carry, so the DAPO reward finds the
final ``Answer:`` line). Identical (prompt, answer) rows are dropped by default: the released
DAPO-Math-17k parquet repeats each of its ~17k problems many times. The output is read back with
the trainer's own loader before the tool reports success. Works offline on downloaded files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_fipo.data.datasets import load_problems, read_rows  # noqa: E402

DAPO_TEMPLATE = ("Solve the following math problem step by step. The last line of your response should be of the "
                 "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
                 'Remember to put your answer on its own line after "Answer:".')
QUESTION_KEYS = ("problem", "question", "Problem", "Question")
ANSWER_KEYS = ("answer", "Answer", "ground_truth")


def _answer(row: dict):
    reward_model = row.get("reward_model") if isinstance(row.get("reward_model"), dict) else {}
    for value in (reward_model.get("ground_truth"), *(row.get(k) for k in ANSWER_KEYS)):
        if value is not None and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None


def convert_row(row: dict, data_source: str) -> dict:
    """One input row -> ``{data_source, prompt, reward_model: {ground_truth, style}}``; ``ValueError(reason)``."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object, got {type(row).__name__}")
    answer = _answer(row)
    if isinstance(row.get("prompt"), (list, tuple)):
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in row["prompt"] if isinstance(m, dict)]
        if not messages or len(messages) != len(row["prompt"]) or not all(
                isinstance(m["role"], str) and isinstance(m["content"], str) for m in messages):
            raise ValueError("every prompt message needs string 'role' and 'content'")
    else:
        question = next((row[k] for k in QUESTION_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
        if question is None:
            raise ValueError(f"need 'prompt' messages or a question ({', '.join(QUESTION_KEYS)})")
        messages = [{"role": "user", "content": DAPO_TEMPLATE.format(problem=question.strip())}]
    if answer is None:
        raise ValueError(f"no answer: need reward_model.ground_truth or one of {ANSWER_KEYS}")
    return {"data_source": str(row.get("data_source") or data_source), "prompt": messages,
            "reward_model": {"ground_truth": answer, "style": "rule"}}


def _key(row: dict) -> str:
    return json.dumps([row["prompt"], row["reward_model"]["ground_truth"]], sort_keys=True)


def convert(paths: Sequence[str], *, data_source: str, dedupe: bool = True, skip_bad: bool = False) -> tuple:
    """``(rows, report)``: converted rows of every file, in order; bad rows raise unless ``skip_bad``."""
    out, seen, bad, total = [], set(), [], 0
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"input {path!r} does not exist")
        for index, row in read_rows(path):
            total += 1
            try:
                if isinstance(row, Exception):
                    raise row
                row = convert_row(row, data_source)
            except ValueError as err:
                bad.append(f"{os.path.basename(path)} row {index}: {err}")
                continue
            key = _key(row)
            if dedupe and key in seen:
                continue
            seen.add(key)
            out.append(row)
    if bad and not skip_bad:
        raise ValueError(f"{len(bad)} bad row(s): " + "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
                         + " (fix them or pass --skip-bad)")
    return out, {"rows_in": total, "rows_out": len(out), "duplicates_dropped": total - len(bad) - len(out),
                 "bad_rows_skipped": len(bad)}


def write_parquet(rows: Iterable[dict], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="parquet / jsonl files")
    parser.add_argument("--out", help="output parquet (required unless --check)")
    parser.add_argument("--check", action="store_true", help="only validate the inputs with the trainer's loader")
    parser.add_argument("--data-source", default="", help="data_source of rows that have none (e.g. aime2025)")
    parser.add_argument("--keep-duplicates", action="store_true")
    parser.add_argument("--skip-bad", action="store_true", help="drop bad rows instead of failing")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = load_problems(args.inputs)
            report = {"problems": len(problems), "data_sources": sorted({p.data_source for p in problems})}
        else:
            if not args.out:
                raise ValueError("--out is required (or --check)")
            rows, report = convert(args.inputs, data_source=args.data_source, dedupe=not args.keep_duplicates,
                                   skip_bad=args.skip_bad)
            if not rows:
                raise ValueError("no usable rows")
            write_parquet(rows, args.out)
            report["problems_read_back"] = len(load_problems(args.out))  # the trainer's own reader
            report["out"] = args.out
    except ValueError as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
