"""The FIPO training loop: composition of the actor, the rollout engine, the data and the algorithm.

Owns ``train(config)`` and the ``Trainer`` behind it. Per step: collect experience on global
rank 0 (generation rounds, rewards, overlong shaping, GRPO advantages, dynamic sampling:
``experience``), scatter each data-parallel rank its mini-batches (``data.batches.RankShare``),
pack each mini-batch once and compute its old log-probs on that packing for every mini-batch
before the first update (``Actor.prepare``; the trainer-vs-rollout mismatch is summed on the same
tokens), run one optimizer step per mini-batch with the
FIPO loss (DAPO / GRPO by settings), sync the weights to the engine, evaluate, log, checkpoint.
No tensor math here.

Rank roles: global rank 0 drives the engine, the reward pool, the data loader and the logs; the
ranks of its model-parallel group take part in the weight export (collectives); every rank
trains. Colocated engines release their memory while the actor trains.

Safety: a step whose old log-probs, loss, gradient or update are not finite is skipped (weights
and optimizer state untouched; a non-finite update is rolled back, ``mcore.update_guard``) with a
warning, counted and recorded (``train/nonfinite_*``); ``train.max_nonfinite_steps`` in a row stop
the run with an error before any checkpoint of the broken state is written. Checkpoint save,
weight sync and HF export refuse non-finite tensors outright (``Run.refuse_nonfinite``). Checkpoints (model, optimizer, scheduler, RNG,
data position, step) are atomic; ``checkpoint.resume=auto`` continues from the latest complete one
and reproduces the uninterrupted run on CPU (sampling seeds derive from the step). A stop file
(``<run_dir>/STOP``, or ``$FIPO_STOP_FILE``, which the sbatch launcher creates before the time
limit) ends the run after the current step with a checkpoint of it, so a requeue loses nothing.
SIGTERM ends it at once (after a checkpoint save in progress) with exit code 143: children are
stopped and reaped on the way out; children also die by themselves when the trainer is SIGKILLed.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from typing import Sequence

import torch

from megatron_fipo.config.schema import Config, save_config, validate
from megatron_fipo.train.experience import collect_experience
from megatron_fipo.config.hf_model import read_hf_config
from megatron_fipo.mcore.micro_batches import all_finite, reduce_mismatch
from megatron_fipo.rollout.engine import EngineError
from megatron_fipo.train.ahead import staleness_metrics
from megatron_fipo.train.pool import age_metrics, count_metrics, engine_metrics
from megatron_fipo.train.services import evaluate
from megatron_fipo.train.run import Run, Skip, build_run, check_inputs
from megatron_fipo.train.rundir import CONFIG_FILE, check_run_dir, eval_line_figures


STOP_FILE = "STOP"
"""Create ``<train.run_dir>/STOP`` to stop a run after its current step, with a checkpoint."""


def train(config: Config, allow_changed: Sequence[str] = ()) -> dict:
    """Run (or resume) a FIPO training run; returns the last step's metrics on rank 0 ({} elsewhere).

    ``allow_changed``: defining settings a resume may change (``train.rundir``); a complete run returns {}."""
    _SIGTERM.install()
    try:
        return _train(config, allow_changed)
    except Terminated:
        if os.environ.get("RANK", "0") == "0":
            print("megatron-fipo train: terminated by SIGTERM; reward workers and engine stopped, nothing half-"
                  "published; resume from the last checkpoint with --resume", file=sys.stderr, flush=True)
        raise
    finally:
        _SIGTERM.uninstall()


def _train(config: Config, allow_changed: Sequence[str] = ()) -> dict:
    from megatron_fipo.mcore import groups as G

    world = int(os.environ.get("WORLD_SIZE", "1"))
    messages = validate(config, world_size=world)  # the config alone first: errors before any file is read
    rank = int(os.environ.get("RANK", "0"))
    complete = check_run_dir(config, allow_changed, rank=rank)  # refuses changed defining settings (exit 2)
    if complete is not None:
        if rank == 0:
            print(complete, flush=True)
        return {}
    hf_config = read_hf_config(config.model.hf_path, hint=" (model.hf_path must be an HF Qwen2 checkpoint directory)")
    validate(config, world_size=world, hf_config=hf_config)  # heads / layers against tp / pp
    check_inputs(config)  # data rows, prompts per step, safetensors headers: before any process group
    for message in messages:
        warnings.warn(message, stacklevel=2)
    G.single_process_env()
    par = config.parallel
    groups = G.init_distributed(tp=par.tp, pp=par.pp, vpp=par.vpp, cp=par.cp, seed=config.train.seed,
                                backend=par.backend)
    trainer = None
    try:
        trainer = Trainer(config, groups, hf_config)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        G.destroy()


class Terminated(SystemExit):
    """SIGTERM during ``train``: unwinds through every ``finally`` (reward workers, engine and process
    groups are closed, children reaped) and exits with 128 + 15 = 143 and no traceback."""


class _SigtermGuard:
    """Turns the first SIGTERM (main thread only) into ``Terminated``; during ``deferred()`` (a
    checkpoint being saved) it is raised once the save is over, so a save is never cut off halfway."""

    def __init__(self):
        self.previous, self.deferring, self.pending = None, False, False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous, self.deferring, self.pending = signal.signal(signal.SIGTERM, self._handle), False, False

    def uninstall(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

    def _handle(self, signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: the cleanup must not be cut short
        if self.deferring:
            self.pending = True
            return
        raise Terminated(128 + signum)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending:
            raise Terminated(128 + signal.SIGTERM)


_SIGTERM = _SigtermGuard()


class Trainer:
    """One rank's part of a run (see the module docstring); ``run()`` is the loop."""

    def __init__(self, config: Config, groups, hf_config: dict):
        self.groups = groups
        self.s: Run = build_run(config, groups, hf_config)  # its config: this one with resolved stop tokens
        services = self.s.services
        self._mark = self._counters() if services is not None and hasattr(services.engine, "stream_stats") else None
        path = os.path.join(config.train.run_dir, CONFIG_FILE)
        if groups.rank == 0 and (self.s.counters.step == 0 or not os.path.isfile(path)):
            save_config(self.s.config, path)  # once: a resume never rewrites what the checkpoints were made with

    def run(self) -> dict:
        cfg, s, counters = self.s.config, self.s, self.s.counters
        last: dict = {}
        last_save_s = None
        if counters.step == 0 and cfg.eval.at_start:
            start_eval = evaluate(s.services, cfg)
            self._print_eval(0, start_eval)
            self._log(0, start_eval)
        s.advance_engine(counters.step)  # generation ahead of training (rollout.max_staleness >= 1) may start
        bar = s.progress_bar(initial=counters.step, total=cfg.train.steps)
        while counters.step < cfg.train.steps:
            step = counters.step + 1
            start = time.perf_counter()
            metrics = self._train_step(step)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 or step == cfg.train.steps and cfg.eval.at_end:
                s.hold_engine()
                metrics.update(evaluate(s.services, cfg))
                self._print_eval(step, metrics)
            counters.step = step
            metrics["time/step_s"] = time.perf_counter() - start
            metrics["perf/tokens_per_s"] = metrics.pop("train/_tokens", 0.0) / metrics["time/step_s"]
            if "train/_samples" in metrics:  # rollout.partial: trained samples per second
                metrics["perf/samples_per_s"] = metrics.pop("train/_samples") / metrics["time/step_s"]
            if last_save_s is not None:  # the checkpoint written after the previous step
                metrics["time/save_s"], last_save_s = last_save_s, None
            self._log(step, metrics)  # before the checkpoint: a checkpoint never exists without its step's record
            stop = self._stop_requested()
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 or step == cfg.train.steps or stop:
                last_save_s = self._save(step)
            if not stop:
                s.advance_engine(step)
            last = metrics
            bar.update(1)
            bar.set_postfix(reward=f"{metrics.get('train/reward_mean', float('nan')):.3f}",
                            acc=f"{metrics.get('train/acc_mean', float('nan')):.3f}")
            if stop and step < cfg.train.steps:
                if self.groups.rank == 0:
                    print(f"stop requested ({stop}): stopped after step {step} with its checkpoint in "
                          f"{s.checkpoint_root}; resume with --resume", flush=True)
                break
        bar.close()
        if cfg.checkpoint.export_hf and counters.step == cfg.train.steps:  # not for a run stopped early
            s.export_hf(os.path.join(cfg.train.run_dir, "hf"))
        return last if self.groups.rank == 0 else {}

    # ------------------------------------------------------------------ one step
    def _train_step(self, step: int) -> dict:
        cfg, s, g = self.s.config, self.s, self.groups
        metrics: dict = {}
        exp = None
        services = s.services
        if s.pool is not None:  # global rank 0 with rollout.partial: the first groups to complete
            version = s.sync.version
            exp = s.pool.collect(step)
            metrics.update(exp.metrics)
            metrics["train/_samples"] = float(len(exp.prompts))
        elif s.ahead is not None:  # global rank 0, generating ahead: this step's batch is done or being generated
            exp, waited = s.ahead.take(step)
            exp, staleness = staleness_metrics(exp, s.sync.version, cfg.rollout.max_staleness, g.dp_size)
            metrics.update({**exp.metrics, **staleness, "time/wait_rollout_s": waited})
        elif services is not None:  # global rank 0
            if services.engine.weight_version != s.sync.version:
                raise EngineError(f"the engine holds weight version {services.engine.weight_version}, the actor "
                                  f"synced {s.sync.version}: a weight update was lost")
            exp = collect_experience(services.engine, services.draw, services.score, services.decode, cfg, step,
                                     dp_size=g.dp_size, progress=cfg.log.progress, submit=services.submit_score)
            metrics.update(exp.metrics)
        share = s.scatter(exp, metrics)  # this data-parallel rank's samples, per mini-batch (and the split's balance)
        if not share.num_samples:
            return self._skip(step, metrics, Skip.NOTHING_TO_TRAIN)
        s.release_engine()
        t = time.perf_counter()  # every mini-batch's old log-probs before the first update: the old policy's
        prepared = [s.actor.prepare(mb) for mb in share.mini_batches]
        metrics["time/old_logp_s"] = time.perf_counter() - t
        metrics.update(reduce_mismatch(prepared, g))
        if not all_finite(prepared, g):
            s.resume_engine()
            s.sync_weights(version=s.sync.version)  # a released engine may have dropped its weights
            return self._skip(step, metrics, Skip.NONFINITE_OLD_LOGP)
        t = time.perf_counter()
        per_mb = [s.actor.train_step(p, cfg.loss_kwargs()) for p in prepared]
        metrics["time/train_s"] = time.perf_counter() - t
        metrics.update(_mean_metrics(per_mb))
        metrics["train/_tokens"] = s.global_tokens(share)
        s.resume_engine()
        why = _nonfinite_reasons(per_mb)
        s.counters.record(Skip.NONFINITE_UPDATE if why else None)
        if why:  # those updates were not kept (mcore.update_guard): counted like the other non-finite skips
            if g.rank == 0:
                skipped = sum(m.get("skipped", 0.0) for m in per_mb)
                warnings.warn(f"step {step}: {skipped:.0f} of {len(per_mb)} optimizer step(s) skipped ({why}); "
                              "weights and optimizer state unchanged by them", stacklevel=2)
            self._stop_if_failing(step, why)
        metrics["time/sync_s"] = s.sync_weights(version=step)
        metrics["train/nonfinite_skipped_total"] = float(s.counters.nonfinite_total)
        if s.pool is not None:
            metrics.update(age_metrics(exp, version, cfg.rollout.max_staleness))
        if self._mark is not None:
            metrics.update(self._engine_metrics())
        return metrics

    def _counters(self) -> tuple:
        pool = self.s.pool
        return self.s.services.engine.stream_stats(), dict(pool.counts) if pool is not None else None

    def _engine_metrics(self) -> dict:
        """The SGLang engine's figures (and the pool's counts) since the previous step's end (``train.pool``)."""
        engine = self.s.services.engine
        before, self._mark = self._mark, self._counters()
        out = engine_metrics(before[0], self._mark[0], engine.slots_per_server)
        if before[1] is not None:
            out.update(count_metrics(before[1], self._mark[1]))
        return out

    def _skip(self, step: int, metrics: dict, why: Skip) -> dict:
        self.s.counters.record(why)
        if why is not Skip.NOTHING_TO_TRAIN:
            self._stop_if_failing(step, why.value)
        if self.groups.rank == 0:
            warnings.warn(f"step {step}: skipped ({why.value}); weights unchanged", stacklevel=2)
        metrics.update({"train/skipped": 1.0, "train/nonfinite_skipped_total": float(self.s.counters.nonfinite_total)})
        return metrics

    def _stop_if_failing(self, step: int, why: str) -> None:
        counters, limit = self.s.counters, self.s.config.train.max_nonfinite_steps
        if counters.nonfinite_in_a_row >= limit:
            raise RuntimeError(f"step {step}: {why} in {counters.nonfinite_in_a_row} consecutive steps "
                               f"(train.max_nonfinite_steps={limit}); stopping. The last good checkpoint is in "
                               f"{self.s.checkpoint_root}; lower optim.lr or check the data.")

    def _stop_requested(self) -> str:
        """The stop file that asks this run to stop after the current step (consumed), or ''; same on every rank.

        ``<train.run_dir>/STOP``, or the file named by ``$FIPO_STOP_FILE`` (the sbatch launcher sets
        it and creates the file shortly before the time limit).
        """
        found = ""
        if self.groups.rank == 0:
            for path in (os.environ.get("FIPO_STOP_FILE"), os.path.join(self.s.config.train.run_dir, STOP_FILE)):
                if path and os.path.exists(path):
                    found = found or path
                    os.remove(path)
        flag = [found]
        torch.distributed.broadcast_object_list(flag, src=0, group=self.groups.world)
        return flag[0]

    def _save(self, step: int) -> float:
        t = time.perf_counter()
        with _SIGTERM.deferred():
            self.s.save(step)
        return time.perf_counter() - t

    def _print_eval(self, step: int, metrics: dict) -> None:
        """One console line per held-out evaluation (rank 0), as it happens: the trajectory metrics.jsonl records."""
        figures = eval_line_figures(metrics)
        if self.groups.rank == 0 and figures:
            print(f"held-out step {step}: {figures}", flush=True)

    def _log(self, step: int, metrics: dict) -> None:
        if self.s.services is not None:
            self.s.services.logger.log(step, metrics)

    def close(self) -> None:
        self.s.close()


def _nonfinite_reasons(per_mb: list) -> str:
    """Why mini-batch updates of a step were not kept ('' when all were): the actor's ``nonfinite_*`` flags."""
    reasons = {"nonfinite_loss": "a non-finite loss", "nonfinite_grad": "a non-finite gradient",
               "nonfinite_update": "a non-finite update (rolled back)"}
    found = [text for key, text in reasons.items() if any(m.get(key, 0.0) for m in per_mb)]
    if not found and any(m.get("skipped", 0.0) for m in per_mb):
        found = ["an optimizer step Megatron reported unsuccessful"]
    return " and ".join(found)


def _mean_metrics(per_mb: list) -> dict:
    """Mini-batch metrics -> step metrics: means (maxima for ``*_max``), ``train/`` prefixed."""
    if not per_mb:
        return {}
    out = {}
    for key in per_mb[0]:
        values = [m[key] for m in per_mb if key in m]
        out[f"train/{key}"] = max(values) if key.endswith("_max") else sum(values) / len(values)
    out["train/optimizer_steps"] = float(len(per_mb))
    return out
