"""algo.mismatch against a per-token Python loop."""
import math

import pytest
import torch

from megatron_fipo.algo.mismatch import MAX_KEYS, SUM_KEYS, logprob_mismatch_sums, summarize_mismatch


def _naive(a, b, m):
    diffs = [float(x) - float(y) for x, y, k in zip(a.flatten().tolist(), b.flatten().tolist(), m.flatten().tolist()) if k]
    if not diffs:
        return 0.0, 0.0, 1.0, 0.0
    n = len(diffs)
    return (sum(abs(d) for d in diffs) / n, sum(diffs) / n, sum(math.exp(abs(d)) for d in diffs) / n,
            max(abs(d) for d in diffs))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(1,), (3, 17), (2, 1)])
def test_matches_loop(seed, shape):
    g = torch.Generator().manual_seed(seed)
    a = -torch.rand(shape, generator=g) * 5
    b = a + torch.randn(shape, generator=g) * 0.3
    m = torch.rand(shape, generator=g) > 0.3
    got = summarize_mismatch(logprob_mismatch_sums(a, b, m))
    ref = _naive(a, b, m)
    assert [got[k] for k in ("rollout/logprob_abs_diff", "rollout/logprob_diff_mean",
                             "rollout/token_mult_prob_error", "rollout/logprob_abs_diff_max")] == pytest.approx(ref, rel=1e-6)


def test_split_and_sum_equals_whole():
    a, b = -torch.rand(40).double(), -torch.rand(40).double()
    whole = logprob_mismatch_sums(a, b)
    parts = [logprob_mismatch_sums(a[:13], b[:13]), logprob_mismatch_sums(a[13:], b[13:])]
    merged = {k: sum(p[k] for p in parts) for k in SUM_KEYS}
    merged.update({k: max(p[k] for p in parts) for k in MAX_KEYS})
    assert summarize_mismatch(merged) == pytest.approx(summarize_mismatch(whole))


def test_identical_and_empty():
    a = -torch.rand(5)
    out = summarize_mismatch(logprob_mismatch_sums(a, a.clone()))
    assert out["rollout/logprob_abs_diff"] == 0 and out["rollout/token_mult_prob_error"] == 1.0
    empty = summarize_mismatch(logprob_mismatch_sums(a, a + 1, torch.zeros(5, dtype=torch.bool)))
    assert empty == {"rollout/logprob_abs_diff": 0.0, "rollout/logprob_diff_mean": 0.0,
                     "rollout/token_mult_prob_error": 1.0, "rollout/logprob_abs_diff_max": 0.0}


def test_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        logprob_mismatch_sums(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="mask"):
        logprob_mismatch_sums(torch.zeros(3), torch.zeros(3), torch.ones(4))
