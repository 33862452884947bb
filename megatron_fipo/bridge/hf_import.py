"""HF safetensors -> this rank's Megatron parameters, reading only the slices the rank holds.

Owns ``HFCheckpoint`` (the tensor-name -> file index of an HF directory, single-file or sharded
with ``model.safetensors.index.json``, read through ``safetensors.safe_open(...).get_slice``, each
file mapped only for the read that needs it, so the pages read do not stay in the process's RSS)
and ``load_hf_into_chunks``: every local parameter (by local name, chunk prefix and pipeline layer
offset resolved through ``qwen2_mapping``) is filled from the HF slices of its TP shard and
checked to be written exactly once; the checkpoint's tensor names are checked against the table.

Must not import megatron or megatron_fipo.mcore; torch.distributed is not needed (each rank reads
its own slices from a shared file system).

Departures: padded vocab rows are written as zeros (they are masked out of every softmax); a
tied checkpoint that nevertheless carries ``lm_head.weight`` is accepted and that tensor ignored.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence

import torch

from megatron_fipo.bridge import qwen2_mapping as M

INDEX = "model.safetensors.index.json"


class HFCheckpoint:
    """The tensor index of an HF model directory (every file's header checked on construction);
    ``names`` and ``read(name, dim, start, stop)``. Holds no open file between reads."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, INDEX)
        if os.path.exists(index):
            weight_map = _read_index(index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))
            weight_map = None
        if not files:
            raise ValueError(f"{hf_dir}: no *.safetensors files (only safetensors HF checkpoints are supported)")
        self._paths = {}
        names = {}
        for f in files:
            path = os.path.join(hf_dir, f)
            try:  # safe_open checks the header against the file size: a truncated download fails here
                with safe_open(path, framework="pt") as handle:
                    names[f] = list(handle.keys())
            except Exception as err:  # SafetensorError (not an OSError subclass), FileNotFoundError
                raise ValueError(f"{path}: not a readable safetensors file ({err}); the file is damaged or "
                                 f"incomplete: re-download the model or re-export it") from None
            self._paths[f] = path
        if weight_map is None:
            weight_map = {k: f for f, keys in names.items() for k in keys}
        self.weight_map = weight_map

    @property
    def names(self) -> set:
        return set(self.weight_map)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name``, or only ``[start, stop)`` along ``dim`` (a ``get_slice`` read)."""
        if name not in self.weight_map:
            raise KeyError(f"{self.hf_dir}: checkpoint has no tensor {name!r}")
        from safetensors import safe_open

        # The file is mapped for this one read only: a mapping kept open for the whole load would
        # count every page read so far in the process's RSS (RssFile: as much as the checkpoint)
        with safe_open(self._paths[self.weight_map[name]], framework="pt") as handle:
            if dim is None:
                return handle.get_tensor(name)
            sl = handle.get_slice(name)
            return sl[start:stop] if dim == 0 else sl[:, start:stop]


def _read_index(path: str) -> dict:
    """``weight_map`` of a sharded checkpoint's index, or a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError / UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not a safetensors index with a 'weight_map' ({type(err).__name__}: {err}); "
                         "re-download the model or re-export it") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path}: 'weight_map' must map tensor names to files; re-download the model or re-export it")
    return weight_map


def check_hf_names(present: Iterable[str], arch) -> None:
    """ValueError naming the tensors a Qwen2 checkpoint of ``arch`` lacks or should not have."""
    present = set(present)
    expected = set(M.expected_hf_names(arch.num_layers, arch.tie_word_embeddings))
    if arch.tie_word_embeddings:
        present.discard("lm_head.weight")
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ValueError(f"HF checkpoint does not match the Qwen2 table: missing {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}, unexpected {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}")


def load_hf_into_chunks(
    hf_dir: str,
    named_params: Iterable[tuple[str, torch.Tensor]],
    arch,
    *,
    tp_rank: int,
    tp_size: int,
    padded_vocab: int,
    layer_offsets: Sequence[int],
    spec: str = "mcore",
) -> int:
    """Copy an HF Qwen2 checkpoint into this rank's Megatron parameters.

    Args:
        hf_dir: HF model directory (``*.safetensors``, optionally sharded with an index).
        named_params: ``(local name, parameter)`` of this rank, e.g. ``Actor.named_local_parameters()``
            (``chunk{i}.`` prefixes for virtual pipeline chunks).
        arch: ``Qwen2Arch`` (fields only: sizes, heads, vocab, tie_word_embeddings).
        tp_rank, tp_size: this rank's tensor-parallel coordinates.
        padded_vocab: rows of the (full) Megatron embedding / output layer.
        layer_offsets: global index of the first layer of each chunk (``uniform_layer_offsets`` or
            ``layer_number - 1`` of each chunk's first layer).
        spec: ``"mcore"`` (local spec names) or ``"te"`` (Transformer Engine spec names).

    Returns:
        number of parameters written.

    Raises:
        ValueError: the checkpoint misses / has extra tensors, a parameter has no mapping or the
            wrong shape, or a parameter is written twice / never.
    """
    named = list(named_params)
    written: dict[str, int] = {n: 0 for n, _ in named}
    ckpt = HFCheckpoint(hf_dir)
    check_hf_names(ckpt.names, arch)
    with torch.no_grad():
        for name, entry, layer, param in _resolve(named, layer_offsets, spec):
            if entry is M.OUTPUT_LAYER and arch.tie_word_embeddings:
                entry = _TIED_OUTPUT  # the last stage's copy of the tied embedding
            local = _local_tensor(ckpt, entry, layer, arch, padded_vocab, tp_rank, tp_size)
            if tuple(local.shape) != tuple(param.shape):
                raise ValueError(f"{name}: HF {M.hf_names(entry, layer)} give shape {tuple(local.shape)} at "
                                 f"tp rank {tp_rank}/{tp_size}, the parameter is {tuple(param.shape)}")
            param.copy_(local)
            written[name] += 1
    bad = {n: c for n, c in written.items() if c != 1}
    if bad:
        raise ValueError(f"parameters not written exactly once (name: count): {bad}")
    return len(written)


_TIED_OUTPUT = M.Entry("output_layer.weight", "output_layer.weight", M.EMBEDDING.hf, M.VOCAB, 0)


def _resolve(named, layer_offsets, spec):
    try:
        yield from M.iter_global(named, layer_offsets, spec=spec)
    except KeyError as err:
        raise ValueError(str(err.args[0])) from None


def _local_tensor(ckpt: HFCheckpoint, entry: M.Entry, layer, arch, padded_vocab, tp_rank, tp_size) -> torch.Tensor:
    ranges = M.shard_rows(entry, arch, padded_vocab, tp_rank, tp_size)
    dim = entry.tp_dim
    parts = [ckpt.read(hf, dim, start, stop) if dim is not None else ckpt.read(hf)
             for hf, (start, stop) in zip(M.hf_names(entry, layer), ranges)]
    return M.assemble_local(entry, parts, arch, padded_vocab, tp_size, tp_rank)

