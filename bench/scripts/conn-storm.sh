#!/usr/bin/env bash
# Connect-storm rounds (issue 3, docs/BENCHMARKS.md "connect storms"): per
# round, the same storm against Tessera BEFORE, Tessera AFTER and Mosquitto,
# one after the other, each broker alone on CPU 1 (Tessera with one shard) and
# the bench on CPU 0:
#   taskset -c 0 bench conn --clients 19000 --rate 40000 --duration 10 \
#       --bind 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 --port PORT --broker-pid PID --json
# Prints per run: Tessera's tessera_connects_total by result, the bench's
# connected count, rate, connect p50/p99 and failures, the listener's `ss -ltn`
# line (Recv-Q, backlog) 0.5 s and 0.8 s into the storm, and the kernel's
# TcpExt counters that moved (ListenOverflows, TCPDeferAcceptDrop, ...).
#
# usage: bench/scripts/conn-storm.sh BEFORE_BROKER AFTER_BROKER ROUNDS [PORT_BASE]
# Environment: HOG=1 pins a busy loop to CPU 1 during each round (the broker
# then shares its CPU, as with a compile running); CLIENTS, RATE, HOLD.
# Run under `flock -x /work/coord/cpu.lock` on the shared machine.
set -uo pipefail
before=$1
after=$2
rounds=$3
base=${4:-46500}
root=$(cd "$(dirname "$0")/../.." && pwd)
bench=${BENCH:-$root/target/release/bench}
clients=${CLIENTS:-19000}
rate=${RATE:-40000}
hold=${HOLD:-10}

tcpext() {
    awk '/^TcpExt:/ { if (!h) { split($0, k); h = 1 } else { for (i = 2; i <= NF; i++) print k[i], $i } }' \
        /proc/net/netstat
}

one() {
    local kind=$1 port=$2 bin=$3 work pid admin sampler
    work=$(mktemp -d)
    tcpext >"$work/ns0"
    if [[ $kind == mosquitto ]]; then
        printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_connections -1\n' \
            "$port" >"$work/m.conf"
        taskset -c 1 mosquitto -c "$work/m.conf" >/dev/null 2>&1 &
    else
        taskset -c 1 "$bin" --listen "127.0.0.1:$port" --shards 1 --admin-listen 127.0.0.1:0 \
            --data-dir "$work/data" >"$work/broker.log" 2>&1 &
    fi
    pid=$!
    sleep 1
    (
        sleep 0.5
        ss -ltnH "sport = :$port" >"$work/ss1"
        sleep 0.3
        ss -ltnH "sport = :$port" >"$work/ss2"
    ) &
    sampler=$!
    taskset -c 0 "$bench" conn --clients "$clients" --rate "$rate" --duration "$hold" \
        --bind 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 --port "$port" --broker-pid "$pid" \
        --json >"$work/report.json" 2>"$work/bench.err"
    wait "$sampler"
    if [[ $kind != mosquitto ]]; then
        admin=$(grep -o 'admin http://[0-9.:]*' "$work/broker.log" | head -1 | sed 's/admin //')
        curl -s "$admin/metrics" | awk '/^tessera_connects_total/ { printf "%s ", $0 } END { print "" }'
    fi
    python3 - "$work/report.json" "$kind" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
lat = r.get("connect_latency") or {}
print(f"{sys.argv[2]}: connected {r.get('connected_count')} per_s {r.get('connect_per_s')} "
      f"p50 {lat.get('p50_us', 0) / 1000:.1f} ms p99 {lat.get('p99_us', 0) / 1000:.1f} ms "
      f"failures {r.get('failures')}")
PY
    echo "ss: $(tr -s ' ' <"$work/ss1") | $(tr -s ' ' <"$work/ss2")"
    tcpext >"$work/ns1"
    join "$work/ns0" "$work/ns1" | awk '$3 > $2 && $1 ~ /ListenOverflows|TCPDeferAcceptDrop|SyncookiesSent|TCPTimeouts|TCPSynRetrans/ { printf "%s %d; ", $1, $3 - $2 } END { print "" }'
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    rm -rf "$work"
}

for ((r = 0; r < rounds; r++)); do
    hog=
    if [[ -n ${HOG:-} ]]; then
        taskset -c 1 sh -c 'while :; do :; done' &
        hog=$!
    fi
    echo "== round $r $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg) hog=${HOG:-0}"
    p=$((base + r * 3))
    echo "-- before"; one tessera "$p" "$before"
    echo "-- after"; one tessera $((p + 1)) "$after"
    echo "-- mosquitto"; one mosquitto $((p + 2)) ""
    [[ -n $hog ]] && kill "$hog"
done
