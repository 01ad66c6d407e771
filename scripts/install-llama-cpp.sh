#!/usr/bin/env bash
# Install the one pinned llama.cpp (through llama-cpp-python's sdist, which vendors it) into a Python environment:
#   - the llama_cpp bindings (inference, llama_model_quantize), compiled once and cached as a wheel;
#   - llama.cpp's own convert_hf_to_gguf.py + conversion/ + gguf-py, copied to <prefix>/share/so8t/llama.cpp
#     (gguf-py is also installed as the `gguf` package: the converter needs that one, not PyPI's).
#   - llama.cpp's own `llama-server` (the same sources), built once and cached, copied to <prefix>/bin/llama-server
#     (the engine behind `so8t serve --backend openai`); SO8T_LLAMA_SERVER=0 skips it.
# Usage: scripts/install-llama-cpp.sh [PYTHON]     (default: python3; the venv's python in `make test`)
# The cache lives outside the repo: $SO8T_CACHE (default ~/.cache/so8t), keyed by version and build flags.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"   # the single pin: native path and converter image alike
# the sdist's sha256 as PyPI serves it (pip download --require-hashes agreed): a different file is refused
LLAMA_CPP_PYTHON_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CMAKE_FLAGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"

PY="${1:-python3}"
CACHE="${SO8T_CACHE:-$HOME/.cache/so8t}"
KEY="llama-cpp-python-${LLAMA_CPP_PYTHON_VERSION}-$(printf '%s' "$CMAKE_FLAGS $($PY -c 'import sys;print(sys.version_info[:2])')" | sha256sum | cut -c1-12)"
DIR="$CACHE/$KEY"
PREFIX="$($PY -c 'import sys; print(sys.prefix)')"
SHARE="$PREFIX/share/so8t/llama.cpp"

installed="$($PY -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)"
WANT_SERVER="${SO8T_LLAMA_SERVER:-1}"
SERVER_FLAGS="-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF"
server_ok() { [ "$WANT_SERVER" = 0 ] || [ -x "$PREFIX/bin/llama-server" ]; }
if [ "$installed" = "$LLAMA_CPP_PYTHON_VERSION" ] && [ -f "$SHARE/convert_hf_to_gguf.py" ] && [ -f "$SHARE/VERSION" ] \
   && [ "$(cat "$SHARE/VERSION")" = "$LLAMA_CPP_PYTHON_VERSION" ] && server_ok; then
  echo "llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION) already installed in $PREFIX"
  exit 0
fi

mkdir -p "$DIR"
if [ ! -f "$DIR/sdist.done" ]; then
  echo ">> downloading llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
  rm -rf "$DIR/sdist" && mkdir -p "$DIR/sdist"
  $PY -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$DIR/sdist"
  got="$(sha256sum "$DIR"/sdist/llama_cpp_python-*.tar.gz | cut -d' ' -f1)"
  if [ "$got" != "$LLAMA_CPP_PYTHON_SHA256" ]; then
    echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist: sha256 $got, expected $LLAMA_CPP_PYTHON_SHA256; refused" >&2
    rm -rf "$DIR/sdist"
    exit 1
  fi
  tar -xzf "$DIR"/sdist/llama_cpp_python-*.tar.gz -C "$DIR/sdist"
  touch "$DIR/sdist.done"
fi
SRC="$(ls -d "$DIR"/sdist/llama_cpp_python-*/ | head -n1)"
VENDOR="$SRC/vendor/llama.cpp"

if ! ls "$DIR"/wheel/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo ">> compiling llama.cpp (CMAKE_ARGS=$CMAKE_FLAGS): a few minutes on first use, cached afterwards"
  rm -rf "$DIR/wheel.tmp"
  CMAKE_ARGS="$CMAKE_FLAGS" $PY -m pip wheel --quiet --no-deps "$SRC" -w "$DIR/wheel.tmp"
  mv "$DIR/wheel.tmp" "$DIR/wheel"
fi

# llama-server from the same vendored sources, static (no shared libs to ship), no network features (no curl/TLS,
# no web UI download): `make venv` and the images carry it; keyed by its own flags beside the wheel
SERVER_DIR="$DIR/server-$(printf '%s' "$SERVER_FLAGS" | sha256sum | cut -c1-8)"
if [ "$WANT_SERVER" != 0 ] && [ ! -x "$SERVER_DIR/llama-server" ]; then
  echo ">> compiling llama-server (same llama.cpp sources): several minutes on first use, cached afterwards"
  rm -rf "$SERVER_DIR.tmp"
  # shellcheck disable=SC2086
  cmake -S "$VENDOR" -B "$SERVER_DIR.tmp/build" $SERVER_FLAGS >/dev/null
  cmake --build "$SERVER_DIR.tmp/build" --target llama-server -j"$(nproc)" >/dev/null
  install -m 755 "$SERVER_DIR.tmp/build/bin/llama-server" "$SERVER_DIR.tmp/llama-server"
  rm -rf "$SERVER_DIR.tmp/build"
  if [ -x "$SERVER_DIR/llama-server" ]; then rm -rf "$SERVER_DIR.tmp"; else rm -rf "$SERVER_DIR" && mv "$SERVER_DIR.tmp" "$SERVER_DIR"; fi
fi

echo ">> installing llama-cpp-python and llama.cpp's gguf-py into $PREFIX"
$PY -m pip install --quiet --no-deps --force-reinstall "$DIR"/wheel/llama_cpp_python-*.whl
$PY -m pip install --quiet --no-deps --force-reinstall "$VENDOR/gguf-py"
$PY -m pip install --quiet "diskcache==5.6.3" "jinja2==3.1.6"   # llama_cpp's own runtime needs (as constraints.txt)

rm -rf "$SHARE.tmp" && mkdir -p "$SHARE.tmp"
cp "$VENDOR/convert_hf_to_gguf.py" "$SHARE.tmp/"
cp -r "$VENDOR/conversion" "$SHARE.tmp/"
[ -d "$VENDOR/gguf-py" ] && cp -r "$VENDOR/gguf-py" "$SHARE.tmp/"
echo "$LLAMA_CPP_PYTHON_VERSION" > "$SHARE.tmp/VERSION"
rm -rf "$SHARE" && mv "$SHARE.tmp" "$SHARE"
if [ "$WANT_SERVER" != 0 ]; then
  install -m 755 "$SERVER_DIR/llama-server" "$PREFIX/bin/llama-server.tmp" && mv "$PREFIX/bin/llama-server.tmp" "$PREFIX/bin/llama-server"
fi
echo "llama.cpp ready: bindings $LLAMA_CPP_PYTHON_VERSION, converter at $SHARE, llama-server in $PREFIX/bin"
