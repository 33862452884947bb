# GPU image for megatron_fipo: NVIDIA's PyTorch container (CUDA, NCCL, cuDNN, Transformer Engine,
# apex) plus megatron-core and SGLang at the versions of setup.py's `gpu` extra, and this package.
#
#   docker build -t megatron-fipo .
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:26.09-py3 --build-arg MCORE_VERSION=0.16.1 \
#                -t megatron-fipo .
#   enroot import -o megatron-fipo.sqsh dockerd://megatron-fipo     # for Slurm + pyxis (FIPO_CONTAINER_IMAGE)
#
# SGLang comes from tools/sglang_pin.txt, its one pin (version and wheel hashes, installed with
# --require-hashes; setup.py's `gpu` extra reads it too). Pairing: SGLang pins one torch release
# (0.5.23: torch 2.14.1) and its kernels are built against it, so the base image must carry the same
# torch major.minor (26.09: 2.14.0a0). The container's torch, TE and apex are kept: every pip call
# runs under the container's constraints plus a torch pin, and SGLang's torch-family requirements are
# left out. The last step (tools/image_check.py check) imports the whole stack and fails the build if
# a version, the torch pairing or an import is wrong.
# Changing a version: update setup.py's `gpu` extra (megatron-core), tools/sglang_pin.txt and PAIRS in
# tools/image_check.py together (tests/unit/test_dockerfile.py checks that they agree).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.09-py3
FROM ${BASE_IMAGE}

ARG MCORE_VERSION=0.16.1

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/megatron_fipo
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The container's packages stay as built: its own constraints plus the exact torch it ships.
RUN { cat /etc/pip/constraint.txt 2>/dev/null || true; \
      python -c "import torch; print('torch==' + torch.__version__)"; } > /opt/base-constraints.txt
ENV PIP_CONSTRAINT=/opt/base-constraints.txt

COPY tools/image_check.py tools/sglang_pin.txt tools/
RUN pip install "megatron-core==${MCORE_VERSION}" \
 && pip install --no-deps --require-hashes -r tools/sglang_pin.txt \
 && python tools/image_check.py requirements sglang > /tmp/sglang-requirements.txt \
 && pip install -r /tmp/sglang-requirements.txt

COPY setup.py README.md ./
COPY megatron_fipo ./megatron_fipo
COPY tools ./tools
COPY examples ./examples
COPY slurm ./slurm
COPY tests ./tests
COPY pytest.ini ./
# The package and what the GPU tests need (pytest -m gpu); the launchers' own test tools stay out.
RUN pip install --no-build-isolation -e . "pytest>=8" "pytest-timeout>=2.3" \
 && python tools/image_check.py check --mcore "${MCORE_VERSION}"

ENTRYPOINT ["megatron-fipo"]
CMD ["--help"]
