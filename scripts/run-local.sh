#!/usr/bin/env bash
# Quick start: DynamoDB Local on 127.0.0.1:8000, the tables, and the daemon in the
# foreground with config/local.toml (socket /tmp/ddbcached.sock). Ctrl-C stops both.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

port=8000
config=config/local.toml

if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "port $port is taken: is a DynamoDB Local already running? Using it." >&2
else
  scripts/dynamodb-local.sh start "$port" >"$root/.local/dynamodb-local.log" 2>&1 &
  dynamo=$!
  trap 'kill $dynamo 2>/dev/null || true' EXIT
  for _ in $(seq 1 120); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$dynamo" 2>/dev/null || { cat "$root/.local/dynamodb-local.log" >&2; exit 1; }
    sleep 0.5
  done
fi

cargo build --release --locked --bin ddbcached
target/release/ddbcached init-tables --config "$config"
target/release/ddbcached serve --config "$config"
