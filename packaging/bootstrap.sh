#!/usr/bin/env bash
# Create the project's virtual environment (.venv in the work tree; wheels cached under
# $XDG_CACHE_HOME/diversityd/pip) and install diversityd with its test tools. Idempotent:
# reinstalls only when pyproject.toml changed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
. "$here/versions.sh"
venv="$root/.venv"
stamp="$venv/.diversityd-pyproject.sha256"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/pip" install --quiet --disable-pip-version-check -e "$root[lab,test,bench]" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import diversityd, dbus_fast, pynvml, gguf, structlog" 
echo "$want" > "$stamp"
echo "bootstrap: $venv ready"
