# The converter image (compose service converter): the project's one pinned llama.cpp, installed by
# scripts/install-llama-cpp.sh exactly as `make test` installs it natively (the pin lives only in that script),
# and CPU torch for the Hugging Face side of the logits checks. No GPU needed.
# Two stages: the compiler toolchain stays in the build stage; the runtime copies the finished venv.
ARG BASE_IMAGE=python:3.12.15-slim-bookworm@sha256:34386ef0cb081344d7ec1c103ba398e6e9f64e9ab3a1509accc92a4e24a07258

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
COPY docker/pip-env.sh /usr/local/lib/so8t/pip-env.sh
RUN --mount=type=secret,id=pip_cert \
    apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && . /usr/local/lib/so8t/pip-env.sh && pip install "pip==26.3"

# torch (the CPU build, 2.13.0+cpu, outranks PyPI's CUDA one; with no index, the wheelhouse's), then the project's
# dependencies pinned by constraints.txt
RUN --mount=type=secret,id=pip_cert --mount=type=bind,source=.wheelhouse,target=/wheelhouse \
    . /usr/local/lib/so8t/pip-env.sh \
 && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
COPY pyproject.toml constraints.txt docker/project-deps.py /tmp/deps/
RUN --mount=type=secret,id=pip_cert --mount=type=bind,source=.wheelhouse,target=/wheelhouse \
    . /usr/local/lib/so8t/pip-env.sh \
 && python /tmp/deps/project-deps.py /tmp/deps/pyproject.toml > /tmp/deps/requirements.txt \
 && pip install -c /tmp/deps/constraints.txt -r /tmp/deps/requirements.txt

# llama.cpp: the bindings compiled from the pinned llama-cpp-python sdist, plus its convert_hf_to_gguf.py and gguf-py
# under /opt/venv/share/so8t/llama.cpp, and llama.cpp's own llama-server (/opt/venv/bin: the engine of the CPU stack's
# llama-server service) from the same sources. The compiled wheel and server are kept in a BuildKit cache between
# builds, seeded from the wheelhouse's copy of the native cache when there is one (same Python and flags: nothing
# to compile).
COPY scripts/install-llama-cpp.sh /tmp/scripts/install-llama-cpp.sh
RUN --mount=type=cache,target=/root/.cache/so8t --mount=type=secret,id=pip_cert --mount=type=bind,source=.wheelhouse,target=/wheelhouse \
    if [ -d /wheelhouse/so8t-cache ]; then cp -an /wheelhouse/so8t-cache/. /root/.cache/so8t/; fi \
 && . /usr/local/lib/so8t/pip-env.sh \
 && SO8T_CACHE=/root/.cache/so8t bash /tmp/scripts/install-llama-cpp.sh /opt/venv/bin/python

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/so8t \
    DATA_DIR=/data \
    HF_HOME=/data/hf_cache
# libgomp1: llama.cpp's OpenMP runtime
COPY docker/pip-env.sh /usr/local/lib/so8t/pip-env.sh
RUN --mount=type=secret,id=pip_cert \
    apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 1000 --user-group --create-home --home-dir /home/so8t --shell /bin/bash so8t \
 && chmod 1777 /home/so8t
COPY --from=build /opt/venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY configs ./configs
COPY examples ./examples
RUN --mount=type=secret,id=pip_cert . /usr/local/lib/so8t/pip-env.sh \
 && pip install --no-deps -e . && python -c "import llama_cpp, gguf, torch, services.cli" && llama-server --version

USER so8t
ENTRYPOINT []
CMD ["so8t", "convert", "--help"]
