#!/usr/bin/env bash
# A Python virtual environment for the tests: msgpack (the Python client of
# docs/PROTOCOL.md), boto3, click and the AWS CLI (SDK programs through the DynamoDB API).
# Creates .local/python if missing, or brings it up to these packages, and prints its
# interpreter's path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.local/python"
packages=("msgpack==1.2.4" "boto3==1.44.18" "awscli==1.46.2" "click==8.5.1")
if ! "$venv/bin/python3" -c "import msgpack, boto3, click, awscli" 2>/dev/null; then
  [ -x "$venv/bin/python3" ] || python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}" >&2
fi
echo "$venv/bin/python3"
