"""The patch registry: ``Patch``, its builders, and applying / checking a tuple of patches.

Owns: the ``Patch`` record (one replaced module-level name of one upstream module), the builders
the area modules use (``patch``, ``torch_patch``, ``same``, ``with_method``, ``during``), and
``apply_patches`` / ``patches_applied`` / ``check_targets`` over a tuple of patches, with the
originals they replaced (``_APPLIED``, ``_ORIGINAL_METHODS``). Must not import: megatron at module
level (upstream modules are imported by name when patches are applied or checked) or anything
from megatron_fipo outside ``mcore.cpu_compat``.
Departs from upstream: nothing upstream is edited in place except the named attribute (or, via
``with_method``, one method of one class); ``check_targets`` reads the originals, so it still
works after patching.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from megatron_fipo.mcore.cpu_compat.cpu_torch import CPU_TORCH

_MC = "megatron.core."
CD = "torch.cuda.current_device()"  # the most common CUDA-only marker
_APPLIED: dict[str, object] = {}
_ORIGINAL_METHODS: dict[tuple[type, str], object] = {}


@dataclass(frozen=True)
class Patch:
    """One replaced module-level name.

    Attributes:
        module: upstream module, e.g. ``megatron.core.pipeline_parallel.schedules``.
        attr: the module-level name that is replaced (``torch`` for the CPU view of torch).
        sites: functions/classes of ``module`` (dotted inside it) holding the CUDA-only code.
        marker: a string found in the source of every site; its disappearance means
            upstream changed the code and the patch must be re-examined.
        why: what fails without the patch.
        replacement: ``original -> replacement``.
    """

    module: str
    attr: str
    sites: tuple[str, ...]
    marker: str
    why: str
    replacement: Callable[[object], object]

    @property
    def key(self) -> str:
        return f"{self.module}:{self.attr}"


def patch(module, attr, sites, marker, why, replacement) -> Patch:
    """A ``Patch`` of ``megatron.core.<module>``."""
    return Patch(_MC + module, attr, tuple(sites), marker, why, replacement)


def _torch_view(_original):
    return CPU_TORCH


def torch_patch(module, sites, marker, why) -> Patch:
    """A ``Patch`` that replaces ``torch`` in ``megatron.core.<module>`` with ``CPU_TORCH``."""
    return patch(module, "torch", sites, marker, why, _torch_view)


def same(replacement):
    """A ``Patch.replacement`` that ignores the original."""
    return lambda _original: replacement


def with_method(cls, name, fn):
    """Set ``cls.name = fn`` (in place, returns ``cls``) and remember the original for checks."""
    _ORIGINAL_METHODS.setdefault((cls, name), cls.__dict__[name])
    setattr(cls, name, fn)
    return cls


@contextlib.contextmanager
def _class_attr(cls: type, name: str, value):
    """Shadow ``cls.name`` with ``value`` inside the block (``cls`` must not define it itself)."""
    assert name not in cls.__dict__, (cls, name)
    setattr(cls, name, value)
    try:
        yield
    finally:
        delattr(cls, name)


def during(method: Callable, cls: type, name: str, value) -> Callable:
    """Wrap ``method`` so that ``cls.name`` is ``value`` only while it runs.

    Used where upstream calls a tensor method with a CUDA meaning in the middle of a long
    method (``param.type() == 'torch.cuda.FloatTensor'``, ``weight.data.cuda()``): the class
    attribute is shadowed for the duration of that one call and restored afterwards, so no
    other code ever sees it. Not thread-safe (model/optimizer construction is single-threaded).
    """

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with _class_attr(cls, name, value):
            return method(*args, **kwargs)

    return wrapped


def apply_patches(patches: tuple[Patch, ...]) -> None:
    """Replace every target of ``patches`` not replaced yet (AttributeError names a missing one)."""
    for p in patches:
        if p.key in _APPLIED:
            continue
        module = importlib.import_module(p.module)
        original = getattr(module, p.attr)  # AttributeError names the missing target
        setattr(module, p.attr, p.replacement(original))
        _APPLIED[p.key] = original


def patches_applied(patches: tuple[Patch, ...]) -> bool:
    """True once every target of ``patches`` has been replaced."""
    return len(_APPLIED) == len({p.key for p in patches})


def check_targets(patches: tuple[Patch, ...]) -> list[str]:
    """One message per missing module, attribute or site of ``patches``, or site without its marker."""
    problems = []
    for p in patches:
        try:
            module = importlib.import_module(p.module)
        except ImportError as err:
            problems.append(f"{p.key}: cannot import module ({err})")
            continue
        if p.key not in _APPLIED and not hasattr(module, p.attr):
            problems.append(f"{p.key}: module has no attribute {p.attr!r}")
        for site in p.sites:
            head, *rest = site.split(".")
            # Sites are read from the original objects, also after patching.
            obj = _APPLIED.get(f"{p.module}:{head}", getattr(module, head, None))
            try:
                if obj is None:
                    raise AttributeError(head)
                for part in rest:
                    obj = _ORIGINAL_METHODS.get((obj, part)) or getattr(obj, part)
                source = inspect.getsource(obj)
            except (AttributeError, TypeError, OSError) as err:
                problems.append(f"{p.key}: site {site} not found ({err!r})")
                continue
            if p.marker not in source:
                problems.append(f"{p.key}: {site} no longer contains {p.marker!r}")
    return problems
