#!/usr/bin/env bash
# Session ownership in a cluster (issue 15, docs/BENCHMARKS.md "Cluster sessions"):
# 1. takeover latency: bench/examples/takeover.rs against a 3-node cluster (node 1 and
#    node 2; the same rounds on node 1 alone are the same-node takeover beside it);
# 2. connects/s: the same connect storm (`bench conn`, new ClientIDs, each one a raft
#    claim) against node 1 of the 3-node cluster, then against a single node.
# Every broker runs with one shard; all of them and the bench share the machine.
#
# usage: bench/scripts/cluster-sessions.sh [ROUNDS] [CLIENTS] [RATE] [PORT_BASE]
# Run under `flock -x /work/coord/cpu.lock` on the shared machine.
set -euo pipefail
rounds=${1:-500}
clients=${2:-5000}
rate=${3:-20000}
base=${4:-22100}
root=$(cd "$(dirname "$0")/../.." && pwd)
broker=${BROKER:-$root/target/release/broker}
brokerctl=${BROKERCTL:-$(dirname "$broker")/brokerctl}
bench=${BENCH:-$root/target/release/bench}
takeover=${TAKEOVER:-$root/target/release/examples/takeover}
# shellcheck source=bench/scripts/lib.sh
source "$root/bench/scripts/lib.sh"
work=$(mktemp -d)
pids=()
trap cleanup_pids_and_work EXIT

"$brokerctl" cluster certs --out "$work/certs" --nodes 3 >/dev/null
peers="1=127.0.0.1:$((base + 11)),2=127.0.0.1:$((base + 12)),3=127.0.0.1:$((base + 13))"
for id in 1 2 3; do
    "$broker" --shards 1 --listen "127.0.0.1:$((base + id))" \
        --admin-listen "127.0.0.1:$((base + 20 + id))" --data-dir "$work/node-$id" \
        --node-id "$id" --cluster-listen "127.0.0.1:$((base + 10 + id))" \
        --cluster-peers "$peers" --cluster-certs "$work/certs" \
        >"$work/node-$id.log" 2>&1 &
    pids+=($!)
done
for id in 1 2 3; do
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$((base + 20 + id))/ready" >/dev/null && break
        sleep 0.2
    done
done
echo "== takeover ($rounds rounds)"
"$takeover" "127.0.0.1:$((base + 1))" "127.0.0.1:$((base + 2))" "$rounds"
curl -s "http://127.0.0.1:$((base + 22))/metrics" |
    grep -E '^tessera_cluster_session_(takeovers_total|takeover_failures_total|takeover_seconds_(sum|count))'

conn() {
    "$bench" conn --clients "$clients" --rate "$rate" --duration 1 --port "$1" 2>/dev/null |
        grep -iE 'connect|rate|fail' | head -8
}
echo "== connects: 3-node cluster, node 1 ($clients clients at up to $rate/s)"
conn $((base + 1))
curl -s "http://127.0.0.1:$((base + 21))/metrics" |
    grep -E '^tessera_cluster_(session_claims_total|ops_per_entry_(sum|count))'
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
wait 2>/dev/null || true
pids=()
"$broker" --shards 1 --listen "127.0.0.1:$((base + 4))" --admin-listen "127.0.0.1:$((base + 24))" \
    --data-dir "$work/single" >"$work/single.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$((base + 24))/ready" >/dev/null && break
    sleep 0.2
done
echo "== connects: single node ($clients clients at up to $rate/s)"
conn $((base + 4))
