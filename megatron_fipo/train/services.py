"""Global rank 0's rollout services: the engine, the prompt data, the reward pool, the tokenizer and the logs.

Owns ``RolloutServices`` (one optional object per rank: built on global rank 0, ``None`` on every
other rank), ``build_services`` (which also resolves ``rollout.stop_token_ids`` from the
tokenizer's eos token, the one config value only known once the tokenizer is loaded),
``evaluate`` (Avg@k / Cons@k / Pass@k of the engine's weights) and ``encode_items`` (problem
files -> prompts, shared with ``megatron-fipo eval``) with ``check_prompt_count``. Composition only: no process groups, no
megatron (the weight sync that feeds the engine is ``weight_sync.WeightSync``).
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_fipo.train.experience import PromptItem, evaluate_items


@dataclass
class RolloutServices:
    """What global rank 0 holds to produce a step's experience and its evaluations."""

    engine: Any
    """The ``rollout.engine.RolloutEngine`` (CPU engine or SGLang servers)."""
    tokenizer: Any
    loader: Any
    """``data.datasets.PromptLoader`` of the training prompts (its position is checkpointed)."""
    pool: Any
    """``algo.reward_pool.RewardPool`` scoring responses in worker processes."""
    logger: Any
    """``tracking.MetricsLogger`` (metrics.jsonl, TensorBoard, W&B)."""
    reward_fn: str
    colocated: bool
    """The engine shares the trainers' GPUs: it releases its memory while they train."""
    eval_items: list = field(default_factory=list)

    # the callables ``experience.collect_experience`` takes
    def draw(self, k: int):
        return self.loader.next_batch(k)

    def score(self, texts, ground_truths):
        return self.pool.score(self.reward_fn, texts, ground_truths)

    def submit_score(self, texts, ground_truths):
        """``score`` without waiting (``RewardPool.submit``): a ``PendingScores``."""
        return self.pool.submit(self.reward_fn, texts, ground_truths)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def release(self) -> None:
        """Free the engine's GPU memory for training (colocated engines only)."""
        if self.colocated:
            self.engine.release()

    def resume(self) -> None:
        if self.colocated:
            self.engine.resume()

    def close(self) -> None:
        for obj in (self.engine, self.pool, self.logger):
            if obj is not None:
                (getattr(obj, "shutdown", None) or obj.close)()
        self.engine = self.pool = self.logger = None


def build_services(config, *, step: int, trainer_state: dict, urls: Optional[list] = None) -> tuple[RolloutServices, Any]:
    """Rank 0's services, and the config with ``rollout.stop_token_ids`` resolved (the tokenizer's eos
    when unset). ``trainer_state`` is a resumed checkpoint's (data position; {} for a fresh run);
    ``urls``: the servers the nodes launched (node-local rollouts), which the engine attaches to."""
    from transformers import AutoTokenizer

    from megatron_fipo.algo.reward_pool import RewardPool
    from megatron_fipo.config.schema import to_dict
    from megatron_fipo.train.tracking import MetricsLogger

    tr, ro = config.train, config.rollout
    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or config.model.hf_path)
    if not ro.stop_token_ids:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token: set rollout.stop_token_ids")
        config = dataclasses.replace(config, rollout=dataclasses.replace(ro, stop_token_ids=(int(eos),)))
    loader = _prompt_loader(config, tokenizer)
    if trainer_state.get("loader"):
        loader.load_state_dict(trainer_state["loader"])
    eval_items = _items(config, tokenizer, config.eval.files)[:config.eval.max_problems] if config.eval.files else []
    logger = MetricsLogger(tr.run_dir, resume_step=step if trainer_state else None,
                           tensorboard=config.log.tensorboard, wandb_project=config.log.wandb_project,
                           config=to_dict(config))
    pool = engine = None
    try:
        pool = RewardPool(tr.reward_workers, tr.reward_timeout_s)
        engine = _engine(config, urls)
    except BaseException:
        for obj in (pool, logger):
            if obj is not None:
                (getattr(obj, "shutdown", None) or obj.close)()
        raise
    # The in-process CPU engine has no accelerator memory to give back: generating ahead, it keeps generating.
    colocated = ro.mode == "colocated" and not (ro.engine == "cpu" and ro.max_staleness > 0)
    services = RolloutServices(engine, tokenizer, loader, pool, logger, config.algo.reward_fn,
                               colocated=colocated, eval_items=eval_items)
    return services, config


def _engine(config, urls: Optional[list]):
    ro = config.rollout
    if ro.engine == "cpu":
        from megatron_fipo.rollout.cpu_engine import CPUEngine

        return CPUEngine(config.model.hf_path, max_batch_rows=ro.cpu_max_batch_rows)
    from megatron_fipo.rollout.sglang_engine import SGLangEngine

    extra = {"urls": tuple(urls)} if urls else {}  # the nodes' own servers: attached (each node owns its own)
    return SGLangEngine.from_config(config.model.hf_path, ro, log_dir=os.path.join(config.train.run_dir, "sglang_logs"),
                                    **extra)


def eval_settings(cfg) -> dict:
    """The trainer's held-out sampling settings (``evaluate_items`` keywords); ``megatron-fipo eval --config``
    takes its defaults from here too."""
    ev = cfg.eval
    return {"n": ev.n, "temperature": ev.temperature, "top_p": ev.top_p,
            "max_new_tokens": ev.max_response_length or cfg.rollout.max_response_length,
            "stop_token_ids": cfg.rollout.stop_token_ids, "seed": cfg.train.seed}


def evaluate(services: Optional[RolloutServices], cfg) -> dict:
    """Avg@k / Cons@k / Pass@k (k = ``eval.n``) of the engine's current weights on the eval set ({} off rank 0)."""
    if services is None or not services.eval_items:
        return {}
    start = time.perf_counter()
    out, _ = evaluate_items(services.engine, services.eval_items, services.score, services.decode,
                            **eval_settings(cfg), progress=cfg.log.progress)
    out["time/eval_s"] = time.perf_counter() - start
    return out


def encode_items(files, tokenizer, *, max_prompt_tokens: int, on_bad_row: str, on_too_long: str) -> list:
    """Problem files -> ``PromptItem`` list (prompts through the tokenizer's chat template)."""
    from megatron_fipo.data.datasets import encode_prompts, load_problems

    problems = load_problems(files, on_bad_row=on_bad_row)
    ids = encode_prompts(problems, tokenizer, max_prompt_tokens=max_prompt_tokens, on_too_long=on_too_long)
    return [PromptItem(tuple(x), p.ground_truth, p.uid) for p, x in zip(problems, ids) if x is not None]


def _items(config, tokenizer, files) -> list:
    return encode_items(files, tokenizer, max_prompt_tokens=config.rollout.max_prompt_length,
                        on_bad_row=config.data.on_bad_row, on_too_long=config.data.on_too_long)


def _prompt_loader(config, tokenizer):
    from megatron_fipo.data.datasets import PromptLoader

    items = _items(config, tokenizer, config.data.train_files)
    check_prompt_count(len(items), config, "prompts within rollout.max_prompt_length")
    return PromptLoader(items, batch_size=config.train.prompts_per_step, seed=config.data.seed)


def check_prompt_count(available: int, config, what: str) -> None:
    """A step draws ``train.prompts_per_step`` distinct prompts; more than the data holds is a mistake.

    The loader would repeat prompts within the step to fill it, and rank 0 holds every drawn prompt
    with its ``rollout.n`` responses: an oversized value only grows memory until the process dies.
    """
    tr = config.train
    if tr.prompts_per_step > available:
        raise ValueError(f"train.prompts_per_step={tr.prompts_per_step} is more than the {available} {what} in "
                         f"data.train_files: a step draws that many distinct prompts (x rollout.n={config.rollout.n} "
                         f"responses each); lower it to at most {available} (and a multiple of train.mini_batch_prompts="
                         f"{tr.mini_batch_prompts}) or add data")
