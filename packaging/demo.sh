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
# The demo installs what the demo needs: no Prometheus (the tests' alone); the lab's
# network tools and Redis only for --hosts.
purpose=demo
for arg in "$@"; do
    case "$arg" in
        --hosts|--hosts=*) purpose=lab ;;
    esac
done
"$here/setup.sh" --for "$purpose"
exec "$root/.venv/bin/python" -m diversityd_lab.demo "$@"
