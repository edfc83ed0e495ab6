#!/usr/bin/env bash
# Download the pinned llama-cpp-python sdist into the cache (once).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/versions.sh"
if [[ -s "$LLAMA_SDIST" ]]; then exit 0; fi
mkdir -p "$(dirname "$LLAMA_SDIST")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmp"
mv "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" "$LLAMA_SDIST"
