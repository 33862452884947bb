"""CPU patches for ``dist_checkpointing`` save (the async filesystem writer and its finalisation).

Patches (``PATCHES``), in ``megatron.core.dist_checkpointing.strategies``: ``torch`` ->
``CPU_TORCH`` in ``filesystem_async`` (``FileSystemWriterAsync.preload_tensors`` calls
``torch.cuda.synchronize()`` after copying tensors to CPU) and ``state_dict_saver``
(``save_state_dict_async_finalize`` all-reduces its write-failure flag on the current CUDA device).
Loading needs no patch. Distributed-optimizer checkpoints go through ``mcore.checkpoint``.
Must not import: megatron at module level, anything from megatron_fipo outside ``mcore.cpu_compat``.
"""
from __future__ import annotations

from megatron_fipo.mcore.cpu_compat.registry import CD, torch_patch

PATCHES = (
    torch_patch("dist_checkpointing.strategies.filesystem_async",
                ["FileSystemWriterAsync.preload_tensors"], "torch.cuda.synchronize()",
                "torch.cuda.synchronize() after copying tensors to CPU before writing"),
    torch_patch("dist_checkpointing.strategies.state_dict_saver", ["save_state_dict_async_finalize"],
                CD, "the all-reduced write-failure flag lives on torch.cuda.current_device()"),
)
