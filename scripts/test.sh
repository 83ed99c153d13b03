#!/usr/bin/env bash
# The whole test suite: installs DynamoDB Local if missing (the tests start their own
# instances on free loopback ports), then runs every test of the workspace.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p .local
scripts/dynamodb-local.sh install >/dev/null
cargo test --workspace --locked "$@"
