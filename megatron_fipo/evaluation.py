"""``megatron-fipo eval``: Avg@k / Cons@k / Pass@k of an HF model or a Megatron checkpoint on a problem file.

Owns ``run_eval(args)``. A Megatron checkpoint is first exported to a temporary HF directory
(``convert.mcore_to_hf``), then served by the rollout engine (the CPU engine, or SGLang on GPUs)
exactly as the trainer's periodic evaluation does (``experience.evaluate_items``, same seeds).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile


def run_eval(args) -> int:
    """Evaluate; prints the metrics as JSON and optionally writes per-problem records (jsonl)."""
    from transformers import AutoTokenizer

    from megatron_fipo.algo.reward_pool import RewardPool
    from megatron_fipo.train.experience import evaluate_items
    from megatron_fipo.train.services import encode_items

    if bool(args.model) == bool(args.checkpoint):
        raise ValueError("pass exactly one of --model HF_DIR or --checkpoint MEGATRON_DIR")
    if args.model and is_megatron_checkpoint(args.model):
        raise ValueError(f"{args.model} is a Megatron checkpoint, not an HF model directory: pass it as "
                         f"--checkpoint {args.model} (exported to HF first)")
    settings = resolve_settings(args)
    with tempfile.TemporaryDirectory(prefix="fipo-eval-") as tmp:
        model_dir = args.model or _export(args.checkpoint, os.path.join(tmp, "hf"))
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_dir)
        items = encode_items(args.data, tokenizer, max_prompt_tokens=settings["max_prompt_tokens"],
                             on_bad_row=args.on_bad_row, on_too_long="error")[:settings["max_problems"]]
        max_new_tokens = _max_new_tokens(settings["max_new_tokens"], model_dir, items)
        stop = settings["stop_token_ids"] or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        engine = _engine(args, model_dir)
        try:
            with RewardPool(args.workers, args.timeout) as pool:
                metrics, records = evaluate_items(
                    engine, items, lambda t, g: pool.score(args.reward, t, g),
                    lambda ids: tokenizer.decode(ids, skip_special_tokens=True), n=settings["n"],
                    temperature=settings["temperature"], top_p=settings["top_p"], max_new_tokens=max_new_tokens,
                    stop_token_ids=stop, seed=settings["seed"], progress=True)
        finally:
            engine.shutdown()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec) + "\n")
    print(json.dumps({"problems": len(items), **metrics}, indent=2))
    return 0


DEFAULT_MAX_NEW_TOKENS = 20480  # the recipe's response length
# Without --config: the defaults of the options (the recipe's evaluation: n=32, top-p 0.7).
DEFAULTS = {"n": 32, "temperature": 1.0, "top_p": 0.7, "max_new_tokens": None, "max_prompt_tokens": 2048,
            "max_problems": None, "stop_token_ids": None, "seed": 1234}


def resolve_settings(args) -> dict:
    """Each sampling setting: the option if given, else the ``--config``'s evaluation (the trainer's own
    ``services.eval_settings``, prompt length ``rollout.max_prompt_length``), else ``DEFAULTS``."""
    settings = dict(DEFAULTS)
    if getattr(args, "config", None):
        from megatron_fipo.config.schema import load_config
        from megatron_fipo.train.services import eval_settings

        cfg = load_config(args.config, [])
        settings.update(eval_settings(cfg), max_prompt_tokens=cfg.rollout.max_prompt_length,
                        max_problems=cfg.eval.max_problems)
        settings["stop_token_ids"] = list(settings["stop_token_ids"] or []) or None
    for key in DEFAULTS:
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    return settings


# Files a Megatron checkpoint (an iter_* directory, or the root / run directory above it) is known by.
_MEGATRON_MARKERS = ("fipo_checkpoint.json", "latest_checkpointed_iteration.txt", "metadata.json", ".metadata",
                     "common.pt")  # the first: checkpoint_integrity.MARKER


def is_megatron_checkpoint(path: str) -> bool:
    """True when ``path`` holds no HF ``config.json`` but looks like a Megatron checkpoint, its root or a run dir."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return False
    names = set(os.listdir(path))
    if names & set(_MEGATRON_MARKERS) or any(n.startswith("iter_") for n in names):
        return True
    return os.path.isdir(os.path.join(path, "checkpoints")) and is_megatron_checkpoint(os.path.join(path, "checkpoints"))


def _max_new_tokens(requested, model_dir: str, items) -> int:
    """``requested``, or by default 20480 capped by what the model's positions leave after the longest prompt."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {requested}")
        return requested
    from megatron_fipo.config.hf_model import read_hf_config

    try:
        positions = read_hf_config(model_dir).get("max_position_embeddings")
    except ValueError:
        positions = None  # not an HF directory we can read: the engine reports what is wrong
    if not positions or not items:
        return DEFAULT_MAX_NEW_TOKENS
    room = int(positions) - max(len(it.prompt_ids) for it in items)
    if room < 1:
        raise ValueError(f"the longest prompt fills the model's {positions} positions: no room to generate "
                         "(lower --max-prompt-tokens)")
    if room < DEFAULT_MAX_NEW_TOKENS:
        print(f"eval: generating at most {room} new tokens (the model has {positions} positions; pass "
              "--max-new-tokens to choose)", file=sys.stderr)
    return min(room, DEFAULT_MAX_NEW_TOKENS)


def _engine(args, model_dir: str):
    if args.engine == "cpu":
        from megatron_fipo.rollout.cpu_engine import CPUEngine

        return CPUEngine(model_dir)
    from megatron_fipo.config.schema import RolloutConfig
    from megatron_fipo.rollout.sglang_engine import SGLangEngine

    return SGLangEngine.from_config(model_dir, RolloutConfig(engine="sglang"))


def _export(checkpoint: str, out_dir: str) -> str:
    from megatron_fipo.convert import mcore_to_hf, print_report

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the metrics JSON
        print_report(mcore_to_hf(checkpoint, out_dir))
    return out_dir
