"""reduce_metrics over two groups (a 2 x 2 grid of gloo ranks) against the single-process answer."""

import math

import pytest

from megatron_fipo.parallel.metrics import reduce_metrics
from tests.dist.launcher import launch


def _values(rank):
    # rank 1 and 3 play "non-last pipeline stages": they hold nothing
    if rank % 2 == 1:
        return {}, {}, {}
    return ({"a": rank + 1.5, "b": 2.0}, {"hi": 10.0 * rank - 3}, {"lo": -rank * 2.0})


def _worker():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    pp = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    dp = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    sums, maxes, mins = _values(rank)
    out = reduce_metrics(sums, maxes, mins, sum_keys=("a", "b"), max_keys=("hi",), min_keys=("lo",),
                         groups=(pp, dp))
    dist.destroy_process_group()
    return out


@pytest.mark.timeout(120)
def test_reduce_over_pipeline_then_data_parallel():
    results = launch(_worker, 4, timeout=90)
    expected = ({"a": 1.5 + 3.5, "b": 4.0}, {"hi": 17.0}, {"lo": -4.0})
    assert all(r == expected for r in results)


def test_single_process_returns_floats_and_neutral_elements():
    sums, maxes, mins = reduce_metrics({"a": 1}, {}, {}, sum_keys=("a", "b"), max_keys=("m",), min_keys=("n",))
    assert sums == {"a": 1.0, "b": 0.0} and maxes == {"m": -math.inf} and mins == {"n": math.inf}
