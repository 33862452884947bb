"""tests/dist/launcher.py: results per rank, a rank's traceback re-raised, nothing left behind."""
import os
import time

import pytest

from tests.dist.launcher import DistributedTestError, launch


def _all_reduce_rank(scale):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "sum": float(t) * scale, "pid": os.getpid()}


def _fail_on_rank_one(pid_dir):
    rank = int(os.environ["RANK"])
    with open(os.path.join(pid_dir, str(rank)), "w") as f:
        f.write(str(os.getpid()))
    if rank == 1:
        raise ValueError("rank one is broken")
    time.sleep(600)  # the others would hang in a collective; the launcher must end them


def _hang(pid_dir):
    with open(os.path.join(pid_dir, os.environ["RANK"]), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def _gone(pid_dir):
    pids = [int((pid_dir / name).read_text()) for name in os.listdir(pid_dir)]
    assert pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.timeout(60)
def test_results_are_gathered_per_rank():
    results = launch(_all_reduce_rank, 3, 2.0, timeout=50)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["sum"] == 6.0 for r in results)
    assert len({r["pid"] for r in results}) == 3


@pytest.mark.timeout(60)
def test_exception_is_reraised_with_traceback_and_survivors_killed(tmp_path):
    with pytest.raises(DistributedTestError) as err:
        launch(_fail_on_rank_one, 3, str(tmp_path), timeout=50, failure_grace=1.0)
    message = str(err.value)
    assert "rank 1 raised" in message and "ValueError: rank one is broken" in message
    assert "_fail_on_rank_one" in message  # the traceback, not just the message
    _gone(tmp_path)


@pytest.mark.timeout(60)
def test_timeout_kills_every_rank(tmp_path):
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="timed out"):
        launch(_hang, 2, str(tmp_path), timeout=6)
    assert time.monotonic() - start < 20
    _gone(tmp_path)
