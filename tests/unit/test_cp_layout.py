"""parallel.cp_layout against a naive per-sequence construction of Megatron's load-balanced layout."""

import pytest
import torch

from megatron_fipo.parallel.cp_layout import build_cp_layout, layout_from_cu_seqlens, local_token_coordinates
from tests.helpers import fresh_seeds


def naive_rank_tokens(lengths, cp, rank, align):
    """Per sequence: pad to a multiple of align, cut into 2cp chunks, keep chunks rank and 2cp-1-rank.

    Returns (global padded index, sequence, position, real?) per local token, in local order.
    """
    out, offset = [], 0
    for s, n in enumerate(lengths):
        padded = -(-n // align) * align
        c = padded // (2 * cp)
        for chunk in (rank, 2 * cp - 1 - rank):
            for pos in range(chunk * c, (chunk + 1) * c):
                out.append((offset + pos, s, pos, pos < n))
        offset += padded
    return out


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_layout_matches_naive(cp):
    for seed in fresh_seeds(4, base=cp):
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.randint(0, 40, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen)
        lengths[0] = 1  # shorter than 2 * cp
        align = 2 * cp * int(torch.randint(1, 3, (1,), generator=gen))
        for rank in range(cp):
            layout = build_cp_layout(lengths, cp, rank, align=align)
            ref = naive_rank_tokens(lengths.tolist(), cp, rank, align)
            assert layout.num_local_tokens == len(ref)
            assert layout.local_indices().tolist() == [r[0] for r in ref]
            assert layout.local_sequence_ids.tolist() == [r[1] for r in ref]
            assert layout.local_positions.tolist() == [r[2] for r in ref]
            assert layout.local_is_real.tolist() == [r[3] for r in ref]
            seq, pos = local_token_coordinates(layout.padded_cu_seqlens, cp, rank)
            assert seq.tolist() == [r[1] for r in ref] and pos.tolist() == [r[2] for r in ref]
            assert bool((layout.padded_lengths % align == 0).all())
            assert layout.local_chunk_cu_seqlens[-1] == layout.num_local_tokens


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_shard_unshard_round_trip(cp):
    gen = torch.Generator().manual_seed(11 + cp)
    lengths = [1, 7, 0, 33, 2, 300]
    n = sum(lengths)
    x = torch.randn(n, 3, generator=gen)
    layouts = [build_cp_layout(lengths, cp, r) for r in range(cp)]
    parts = [lay.shard(x, fill=-5.0) for lay in layouts]
    # every real token is on exactly one rank; padding carries the fill value
    assert sum(int(p.ne(-5.0).all(-1).sum()) for p in parts) == n
    for lay, part in zip(layouts, parts):
        assert bool((part[~lay.local_is_real] == -5.0).all())
    torch.testing.assert_close(layouts[0].unshard(parts), x, rtol=0, atol=0)
    # the full padded array is covered once by the ranks' indices
    covered = torch.cat([lay.local_indices() for lay in layouts]).sort().values
    assert covered.tolist() == list(range(layouts[0].num_padded_tokens))


def test_label_shift_before_sharding_has_no_boundary_errors():
    """Labels shifted inside each full sequence, then sharded: every local label is its successor."""
    lengths, cp = [5, 12, 1, 9], 2
    cu = torch.tensor([0, 5, 17, 18, 27])
    tokens = torch.arange(100, 127)
    labels = torch.cat([torch.cat([tokens[a + 1:b], torch.tensor([-1])]) for a, b in zip(cu[:-1], cu[1:])])
    for rank in range(cp):
        lay = layout_from_cu_seqlens(cu, cp, rank)
        t, y = lay.shard(tokens, fill=-2), lay.shard(labels, fill=-2)
        real = lay.local_is_real
        last = lay.local_positions == lay.lengths[lay.local_sequence_ids] - 1
        assert bool((y[real & ~last] == t[real & ~last] + 1).all())
        assert bool((y[real & last] == -1).all())


def test_bad_inputs():
    with pytest.raises(ValueError, match="0 <= rank < cp"):
        build_cp_layout([3], 2, 2)
    with pytest.raises(ValueError, match="multiple of 2\\*cp"):
        build_cp_layout([3], 2, 0, align=6)
    with pytest.raises(ValueError, match=">= 0"):
        build_cp_layout([3, -1], 2, 0)
    lay = build_cp_layout([3, 4], 2, 0)
    with pytest.raises(ValueError, match="7 real packed tokens"):
        lay.shard(torch.zeros(8))
    with pytest.raises(ValueError, match="one part per"):
        lay.unshard([torch.zeros(4)])
    with pytest.raises(ValueError, match="multiples of 2\\*cp"):
        local_token_coordinates(torch.tensor([0, 3]), 2, 0)
