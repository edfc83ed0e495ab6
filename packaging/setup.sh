#!/usr/bin/env bash
# Everything the demo and the tests need, installed or built once and cached under
# $XDG_CACHE_HOME/diversityd (a second run costs seconds): Debian packages, the project's
# venv (.venv), llama-server (built once from the pinned llama-cpp-python sdist),
# llama-cpp-python on the same libraries, and LiteLLM in a venv of its own.
#
#   packaging/setup.sh [--for demo|lab|test]   what for (default: test, everything); the
#                                              demo needs no Prometheus, nor the lab's Redis
#
# One line per step on the terminal; the package managers' output (apt-get, pip, the
# build) goes to $DIVERSITYD_SETUP_LOG (default: <cache>/setup.log), whose end is shown
# when a step fails.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/versions.sh"
purpose=test
while [[ $# -gt 0 ]]; do
    case "$1" in
        --for) purpose="${2:-}"; shift ;;
        --for=*) purpose="${1#--for=}" ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "setup: unknown argument $1 (--for demo|lab|test)" >&2; exit 2 ;;
    esac
    shift
done
case "$purpose" in
    demo|lab|test) ;;
    *) echo "setup: --for takes demo, lab or test, not '$purpose'" >&2; exit 2 ;;
esac
log="${DIVERSITYD_SETUP_LOG:-$DIVERSITYD_CACHE/setup.log}"
mkdir -p "$(dirname "$log")"
echo "== setup --for $purpose: $(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$log"

# step WHAT SCRIPT ARGS...: the script's output to the log; its last line (what it did)
# on the terminal; on a failure, the end of the log.
step() {
    local what="$1"
    shift
    local start mark
    start=$(date +%s)
    mark=$(wc -l <"$log")
    printf 'setup: %s ... ' "$what"
    if ! "$@" >>"$log" 2>&1; then
        echo "FAILED; the end of $log:"
        tail -n 40 "$log" >&2
        exit 1
    fi
    local said
    said="$(tail -n +"$((mark + 1))" "$log" | grep -v '^[[:space:]]*$' | tail -n 1 || true)"
    echo "${said:-done} ($(( $(date +%s) - start )) s)"
}

step "system packages for the $purpose" "$here/install-system-deps.sh" --for "$purpose" --log "$log"
step "the project's venv" "$here/bootstrap.sh"
step "llama-server (a first build: about 8 minutes on 2 cores)" "$here/build-llama-server.sh"
step "llama-cpp-python" "$here/install-llama-cpp-python.sh"
step "LiteLLM" "$here/install-litellm.sh"
echo "setup: ready (the package managers' output: $log)"
