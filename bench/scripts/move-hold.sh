#!/usr/bin/env bash
# What the new owner's hold costs a session that just moved between nodes (issue 15,
# docs/ARCHITECTURE.md "Order behind the redirects"): for `MOVED_WINDOW_MS` (30 s)
# after a move, the new node holds each direct copy for the moved-in session until the
# old node's ghost redirected it (or HOLD_MAX_MS), so the copies come over the longer
# path publisher's node -> old node -> new node; under `sync` durability each held QoS
# 1/2 copy is also stored and deleted once.
#
# A 3-node cluster (one shard each), a persistent subscriber and a publisher at 1,000
# msg/s on node 3 (`bench latency --persistent`, one ClientID prefix per round):
#   before  - the subscriber on node 1, the session made there (no window);
#   moved   - at once after, the same subscriber on node 2 (a takeover: node 2 holds);
#   settled - the same subscriber on node 2 again after the window ran out.
# p50/p99 of each, per durability (`DURABILITIES`, default "memory sync").
#
# usage: bench/scripts/move-hold.sh BINDIR
# Env: ROUNDS (3), DURATION (5), QOS (1), OUT (move-hold.jsonl), PORT_BASE (24900),
#      DURABILITIES ("memory sync").
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${1:-$root/target/release}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
QOS=${QOS:-1}
OUT=${OUT:-move-hold.jsonl}
base=${PORT_BASE:-24900}
DURABILITIES=${DURABILITIES:-memory sync}
WINDOW_S=31
# shellcheck source=bench/scripts/lib.sh
source "$root/bench/scripts/lib.sh"
need_bins "$BIN/broker" "$BIN/brokerctl" "$BIN/bench"
work=$(mktemp -d)
pids=()
trap cleanup_pids_and_work EXIT

start_cluster() {
    local durability=$1 dir=$2 id
    "$BIN/brokerctl" cluster certs --out "$dir/certs" --nodes 3 >/dev/null
    local peers="1=127.0.0.1:$((base + 11)),2=127.0.0.1:$((base + 12)),3=127.0.0.1:$((base + 13))"
    for id in 1 2 3; do
        TESSERA_PERSISTENCE__DURABILITY=$durability "$BIN/broker" --shards 1 \
            --listen "127.0.0.1:$((base + id))" --admin-listen "127.0.0.1:$((base + 20 + id))" \
            --data-dir "$dir/node-$id" --node-id "$id" \
            --cluster-listen "127.0.0.1:$((base + 10 + id))" --cluster-peers "$peers" \
            --cluster-certs "$dir/certs" >"$dir/node-$id.log" 2>&1 &
        pids+=($!)
    done
    for id in 1 2 3; do wait_ready $((base + 20 + id)); done
}

stop_cluster() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}

# run DURABILITY CASE SUBSCRIBER_NODE PREFIX TOPIC
run() {
    local durability=$1 case=$2 node=$3 prefix=$4 topic=$5 rc=0
    "$BIN/bench" latency --rate 1000 --qos "$QOS" --port $((base + node)) --host 127.0.0.1 \
        --pub-addr "127.0.0.1:$((base + 3))" --persistent --client-id-prefix "$prefix" \
        --topic-prefix "$topic" --duration "$DURATION" --warmup 0 --json \
        >"$work/bench.out" 2>"$work/bench.err" || rc=$?
    record_report "$durability" "$case" "$rc" "$work/bench.out" "$work/bench.err" "$OUT"
}

: >"$OUT"
for durability in $DURABILITIES; do
    dir="$work/$durability"
    mkdir -p "$dir"
    start_cluster "$durability" "$dir"
    for round in $(seq "$ROUNDS"); do
        prefix="mh-$durability-$round"
        topic="mh/$durability/$round"
        echo "$durability round $round: before (node 1)" >&2
        run "$durability" before 1 "$prefix" "$topic"
        echo "$durability round $round: moved (node 2, at once)" >&2
        run "$durability" moved 2 "$prefix" "$topic"
        echo "$durability round $round: settled (node 2, after ${WINDOW_S} s)" >&2
        sleep "$WINDOW_S"
        run "$durability" settled 2 "$prefix" "$topic"
    done
    stop_cluster
done

python3 - "$OUT" <<'PY'
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[(r["setup"], r["case"])].append(r["report"])
def lat(r, k):
    return (r.get("latency") or {}).get(k)
print("| durability | case | runs | p50 µs (median) | p99 µs (median) | p99 per round | p99 / settled | lost |")
print("|---|---|---|---|---|---|---|---|")
for durability in dict.fromkeys(s for s, _ in runs):
    settled = [lat(r, "p99_us") for r in runs.get((durability, "settled"), []) if lat(r, "p99_us")]
    base = statistics.median(settled) if settled else None
    for case in ("before", "moved", "settled"):
        rs = runs.get((durability, case), [])
        p50 = [lat(r, "p50_us") for r in rs if lat(r, "p50_us") is not None]
        p99 = [lat(r, "p99_us") for r in rs if lat(r, "p99_us") is not None]
        if not p99:
            continue
        m50, m99 = statistics.median(p50), statistics.median(p99)
        ratio = f"{m99 / base:.2f}" if base else ""
        lost = sum(r.get("loss_count", 0) for r in rs)
        rounds = ", ".join(f"{x:,.0f}" for x in p99)
        print(f"| {durability} | {case} | {len(rs)} | {m50:,.0f} | {m99:,.0f} | {rounds} | {ratio} | {lost} |")
PY
