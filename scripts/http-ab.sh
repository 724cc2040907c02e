#!/usr/bin/env bash
# HTTP A/B with the peer in every run: one axum hello-world (examples/bench_server.rs)
# with no layer, behind tower_governor (keyed by peer IP, with and without its headers)
# and behind tollgate (one by_user rule: legacy headers with and without the Decision
# extension, or neither), every call accepted, measured with examples/loadgen (GET /, 100 users sending
# x-user-id, keep-alive connections). The server is pinned to core 0 and loadgen to core
# 1; each round runs every mode once, starting one mode later than the round before, so
# drift and position hit the modes alike. (The example gateway's A/B is
# scripts/http-ab-gateway.sh.)
#
#   scripts/http-ab.sh [ROUNDS] [SECONDS] [CONCURRENCY]      (defaults: 5 3 64)
#   MODES="bare tollgate" scripts/http-ab.sh 3 2             (a subset; bare is the base)
#   CSV=benchmarks/http-ab.csv scripts/http-ab.sh 7 3 64     (the summary also as CSV)
#
# Prints one line per run, then per mode the median req/s, the ratio of medians to bare
# and the range of per-round ratios, and the server's CPU time per request (user + system,
# from /proc, over the load only) with its ratio to bare: on a machine shared with other
# work, throughput follows whoever else is running, while CPU per request stays close to
# what the server itself spends. Every process it starts has a deadline and is stopped by
# its pid; a run whose answers are not all 2xx fails the script. With CSV=PATH, the
# summary's ratios and CPU times are also written to PATH (one row per mode, the columns
# scripts/charts.py reads); what is measured does not change.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
seconds=${2:-3}
concurrency=${3:-64}
read -r -a modes <<<"${MODES:-bare governor governor_headers tollgate tollgate_lean tollgate_none}"
for n in "$rounds" "$seconds" "$concurrency"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "http-ab: expected whole numbers, got '$n'" >&2; exit 2; }
done
((rounds <= 50 && seconds <= 60)) || { echo "http-ab: at most 50 rounds of 60 s" >&2; exit 2; }
[[ " ${modes[*]} " == *" bare "* ]] || { echo "http-ab: MODES must include bare" >&2; exit 2; }

# Graceful shutdown takes milliseconds once loadgen has closed its connections.
grace=50
# shellcheck source=scripts/lib/bench-server.sh
source scripts/lib/bench-server.sh
# One run's loadgen report and the server's CPU ticks -> "mode req/s p50 p99 cpu_us/req";
# fails unless every answer was 2xx.
cat >"$work/check.py" <<'EOF'
import json, os, sys
mode, r, ticks = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
bad = r["responses"] - r["status_2xx"]
if bad or r["transport_errors"] or r["unfinished"] or not r["responses"]:
    sys.exit("http-ab: %s: %d answers not 2xx, %d transport errors, %d unfinished, of %d"
             % (mode, bad, r["transport_errors"], r["unfinished"], r["responses"]))
lat = r["latency_us"]
cpu_us = ticks * 1e6 / os.sysconf("SC_CLK_TCK") / r["responses"]
print(mode, round(r["req_per_s"]), lat["p50"], lat["p99"], "%.2f" % cpu_us)
EOF
# User + system CPU ticks of process $1 so far (fields 14 and 15 of /proc/PID/stat, counted
# after the parenthesised command name).
cpu_ticks() {
  local stat
  stat=$(<"/proc/$1/stat")
  stat=${stat##*) }
  read -r -a f <<<"$stat"
  echo $((f[11] + f[12]))
}

for round in $(seq "$rounds"); do
  for i in "${!modes[@]}"; do
    mode=${modes[$(((i + round - 1) % ${#modes[@]}))]}
    : >"$work/server.out"
    # `timeout` bounds the server even if this script dies; it passes TERM on.
    taskset -c 0 timeout "$((seconds + 60))" "$bin/bench_server" --mode "$mode" \
      --listen 127.0.0.1:0 >"$work/server.out" 2>"$work/server.err" &
    server=$!
    for _ in $(seq 100); do grep -q listening "$work/server.out" && break; sleep 0.05; done
    if ! grep -q listening "$work/server.out"; then
      echo "http-ab: bench_server --mode $mode did not start:" >&2
      cat "$work/server.err" >&2
      exit 1
    fi
    addr=$(sed 's#.*http://##' "$work/server.out")
    # The server is the child of `timeout`.
    pid=$(<"/proc/$server/task/$server/children")
    pid=${pid%% *}
    before=$(cpu_ticks "$pid")
    json=$(taskset -c 1 timeout "$((seconds + 30))" "$bin/loadgen" --target "http://$addr/" \
      --users 100 --concurrency "$concurrency" --duration "$seconds" --json)
    after=$(cpu_ticks "$pid")
    stop_server
    line=$(python3 "$work/check.py" "$mode" "$json" "$((after - before))")
    echo "$round $line" | tee -a "$work/runs"
  done
done

CSV=${CSV:-} COMMAND="scripts/http-ab.sh $rounds $seconds $concurrency" \
  python3 - "$work/runs" "${modes[@]}" <<'EOF'
import datetime, os, statistics, sys
runs, p50s, cpus = {}, {}, {}
for line in open(sys.argv[1]):
    rnd, mode, rps, p50, _, cpu = line.split()
    runs.setdefault(mode, {})[rnd] = int(rps)
    p50s.setdefault(mode, []).append(int(p50))
    cpus.setdefault(mode, {})[rnd] = float(cpu)
med = statistics.median
base, base_cpu = runs["bare"], cpus["bare"]
print(f"\n{'mode':17} {'median req/s':>12} {'ratio':>6}  {'per-round ratios':24}"
      f" {'p50':>7}  {'CPU/req':>9} {'ratio':>6}")
for mode in sys.argv[2:]:
    ratios = [rps / base[rnd] for rnd, rps in runs[mode].items()]
    print(f"{mode:17} {med(runs[mode].values()):12.0f}"
          f" {med(runs[mode].values()) / med(base.values()):6.3f}"
          f"  {min(ratios):.2f}-{max(ratios):.2f} (med {med(ratios):.3f})"
          f" {med(p50s[mode]):5.0f}us"
          f"  {med(cpus[mode].values()):7.2f}us"
          f" {med(cpus[mode].values()) / med(base_cpu.values()):6.3f}")
if os.environ["CSV"]:
    with open(os.environ["CSV"], "w") as out:
        out.write(f"# {datetime.date.today()}: {os.environ['COMMAND']}\n")
        out.write("mode,ratio_to_bare,cpu_us_per_request,cpu_ratio_to_bare\n")
        for mode in sys.argv[2:]:
            out.write(f"{mode},{med(runs[mode].values()) / med(base.values()):.3f},"
                      f"{med(cpus[mode].values()):.2f},"
                      f"{med(cpus[mode].values()) / med(base_cpu.values()):.3f}\n")
    print(f"wrote {os.environ['CSV']}")
EOF
