"""Run metrics: ``metrics.jsonl`` in the run directory, TensorBoard, and optionally wandb.

Owns ``MetricsLogger``. Used by the trainer on global rank 0 only. Must not import megatron,
sglang or the model code.

``metrics.jsonl`` holds one JSON object per step (``{"step": k, "train/reward_mean": ..., ...}``);
training and evaluation keys of the same step share one object. On resume the records after the
resumed step are dropped first, so a run killed and resumed leaves the same file as an
uninterrupted one (timing keys aside).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, Optional


class MetricsLogger:
    """Append per-step metrics to ``run_dir/metrics.jsonl`` and mirror them to TensorBoard / wandb.

    Args:
        run_dir: the run directory (created if missing).
        resume_step: the step a resumed run continues from: records with ``step > resume_step``
            are removed (they belong to the interrupted attempt); None starts a fresh file.
        tensorboard: write event files under ``run_dir/tensorboard``.
        wandb_project: log to this wandb project too (``wandb`` must be installed).
        config: the resolved config, recorded with wandb.
    """

    def __init__(self, run_dir: str, *, resume_step: Optional[int] = None, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, config: Optional[Mapping[str, Any]] = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._truncate(resume_step)
        self._tb = self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=
                                     None if resume_step is None else resume_step + 1)
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("log.wandb_project is set but wandb is not installed (pip install wandb)") from err
            self._wandb = wandb.init(project=wandb_project, dir=run_dir, config=dict(config or {}),
                                     resume="allow", id=os.path.basename(os.path.abspath(run_dir)))

    def _truncate(self, resume_step: Optional[int]) -> None:
        if resume_step is None or not os.path.exists(self.path):
            if resume_step is None and os.path.exists(self.path):
                os.replace(self.path, self.path + ".old")
            return
        with open(self.path, encoding="utf-8") as fh:
            keep = [line for line in fh if line.strip() and _step_of(line) <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(keep)
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one record (numbers only; non-finite values are kept as null in JSON)."""
        record = {"step": int(step)}
        for key, value in metrics.items():
            record[key] = _jsonable(value)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=False) + "\n")
            fh.flush()
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (or of ``run_dir/metrics.jsonl``)."""
    path = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line from a crash: dropped


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
