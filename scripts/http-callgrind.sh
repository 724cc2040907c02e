#!/usr/bin/env bash
# Instructions per HTTP request, counted by callgrind in the whole server: the same axum
# hello-world as scripts/http-ab.sh (examples/bench_server.rs), in each mode, served to
# examples/loadgen (GET /, 100 users sending x-user-id, 8 keep-alive connections). Each
# mode runs twice, for N and 6N requests, and the difference over 5N requests is what one
# request costs: start-up, connecting and each user's first request cancel out. hyper,
# axum, tokio and the layer are all counted; the kernel (socket calls) is not.
#
# Unlike req/s, an instruction count does not move with whatever else the machine runs,
# so two modes compare exactly on a shared, noisy machine. It does not see cache misses
# or bytes on the wire: use it beside scripts/http-ab.sh, not instead of it.
#
#   scripts/http-callgrind.sh [N] [ROUNDS]            (defaults 4000 and 1; needs valgrind)
#   MODES="bare tollgate_none" scripts/http-callgrind.sh
#
# Prints per mode the instructions per request and their excess over bare. tollgate's
# counts repeat within 1 %, but tower_governor's move by up to 3 % between runs of one
# build, so to rank the two run several ROUNDS (every mode once a round): each mode's
# median is printed with the range of its rounds, and the excess is over bare's median.
# Every process it starts has a deadline and is stopped by its pid; a run whose answers
# are not all 2xx fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-4000}
rounds=${2:-1}
read -r -a modes <<<"${MODES:-bare governor governor_headers tollgate tollgate_lean tollgate_none}"
[[ $n =~ ^[1-9][0-9]*$ ]] && ((n <= 100000)) || {
  echo "http-callgrind: N must be a whole number up to 100000, got '$n'" >&2
  exit 2
}
[[ $rounds =~ ^[1-9][0-9]*$ ]] && ((rounds <= 20)) || {
  echo "http-callgrind: ROUNDS must be a whole number from 1 to 20, got '$rounds'" >&2
  exit 2
}
[[ " ${modes[*]} " == *" bare "* ]] || { echo "http-callgrind: MODES must include bare" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "http-callgrind: needs valgrind (apt-get install valgrind)" >&2; exit 2; }

# callgrind writes its counts on exit; under valgrind that takes a moment.
grace=300
# shellcheck source=scripts/lib/bench-server.sh
source scripts/lib/bench-server.sh

# Instructions the server ran to serve `$2` requests in mode `$1`.
count() {
  local mode=$1 requests=$2 out="$work/cg.out"
  rm -f "$out"
  : >"$work/server.log"
  # `timeout` bounds the server even if this script dies; valgrind passes TERM on.
  timeout 900 valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$bin/bench_server" --mode "$mode" --listen 127.0.0.1:0 >"$work/server.log" 2>&1 &
  server=$!
  for _ in $(seq 300); do grep -q "listening on" "$work/server.log" && break; sleep 0.1; done
  local addr
  addr=$(grep -o 'listening on http://[0-9.:]*' "$work/server.log" | sed 's#.*http://##') || {
    echo "http-callgrind: bench_server --mode $mode did not start:" >&2
    cat "$work/server.log" >&2
    exit 1
  }
  local json
  json=$(timeout 600 "$bin/loadgen" --target "http://$addr/" --users 100 --concurrency 8 \
    --duration 500 --max-requests "$requests" --json)
  stop_server
  python3 - "$mode" "$requests" "$json" <<'EOF'
import json, sys
mode, requests, r = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
if r["status_2xx"] != requests:
    sys.exit("http-callgrind: %s: %d of %d answers 2xx" % (mode, r["status_2xx"], requests))
EOF
  grep -m1 '^summary:' "$out" | awk '{print $2}'
}

for ((round = 1; round <= rounds; round++)); do
  for mode in "${modes[@]}"; do
    small=$(count "$mode" "$n")
    large=$(count "$mode" "$((6 * n))")
    echo "$mode $(((large - small) / (5 * n)))" >>"$work/results"
  done
done
python3 - "$work/results" "${modes[@]}" <<'EOF'
import statistics, sys
path, modes = sys.argv[1], sys.argv[2:]
counts = {mode: [] for mode in modes}
for line in open(path):
    mode, per = line.split()
    counts[mode].append(int(per))
median = {mode: int(statistics.median(per)) for mode, per in counts.items()}
several = len(counts["bare"]) > 1
print("%-17s %14s %14s%s" % ("mode", "instr/request", "over bare", "   range" if several else ""))
for mode in modes:
    per = counts[mode]
    spread = "   %d-%d" % (min(per), max(per)) if several else ""
    print("%-17s %14d %14d%s" % (mode, median[mode], median[mode] - median["bare"], spread))
EOF
