#!/usr/bin/env bash
# Install the pinned LiteLLM proxy into its own virtual environment under the cache
# (litellm[proxy] plus prometheus-client, which the proxy extra lacks). Idempotent.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/versions.sh"
stamp="$LITELLM_VENV/.diversityd-complete"
if [[ -f "$stamp" ]]; then
    echo "litellm $LITELLM_VERSION: cached at $LITELLM_VENV"
    exit 0
fi
rm -rf "$LITELLM_VENV"
mkdir -p "$(dirname "$LITELLM_VENV")"
python3 -m venv "$LITELLM_VENV"
start=$(date +%s)
"$LITELLM_VENV/bin/pip" install --quiet --disable-pip-version-check \
    "litellm[proxy]==$LITELLM_VERSION" "prometheus-client==$PROMETHEUS_CLIENT_VERSION"
touch "$stamp"
echo "litellm $LITELLM_VERSION: installed into $LITELLM_VENV in $(( $(date +%s) - start )) s"
