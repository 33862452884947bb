"""The actor's checkpoint methods (``save``, ``load``, ``load_weights``, ``load_latest``), over ``mcore.checkpoint``.

A mixin of ``mcore.actor.Actor``: it reads the actor's ``chunks``, ``optimizer``, ``scheduler``,
``groups`` and ``steps`` (the optimizer and scheduler are None for an actor built with
``trainable=False``, whose save is then model-only). Only megatron_fipo.mcore imports megatron.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple


class CheckpointMethods:
    def save(self, root: str, *, extra: Optional[Mapping[str, Any]] = None, keep_last: Optional[int] = None,
             rank0_files: Optional[Mapping[str, Any]] = None) -> str:
        """Atomic distributed checkpoint of model, optimizer, lr schedule, step and RNG (``mcore.checkpoint``),
        with rank 0's ``rank0_files`` (name -> writer) in the same directory; a model-only checkpoint
        (weights in ``params_dtype``, no optimizer state) when the actor is not ``trainable``."""
        from megatron_fipo.mcore.checkpoint import save_checkpoint

        return save_checkpoint(root, self.steps, self.chunks, self.optimizer, self.scheduler, self.groups,
                               extra=dict(extra or {}), keep_last=keep_last, rank0_files=rank0_files)

    def load(self, path: str, *, load_optimizer: bool = True) -> Dict[str, Any]:
        """Load a checkpoint saved at any tp / pp; returns its ``extra`` and restores ``steps``."""
        from megatron_fipo.mcore.checkpoint import load_checkpoint

        self.steps, extra = load_checkpoint(path, self.chunks, self.optimizer, self.scheduler, self.groups,
                                            load_optimizer=load_optimizer)
        return extra

    def load_weights(self, path: str) -> Dict[str, Any]:
        """Only the weights of checkpoint directory ``path`` (model-only or training, any tp / pp, any
        dtype: cast on load); optimizer state, lr schedule, ``steps`` and RNG stay as they are (a
        fresh start from these weights). Returns the checkpoint's ``extra``."""
        from megatron_fipo.mcore.checkpoint import load_checkpoint

        _, extra = load_checkpoint(path, self.chunks, None, None, self.groups, load_optimizer=False, load_rng=False)
        if self.optimizer is not None:
            self.optimizer.reload_model_params()  # main (fp32) copies of bf16 parameters follow them
        return extra

    def load_latest(self, root: str, *, load_optimizer: bool = True) -> Optional[Tuple[str, Dict[str, Any]]]:
        """Load the newest loadable checkpoint under ``root``, skipping damaged ones with a warning
        (``mcore.checkpoint.load_latest_checkpoint``); returns (its path, its ``extra``), or None
        when ``root`` holds none."""
        from megatron_fipo.mcore.checkpoint import load_latest_checkpoint

        found = load_latest_checkpoint(root, self.chunks, self.optimizer, self.scheduler, self.groups,
                                       load_optimizer=load_optimizer)
        if found is None:
            return None
        path, self.steps, extra = found
        return path, extra
