"""How a training run is put together on each rank: built, resumed, synced, saved and closed here.

Owns ``check_inputs`` (the data and weight files, read before any process group starts),
``Run`` (one rank's actor, its ``weight_sync.WeightSync``, the counters and, on global rank 0,
the ``services.RolloutServices``), ``RunCounters`` (step and failure counts, changed in one
place: ``record``) with ``Skip`` (why a step kept no update), and ``build_run`` (fresh from the
HF model, or resumed from the latest complete checkpoint). Every collective names its group.
Composition only.
"""
from __future__ import annotations

import enum
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_fipo.config.conventions import servers_per_node
from megatron_fipo.data.batches import RankShare
from megatron_fipo.train.experience import split_balance
from megatron_fipo.train.ahead import IN_FLIGHT_FILE, RolloutAhead, load_in_flight, save_in_flight
from megatron_fipo.train.pool import POOL_FILE, RolloutPool, load_pool, save_pool
from megatron_fipo.train.services import RolloutServices, build_services, check_prompt_count
from megatron_fipo.train.weight_sync import WeightSync


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
class Run:
    """One rank's part of a training run: the actor, its weight sync, the counters and, on global rank 0,
    the rollout services. The config is held here only (rank 0's with the resolved stop tokens)."""

    config: Any
    groups: Any
    actor: Any
    sync: WeightSync
    checkpoint_root: str
    counters: RunCounters = field(default_factory=RunCounters)
    services: Optional[RolloutServices] = None
    """Global rank 0 only (the other ranks: None)."""
    dp_of_rank: list = field(default_factory=list)
    """The data-parallel rank of every global rank (who gets which share)."""
    ahead: Optional[RolloutAhead] = None
    """Global rank 0 with ``rollout.max_staleness`` >= 1 (without ``partial``): the producer generating future
    steps' experience."""
    pool: Optional[RolloutPool] = None
    """Global rank 0 with ``rollout.partial``: the groups in flight, carried from step to step (``train.pool``)."""

    @property
    def overlapped(self) -> bool:
        """Whole batches are generated ahead of training by rank 0's producer (every rank knows it: the config is
        the same everywhere)."""
        return self.config.rollout.max_staleness > 0 and not self.config.rollout.partial

    def hold_engine(self) -> None:
        """Before the engine's weights change or the trainer uses the engine, the loader or the reward pool:
        wait until rank 0's producer is idle (it stays idle until ``advance_engine``). Rank 0 only; a no-op
        without generation ahead."""
        if self.ahead is not None:
            self.ahead.hold()

    def advance_engine(self, done_step: int) -> None:
        """Step ``done_step`` is finished: the producer may generate the next steps (``train.ahead``)."""
        if self.ahead is not None:
            self.ahead.advance(done_step)

    # ------------------------------------------------------------------ collectives
    def scatter(self, exp, metrics: Optional[dict] = None) -> RankShare:
        """Rank 0's experience -> this rank's samples (identical within a model-parallel group).

        Each mini-batch is split over the data-parallel ranks by cost (``Experience.split`` on
        ``Experience.costs``: tokens plus attention at the model's hidden size). With ``dp_size > 1``, rank 0 adds
        ``train/dp_cost_max_over_mean`` (``experience.split_balance``) to ``metrics``.
        """
        payloads = None
        if self.groups.rank == 0:
            dp, costs = self.groups.dp_size, exp.costs(self.sync.arch.hidden_size)
            split = exp.split(self.config.train.mini_batch_prompts, dp, costs=costs)
            shares = exp.shares(split, dp)
            if metrics is not None and dp > 1 and split:
                metrics["train/dp_cost_max_over_mean"] = split_balance(costs, split)
            payloads = [shares[self.dp_of_rank[w]] for w in range(self.groups.world_size)]
        out = [None]
        dist.scatter_object_list(out, payloads, src=0, group=self.groups.world)
        return out[0]

    def global_tokens(self, share: RankShare) -> float:
        n = torch.tensor([float(share.num_tokens)])
        dist.all_reduce(n, group=self.groups.dp)
        return float(n.item())

    def release_engine(self) -> None:
        if self.services is not None and self.services.colocated:
            self.hold_engine()  # a colocated engine cannot generate while the actor trains
            if self.pool is not None:
                self.pool.interrupt()  # its unfinished samples continue after the training phase
            self.services.release()

    def resume_engine(self) -> None:
        if self.services is not None:
            self.services.resume()

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

    def sync_weights(self, version: int) -> float:
        """Stream the actor's weights to the engine as ``version`` (refused if not finite); returns seconds."""
        start = time.perf_counter()
        self.refuse_nonfinite(f"sync weight version {version} to the rollout engine")  # before the engine sees a byte
        if self.overlapped:  # no rank writes to a server before rank 0's producer has finished its requests
            self.hold_engine()
            dist.barrier(group=self.groups.world)
        if self.pool is not None and not self.config.rollout.inflight_updates:
            self.pool.interrupt()  # nothing runs while the weights change; the next collect continues them
        if self.config.rollout.partial and not self.config.rollout.inflight_updates:
            dist.barrier(group=self.groups.world)  # no rank writes to a server before rank 0 has interrupted it
        self.sync.push(self.services.engine if self.services is not None else None, version)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ persistence
    def save(self, step: int) -> str:
        self.refuse_nonfinite(f"save the step-{step} checkpoint", optimizer_state=True)
        self.hold_engine()  # the loader's position and the batches in flight must agree
        loader = self.services.loader if self.services is not None else None
        state = [{**self.counters.state_dict(), "step": step,
                  "loader": loader.state_dict() if loader is not None else None}]
        dist.broadcast_object_list(state, src=0, group=self.groups.world)  # every rank passes the same extra
        extra = {"hf_config": self.sync.hf_config, "hf_source": os.path.abspath(self.config.model.hf_path),
                 "trainer": state[0]}
        self.actor.steps = step  # the checkpoint directory is named after the training step
        files = {}
        if self.ahead is not None:  # the completed batches of the next steps, and nothing else, are in flight
            batches = self.ahead.in_flight()
            files[IN_FLIGHT_FILE] = lambda path: save_in_flight(path, batches)
        if self.pool is not None:  # every unfinished sample, with its tokens, log-probs, versions and seed
            self.pool.interrupt()
            pool_state = self.pool.state_dict()
            files[POOL_FILE] = lambda path: save_pool(path, pool_state)
        return self.actor.save(self.checkpoint_root, extra=extra, keep_last=self.config.checkpoint.keep_last,
                               rank0_files=files)

    def export_hf(self, out_dir: str) -> None:
        self.refuse_nonfinite(f"export the HF model to {out_dir}")
        self.sync.export_hf(out_dir, self.config.model.tokenizer or self.config.model.hf_path)

    def progress_bar(self, initial: int, total: int):
        from tqdm.auto import tqdm

        return tqdm(initial=initial, total=total, desc="train", unit="step", dynamic_ncols=True,
                    disable=self.groups.rank != 0 or not self.config.log.progress)

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close(timeout=0)  # no new batch; the engine's shutdown below ends the one running
        if self.pool is not None:
            self.pool.close()
        if self.services is not None:
            self.services.close()
        if self.ahead is not None:
            self.ahead.close()
        if self.sync.node_engine is not None:  # this node's colocated servers
            self.sync.node_engine.shutdown()
        if self.sync.stage_engine is not None and self.services is None:  # attached to rank 0's servers
            self.sync.stage_engine.shutdown()


def build_run(config, groups, hf_config: dict) -> Run:
    """Actor (from HF or the latest checkpoint), its weight sync, and on rank 0 the rollout services."""
    from megatron_fipo.mcore.actor import Actor, ActorSettings
    from megatron_fipo.mcore.model import Qwen2Arch

    arch = Qwen2Arch.from_hf(hf_config)
    actor = Actor(arch, groups, ActorSettings.from_sections(config.optim, config.model, config.parallel),
                  use_te=config.model.use_te)
    root = os.path.join(config.train.run_dir, "checkpoints")
    path = _resume_path(config.checkpoint.resume, root)
    nodes, node_engine, urls = _node_servers(config, groups)
    sync = WeightSync(actor, groups, arch, hf_config, params_dtype=config.model.params_dtype,
                      bucket_mb=config.rollout.bucket_mb, nodes=nodes, node_engine=node_engine,
                      by_stage=stage_senders(config, groups))
    run = Run(config, groups, actor, sync, root)
    try:
        trainer_state = _load_weights(config, actor, sync, path)
        run.counters = RunCounters.from_state(trainer_state)
        dp_of = [None] * groups.world_size
        dist.all_gather_object(dp_of, groups.dp_rank, group=groups.world)
        run.dp_of_rank = dp_of
        if groups.rank == 0:
            run.services, run.config = build_services(config, step=run.counters.step, trainer_state=trainer_state,
                                                      urls=urls)
        if sync.by_stage:
            sync.stage_engine = _stage_sender(config, groups, sync, run.services)
        if path is not None or config.model.init_checkpoint:
            run.sync_weights(version=run.counters.step)  # the engine started from the HF weights
        if config.rollout.partial and run.services is not None:
            run.pool = RolloutPool(run.services, run.config, dp_size=groups.dp_size,
                                   state=load_pool(trainer_state.get("checkpoint_dir")))
        if run.overlapped and run.services is not None:
            run.ahead = RolloutAhead(run.services, run.config, dp_size=groups.dp_size, done_step=run.counters.step,
                                     version=lambda: run.sync.version,
                                     restored=load_in_flight(trainer_state.get("checkpoint_dir")))
    except BaseException:
        run.close()
        raise
    return run


def stage_senders(config, groups) -> bool:
    """Disaggregated SGLang with pipeline stages: each stage sends its own layers to the servers."""
    return config.rollout.engine == "sglang" and config.rollout.mode == "disaggregated" and groups.pp_size > 1


def _stage_sender(config, groups, sync, services):
    """The engine that sends this rank's stage to the servers over the stage's own weight-update group: rank
    0's engine for stage 0, an engine attached to the same servers on the other stages' exporting TP rank 0,
    None elsewhere. Every rank learns the servers' URLs from rank 0."""
    from megatron_fipo.rollout.sglang_engine import SGLangEngine
    from megatron_fipo.rollout.sglang_weights import WEIGHT_GROUP

    urls = [services.engine.urls if services is not None else None]
    dist.broadcast_object_list(urls, src=0, group=groups.world)
    if groups.rank == 0:
        return services.engine
    if not (sync.exports and groups.tp_rank == 0):
        return None
    return SGLangEngine.from_config(config.model.hf_path, config.rollout, urls=tuple(urls[0]), sync_host=None,
                                    weight_group=f"{WEIGHT_GROUP}_stage{groups.pp_rank}")


def node_local_rollout(config) -> bool:
    """Colocated SGLang servers launched by the run: on every node, fed node-locally."""
    ro = config.rollout
    return ro.engine == "sglang" and ro.mode == "colocated" and not ro.urls


def _node_servers(config, groups) -> tuple:
    """``(NodeGroups, this node's engine or None, every server URL)`` for node-local rollouts; Nones otherwise.

    Each node's first rank launches ``rollout.servers_per_node`` servers (default: the node's GPUs /
    ``tp_size``) on its node's GPUs; the URLs of all nodes go to every rank. A node whose servers
    fail to start fails the run on every rank (no rank waits for a node that gave up).
    """
    if not node_local_rollout(config):
        return None, None, None
    from megatron_fipo.parallel.nodes import NodeGroups
    from megatron_fipo.rollout.sglang_engine import SGLangEngine

    ro = config.rollout
    nodes = NodeGroups(groups)
    if groups.rank == 0:  # where every rank runs (host, node, pid): for the operator, and the locality tests
        os.makedirs(config.train.run_dir, exist_ok=True)
        with open(os.path.join(config.train.run_dir, "ranks.json"), "w", encoding="utf-8") as fh:
            json.dump(nodes.records(), fh, indent=1)
    engine, status = None, None
    if nodes.is_leader:
        try:
            per_node = servers_per_node(ro.servers_per_node, int(ro.sglang_server_args()[0]), len(nodes.ranks))
            engine = SGLangEngine.from_config(config.model.hf_path, ro, replicas=per_node, urls=(), log_dir=os.path.join(
                config.train.run_dir, "sglang_logs", f"node{nodes.place.node}"))
        except Exception as err:  # noqa: BLE001 - every rank raises below
            status = f"node {nodes.place.node}: {type(err).__name__}: {err}"
    found = [None] * groups.world_size
    dist.all_gather_object(found, (status, engine.urls if engine is not None else []), group=groups.world)
    errors = [s for s, _ in found if s]
    if errors:
        if engine is not None:
            engine.shutdown()
        raise RuntimeError("colocated SGLang servers failed to start: " + "; ".join(errors))
    return nodes, engine, [u for _, urls in found for u in urls]


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


def _load_weights(config, actor, sync: WeightSync, path: Optional[tuple[str, str]]) -> dict:
    """The initial weights (HF, ``model.init_checkpoint``'s, or a checkpoint with its optimizer state);
    returns the checkpoint's trainer state (none for a fresh start)."""
    if path is None and config.model.init_checkpoint:
        from megatron_fipo.mcore.checkpoint import latest_checkpoint, resolve_checkpoint

        kind, where = resolve_checkpoint(config.model.init_checkpoint, hint=" as model.init_checkpoint")
        where = latest_checkpoint(where) if kind == "root" else where
        actor.load_weights(where)
        if sync.groups.rank == 0:
            print(f"started from the weights of {where}", flush=True)
        return {}
    if path is None:
        from megatron_fipo.bridge.hf_import import load_hf_into_chunks

        load_hf_into_chunks(config.model.hf_path, actor.named_local_parameters(), sync.arch,
                            tp_rank=sync.groups.tp_rank, tp_size=sync.groups.tp_size, padded_vocab=actor.padded_vocab,
                            layer_offsets=sync.offsets, spec=sync.spec)
        if actor.optimizer is not None:  # bf16: the optimizer's fp32 main copies were made from the random init
            actor.optimizer.reload_model_params()
        return {}
    kind, where = path
    loaded, extra = actor.load_latest(where) if kind == "root" else (where, actor.load(where))
    if sync.groups.rank == 0:
        print(f"resumed from {loaded} (step {extra.get('trainer', {}).get('step')})", flush=True)
    return {**extra.get("trainer", {}), "checkpoint_dir": loaded}


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
    HFCheckpoint(config.model.hf_path)  # every safetensors header readable (a truncated download fails here)

