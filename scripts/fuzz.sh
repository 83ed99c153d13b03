#!/usr/bin/env bash
# Fuzzes the wire protocol: every target in fuzz/ for SECONDS (default 600) each, then
# merges what the fuzzer found into the committed corpus (fuzz/corpus/<target>/), which
# the test suite replays. A crash stops the run; its input is in fuzz/artifacts/<target>/
# and belongs in the corpus once fixed.
#
# usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

seconds=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frames request response)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo fuzz needs the sanitizer flags of a nightly compiler; the stable one accepts
# them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1

for t in "${targets[@]}"; do
  # The fuzzer starts from the committed corpus and adds what it finds to it.
  cargo fuzz run -O "$t" -- -max_total_time="$seconds" -max_len=8192 -print_final_stats=1 2>&1 |
    grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)|ERROR|panicked'
  # Then keeps only the inputs that add coverage.
  cargo fuzz cmin -O "$t" >/dev/null 2>&1
  echo "$t: $(ls "fuzz/corpus/$t" | wc -l) inputs in the corpus"
done
