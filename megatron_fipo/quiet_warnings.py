"""Third-party warnings that tell a user of megatron-fipo nothing, filtered precisely in one place.

Each filter names the category, the message (a regex anchored at its start, as ``warnings`` does)
and the module the warning is attributed to (anchored at both ends), so anything else those
libraries say, the same text attributed to any other module, and every warning of ours still show.
``install()`` is idempotent (``warnings`` keeps one copy of a filter) and cheap; the code that
drives the libraries concerned calls it: the CPU engine and the CPU server's batcher (transformers,
when built), ``mcore.groups.init_distributed`` (megatron-core, first thing: some of its notices
fire when its modules are imported, before any model is built) and ``mcore.checkpoint.load_checkpoint``
(torch's notices of the checkpoint-loading API that megatron-core calls). The filters are process-wide.
"""
from __future__ import annotations

import warnings

# (category, message regex, module regex, why it says nothing to the user)
FILTERS = (
    # transformers 5 renamed the forward's cache argument; the CPU engine passes past_key_values, which
    # still works; the warning is attributed to torch's Module.__call__ that forwarded it.
    (FutureWarning, r"`past_key_values` is deprecated and will be removed", r"torch\.nn\.modules\.module\Z",
     "transformers' rename of the cache argument, once per generation"),
    # --- megatron-core, at import (mcore.groups.init_distributed installs these before it imports megatron).
    # Without Apex / Transformer Engine (always on CPU) megatron-core falls back to torch's norm, torch's
    # optimizers and its own multi-tensor loops: what megatron-fipo's local layer spec and torch AdamW use anyway.
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm\Z",
     r"megatron\.core\.models\.(gpt\.gpt_layer_specs|backends)\Z",
     "the norm we use anyway (the local spec's torch norm), said at import"),
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to Torch optimizers\.\Z",
     r"megatron\.core\.optimizer\Z",
     "the optimizer we use anyway (torch AdamW), said at import"),
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to local implementations of multi_tensor_",
     r"megatron\.core\.(optimizer\.optimizer|optimizer\.clip_grads|distributed\.fsdp\.src\.megatron_fsdp\.mixed_precision)\Z",
     "megatron-core's own multi-tensor loops instead of fused kernels, said at import"),
    # Deprecations inside megatron-core (hidden by Python's default filters, shown under -W default / pytest).
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated\.", r"torch\.jit\._script\Z",
     "megatron-core's jit helpers at import"),
    (DeprecationWarning, r"The following imports from `dynamic_context\.py` will be removed",
     r"megatron\.core\.inference\.contexts\Z", "megatron-core's import of its own inference contexts"),
    (DeprecationWarning, r"The 'megatron\.core\.transformer\.custom_layers\.transformer_engine'\s+module is deprecated",
     r"megatron\.core\.transformer\.multi_latent_attention\Z", "megatron-core importing its own deprecated module"),
    # --- megatron-core, building the model (after init_distributed).
    # TransformerConfig's own default cuda_graph_scope is "full", which its __post_init__ then calls
    # deprecated: every config built warns, whatever the user set (we use no CUDA graphs).
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope", r"megatron\.core\.transformer\.transformer_config\Z",
     "megatron-core's deprecation of its own default, on every TransformerConfig"),
    (DeprecationWarning, r"MLP requires ffn_hidden_size, but it was not provided\.", r"megatron\.core\.transformer\.spec_utils\Z",
     "megatron-core's layer spec building its own MLP (config.ffn_hidden_size is what we set)"),
    # --- megatron-core, the first training step: its own linear layers call its helper without tp_group.
    (DeprecationWarning, r"Warning: tp_group is None, using default tp group\.", r"megatron\.core\.tensor_parallel\.layers\Z",
     "megatron-core's linear layers not passing their group to their own helper"),
    # --- torch, loading a checkpoint (mcore.checkpoint.load_checkpoint installs these too).
    # megatron-core 0.16's torch_dist load strategy calls torch.distributed.checkpoint.load_state_dict
    # (deprecated for load), attributed to megatron's strategy module, the caller; torch's planner then
    # deprecates the ShardedTensor that megatron-core's strategy hands it.
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load`",
     r"megatron\.core\.dist_checkpointing\.strategies\.torch\Z",
     "torch's deprecation of the API megatron-core's checkpoint load calls, once per load"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor\.",
     r"torch\.distributed\.checkpoint\.(planner_helpers|default_planner)\Z",
     "torch's deprecation of the ShardedTensor megatron-core's checkpoint load passes it, twice per load"),
)


def install() -> None:
    """Add the filters (adding one twice keeps one copy)."""
    for category, message, module, _why in FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
