"""No process started by a dist-checkpoint save outlives the trainer, SIGKILL included.

Owns ``bounded_save_processes()``, the context ``mcore.checkpoint.save_checkpoint`` runs
``dist_checkpointing.save`` in. Must not import: megatron at module level, anything from megatron_fipo.

What megatron-core's synchronous save starts, and what becomes of it here:

* the write-results queue. ``filesystem_async`` keeps one queue per process in its module global
  ``_results_queue``, created at the first save as ``mp.get_context("spawn").Manager().Queue()``
  (0.16: ``_get_write_results_queue``; later releases: ``get_write_results_queue``, same global).
  That is a spawned manager server, which nothing ties to the trainer's life, and because it holds
  the pipe of multiprocessing's resource tracker (started for it), the tracker waits on it too: after
  a SIGKILL of the trainer both live on under init for good. A synchronous save fills and drains the
  queue in the saving process itself (``AsyncRequest.execute_sync`` runs the writer function
  in-process), so the queue needs no process at all: during our save the global holds a plain
  ``queue.Queue``, which the getter returns instead of starting a manager. We chose replacing over
  binding the manager to the trainer (a parent-death signal or a watch thread inside it) because no
  process is the only choice with no race at start-up, and because the manager is spawned, so a
  hook would have to travel into a fresh interpreter by some other route than ``fork``. Only an
  unset global is filled, and it is put back to None after the save, so an async save made by other
  code in the same process (not supported by ``mcore.checkpoint``) still gets its manager.
* the writer processes (0.16: ``write_preloaded_data_multiproc`` forks one process per file
  bucket, up to ``thread_count``; later releases write from threads). They are joined within the
  save, but a trainer killed mid-write would leave them writing into a ``.tmp-*`` directory that is
  never published. Every multiprocessing child forked during the save runs an after-fork hook
  (``multiprocessing.util.register_after_fork``, registered for the save only) that ends it when
  its parent is gone: ``prctl(PR_SET_PDEATHSIG)`` where the save runs on the main thread (the
  signal follows the thread that forked), else a daemon thread that polls ``getppid()``.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import multiprocessing.util
import os
import queue
import signal
import sys
import threading
import time

_WRITER_MODULE = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.2


class _Parent:
    """The saving process, as its forked children see it (weak-referenced by the after-fork registry)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        # PR_SET_PDEATHSIG fires when the forking *thread* exits: armed only for children forked by the
        # saving thread (a fork keeps the forking thread's id) when that is the main thread.
        self.pdeathsig_thread = threading.get_ident() if threading.current_thread() is threading.main_thread() else None


def _die_with_parent(parent: _Parent) -> None:
    """In a child forked during the save: exit as soon as ``parent`` is gone, however it died."""
    if parent.pdeathsig_thread == threading.get_ident() and sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent.pid:  # it died before the signal was armed
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent.pid:
            time.sleep(_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="checkpoint-writer-parent-watch", daemon=True).start()


@contextlib.contextmanager
def bounded_save_processes():
    """Run a synchronous ``dist_checkpointing.save`` so that nothing it starts outlives this process.

    The write-results queue is an in-process ``queue.Queue`` (no manager process, hence no resource
    tracker), and children forked during the block die with this process (see the module docstring).
    Not for async saves: their writer runs in another process, which an in-process queue cannot reach.
    """
    try:
        writer = importlib.import_module(_WRITER_MODULE)
    except ImportError:  # moved upstream: save as upstream does (tests/dist/test_checkpoint_processes.py fails)
        writer = None
    local = None
    if getattr(writer, "_results_queue", False) is None:  # unset: the getter would start a manager
        local = writer._results_queue = queue.Queue()
    parent = _Parent()
    multiprocessing.util.register_after_fork(parent, _die_with_parent)
    try:
        yield
    finally:
        del parent  # the registry holds it weakly: the hook is gone with it
        if local is not None and writer._results_queue is local:
            writer._results_queue = None
