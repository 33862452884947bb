"""The Qwen2 HF <-> Megatron-Core name and tensor mapping, as one declarative table.

Owns ``QWEN2_TABLE`` (one ``Entry`` per Megatron parameter: its local-spec name, its Transformer
Engine spec name, the HF tensors it is made of, the transform kind and the tensor-parallel
partition dim), name resolution in both directions (``match_mcore``, ``hf_names``,
``expected_hf_names``) and the pure tensor transforms: fused QKV merge/split with GQA grouping,
SwiGLU gate/up merge/split, vocab padding/trimming, and TP shard slicing / gathering helpers
(``shard_rows``, ``merge_tp_shards``). Import and export (``hf_import`` / ``hf_export``) both derive
from this table, so a name or layout fix lands in one place.

Must not import megatron, megatron_fipo.mcore or torch.distributed: names and tensors only.

Departures from upstream layouts:
- Megatron's fused QKV is grouped per query group: rows are
  ``[group g: its q_per_group q heads, then its k head, then its v head] x num_query_groups``
  (each head ``head_dim`` rows); the bias follows the same order. A TP shard is therefore a
  contiguous dim-0 slice of the full tensor (whole query groups).
- ``linear_fc1`` is ``[gate; up]`` *per TP rank*: each rank holds ``[gate_r; up_r]``, so the TP
  gather of fc1 is not a plain concatenation (``merge_tp_shards`` handles it).
- The vocab is padded to ``padded_vocab`` rows (``mcore.model.padded_vocab_size``: a multiple of
  1024 whatever the tp); padded rows are zero on import and dropped on export.
- Tied embeddings (Qwen2.5 0.5B..3B): HF has no ``lm_head.weight``; a Megatron last pipeline stage
  that is not also the first holds its own ``output_layer.weight`` copy, which is filled from
  ``model.embed_tokens.weight`` on import and never exported.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

COPY, QKV, FC1, VOCAB = "copy", "qkv", "fc1", "vocab"


@dataclass(frozen=True)
class Entry:
    """One Megatron parameter and the HF tensors it is made of.

    ``mcore`` / ``te`` / ``hf`` are templates with ``{layer}`` (the global layer index) for per-layer
    entries. ``kind`` is one of ``copy`` (same tensor), ``qkv`` (q, k, v fused per query group),
    ``fc1`` (gate, up stacked), ``vocab`` (rows padded to the padded vocab). ``tp_dim`` is the
    tensor-parallel partition dim: 0 column-parallel, 1 row-parallel, None replicated.
    """

    mcore: str
    te: str
    hf: tuple[str, ...]
    kind: str
    tp_dim: int | None

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.mcore


_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."
QWEN2_TABLE: tuple[Entry, ...] = (
    Entry("embedding.word_embeddings.weight", "embedding.word_embeddings.weight",
          ("model.embed_tokens.weight",), VOCAB, 0),
    Entry(_L + "input_layernorm.weight", _L + "self_attention.linear_qkv.layer_norm_weight",
          (_H + "input_layernorm.weight",), COPY, None),
    Entry(_L + "self_attention.linear_qkv.weight", _L + "self_attention.linear_qkv.weight",
          (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"), QKV, 0),
    Entry(_L + "self_attention.linear_qkv.bias", _L + "self_attention.linear_qkv.bias",
          (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"), QKV, 0),
    Entry(_L + "self_attention.linear_proj.weight", _L + "self_attention.linear_proj.weight",
          (_H + "self_attn.o_proj.weight",), COPY, 1),
    Entry(_L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight",
          (_H + "post_attention_layernorm.weight",), COPY, None),
    Entry(_L + "mlp.linear_fc1.weight", _L + "mlp.linear_fc1.weight",
          (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"), FC1, 0),
    Entry(_L + "mlp.linear_fc2.weight", _L + "mlp.linear_fc2.weight",
          (_H + "mlp.down_proj.weight",), COPY, 1),
    Entry("decoder.final_layernorm.weight", "decoder.final_layernorm.weight", ("model.norm.weight",), COPY, None),
    Entry("output_layer.weight", "output_layer.weight", ("lm_head.weight",), VOCAB, 0),
)
OUTPUT_LAYER, EMBEDDING = QWEN2_TABLE[-1], QWEN2_TABLE[0]


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + "$")


_PATTERNS = {spec: [(_pattern(getattr(e, spec)), e) for e in QWEN2_TABLE] for spec in ("mcore", "te")}
_CHUNK = re.compile(r"^chunk(\d+)\.(.*)$")


def split_chunk_prefix(name: str) -> tuple[int, str]:
    """``("chunk3.decoder...")`` -> ``(3, "decoder...")``; names without a prefix are chunk 0."""
    m = _CHUNK.match(name)
    return (int(m.group(1)), m.group(2)) if m else (0, name)


def match_mcore(name: str, *, spec: str = "mcore") -> tuple[Entry, int | None]:
    """The table entry of a Megatron parameter name (no chunk prefix) and its (local) layer index.

    Args:
        name: e.g. ``decoder.layers.3.mlp.linear_fc1.weight``.
        spec: ``"mcore"`` for the local spec names, ``"te"`` for the Transformer Engine spec.

    Raises:
        KeyError: naming the parameter when no entry matches.
    """
    for pattern, entry in _PATTERNS[spec]:
        m = pattern.match(name)
        if m:
            return entry, int(m.group(1)) if m.groups() else None
    raise KeyError(f"no Qwen2 mapping for Megatron parameter {name!r}")


def hf_names(entry: Entry, layer: int | None) -> tuple[str, ...]:
    """The HF tensor names of ``entry`` at global layer ``layer``."""
    return tuple(h.format(layer=layer) for h in entry.hf)


def expected_hf_names(num_layers: int, tied: bool) -> list[str]:
    """Every tensor name of an HF Qwen2 checkpoint (no ``lm_head.weight`` when ``tied``)."""
    names = []
    for entry in QWEN2_TABLE:
        if entry is OUTPUT_LAYER and tied:
            continue
        for layer in range(num_layers) if entry.per_layer else [None]:
            names.extend(hf_names(entry, layer))
    return names


def hf_shapes(entry: Entry, arch) -> list[tuple[int, ...]]:
    """Full HF shapes of ``entry``'s tensors for an architecture (``mcore.model.Qwen2Arch`` fields)."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    name = entry.mcore
    if entry.kind == VOCAB:
        return [(arch.vocab_size, h)]
    if entry.kind == QKV:
        return [(q, h), (kv, h), (kv, h)] if name.endswith("weight") else [(q,), (kv,), (kv,)]
    if entry.kind == FC1:
        return [(f, h), (f, h)]
    if name.endswith("linear_proj.weight"):
        return [(h, q)]
    if name.endswith("linear_fc2.weight"):
        return [(h, f)]
    return [(h,)]  # norms


# ------------------------------------------------------------------ tensor transforms
def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int,
              head_dim: int) -> torch.Tensor:
    """HF q/k/v (weights ``[heads*d, hidden]`` or biases ``[heads*d]``) -> Megatron grouped QKV.

    Returns:
        ``[num_kv_heads * (q_per_group + 2) * head_dim, *rest]``: per query group its q heads, k, v.
    """
    groups, per = num_kv_heads, num_heads // num_kv_heads
    rest = q.shape[1:]
    qg = q.reshape(groups, per * head_dim, *rest)
    kg = k.reshape(groups, head_dim, *rest)
    vg = v.reshape(groups, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(groups * (per + 2) * head_dim, *rest)


def _qkv_views(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """Views ``(q, k, v)`` of a grouped QKV tensor, each ``[kv_heads, rows_per_group, *rest]``."""
    per = num_heads // num_kv_heads
    grouped = qkv.reshape(num_kv_heads, (per + 2) * head_dim, *qkv.shape[1:])
    return torch.split(grouped, [per * head_dim, head_dim, head_dim], dim=1)


def merge_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF gate/up ``[ffn, hidden]`` -> Megatron ``linear_fc1`` ``[2*ffn, hidden]`` (of one TP rank's halves)."""
    return torch.cat([gate, up], dim=0)


def pad_vocab(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """Append zero rows up to ``padded_vocab`` rows."""
    extra = padded_vocab - weight.shape[0]
    if extra < 0:
        raise ValueError(f"vocab {weight.shape[0]} is larger than the padded vocab {padded_vocab}")
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])]) if extra else weight


def shard_rows(entry: Entry, arch, padded_vocab: int, tp_rank: int, tp_size: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` ranges along ``entry.tp_dim`` of each HF tensor that TP rank needs.

    For a replicated entry the full range of dim 0. Vocab ranges are clipped to the real vocab
    (the rest of the shard is padding).
    """
    shapes = hf_shapes(entry, arch)
    if entry.tp_dim is None:
        return [(0, s[0]) for s in shapes]
    if entry.kind == VOCAB:
        rows = padded_vocab // tp_size
        start = tp_rank * rows
        return [(min(start, arch.vocab_size), min(start + rows, arch.vocab_size))]
    if entry.kind == QKV:  # whole query groups: q rows of the rank's heads, then its k and v rows
        check_tp(arch, tp_size)
        if tp_size > arch.num_kv_heads:  # the rank's group (it holds a contiguous part of it)
            tp_rank, tp_size = tp_rank // (tp_size // arch.num_kv_heads), arch.num_kv_heads
        d, gpr = arch.head_dim, arch.num_kv_heads // tp_size
        per = arch.num_heads // arch.num_kv_heads
        q0, kv0 = tp_rank * gpr * per * d, tp_rank * gpr * d
        return [(q0, q0 + gpr * per * d), (kv0, kv0 + gpr * d), (kv0, kv0 + gpr * d)]
    return [(tp_rank * s[entry.tp_dim] // tp_size, (tp_rank + 1) * s[entry.tp_dim] // tp_size) for s in shapes]


def check_tp(arch, tp_size: int) -> None:
    """ValueError unless ``tp_size`` divides the kv heads or is a multiple of them.

    With ``tp > kv heads`` megatron-core splits each query group's fused ``[q...; k; v]`` rows
    contiguously over ``tp / kv`` ranks (and all-gathers them in attention).
    """
    if arch.num_kv_heads % tp_size and tp_size % arch.num_kv_heads:
        raise ValueError(f"tensor parallel size {tp_size} must divide the {arch.num_kv_heads} kv heads or be a "
                         "multiple of them")


def assemble_local(entry: Entry, parts: Sequence[torch.Tensor], arch, padded_vocab: int, tp_size: int,
                   tp_rank: int = 0) -> torch.Tensor:
    """One TP rank's Megatron tensor from the HF slices ``shard_rows`` named."""
    if entry.kind == QKV:
        if tp_size > arch.num_kv_heads:  # parts are the rank's whole group: keep its contiguous share
            split = tp_size // arch.num_kv_heads
            group = merge_qkv(*parts, arch.num_heads // arch.num_kv_heads, 1, arch.head_dim)
            return group.chunk(split, dim=0)[tp_rank % split].clone()
        return merge_qkv(*parts, arch.num_heads // tp_size, arch.num_kv_heads // tp_size, arch.head_dim)
    if entry.kind == FC1:
        return merge_fc1(*parts)
    if entry.kind == VOCAB:
        return pad_vocab(parts[0], padded_vocab // tp_size)
    return parts[0]


def merge_tp_shards(entry: Entry, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full (tp=1) Megatron tensor from the TP shards of every rank, in rank order."""
    if len(shards) == 1 or entry.tp_dim is None:
        return shards[0]
    if entry.kind == FC1:  # each rank holds [gate_r; up_r]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(shards), dim=entry.tp_dim)


def to_hf(entry: Entry, full: torch.Tensor, arch, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Full Megatron tensor -> HF tensors of ``entry`` (split, vocab-trimmed), in ``entry.hf`` order.

    The inverse of ``merge_qkv`` / ``merge_fc1`` / ``pad_vocab``. Each result is a fresh contiguous
    tensor in ``dtype`` (default: ``full``'s), made by one copy (split, trim and cast fused), so it
    never aliases a live parameter.
    """
    outs = [torch.empty(shape, dtype=dtype or full.dtype, device=full.device) for shape in hf_shapes(entry, arch)]
    return to_hf_into(entry, full, arch, outs)


def to_hf_into(entry: Entry, full: torch.Tensor, arch, outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Like ``to_hf``, writing into ``outs`` (HF-shaped, any dtype: the copy casts); returns ``outs``."""
    if entry.kind == QKV:
        for out, part in zip(outs, _qkv_views(full, arch.num_heads, arch.num_kv_heads, arch.head_dim)):
            out.view(part.shape).copy_(part)
    elif entry.kind == FC1:
        for out, half in zip(outs, full.chunk(2, dim=0)):
            out.copy_(half)
    elif entry.kind == VOCAB:
        outs[0].copy_(full[:arch.vocab_size])
    else:
        outs[0].copy_(full)
    return list(outs)


def uniform_layer_offsets(num_layers: int, pp_rank: int, pp_size: int, vpp_size: int | None) -> list[int]:
    """Global index of the first layer of each model chunk of a pipeline rank (equal stages).

    Megatron's interleaved layout: virtual stage ``v`` of rank ``r`` holds layers starting at
    ``(v * pp + r) * num_layers / (pp * vpp)``. Uneven splits (``num_layers_in_first_pipeline_stage``
    ...) are not covered: pass offsets read from the model instead.
    """
    stages = pp_size * (vpp_size or 1)
    per = num_layers // stages
    return [(v * pp_size + pp_rank) * per for v in range(vpp_size or 1)]


def iter_global(named: Sequence[tuple[str, torch.Tensor]], layer_offsets: Sequence[int], *, spec: str = "mcore"
                ) -> Iterator[tuple[str, Entry, int | None, torch.Tensor]]:
    """``(local name, entry, global layer, tensor)`` for each local parameter, in the given order."""
    for name, tensor in named:
        chunk, bare = split_chunk_prefix(name)
        entry, layer = match_mcore(bare, spec=spec)
        yield name, entry, None if layer is None else layer + layer_offsets[chunk], tensor
