"""Config validation: the range of every numeric field, one checker per section, then cross-section checks.

Owns ``RANGES`` (the allowed range of every int / float field), ``REWARD_NAMES``, ``RESUME_WORDS``,
and ``find_problems(config, ...) -> (errors, warnings)``, which
``megatron_fipo.config.schema.validate`` (the public API) turns into one ``ValueError``. Sections are
checked in the schema's order (model, parallel, rollout, algo, optim, data, train, eval, log,
checkpoint): each section's ranges, then its own checks (optim and eval have ranges only, log has
nothing to check); then the checks that relate sections, the world size and the model's
``config.json``. Must not import: torch, megatron, sglang or any project module but ``conventions`` (the CP
alignment and dtype names every layer shares); not ``megatron_fipo.config.schema`` either (it imports
this module; the config is read by attribute, so no import is needed).

Departures: pass-through dicts (``model.transformer_overrides``, ``rollout.sglang``) are not checked
here; their owners (megatron-core, SGLang) validate them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from megatron_fipo.config.conventions import PARAMS_DTYPES, cp_alignment

REWARD_NAMES = ("dapo_math", "boxed_math")  # algo.rewards.REWARD_FNS (a test keeps the two in step)
RESUME_WORDS = ("auto", "never")  # any other checkpoint.resume is a checkpoint directory
ROLLOUT_CORRECTIONS = ("auto", "none", "token_tis", "token_mis", "seq_tis", "seq_mis", "geo_mis")
# "auto" and algo.losses.ROLLOUT_CORRECTIONS (a test keeps the two in step)


def _ge(lo, nullable: bool = False):
    return (lambda v: v >= lo), f">= {lo}" + (" or null" if nullable else "")


def _gt(lo):
    return (lambda v: v > lo), f"> {lo}"


def _unit(open_low: bool):
    """(0, 1] when ``open_low`` (a probability mass), else [0, 1) (a ratio or moment decay)."""
    return ((lambda v: 0 < v <= 1), "in (0, 1]") if open_low else ((lambda v: 0 <= v < 1), "in [0, 1)")


# Every int / float field -> (test, what it must be). null passes wherever the field is Optional.
RANGES = {
    "parallel.tp": _ge(1), "parallel.pp": _ge(1), "parallel.cp": _ge(1), "parallel.vpp": _ge(2, nullable=True),
    "rollout.n": _ge(1), "rollout.temperature": _gt(0), "rollout.top_p": _unit(True),
    "rollout.top_k": ((lambda v: v >= 0), ">= 0 (0 disables it)"), "rollout.max_prompt_length": _ge(1),
    "rollout.max_response_length": _ge(1), "rollout.bucket_mb": _ge(1), "rollout.replicas": _ge(1),
    "rollout.servers_per_node": _ge(1, nullable=True),
    "rollout.max_restarts": _ge(0), "rollout.cpu_max_batch_rows": _ge(1), "rollout.max_staleness": _ge(0),
    "rollout.oversample": _ge(1),
    "algo.decay_rate": _gt(0), "algo.clip_low": _unit(False), "algo.clip_high": _ge(0),
    "algo.dual_clip_c": ((lambda v: v > 1), "> 1 or null (no dual clip)"), "algo.future_kl_clip_ratio": _unit(False),
    "algo.safety_thresh": _gt(0), "algo.overlong_buffer": ((lambda v: v >= 0), ">= 0 (0 disables the penalty)"),
    "algo.overlong_penalty_factor": _ge(0), "algo.max_gen_rounds": _ge(1), "algo.correction_cap": _gt(0),
    "optim.lr": _gt(0), "optim.warmup_steps": _ge(0), "optim.weight_decay": _ge(0),
    "optim.clip_grad": ((lambda v: v >= 0), ">= 0 (0 disables clipping)"), "optim.adam_beta1": _unit(False),
    "optim.adam_beta2": _unit(False), "optim.adam_eps": _gt(0), "optim.max_tokens_per_micro_batch": _ge(1),
    "optim.logprob_chunk_tokens": _ge(1), "data.seed": _ge(0),
    "train.steps": _ge(1), "train.prompts_per_step": _ge(1), "train.mini_batch_prompts": _ge(1), "train.seed": _ge(0),
    "train.reward_workers": _ge(1), "train.reward_timeout_s": _gt(0), "train.max_nonfinite_steps": _ge(1),
    "eval.every_steps": ((lambda v: v >= 0), ">= 0 (0: only at start / end)"), "eval.n": _ge(1),
    "eval.temperature": ((lambda v: v > 0), "> 0 (the engines sample; there is no greedy decoding)"),
    "eval.top_p": _unit(True), "eval.max_response_length": _ge(1, nullable=True),
    "eval.max_problems": _ge(1, nullable=True),
    "checkpoint.every_steps": ((lambda v: v >= 0), ">= 0 (0: only at the end)"),
    "checkpoint.keep_last": ((lambda v: v >= 1), ">= 1 or null (keep every checkpoint)"),
}


class _Found:
    """The errors and warnings found so far."""

    def __init__(self):
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def need(self, cond: bool, msg: str) -> None:
        if not cond:
            self.errors.append(msg)


def _ranges(config, section: str, found: _Found) -> None:
    """The ``RANGES`` rules of one section."""
    for name, (ok, what) in RANGES.items():
        sec, key = name.split(".")
        value = getattr(getattr(config, sec), key) if sec == section else None
        if value is not None and not ok(value):
            found.errors.append(f"{name} must be {what}, got {value!r}")


# ------------------------------------------------------------------------------------------ sections
def _check_model(model, found: _Found) -> None:
    found.need(model.params_dtype in PARAMS_DTYPES, "model.params_dtype must be float32 or bfloat16")


def _check_parallel(par, found: _Found) -> None:
    found.need(par.vpp is None or par.pp >= 2, "parallel.vpp needs parallel.pp >= 2 (or vpp null)")
    found.need(par.backend in (None, "nccl", "gloo"),
               f"parallel.backend must be nccl, gloo or null, got {par.backend!r}")
    if par.sequence_parallel and par.tp == 1:
        found.warnings.append("parallel.sequence_parallel has no effect with parallel.tp=1")


def _check_rollout(ro, found: _Found) -> None:
    found.need(ro.engine in ("cpu", "sglang"), f"rollout.engine must be 'cpu' or 'sglang', got {ro.engine!r}")
    found.need(ro.mode in ("colocated", "disaggregated"),
               f"rollout.mode must be colocated or disaggregated, got {ro.mode!r}")
    found.need(not (ro.engine == "cpu" and ro.mode != "colocated"), "rollout.engine=cpu runs colocated only")
    found.need(not (ro.engine == "sglang" and ro.mode == "colocated" and not ro.urls and ro.replicas != 1),
               f"rollout.replicas={ro.replicas}: colocated SGLang servers run on every node; set "
               "rollout.servers_per_node (default: GPUs per node / rollout.sglang.tp_size) instead")
    if ro.n == 1:
        found.warnings.append("rollout.n=1: every GRPO group has one sample, so every advantage is 0")
    found.need(all(isinstance(a, str) for a in ro.launcher),
               f"rollout.launcher must be a list of strings (an argv; quote numbers), got {list(ro.launcher)}")
    found.need(ro.stale_policy in ("wait", "drop"), f"rollout.stale_policy must be 'wait' or 'drop', got "
               f"{ro.stale_policy!r}")
    if ro.max_staleness and ro.engine == "sglang" and ro.mode == "colocated":
        found.warnings.append(f"rollout.max_staleness={ro.max_staleness} with colocated SGLang: the servers give "
                              "their GPU memory to training, so generation cannot overlap it; samples are "
                              "stale without any throughput gain (use rollout.mode=disaggregated to overlap)")
    found.need(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ro.stop_token_ids),
               f"rollout.stop_token_ids must be token ids (integers >= 0), got {list(ro.stop_token_ids)}")
    _check_long_tail(ro, found)


def _check_long_tail(ro, found: _Found) -> None:
    """rollout.partial / inflight_updates / oversample: what each needs."""
    x = ro.oversample  # its range (>= 1) is in RANGES
    if isinstance(x, (int, float)) and x > 1:
        found.need(ro.partial, f"rollout.oversample={x} needs rollout.partial=true: the groups still running when "
                   "a step's batch is complete carry over to the next step")
    for key in ("partial", "inflight_updates"):
        value = getattr(ro, key)
        found.need(isinstance(value, bool), f"rollout.{key} must be true or false, got {value!r}")
        found.need(not (value is True and ro.engine == "cpu"),
                   f"rollout.{key} needs the SGLang engine (rollout.engine=sglang; on CPU machines its protocol is "
                   "served by rollout.launcher=[python, -m, megatron_fipo.rollout.cpu_server]): the in-process CPU "
                   "engine generates a whole round at once and cannot pause, abort or continue a request")
    found.need(isinstance(ro.deterministic, bool), f"rollout.deterministic must be true or false, got {ro.deterministic!r}")
    found.need(not (ro.deterministic is True and ro.sglang.get("enable_deterministic_inference") is False),
               "rollout.deterministic=true contradicts rollout.sglang.enable_deterministic_inference=false: set one")
    if ro.inflight_updates is True:
        found.need(ro.mode == "disaggregated", "rollout.inflight_updates needs rollout.mode=disaggregated: colocated "
                   "servers give their GPU memory to training, so generation cannot run through a weight update "
                   "(use rollout.partial=true there: unfinished samples are aborted and continued next step)")
        found.need(ro.partial is True, "rollout.inflight_updates needs rollout.partial=true: a sample running through "
                   "a weight update is trained when it finishes, at a later step")


def _check_algo(algo, found: _Found) -> None:
    found.need(algo.reward_fn in REWARD_NAMES,
               f"algo.reward_fn must be one of {list(REWARD_NAMES)}, got {algo.reward_fn!r}")
    found.need(algo.filter_metric in ("acc", "score"), "algo.filter_metric must be 'acc' or 'score'")
    found.need(algo.on_exhausted in ("train_short", "error"), "algo.on_exhausted must be 'train_short' or 'error'")
    found.need(algo.rollout_correction in ROLLOUT_CORRECTIONS,
               f"algo.rollout_correction must be one of {list(ROLLOUT_CORRECTIONS)}, got {algo.rollout_correction!r}")
    bounds = list(algo.correction_bounds)
    numbers = len(bounds) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
    found.need(numbers and 0 <= bounds[0] < bounds[1],
               f"algo.correction_bounds must be [lo, hi] with 0 <= lo < hi, got {bounds}")


def _check_data(data, found: _Found) -> None:
    found.need(data.on_bad_row in ("error", "skip") and data.on_too_long in ("error", "skip"),
               "data.on_bad_row / on_too_long must be 'error' or 'skip'")


def _check_train(tr, found: _Found) -> None:
    whole = tr.mini_batch_prompts <= tr.prompts_per_step and tr.prompts_per_step % max(tr.mini_batch_prompts, 1) == 0
    found.need(whole, f"train.prompts_per_step ({tr.prompts_per_step}) must be a multiple of train.mini_batch_prompts "
               f"({tr.mini_batch_prompts})")


def _check_checkpoint(ckpt, found: _Found) -> None:
    resume = ckpt.resume
    if resume.strip().lower() in RESUME_WORDS and resume not in RESUME_WORDS:
        found.errors.append(f"checkpoint.resume={resume!r}: write {resume.strip().lower()!r} (lower case, no "
                            "spaces); any other value is taken as a checkpoint directory")
    elif not resume.strip():
        found.errors.append("checkpoint.resume must be 'auto', 'never' or a checkpoint directory, got ''")


_SECTION_CHECKS = {"model": _check_model, "parallel": _check_parallel, "rollout": _check_rollout,
                   "algo": _check_algo, "data": _check_data, "train": _check_train, "checkpoint": _check_checkpoint}


# ------------------------------------------------------------------------------------------ across sections
def _check_world(config, world_size: Optional[int], layout_ok: bool, found: _Found) -> None:
    """The world size against tp * pp * cp, and a mini-batch's samples against the data-parallel size."""
    par, tr, n = config.parallel, config.train, config.rollout.n
    if world_size is None:
        return
    found.need(world_size >= 1, f"world size must be >= 1, got {world_size}")
    if world_size < 1 or not layout_ok:
        return
    model_parallel = par.tp * par.pp * par.cp
    found.need(world_size % model_parallel == 0, f"world size {world_size} is not a multiple of tp*pp*cp = "
               f"{par.tp}*{par.pp}*{par.cp} = {model_parallel}")
    dp = max(world_size // model_parallel, 1)
    found.need((tr.mini_batch_prompts * n) % dp == 0,
               f"a mini-batch of {tr.mini_batch_prompts} prompts x {n} samples does not split over "
               f"{dp} data-parallel ranks")


def _check_lengths(config, layout_ok: bool, found: _Found) -> None:
    """The overlong buffer fits the response length; the micro-batch budget holds one full (CP-padded) sequence."""
    par, ro, budget = config.parallel, config.rollout, config.optim.max_tokens_per_micro_batch
    found.need(config.algo.overlong_buffer <= ro.max_response_length,
               f"algo.overlong_buffer must be in [0, rollout.max_response_length={ro.max_response_length}]")
    if not layout_ok:
        return
    longest = ro.max_prompt_length + ro.max_response_length
    align = cp_alignment(par.cp, par.tp, par.sequence_parallel)
    padded = -(-longest // align) * align
    found.need(budget >= padded, f"optim.max_tokens_per_micro_batch ({budget}) must hold one full "
               f"sequence (rollout.max_prompt_length + max_response_length = {longest}"
               + (f", padded to a multiple of {align} for context parallelism = {padded}" if padded != longest else "")
               + ")")


def _check_training_inputs(config, found: _Found) -> None:
    """What ``train`` needs beyond ``eval`` / ``plan``: the initial weights and the prompts."""
    found.need(bool(config.model.hf_path), "model.hf_path is required (an HF Qwen2 checkpoint directory)")
    found.need(bool(config.data.train_files), "data.train_files is required")


def _check_model_shape(par, hf_config: Mapping[str, Any], found: _Found) -> None:
    """The model's heads and layers (HF ``config.json``) against tp and pp * vpp."""
    heads, kv = hf_config.get("num_attention_heads", 0), hf_config.get("num_key_value_heads", 0)
    layers = hf_config.get("num_hidden_layers", 0)
    found.need(heads % par.tp == 0, f"parallel.tp={par.tp} does not divide the model's {heads} attention heads")
    found.need(kv % par.tp == 0 or par.tp % kv == 0, f"parallel.tp={par.tp} and the model's {kv} KV heads "
               "must divide one another")
    found.need(layers % (par.pp * (par.vpp or 1)) == 0,
               f"the model's {layers} layers do not split into pp*vpp = {par.pp * (par.vpp or 1)} stages")


def find_problems(config, world_size: Optional[int] = None, hf_config: Optional[Mapping[str, Any]] = None,
                  *, for_training: bool = True) -> tuple[list[str], list[str]]:
    """Every problem of ``config`` (a ``megatron_fipo.config.schema.Config``); arguments as ``config.validate``.

    Returns:
        ``(errors, warnings)``: messages, each naming the setting to fix.
    """
    found = _Found()
    for section in (f.name for f in dataclasses.fields(config)):
        _ranges(config, section, found)
        if section in _SECTION_CHECKS:
            _SECTION_CHECKS[section](getattr(config, section), found)
    par = config.parallel
    layout_ok = min(par.tp, par.pp, par.cp, par.vpp or 2) >= 1  # else the checks below would divide by zero
    _check_world(config, world_size, layout_ok, found)
    _check_lengths(config, layout_ok, found)
    if for_training:
        _check_training_inputs(config, found)
    if hf_config is not None and layout_ok:
        _check_model_shape(par, hf_config, found)
    return found.errors, found.warnings

