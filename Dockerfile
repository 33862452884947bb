# GPU image for megatron_fipo (first version; the launch issue pins and tests the full stack).
# NVIDIA's PyTorch container carries CUDA, NCCL, Transformer Engine and apex.
# Build: docker build --build-arg MCORE_VERSION=0.16.1 -t megatron-fipo .
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

ARG MCORE_VERSION=0.16.1
ARG SGLANG_VERSION=0.5.9

WORKDIR /opt/megatron_fipo
COPY setup.py README.md ./
COPY megatron_fipo ./megatron_fipo
COPY tools ./tools
COPY examples ./examples
COPY slurm ./slurm

# Keep the container's own torch: never let pip replace it.
RUN python -c "import torch; print(torch.__version__)" > /tmp/torch_version \
 && echo "torch==$(cat /tmp/torch_version)" > /tmp/constraints.txt \
 && PIP_CONSTRAINT=/tmp/constraints.txt pip install --no-cache-dir \
      "megatron-core==${MCORE_VERSION}" "sglang==${SGLANG_VERSION}" \
 && PIP_CONSTRAINT=/tmp/constraints.txt pip install --no-cache-dir -e ".[test]"

ENTRYPOINT ["megatron-fipo"]
