# Sourced (from the repository's root) by scripts/http-ab.sh and scripts/http-callgrind.sh:
# builds examples/bench_server and examples/loadgen, makes a work directory, and keeps
# one server process at a time in `server`, which `stop_server` ends by its pid (TERM,
# then KILL after `grace` tenths of a second). On exit the server is stopped and the work
# directory removed.
cargo build --release --quiet --example bench_server --example loadgen
bin=${CARGO_TARGET_DIR:-target}/release/examples
work=$(mktemp -d)
server=""
stop_server() {
  [[ -n $server ]] || return 0
  kill -TERM "$server" 2>/dev/null || true
  for _ in $(seq "${grace:-50}"); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=""
}
trap 'stop_server; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
