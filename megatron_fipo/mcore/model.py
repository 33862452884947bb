"""The Qwen2 model on Megatron-Core: TransformerConfig from an HF ``config.json``, layer spec, chunks.

Owns ``Qwen2Arch`` (the architecture fields read from an HF config, validated),
``transformer_config`` (a ``TransformerConfig`` for a parallel layout, plus a
``transformer_overrides`` pass-through validated by ``TransformerConfig`` itself),
``layer_spec`` (Transformer Engine when it imports and CUDA is present, the local spec
otherwise), ``padded_vocab_size`` and ``build_model_chunks`` (one ``GPTModel`` per virtual
pipeline stage of this rank).

Only megatron_fipo.mcore imports megatron. Must not import trainer, rollout or bridge.

Departs from upstream: Megatron-LM reads these from its argument parser; here they come from the
HF config so a Qwen2 / Qwen2.5 checkpoint defines the model. Sliding-window attention (off in
every released Qwen2.5 config) is rejected rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from megatron_fipo.config.hf_model import check_hf_config, read_hf_config

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)


@dataclass(frozen=True)
class Qwen2Arch:
    """Architecture fields of an HF Qwen2 ``config.json``."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> "Qwen2Arch":
        """Read and validate an HF config (a dict, a ``config.json`` path, or a model directory)."""
        if isinstance(config, Mapping):
            check_hf_config(config, "HF config (config.json)")
        else:
            config = read_hf_config(config)
        archs = config.get("architectures") or [config.get("model_type", "?")]
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and config.get("model_type") != "qwen2":
            raise ValueError(f"unsupported architecture {archs}: megatron_fipo supports {SUPPORTED_ARCHITECTURES}")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Qwen2 uses SwiGLU (hidden_act 'silu'), got {config['hidden_act']!r}")
        if config.get("use_sliding_window", False):
            raise ValueError("use_sliding_window=true is not supported (no released Qwen2.5 config enables it)")
        rope_theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        arch = cls(
            hidden_size=int(config["hidden_size"]), num_layers=int(config["num_hidden_layers"]),
            num_heads=int(config["num_attention_heads"]),
            num_kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
            ffn_hidden_size=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=float(rope_theta),
            max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
        if arch.hidden_size % arch.num_heads or arch.num_heads % arch.num_kv_heads:
            raise ValueError(f"hidden {arch.hidden_size}, heads {arch.num_heads}, kv heads {arch.num_kv_heads}: "
                             "hidden must divide by heads and heads by kv heads")
        return arch

    def check_layout(self, tp: int, pp: int, vpp: Optional[int] = None) -> None:
        """ValueError when the model cannot be split this way."""
        if self.num_kv_heads % tp and tp % self.num_kv_heads:
            raise ValueError(f"tensor parallel size {tp} must divide the {self.num_kv_heads} kv heads (or be a multiple)")
        if self.num_heads % tp:
            raise ValueError(f"tensor parallel size {tp} must divide the {self.num_heads} attention heads")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"tensor parallel size {tp} must divide intermediate_size {self.ffn_hidden_size}")
        stages = pp * (vpp or 1)
        if self.num_layers % stages:
            raise ValueError(f"{self.num_layers} layers do not split into pp={pp} x vpp={vpp or 1} equal stages")


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Vocab rounded up to a multiple of ``lcm(8 * divisible_by, divisible_by * tp)``.

    Megatron's rule (a multiple of ``divisible_by * tp``) makes the padded size depend on tp, so a
    checkpoint saved at tp=1 would not load at tp=2. Rounding to ``8 * divisible_by`` (1024 rows)
    gives the same padded vocab for every tp dividing 8; the padded rows are masked out of every
    softmax and never exported.
    """
    multiple = math.lcm(8 * divisible_by, divisible_by * tp)
    return -(-vocab_size // multiple) * multiple


def transformer_config(
    arch: Qwen2Arch,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    cp: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    recompute: Optional[Mapping[str, Any]] = None,
    overrides: Optional[Mapping[str, Any]] = None,
):
    """A Megatron ``TransformerConfig`` for Qwen2 on this layout.

    Args:
        arch: the architecture.
        tp, pp, vpp, cp: tensor / pipeline / virtual pipeline / context parallel sizes.
        sequence_parallel: Megatron sequence parallelism (needs tp > 1).
        params_dtype: float32 (CPU, tests) or bfloat16 (GPU); bf16 turns on Megatron's bf16 mode.
        recompute: activation recomputation fields passed through, e.g.
            ``{"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}``.
        overrides: any other ``TransformerConfig`` fields (``transformer_overrides`` in the
            YAML), e.g. ``{"fp8": "hybrid", "fp8_recipe": "delayed"}``; applied last.

    Returns:
        ``megatron.core.transformer.TransformerConfig``.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch.check_layout(tp, pp, vpp)
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tensor parallel size > 1")
    cuda = torch.cuda.is_available()
    bf16 = params_dtype == torch.bfloat16
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads, ffn_hidden_size=arch.ffn_hidden_size, kv_channels=arch.head_dim,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps, add_qkv_bias=True, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype, pipeline_dtype=params_dtype, bf16=bf16,
        use_cpu_initialization=not cuda,
        # Fused kernels are CUDA (or torch.compile) paths; Megatron validates them off on CPU.
        # The local spec's fused softmax needs apex's compiled kernels, which a stock PyTorch image lacks.
        bias_activation_fusion=cuda, masked_softmax_fusion=cuda and _fused_softmax_kernels(), bias_dropout_fusion=cuda,
        apply_rope_fusion=False, gradient_accumulation_fusion=False,
        # RL batches are packed with variable lengths; Megatron's config validation requires the
        # alltoall dispatcher for variable_seq_lengths even for dense models.
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",
    )
    kwargs.update(recompute or {})
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = [k for k in (overrides or {}) if k not in fields]
    if unknown:
        hints = {k: difflib.get_close_matches(k, fields, n=1) for k in unknown}
        raise ValueError("unknown transformer_overrides " + ", ".join(
            f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items()))
    kwargs.update(overrides or {})
    return TransformerConfig(**kwargs)


def _fused_softmax_kernels() -> bool:
    """True when the compiled masked-softmax kernels Megatron's local spec imports (apex's) are installed."""
    import importlib.util

    return importlib.util.find_spec("scaled_masked_softmax_cuda") is not None


def use_transformer_engine() -> bool:
    """True when Transformer Engine imports and CUDA is present (the GPU path)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def layer_spec(config, *, use_te: Optional[bool] = None):
    """The decoder layer spec: TE on GPU, the local spec (with a SP-capable RMSNorm) on CPU.

    Under context parallelism the local spec's core attention is ``AllGatherCPAttention``
    (``mcore.context_parallel``); TE's attention does CP itself.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te if use_te is not None else use_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    from megatron_fipo.mcore.cpu_compat import local_layer_spec

    spec = local_layer_spec(config)
    if config.context_parallel_size > 1:
        from megatron_fipo.mcore.context_parallel import with_cp_attention

        spec = with_cp_attention(spec)
    return spec


def build_model_chunks(config, arch: Qwen2Arch, groups, *, use_te: Optional[bool] = None) -> list:
    """This rank's ``GPTModel`` chunks, one per virtual pipeline stage (a list of one without vpp).

    Args:
        config: from ``transformer_config``.
        arch: the architecture (vocab, tied embeddings, rope theta, max positions).
        groups: ``ParallelGroups`` of this process.
        use_te: force the TE / local spec (default: TE when available).

    Returns:
        ``[GPTModel, ...]`` on the current device, in fp32 or bf16 per the config.
    """
    from megatron.core.models.gpt import GPTModel

    spec = layer_spec(config, use_te=use_te)
    chunks = []
    stages = groups.vpp_size or 1
    for stage in range(stages):
        vp_stage = stage if groups.vpp_size else None
        model = GPTModel(
            config, spec, vocab_size=padded_vocab_size(arch.vocab_size, groups.tp_size),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=groups.pp_rank == 0 and stage == 0,
            post_process=groups.pp_rank == groups.pp_size - 1 and stage == stages - 1,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope", rotary_base=int(arch.rope_theta), vp_stage=vp_stage,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def hidden_passthrough(self, hidden_states, weight=None, runtime_gather_output=None):
    """Replacement forward of the output layer: the final hidden states, gathered over TP under SP."""
    if self.sequence_parallel:
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True,
                                                             group=self.tp_group)
    return hidden_states, None
