#!/usr/bin/env bash
# Instructions per request through the layer in process (examples/layer_callgrind.rs),
# mode by mode: callgrind counts of two runs, N and N + 200 000 requests, differenced so
# start-up cancels. Counts do not move with the machine's noise: compare them across
# commits. Usage: scripts/layer-callgrind.sh [MODE ...] (default: every mode).
set -euo pipefail
cd "$(dirname "$0")/.."
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(bare accept accept_lean accept_none reject governor governor_headers)
cargo build --release --example layer_callgrind >/dev/null 2>&1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
total() {
  valgrind --tool=callgrind --callgrind-out-file="$out/cg" \
    target/release/examples/layer_callgrind "$1" "$2" >/dev/null 2>&1
  awk '/^summary:/ {print $2}' "$out/cg"
}
printf '%-18s %12s\n' mode 'instr/request'
for mode in "${modes[@]}"; do
  a=$(total "$mode" 20000)
  b=$(total "$mode" 220000)
  printf '%-18s %12.1f\n' "$mode" "$(echo "($b - $a) / 200000" | bc -l)"
done
