"""The ``megatron-fipo`` console entry point.

Owns argument parsing and dispatch to subcommands:
``train`` (a FIPO run from a YAML config plus ``key=value`` overrides; one process, or under
``torchrun`` / ``srun``), ``eval`` (Avg@k / Cons@k / Pass@k of an HF model or Megatron
checkpoint), ``plan`` (rank layout and per-GPU memory estimate, no GPUs needed), ``convert``
(HF safetensors <-> Megatron dist-checkpoint) and ``score`` (rewards and @k metrics for
responses generated elsewhere).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional, Sequence

from megatron_fipo.config.conventions import DTYPE_NAMES
from megatron_fipo.convert import DEFAULT_VERIFY_TOL


def _read_scoring_rows(path: str) -> list[dict]:
    """Rows of ``{"ground_truth": str, "responses": [str, ...]}`` from a jsonl file."""
    from megatron_fipo.data.datasets import utf8_line

    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = utf8_line(raw)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None
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
    """HF directory <-> Megatron checkpoint (``megatron_fipo.convert``); rank 0 prints the report as JSON."""
    from megatron_fipo.convert import hf_to_mcore, mcore_to_hf, print_report

    if bool(args.from_hf) == bool(args.from_mcore) or bool(args.to_mcore) != bool(args.from_hf) \
            or bool(args.to_hf) != bool(args.from_mcore):
        raise ValueError("use either --from-hf DIR --to-mcore DIR or --from-mcore DIR --to-hf DIR")
    common = {"dtype": args.dtype, "tp": args.tp, "pp": args.pp, "verify": args.verify, "verify_tol": args.verify_tol}
    if args.from_hf:
        report = hf_to_mcore(args.from_hf, args.to_mcore, **common)
    else:
        report = mcore_to_hf(args.from_mcore, args.to_hf, hf_config=args.hf_config, tokenizer=args.tokenizer,
                             **common)
    print_report(report)
    return 0


def _config(args):
    from megatron_fipo.config.schema import load_config

    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        overrides.append(f"checkpoint.resume={args.resume}")
    return load_config(args.config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    """A FIPO training run (``megatron_fipo.train.loop``)."""
    from megatron_fipo.train.loop import train

    allowed = [k for k in args.allow_changed if "=" not in k]  # --allow-changed KEY... then overrides
    args.overrides = [k for k in args.allow_changed if "=" in k] + list(args.overrides)
    last = train(_config(args), allow_changed=allowed)
    if last:
        keys = [k for k in last if k.startswith(("train/reward", "train/acc", "eval/"))]
        print(json.dumps({k: last[k] for k in keys}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """@k metrics of a model on a problem file (``megatron_fipo.evaluation``)."""
    from megatron_fipo.evaluation import run_eval

    return run_eval(args)


def cmd_plan(args: argparse.Namespace) -> int:
    """Rank layout and memory estimate (``megatron_fipo.plan``)."""
    from megatron_fipo.config.hf_presets import read_config_or_preset
    from megatron_fipo.plan import format_plan, plan

    config = _config(args)
    hf = read_config_or_preset(args.hf_config or config.model.hf_path)
    report = plan(config, args.world_size, hf, gpus_per_node=args.gpus_per_node, gpu_gib=args.gpu_gib)
    print(json.dumps(report, indent=2) if args.json else format_plan(report))
    return 0


def _number(kind, test, what: str):
    """An argparse ``type``: ``kind(text)`` that is finite and passes ``test`` (else a one-line usage error)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") \
                from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


_AT_LEAST_0 = _number(int, lambda v: v >= 0, ">= 0")
_AT_LEAST_1 = _number(int, lambda v: v >= 1, ">= 1")
_POSITIVE = _number(float, lambda v: v > 0, "> 0")
_UNIT = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")


def _add_train_eval_plan(sub) -> None:
    train = sub.add_parser("train", help="FIPO training from a YAML config (torchrun for several processes)")
    train.add_argument("--config", required=True, help="YAML config (see examples/)")
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                       help="resume from the latest complete checkpoint of the run (or from PATH); "
                       "same as checkpoint.resume=auto, which is the default")
    train.add_argument("--allow-changed", nargs="+", default=[], metavar="KEY",
                       help="resume although these defining settings (e.g. algo.use_influence) differ from the ones "
                       "the run directory's checkpoints were made with; the change is recorded in config_history.jsonl")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 algo.use_influence=false")
    train.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="Avg@k / Cons@k / Pass@k of an HF model or Megatron checkpoint")
    ev.add_argument("--model", help="HF model directory")
    ev.add_argument("--checkpoint", help="Megatron checkpoint (run directory, checkpoints root or iter_* directory; "
                    "exported to HF first)")
    ev.add_argument("--config", help="a training config: the sampling options default to its evaluation settings "
                    "(eval.n / temperature / top_p / max_response_length, rollout.max_prompt_length, train.seed)")
    ev.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    ev.add_argument("--data", nargs="+", required=True, help="parquet or jsonl problem files (DAPO / AIME layout)")
    ev.add_argument("--n", type=_AT_LEAST_1, default=None, help="samples per problem (the k of the metrics; default: "
                    "the config's eval.n, else 32)")
    ev.add_argument("--temperature", type=_POSITIVE, default=None, help="default: the config's, else 1.0")
    ev.add_argument("--top-p", type=_UNIT, default=None, help="default: the config's, else 0.7")
    ev.add_argument("--max-new-tokens", type=_AT_LEAST_1, default=None,
                    help="default: the config's eval length (eval.max_response_length or rollout.max_response_length), "
                    "else 20480; capped by what the model's positions leave after the longest prompt")
    ev.add_argument("--max-prompt-tokens", type=_AT_LEAST_1, default=None, help="default: the config's, else 2048")
    ev.add_argument("--max-problems", type=_AT_LEAST_1, default=None)
    ev.add_argument("--stop-token-ids", type=_AT_LEAST_0, nargs="*", default=None, help="default: the tokenizer's eos")
    ev.add_argument("--engine", choices=["cpu", "sglang"], default="cpu")
    ev.add_argument("--reward", default="dapo_math", choices=["dapo_math", "boxed_math"])
    ev.add_argument("--workers", type=_AT_LEAST_0, default=2, help="reward worker processes")
    ev.add_argument("--timeout", type=_POSITIVE, default=10.0, help="seconds per response before it scores -1")
    ev.add_argument("--on-bad-row", choices=["error", "skip"], default="error")
    ev.add_argument("--seed", type=int, default=None, help="default: the config's train.seed, else 1234")
    ev.add_argument("--output", help="write per-problem responses, preds and acc (jsonl)")
    ev.set_defaults(func=cmd_eval)
    pl = sub.add_parser("plan", help="rank layout and per-GPU memory estimate of a config (no GPUs needed)")
    pl.add_argument("--config", required=True)
    pl.add_argument("--world-size", type=int, required=True, help="number of training GPUs (processes)")
    pl.add_argument("--hf-config", help="the model's config.json or directory, or a known shape "
                    "such as qwen2.5-32b (default: model.hf_path)")
    pl.add_argument("--gpus-per-node", type=int, default=8)
    pl.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU to check the estimate against")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("overrides", nargs="*")
    pl.set_defaults(func=cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-fipo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_eval_plan(sub)
    score = sub.add_parser("score", help="reward + Avg@k/Cons@k/Pass@k for a jsonl of responses")
    score.add_argument("input", help='jsonl, one problem per line: {"ground_truth": ..., "responses": [...]}')
    score.add_argument("--reward", default="dapo_math", choices=["dapo_math", "boxed_math"])
    score.add_argument("--k", type=_AT_LEAST_1, default=None, help="k of the @k metrics (default: samples per problem)")
    score.add_argument("--workers", type=_AT_LEAST_0, default=2, help="reward worker processes (0 = in-process)")
    score.add_argument("--timeout", type=_POSITIVE, default=10.0, help="seconds per response before it scores -1")
    score.add_argument("--output", help="write the rows back with per-response preds and acc")
    score.set_defaults(func=cmd_score)
    convert = sub.add_parser("convert", help="HF safetensors <-> Megatron dist-checkpoint (Qwen2)")
    convert.add_argument("--from-hf", metavar="DIR", help="HF model directory (config.json + *.safetensors)")
    convert.add_argument("--to-mcore", metavar="DIR", help="Megatron checkpoint root to write")
    convert.add_argument("--from-mcore", metavar="DIR", help="Megatron checkpoint root or iter_* directory")
    convert.add_argument("--to-hf", metavar="DIR", help="HF model directory to write")
    convert.add_argument("--hf-config", metavar="PATH", help="HF config.json (or its directory), or a known shape "
                         "such as qwen2.5-7b, when the Megatron checkpoint does not carry one")
    convert.add_argument("--tokenizer", metavar="DIR", help="copy tokenizer files from here (default: the HF source)")
    convert.add_argument("--dtype", choices=DTYPE_NAMES,
                         help="dtype of the weights written: the model-only checkpoint's (--to-mcore) or the "
                              "HF tensors' (--to-hf); default: the HF config's torch_dtype, else float32")
    convert.add_argument("--tp", type=_AT_LEAST_1, default=1, help="tensor parallel size (torchrun world must match)")
    convert.add_argument("--pp", type=_AT_LEAST_1, default=1, help="pipeline parallel size")
    convert.add_argument("--verify", action="store_true", help="after converting, compare the Megatron model's "
                         "log-probs with the HF model's (source or export) on random tokens; fail on a mismatch")
    convert.add_argument("--verify-tol", type=_POSITIVE, default=DEFAULT_VERIFY_TOL,
                         help="max |log-prob difference| for --verify")
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
