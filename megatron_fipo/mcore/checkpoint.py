"""Atomic, resharding dist-checkpoints of the actor: model chunks, optimizer, scheduler, RNG, step.

Owns ``save_checkpoint``, ``load_checkpoint``, ``load_latest_checkpoint`` (a resume that falls
back past damaged checkpoints) and the layout of a root (on a file system shared by all ranks;
one writer per root); its reading side (``latest_checkpoint``, ``read_checkpoint_meta``, the
integrity record) lives in ``mcore.checkpoint_integrity`` and is re-exported here::

    root/iter_0000042/                        a megatron dist_checkpointing (torch_dist) dir
    root/iter_0000042/fipo_checkpoint.json    completion marker: step, extra, layout, contents,
                                              optimizer, params dtype, integrity record (size,
                                              small files' adler32)
    root/latest                               name of the newest complete dir (atomic replace)
    root/iter_0000043.tmp-<nonce>/            a save in progress or crashed: never loaded

Must not import: trainer, rollout, bridge (megatron.* is imported lazily, as in mcore/).

Saved as Megatron-LM does: the chunks' ``sharded_state_dict()`` under ``model`` (or ``model0``,
``model1``... with virtual stages), the optimizer's model-space ``sharded_state_dict`` (so
dist_checkpointing reshards TP / PP / DP), the scheduler's ``state_dict()``, ``iteration`` and
``extra`` (common, from rank 0), and per-rank RNG states (python, numpy, torch, CUDA, Megatron's
tracker) as a ``ShardedObject`` keyed by (pp, tp, dp-cp) rank.

The model, optimizer and RNG state put into a checkpoint, and its fixes for megatron-core with
torch AdamW (``fully_reshardable``, Adam's ``step``, priming), are ``mcore.checkpoint_state``'s.

Departs from upstream (megatron-core 0.16.1; docs/dependencies.md):
* The scheduler is reset before ``load_state_dict`` (upstream adds the saved step count).
* Atomic publication (``.tmp-*``, marker, rename, ``latest``), the integrity record, pruning and
  the fallback past damaged checkpoints are ours (upstream resumes from ``latest`` or fails).
* Loading runs under ``no_grad`` (the distributed optimizer copies into views of leaf parameters).
* The save runs in ``checkpoint_processes.bounded_save_processes``: no manager process for the write
  results, and its forked writers die with the trainer (nothing outlives a SIGKILLed trainer).
Not supported: async saves; loading optimizer state across kinds (plain <-> distributed).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
import warnings

import torch
import torch.distributed as dist

from megatron_fipo import quiet_warnings
from megatron_fipo.mcore.checkpoint_integrity import (  # noqa: F401  (re-exported: the reading side)
    LATEST, MARKER, MODEL_ONLY, TRAINING,
    _complete_dirs,
    checkpoint_contents,
    check_integrity,
    checkpoint_problem,
    integrity_record,
    latest_checkpoint,
    params_dtype_name,
    read_checkpoint_meta,
    resolve_checkpoint,
    resume_candidates,
)
from megatron_fipo.mcore.checkpoint_processes import bounded_save_processes
from megatron_fipo.mcore.checkpoint_state import (
    global_adam_step,
    load_model_state,
    load_optimizer_state,
    model_sharded_state_dict,
    optimizer_kind,
    optimizer_sharded_for_load,
    optimizer_sharded_for_save,
    prime_optimizer_state,
    rng_object,
    set_rng_state,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def checkpoint_dir_name(step: int) -> str:
    """``iter_{step:07d}``: the directory name of the checkpoint of ``step``."""
    return f"iter_{step:07d}"


# ------------------------------------------------------------------------------ save
def save_checkpoint(root: str, step: int, chunks: list, optimizer, scheduler, groups, *,
                    extra: dict | None = None, keep_last: int | None = None, rank0_files=None) -> str:
    """Save model chunks, optimizer, scheduler, RNG states, ``step`` and ``extra`` atomically.

    Collective: every rank passes the same ``root``, ``step``, ``extra`` and ``keep_last``. Without
    an ``optimizer`` the checkpoint is model-only (``contents: "model"``): the chunks' tensors in
    their dtype, ``step`` and ``extra``, no scheduler or RNG state.

    Args:
        root: checkpoint root (created if missing).
        step: optimizer steps taken (>= 0); the directory is ``iter_{step:07d}``.
        chunks: this rank's model chunks (``GPTModel`` or DDP-wrapped), one per virtual stage.
        optimizer: from ``get_megatron_optimizer``, or None.
        scheduler: ``OptimizerParamScheduler``, or None.
        groups: ``ParallelGroups`` of this process.
        extra: JSON-serialisable dict (data position, config hash...); rank 0's copy is kept.
        keep_last: keep this many complete checkpoints, the new one included (None: all).
        rank0_files: ``{file name: writer(path)}`` run on rank 0 into the checkpoint directory before
            it is published (covered by its integrity record), e.g. the batches in flight.

    Returns:
        the path of the complete checkpoint directory.

    Raises:
        ValueError: bad ``step`` / ``keep_last`` or non-JSON ``extra``.
        RuntimeError: on every rank when rank 0 could not publish (nothing is published).
    """
    _check_save_args(step, extra, keep_last)
    from megatron.core import __version__ as mcore_version
    from megatron.core import dist_checkpointing

    start = time.perf_counter()
    root = os.path.abspath(root)
    final = os.path.join(root, checkpoint_dir_name(step))
    tmp = _make_tmp_dir(final, groups)
    if groups.rank == 0:
        logger.info("saving checkpoint step %d to %s", step, final)
    if optimizer is not None:
        prime_optimizer_state(optimizer)  # a never-stepped distributed optimizer cannot save
    layout, adam_step = _layout(groups), global_adam_step(optimizer, groups)
    model_sd = model_sharded_state_dict(chunks)
    state = {**model_sd, "iteration": step, "extra": extra or {}}
    if optimizer is not None:
        state["rng_state"] = rng_object(groups)
        state["optimizer"] = optimizer_sharded_for_save(optimizer, model_sd)
        if scheduler is not None:
            state["opt_param_scheduler"] = scheduler.state_dict()
    with bounded_save_processes():
        dist_checkpointing.save(state, tmp)
    _on_rank0(lambda: [write(os.path.join(tmp, name)) for name, write in (rank0_files or {}).items()], groups)
    written = time.perf_counter()
    dist.barrier(group=groups.world)
    meta = {"format_version": FORMAT_VERSION, "step": step, "extra": extra or {}, "layout": layout,
            "contents": TRAINING if optimizer is not None else MODEL_ONLY, "params_dtype": params_dtype_name(chunks),
            "optimizer": optimizer_kind(optimizer), "adam_step": adam_step,
            "megatron_core": mcore_version, "saved_unix_time": round(time.time(), 3)}
    _on_rank0(lambda: _publish(root, tmp, final, {**meta, "files": integrity_record(tmp, skip=(MARKER,))},
                               keep_last), groups)
    if groups.rank == 0:
        logger.info("checkpoint step %d saved to %s in %.2f s (write %.2f s, layout %s)",
                    step, final, time.perf_counter() - start, written - start, layout)
    return final


def _check_save_args(step, extra, keep_last) -> None:
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be None or an int >= 1, got {keep_last!r}")
    try:
        json.dumps(extra or {})
    except (TypeError, ValueError) as err:
        raise ValueError(f"extra must be JSON-serialisable: {err}") from err


def _make_tmp_dir(final: str, groups) -> str:
    """Rank 0 creates ``final.tmp-<nonce>`` (its nonce broadcast); the others wait for it."""
    nonce = [uuid.uuid4().hex[:12]]
    dist.broadcast_object_list(nonce, src=0, group=groups.world)
    tmp = f"{final}.tmp-{nonce[0]}"
    _on_rank0(lambda: os.makedirs(tmp), groups)
    return tmp


def _on_rank0(fn, groups) -> None:
    """Run ``fn`` on rank 0; every rank raises RuntimeError if it failed there."""
    error = [None]
    if groups.rank == 0:
        try:
            fn()
        except Exception as err:  # reported on every rank below
            logger.exception("checkpoint finalisation failed")
            error = [f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(error, src=0, group=groups.world)
    if error[0] is not None:
        raise RuntimeError(f"checkpoint save failed on rank 0 (nothing published): {error[0]}")


def _publish(root: str, tmp: str, final: str, meta: dict, keep_last: int | None) -> None:
    """Rank 0, after every rank wrote: marker, rename to ``final``, update ``latest``, prune."""
    _write_atomic(os.path.join(tmp, MARKER), json.dumps(meta, indent=1, sort_keys=True))
    replaced = None
    if os.path.exists(final):  # re-saving a step (e.g. after resuming from an older one)
        replaced = f"{final}.replaced-{uuid.uuid4().hex[:12]}"
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_atomic(os.path.join(root, LATEST), os.path.basename(final) + "\n")
    if replaced:
        _remove(replaced)
    _prune(root, meta["step"], keep_last)


def _prune(root: str, step: int, keep_last: int | None) -> None:
    """Remove stale ``.tmp-*`` / ``.replaced-*`` dirs and all but ``keep_last`` complete ones.

    Only checkpoints older than ``step`` are pruned (never the one just saved, never newer
    ones left over from an abandoned run); the marker goes first, so a half-removed
    directory is never taken for complete. A damaged checkpoint (``checkpoint_problem``) does
    not count among the ``keep_last``: the intact older ones it would have pushed out stay,
    and it is left in place (for a look) until it is older than all of those.
    """
    for name in os.listdir(root):
        if ".tmp-" in name or ".replaced-" in name:
            _remove(os.path.join(root, name))
    if keep_last is None:
        return
    kept = 1  # the one just saved
    for old in sorted((s for s, _ in _complete_dirs(root) if s < step), reverse=True):
        path = os.path.join(root, checkpoint_dir_name(old))
        if kept >= keep_last:
            _remove(path)
        elif checkpoint_problem(path) is None:
            kept += 1


def _remove(path: str) -> None:
    if not os.path.isdir(path):  # e.g. a stale latest.tmp-* file
        with contextlib.suppress(OSError):
            os.remove(path)
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, MARKER))  # first: never a half-removed "complete" dir
    shutil.rmtree(path, ignore_errors=True)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


# ------------------------------------------------------------------------------ load
def load_checkpoint(path: str, chunks: list, optimizer, scheduler, groups, *,
                    load_optimizer: bool = True, load_rng: bool = True) -> tuple[int, dict]:
    """Load a checkpoint written by ``save_checkpoint`` at any TP / PP / DP layout (collective).

    dist_checkpointing reshards model and (model-space) optimizer state. RNG states are restored
    only when the (tp, pp, cp, dp) sizes are the saved ones (else one warning, on rank 0).
    Adam's ``step`` is set per parameter (own tensor) to the checkpointed value.

    Args:
        path: a checkpoint directory (e.g. ``latest_checkpoint(root)``).
        chunks, optimizer, scheduler, groups: as for ``save_checkpoint``; may be fresh.
        load_optimizer: restore the optimizer state (else only ``reload_model_params()``).
        load_rng: restore the RNG states (when the layout matches).

    Returns:
        (step, extra) as saved.

    Raises:
        ValueError: ``path`` missing, incomplete or damaged (its integrity record does not match).
        CheckpointMismatchError: its optimizer state is of another kind, or it is model-only and
            ``load_optimizer`` asks for a training state (nothing was loaded).
        Exception: whatever dist_checkpointing raises for a damaged checkpoint (model or
            optimizer state may then be partly overwritten: load another checkpoint).
    """
    meta = read_checkpoint_meta(path)
    problem = check_integrity(path, meta.get("files"))
    if problem is not None:
        raise ValueError(f"checkpoint {path} is damaged: {problem}; load another one (a checkpoint root "
                         "resumes from the newest loadable one)")
    from megatron.core import dist_checkpointing

    start = time.perf_counter()
    load_optimizer = load_optimizer and optimizer is not None
    model_only = checkpoint_contents(meta) == MODEL_ONLY
    if load_optimizer and model_only:
        raise CheckpointMismatchError(
            f"{path} is a model-only checkpoint (weights, no optimizer state: what convert --to-mcore "
            f"writes) and cannot be resumed; start a run from it with model.init_checkpoint={path}")
    model_sd = model_sharded_state_dict(chunks)
    state = dict(model_sd)
    if load_optimizer:
        _check_optimizer_kind(path, meta, optimizer)
        state["optimizer"] = optimizer_sharded_for_load(optimizer, model_sd)
    load_rng = load_rng and not model_only  # a model-only checkpoint holds no RNG state
    if load_rng and meta.get("layout") == _layout(groups):
        state["rng_state"] = rng_object(groups)
    elif load_rng and groups.rank == 0:
        warnings.warn(f"checkpoint layout {meta.get('layout')} differs from {_layout(groups)}: "
                      "RNG states are not restored", stacklevel=2)
    quiet_warnings.install()  # torch's deprecation notices of the load API that megatron-core calls
    with torch.no_grad():  # the distributed optimizer copies into views of leaf parameters
        loaded = dist_checkpointing.load(state, path)
        load_model_state(chunks, loaded)
        if load_optimizer:
            load_optimizer_state(optimizer, loaded["optimizer"], meta.get("adam_step"))
        elif optimizer is not None:
            optimizer.reload_model_params()
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.num_steps = 0  # upstream's load *adds* the saved steps to the current ones
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in state:
        set_rng_state(loaded["rng_state"])
    if groups.rank == 0:
        logger.info("checkpoint %s loaded in %.2f s (saved layout %s, now %s)", path,
                    time.perf_counter() - start, meta.get("layout"), _layout(groups))
    return int(loaded["iteration"]), dict(loaded.get("extra") or {})


def load_latest_checkpoint(root: str, chunks: list, optimizer, scheduler, groups, *,
                           load_optimizer: bool = True, load_rng: bool = True) -> tuple[str, int, dict] | None:
    """Load the newest loadable checkpoint under ``root``, skipping damaged ones (collective).

    Tries ``resume_candidates(root)`` in order (``latest`` first). One is skipped, with a warning
    naming it and the reason, when its integrity record does not match the files (checked
    before the load starts) or when its load raises on any rank. Every rank then moves on to the
    same next candidate (the outcome is exchanged over ``groups.world``); the next load
    overwrites model, optimizer, scheduler and RNG, so all of them, and the returned ``extra``,
    come from one checkpoint. Nothing is deleted.

    Args:
        root: checkpoint root.
        chunks, optimizer, scheduler, groups, load_optimizer, load_rng: as for ``load_checkpoint``.

    Returns:
        (path, step, extra) of the loaded checkpoint, or None when ``root`` holds no complete one.

    Raises:
        ValueError: every complete checkpoint failed (each named with its reason), or this run
            cannot use the checkpoint's optimizer state (``CheckpointMismatchError``).
    """
    candidates = resume_candidates(root)
    failures = []
    for path in candidates:
        reason = _agree(checkpoint_problem(path), groups)
        if reason is None:
            try:
                step, extra = load_checkpoint(path, chunks, optimizer, scheduler, groups,
                                              load_optimizer=load_optimizer, load_rng=load_rng)
                local = None
            except CheckpointMismatchError as err:
                local = _MISMATCH + str(err)
            except Exception as err:  # any damage dist_checkpointing meets; reported below
                local = f"load failed: {type(err).__name__}: {err}"
            reason = _agree(local, groups)
            if reason is None:
                if failures and groups.rank == 0:
                    logger.warning("resumed from %s, the newest loadable checkpoint", path)
                return path, step, extra
            if _MISMATCH in reason:
                raise CheckpointMismatchError(reason.split(_MISMATCH, 1)[1])
        failures.append(f"{os.path.basename(path)} ({reason})")
        if groups.rank == 0:
            warnings.warn(f"checkpoint {path} cannot be loaded and is skipped: {reason}. Trying an older "
                          "one; nothing is deleted", stacklevel=2)
    if failures:
        raise ValueError(f"no checkpoint under {root} can be loaded: {'; '.join(failures)}. Nothing was deleted: "
                         "move the damaged iter_* directories aside, or start afresh in another train.run_dir")
    return None


class CheckpointMismatchError(ValueError):
    """The checkpoint is intact but this run cannot load it as asked (an older one would not help)."""


_MISMATCH = "mismatch: "


def _agree(reason: str | None, groups) -> str | None:
    """Every rank's ``reason`` (None: fine) exchanged over ``groups.world``: the first one
    given, prefixed with its rank, or None when every rank is fine. The same on every rank."""
    reasons = [None] * groups.world_size
    dist.all_gather_object(reasons, reason, group=groups.world)
    bad = [(r, text) for r, text in enumerate(reasons) if text is not None]
    if not bad:
        return None
    rank, text = bad[0]
    return text if groups.world_size == 1 else f"rank {rank}: {text}"


def _check_optimizer_kind(path: str, meta: dict, optimizer) -> None:
    """CheckpointMismatchError unless the checkpoint's optimizer state is of ``optimizer``'s kind."""
    kind = optimizer_kind(optimizer)
    if kind != meta.get("optimizer"):
        raise CheckpointMismatchError(f"checkpoint {path!r} holds a {meta.get('optimizer')!r} optimizer state, "
                                      f"this run uses {kind!r}: pass load_optimizer=False")


def _layout(groups) -> dict:
    return {"tp": groups.tp_size, "pp": groups.pp_size, "cp": groups.cp_size, "dp": groups.dp_size}
