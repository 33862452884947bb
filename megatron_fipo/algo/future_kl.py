"""Discounted reverse scans for FIPO's Future-KL, in O(T) time and memory.

Owns ``discounted_suffix_sum`` (``F_t = sum_{k >= t} gamma^(k - t) x_k``, inclusive of the
current token) and the two composition steps that the context-parallel scan
(``megatron_fipo.parallel.cp_scan``) reuses: ``add_carry`` (fold the discounted total of
everything after a chunk into that chunk's local scan) and ``chunk_carries`` (the carry each
chunk of a sequence receives from the chunks after it).

Imports torch only: no torch.distributed, no megatron, no config objects.

Departs from the released FIPO code, which builds a dense ``[T x 128]`` decay block per
128-column chunk and multiplies it in (O(B * T^2) work, blocks kept alive by autograd). Here the
recurrence ``F_t = x_t + gamma * F_{t+1}`` is solved as a blocked scan: inside blocks of
``BLOCK`` tokens a closed form (one small matmul with the ``[BLOCK x BLOCK]`` decay matrix),
then each block's discounted total is itself a discounted suffix sum with ``gamma^BLOCK`` over
the blocks (recursion, depth ``log_BLOCK(T)``), and the carries are folded back. Every power of
gamma used has a non-negative exponent, so nothing overflows for T = 100k and gamma near 1.
Everything runs under ``no_grad`` (Future-KL is stop-grad in FIPO).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

BLOCK = 32
"""Tokens per block of the closed form. Work is ~2*BLOCK flops per token."""
DENSE_MAX = 256
"""Rows up to this length (the top levels of the recursion) use one dense decay matmul."""


def discounted_suffix_sum(
    x: torch.Tensor, gamma: float, *, cu_seqlens: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Discounted reverse sum ``F_t = sum_{k >= t} gamma^(k - t) * x_k`` per sequence.

    Args:
        x: ``[..., T]`` padded rows (the scan runs over the last dimension; zero padding at the
            end of a row does not change earlier values), or packed 1-D tokens ``[N]`` when
            ``cu_seqlens`` is given. float32 or float64; float16/bfloat16 are computed and
            returned in float32.
        gamma: discount in ``[0, 1]`` (FIPO: ``2 ** (-1 / decay_rate)``).
        cu_seqlens: optional int tensor ``[S + 1]``, non-decreasing, ``cu_seqlens[0] == 0`` and
            ``cu_seqlens[-1] == N``; sequence ``s`` is ``x[cu_seqlens[s]:cu_seqlens[s + 1]]``.
            Empty sequences are allowed.

    Returns:
        Tensor of ``x``'s shape and dtype (float32 for half inputs), no grad.
    """
    x = _check_input(x, gamma, cu_seqlens)
    with torch.no_grad():
        if cu_seqlens is not None:
            return _scan_packed(x, float(gamma), sequence_lengths(cu_seqlens, x.shape[0], x.device))
        if x.shape[-1] == 0 or x.numel() == 0:
            return x.clone()
        rows = x.reshape(-1, x.shape[-1])
        return _scan_rows(rows, float(gamma)).reshape(x.shape)


def add_carry(
    local: torch.Tensor,
    carry: torch.Tensor,
    gamma: float,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fold into each segment's local scan the discounted total of what follows it.

    For a segment of length ``n`` whose local scan is ``F_local`` and whose successor (the rest
    of the sequence after the segment) has discounted total ``carry`` at its first token, the
    scan of the whole is ``F_i = F_local_i + gamma^(n - i) * carry`` for ``i`` in ``[0, n)``.

    Args:
        local: ``[..., n]`` rows (one segment per row), or packed ``[N]`` with ``cu_seqlens``.
        carry: ``[...]`` one value per row, or ``[S]`` one per packed segment.
        gamma: discount in ``[0, 1]``.
        cu_seqlens: ``[S + 1]`` segment offsets into packed ``local``.
        out: write the result here (may be ``local`` itself, for rows).

    Returns:
        Tensor like ``local``.
    """
    if cu_seqlens is None:
        powers = _powers(float(gamma), local.shape[-1], local.dtype, local.device)  # gamma^n..gamma^1
        return torch.addcmul(local, powers, carry.unsqueeze(-1).to(local.dtype), out=out)
    lengths = sequence_lengths(cu_seqlens, local.shape[0], local.device)
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=local.device), lengths)
    ends = torch.cumsum(lengths, 0)
    dist = ends[seg] - torch.arange(local.shape[0], device=local.device)  # n - i, in [1, n]
    powers = torch.pow(torch.tensor(float(gamma), dtype=torch.float64, device=local.device), dist)
    return torch.addcmul(local, powers.to(local.dtype), carry.to(local.dtype)[seg], out=out)


def chunk_carries(totals: torch.Tensor, lengths: torch.Tensor, gamma: float) -> torch.Tensor:
    """Carry each chunk of a sequence receives from the chunks after it.

    With chunks ``0..C-1`` of one sequence in order, ``totals[c]`` the discounted total of chunk
    ``c`` at its first token and ``lengths[c]`` its length, the carry of chunk ``c`` is the scan
    value at the first token after it: ``sum_{c' > c} gamma^(start[c'] - end[c]) * totals[c']``.
    O(C^2) per sequence, meant for the few chunks of a context-parallel layout.

    Args:
        totals: ``[..., C]`` float.
        lengths: ``[..., C]`` (or ``[C]``) int, chunk lengths (zero allowed).
        gamma: discount in ``[0, 1]``.

    Returns:
        ``[..., C]`` carries in ``totals``' dtype; the last chunk's carry is 0.
    """
    lengths = lengths.to(device=totals.device, dtype=torch.int64)
    starts = torch.cumsum(lengths, -1) - lengths
    ends = starts + lengths
    c = totals.shape[-1]
    later = torch.triu(torch.ones(c, c, dtype=torch.bool, device=totals.device), diagonal=1)
    exponent = (starts.unsqueeze(-2) - ends.unsqueeze(-1)).clamp(min=0)  # [..., c, c']
    g = torch.tensor(float(gamma), dtype=torch.float64, device=totals.device)
    weights = torch.where(later, torch.pow(g, exponent), torch.zeros((), dtype=torch.float64))
    return (weights.to(totals.dtype) * totals.unsqueeze(-2)).sum(-1)


def _scan_rows(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Blocked scan over the last dim of a 2-D ``[R, T]`` tensor, T >= 1."""
    rows, t = x.shape
    if t <= DENSE_MAX:
        return x @ _decay_matrix(gamma, t, x.dtype, x.device).T
    nb = -(-t // BLOCK)
    if nb * BLOCK != t:
        x = torch.nn.functional.pad(x, (0, nb * BLOCK - t))
    local = x.reshape(rows * nb, BLOCK) @ _decay_matrix(gamma, BLOCK, x.dtype, x.device).T
    local = local.view(rows, nb, BLOCK)
    starts = _scan_rows(local[..., 0], gamma**BLOCK)  # scan value at each block's start
    carry = torch.nn.functional.pad(starts[:, 1:], (0, 1))  # value at the next block's start
    out = add_carry(local, carry, gamma, out=local)
    return out.view(rows, nb * BLOCK)[:, :t]


def _scan_packed(x: torch.Tensor, gamma: float, lengths: torch.Tensor) -> torch.Tensor:
    """Blocked scan of packed sequences: each sequence is laid out in whole blocks."""
    if x.numel() == 0:
        return x.clone()
    dev = x.device
    nblocks = -(-lengths // BLOCK)
    block_off = torch.cumsum(nblocks, 0) - nblocks
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths)
    tok_off = torch.cumsum(lengths, 0) - lengths
    slot = block_off[seq] * BLOCK + (torch.arange(x.numel(), device=dev) - tok_off[seq])
    total_blocks = int(nblocks.sum())
    blocks = x.new_zeros(total_blocks * BLOCK).index_copy_(0, slot, x).view(-1, BLOCK)
    local = blocks @ _decay_matrix(gamma, BLOCK, x.dtype, dev).T
    if int(nblocks.max()) > 1:
        starts = _scan_packed(local[:, 0].contiguous(), gamma**BLOCK, nblocks)
        carry = torch.nn.functional.pad(starts[1:], (0, 1))
        last = (block_off + nblocks - 1)[nblocks > 0]
        carry[last] = 0  # nothing after a sequence's last block
        local = add_carry(local, carry, gamma)
    return local.reshape(-1)[slot]


@functools.lru_cache(maxsize=64)
def _decay_matrix_cached(gamma: float, n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    idx = torch.arange(n, dtype=torch.float64)
    dist = idx.unsqueeze(0) - idx.unsqueeze(1)  # [i, j] = j - i
    w = torch.where(dist >= 0, torch.pow(torch.tensor(gamma, dtype=torch.float64), dist.clamp(min=0)), 0.0)
    return w.to(dtype=dtype, device=device)


def _decay_matrix(gamma: float, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``W[i, j] = gamma^(j - i)`` for ``j >= i`` else 0 (built in float64, cast once)."""
    return _decay_matrix_cached(gamma, n, dtype, str(device))


@functools.lru_cache(maxsize=64)
def _powers_cached(gamma: float, n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    k = torch.arange(n, 0, -1, dtype=torch.float64)
    return torch.pow(torch.tensor(gamma, dtype=torch.float64), k).to(dtype=dtype, device=device)


def _powers(gamma: float, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[gamma^n, ..., gamma^1]``: the discount from each of n positions to the segment end."""
    return _powers_cached(gamma, n, dtype, str(device))


def sequence_lengths(
    cu_seqlens: torch.Tensor, n_tokens: Optional[int] = None, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Validated ``[S]`` int64 lengths from ``[S + 1]`` offsets (ValueError on bad offsets).

    Args:
        cu_seqlens: 1-D int offsets, starting at 0, non-decreasing.
        n_tokens: when given, ``cu_seqlens[-1]`` must equal it.
        device: where the lengths go (default: ``cu_seqlens``' device).
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or torch.is_floating_point(cu_seqlens) or cu_seqlens.is_complex():
        raise ValueError(f"cu_seqlens must be a 1-D int tensor [S + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.to(device=device if device is not None else cu_seqlens.device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or (n_tokens is not None and int(cu[-1]) != n_tokens) or bool((lengths < 0).any()):
        shown = cu.tolist() if cu.numel() <= 16 else (cu[:8].tolist(), "...", cu[-8:].tolist())
        end = f" and end at the token count {n_tokens}" if n_tokens is not None else ""
        raise ValueError(f"cu_seqlens must start at 0, be non-decreasing{end}; got {shown}")
    return lengths


def _check_input(x: torch.Tensor, gamma: float, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    g = float(gamma)
    if not (math.isfinite(g) and 0.0 <= g <= 1.0):
        raise ValueError(f"gamma must be in [0, 1] (gamma = 2**(-1/decay_rate)), got {gamma}")
    if not torch.is_floating_point(x):
        raise ValueError(f"x must be a float tensor, got {x.dtype}")
    if cu_seqlens is not None and x.dim() != 1:
        raise ValueError(f"with cu_seqlens, x must be packed 1-D tokens [N], got shape {tuple(x.shape)}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the token dimension)")
    x = x.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x
