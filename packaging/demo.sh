#!/usr/bin/env bash
# The main job: a demo of diversityd on the example configuration.
# (Grows into the whole stack: private systemd manager, real llama servers, stand-ins for
# Ollama and vLLM, the real LiteLLM gateway and diversityd.)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"
"$here/bootstrap.sh"
ctl="$root/.venv/bin/diversityctl"
echo "== diversityctl validate --config-dir config"
"$ctl" validate --config-dir config
echo
echo "== diversityctl render --config-dir config --down llama_cpp_python"
"$ctl" render --config-dir config --down llama_cpp_python
