#!/usr/bin/env bash
# The main job: the whole stack on an embedded default (a private systemd --user manager,
# real llama-server and llama-cpp-python on a tiny GGUF, Ollama and vLLM stand-ins, the real
# LiteLLM gateway and diversityd): status, a chat through the gateway, a failover drill,
# then a clean teardown. `--stay` leaves it up, detached, and says how to reach and stop it.
# `--hosts 2`: two hosts (network namespaces, each its whole stack) and a Redis instead.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"
"$here/setup.sh"
exec "$root/.venv/bin/python" -m diversityd_lab.demo "$@"
