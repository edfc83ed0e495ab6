#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs every part (Debian packages, the
# project's venv, llama-server built once, llama-cpp-python on the same libraries, LiteLLM;
# all cached under $XDG_CACHE_HOME/diversityd), then runs pytest: unit tests, integration
# tests against real parts, ruff and mypy. Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"
"$here/install-system-deps.sh"
"$here/bootstrap.sh"
"$here/build-llama-server.sh"
"$here/install-llama-cpp-python.sh"
"$here/install-litellm.sh"
# Every part was just installed, so a missing one is a failure, not a skip.
export CI="${CI:-true}"
exec "$root/.venv/bin/python" -m pytest "$@"
