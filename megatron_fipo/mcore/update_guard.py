"""The non-finite update guard: an optimizer step never leaves a non-finite weight or Adam moment.

Owns ``guarded_step`` (Megatron's ``optimizer.step()`` behind a gradient check and, when an
overflow cannot be ruled out, a host snapshot with rollback) and ``nonfinite_tensors`` (the
publish check behind checkpoint save, weight sync and HF export). Imports torch and
torch.distributed; reads the Megatron optimizer's inner torch optimizers, never parallel_state.

Why a guard of our own: Megatron skips a step on inf/nan only under fp16 loss scaling
(``found_inf``); with fp32 or bf16 params ``optimizer.step()`` applies a NaN gradient (the clip
coefficient ``max_norm / nan`` compares false, so nothing is clipped) and any update that
overflows, and returns ``update_successful=True``.

How (every decision all-reduced over the model-parallel then the data(-context)-parallel group,
so all ranks agree):

1. Before the step, one read pass over the DDP gradient buffers (``main_grad``): any non-finite
   gradient on any rank -> no step at all. Parameters, Adam moments and the step count stay
   bit-identical; this costs no memory.
2. A finite gradient can still overflow the update (an absurd lr). Adam(W) bounds it per element:
   ``|p'| <= |p| (1 + lr wd) + lr max(|m|, |g|) / ((1 - beta1) eps)`` (``|m / (sqrt(v) + eps)|
   <= |m| / eps``, ``|m'| <= max(|m|, |g|)``, bias correction ``>= 1 - beta1``) and
   ``v' <= max(v, g^2)``. The same pass reads ``max|p|``, ``max|m|``, ``max|v|``; when the bound
   reaches a quarter of the bf16 range (rounding margin; fp32's is the same), or the optimizer is
   not Adam-shaped, the step is *at risk*: this rank's parameters and optimizer state are copied
   to host memory first (params + 2 moments: 12 bytes per local fp32 parameter, 16 with bf16 main
   params), the step runs, and a non-finite result anywhere restores the copy exactly. At the
   recipes' learning rates the bound is ~30 orders of magnitude below the range, so no copy is
   ever made; the steady-state cost is one read of grads, params and moments per optimizer step
   (about half an Adam step's memory traffic) and one 2-float all-reduce.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

_SAFE_MAGNITUDE = torch.finfo(torch.bfloat16).max / 4


@dataclass
class StepOutcome:
    """What ``guarded_step`` did: ``stepped`` (an update was applied and kept), ``grad_norm``
    (Megatron's, nan when not computed), ``nonfinite_grad`` (skipped before the step),
    ``rolled_back`` (applied, found non-finite, restored from the host copy)."""

    stepped: bool
    grad_norm: float = float("nan")
    nonfinite_grad: bool = False
    rolled_back: bool = False


def inner_optimizers(optimizer) -> List[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron (chained) optimizer; their params are the main params."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p.optimizer for p in parts if getattr(p, "optimizer", None) is not None]


def agree_any(flags: List[bool], groups, device) -> List[bool]:
    """Element-wise OR of ``flags`` over all ranks (model-parallel, then data(-context)-parallel group)."""
    t = torch.tensor([float(f) for f in flags], device=device)
    for group in (groups.mp, groups.dp_cp):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(x) for x in t.tolist()]


def guarded_step(optimizer, model_params: List[torch.nn.Parameter], groups, device) -> StepOutcome:
    """``optimizer.step()`` unless a gradient is non-finite; rolled back if the update is (module docstring).

    Args:
        optimizer: the Megatron optimizer (its gradients already reduced by ``finalize_model_grads``).
        model_params: this rank's model parameters (DDP-wrapped: they carry ``main_grad``).
        groups: ``ParallelGroups`` (``mp`` and ``dp_cp`` span the world).
        device: device of the agreement all-reduce.
    """
    grads = [p.main_grad for p in model_params if getattr(p, "main_grad", None) is not None]
    g_max = _max_abs(grads)
    bad_grad, risky = agree_any([not math.isfinite(g_max), _update_may_overflow(optimizer, g_max)], groups, device)
    if bad_grad:  # nothing is touched: Megatron would apply the NaN (no fp16 loss scaler here)
        optimizer.zero_grad()
        return StepOutcome(stepped=False, nonfinite_grad=True)
    snapshot = _Snapshot(optimizer, model_params) if risky else None
    overflowed = False
    try:
        ok, grad_norm, _ = optimizer.step()
    except RuntimeError as err:  # torch refuses a step size beyond the dtype's range, after updating some params
        if snapshot is None or "overflow" not in str(err):
            raise
        ok, grad_norm, overflowed = False, None, True
    norm = float(grad_norm) if grad_norm is not None else float("nan")
    if snapshot is not None:
        local = overflowed or bool(nonfinite_tensors(_named(model_params), optimizer, optimizer_state=True))
        (broken,) = agree_any([local], groups, device)
        if broken:
            snapshot.restore()
            optimizer.zero_grad()
            return StepOutcome(stepped=False, grad_norm=norm, rolled_back=True)
    return StepOutcome(stepped=bool(ok), grad_norm=norm)


def nonfinite_tensors(named_params: Iterable[Tuple[str, torch.Tensor]], optimizer=None, *,
                      optimizer_state: bool = False, limit: int = 5) -> List[str]:
    """Names of (up to ``limit``) non-finite tensors of this rank: parameters, and optionally the
    optimizer's main params and state (``optimizer.<i>.<param index>.<key>``). Local: no collective.

    A tensor is finite iff its max-abs is (inf -> inf, nan -> nan): one reduction per tensor, no
    tensor-sized temporary, one device sync in all.
    """
    named = [(name, p) for name, p in named_params]
    if optimizer_state and optimizer is not None:
        for i, opt in enumerate(inner_optimizers(optimizer)):
            for j, p in enumerate(q for g in opt.param_groups for q in g["params"]):
                named.append((f"optimizer.{i}.{j}.param", p))
                named += [(f"optimizer.{i}.{j}.{k}", v) for k, v in opt.state.get(p, {}).items()
                          if isinstance(v, torch.Tensor) and v.is_floating_point()]
    named = [(name, t) for name, t in named if t.numel()]
    if not named:
        return []
    norms = torch.stack([torch.linalg.vector_norm(t.detach(), float("inf")).float().to(named[0][1].device)
                         for _, t in named])
    bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
    return [named[i][0] for i in bad[:limit]]


def _named(params):
    return ((f"param{i}", p) for i, p in enumerate(params))


def _max_abs(tensors) -> float:
    """max |x| over the tensors (nan when any element is nan, inf when one is inf); 0.0 for none.

    One reduction per tensor, no tensor-sized temporary, one device sync in all.
    """
    norms = [torch.linalg.vector_norm(t.detach(), float("inf")).float() for t in tensors if t.numel()]
    return float(torch.stack(norms).max()) if norms else 0.0


def _update_may_overflow(optimizer, g_max: float) -> bool:
    """True unless the Adam(W) bound of the module docstring proves every updated value finite."""
    if not math.isfinite(g_max):
        return False  # skipped before stepping anyway
    for opt in inner_optimizers(optimizer):
        for group in opt.param_groups:
            try:
                lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
                b1, b2 = (float(b) for b in group["betas"])
            except (KeyError, TypeError, ValueError):
                return True  # not an Adam-shaped group: no bound, so the copy is the guard
            if not (eps > 0 and 0 <= b1 < 1 and 0 <= b2 <= 1 and math.isfinite(lr) and math.isfinite(wd)):
                return True
            params = group["params"]
            states = [opt.state.get(p, {}) for p in params]
            p_max = _max_abs(params)
            m_max = max(_max_abs([s["exp_avg"] for s in states if "exp_avg" in s]), g_max)
            v_max = max(_max_abs([s["exp_avg_sq"] for s in states if "exp_avg_sq" in s]), g_max * g_max)
            p_bound = p_max * (1 + abs(lr * wd)) + abs(lr) * m_max / ((1 - b1) * eps)
            if not all(math.isfinite(x) and x < _SAFE_MAGNITUDE for x in (p_max, m_max, v_max, p_bound)):
                return True
    return False


class _Snapshot:
    """Host copy of this rank's model params, main params and optimizer state; ``restore()`` is exact."""

    def __init__(self, optimizer, model_params):
        self.optimizer = optimizer
        tensors = {id(p): p for p in model_params}
        for opt in inner_optimizers(optimizer):
            for g in opt.param_groups:
                tensors.update({id(p): p for p in g["params"]})
        self.params = [(p, p.detach().to("cpu", copy=True)) for p in tensors.values()]
        self.state = []  # (optimizer, param, deep copy of its state or None when it had none yet)
        self.groups = []  # (param group, its scalars: e.g. a fused optimizer's "step" lives here)
        for opt in inner_optimizers(optimizer):
            for g in opt.param_groups:
                self.groups.append((g, {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}))
                for p in g["params"]:
                    st = opt.state.get(p)
                    self.state.append((opt, p, None if st is None else
                                       {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor)
                                        else copy.deepcopy(v) for k, v in st.items()}))

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in self.params:
            p.copy_(saved)
        for g, scalars in self.groups:
            g.update(scalars)
        for opt, p, saved in self.state:
            if saved is None:
                opt.state.pop(p, None)  # the step created it (first step): back to none
                continue
            live = opt.state[p]
            for k, v in saved.items():
                if isinstance(v, torch.Tensor) and isinstance(live.get(k), torch.Tensor):
                    live[k].copy_(v)
                else:
                    live[k] = v.to(p.device) if isinstance(v, torch.Tensor) else v
            for k in set(live) - set(saved):
                del live[k]
