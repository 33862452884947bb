"""discounted_suffix_sum and its composition helpers against a naive float64 loop."""

import math

import pytest
import torch

from megatron_fipo.algo import future_kl as fk
from megatron_fipo.algo.future_kl import add_carry, chunk_carries, discounted_suffix_sum
from tests.helpers import fresh_seeds, random_cu_seqlens

GAMMAS = [2.0 ** (-1.0 / 32), 2.0 ** (-1.0 / 4), 0.5, 1.0, 0.0, 1.0 - 1e-6]


def naive_suffix_sum(values: list[float], gamma: float) -> list[float]:
    """F_t = sum_{k >= t} gamma^(k - t) x_k, by the definition (O(T^2), Python floats)."""
    n = len(values)
    return [sum(gamma ** (k - t) * values[k] for k in range(t, n)) for t in range(n)]


def naive_rows(x: torch.Tensor, gamma: float) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).tolist()
    return torch.tensor([naive_suffix_sum(r, gamma) for r in rows], dtype=torch.float64).reshape(x.shape)


@pytest.mark.parametrize("length", [1, 2, 31, 32, 33, 64, 255, 256, 257, 300, 1100])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_rows_match_naive_fp64(length, gamma):
    for seed in fresh_seeds(2, base=length):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(3, length, generator=gen, dtype=torch.float64)
        x[0] = 0.0  # an all-masked row
        got = discounted_suffix_sum(x, gamma)
        assert got.dtype == torch.float64 and got.shape == x.shape
        torch.testing.assert_close(got, naive_rows(x, gamma), rtol=1e-12, atol=1e-11)
        assert torch.all(got[0] == 0)


@pytest.mark.parametrize("length", [1, 33, 1000, 20480])
def test_rows_fp32_within_rounding(length):
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(4, length, generator=gen, dtype=torch.float64)
    gamma = 2.0 ** (-1.0 / 32)
    ref = discounted_suffix_sum(x, gamma)  # validated against the naive loop above
    got = discounted_suffix_sum(x.float(), gamma)
    assert got.dtype == torch.float32
    scale = ref.abs().max().item()
    assert (got.double() - ref).abs().max().item() <= 1e-6 * max(scale, 1.0) * 8


def test_long_sequences_gamma_near_one_stay_finite_and_exact():
    gen = torch.Generator().manual_seed(7)
    length = 100_000
    x = torch.randn(2, length, generator=gen, dtype=torch.float64)
    for gamma in (1.0 - 1e-6, 1.0, 2.0 ** (-1.0 / 32)):
        got = discounted_suffix_sum(x, gamma)
        assert torch.isfinite(got).all()
        # Reverse recurrence in float64, O(T) but sequential: a second independent reference.
        ref = torch.empty_like(x)
        acc = torch.zeros(2, dtype=torch.float64)
        for t in range(length - 1, length - 3001, -1):  # the last 3000 tokens
            acc = x[:, t] + gamma * acc
            ref[:, t] = acc
        torch.testing.assert_close(got[:, -3000:], ref[:, -3000:], rtol=1e-10, atol=1e-9)
        # The first token: compare with a float64 dot product of the full row.
        weights = torch.pow(torch.tensor(gamma, dtype=torch.float64), torch.arange(length, dtype=torch.float64))
        first = (x * weights).sum(-1)
        torch.testing.assert_close(got[:, 0], first, rtol=1e-9, atol=1e-8)
        got32 = discounted_suffix_sum(x.float(), gamma)
        assert torch.isfinite(got32).all()
        assert (got32.double() - got).abs().max() <= 1e-5 * got.abs().max().clamp(min=1)


@pytest.mark.parametrize("seed", fresh_seeds(6, base=3))
def test_packed_matches_per_sequence_naive(seed):
    gen = torch.Generator().manual_seed(seed)
    cu = random_cu_seqlens(gen, num_seqs=int(torch.randint(1, 9, (1,), generator=gen)), max_len=300)
    x = torch.randn(int(cu[-1]), generator=gen, dtype=torch.float64)
    for gamma in (2.0 ** (-1.0 / 32), 0.5, 1.0):
        got = discounted_suffix_sum(x, gamma, cu_seqlens=cu)
        ref = [naive_suffix_sum(x[cu[i]:cu[i + 1]].tolist(), gamma) for i in range(len(cu) - 1)]
        ref = torch.tensor([v for r in ref for v in r], dtype=torch.float64)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-11)


def test_packed_equals_padded_rows_and_ignores_padding():
    gen = torch.Generator().manual_seed(11)
    lengths = [1, 31, 32, 33, 700, 64, 0, 5]
    rows = torch.zeros(len(lengths), max(lengths), dtype=torch.float64)
    pieces = []
    for i, n in enumerate(lengths):
        rows[i, :n] = torch.randn(n, generator=gen, dtype=torch.float64)
        pieces.append(rows[i, :n])
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    gamma = 2.0 ** (-1.0 / 32)
    packed = discounted_suffix_sum(torch.cat(pieces), gamma, cu_seqlens=cu)
    padded = discounted_suffix_sum(rows, gamma)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(packed[cu[i]:cu[i + 1]], padded[i, :n], rtol=1e-13, atol=1e-13)


def test_half_precision_inputs_compute_in_fp32_and_no_grad():
    x = torch.randn(2, 70, dtype=torch.bfloat16, requires_grad=True)
    got = discounted_suffix_sum(x, 0.9)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), naive_rows(x.detach().double(), 0.9), rtol=1e-5, atol=1e-5)


def test_empty_inputs():
    assert discounted_suffix_sum(torch.zeros(3, 0), 0.9).shape == (3, 0)
    assert discounted_suffix_sum(torch.zeros(0, 5), 0.9).shape == (0, 5)
    cu = torch.tensor([0, 0, 0])
    assert discounted_suffix_sum(torch.zeros(0), 0.9, cu_seqlens=cu).shape == (0,)


def test_leading_dims_and_1d_rows():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 40, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(discounted_suffix_sum(x, 0.8), naive_rows(x, 0.8))
    torch.testing.assert_close(discounted_suffix_sum(x[0, 0], 0.8), naive_rows(x[0, 0], 0.8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.zeros(4), gamma=1.5), "gamma"),
        (dict(x=torch.zeros(4), gamma=-0.1), "gamma"),
        (dict(x=torch.zeros(4), gamma=float("nan")), "gamma"),
        (dict(x=torch.zeros(4, dtype=torch.int64), gamma=0.5), "float"),
        (dict(x=torch.zeros(2, 4), gamma=0.5, cu_seqlens=torch.tensor([0, 8])), "packed"),
        (dict(x=torch.zeros(4), gamma=0.5, cu_seqlens=torch.tensor([0, 3])), "cu_seqlens"),
        (dict(x=torch.zeros(4), gamma=0.5, cu_seqlens=torch.tensor([0, 3, 2, 4])), "cu_seqlens"),
        (dict(x=torch.zeros(4), gamma=0.5, cu_seqlens=torch.tensor([1, 4])), "cu_seqlens"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    x = kwargs.pop("x")
    with pytest.raises(ValueError, match=match):
        discounted_suffix_sum(x, **kwargs)


@pytest.mark.parametrize("seed", fresh_seeds(8, base=9))
def test_chunk_composition_reassembles_the_full_scan(seed):
    """What the context-parallel scan does: local scans per chunk + carries == full scan."""
    gen = torch.Generator().manual_seed(seed)
    num_chunks = int(torch.randint(1, 9, (1,), generator=gen))
    lengths = torch.randint(0, 90, (num_chunks,), generator=gen)
    total = int(lengths.sum())
    x = torch.randn(total, generator=gen, dtype=torch.float64)
    gamma = [2.0 ** (-1.0 / 32), 0.5, 1.0][seed % 3]
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    local = discounted_suffix_sum(x, gamma, cu_seqlens=cu)  # each chunk alone
    totals = torch.stack([local[cu[c]] if lengths[c] > 0 else torch.tensor(0.0, dtype=torch.float64)
                          for c in range(num_chunks)])
    carries = chunk_carries(totals, lengths, gamma)
    assert carries[-1] == 0
    combined = add_carry(local, carries, gamma, cu_seqlens=cu)
    full = torch.tensor(naive_suffix_sum(x.tolist(), gamma), dtype=torch.float64)
    torch.testing.assert_close(combined, full, rtol=1e-12, atol=1e-11)


def test_chunk_carries_batched_over_sequences():
    gen = torch.Generator().manual_seed(1)
    totals = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, 10, (5, 4), generator=gen)
    got = chunk_carries(totals, lengths, 0.9)
    for s in range(5):
        torch.testing.assert_close(got[s], chunk_carries(totals[s], lengths[s], 0.9))
        starts = torch.cumsum(lengths[s], 0) - lengths[s]
        for c in range(4):
            end = int(starts[c] + lengths[s, c])
            expect = sum(0.9 ** int(starts[k] - end) * totals[s, k].item() for k in range(c + 1, 4))
            assert abs(got[s, c].item() - expect) < 1e-12


def test_block_size_is_an_implementation_detail(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2000, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 3, 1500, 4000])
    ref = discounted_suffix_sum(x, 0.97)
    ref_packed = discounted_suffix_sum(x.reshape(-1), 0.97, cu_seqlens=cu)
    for block, dense in ((4, 4), (8, 16), (64, 64)):
        monkeypatch.setattr(fk, "BLOCK", block)
        monkeypatch.setattr(fk, "DENSE_MAX", dense)
        torch.testing.assert_close(discounted_suffix_sum(x, 0.97), ref, rtol=1e-12, atol=1e-11)
        torch.testing.assert_close(discounted_suffix_sum(x.reshape(-1), 0.97, cu_seqlens=cu), ref_packed,
                                   rtol=1e-12, atol=1e-11)


def test_matches_release_chunked_matmul():
    """The released algorithm (dense [T x 128] decay blocks) gives the same numbers."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 400, generator=gen, dtype=torch.float64)
    gamma = 2.0 ** (-1.0 / 32)
    t = x.shape[1]
    pos = torch.arange(t).unsqueeze(1)
    release = torch.zeros_like(x)
    for start in range(0, t, 128):
        j = torch.arange(start, min(t, start + 128)).unsqueeze(0)
        dist = j - pos
        block = torch.pow(torch.tensor(gamma, dtype=torch.float64), dist.clamp(min=0)) * (dist >= 0)
        release += x[:, start:start + 128] @ block.T
    torch.testing.assert_close(discounted_suffix_sum(x, gamma), release, rtol=1e-12, atol=1e-11)
    assert math.isclose(release[0, -1].item(), x[0, -1].item())
