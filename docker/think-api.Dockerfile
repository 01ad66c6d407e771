# The think-api image (compose services think-api and ollama-import): the /think HTTP API with its Ollama backend,
# and the Ollama import + smoke test. Small: no torch, no llama.cpp. (The in-process llama.cpp backend runs natively,
# or in the converter image, which has llama.cpp.)
ARG BASE_IMAGE=python:3.12.15-slim-bookworm@sha256:34386ef0cb081344d7ec1c103ba398e6e9f64e9ab3a1509accc92a4e24a07258
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/so8t \
    DATA_DIR=/data

COPY docker/pip-env.sh /usr/local/lib/so8t/pip-env.sh
RUN --mount=type=secret,id=pip_cert \
    useradd --uid 1000 --user-group --create-home --home-dir /home/so8t --shell /bin/bash so8t \
 && chmod 1777 /home/so8t \
 && python3 -m venv /opt/venv \
 && . /usr/local/lib/so8t/pip-env.sh && pip install "pip==26.3"

# only what serving and the Ollama import need, versions from pyproject.toml + constraints.txt
# (tests/test_dockerfiles.py checks this list covers every import of services.think_api and services.ollama)
COPY pyproject.toml constraints.txt docker/project-deps.py /tmp/deps/
RUN --mount=type=secret,id=pip_cert --mount=type=bind,source=.wheelhouse,target=/wheelhouse \
    . /usr/local/lib/so8t/pip-env.sh \
 && python /tmp/deps/project-deps.py /tmp/deps/pyproject.toml \
        --only fastapi uvicorn httpx ollama pydantic pyyaml tqdm tenacity gguf > /tmp/deps/requirements.txt \
 && pip install -c /tmp/deps/constraints.txt -r /tmp/deps/requirements.txt

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY configs ./configs
RUN --mount=type=secret,id=pip_cert . /usr/local/lib/so8t/pip-env.sh \
 && pip install --no-deps -e . && python -c "import fastapi, uvicorn, ollama, services.cli"

USER so8t
EXPOSE 8000
ENTRYPOINT []
CMD ["python", "-m", "services.think_api", "--help"]
