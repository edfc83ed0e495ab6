#!/usr/bin/env bash
# Build llama.cpp's llama-server ONCE, as shared libraries, from the llama.cpp vendored in the
# pinned llama-cpp-python sdist. llama-cpp-python is later installed with LLAMA_BUILD=OFF and
# pointed at the same libraries (see install-llama-cpp-python.sh): one compile for both servers.
# GGML_NATIVE=OFF keeps AMX code out, which otherwise crashes quantized tiny models here.
# Result: $LLAMA_BIN_DIR (cached, keyed by version; a second run costs nothing).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/versions.sh"

if [[ -x "$LLAMA_BIN_DIR/llama-server" && -e "$LLAMA_BIN_DIR/libllama.so" ]]; then
    echo "llama-server $LLAMA_CPP_PYTHON_VERSION: cached at $LLAMA_BIN_DIR"
    exit 0
fi
for tool in cmake ninja gcc g++; do
    command -v "$tool" >/dev/null || { echo "build-llama-server: $tool is missing (run packaging/install-system-deps.sh)" >&2; exit 1; }
done

"$here/fetch-llama-sdist.sh"
work="$(mktemp -d "$DIVERSITYD_CACHE/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tar -xzf "$LLAMA_SDIST" -C "$work"
src="$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
jobs="$(nproc)"
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_RPC=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN' >"$work/cmake.log" \
    || { tail -50 "$work/cmake.log" >&2; exit 1; }
start=$(date +%s)
cmake --build "$work/build" --target llama-server llama ggml ggml-base ggml-cpu mtmd ggml-rpc-server -j"$jobs" \
    >"$work/build.log" 2>&1 || { tail -50 "$work/build.log" >&2; exit 1; }
echo "llama.cpp built in $(( $(date +%s) - start )) s"
staging="$LLAMA_BIN_DIR.partial"
rm -rf "$staging"
mkdir -p "$(dirname "$LLAMA_BIN_DIR")"
cp -a "$work/build/bin" "$staging"
mv -T "$staging" "$LLAMA_BIN_DIR"
"$LLAMA_BIN_DIR/llama-server" --version 2>&1 | head -3
echo "llama-server $LLAMA_CPP_PYTHON_VERSION: built into $LLAMA_BIN_DIR"
