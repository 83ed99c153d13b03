#!/usr/bin/env bash
# A Python virtual environment with msgpack, for the test that runs the Python client of
# docs/PROTOCOL.md. Creates .local/python if missing and prints its interpreter's path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.local/python"
if ! "$venv/bin/python3" -c "import msgpack" 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "msgpack==1.2.4" >&2
fi
echo "$venv/bin/python3"
