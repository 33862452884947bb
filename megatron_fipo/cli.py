"""The ``megatron-fipo`` console entry point.

Owns argument parsing and dispatch to subcommands. Subcommands available today:
``score`` (reward and Avg@k / Cons@k / Pass@k for responses generated elsewhere) and ``convert``
(HF safetensors <-> Megatron dist-checkpoint through the bridge and ``Actor.save`` / ``load``;
single process by default, or under torchrun with ``--tp`` / ``--pp``). ``train``, ``eval`` and
``plan`` are added with the trainer and launcher.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _read_scoring_rows(path: str) -> list[dict]:
    """Rows of ``{"ground_truth": str, "responses": [str, ...]}`` from a jsonl file."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or "ground_truth" not in row or not isinstance(row.get("responses"), list):
                raise ValueError(f"{path}:{lineno}: need an object with 'ground_truth' and a list 'responses'")
            if not row["responses"]:
                raise ValueError(f"{path}:{lineno}: 'responses' is empty")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def cmd_score(args: argparse.Namespace) -> int:
    """Score a jsonl of responses and print the evaluation metrics as JSON."""
    from megatron_fipo.algo.metrics import eval_metrics
    from megatron_fipo.algo.reward_pool import RewardPool

    rows = _read_scoring_rows(args.input)
    responses = [r for row in rows for r in row["responses"]]
    truths = [str(row["ground_truth"]) for row in rows for _ in row["responses"]]
    with RewardPool(args.workers, args.timeout) as pool:
        results = pool.score(args.reward, responses, truths)
    samples, pos = [], 0
    for row in rows:
        n = len(row["responses"])
        samples.append([(r.pred, r.acc) for r in results[pos:pos + n]])
        pos += n
    metrics = eval_metrics(samples, k=args.k)
    metrics.update(problems=len(rows), responses=len(responses),
                   reward_mean=sum(r.score for r in results) / len(results))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            for row, sample in zip(rows, samples):
                fh.write(json.dumps({**row, "preds": [p for p, _ in sample], "acc": [a for _, a in sample]}) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """HF directory <-> Megatron checkpoint (see ``megatron_fipo.convert``)."""
    from megatron_fipo.convert import convert

    return convert(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-fipo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="reward + Avg@k/Cons@k/Pass@k for a jsonl of responses")
    score.add_argument("input", help='jsonl, one problem per line: {"ground_truth": ..., "responses": [...]}')
    score.add_argument("--reward", default="dapo_math", choices=["dapo_math", "boxed_math"])
    score.add_argument("--k", type=int, default=None, help="k of the @k metrics (default: samples per problem)")
    score.add_argument("--workers", type=int, default=2, help="reward worker processes (0 = in-process)")
    score.add_argument("--timeout", type=float, default=10.0, help="seconds per response before it scores -1")
    score.add_argument("--output", help="write the rows back with per-response preds and acc")
    score.set_defaults(func=cmd_score)
    convert = sub.add_parser("convert", help="HF safetensors <-> Megatron dist-checkpoint (Qwen2)")
    convert.add_argument("--from-hf", metavar="DIR", help="HF model directory (config.json + *.safetensors)")
    convert.add_argument("--to-mcore", metavar="DIR", help="Megatron checkpoint root to write")
    convert.add_argument("--from-mcore", metavar="DIR", help="Megatron checkpoint root or iter_* directory")
    convert.add_argument("--to-hf", metavar="DIR", help="HF model directory to write")
    convert.add_argument("--hf-config", metavar="PATH", help="HF config.json (or its directory) when the "
                         "Megatron checkpoint does not carry one")
    convert.add_argument("--tokenizer", metavar="DIR", help="copy tokenizer files from here (default: the HF source)")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                         help="HF tensor dtype (default: the config's torch_dtype, else float32)")
    convert.add_argument("--tp", type=int, default=1, help="tensor parallel size (torchrun world must match)")
    convert.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    convert.add_argument("--verify", action="store_true", help="after converting, compare the Megatron model's "
                         "log-probs with the HF model's (source or export) on random tokens; fail on a mismatch")
    convert.add_argument("--verify-tol", type=float, default=1e-3, help="max |log-prob difference| for --verify")
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"megatron-fipo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
