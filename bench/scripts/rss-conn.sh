#!/usr/bin/env bash
# One idle-connection memory run (issue 3 target: RSS per idle connection):
# starts a broker pinned to CPU 1 (Tessera with one shard, or Mosquitto),
# opens CLIENTS idle connections at RATE per second from the bench pinned to
# CPU 0, and prints the bench's connect and RSS-per-connection figures plus the
# broker's /proc smaps_rollup (Rss, Anonymous) while the connections are held.
#
# usage: bench/scripts/rss-conn.sh tessera|mosquitto PORT CLIENTS RATE [BROKER_ARGS...]
# e.g.:  bench/scripts/rss-conn.sh tessera 41883 19000 10000
#        bench/scripts/rss-conn.sh tessera 41883 19000 10000 --config no-trim.toml
# Needs release builds of broker and bench (target/release) and mosquitto; build the
# default (production) build, jemalloc included: cargo build --release -p tessera-broker -p tessera-bench
# Environment: HOLD (seconds the connections are held, default 10); PRELOAD
# (a library to LD_PRELOAD into Tessera, e.g. another malloc, for comparisons);
# BROKER (another Tessera binary, default target/release/broker).
set -euo pipefail
kind=$1
port=$2
clients=$3
rate=$4
shift 4
hold=${HOLD:-10}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/target/release
work=$(mktemp -d)
pid=
cleanup() {
    [[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
if [[ $kind == mosquitto ]]; then
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_connections -1\n' \
        "$port" >"$work/mosquitto.conf"
    taskset -c 1 mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
else
    env ${PRELOAD:+LD_PRELOAD=$PRELOAD} taskset -c 1 "${BROKER:-$bin/broker}" --listen "127.0.0.1:$port" --shards 1 \
        --admin-listen 127.0.0.1:0 --data-dir "$work/data" "$@" >"$work/broker.log" 2>&1 &
fi
pid=$!
sleep 1
kill -0 "$pid"
# The last smaps_rollup taken while every connection is held (the bench
# disconnects after its hold; sampling stops when the broker's fd count drops).
(
    while kill -0 "$pid" 2>/dev/null; do
        fds=$(find "/proc/$pid/fd" -maxdepth 1 2>/dev/null | wc -l)
        if ((fds > clients)); then
            grep -E '^(Rss|Anonymous):' "/proc/$pid/smaps_rollup" | tr -s ' ' |
                paste -sd' ' >"$work/smaps.tmp" && mv "$work/smaps.tmp" "$work/smaps"
        fi
        sleep 1
    done
) &
sampler=$!
taskset -c 0 "$bin/bench" conn --clients "$clients" --rate "$rate" --duration "$hold" \
    --bind 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 --port "$port" --broker-pid "$pid" \
    --json >"$work/report.json" 2>"$work/bench.err" || true
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
python3 - "$work/report.json" "$kind" "$rate" <<'EOF'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
lat = r.get("connect_latency") or {}
fails = sum(r.get("failures", {}).values())
print(f"{sys.argv[2]} rate {sys.argv[3]}: connected {r.get('connected_count')} "
      f"(failures {fails}), connect p99 {lat.get('p99_us', 0) / 1000:.1f} ms, "
      f"RSS {r.get('broker_rss_before_bytes', 0) / 1e6:.1f} -> "
      f"{r.get('broker_rss_after_bytes', 0) / 1e6:.1f} MB, "
      f"{r.get('broker_rss_per_connection_bytes')} B per connection")
if fails:
    print("  failures:", ", ".join(f"{n} x {why}" for why, n in r["failures"].items()))
EOF
echo "  held: $(cat "$work/smaps" 2>/dev/null || echo 'no sample')"
if [[ $kind != mosquitto ]]; then
    grep -ci 'malloc trim' "$work/broker.log" | sed 's/^/  trim log lines: /' || true
fi
