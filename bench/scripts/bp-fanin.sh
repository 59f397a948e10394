#!/usr/bin/env bash
# Loss-free QoS 1 fan-in, Tessera vs Mosquitto (docs/BENCHMARKS.md, issue 3):
# 8 publishers -> 1 subscriber, brokers on CPU 1 (`--shards 1`), bench on CPU 0.
#
#   bench/scripts/bp-fanin.sh full                 # ours, mosquitto, ours, mosquitto at full speed
#   bench/scripts/bp-fanin.sh paced BROKER RATE... # one 8 s run per per-publisher rate
#   bench/scripts/bp-fanin.sh pair RATE            # ours at full speed, mosquitto at RATE, twice
#
# BROKER is tessera or mosquitto. Prints one JSON report per run (bench --json)
# preceded by a line naming the run. Needs target/release/{broker,bench}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BENCH=target/release/bench
TPORT=${TPORT:-42883}
MPORT=${MPORT:-42884}
tmp=$(mktemp -d)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_connections -1\n' "$MPORT" >"$tmp/m.conf"
taskset -c 1 target/release/broker --listen "127.0.0.1:$TPORT" --shards 1 \
    --data-dir "$tmp/data" --admin-listen 127.0.0.1:0 >"$tmp/t.log" 2>&1 &
tpid=$!
pids+=("$tpid")
taskset -c 1 mosquitto -c "$tmp/m.conf" >"$tmp/m.log" 2>&1 &
mpid=$!
pids+=("$mpid")
for _ in $(seq 100); do
    grep -q 'tessera: listening' "$tmp/t.log" && break
    sleep 0.1
done
sleep 0.5

run() { # broker rate-args...
    local port pid
    if [[ $1 == tessera ]]; then port=$TPORT pid=$tpid; else port=$MPORT pid=$mpid; fi
    shift
    echo "== $(date -u +%H:%M:%S) run $port $*"
    taskset -c 0 "$BENCH" fanin --publishers 8 --qos 1 --port "$port" --duration 8 --warmup 2 \
        --broker-pid "$pid" --json "$@" || true
}

case ${1:-full} in
full)
    for _ in 1 2; do
        run tessera
        run mosquitto
    done
    ;;
pair)
    for _ in 1 2; do
        run tessera
        run mosquitto --rate "$2"
    done
    ;;
paced)
    broker=$2
    shift 2
    for rate in "$@"; do
        run "$broker" --rate "$rate"
    done
    ;;
*)
    echo "usage: $0 full | pair RATE | paced tessera|mosquitto RATE..." >&2
    exit 2
    ;;
esac
