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


def _single_process_env() -> None:
    """The torchrun environment of a one-process world, when not launched by torchrun."""
    import os
    import socket

    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def cmd_convert(args: argparse.Namespace) -> int:
    """HF directory -> Megatron checkpoint root, or Megatron checkpoint -> HF directory.

    The Megatron checkpoint keeps the HF config (and source directory, for the tokenizer) in its
    ``extra``; checkpoints saved elsewhere need ``--hf-config``. Collective under torchrun.
    """
    import os

    if bool(args.from_hf) == bool(args.from_mcore) or bool(args.to_mcore) != bool(args.from_hf) \
            or bool(args.to_hf) != bool(args.from_mcore):
        raise ValueError("use either --from-hf DIR --to-mcore DIR or --from-mcore DIR --to-hf DIR")
    _single_process_env()
    from megatron_fipo.bridge.hf_export import export_hf_state, save_hf_checkpoint
    from megatron_fipo.bridge.hf_import import load_hf_into_chunks
    from megatron_fipo.mcore import groups as G
    from megatron_fipo.mcore.actor import Actor
    from megatron_fipo.mcore.checkpoint import latest_checkpoint, read_checkpoint_meta
    from megatron_fipo.mcore.model import Qwen2Arch

    if args.from_hf:
        hf_config, source = _read_json(os.path.join(args.from_hf, "config.json")), os.path.abspath(args.from_hf)
    else:
        path = latest_checkpoint(args.from_mcore) or args.from_mcore
        extra = read_checkpoint_meta(path).get("extra", {})
        hf_config = _read_json(os.path.join(args.hf_config, "config.json") if args.hf_config and
                               os.path.isdir(args.hf_config) else args.hf_config) if args.hf_config \
            else extra.get("hf_config")
        if hf_config is None:
            raise ValueError(f"{path}: no HF config in the checkpoint; pass --hf-config DIR")
        source = args.tokenizer or extra.get("hf_source")
    arch = Qwen2Arch.from_hf(hf_config)
    groups = G.init_distributed(tp=args.tp, pp=args.pp)
    try:
        actor = Actor(arch, groups)
        offsets = [c.module.decoder.layers[0].layer_number - 1 for c in actor.chunks]
        if args.from_hf:
            load_hf_into_chunks(args.from_hf, actor.named_local_parameters(), arch, tp_rank=groups.tp_rank,
                                tp_size=groups.tp_size, padded_vocab=actor.padded_vocab, layer_offsets=offsets)
            out = actor.save(args.to_mcore, extra={"hf_config": hf_config, "hf_source": source})
        else:
            import torch

            actor.load(path, load_optimizer=False)
            dtype = getattr(torch, args.dtype or hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
            buckets = export_hf_state(actor.named_local_parameters(), arch, groups=groups, layer_offsets=offsets,
                                      dtype=dtype)
            if groups.rank == 0:
                save_hf_checkpoint(buckets, args.to_hf, hf_config, source if source and os.path.isdir(source) else None)
            else:
                for _ in buckets:  # the other ranks take part in the collectives
                    pass
            out = args.to_hf
    finally:
        G.destroy()
    if groups.rank == 0:
        print(json.dumps({"written": out, "tp": args.tp, "pp": args.pp}))
    return 0


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


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
