"""megatron_fipo.mcore.checkpoint_processes: a dist-checkpoint save starts nothing that outlives the saver.

Each case runs a one-rank gloo save (``dist_checkpointing.save`` of two small tensors under
``bounded_save_processes``) in a fresh process: a normal save leaves no child process (no results
manager, no resource tracker) and the upstream global as it found it; a saver SIGKILLed while its
forked writers are busy (megatron-core 0.16's per-bucket writer processes, held in the write by a
stand-in) takes them with it, whether it saved on the main thread or another one.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SAVER = r"""
import json, os, sys, threading, time

def main():
    import torch, torch.distributed as dist
    tmp, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
    from megatron_fipo.mcore.cpu_compat import apply_cpu_patches
    apply_cpu_patches()
    import psutil
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    from megatron_fipo.mcore.checkpoint_processes import bounded_save_processes

    if mode != "plain":
        if not hasattr(fa.FileSystemWriterAsync, "write_preloaded_data_multiproc"):
            print(json.dumps({"skip": "this megatron-core writes from threads"}), flush=True)
            return
        original = fa.FileSystemWriterAsync.write_preloaded_data

        def hold(*args, **kwargs):  # runs in each forked writer: say so, then never finish
            open(os.path.join(tmp, f"writer.{os.getpid()}"), "w").close()
            time.sleep(600)
            return original(*args, **kwargs)

        fa.FileSystemWriterAsync.write_preloaded_data = staticmethod(hold)

    def save(step):
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.randn(64, 64)),
                 "v": ShardedTensor.from_rank_offsets("v", torch.randn(8))}
        path = os.path.join(tmp, f"ckpt{step}")
        os.makedirs(path)
        with bounded_save_processes():
            dist_checkpointing.save(state, path)

    if mode == "plain":
        for step in range(2):
            save(step)
        print(json.dumps({"children": [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)],
                          "global_reset": fa._results_queue is None,
                          "files": sorted(os.listdir(os.path.join(tmp, "ckpt1")))}), flush=True)
    elif mode == "thread":
        thread = threading.Thread(target=save, args=(0,))
        thread.start()
        thread.join()
    else:
        save(0)

if __name__ == "__main__":
    main()
"""


def _saver(tmp_path, mode):
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(tmp_path), mode], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.timeout(240)
def test_a_save_leaves_no_child_process_and_the_global_unset(tmp_path):
    proc = _saver(tmp_path, "plain")
    try:
        out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["children"] == []  # no results manager, hence no resource tracker
    assert result["global_reset"]
    assert "metadata.json" in result["files"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["main_thread", "thread"])
def test_writers_die_with_a_sigkilled_saver(tmp_path, mode):
    import psutil

    from tests.helpers import alive_processes

    proc = _saver(tmp_path, mode)
    kids = []
    try:
        deadline = time.monotonic() + 200
        while len([n for n in os.listdir(tmp_path) if n.startswith("writer.")]) < 2:  # both writers hold
            if proc.poll() is not None:
                out, err = proc.communicate()
                if '"skip"' in out:
                    pytest.skip(json.loads(out.strip().splitlines()[-1])["skip"])
                pytest.fail(err[-3000:])
            assert time.monotonic() < deadline
            time.sleep(0.1)
        kids = psutil.Process(proc.pid).children(recursive=True)
        writers = {int(n.split(".")[1]) for n in os.listdir(tmp_path) if n.startswith("writer.")}
        assert writers <= {k.pid for k in kids}, (writers, kids)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while alive_processes(kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive_processes(kids), [(p.pid, p.cmdline()) for p in alive_processes(kids)]
    finally:
        for pid in [proc.pid] + [k.pid for k in kids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait()
