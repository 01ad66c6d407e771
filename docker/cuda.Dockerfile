# The CUDA image shared by the dataset, trainer and baker stages (compose services dataset, trainer, baker).
#
# The CUDA runtime of the base and the CUDA build of torch must match. torch 2.13.0's Linux wheels are built for
# CUDA 13.0 (their metadata pins cuda-toolkit 13.0.3), so the base is the CUDA 13.0 runtime, pinned by digest, and
# torch is the cu130 build. The host needs an NVIDIA driver for CUDA 13.0 (>= 580) and the NVIDIA container
# toolkit. For an older driver, build another matching pair, for example CUDA 12.8, with these in .env (compose
# passes them as the build args BASE_IMAGE and TORCH_INDEX_URL), then `make build`:
#   CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# The same file builds the CPU image of docker/compose.cpu.yaml: a Debian base and an empty TORCH_INDEX_URL, torch
# then coming from the wheelhouse (.wheelhouse/, see docker/pip-env.sh).
# Layers go from the slowest-changing to the fastest: system Python, torch, the pinned dependencies
# (pyproject.toml + constraints.txt), and the code last, so a code change rebuilds only the last layers.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04@sha256:c3fde347d52d578c84fd644bc177bc7ec333feaf11550d990da4084d7612e4c7
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/so8t \
    DATA_DIR=/data \
    HF_HOME=/data/hf_cache

# Ubuntu's python3 (3.12 on 24.04) in a venv; the non-root user so8t (uid 1000 unless compose says otherwise:
# the Makefile runs the stages as the invoking user, so files on the bind-mounted /data belong to that user).
COPY docker/pip-env.sh /usr/local/lib/so8t/pip-env.sh
RUN --mount=type=secret,id=pip_cert \
    apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --uid 1000 --user-group --create-home --home-dir /home/so8t --shell /bin/bash so8t \
 && chmod 1777 /home/so8t \
 && python3 -m venv /opt/venv \
 && . /usr/local/lib/so8t/pip-env.sh && pip install "pip==26.3"

# torch: the CUDA build that matches the base image (2.13.0+cu130 from the PyTorch index outranks PyPI's plain
# 2.13.0; PyPI serves the rest); with no index (the CPU build), the wheelhouse's CPU wheel
COPY docker/torch-cuda-check.py /usr/local/lib/so8t/torch-cuda-check.py
RUN --mount=type=secret,id=pip_cert --mount=type=bind,source=.wheelhouse,target=/wheelhouse \
    . /usr/local/lib/so8t/pip-env.sh \
 && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && python /usr/local/lib/so8t/torch-cuda-check.py "$TORCH_INDEX_URL"

# the project's dependencies, exact versions from constraints.txt; cached until either file changes
COPY pyproject.toml constraints.txt docker/project-deps.py /tmp/deps/
RUN --mount=type=secret,id=pip_cert --mount=type=bind,source=.wheelhouse,target=/wheelhouse \
    . /usr/local/lib/so8t/pip-env.sh \
 && python /tmp/deps/project-deps.py /tmp/deps/pyproject.toml > /tmp/deps/requirements.txt \
 && pip install -c /tmp/deps/constraints.txt -r /tmp/deps/requirements.txt

# the code
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY configs ./configs
COPY examples ./examples
COPY bench ./bench
RUN --mount=type=secret,id=pip_cert . /usr/local/lib/so8t/pip-env.sh \
 && pip install --no-deps -e . && python -c "import torch, services.cli"

USER so8t
ENTRYPOINT []
CMD ["so8t", "--help"]
