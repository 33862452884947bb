"""CPU compatibility layer: lets megatron-core 0.16.x run on gloo without CUDA.

Owns: the list of patches (``PATCHES``), ``apply_cpu_patches()`` and ``check_patch_targets()``.
Must not import: anything from megatron_fipo outside mcore/. Imports megatron.* lazily.

Scope: GPTModel with the local layer spec, ``get_forward_backward_func`` schedules
(no-pipelining, 1F1B, interleaved, variable sequence lengths), Megatron
``DistributedDataParallel``, ``get_megatron_optimizer`` (torch AdamW, fp32), gradient clipping and
``dist_checkpointing`` save/load; also the distributed optimizer (training) and tied embeddings
across pipeline stages. Each patch replaces one name of one upstream module:

* ``torch`` in modules whose code hard-codes CUDA (``torch.cuda.current_device()`` used as a
  device, ``device="cuda"``, ``torch.cuda.synchronize()``) becomes ``CPU_TORCH``: a read-only view
  of torch that forwards everything to torch except that ``cuda.current_device()`` answers the
  CPU device, ``cuda.synchronize()`` does nothing and tensor factories map ``device="cuda"`` to
  the CPU and drop ``pin_memory``. torch itself is never modified, so code outside the listed
  megatron modules (transformers, the tests, our own code) keeps seeing the real torch.cuda.
* module-level functions/classes swapped for CPU versions: gradient clipping (asserts
  ``'torch.cuda.FloatTensor'``), the RNG tracker class (CPU generator states), the norm class of
  the local spec (refuses sequence parallelism), tagged pipeline p2p (gloo matches untagged
  messages in posting order, which swaps activations and gradients at pp = 2 with vpp).
* three methods replaced in their class: the p2p shape exchange (variable lengths), and two
  wrappers that, only while upstream's method runs, make ``Parameter.type()`` report CUDA type
  names (distributed optimizer) or ``Tensor.cuda()`` return its CPU tensor (tied embeddings).

Context parallelism needs no patch: the local spec's attention (which asserts cp == 1) is
replaced by ``mcore.context_parallel.AllGatherCPAttention``. Not covered: the fp16/bf16
mixed-precision optimizers. Distributed-optimizer checkpoints go through ``mcore.checkpoint``.

All patches are no-ops when CUDA is available. Each ``Patch`` names the upstream functions that
contain the CUDA-only code and a marker string from each one's source; ``check_patch_targets()``
reports upstream renames/removals, and fixes (then the patch should be dropped).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------------------------
# A CPU view of torch for the patched megatron modules.
# --------------------------------------------------------------------------------------------
_CPU = torch.device("cpu")
_FACTORIES = (
    "arange", "empty", "empty_like", "full", "full_like", "ones", "ones_like",
    "rand", "randn", "randint", "tensor", "zeros", "zeros_like", "as_tensor",
)


def _cpu_device(device):
    """Map any CUDA device spec (``"cuda"``, ``"cuda:1"``, an index, a torch.device) to CPU."""
    if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
        return _CPU
    return device


def _cpu_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs an accelerator; irrelevant without one
        return fn(*args, **kwargs)

    return factory


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as seen by the patched modules: the current device is the CPU."""

    def __init__(self):
        super().__init__("torch.cuda")

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def synchronize(device=None):  # CPU ops are synchronous
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by the patched modules (see the module docstring)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


CPU_TORCH = _CpuTorch()


# --------------------------------------------------------------------------------------------
# Replacements that are not about devices.
# --------------------------------------------------------------------------------------------
def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Scale gradients in place by ``max_norm / (total_norm + 1e-6)`` when that is < 1.

    Same contract as upstream ``clip_grad_by_total_norm_fp32`` minus its assertion that every
    gradient is a ``torch.cuda.FloatTensor`` (a CPU fp32 grad is a ``torch.FloatTensor``).
    """
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            assert grad.dtype in (torch.float32, torch.bfloat16), grad.dtype
            to_local_if_dtensor(grad).detach().mul_(coeff)


# Tags for pipeline p2p on gloo: activations travel send_next -> recv_prev, gradients
# send_prev -> recv_next; shapes (variable lengths) get their own pair of tags.
_ACT_TAG, _GRAD_TAG, _ACT_SHAPE_TAG, _GRAD_SHAPE_TAG = 1, 2, 3, 4


def _tagged_p2p(send_prev, recv_prev, send_next, recv_next, group, prev_rank, next_rank,
                act_tag=_ACT_TAG, grad_tag=_GRAD_TAG):
    """Post the four pipeline p2p ops with direction tags and return their requests.

    Gloo matches the messages of one sender/receiver pair in posting order per tag. Upstream
    posts untagged [send_prev, recv_prev, send_next, recv_next] on every rank, so with two
    pipeline ranks (prev == next) and virtual stages, a gradient sent to prev is received as
    the activation expected from prev: the interleaved schedule silently trains on swapped
    tensors. Tagging by direction makes the matching unambiguous.
    """
    dist = torch.distributed
    ops = [
        dist.P2POp(fn, tensor, peer, group, tag)
        for tensor, fn, peer, tag in (
            (send_prev, dist.isend, prev_rank, grad_tag),
            (recv_prev, dist.irecv, prev_rank, act_tag),
            (send_next, dist.isend, next_rank, act_tag),
            (recv_next, dist.irecv, next_rank, grad_tag),
        )
        if tensor is not None
    ]
    return dist.batch_isend_irecv(ops) if ops else []


def _batched_p2p_ops(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next,
                     group, prev_pipeline_rank, next_pipeline_rank):
    """Upstream ``_batched_p2p_ops`` (same signature and list of requests), tagged for gloo."""
    return _tagged_p2p(tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next,
                       group, prev_pipeline_rank, next_pipeline_rank)


def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
    """Upstream ``P2PCommunicator._communicate_shapes`` on CPU, tagged for gloo (see above).

    Returns:
        (recv_prev_shape, recv_next_shape): 3-element lists, [0, 0, 0] when not received.
    """

    def shape(tensor):
        return None if tensor is None else torch.tensor(tensor.size(), dtype=torch.int64)

    prev_buf = torch.empty(3, dtype=torch.int64) if recv_prev else None
    next_buf = torch.empty(3, dtype=torch.int64) if recv_next else None
    tags = dict(act_tag=_ACT_SHAPE_TAG, grad_tag=_GRAD_SHAPE_TAG)
    sends = (shape(tensor_send_prev), shape(tensor_send_next))
    # Shape sends are not waited for (kept alive until done): see _PENDING_SHAPE_SENDS.
    _PENDING_SHAPE_SENDS[:] = [(w, t) for w, t in _PENDING_SHAPE_SENDS if not w.is_completed()]
    _PENDING_SHAPE_SENDS.extend((w, sends) for w in _tagged_p2p(
        sends[0], None, sends[1], None, self.pp_group, self.prev_rank, self.next_rank, **tags))
    for req in _tagged_p2p(None, prev_buf, None, next_buf, self.pp_group, self.prev_rank,
                           self.next_rank, **tags):
        req.wait()
    return tuple([0, 0, 0] if buf is None else buf.tolist() for buf in (prev_buf, next_buf))


# A gloo send completes only once the peer has posted the matching receive; a small NCCL send
# can complete on its own (it fits the peer's pre-allocated p2p buffer). Upstream waits for its
# shape sends, which NCCL tolerates but which deadlocks gloo in the interleaved schedule when every
# micro-batch of the first stage is in warm-up (num_microbatches == pp): the last stage's first
# 1F1B shape exchange sends a gradient shape the first stage only receives after its last
# warm-up send has completed, and that send needs the last stage's data receive that follows
# the shape exchange. So shape sends are left in flight, like on NCCL; each keeps its tensor.
_PENDING_SHAPE_SENDS: list = []


@contextlib.contextmanager
def _class_attr(cls: type, name: str, value):
    """Shadow ``cls.name`` with ``value`` inside the block (``cls`` must not define it itself)."""
    assert name not in cls.__dict__, (cls, name)
    setattr(cls, name, value)
    try:
        yield
    finally:
        delattr(cls, name)


def _cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
    """``Tensor.type()`` that names a CPU tensor's type as its CUDA twin (no-arg calls only)."""
    name = torch.Tensor.type(self, dtype, non_blocking, **kwargs)
    if dtype is None and not kwargs and self.device.type == "cpu":
        return name.replace("torch.", "torch.cuda.", 1)
    return name


def _stay_on_cpu(self, *args, **kwargs):
    """``Tensor.cuda()`` that returns the (CPU) tensor itself."""
    return self


def _during(method: Callable, cls: type, name: str, value) -> Callable:
    """Wrap ``method`` so that ``cls.name`` is ``value`` only while it runs.

    Used where upstream calls a tensor method with a CUDA meaning in the middle of a long
    method (``param.type() == 'torch.cuda.FloatTensor'``, ``weight.data.cuda()``): the class
    attribute is shadowed for the duration of that one call and restored afterwards, so no
    other code ever sees it. Not thread-safe (model/optimizer construction is single-threaded).
    """

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with _class_attr(cls, name, value):
            return method(*args, **kwargs)

    return wrapped


def _make_cpu_rng_tracker(base: type) -> type:
    """Subclass upstream's ``CudaRNGStatesTracker`` so that named states are CPU generator states.

    ``model_parallel_cuda_manual_seed`` then adds the data-, model- and expert-parallel states
    exactly as upstream does (same seed offsets), and ``fork(name)`` swaps the CPU default
    generator's state in and out, which is what upstream does with the CUDA generator.
    """

    class CpuRNGStatesTracker(base):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            orig_state, orig_name = torch.get_rng_state(), self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    CpuRNGStatesTracker.__qualname__ = CpuRNGStatesTracker.__name__
    return CpuRNGStatesTracker


class SequenceParallelTorchNorm:
    """Drop-in for upstream ``WrappedTorchNorm`` that also allows sequence parallelism.

    Builds ``torch.nn.RMSNorm`` or ``torch.nn.LayerNorm`` (per ``config.normalization``) and,
    under sequence parallelism, marks the parameters ``sequence_parallel = True`` so that
    ``finalize_model_grads`` all-reduces their gradients over the TP group, as it does for
    Transformer Engine's norms. Parameter names (``weight``, ``bias``) are upstream's.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError("zero-centered gamma / memory-efficient norm need TE or apex")
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r}: use RMSNorm or LayerNorm")
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


# --------------------------------------------------------------------------------------------
# The registry.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    """One replaced module-level name.

    Attributes:
        module: upstream module, e.g. ``megatron.core.pipeline_parallel.schedules``.
        attr: the module-level name that is replaced (``torch`` for the CPU view of torch).
        sites: functions/classes of ``module`` (dotted inside it) holding the CUDA-only code.
        marker: a string found in the source of every site; its disappearance means
            upstream changed the code and the patch must be re-examined.
        why: what fails without the patch.
        replacement: ``original -> replacement``.
    """

    module: str
    attr: str
    sites: tuple[str, ...]
    marker: str
    why: str
    replacement: Callable[[object], object]

    @property
    def key(self) -> str:
        return f"{self.module}:{self.attr}"


def _with_method(cls, name, fn):
    """Set ``cls.name = fn`` (in place, returns ``cls``) and remember the original for checks."""
    _ORIGINAL_METHODS.setdefault((cls, name), cls.__dict__[name])
    setattr(cls, name, fn)
    return cls


def _torch_view(_original):
    return CPU_TORCH


def _same(replacement):
    return lambda _original: replacement


_MC = "megatron.core."
PATCHES: tuple[Patch, ...] = ()  # filled below by _torch_patch / _patch


def _patch(module, attr, sites, marker, why, replacement):
    global PATCHES
    PATCHES += (Patch(_MC + module, attr, tuple(sites), marker, why, replacement),)


def _torch_patch(module, sites, marker, why):
    _patch(module, "torch", sites, marker, why, _torch_view)


_CD = "torch.cuda.current_device()"
# Model construction and forward.
_torch_patch("models.common.embeddings.rotary_pos_embedding", ["RotaryEmbedding.__init__"], _CD,
             "inv_freq is created on torch.cuda.current_device() unless use_cpu_initialization")
_torch_patch("transformer.utils", ["get_default_causal_mask"], 'device="cuda"',
             "the default causal mask (attention_mask=None) is built on cuda")
_torch_patch("tensor_parallel.layers",
             ["ColumnParallelLinear.__init__", "LinearWithGradAccumulationAndAsyncCommunication"],
             _CD, "weights/all-gather buffers are allocated on torch.cuda.current_device()")
_torch_patch("tensor_parallel.mappings", ["_gather_along_first_dim", "_reduce_scatter_along_first_dim"],
             _CD, "sequence-parallel gather/reduce-scatter buffers on torch.cuda.current_device()")
_patch("models.common.language_module.language_module", "LanguageModule",
       ["LanguageModule.setup_embeddings_and_output_layer"], "weight.data.cuda()",
       "tied embeddings with pp > 1: the last stage's copy is moved with .cuda() before the "
       "all-reduce that initialises it",
       lambda cls: _with_method(cls, "setup_embeddings_and_output_layer", _during(
           cls.setup_embeddings_and_output_layer, torch.Tensor, "cuda", _stay_on_cpu)))
# Pipeline schedules and p2p.
_torch_patch("pipeline_parallel.schedules",
             ["forward_backward_no_pipelining", "forward_backward_pipelining_with_interleaving",
              "forward_backward_pipelining_without_interleaving"], 'device="cuda"',
             'total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")')
_torch_patch("pipeline_parallel.p2p_communication", ["P2PCommunicator._communicate"],
             _CD, "receive buffers on current_device(); synchronize() after batched p2p")
_patch("pipeline_parallel.p2p_communication", "_batched_p2p_ops", ["_batched_p2p_ops"],
       "batch_isend_irecv", "untagged batched p2p swaps activations and gradients on gloo when "
       "pp == 2 with virtual stages (silently wrong losses)", _same(_batched_p2p_ops))
_patch("pipeline_parallel.p2p_communication", "P2PCommunicator", ["P2PCommunicator._communicate_shapes"],
       "batch_isend_irecv", "shape exchange (variable lengths): cuda buffers, torch.cuda.synchronize()"
       ", the same untagged-p2p mismatch, and waiting on shape sends deadlocks gloo (interleaved, "
       "num_microbatches == pp)", lambda cls: _with_method(cls, "_communicate_shapes",
                                                           _communicate_shapes))
# Data-parallel gradient buffers and finalisation.
_torch_patch("distributed.param_and_grad_buffer", ["_ParamAndGradBuffer.__init__"], _CD,
             "param/grad buffers are allocated on torch.cuda.current_device()")
# Optimizer and clipping.
_torch_patch("optimizer.optimizer", ["FP32Optimizer.__init__"], "device='cuda'",
             "FP32Optimizer._scale (and mixed-precision found_inf) are created on cuda")
_torch_patch("optimizer.clip_grads", ["get_grad_norm_fp32", "count_zeros_fp32"], "device='cuda'",
             "the grad-norm / zero-count accumulators are created on cuda")
_torch_patch("utils", ["local_multi_tensor_l2_norm"], 'device="cuda"',
             "the no-apex/no-TE l2-norm fallback returns its norm on cuda")
_patch("optimizer.optimizer", "clip_grad_by_total_norm_fp32", ["clip_grad_by_total_norm_fp32"],
       "'torch.cuda.FloatTensor'", "asserts param.grad.type() == 'torch.cuda.FloatTensor'",
       _same(_clip_grad_by_total_norm_fp32))
_patch("optimizer.distrib_optimizer", "DistributedOptimizer",
       ["DistributedOptimizer._build_model_and_main_param_groups"], "'torch.cuda.FloatTensor'",
       "raises TypeError unless param.type() is a torch.cuda.* name",
       lambda cls: _with_method(cls, "__init__", _during(cls.__init__, torch.nn.Parameter, "type",
                                                          _cuda_named_type)))
# Distributed checkpointing.
_torch_patch("dist_checkpointing.strategies.filesystem_async",
             ["FileSystemWriterAsync.preload_tensors"], "torch.cuda.synchronize()",
             "torch.cuda.synchronize() after copying tensors to CPU before writing")
_torch_patch("dist_checkpointing.strategies.state_dict_saver", ["save_state_dict_async_finalize"],
             _CD, "the all-reduced write-failure flag lives on torch.cuda.current_device()")
# RNG.
_patch("tensor_parallel.random", "CudaRNGStatesTracker", ["CudaRNGStatesTracker.add"],
       "torch.cuda.get_rng_state()",
       "the tracker stores CUDA generator states (torch.cuda.get_rng_state fails without CUDA)",
       _make_cpu_rng_tracker)
_patch("tensor_parallel.random", "_get_cuda_rng_state", ["_get_cuda_rng_state"], "torch.cuda.random.get_rng_state",
       "activation recomputation (CheckpointFunction) saves the CUDA generator state", _same(
           lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()))
_patch("tensor_parallel.random", "_set_cuda_rng_state", ["_set_cuda_rng_state"], "_lazy_call",
       "activation recomputation restores the CUDA generator state before recomputing", _same(
           lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)))
# Norm for sequence parallelism with the local spec.
for _mod, _attr, _site in [
    ("models.backends", "WrappedTorchNorm", "LocalSpecProvider.layer_norm"),
    ("transformer.transformer_block", "LayerNormImpl", "_get_block_submodules"),
]:
    _patch(_mod, _attr, [_site], _attr, "WrappedTorchNorm asserts not config.sequence_parallel",
           _same(SequenceParallelTorchNorm))

_APPLIED: dict[str, object] = {}
_ORIGINAL_METHODS: dict[tuple[type, str], object] = {}


def apply_cpu_patches() -> bool:
    """Apply every patch in ``PATCHES`` once. A no-op (returns False) when CUDA is available.

    Returns:
        True when the patches are (now) in place.

    Raises:
        AttributeError: a patch target no longer exists in the installed megatron-core.
    """
    if torch.cuda.is_available():
        return False
    for patch in PATCHES:
        if patch.key in _APPLIED:
            continue
        module = importlib.import_module(patch.module)
        original = getattr(module, patch.attr)  # AttributeError names the missing target
        setattr(module, patch.attr, patch.replacement(original))
        _APPLIED[patch.key] = original
    return True


def local_layer_spec(config):
    """Upstream ``get_gpt_layer_local_spec`` for ``config`` (norm type, qk-norm), CPU patches applied.

    With the patches, its norms are ``SequenceParallelTorchNorm`` (so sequence parallelism
    works with the local spec, including the block's final norm).

    Args:
        config: a ``TransformerConfig``.

    Returns:
        ``ModuleSpec`` of one transformer layer.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    apply_cpu_patches()
    return get_gpt_layer_local_spec(normalization=config.normalization,
                                    qk_layernorm=config.qk_layernorm)


def cpu_patches_applied() -> bool:
    """True once ``apply_cpu_patches()`` has replaced every target."""
    return len(_APPLIED) == len({p.key for p in PATCHES})


def check_patch_targets(patches: tuple[Patch, ...] | None = None) -> list[str]:
    """Check that every patch still has something to patch in the installed megatron-core.

    Args:
        patches: the patches to check (default ``PATCHES``).

    Returns:
        one message per missing module, attribute or site, or site whose source lost the
        marker (upstream renamed, removed or fixed it); empty when all is well.
    """
    problems = []
    for patch in PATCHES if patches is None else patches:
        try:
            module = importlib.import_module(patch.module)
        except ImportError as err:
            problems.append(f"{patch.key}: cannot import module ({err})")
            continue
        if patch.key not in _APPLIED and not hasattr(module, patch.attr):
            problems.append(f"{patch.key}: module has no attribute {patch.attr!r}")
        for site in patch.sites:
            head, *rest = site.split(".")
            # Sites are read from the original objects, also after patching.
            obj = _APPLIED.get(f"{patch.module}:{head}", getattr(module, head, None))
            try:
                if obj is None:
                    raise AttributeError(head)
                for part in rest:
                    obj = _ORIGINAL_METHODS.get((obj, part)) or getattr(obj, part)
                source = inspect.getsource(obj)
            except (AttributeError, TypeError, OSError) as err:
                problems.append(f"{patch.key}: site {site} not found ({err!r})")
                continue
            if patch.marker not in source:
                problems.append(f"{patch.key}: {site} no longer contains {patch.marker!r}")
    return problems
