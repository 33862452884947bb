"""Which checkpoint directories of a root can be loaded: completion marker, integrity record, resume order.

Owns the reading side of the layout that ``mcore.checkpoint`` writes (``MARKER``, ``LATEST``,
``iter_NNNNNNN``): ``latest_checkpoint``, ``read_checkpoint_meta``, ``resolve_checkpoint`` (what a
user passed: a run directory, a checkpoint root or one checkpoint), ``resume_candidates`` (the
order a resume tries), ``checkpoint_problem`` and the integrity record (``integrity_record``,
taken by rank 0 at publication and stored under ``files`` in the marker; ``check_integrity``).

Two kinds of checkpoint (``contents`` in the marker, ``checkpoint_contents``): a *training* one
(saved with its optimizer: model, optimizer, scheduler and RNG state) and a *model-only* one (no
optimizer: the model chunks' tensors in their own dtype, ``iteration`` and ``extra``), which is
what ``convert --to-mcore`` writes. A model-only checkpoint loads as weights (an export, an
evaluation, a run's initial weights); asked to resume a training state, ``mcore.checkpoint``
refuses it with one line naming ``model.init_checkpoint``.

Pure file system: must not import megatron, torch.distributed or the rest of megatron_fipo.

The record maps every file's path (relative to the checkpoint directory, the marker excluded)
to ``[size, adler32]``; the checksum is taken only for files of at most ``CHECKSUM_MAX_BYTES``
(dist_checkpointing's ``.metadata``, ``metadata.json``, ``common.pt``, a tiny model's shards).
A check costs one ``stat`` per file plus reading those small files.

Catches: a missing file, a truncated or extended one (any size change, e.g. a copy or a disk
that filled up), and any change of content in a small file. Does not catch: same-size damage
inside a large shard (its bytes are not read: that would cost as much as the load itself) nor a
file added later. Those surface as a failing load, which ``load_latest_checkpoint`` also skips.
Checkpoints saved before the record existed have none and are not checked.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import zlib

MARKER = "fipo_checkpoint.json"
LATEST = "latest"
TRAINING, MODEL_ONLY = "training", "model"  # the marker's ``contents``


def checkpoint_contents(meta: dict) -> str:
    """``"training"`` or ``"model"`` (model-only) of a checkpoint's marker; markers written before
    ``contents`` existed are training checkpoints (they were written with their optimizer state)."""
    return meta.get("contents", TRAINING)


def params_dtype_name(chunks: list) -> str | None:
    """The dtype name of this rank's parameters (e.g. ``"bfloat16"``), for the marker; None without any."""
    for chunk in chunks:
        for p in chunk.parameters():
            return str(p.dtype).replace("torch.", "")
    return None
CHECKSUM_MAX_BYTES = 1 << 20
_ITER = re.compile(r"^iter_(\d{7,})$")
_WHAT_TO_PASS = ("pass a run directory RUN_DIR, its checkpoints directory RUN_DIR/checkpoints, or one of "
                 "its iter_NNNNNNN directories")


# ------------------------------------------------------------------------------ find
def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint directory under ``root``, or None.

    Trusts ``root/latest`` when it names an existing complete ``iter_*`` directory; otherwise
    scans ``iter_*`` directories with a completion marker (``.tmp-*`` saves are ignored).
    Completeness only: see ``resume_candidates`` / ``checkpoint_problem`` for damage.
    """
    found = resume_candidates(root)
    return found[0] if found else None


def resume_candidates(root: str) -> list[str]:
    """Complete checkpoint directories of ``root`` in the order a resume tries them.

    The one ``root/latest`` names comes first, then the older complete ones, newest first
    (newer ones, left by an abandoned continuation of the run, are not tried). Without a valid
    ``latest``: every complete one, newest first.
    """
    if not os.path.isdir(root):
        return []
    root = os.path.abspath(root)
    found = sorted(_complete_dirs(root), reverse=True)
    name = None
    with contextlib.suppress(OSError), open(os.path.join(root, LATEST), encoding="utf-8") as fh:
        name = fh.read().strip()
    named = [(s, n) for s, n in found if n == name]
    if named:
        found = named + [(s, n) for s, n in found if s < named[0][0]]
    return [os.path.join(root, n) for _, n in found]


def _complete_dirs(root: str) -> list[tuple[int, str]]:
    """(step, name) of every ``iter_*`` directory with a completion marker."""
    matches = [_ITER.match(name) for name in os.listdir(root)]
    return [(int(m.group(1)), m.group(0)) for m in matches
            if m and os.path.isfile(os.path.join(root, m.group(0), MARKER))]


def read_checkpoint_meta(path: str) -> dict:
    """The completion marker of checkpoint directory ``path`` (ValueError if incomplete)."""
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} does not exist or is not a directory; {_WHAT_TO_PASS}")
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {path!r} is incomplete (no valid {MARKER}: a crashed or foreign "
                         f"save, or not a checkpoint directory); {_WHAT_TO_PASS}") from err


def checkpoint_problem(path: str) -> str | None:
    """Why checkpoint directory ``path`` cannot be loaded, as far as the file system tells; or None."""
    try:
        meta = read_checkpoint_meta(path)
    except ValueError as err:
        return str(err)
    return check_integrity(path, meta.get("files"))


def resolve_checkpoint(path: str, *, hint: str = "") -> tuple[str, str]:
    """What ``path`` names: ``("root", checkpoint root)`` or ``("dir", one checkpoint directory)``.

    A run directory (holding ``checkpoints/``) stands for its checkpoint root. A root must hold
    at least one complete checkpoint.

    Raises:
        ValueError: ``path`` is missing, an incomplete checkpoint, or holds no complete one;
            the message says what to pass (``hint`` is appended to it, e.g.
            ``", or checkpoint.resume=auto"``).
    """
    fix = _WHAT_TO_PASS + hint
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} does not exist or is not a directory; {fix}")
    path = os.path.abspath(path)
    if _ITER.match(os.path.basename(path)) or os.path.exists(os.path.join(path, MARKER)):
        read_checkpoint_meta(path)  # ValueError when incomplete
        return "dir", path
    run_root = os.path.join(path, "checkpoints")
    if not resume_candidates(path) and os.path.isdir(run_root):
        path = run_root
    if not resume_candidates(path):
        raise ValueError(f"{path!r} holds no complete checkpoint (no iter_NNNNNNN directory with a {MARKER}); "
                         f"{fix}")
    return "root", path


def integrity_record(path: str, *, skip: tuple[str, ...] = ()) -> dict[str, list]:
    """``{relative path: [size, adler32 or None]}`` of every file under ``path``.

    Args:
        path: a checkpoint directory, completely written.
        skip: relative paths left out (the completion marker, written after the record).
    """
    record = {}
    for rel in _files(path):
        if rel in skip:
            continue
        full = os.path.join(path, rel)
        size = os.path.getsize(full)
        record[rel] = [size, _adler32(full) if size <= CHECKSUM_MAX_BYTES else None]
    return record


def check_integrity(path: str, record: dict | None) -> str | None:
    """The first difference between directory ``path`` and its ``record``, or None.

    Args:
        path: a checkpoint directory.
        record: from ``integrity_record`` (None or empty: nothing to check, e.g. an older save).

    Returns:
        None when every recorded file is there with its size (and checksum), else a sentence
        naming the file, e.g. ``"__0_0.distcp is 100 bytes, 4096 when saved (truncated?)"``.
    """
    for rel, (size, checksum) in sorted((record or {}).items()):
        full = os.path.join(path, rel)
        try:
            now = os.path.getsize(full)
        except OSError:
            return f"{rel} is missing"
        if now != size:
            return f"{rel} is {now} bytes, {size} when saved ({'truncated' if now < size else 'grown'}?)"
        if checksum is not None and _adler32(full) != checksum:
            return f"{rel} has other content than when saved (adler32 differs)"
    return None


def _files(path: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(path):
        out.extend(os.path.relpath(os.path.join(dirpath, n), path) for n in names)
    return sorted(out)


def _adler32(path: str) -> int:
    value = 1
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            value = zlib.adler32(block, value)
    return value
