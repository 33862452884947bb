"""The megatron-core and torch state a checkpoint holds: model, optimizer and RNG, and its fixes.

Owns what ``mcore.checkpoint`` saves and restores inside one checkpoint directory: the model
chunks' sharded state dicts (``model_sharded_state_dict`` / ``load_model_state``), the optimizer's
model-space sharded state for save and load (``optimizer_sharded_for_save`` /
``optimizer_sharded_for_load`` / ``load_optimizer_state``), its kind (``optimizer_kind``), the
priming of a fresh torch Adam (``prime_optimizer_state``), Adam's ``step`` (``global_adam_step``,
restored by ``load_optimizer_state``) and the per-rank RNG states (``rng_object`` /
``set_rng_state``). Where files go, their publication and which checkpoint is loaded are
``mcore.checkpoint``'s.

Must not import: ``mcore.checkpoint``, ``mcore.checkpoint_integrity``, trainer, rollout, bridge
(megatron.* is imported lazily, as in mcore/).

Departs from upstream (megatron-core 0.16.1 with torch AdamW; docs/dependencies.md):
* Distributed optimizer: ``fully_reshardable`` (the default sharding type cannot save torch
  AdamW state; ``dp_reshardable`` works on CPU too but cannot change TP / PP). Its NCCL gather
  allocates on ``torch.cuda.current_device()``, so without CUDA the gloo ("mem_efficient")
  gather is used (optimizer state written by DP rank 0). Its load copies a ``step`` the
  checkpoint tensors never hold (KeyError: 'step'): the parameter state is loaded apart.
* Adam's ``step`` is saved by us (``adam_step``) and set after every load as one tensor per
  parameter: upstream loads one tensor shared by all parameters (torch Adam then increments
  it once per parameter per step), and the distributed optimizer's dp_reshardable load takes
  it from the fresh optimizer. Optimizers are primed (state + per-parameter ``step``) before
  saving and loading.
"""
from __future__ import annotations

import random

import torch
import torch.distributed as dist

from megatron_fipo.mcore.update_guard import inner_optimizers

DISTOPT_SHARDING = "fully_reshardable"


# ------------------------------------------------------------------------------ model
def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _model_keys(n_chunks: int) -> list[str]:
    """``["model"]`` for one chunk, ``["model0", "model1", ...]`` for virtual stages."""
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


def model_sharded_state_dict(chunks: list) -> dict:
    """Every chunk's ``sharded_state_dict()`` under its key (``model``, or ``model0``, ``model1``...)."""
    return {key: _unwrap(c).sharded_state_dict() for key, c in zip(_model_keys(len(chunks)), chunks)}


def load_model_state(chunks: list, loaded: dict) -> None:
    """Load each chunk's state from ``loaded`` (keyed as ``model_sharded_state_dict``)."""
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        _unwrap(chunk).load_state_dict(loaded[key])


# ------------------------------------------------------------------------------ optimizer
def _inner(optimizer) -> list:
    """The Megatron optimizers inside a (chained) optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_kind(optimizer) -> str | None:
    """None, "plain" (``FP32Optimizer`` & co.) or "distributed" (``DistributedOptimizer``)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if optimizer is None:
        return None
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in _inner(optimizer)) \
        else "plain"


def _optimizer_metadata(kind: str | None) -> dict:
    if kind != "distributed":
        return {}
    return {"distrib_optim_sharding_type": DISTOPT_SHARDING, "chained_optim_avoid_prefix": True,
            # The NCCL gather of the fully_reshardable save needs CUDA; gloo otherwise.
            "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


def _adam_states(optimizer):
    """Per-parameter state dicts of the torch optimizers inside ``optimizer``."""
    for inner in inner_optimizers(optimizer) if optimizer is not None else []:
        yield from inner.state.values()


def global_adam_step(optimizer, groups) -> float | None:
    """Max over ranks of torch Adam's per-parameter ``step`` (None: no step taken anywhere)."""
    local = max((float(s["step"]) for s in _adam_states(optimizer) if "step" in s), default=-1.0)
    value = torch.tensor(local, dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=groups.world)
    return None if value.item() < 0 else value.item()


def prime_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam its state (and a per-parameter ``step``) so it can be saved or loaded into."""
    for opt in _inner(optimizer):
        inner, init = getattr(opt, "optimizer", None), getattr(opt, "init_state_fn", None)
        if inner is None or init is None:
            continue
        init(inner, opt.config)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for state in inner.state.values():
                state.setdefault("step", torch.tensor(0.0))


def optimizer_sharded_for_save(optimizer, model_sd: dict) -> dict:
    """The optimizer's model-space sharded state dict to save (``model_sd``: the model's)."""
    state = optimizer.sharded_state_dict(
        model_sd, is_loading=False, metadata=_optimizer_metadata(optimizer_kind(optimizer)))
    for part in _per_optimizer(optimizer, state):
        if "param_state" in part and part["param_state"] is None:
            del part["param_state"]  # gathered to DP rank 0 only (gloo): not common state
    return state


def optimizer_sharded_for_load(optimizer, model_sd: dict) -> dict:
    """The optimizer's model-space sharded state dict to load into (the optimizer is primed first)."""
    prime_optimizer_state(optimizer)  # a fresh optimizer has no state to load into
    return optimizer.sharded_state_dict(model_sd, is_loading=True,
                                        metadata=_optimizer_metadata(optimizer_kind(optimizer)))


def _per_optimizer(optimizer, state) -> list:
    """The parts of a (chained) optimizer state dict, one per inner optimizer."""
    return [state] if len(_inner(optimizer)) == 1 else [state[k] for k in sorted(state)]


def load_optimizer_state(optimizer, state, adam_step: float | None) -> None:
    """``optimizer.load_state_dict(state)``, then Adam's ``step`` set to ``adam_step`` (as saved).

    A fully_reshardable parameter state is loaded apart, with ``step`` out of the way (upstream
    copies every state key from the checkpoint tensors, which have no ``step``: KeyError).
    """
    pending = []
    for opt, part in zip(_inner(optimizer), _per_optimizer(optimizer, state)):
        if part.get("param_state_sharding_type") == "fully_reshardable" and "param_state" in part:
            pending.append((opt, part.pop("param_state")))
    optimizer.load_state_dict(state)
    for opt, param_state in pending:
        states = list(opt.optimizer.state.values())
        steps = [s.pop("step", None) for s in states]
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for s, step in zip(states, steps):
            if step is not None:
                s["step"] = step
    _set_adam_step(optimizer, adam_step)


def _set_adam_step(optimizer, value: float | None) -> None:
    """One ``step`` tensor per parameter, holding the checkpointed value (never shared)."""
    if value is None:
        return
    for state in _adam_states(optimizer):
        old = state.get("step")
        if torch.is_tensor(old):
            state["step"] = torch.tensor(value, dtype=old.dtype, device=old.device)


# ------------------------------------------------------------------------------ RNG
def rng_object(groups):
    """This rank's RNG states as a ShardedObject of global shape (pp, tp, dp-cp)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", _rng_state(),
                         (groups.pp_size, groups.tp_size, groups.dp_cp_size),
                         (groups.pp_rank, groups.tp_rank, groups.dp_cp_rank), replica_id=0)


def _rng_state() -> dict:
    import numpy as np  # a megatron-core dependency
    from megatron.core import tensor_parallel

    state = {"random": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the RNG states ``rng_object`` saved (python, numpy, torch, Megatron's tracker, CUDA)."""
    import numpy as np
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
