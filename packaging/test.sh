#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs every part (packaging/setup.sh, cached),
# then runs pytest: unit tests, integration tests against the real parts, ruff and mypy.
# Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"
"$here/setup.sh" --for test
# Every part was just installed, so a missing one is a failure, not a skip.
export CI="${CI:-true}"
exec "$root/.venv/bin/python" -m pytest "$@"
