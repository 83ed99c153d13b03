#!/usr/bin/env bash
# Quick start: DynamoDB Local on 127.0.0.1:8000, the tables, and the daemon in the
# foreground with config/local.toml (socket /tmp/ddbcached.sock, DynamoDB's API on
# 127.0.0.1:8100). Ctrl-C stops everything.
#
#   scripts/run-local.sh --fleet N   a fleet instead: redis-server on 127.0.0.1:6390 and N
#                                    daemons in fleet mode, sockets /tmp/ddbcached-<i>.sock,
#                                    metrics on 127.0.0.1:<9464+i>, DynamoDB's API on
#                                    127.0.0.1:<8100+i>.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

port=8000
redis_port=6390
config=config/local.toml
fleet=0
case "${1:-}" in
  --fleet) fleet=${2:?--fleet takes the number of daemons} ;;
  "") ;;
  *) echo "usage: $0 [--fleet N]" >&2; exit 64 ;;
esac

children=()
trap 'kill "${children[@]}" 2>/dev/null || true' EXIT
mkdir -p "$root/.local"

if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "port $port is taken: is a DynamoDB Local already running? Using it." >&2
else
  scripts/dynamodb-local.sh start "$port" >"$root/.local/dynamodb-local.log" 2>&1 &
  dynamo=$!
  children+=("$dynamo")
  for _ in $(seq 1 120); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$dynamo" 2>/dev/null || { cat "$root/.local/dynamodb-local.log" >&2; exit 1; }
    sleep 0.5
  done
fi

cargo build --release --locked --bin ddbcached
target/release/ddbcached init-tables --config "$config"
if [ "$fleet" -eq 0 ]; then
  target/release/ddbcached serve --config "$config"
  exit
fi

redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  >"$root/.local/redis.log" 2>&1 &
children+=("$!")
for i in $(seq 1 "$fleet"); do
  DDBCACHED_SOCKET="/tmp/ddbcached-$i.sock" \
  DDBCACHED_METRICS_LISTEN="127.0.0.1:$((9464 + i))" \
  DDBCACHED_DYNAMODB_API_LISTEN="127.0.0.1:$((8100 + i))" \
  DDBCACHED_FLEET_REDIS_URL="redis://127.0.0.1:$redis_port" \
    target/release/ddbcached serve --config "$config" &
  children+=("$!")
done
echo "fleet of $fleet: sockets /tmp/ddbcached-{1..$fleet}.sock, DynamoDB API on 127.0.0.1:8101..$((8100 + fleet)); Ctrl-C stops it" >&2
wait -n
