#!/usr/bin/env bash
# Everything the demo and the tests need, installed or built once and cached under
# $XDG_CACHE_HOME/diversityd (a second run costs seconds): Debian packages, the project's
# venv (.venv), llama-server (built once from the pinned llama-cpp-python sdist),
# llama-cpp-python on the same libraries, and LiteLLM in a venv of its own.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/install-system-deps.sh"
"$here/bootstrap.sh"
"$here/build-llama-server.sh"
"$here/install-llama-cpp-python.sh"
"$here/install-litellm.sh"
