"""Build-time helpers of the Dockerfile: SGLang's requirements without the torch family, and the final check.

Usage (inside the image build; see Dockerfile)::

    python tools/image_check.py requirements sglang > reqs.txt    # Requires-Dist minus torch/torchvision/...
    python tools/image_check.py check --mcore 0.16.1              # sglang: the version of tools/sglang_pin.txt

Owns the pairing rule of the image: NVIDIA's PyTorch container brings torch, Transformer Engine and
apex built together, and SGLang pins one exact torch release that its kernels (sgl-kernel,
flashinfer) are built against. The image keeps the container's torch, so SGLang's pinned torch must
have the container's ``major.minor`` (``torch_pin`` / ``same_minor``); the torch family is left out
of SGLang's requirements (``filter_requirements``) so pip never replaces it. ``check`` imports the
whole stack and fails the build with the reason. ``PAIRS`` records the pairings this repository
uses, checked against the Dockerfile and setup.py by tests/unit/test_dockerfile.py and against the
pinned wheel's metadata by tests/unit/test_sglang_schema.py. ``read_pin`` reads the one SGLang pin,
``tools/sglang_pin.txt`` (version and wheel hashes). Stdlib plus ``packaging`` (present in the
container and wherever pip is).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import os
import re
import sys
from typing import Callable, Iterable, Optional, Sequence

from packaging.requirements import Requirement

TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "triton", "pytorch-triton"}
# base image -> its torch major.minor; SGLang release -> the torch it pins (from its wheel metadata)
PAIRS = {"images": {"nvcr.io/nvidia/pytorch:26.09-py3": "2.14"}, "sglang": {"0.5.23": "2.14.1"}}
PIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sglang_pin.txt")
STACK = ("torch", "transformer_engine.pytorch", "apex", "megatron.core", "sglang", "sgl_kernel", "flashinfer",
         "megatron_fipo.cli")


def read_pin(path: str = PIN) -> tuple[str, list[str]]:
    """``(version, [sha256, ...])`` of the pin file's one ``sglang==X --hash=sha256:...`` requirement."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    versions = re.findall(r"^sglang==(\S+)", text, flags=re.M)
    hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})\b", text)
    if len(versions) != 1 or not hashes:
        raise ValueError(f"{path}: expected one sglang==X line with --hash=sha256:... hashes")
    return versions[0], hashes


def _name(req: Requirement) -> str:
    return req.name.lower().replace("_", "-")


def filter_requirements(requires: Iterable[str], environment: Optional[dict] = None) -> list[str]:
    """Requirements that apply here (markers evaluated, no extras) without the torch family."""
    out = []
    for text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({**(environment or {}), "extra": ""}):
            continue
        if _name(req) not in TORCH_FAMILY:
            out.append(str(req))
    return out


def torch_pin(requires: Iterable[str]) -> str:
    """The exact torch version a distribution pins (``torch==X``); ``ValueError`` if it pins none."""
    for text in requires:
        req = Requirement(text)
        if _name(req) == "torch" and req.marker is None:
            pins = [s.version for s in req.specifier if s.operator == "=="]
            if pins:
                return pins[0]
    raise ValueError("no torch==X requirement: cannot tell which torch its kernels need")


def same_minor(installed: str, pinned: str) -> bool:
    """``2.8.0a0+5228986c39.nv25.6`` and ``2.8.0`` have the same major.minor."""
    return installed.split(".")[:2] == pinned.split(".")[:2]


def check(sglang: str, mcore: str, *, version: Callable[[str], str] = md.version,
          requires: Callable[[str], Sequence[str]] = md.requires,
          import_module: Callable[[str], object] = importlib.import_module) -> list[str]:
    """Problems of the built image (empty: fine): versions, torch pairing, imports of the stack."""
    problems = []
    for dist, wanted in (("sglang", sglang), ("megatron-core", mcore)):
        try:
            got = version(dist)
        except md.PackageNotFoundError:
            got = None
        if got != wanted:
            problems.append(f"{dist} {got} is installed, the build asked for {wanted}")
    try:
        pin, torch_version = torch_pin(requires("sglang") or ()), version("torch")
        if not same_minor(torch_version, pin):
            problems.append(f"sglang {sglang} pins torch {pin} but the base image has torch {torch_version}: "
                            "choose a BASE_IMAGE whose torch has the same major.minor (see PAIRS)")
    except (md.PackageNotFoundError, ValueError) as err:
        problems.append(f"cannot pair sglang with torch: {err}")
    for module in STACK:
        try:
            import_module(module)
        except Exception as err:  # noqa: BLE001 - any import failure breaks the image
            problems.append(f"import {module} failed: {type(err).__name__}: {err}")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    req = sub.add_parser("requirements", help="a distribution's requirements without the torch family")
    req.add_argument("dist")
    chk = sub.add_parser("check", help="versions, torch pairing and imports of the image")
    chk.add_argument("--sglang", default=None, help="default: the version of tools/sglang_pin.txt")
    chk.add_argument("--mcore", required=True)
    args = parser.parse_args(argv)
    if args.command == "requirements":
        print("\n".join(filter_requirements(md.requires(args.dist) or ())))
        return 0
    sglang = args.sglang or read_pin()[0]
    problems = check(sglang, args.mcore)
    for p in problems:
        print(f"image_check: {p}", file=sys.stderr)
    if not problems:
        print(f"image_check: torch {md.version('torch')}, sglang {sglang}, megatron-core {args.mcore}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
