"""Run configuration: frozen dataclasses, YAML + dotted overrides, validation before any process starts.

Owns the schema (``Config`` and its sections), ``load_config(path, overrides)``, ``apply_overrides``,
``validate(config, world_size=None)`` (the checks themselves, ``RANGES`` and ``cp_alignment`` live in
``config.checks`` and are re-exported here) and ``to_dict`` / ``save_config``. YAML is read with YAML 1.2
floats (``1e-6``). Must not import torch, megatron, sglang or any other project module except its stdlib-only
sibling ``checks``: it is read by ``plan`` on a laptop and by every launcher before anything heavy starts.

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

# Re-exported: these names were defined here before the checks moved (plan and the tests read them).
from megatron_fipo.config.checks import RANGES, RESUME_WORDS, REWARD_NAMES, cp_alignment, find_problems  # noqa: F401
from megatron_fipo.config.conventions import OptimConfig  # noqa: F401 (the optim section: one definition, shared with the actor)


@dataclass(frozen=True)
class ModelConfig:
    hf_path: str = ""  # HF Qwen2 checkpoint: the initial weights, architecture and tokenizer
    # A Megatron checkpoint (e.g. the model-only one of convert --to-mcore) whose weights a fresh run
    # starts from instead of hf_path's (optimizer, lr schedule and step start fresh); a resume ignores it.
    init_checkpoint: str = ""
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
    replicas: int = 1  # disaggregated: SGLang servers to launch (each with its own TP); colocated: see servers_per_node
    servers_per_node: Optional[int] = None  # colocated SGLang: servers on every node (default: GPUs per node / tp_size;
    # ignored when disaggregated: the launcher starts 8 / tp_size per rollout node)
    launcher: Sequence[str] = ()  # argv replacing `python -m sglang.launch_server` (e.g. megatron_fipo.rollout.cpu_server)
    urls: Sequence[str] = ()  # attach to running SGLang servers instead of launching
    sync_host: Optional[str] = None  # disaggregated weight sync: address servers reach rank 0 at (default: route to urls[0])
    max_restarts: int = 1
    cpu_max_batch_rows: int = 64
    max_staleness: int = 0  # generation may run this many weight versions ahead of training; 0 = synchronous
    stale_policy: str = "wait"  # k >= 1: "wait" (reproducible schedule, no sample older than k) or "drop"
    # the long tail (SGLang engine): a sample unfinished at the step boundary carries over to a later step
    partial: bool = False
    # disaggregated: a weight update pauses the servers in place and continues them; generation never drains
    inflight_updates: bool = False
    oversample: float = 1.0  # >= 1; > 1 needs partial: ceil(x * prompts_per_step) prompts in flight per step
    # SGLang servers with --enable-deterministic-inference: sampling_seed honoured, samples independent of routing
    # and batching (reproducible runs and resumes), at a throughput cost; the CPU engines always are
    deterministic: bool = False
    sglang: Mapping[str, Any] = field(default_factory=dict)  # SGLang server arguments, passed through

    def sglang_server_args(self) -> tuple:
        """``(tp_size, the other server arguments)`` of ``sglang`` (``tp_size``, or ``tp``; default 1), with
        ``enable_deterministic_inference`` when ``deterministic``."""
        args = dict(self.sglang)
        tp = args.pop("tp_size", args.pop("tp", 1))
        if self.deterministic is True:
            args["enable_deterministic_inference"] = True
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
    # decoupled rollout correction: a detached factor on the loss from pi_old / pi_rollout (docs/algorithm.md);
    # "auto": none when rollout.max_staleness is 0 (and rollout.partial off), token_tis when >= 1; or none, token_tis, token_mis,
    # seq_tis, seq_mis, geo_mis
    rollout_correction: str = "auto"
    correction_cap: float = 2.0  # C of token_tis / seq_tis
    correction_bounds: Sequence[float] = (0.5, 5.0)  # [lo, hi] kept by token_mis / seq_mis / geo_mis

    def resolved_correction(self, max_staleness: int) -> str:
        """The loss's ``rollout_correction`` mode: ``auto`` is ``none`` for synchronous rollouts
        (``rollout.max_staleness`` 0) and ``token_tis`` when generation may run ahead (>= 1)."""
        if self.rollout_correction != "auto":
            return self.rollout_correction
        return "token_tis" if max_staleness >= 1 else "none"

    def loss_kwargs(self, max_staleness: int = 0) -> dict:
        """The keyword arguments of ``algo.losses.fipo_policy_loss``, ``auto`` resolved for
        ``max_staleness`` (``rollout.max_staleness``; 0, synchronous, when omitted)."""
        names = ("use_influence", "drop_filter", "decay_rate", "clip_low", "clip_high", "dual_clip_c",
                 "future_kl_clip_ratio", "future_kl_clip_high_only", "safety_thresh", "negative_only_mask",
                 "correction_cap")
        out = {k: getattr(self, k) for k in names}
        out.update(rollout_correction=self.resolved_correction(max_staleness),
                   correction_bounds=tuple(float(b) for b in self.correction_bounds))
        return out


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

    def loss_kwargs(self) -> dict:
        """``algo.loss_kwargs`` with ``algo.rollout_correction: auto`` resolved by ``rollout.max_staleness``
        (``rollout.partial`` counts as 1: a carried sample's earlier tokens come from older weights)."""
        return self.algo.loss_kwargs(max(self.rollout.max_staleness, int(bool(self.rollout.partial))))


# ---------------------------------------------------------------------------------------------- validation
def validate(config: Config, world_size: Optional[int] = None, hf_config: Optional[Mapping[str, Any]] = None,
             *, for_training: bool = True) -> list[str]:
    """Check ``config`` (``checks.find_problems``); raise ``ValueError`` listing every problem, return warnings.

    Each section's ranges and own checks, in schema order, then the checks across sections.

    Args:
        config: the resolved config.
        world_size: number of training processes, checked against ``tp * pp * cp`` and the batch.
        hf_config: the model's HF ``config.json`` (heads and layers checked against tp / pp).
        for_training: also require what ``train`` needs (model path, data files).
    """
    errors, warnings = find_problems(config, world_size, hf_config, for_training=for_training)
    if errors:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))
    return warnings


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


def read_saved_config(path: str) -> dict:
    """The plain nested data a ``save_config`` file holds (not validated: an older run's file may lack
    keys added since)."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}
