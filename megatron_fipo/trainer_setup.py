"""What a training run holds besides the loop: built, resumed, synced, evaluated, saved and closed here.

Owns ``check_inputs`` (the data and weight files, read before any process group starts),
``RunState`` (actor, engine, data, reward pool, logger of one rank), ``RunCounters`` (step and
failure counts, changed in one place) with ``Skip`` (why a step kept no update),
``build_run`` (fresh from the HF model, or resumed from the latest complete checkpoint),
``sync_weights`` (actor -> engine through the bridge's bucket stream), ``evaluate`` (Avg@k /
Cons@k / Pass@k with the engine) and the checkpoint / HF export calls. Composition only.
"""
from __future__ import annotations

import dataclasses
import enum
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_fipo.conventions import hf_dtype_name, torch_dtype
from megatron_fipo.data.batches import RankShare
from megatron_fipo.experience import PromptItem, evaluate_items
from megatron_fipo.rollout.engine import EngineError



class Skip(enum.Enum):
    """Why a step kept no update (its value: the warning's words)."""

    NOTHING_TO_TRAIN = "no prompt group with varying rewards was generated"
    NONFINITE_OLD_LOGP = "non-finite old log-probs"
    NONFINITE_UPDATE = "non-finite update"  # loss, gradient or update: the warning names which


@dataclass
class RunCounters:
    """Where a run stands: saved with every checkpoint, restored on resume."""

    step: int = 0
    """The last completed training step."""
    nonfinite_in_a_row: int = 0
    """Consecutive steps whose update was dropped as non-finite (``train.max_nonfinite_steps`` stops the run)."""
    nonfinite_total: int = 0
    """Every such step of the run (``train/nonfinite_skipped_total``)."""

    def record(self, skip: Optional[Skip]) -> None:
        """The one place the failure counters change, once per step: None when the update was kept.
        A step with nothing to train on is no failure, and does not end a run of failures either."""
        if skip is None:
            self.nonfinite_in_a_row = 0
        elif skip is not Skip.NOTHING_TO_TRAIN:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "nonfinite": self.nonfinite_in_a_row, "nonfinite_total": self.nonfinite_total}

    @classmethod
    def from_state(cls, state: dict) -> "RunCounters":
        return cls(state.get("step", 0), state.get("nonfinite", 0), state.get("nonfinite_total", 0))


@dataclass
class RunState:
    config: Any
    groups: Any
    arch: Any
    hf_config: dict
    actor: Any
    offsets: list
    spec: str
    checkpoint_root: str
    counters: RunCounters = field(default_factory=RunCounters)
    synced_version: int = 0  # weight version the engine holds
    engine: Any = None  # rank 0 only (the other ranks: None)
    tokenizer: Any = None
    loader: Any = None
    eval_items: list = field(default_factory=list)
    pool: Any = None
    logger: Any = None
    dp_of_rank: list = field(default_factory=list)
    sync_buffer: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ rank 0 callables for experience
    def draw(self, k: int):
        return self.loader.next_batch(k)

    def score(self, texts, ground_truths):
        return self.pool.score(self.config.algo.reward_fn, texts, ground_truths)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ collectives
    def scatter(self, exp) -> RankShare:
        """Rank 0's experience -> this rank's samples (identical within a model-parallel group)."""
        payloads = None
        if self.groups.rank == 0:
            cfg = self.config
            shares = [exp.share(cfg.train.mini_batch_prompts, self.groups.dp_size, r)
                      for r in range(self.groups.dp_size)]
            payloads = [shares[self.dp_of_rank[w]] for w in range(self.groups.world_size)]
        out = [None]
        dist.scatter_object_list(out, payloads, src=0, group=self.groups.world)
        return out[0]

    def global_tokens(self, share: RankShare) -> float:
        n = torch.tensor([float(share.num_tokens)])
        dist.all_reduce(n, group=self.groups.dp)
        return float(n.item())

    def engine_release(self) -> None:
        if self.engine is not None and self.config.rollout.mode == "colocated":
            self.engine.release()

    def engine_resume(self) -> None:
        if self.engine is not None and self.config.rollout.mode == "colocated":
            self.engine.resume()

    def refuse_nonfinite(self, what: str, *, optimizer_state: bool = False) -> None:
        """``RuntimeError`` on every rank, before anything is written or sent, if any rank holds a
        non-finite parameter (or, with ``optimizer_state``, optimizer tensor): the last line of
        defence behind the actor's update guard, so no checkpoint, sync or export carries NaN / inf."""
        from megatron_fipo.mcore.update_guard import agree_any

        local = self.actor.nonfinite_tensors(optimizer_state=optimizer_state)
        device = next(p for _, p in self.actor.named_local_parameters()).device
        if agree_any([bool(local)], self.groups, device)[0]:
            where = f"on rank {self.groups.rank}: {', '.join(local)}" if local else "on another rank"
            raise RuntimeError(f"refusing to {what}: non-finite tensors {where}. Nothing was published; the last "
                               f"good checkpoint is in {self.checkpoint_root}")

    # ------------------------------------------------------------------ persistence
    def save(self, step: int) -> str:
        self.refuse_nonfinite(f"save the step-{step} checkpoint", optimizer_state=True)
        state = [{**self.counters.state_dict(), "step": step,
                  "loader": self.loader.state_dict() if self.loader is not None else None}]
        dist.broadcast_object_list(state, src=0, group=self.groups.world)  # every rank passes the same extra
        extra = {"hf_config": self.hf_config, "hf_source": os.path.abspath(self.config.model.hf_path),
                 "trainer": state[0]}
        self.actor.steps = step  # the checkpoint directory is named after the training step
        return self.actor.save(self.checkpoint_root, extra=extra, keep_last=self.config.checkpoint.keep_last)

    def export_hf(self, out_dir: str) -> None:
        from megatron_fipo.bridge.hf_export import drain, export_hf_state, save_hf_checkpoint

        self.refuse_nonfinite(f"export the HF model to {out_dir}")
        if self.groups.dp_rank != 0 or self.groups.cp_rank != 0:
            dist.barrier(group=self.groups.world)
            return
        buckets = export_hf_state(self.actor.named_local_parameters(), self.arch, groups=self.groups,
                                  layer_offsets=self.offsets, dtype=torch_dtype(hf_dtype_name(self.hf_config)), spec=self.spec)
        if self.groups.rank == 0:
            save_hf_checkpoint(buckets, out_dir, self.hf_config, self.config.model.tokenizer or self.config.model.hf_path)
        else:
            drain(buckets)
        dist.barrier(group=self.groups.world)

    def progress_bar(self, initial: int, total: int):
        from tqdm.auto import tqdm

        return tqdm(initial=initial, total=total, desc="train", unit="step", dynamic_ncols=True,
                    disable=self.groups.rank != 0 or not self.config.log.progress)

    def close(self) -> None:
        for obj in (self.engine, self.pool, self.logger):
            if obj is not None:
                (getattr(obj, "shutdown", None) or obj.close)()
        self.engine = self.pool = self.logger = None


def sync_weights(s: RunState, version: int) -> float:
    """Stream the actor's weights to the engine (rank 0's model-parallel group exports); returns seconds."""
    from megatron_fipo.bridge.hf_export import drain, export_hf_state

    start = time.perf_counter()
    s.refuse_nonfinite(f"sync weight version {version} to the rollout engine")  # before the engine sees a byte
    if s.groups.dp_rank == 0 and s.groups.cp_rank == 0:
        dtype = torch_dtype(s.config.model.params_dtype)
        bucket_bytes = s.config.rollout.bucket_mb << 20
        if s.sync_buffer is None:  # one buffer for every bucket of every sync
            s.sync_buffer = torch.empty(bucket_bytes // dtype.itemsize, dtype=dtype,
                                        device=next(p for _, p in s.actor.named_local_parameters()).device)
        stream = export_hf_state(s.actor.named_local_parameters(), s.arch, groups=s.groups, layer_offsets=s.offsets,
                                 dtype=dtype, bucket_bytes=bucket_bytes, spec=s.spec, reuse_buffer=s.sync_buffer)
        if s.engine is not None:
            s.engine.update_weights(stream, version)
            if s.engine.weight_version != version:
                raise EngineError(f"the engine reports weight version {s.engine.weight_version} after syncing {version}")
        else:
            drain(stream)  # the other ranks of the group take part in the collectives
    dist.barrier(group=s.groups.world)
    s.synced_version = version
    return time.perf_counter() - start


def evaluate(s: RunState, cfg, step: int) -> dict:
    """Avg@k / Cons@k / Pass@k (k = ``eval.n``) of the engine's current weights on the eval set (rank 0)."""
    if s.groups.rank != 0 or not s.eval_items:
        return {}
    ev, start = cfg.eval, time.perf_counter()
    out, _ = evaluate_items(s.engine, s.eval_items, s.score, s.decode, n=ev.n, temperature=ev.temperature,
                            top_p=ev.top_p, max_new_tokens=ev.max_response_length or cfg.rollout.max_response_length,
                            stop_token_ids=cfg.rollout.stop_token_ids, seed=cfg.train.seed, progress=cfg.log.progress)
    out["time/eval_s"] = time.perf_counter() - start
    return out


def build_run(config, groups, hf_config: dict) -> RunState:
    """Actor (from HF or the latest checkpoint), and on rank 0 the engine, data, reward pool and logger."""
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch

    arch = Qwen2Arch.from_hf(hf_config)
    settings = ActorSettings.from_sections(config.optim, config.model, config.parallel)
    actor = Actor(arch, groups, settings, use_te=config.model.use_te)
    root = os.path.join(config.train.run_dir, "checkpoints")
    s = RunState(config, groups, arch, hf_config, actor, *actor.bridge_layout(), root)
    path = _resume_path(config.checkpoint.resume, root)
    trainer_state = _load_weights(s, path)
    s.counters = RunCounters.from_state(trainer_state)
    dp_of = [None] * groups.world_size
    dist.all_gather_object(dp_of, groups.dp_rank, group=groups.world)
    s.dp_of_rank = dp_of
    if groups.rank == 0:
        _build_rank0(s, config, trainer_state)
    if path is not None:
        sync_weights(s, version=s.counters.step)  # the engine started from the HF weights
    return s


def _resume_path(resume: str, root: str) -> Optional[tuple[str, str]]:
    """``checkpoint.resume`` -> None (start from HF), ``("root", R)`` (newest loadable checkpoint under R,
    falling back past damaged ones) or ``("dir", D)`` (exactly that checkpoint)."""
    from megatron_fipo.mcore.checkpoint import latest_checkpoint, resolve_checkpoint

    if resume == "never":
        if latest_checkpoint(root):
            raise ValueError(f"{root} already holds checkpoints and checkpoint.resume=never: choose another "
                             "train.run_dir, delete it, or resume (checkpoint.resume=auto / --resume)")
        return None
    if resume == "auto":
        return ("root", root) if latest_checkpoint(root) else None
    return resolve_checkpoint(resume, hint=", or checkpoint.resume=auto (this run's newest checkpoint)")


def _load_weights(s: RunState, path: Optional[tuple[str, str]]) -> dict:
    if path is None:
        from megatron_fipo.bridge.hf_import import load_hf_into_chunks

        load_hf_into_chunks(s.config.model.hf_path, s.actor.named_local_parameters(), s.arch,
                            tp_rank=s.groups.tp_rank, tp_size=s.groups.tp_size, padded_vocab=s.actor.padded_vocab,
                            layer_offsets=s.offsets, spec=s.spec)
        return {}
    kind, where = path
    loaded, extra = s.actor.load_latest(where) if kind == "root" else (where, s.actor.load(where))
    if s.groups.rank == 0:
        print(f"resumed from {loaded} (step {extra.get('trainer', {}).get('step')})", flush=True)
    return extra.get("trainer", {})


def _build_rank0(s: RunState, config, trainer_state: dict) -> None:
    from transformers import AutoTokenizer

    from megatron_fipo.algo.reward_pool import RewardPool
    from megatron_fipo.config import to_dict
    from megatron_fipo.rollout.cpu_engine import CPUEngine
    from megatron_fipo.tracking import MetricsLogger

    tr, ro = config.train, config.rollout
    s.tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or config.model.hf_path)
    if not ro.stop_token_ids:
        eos = s.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token: set rollout.stop_token_ids")
        s.config = config = dataclasses.replace(config, rollout=dataclasses.replace(ro, stop_token_ids=(int(eos),)))
    s.loader = _prompt_loader(config, s.tokenizer, config.data.train_files, tr.prompts_per_step)
    if trainer_state.get("loader"):
        s.loader.load_state_dict(trainer_state["loader"])
    if config.eval.files:
        s.eval_items = _items(config, s.tokenizer, config.eval.files)[:config.eval.max_problems]
    s.pool = RewardPool(tr.reward_workers, tr.reward_timeout_s)
    s.logger = MetricsLogger(tr.run_dir, resume_step=s.counters.step if trainer_state else None,
                             tensorboard=config.log.tensorboard, wandb_project=config.log.wandb_project,
                             config=to_dict(config))
    if ro.engine == "cpu":
        s.engine = CPUEngine(config.model.hf_path, max_batch_rows=ro.cpu_max_batch_rows)
    else:
        from megatron_fipo.rollout.sglang_engine import SGLangEngine

        s.engine = SGLangEngine.from_config(config.model.hf_path, ro, log_dir=os.path.join(tr.run_dir, "sglang_logs"))


def encode_items(files, tokenizer, *, max_prompt_tokens: int, on_bad_row: str, on_too_long: str) -> list:
    """Problem files -> ``PromptItem`` list (prompts through the tokenizer's chat template)."""
    from megatron_fipo.data.datasets import encode_prompts, load_problems

    problems = load_problems(files, on_bad_row=on_bad_row)
    ids = encode_prompts(problems, tokenizer, max_prompt_tokens=max_prompt_tokens, on_too_long=on_too_long)
    return [PromptItem(tuple(x), p.ground_truth, p.uid) for p, x in zip(problems, ids) if x is not None]


def _items(config, tokenizer, files) -> list:
    return encode_items(files, tokenizer, max_prompt_tokens=config.rollout.max_prompt_length,
                        on_bad_row=config.data.on_bad_row, on_too_long=config.data.on_too_long)


def _prompt_loader(config, tokenizer, files, batch_size: int):
    from megatron_fipo.data.datasets import PromptLoader

    items = _items(config, tokenizer, files)
    check_prompt_count(len(items), config, "prompts within rollout.max_prompt_length")
    return PromptLoader(items, batch_size=batch_size, seed=config.data.seed)


def check_inputs(config) -> None:
    """What a run reads, checked on every rank before any process group starts.

    The problem files (bad rows fail here, with file and row; under ``on_bad_row=skip`` the rank-0
    load warns later, once), enough distinct prompts for one step, and the safetensors headers of
    ``model.hf_path`` (a truncated download fails here, not after the model is built).
    """
    import warnings

    from megatron_fipo.bridge.hf_import import HFCheckpoint
    from megatron_fipo.data.datasets import load_problems

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problems = load_problems(config.data.train_files, on_bad_row=config.data.on_bad_row)
        if config.eval.files:
            load_problems(config.eval.files, on_bad_row=config.data.on_bad_row)
    check_prompt_count(len(problems), config, "usable problems")
    with HFCheckpoint(config.model.hf_path):
        pass


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
