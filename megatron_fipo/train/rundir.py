"""A run directory protects itself: the settings its checkpoints were made with, and their history.

Owns ``check_run_dir`` (called by ``train`` before any process group or heavy work), the
classification of every config key into ``DEFINING`` (what the checkpoints and metrics mean:
algorithm, model, data, sampling, optimizer) and ``RESUMABLE`` (what may change on a
resume: steps, evaluation, logging, checkpoint cadence, workers), and the history file.

``config.yaml`` in the run directory is written once, when the run starts without checkpoints,
and never rewritten afterwards. A start that finds checkpoints compares its settings with the
recorded ones (``config.yaml`` with every change of ``config_history.jsonl`` applied):

- a changed DEFINING key refuses (``RunDirRefused``, a ``ValueError``: exit code 2) with one line
  naming each ``key: old -> new`` and the ways out (a new ``train.run_dir``, or
  ``--allow-changed KEY...``, which accepts the change and records it);
- changed RESUMABLE keys are appended to ``config_history.jsonl`` (time, step, ``{key: [old, new]}``);
- a run whose last checkpoint is at ``train.steps`` is complete: ``check_run_dir`` returns a one-line
  summary with its last held-out figures and ``train`` returns without building anything.

Every rank computes the same answer from the same files; only rank 0 writes. Pure file system:
no torch, no megatron.
"""
from __future__ import annotations

import datetime
import json
import os
import re
from typing import Any, Optional, Sequence

from megatron_fipo.config.schema import Config, read_saved_config, to_dict

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"

RESUMABLE = frozenset({
    "train.steps", "train.run_dir", "train.reward_workers", "train.reward_timeout_s", "train.max_nonfinite_steps",
    "eval.files", "eval.every_steps", "eval.at_start", "eval.at_end", "eval.n", "eval.temperature", "eval.top_p",
    "eval.max_response_length", "eval.max_problems",
    "log.tensorboard", "log.wandb_project", "log.progress",
    "checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.resume", "checkpoint.export_hf",
    "rollout.bucket_mb", "rollout.replicas", "rollout.servers_per_node", "rollout.launcher", "rollout.urls",
    "rollout.sync_host", "rollout.max_restarts", "rollout.cpu_max_batch_rows", "rollout.engine", "rollout.mode",
    "rollout.sglang", "parallel.backend", "model.use_te", "model.recompute", "model.tokenizer",
    "data.on_bad_row", "data.on_too_long", "optim.max_tokens_per_micro_batch", "optim.logprob_chunk_tokens",
    "parallel.sequence_parallel", "parallel.tp", "parallel.pp", "parallel.vpp", "parallel.cp",
})
"""Keys a resume may change: where and how the run is driven, evaluated, logged and checkpointed, and the
layout (``parallel.tp/pp/vpp/cp``): checkpoints reshard on load, so a run resumes exactly at another one."""


def all_keys(config: Optional[Config] = None) -> list[str]:
    """Every ``section.key`` of the schema."""
    data = to_dict(config or Config())
    return [f"{section}.{key}" for section, values in data.items() for key in values]


DEFINING = frozenset({
    "model.hf_path", "model.init_checkpoint", "model.params_dtype", "model.transformer_overrides",
    "rollout.n", "rollout.temperature", "rollout.top_p", "rollout.top_k", "rollout.max_prompt_length",
    "rollout.max_response_length", "rollout.stop_token_ids", "rollout.max_staleness", "rollout.stale_policy",
    "rollout.partial", "rollout.inflight_updates", "rollout.oversample", "rollout.deterministic",
    "algo.use_influence", "algo.drop_filter", "algo.decay_rate", "algo.clip_low", "algo.clip_high",
    "algo.dual_clip_c", "algo.future_kl_clip_ratio", "algo.future_kl_clip_high_only", "algo.safety_thresh",
    "algo.negative_only_mask", "algo.reward_fn", "algo.normalize_adv_std", "algo.overlong_buffer",
    "algo.overlong_penalty_factor", "algo.dynamic_sampling", "algo.max_gen_rounds", "algo.filter_metric",
    "algo.on_exhausted", "algo.rollout_correction", "algo.correction_cap", "algo.correction_bounds",
    "optim.lr", "optim.warmup_steps", "optim.weight_decay", "optim.clip_grad", "optim.adam_beta1",
    "optim.adam_beta2", "optim.adam_eps",
    "data.train_files", "data.seed",
    "train.prompts_per_step", "train.mini_batch_prompts", "train.seed",
})
"""Everything else: algorithm (``algo.*``), model weights and dtype, data and its order, rollout sampling,
optimizer, batch sizes and seeds."""


class RunDirRefused(ValueError):
    """The run directory's checkpoints were made with different defining settings (exit code 2)."""


def _flat(data: dict) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in data.items() if isinstance(values, dict) for k, v in values.items()}


def _last_step(run_dir: str) -> Optional[int]:
    from megatron_fipo.mcore.checkpoint_integrity import latest_checkpoint

    path = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if path is None:
        return None
    match = re.search(r"iter_(\d+)$", path.rstrip("/"))
    return int(match.group(1)) if match else None


def recorded_settings(run_dir: str) -> Optional[dict[str, Any]]:
    """The flat settings the run's checkpoints were made with (``config.yaml`` + history), or None."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    flat = _flat(read_saved_config(path))
    hist = os.path.join(run_dir, HISTORY_FILE)
    if os.path.isfile(hist):
        with open(hist, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    for key, (_, new) in json.loads(line).get("changed", {}).items():
                        flat[key] = new
    return flat


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value or '""'


def heldout_summary(run_dir: str) -> str:
    """``step S: avg@4 0.73 cons@4 0.95 pass@4 1.0`` of the last record of metrics.jsonl with eval figures."""
    from megatron_fipo.train.tracking import read_metrics

    path = os.path.join(run_dir, "metrics.jsonl")
    records = read_metrics(path) if os.path.isfile(path) else []
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not evals:
        return "no held-out figures recorded"
    return f"step {evals[-1].get('step')}: " + eval_line_figures(evals[-1])


def eval_line_figures(metrics: dict) -> str:
    """``avg@4 0.7338  cons@4 0.9550  pass@4 1.0000`` from ``eval/*`` metrics."""
    keys = [k for k in metrics if re.match(r"eval/(avg|cons|pass)@\d+$", k)]
    return "  ".join(f"{k[5:]} {float(metrics[k]):.4f}" for k in keys)


def check_run_dir(config: Config, allow_changed: Sequence[str] = (), *, rank: int = 0) -> Optional[str]:
    """Refuse, record, or report a complete run (module docstring). Returns the complete-run line, else None.

    Args:
        config: the resolved config of this start.
        allow_changed: defining keys whose change the user accepts (``--allow-changed``).
        rank: only rank 0 writes the history.
    """
    run_dir = config.train.run_dir
    unknown = [k for k in allow_changed if k not in DEFINING and k not in RESUMABLE]
    if unknown:
        raise ValueError(f"--allow-changed: unknown config key(s) {', '.join(unknown)}")
    step = _last_step(run_dir) if config.checkpoint.resume == "auto" else None
    old = recorded_settings(run_dir)
    if step is None or old is None:
        return None  # a fresh run (or an explicit checkpoint): the trainer records its config
    new = _flat(to_dict(config))
    if not new.get("rollout.stop_token_ids"):  # default resolved at the first start: not a change
        new["rollout.stop_token_ids"] = old.get("rollout.stop_token_ids", [])
    # a key the recorded config lacks (added to the schema since) is not a change
    changed = {k: (old[k], v) for k, v in new.items() if k != "train.run_dir" and k in old and old[k] != v}
    refused = [k for k in changed if k in DEFINING and k not in allow_changed]
    if refused:
        diffs = ", ".join(f"{k}: {_show(changed[k][0])} -> {_show(changed[k][1])}" for k in refused)
        raise RunDirRefused(
            f"run directory {run_dir} holds checkpoints (step {step}) made with other settings ({diffs}); "
            f"use a new train.run_dir=... or accept the change with --allow-changed {' '.join(refused)}")
    if changed and rank == 0:
        record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "step": step, "changed": {k: list(v) for k, v in changed.items()},
                  "allowed": sorted(k for k in changed if k in DEFINING)}
        with open(os.path.join(run_dir, HISTORY_FILE), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
    if step >= config.train.steps:
        return (f"run {run_dir} is already complete (step {step} of train.steps={config.train.steps}); "
                f"last held-out figures, {heldout_summary(run_dir)}")
    return None
