#!/usr/bin/env bash
# The example gateway's HTTP A/B (what scripts/http-ab.sh was before it measured
# tower_governor too; the gateway figures in BENCHMARKS.md come from it): the gateway with
# tollgate disabled (baseline), accepting every call (counted, never limited) and
# rejecting every call (429), measured with examples/loadgen. The gateway is pinned to
# core 0 and the load generator to core 1; rounds interleave the three configs so drift
# hits them alike.
#
#   scripts/http-ab-gateway.sh [ROUNDS] [SECONDS] [CONCURRENCY]      (defaults: 5 3 32)
#
# Prints one line per run, then the median req/s per config and its ratio to disabled.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
seconds=${2:-3}
concurrency=${3:-32}
configs=(disabled accept reject)

cargo build --release --quiet --example gateway --example loadgen
bin=${CARGO_TARGET_DIR:-target}/release/examples
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for round in $(seq "$rounds"); do
  for cfg in "${configs[@]}"; do
    taskset -c 0 "$bin/gateway" --config "examples/bench/$cfg.toml" --listen 127.0.0.1:0 \
      >"$work/gateway.out" 2>/dev/null &
    pid=$!
    for _ in $(seq 50); do grep -q listening "$work/gateway.out" && break; sleep 0.1; done
    addr=$(sed 's#.*http://##' "$work/gateway.out")
    json=$(taskset -c 1 "$bin/loadgen" --target "http://$addr" --tool echo --users 100 \
      --concurrency "$concurrency" --duration "$seconds" --json)
    kill -TERM "$pid"
    wait "$pid" || true
    rps=$(python3 -c 'import json,sys; print(round(json.load(sys.stdin)["req_per_s"]))' <<<"$json")
    echo "$round $cfg $rps" | tee -a "$work/runs"
  done
done

python3 - "$work/runs" <<'EOF'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    _, cfg, rps = line.split()
    runs.setdefault(cfg, []).append(int(rps))
base = statistics.median(runs["disabled"])
for cfg in ("disabled", "accept", "reject"):
    med = statistics.median(runs[cfg])
    ratios = [r / b for r, b in zip(runs[cfg], runs["disabled"])]
    print(f"{cfg:9} median {med:8.0f} req/s  ratio {med / base:.3f}  "
          f"(per-round {min(ratios):.2f}-{max(ratios):.2f})")
EOF
