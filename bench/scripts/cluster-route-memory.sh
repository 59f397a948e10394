#!/usr/bin/env bash
# Memory per route entry and per remote subscription (issue 15, docs/BENCHMARKS.md
# "Cluster memory per route"), beside Mosquitto's memory per subscription in the same run.
#
# A 2-node Tessera cluster (one shard each) and a Mosquitto. Phases:
#   1. N distinct filters (mem/<i>/+/t) subscribed on node 2 over a few connections.
#      Every SUBACK waits until both nodes applied the route, so afterwards node 1 holds
#      N route entries for node 2 (its replica of the cluster table) and nothing else,
#      and node 2 holds N subscriptions plus their N routes.
#   2. The same N filters subscribed again on node 2 by other connections: no new route
#      (a node's second subscriber to a filter needs none), so node 1 should not grow;
#      node 2's growth is the cost of a subscription alone.
#   3. The N filters subscribed on Mosquitto (one process, no cluster): its memory per
#      subscription, the reference.
# Memory is the broker's anonymous resident memory (/proc/PID/smaps_rollup "Anonymous":
# the heap; LMDB's file-backed pages are reported apart as "file"), sampled after the
# routes are applied and 2 s of quiet.
#
# Usage: bench/scripts/cluster-route-memory.sh [target/release]
# Env: N (50000), CONNS (10), PORT_BASE (24300)
# Build first: cargo build --release -p tessera-broker -p tessera-bench
set -euo pipefail
BIN=${1:-target/release}
N=${N:-50000}
CONNS=${CONNS:-10}
base=${PORT_BASE:-24300}
cd "$(dirname "$0")/../.."
# shellcheck source=bench/scripts/lib.sh
source bench/scripts/lib.sh
need_bins "$BIN/broker" "$BIN/brokerctl"
for tool in mosquitto curl python3; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done

work=$(mktemp -d)
chmod 755 "$work"
pids=()
trap cleanup_pids_and_work EXIT

# anon KiB and file KiB of a process.
mem() { awk '/^Anonymous:/ {a=$2} /^Rss:/ {r=$2} END {print a, r - a}' "/proc/$1/smaps_rollup"; }

# The value of metric line $2 (exact labels) on admin port $1.
metric() { curl -sf "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }

# Subscribes N filters on port $1 as clients $2-*, keeps them in the background.
subscribe() {
    local fifo="$work/sub-$2.out"
    python3 bench/scripts/subscribe_many.py 127.0.0.1 "$1" "$2" "$CONNS" 0 "$N" 'mem/{i}/+/t' >"$fifo" &
    pids+=($!)
    for _ in $(seq 1200); do
        grep -q '^subscribed' "$fifo" && return 0
        kill -0 "${pids[-1]}" 2>/dev/null || { echo "subscriber $2 failed" >&2; return 1; }
        sleep 0.1
    done
    echo "subscriber $2: not done in 120 s" >&2
    return 1
}

printf '[log]\nlevel = "warn"\n' >"$work/tessera.toml"
"$BIN/brokerctl" cluster certs --out "$work/certs" --nodes 2 >/dev/null
N2=$((base + 2)) MOSQ=$((base + 4))
peers="1=127.0.0.1:$((base + 11)),2=127.0.0.1:$((base + 12))"
declare -A pid
for id in 1 2; do
    "$BIN/broker" --shards 1 --listen "127.0.0.1:$((base + id))" \
        --admin-listen "127.0.0.1:$((base + 20 + id))" --data-dir "$work/node-$id" \
        --config "$work/tessera.toml" --node-id "$id" \
        --cluster-listen "127.0.0.1:$((base + 10 + id))" --cluster-peers "$peers" \
        --cluster-certs "$work/certs" >"$work/node-$id.log" 2>&1 &
    pids+=($!)
    pid[$id]=$!
done
printf 'listener %s 127.0.0.1\nallow_anonymous true\nlog_dest none\n' "$MOSQ" >"$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" 2>"$work/mosquitto.err" &
pids+=($!)
pid[m]=$!
wait_ready $((base + 21))
wait_ready $((base + 22))
wait_port "$MOSQ"
sleep 2

read -r a1_0 f1_0 <<<"$(mem "${pid[1]}")"
read -r a2_0 f2_0 <<<"$(mem "${pid[2]}")"
read -r am_0 _ <<<"$(mem "${pid[m]}")"

# Phase 1: N routes.
subscribe "$N2" routes
for _ in $(seq 300); do
    [[ $(metric $((base + 21)) 'tessera_cluster_routes{node="2"}') == "$N" ]] && break
    sleep 0.1
done
routes=$(metric $((base + 21)) 'tessera_cluster_routes{node="2"}')
[[ $routes == "$N" ]] || { echo "node 1 holds $routes routes of node 2, not $N" >&2; exit 1; }
sleep 2
read -r a1_1 f1_1 <<<"$(mem "${pid[1]}")"
read -r a2_1 f2_1 <<<"$(mem "${pid[2]}")"

# Phase 2: the same filters again on node 2: subscriptions without new routes.
subscribe "$N2" again
sleep 2
read -r a1_2 _ <<<"$(mem "${pid[1]}")"
read -r a2_2 _ <<<"$(mem "${pid[2]}")"
routes2=$(metric $((base + 21)) 'tessera_cluster_routes{node="2"}')

# Phase 3: Mosquitto.
subscribe "$MOSQ" mosq
sleep 2
read -r am_1 _ <<<"$(mem "${pid[m]}")"

per() { python3 -c "print(round(($2 - $1) * 1024 / $N))"; }
echo "N=$N filters, $CONNS connections per phase; anonymous (heap) bytes per entry:"
echo "  node 1, per route entry of another node (its replica of the table): $(per "$a1_0" "$a1_1") B (file-backed: $(per "$f1_0" "$f1_1") B)"
echo "  node 2, per subscription + its route (the subscriber's node):        $(per "$a2_0" "$a2_1") B (file-backed: $(per "$f2_0" "$f2_1") B)"
echo "  node 2, per further subscription to a routed filter (no new route):  $(per "$a2_1" "$a2_2") B"
echo "  node 1, growth for those further subscriptions:                      $(per "$a1_1" "$a1_2") B (routes of node 2 still $routes2)"
echo "  Mosquitto 'per subscription' (one process, same filters):             $(per "$am_0" "$am_1") B"
