"""Megatron parameters -> full HF tensors, streamed in byte-bounded buckets; HF checkpoint writing.

Owns ``export_hf_state`` (a generator of buckets ``[(hf_name, tensor), ...]``), its every-rank,
node-local form ``export_hf_node_local`` (colocated rollout servers on every node), the one-stage
form ``export_hf_stage`` (a pipeline stage sending its own layers) and
``save_hf_checkpoint`` (safetensors shards + ``model.safetensors.index.json`` + ``config.json`` +
tokenizer files).

Must not import megatron or megatron_fipo.mcore: the process groups arrive in ``groups`` (any
object with ``tp``, ``pp``, ``tp_size``, ``pp_size``, ``pp_rank``, ``pp_global_ranks``, e.g.
``mcore.groups.ParallelGroups``).

Pipeline walk (the choice made here): every rank of a model-parallel group yields the *same*
buckets. Stages take turns in pipeline order; the owning stage gathers each parameter over its
tensor-parallel group (``all_gather``), converts it to HF tensors (QKV / gate-up split, vocab
trimmed, cast to ``dtype``) and broadcasts them over the pipeline group; the other stages receive
into buffers whose names and shapes were exchanged once up front (``all_gather_object`` over the
pipeline group). Every rank can thus feed a colocated rollout engine; one rank (global rank 0)
writes checkpoints. Peak extra memory per rank is one bucket plus one gathered parameter.
Data-parallel replicas each run the same walk inside their own groups (no dp traffic).

Departure: with tied embeddings the last stage's ``output_layer.weight`` copy is skipped (the
first stage's embedding is the tensor HF stores); padded vocab rows are never exported.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_fipo.bridge import qwen2_mapping as M
from megatron_fipo.config.hf_model import read_hf_config

Bucket = list  # list[tuple[str, torch.Tensor]]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json")


def drain(stream: Iterable[Bucket]) -> None:
    """Run an export stream to its end without keeping anything: what the ranks that only take part
    in its collectives (every rank but the writer / the engine's feeder) do with it."""
    for _ in stream:
        pass


def export_hf_state(
    named_params: Iterable[tuple[str, torch.Tensor]],
    arch,
    *,
    groups,
    layer_offsets: Sequence[int],
    dtype: torch.dtype | None = None,
    bucket_bytes: int = 512 << 20,
    spec: str = "mcore",
    reuse_buffer: bool | torch.Tensor = False,
) -> Iterator[Bucket]:
    """Stream the full HF state dict of the model this rank is part of.

    Must be iterated to the end on every rank of the model-parallel group (it runs collectives).

    Args:
        named_params: ``(local name, parameter)`` of this rank (``Actor.named_local_parameters()``).
        arch: ``Qwen2Arch`` fields (sizes, heads, vocab, tie_word_embeddings).
        groups: process groups (see the module docstring); ``tp``/``pp`` may be None when size 1.
        layer_offsets: global index of the first layer of each local chunk.
        dtype: HF dtype (default: the parameters' dtype).
        bucket_bytes: byte budget of one bucket; a tensor larger than it gets a bucket of its own.
        spec: ``"mcore"`` or ``"te"`` parameter names.
        reuse_buffer: write every bucket into one flat buffer: a 1-D tensor of ``dtype`` with at
            least ``bucket_bytes`` bytes, kept by the caller across exports (weight syncs), or
            True to allocate one for this call. Tensors larger than the bucket get their own.
            A bucket's tensors are then valid only until the next bucket is requested, so the
            consumer must be done with them (a sync that returns after the engine acknowledged).
            False: every tensor is freshly allocated (what ``save_hf_checkpoint`` needs).

    Yields:
        lists of ``(hf_name, tensor)`` with full (unsharded, unpadded) tensors on the parameters'
        device, identical on every rank of the pipeline / tensor group; every HF name exactly once.
    """
    units, plans, walk = _prepare(named_params, arch, groups, layer_offsets=layer_offsets, dtype=dtype,
                                  bucket_bytes=bucket_bytes, spec=spec, reuse_buffer=reuse_buffer)

    def fill(stage: int, i: int, tensors: list) -> None:
        if groups.pp_size == 1 or stage == groups.pp_rank:
            entry, _, param = units[i]
            M.to_hf_into(entry, _gather_tp(entry, param, groups), arch, tensors)
        if groups.pp_size > 1:
            for t in tensors:
                dist.broadcast(t, src=groups.pp_global_ranks[stage], group=groups.pp)

    yield from walk(fill)


def export_hf_node_local(named_params: Iterable[tuple[str, torch.Tensor]], arch, *, groups, nodes,
                         **options) -> Iterator[Bucket]:
    """``export_hf_state`` for every rank of the world, with traffic kept inside nodes where it can be.

    Every rank yields the same buckets as ``export_hf_state`` (the full HF state dict), so every GPU
    of a node can feed the rollout server TP rank on it. Per stage (``nodes.plan``,
    ``parallel.nodes.node_sync_plan``): on each node holding the stage one tensor-parallel group
    builds the HF tensors (its all-gather stays in the node); a node without the stage receives
    them once, from one producer, into its first rank; then one broadcast over the node's group
    reaches its other ranks. Must be iterated to the end on every rank of the world.

    Args: as ``export_hf_state`` (``options``: ``layer_offsets``, ``dtype``, ``bucket_bytes``, ``spec``,
    ``reuse_buffer``), plus ``nodes`` (``parallel.nodes.NodeGroups``).
    """
    units, plans, walk = _prepare(named_params, arch, groups, **options)
    me, node = groups.rank, nodes.place.node

    def fill(stage: int, i: int, tensors: list) -> None:
        plan = nodes.plan[stage]
        if me in plan.producers.get(node, ()):
            entry, _, param = units[i]
            M.to_hf_into(entry, _gather_tp(entry, param, groups), arch, tensors)
        for src, dst in plan.transfers:
            for t in tensors:
                if me == src:
                    dist.send(t, dst, group=groups.world)
                elif me == dst:
                    dist.recv(t, src, group=groups.world)
        if len(nodes.ranks) > 1:
            for t in tensors:
                dist.broadcast(t, src=plan.holders[node], group=nodes.group)

    yield from walk(fill)


def export_hf_stage(named_params: Iterable[tuple[str, torch.Tensor]], arch, *, groups, **options) -> Iterator[Bucket]:
    """This pipeline stage's HF tensors only (tensor-parallel gather, no pipeline traffic), in buckets.

    For a stage that sends its own layers to the rollout servers (disaggregated sync). Must be
    iterated to the end on every rank of the stage's tensor-parallel group. Args as ``export_hf_state``.
    """
    units, _, walk = _prepare(named_params, arch, groups, exchange=False, **options)

    def fill(stage: int, i: int, tensors: list) -> None:
        entry, _, param = units[i]
        M.to_hf_into(entry, _gather_tp(entry, param, groups), arch, tensors)

    yield from walk(fill)


def _prepare(named_params, arch, groups, *, layer_offsets: Sequence[int], dtype: torch.dtype | None = None,
             bucket_bytes: int = 512 << 20, spec: str = "mcore", reuse_buffer: bool | torch.Tensor = False,
             exchange: bool = True) -> tuple:
    """This rank's exported units, every stage's ``(HF names, shapes)`` per unit (exchanged over the
    pipeline group unless ``exchange`` is False: this stage's only), and ``walk(fill)`` over them."""
    M.check_tp(arch, groups.tp_size)
    units = [(e, layer, p) for _, e, layer, p in M.iter_global(list(named_params), layer_offsets, spec=spec)
             if not (e is M.OUTPUT_LAYER and arch.tie_word_embeddings)]
    dtype = dtype or (units[0][2].dtype if units else torch.float32)
    device = units[0][2].device if units else torch.device("cpu")
    mine = [(M.hf_names(e, layer), [tuple(s) for s in M.hf_shapes(e, arch)]) for e, layer, _ in units]
    plans = [mine]
    if groups.pp_size > 1 and exchange:
        plans = [None] * groups.pp_size
        dist.all_gather_object(plans, mine, group=groups.pp)
    return units, plans, lambda fill: _walk(plans, fill, dtype, device, bucket_bytes, reuse_buffer)


def _walk(plans, fill, dtype: torch.dtype, device, bucket_bytes: int, reuse_buffer) -> Iterator[Bucket]:
    """Buckets of every stage's units in pipeline order; ``fill(stage, i, tensors)`` writes unit i's tensors."""
    flat = _bucket_buffer(reuse_buffer, bucket_bytes, dtype, device)
    bucket, size = [], 0
    for stage, plan in enumerate(plans):
        for i, (names, shapes) in enumerate(plan):
            nbytes = sum(torch.Size(s).numel() for s in shapes) * dtype.itemsize
            if bucket and size + nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            if flat is not None and nbytes <= bucket_bytes:
                offsets = [size // dtype.itemsize + sum(torch.Size(x).numel() for x in shapes[:k]) for k in range(len(shapes))]
                tensors = [flat[o:o + torch.Size(s).numel()].view(s) for o, s in zip(offsets, shapes)]
            else:
                tensors = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
            fill(stage, i, tensors)
            bucket.extend(zip(names, tensors))
            size += nbytes
    if bucket:
        yield bucket


def _bucket_buffer(reuse, bucket_bytes: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    if isinstance(reuse, torch.Tensor):
        if reuse.dim() != 1 or reuse.dtype != dtype or reuse.numel() * reuse.element_size() < bucket_bytes:
            raise ValueError(f"reuse_buffer must be a 1-D {dtype} tensor of at least bucket_bytes={bucket_bytes} bytes, "
                             f"got {reuse.dtype} {tuple(reuse.shape)}")
        return reuse
    return torch.empty(bucket_bytes // dtype.itemsize, dtype=dtype, device=device) if reuse else None


def _gather_tp(entry: M.Entry, param: torch.Tensor, groups) -> torch.Tensor:
    local = param.detach()
    if entry.tp_dim is None or groups.tp_size == 1:
        return local
    local = local.contiguous()
    shards = [torch.empty_like(local) for _ in range(groups.tp_size)]
    dist.all_gather(shards, local, group=groups.tp)
    return M.merge_tp_shards(entry, shards)


def save_hf_checkpoint(
    buckets: Iterable[Bucket],
    out_dir: str,
    config_json: Mapping[str, Any] | str,
    tokenizer_src_dir: str | None = None,
    *,
    max_shard_bytes: int = 5 << 30,
    dtype_name: str | None = None,
) -> dict:
    """Write an HF checkpoint directory from export buckets (call on one rank only), streamed.

    Each tensor is written to its shard as it arrives (``SafetensorsShard``), so memory holds one
    bucket, never a shard (a bucket is let go before the next is requested from a stream); every
    file is created like any other file (its mode follows the umask; tokenizer files are copied by
    content, not mode).

    Args:
        buckets: from ``export_hf_state`` (consumed; tensors are moved to CPU).
        out_dir: created if missing.
        config_json: the HF config as a dict, or a path to a ``config.json`` / model directory.
        tokenizer_src_dir: directory whose tokenizer files (``TOKENIZER_FILES``) are copied.
        max_shard_bytes: a new ``model-XXXXX-of-YYYYY.safetensors`` shard starts past this size
            (always sharded names plus ``model.safetensors.index.json``, even for one shard).
        dtype_name: written as the config's ``torch_dtype`` / ``dtype`` (default: of the tensors).

    Returns:
        the ``weight_map`` (hf name -> shard file).
    """
    os.makedirs(out_dir, exist_ok=True)
    shards, current, total, seen_dtype, seen = [], None, 0, None, set()
    for bucket in buckets:
        for name, tensor in bucket:
            t = tensor.detach().to("cpu").contiguous()
            nbytes = t.numel() * t.element_size()
            if name in seen:
                raise ValueError(f"tensor {name!r} exported twice")
            if current is None or (current.names and current.nbytes + nbytes > max_shard_bytes):
                if current is not None:
                    current.close()
                current = SafetensorsShard(os.path.join(out_dir, f".shard-{len(shards) + 1:05d}.safetensors.tmp"))
                shards.append(current)
            current.add(name, t)
            seen.add(name)
            total, seen_dtype = total + nbytes, t.dtype
            del t, tensor
        # Drop this bucket before the next is asked for: the loop variable would otherwise keep it
        # alive while the stream builds the next one (two buckets resident instead of one).
        del bucket
    if current is not None:
        current.close()
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(shard.path, os.path.join(out_dir, fname))
        weight_map.update({k: fname for k in shard.names})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fh, indent=2)
    _write_config(out_dir, config_json, dtype_name or (str(seen_dtype).replace("torch.", "") if seen_dtype else None))
    if tokenizer_src_dir:
        for f in TOKENIZER_FILES:
            src = os.path.join(tokenizer_src_dir, f)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(out_dir, f))
    return weight_map


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class SafetensorsShard:
    """One safetensors file written tensor by tensor: ``add(name, tensor)`` appends the tensor's bytes
    to a data file beside ``path``; ``close()`` writes ``path`` as the header (names, dtypes, shapes,
    offsets in the order added) followed by those bytes (a kernel-side copy), then removes the data
    file. Little-endian, as the format requires (and as x86 / ARM hosts store tensors)."""

    def __init__(self, path: str):
        self.path, self.names, self.nbytes, self._header = path, [], 0, {"__metadata__": {"format": "pt"}}
        self._data = open(f"{path}.data", "wb")  # noqa: SIM115 (closed by close())

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be written to safetensors here")
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.nbytes, self.nbytes + raw.nbytes]}
        self._data.write(memoryview(raw))
        self.names.append(name)
        self.nbytes += raw.nbytes

    def close(self) -> None:
        self._data.close()
        header = json.dumps(self._header, separators=(",", ":")).encode("utf-8")
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        with open(self.path, "wb") as out, open(f"{self.path}.data", "rb") as data:
            out.write(len(header).to_bytes(8, "little") + header)
            out.flush()
            _copy_rest(data, out, self.nbytes)
        os.remove(f"{self.path}.data")


def _copy_rest(src, dst, nbytes: int) -> None:
    """Append ``nbytes`` of ``src`` to ``dst`` (``copy_file_range`` where the OS has it)."""
    copy = getattr(os, "copy_file_range", None)
    left = nbytes
    while left and copy is not None:
        try:
            n = copy(src.fileno(), dst.fileno(), min(left, 1 << 30))
        except OSError:
            break
        if n == 0:
            break
        left -= n
    if left:
        shutil.copyfileobj(src, dst, 16 << 20)


def _write_config(out_dir: str, config_json, dtype_name: str | None) -> None:
    if not isinstance(config_json, Mapping):
        config_json = read_hf_config(config_json)
    config = dict(config_json)
    if dtype_name:
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype_name
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
