#!/usr/bin/env bash
# The memory target under sustained load: a daemon with a 256 MiB cache, read for
# MEMORY_SECONDS (default 600) over a 512 MiB working set (32,768 values of 16 KiB, 4
# connections x 4 in flight), twice: once with its metrics endpoint never scraped, once
# scraped every 15 s. Its resident memory is sampled every 10 s; the goal is at most
# 1.25 x cache.max_bytes + 64 MiB = 384 MiB throughout.
#
#   benches/memory.sh                    both runs, 10 minutes each
#   MEMORY_SECONDS=60 benches/memory.sh  shorter
#
# Starts DynamoDB Local and the daemons on a temporary directory and free loopback
# ports, and stops them at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
MEMORY_SECONDS=${MEMORY_SECONDS:-600}
cache_bytes=268435456
goal_mib=$((cache_bytes * 5 / 4 / 1048576 + 64))

scripts/dynamodb-local.sh install >/dev/null
cargo build --release --locked --bins >&2
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
(cd "$work" && exec "$root/scripts/dynamodb-local.sh" start "$port") >"$work/dynamodb.log" 2>&1 &
pids+=($!)
until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.2; done

soak() { # $1: name, $2: metrics address or empty
  local sock="$work/$1.sock"
  cat >"$work/$1.toml" <<TOML
[server]
socket_path = "$sock"
[dynamodb]
endpoint = "http://127.0.0.1:$port"
region = "us-east-1"
use_dummy_credentials = true
[cache]
max_bytes = $cache_bytes
[metrics]
listen = "$2"
TOML
  "$bin/ddbcached" init-tables -c "$work/$1.toml" >/dev/null
  "$bin/ddbcached" serve -c "$work/$1.toml" 2>"$work/$1.log" &
  local daemon=$!
  pids+=($daemon)
  until [ -S "$sock" ]; do sleep 0.2; done
  "$bin/ddbcached-bench" run --json --target daemon --socket "$sock" --workload get-hit \
    -c 4 -d 4 --keys 32768 --value-bytes 16384 --seconds "$MEMORY_SECONDS" >"$work/$1.json" &
  local load=$!
  local samples=() next_scrape=0 t=0
  while kill -0 "$load" 2>/dev/null; do
    if [ -n "$2" ] && [ "$t" -ge "$next_scrape" ]; then
      python3 -c "import urllib.request,sys; urllib.request.urlopen('http://$2/metrics', timeout=10).read()"
      next_scrape=$((t + 15))
    fi
    samples+=("$(awk '/VmRSS/ {printf "%d", $2/1024}' "/proc/$daemon/status")")
    sleep 10
    t=$((t + 10))
  done
  wait "$load"
  local peak
  peak=$(awk '/VmHWM/ {printf "%d", $2/1024}' "/proc/$daemon/status")
  local ops
  ops=$(python3 -c "import json; print(f\"{json.load(open('$work/$1.json'))['ops_per_sec']:,.0f}\")")
  local verdict=missed
  [ "$peak" -le "$goal_mib" ] && verdict=met
  echo "| $1 | ${MEMORY_SECONDS} s | $ops | ${samples[0]} | ${samples[${#samples[@]}-1]} | $peak | <= $goal_mib MiB | $verdict |"
  echo "$1 RSS every 10 s (MiB): ${samples[*]}" >&2
  kill "$daemon"
  wait "$daemon" 2>/dev/null || true
}

echo "| run | load | hits/s | RSS first sample (MiB) | RSS last sample | peak RSS | goal | |"
echo "|---|---|---:|---:|---:|---:|---|---|"
soak unscraped ""
soak scraped "127.0.0.1:$(free_port)"
