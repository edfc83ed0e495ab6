#!/usr/bin/env bash
# Install the pinned llama-cpp-python[server] into its own virtual environment under the cache,
# WITHOUT compiling llama.cpp a second time: the package is built from the cached sdist with
# LLAMA_BUILD=OFF (pure Python plus a trivial cmake configure) and, at run time, loads the
# shared libraries build-llama-server.sh made, named by LLAMA_CPP_LIB_PATH (and MTMD_CPP_LIB
# for multimodal) = $LLAMA_BIN_DIR. Those libraries come from the same sdist, which matters:
# ctypes assumes their struct layouts. Idempotent: a second run costs nothing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/versions.sh"
stamp="$LLAMA_CPP_PYTHON_VENV/.diversityd-complete"
if [[ -f "$stamp" ]]; then
    echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION: cached at $LLAMA_CPP_PYTHON_VENV"
    exit 0
fi
# scikit-build-core still configures a cmake project (which enables C and C++) even with
# LLAMA_BUILD=OFF, so the tools must be present although nothing is compiled.
for tool in cmake gcc g++; do
    command -v "$tool" >/dev/null || { echo "install-llama-cpp-python: $tool is missing (run packaging/install-system-deps.sh)" >&2; exit 1; }
done

"$here/fetch-llama-sdist.sh"
"$here/build-llama-server.sh" >/dev/null  # no-op when cached; the libraries are what we load
if [[ ! -e "$LLAMA_BIN_DIR/libllama.so" ]]; then
    echo "install-llama-cpp-python: $LLAMA_BIN_DIR/libllama.so missing after build-llama-server.sh" >&2
    exit 1
fi

start=$(date +%s)
rm -rf "$LLAMA_CPP_PYTHON_VENV"
mkdir -p "$(dirname "$LLAMA_CPP_PYTHON_VENV")"
python3 -m venv "$LLAMA_CPP_PYTHON_VENV"
pip=("$LLAMA_CPP_PYTHON_VENV/bin/pip" --disable-pip-version-check)
work="$(mktemp -d "$DIVERSITYD_CACHE/llama-cpp-python-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log="$work/pip.log"
# Build our own wheel, never through pip's wheel cache: pip reuses a cached wheel whatever
# CMAKE_ARGS say, and a wheel built with other flags would carry its own libllama.
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
    "${pip[@]}" wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
    --wheel-dir "$work" "$LLAMA_SDIST" >"$log" 2>&1 || { tail -40 "$log" >&2; exit 1; }
wheel=("$work"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl)
if python3 -c 'import sys, zipfile; sys.exit(not any(n.endswith(".so") for n in zipfile.ZipFile(sys.argv[1]).namelist()))' "${wheel[0]}"; then
    echo "install-llama-cpp-python: the wheel carries its own libraries; LLAMA_BUILD=OFF was ignored" >&2
    exit 1
fi
# The dependencies (fastapi, uvicorn, numpy, ...) may come from the pip cache.
"${pip[@]}" install "${wheel[0]}[server]" >"$log" 2>&1 || { tail -40 "$log" >&2; exit 1; }

# Check that the package loads OUR libraries before declaring the install complete.
LLAMA_CPP_LIB_PATH="$LLAMA_BIN_DIR" MTMD_CPP_LIB="$LLAMA_BIN_DIR" \
    "$LLAMA_CPP_PYTHON_VENV/bin/python" -c '
import llama_cpp, llama_cpp.server.app, llama_cpp.mtmd_cpp
print("llama-cpp-python", llama_cpp.__version__, "loads", llama_cpp.llama_cpp._lib._name)
'
echo "$LLAMA_BIN_DIR" >"$stamp"
echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION: installed into $LLAMA_CPP_PYTHON_VENV in $(( $(date +%s) - start )) s"
