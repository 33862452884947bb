"""Run configuration: frozen dataclasses, YAML + dotted overrides, validation before any process starts.

Owns the schema (``Config`` and its sections), ``load_config(path, overrides)``, ``apply_overrides``,
``validate(config, world_size=None)`` (``RANGES``: the allowed range of every numeric field, then the
cross-field checks) and ``to_dict`` / ``save_config``. YAML is read with YAML 1.2 floats (``1e-6``). Must not import torch,
megatron, sglang or any other project module: it is read by ``plan`` on a laptop and by every
launcher before anything heavy starts.

Departures: pass-through dicts (``model.transformer_overrides``, ``rollout.sglang``) are not
checked here; their owners (megatron-core, SGLang) validate them.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence


@dataclass(frozen=True)
class ModelConfig:
    hf_path: str = ""  # HF Qwen2 checkpoint: the initial weights, architecture and tokenizer
    tokenizer: Optional[str] = None  # default: hf_path
    params_dtype: str = "float32"  # "bfloat16" on GPU
    use_te: Optional[bool] = None  # Transformer Engine spec; default: when importable with CUDA
    transformer_overrides: Mapping[str, Any] = field(default_factory=dict)  # TransformerConfig fields
    recompute: Mapping[str, Any] = field(default_factory=dict)  # recompute_granularity / method / num_layers


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual pipeline chunks per stage (interleaved 1F1B)
    cp: int = 1
    sequence_parallel: bool = False
    backend: Optional[str] = None  # "nccl" with CUDA, else "gloo"


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "cpu"  # "cpu" (transformers) or "sglang"
    mode: str = "colocated"  # or "disaggregated" (SGLang on separate GPUs / nodes)
    n: int = 16  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_length: int = 2048
    max_response_length: int = 20480
    stop_token_ids: Sequence[int] = ()  # default: the tokenizer's eos
    bucket_mb: int = 512  # weight-sync bucket size
    replicas: int = 1  # SGLang servers (each with its own TP)
    urls: Sequence[str] = ()  # attach to running SGLang servers instead of launching
    sync_host: Optional[str] = None  # disaggregated weight sync: address servers reach rank 0 at (default: route to urls[0])
    max_restarts: int = 1
    cpu_max_batch_rows: int = 64
    sglang: Mapping[str, Any] = field(default_factory=dict)  # SGLang server arguments, passed through

    def sglang_server_args(self) -> tuple:
        """``(tp_size, the other server arguments)`` of ``sglang`` (``tp_size``, or ``tp``; default 1)."""
        args = dict(self.sglang)
        tp = args.pop("tp_size", args.pop("tp", 1))
        return tp, args


@dataclass(frozen=True)
class AlgoConfig:
    use_influence: bool = True  # False (with drop_filter: false): DAPO
    drop_filter: bool = True  # FIPO's sequence-drop filter; false for DAPO / GRPO (the release's vanilla loss)
    decay_rate: float = 32.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip_c: Optional[float] = 10.0  # None: no dual clip (GRPO)
    future_kl_clip_ratio: float = 0.2  # influence weight clipped to [1.0, 1.2]
    future_kl_clip_high_only: bool = True
    safety_thresh: float = 10.0
    negative_only_mask: bool = False
    reward_fn: str = "dapo_math"
    normalize_adv_std: bool = True  # False: Dr.GRPO
    overlong_buffer: int = 4096  # 0 disables the overlong penalty
    overlong_penalty_factor: float = 1.0
    dynamic_sampling: bool = True
    max_gen_rounds: int = 10
    filter_metric: str = "acc"  # "acc" or "score"
    on_exhausted: str = "train_short"  # or "error": what to do when max_gen_rounds leaves the batch short

    def loss_kwargs(self) -> dict:
        names = ("use_influence", "drop_filter", "decay_rate", "clip_low", "clip_high", "dual_clip_c",
                 "future_kl_clip_ratio", "future_kl_clip_high_only", "safety_thresh", "negative_only_mask")
        return {k: getattr(self, k) for k in names}


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_tokens_per_micro_batch: int = 24576  # >= one full prompt + response; a whole micro-batch (each CP rank: 1/cp)
    logprob_chunk_tokens: int = 4096


@dataclass(frozen=True)
class DataConfig:
    train_files: Sequence[str] = ()
    on_bad_row: str = "error"  # or "skip"
    on_too_long: str = "error"  # or "skip"
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 512
    mini_batch_prompts: int = 64
    seed: int = 1234
    run_dir: str = "runs/fipo"
    reward_workers: int = 4
    reward_timeout_s: float = 10.0
    max_nonfinite_steps: int = 3  # consecutive skipped steps before the run stops


@dataclass(frozen=True)
class EvalConfig:
    files: Sequence[str] = ()
    every_steps: int = 0  # 0: only at start / end
    at_start: bool = True
    at_end: bool = True
    n: int = 32
    temperature: float = 1.0
    top_p: float = 0.7
    max_response_length: Optional[int] = None  # default: rollout.max_response_length
    max_problems: Optional[int] = None


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    progress: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 50  # 0: only at the end
    keep_last: Optional[int] = 2
    resume: str = "auto"  # "auto" (latest complete checkpoint in run_dir), "never", or a checkpoint path
    export_hf: bool = True  # write run_dir/hf at the end


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ---------------------------------------------------------------------------------------------- validation
REWARD_NAMES = ("dapo_math", "boxed_math")  # algo.rewards.REWARD_FNS (a test keeps the two in step)
RESUME_WORDS = ("auto", "never")  # any other checkpoint.resume is a checkpoint directory


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
    "rollout.max_restarts": _ge(0), "rollout.cpu_max_batch_rows": _ge(1),
    "algo.decay_rate": _gt(0), "algo.clip_low": _unit(False), "algo.clip_high": _ge(0),
    "algo.dual_clip_c": ((lambda v: v > 1), "> 1 or null (no dual clip)"), "algo.future_kl_clip_ratio": _unit(False),
    "algo.safety_thresh": _gt(0), "algo.overlong_buffer": ((lambda v: v >= 0), ">= 0 (0 disables the penalty)"),
    "algo.overlong_penalty_factor": _ge(0), "algo.max_gen_rounds": _ge(1),
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


def _range_errors(config: Config) -> list[str]:
    out = []
    for name, (ok, what) in RANGES.items():
        section, key = name.split(".")
        value = getattr(getattr(config, section), key)
        if value is not None and not ok(value):
            out.append(f"{name} must be {what}, got {value!r}")
    return out


def validate(config: Config, world_size: Optional[int] = None, hf_config: Optional[Mapping[str, Any]] = None,
             *, for_training: bool = True) -> list[str]:
    """Ranges of every field, then cross-field checks; raises ``ValueError`` listing every problem, returns warnings.

    Args:
        config: the resolved config.
        world_size: number of training processes, checked against ``tp * pp * cp`` and the batch.
        hf_config: the model's HF ``config.json`` (heads and layers checked against tp / pp).
        for_training: also require what ``train`` needs (model path, data files).
    """
    errors, warnings = _range_errors(config), []
    par, ro, algo, tr = config.parallel, config.rollout, config.algo, config.train

    def need(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

    layout_ok = min(par.tp, par.pp, par.cp, par.vpp or 2) >= 1  # else the checks below would divide by zero
    need(par.vpp is None or par.pp >= 2, "parallel.vpp needs parallel.pp >= 2 (or vpp null)")
    need(par.backend in (None, "nccl", "gloo"), f"parallel.backend must be nccl, gloo or null, got {par.backend!r}")
    if par.sequence_parallel and par.tp == 1:
        warnings.append("parallel.sequence_parallel has no effect with parallel.tp=1")
    dp = None
    if world_size is not None:
        need(world_size >= 1, f"world size must be >= 1, got {world_size}")
    if world_size is not None and world_size >= 1 and layout_ok:
        model_parallel = par.tp * par.pp * par.cp
        need(world_size % model_parallel == 0, f"world size {world_size} is not a multiple of tp*pp*cp = "
             f"{par.tp}*{par.pp}*{par.cp} = {model_parallel}")
        dp = max(world_size // model_parallel, 1)
    need(ro.engine in ("cpu", "sglang"), f"rollout.engine must be 'cpu' or 'sglang', got {ro.engine!r}")
    need(ro.mode in ("colocated", "disaggregated"), f"rollout.mode must be colocated or disaggregated, got {ro.mode!r}")
    need(not (ro.engine == "cpu" and ro.mode != "colocated"), "rollout.engine=cpu runs colocated only")
    if ro.n == 1:
        warnings.append("rollout.n=1: every GRPO group has one sample, so every advantage is 0")
    need(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ro.stop_token_ids),
         f"rollout.stop_token_ids must be token ids (integers >= 0), got {list(ro.stop_token_ids)}")
    need(algo.overlong_buffer <= ro.max_response_length,
         f"algo.overlong_buffer must be in [0, rollout.max_response_length={ro.max_response_length}]")
    need(algo.reward_fn in REWARD_NAMES, f"algo.reward_fn must be one of {list(REWARD_NAMES)}, got {algo.reward_fn!r}")
    need(algo.filter_metric in ("acc", "score"), "algo.filter_metric must be 'acc' or 'score'")
    need(algo.on_exhausted in ("train_short", "error"), "algo.on_exhausted must be 'train_short' or 'error'")
    need(tr.mini_batch_prompts <= tr.prompts_per_step and tr.prompts_per_step % max(tr.mini_batch_prompts, 1) == 0,
         f"train.prompts_per_step ({tr.prompts_per_step}) must be a multiple of train.mini_batch_prompts "
         f"({tr.mini_batch_prompts})")
    if dp is not None:
        need((tr.mini_batch_prompts * ro.n) % dp == 0,
             f"a mini-batch of {tr.mini_batch_prompts} prompts x {ro.n} samples does not split over "
             f"{dp} data-parallel ranks")
    if layout_ok:
        errors += _budget_errors(config)
    errors += _choice_errors(config, for_training)
    if hf_config is not None and layout_ok:
        heads, kv = hf_config.get("num_attention_heads", 0), hf_config.get("num_key_value_heads", 0)
        layers = hf_config.get("num_hidden_layers", 0)
        need(heads % par.tp == 0, f"parallel.tp={par.tp} does not divide the model's {heads} attention heads")
        need(kv % par.tp == 0 or par.tp % kv == 0, f"parallel.tp={par.tp} and the model's {kv} KV heads "
             "must divide one another")
        need(layers % (par.pp * (par.vpp or 1)) == 0,
             f"the model's {layers} layers do not split into pp*vpp = {par.pp * (par.vpp or 1)} stages")
    if errors:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))
    return warnings


def _budget_errors(config: Config) -> list[str]:
    """The micro-batch token budget must hold one full (CP-padded) sequence."""
    par, ro, budget = config.parallel, config.rollout, config.optim.max_tokens_per_micro_batch
    longest = ro.max_prompt_length + ro.max_response_length
    align = cp_alignment(par.cp, par.tp, par.sequence_parallel)
    padded = -(-longest // align) * align
    if budget >= padded:
        return []
    return [f"optim.max_tokens_per_micro_batch ({budget}) must hold one full "
            f"sequence (rollout.max_prompt_length + max_response_length = {longest}"
            + (f", padded to a multiple of {align} for context parallelism = {padded}" if padded != longest else "")
            + ")"]


def _choice_errors(config: Config, for_training: bool) -> list[str]:
    """String settings with a fixed set of values, and what ``train`` needs."""
    out = []
    if config.data.on_bad_row not in ("error", "skip") or config.data.on_too_long not in ("error", "skip"):
        out.append("data.on_bad_row / on_too_long must be 'error' or 'skip'")
    if config.model.params_dtype not in ("float32", "bfloat16"):
        out.append("model.params_dtype must be float32 or bfloat16")
    resume = config.checkpoint.resume
    if resume.strip().lower() in RESUME_WORDS and resume not in RESUME_WORDS:
        out.append(f"checkpoint.resume={resume!r}: write {resume.strip().lower()!r} (lower case, no spaces); "
                   "any other value is taken as a checkpoint directory")
    elif not resume.strip():
        out.append("checkpoint.resume must be 'auto', 'never' or a checkpoint directory, got ''")
    if for_training and not config.model.hf_path:
        out.append("model.hf_path is required (an HF Qwen2 checkpoint directory)")
    if for_training and not config.data.train_files:
        out.append("data.train_files is required")
    return out


def cp_alignment(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """Under context parallelism every sequence is padded to a multiple of this many tokens.

    Megatron's load-balanced layout splits each sequence into ``2 * cp`` equal chunks; with sequence
    parallelism each rank's share must also split over the ``tp`` ranks. 1 without context parallelism.
    """
    if cp <= 1:
        return 1
    return 2 * cp * (tp if sequence_parallel else 1)


# ---------------------------------------------------------------------------------------------- loading
def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file (optional) + ``key=value`` dotted overrides -> a ``Config`` (not yet validated).

    Paths inside the YAML are taken relative to the working directory, like every CLI path.
    Numbers are read as YAML 1.2 reads them (``1e-6`` is a float, not PyYAML's string).
    """
    raw: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} " + ("is a directory" if os.path.isdir(path) else "does not exist"))
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[:err.start].count(b"\n") + 1
            raise ValueError(f"{path}: not UTF-8 text (byte {data[err.start]:#04x} on line {line})") from None
        raw = _parse_yaml(text, path) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return from_dict(apply_overrides(raw, overrides))


def _parse_yaml(text: str, where: str, *, file: bool = True):
    """``yaml.load`` with YAML 1.2 floats; a syntax error becomes ``where:line:column: problem`` (a file)
    or ``where: problem at column c`` (a one-line override value)."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem, ctx = err.problem or err.context, err.context_mark
        if err.problem and err.context and ctx is not None and file:  # e.g. "while scanning a simple key"
            problem += f" ({err.context} at line {ctx.line + 1}, column {ctx.column + 1})"
        if mark is None:
            raise ValueError(f"{where}: {problem}") from None
        if file:
            raise ValueError(f"{where}:{mark.line + 1}:{mark.column + 1}: {problem}") from None
        raise ValueError(f"{where}: {problem} (at column {mark.column + 1} of the value)") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: {' '.join(str(err).split())}") from None


_LOADER = None
_FLOAT_12 = r"""^[-+]?(?:(?:[0-9][0-9_]*)?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+)$"""


def _yaml_loader():
    """A ``SafeLoader`` that also reads ``1e-6`` / ``5E-4`` / ``-2e+3`` (no dot) as floats, as YAML 1.2 does."""
    global _LOADER
    if _LOADER is None:
        import re

        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT_12), list("-+0123456789."))
        _LOADER = Loader
    return _LOADER


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """``["parallel.tp=2", "algo.use_influence=false"]`` applied to a nested dict (values parsed as YAML)."""
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like section.key=value")
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_yaml(value, f"override {item!r}", file=False) if value.strip() else ""
    return out


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Nested plain data -> ``Config``; unknown keys raise ``ValueError`` with the closest valid name."""
    return _build(Config, raw, "")


def _build(cls, raw, where: str):
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = f"{where}{key}"
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            raise ValueError(f"unknown config key {name!r}" + (f"; did you mean '{where}{hint[0]}'?" if hint else
                             f"; valid keys: {sorted(fields)}"))
        ftype = fields[key].type
        sub = _SECTIONS.get(ftype) if cls is Config else None
        kwargs[key] = _build(sub, value or {}, f"{name}.") if sub else _coerce(value, ftype, name)
    return cls(**kwargs)


def _coerce(value, ftype: str, name: str):
    t = ftype.replace("Optional[", "").rstrip("]") if ftype.startswith("Optional[") else ftype
    if value is None:
        if ftype.startswith("Optional["):
            return None
        raise ValueError(f"{name} must not be null")
    if t == "bool" and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if t == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):  # no field means anything by inf / nan
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if t == "str" and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    if t.startswith("Sequence"):
        if isinstance(value, (str, int)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return tuple(value)
    if t.startswith("Mapping") and not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping, got {value!r}")
    return value


_SECTIONS = {f.type: f.default_factory for f in dataclasses.fields(Config)}


def to_dict(config: Config) -> dict:
    """Plain nested data (tuples as lists), loadable again by ``from_dict``."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=list))


def save_config(config: Config, path: str) -> None:
    """Write the resolved config as YAML (atomic)."""
    import yaml

    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(config), fh, sort_keys=False)
    os.replace(tmp, path)
