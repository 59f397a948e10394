#!/usr/bin/env bash
# What one hop between cores costs on this machine (issue 15's latency target, docs/
# BENCHMARKS.md "What a hop between cores costs"): QoS 1 at 1,000 msg/s, one publisher
# and one subscriber, p50/p99 publish-to-delivery, in these setups, interleaved:
#   one-shard     a Tessera with one shard (CPU 1): publisher and subscriber on one shard
#   same-shard    a Tessera with two shards (one per core), both clients on shard 0
#   cross-shard   the same Tessera, publisher on shard 0, subscriber on shard 1: every
#                 message crosses the shard mesh (one glommio executor wakes another)
#   cross-node    a two-node cluster (one shard each, CPU 0 and CPU 1), publisher on node 1,
#                 subscriber on node 2 (issue 15's cross-node setup)
#   mosquitto     a Mosquitto (CPU 1)
#   mosq-bridge   a Mosquitto (CPU 0) bridged (QoS 1 out) to a Mosquitto (CPU 1): publisher
#                 on the first, subscriber on the second (two epoll loops, one TCP hop)
# The ClientIDs' shards are fixed by the ClientID hash (shard/src/hash.rs, pinned by its
# `known_vectors_never_change` test): prefix "b" puts b-pub-0 and b-sub-0 on shard 0 of
# two, prefix "c" puts c-pub-0 on shard 0 and c-sub-0 on shard 1. The script checks the
# placement through the admin API during each two-shard run and says if it differs.
#
# Usage: bench/scripts/hop-latency.sh [target/release]
# Env: ROUNDS (5), DURATION (5), WARMUP (1), OUT (hop-latency.jsonl), PORT_BASE (24600),
#      SETUPS (one-shard,same-shard,cross-shard,cross-node,mosquitto,mosq-bridge),
#      IDLE_POLL_US (unset: the default, 0; else every Tessera's server.idle_poll_us)
# Build first: cargo build --release -p tessera-broker -p tessera-bench
set -euo pipefail
BIN=${1:-target/release}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
OUT=${OUT:-hop-latency.jsonl}
SETUPS=${SETUPS:-one-shard,same-shard,cross-shard,cross-node,mosquitto,mosq-bridge}
base=${PORT_BASE:-24600}
cd "$(dirname "$0")/../.."
# shellcheck source=bench/scripts/lib.sh
source bench/scripts/lib.sh
need_bins "$BIN/broker" "$BIN/bench" "$BIN/brokerctl"
for tool in mosquitto taskset curl python3; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done

work=$(mktemp -d)
chmod 755 "$work"
pids=()
trap cleanup_pids_and_work EXIT

ONE=$((base + 1)) TWO=$((base + 2)) N1=$((base + 3)) N2=$((base + 4))
MOSQ=$((base + 5)) MB_LOCAL=$((base + 6)) MB_REMOTE=$((base + 7))
printf '[log]\nlevel = "warn"\n' >"$work/tessera.toml"
if [[ -n ${IDLE_POLL_US:-} ]]; then
    printf '[server]\nidle_poll_us = %s\n' "$IDLE_POLL_US" >>"$work/tessera.toml"
fi
taskset -c 1 "$BIN/broker" --shards 1 --listen "127.0.0.1:$ONE" \
    --admin-listen "127.0.0.1:$((base + 21))" --data-dir "$work/one" \
    --config "$work/tessera.toml" >"$work/one.log" 2>&1 &
pids+=($!)
# Two shards: glommio places one executor per core.
"$BIN/broker" --shards 2 --listen "127.0.0.1:$TWO" \
    --admin-listen "127.0.0.1:$((base + 22))" --data-dir "$work/two" \
    --config "$work/tessera.toml" >"$work/two.log" 2>&1 &
pids+=($!)
"$BIN/brokerctl" cluster certs --out "$work/certs" --nodes 2 >/dev/null
peers="1=127.0.0.1:$((base + 13)),2=127.0.0.1:$((base + 14))"
for id in 1 2; do
    taskset -c $((id - 1)) "$BIN/broker" --shards 1 --listen "127.0.0.1:$((base + 2 + id))" \
        --admin-listen "127.0.0.1:$((base + 22 + id))" --data-dir "$work/node-$id" \
        --config "$work/tessera.toml" --node-id "$id" \
        --cluster-listen "127.0.0.1:$((base + 12 + id))" --cluster-peers "$peers" \
        --cluster-certs "$work/certs" >"$work/node-$id.log" 2>&1 &
    pids+=($!)
done
printf 'listener %s 127.0.0.1\nallow_anonymous true\nlog_dest none\n' "$MOSQ" >"$work/mosq.conf"
taskset -c 1 mosquitto -c "$work/mosq.conf" 2>"$work/mosq.err" &
pids+=($!)
printf 'listener %s 127.0.0.1\nallow_anonymous true\nlog_dest none\n' "$MB_REMOTE" >"$work/mb-remote.conf"
taskset -c 1 mosquitto -c "$work/mb-remote.conf" 2>"$work/mb-remote.err" &
pids+=($!)
cat >"$work/mb-local.conf" <<EOF
listener $MB_LOCAL 127.0.0.1
allow_anonymous true
log_dest none
connection hop
address 127.0.0.1:$MB_REMOTE
cleansession true
clientid hop-bridge
try_private false
notifications false
topic hop/# out 1
EOF
taskset -c 0 mosquitto -c "$work/mb-local.conf" 2>"$work/mb-local.err" &
pids+=($!)
for admin in 21 22 23 24; do wait_ready $((base + admin)); done
for port in "$MOSQ" "$MB_LOCAL" "$MB_REMOTE"; do wait_port "$port"; done
sleep 2 # the bridge connects

# placement ADMIN_PORT PREFIX: "pub=<shard> sub=<shard>" of the bench's two clients.
placement() {
    curl -sf "http://127.0.0.1:$1/api/v1/clients?limit=100" | python3 -c '
import json, sys
prefix = sys.argv[1]
items = json.load(sys.stdin).get("items", [])
shard = {c["client_id"]: c["shard"] for c in items}
print("pub=%s sub=%s" % (shard.get(prefix + "-pub-0"), shard.get(prefix + "-sub-0")))
' "$2" || echo "pub=? sub=?"
}

# run SETUP: one bench run, one JSON line to OUT.
run() {
    local setup=$1 addr=() prefix=x want="" admin=""
    case $setup in
        one-shard) addr=(--port "$ONE") ;;
        same-shard) addr=(--port "$TWO"); prefix=b; want="pub=0 sub=0"; admin=$((base + 22)) ;;
        cross-shard) addr=(--port "$TWO"); prefix=c; want="pub=0 sub=1"; admin=$((base + 22)) ;;
        cross-node) addr=(--port "$N2" --pub-addr "127.0.0.1:$N1") ;;
        mosquitto) addr=(--port "$MOSQ") ;;
        mosq-bridge) addr=(--port "$MB_REMOTE" --pub-addr "127.0.0.1:$MB_LOCAL") ;;
    esac
    local rc=0
    "$BIN/bench" latency --rate 1000 --qos 1 "${addr[@]}" --host 127.0.0.1 \
        --client-id-prefix "$prefix" --duration "$DURATION" --warmup "$WARMUP" \
        --topic-prefix "hop/$setup/$RANDOM" --json >"$work/bench.out" 2>"$work/bench.err" &
    local bench=$!
    if [[ -n $want ]]; then
        sleep $((WARMUP + 1))
        local got
        got=$(placement "$admin" "$prefix")
        [[ $got == "$want" ]] || echo "$setup: clients placed $got, not $want: this run is not $setup" >&2
    fi
    wait "$bench" || rc=$?
    record_report "$setup" lat-q1 "$rc" "$work/bench.out" "$work/bench.err" "$OUT"
}

: >"$OUT"
for round in $(seq "$ROUNDS"); do
    for setup in ${SETUPS//,/ }; do
        echo "round $round: $setup" >&2
        run "$setup"
    done
done

python3 - "$OUT" <<'PY'
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[r["setup"]].append(r["report"])
def med(rs, k):
    xs = [(r.get("latency") or {}).get(k) for r in rs]
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
base = {k: med(runs.get("one-shard", []), k) for k in ("p50_us", "p99_us")}
print("| setup | runs | p50 µs | p99 µs | p99 rounds | p99 / one-shard | lost |")
print("|---|---|---|---|---|---|---|")
for setup, rs in runs.items():
    p50, p99 = med(rs, "p50_us"), med(rs, "p99_us")
    rounds = ", ".join(f'{(r.get("latency") or {}).get("p99_us", 0):,.0f}' for r in rs)
    ratio = f"{p99 / base['p99_us']:.2f}" if p99 and base["p99_us"] else ""
    lost = sum(r.get("loss_count", 0) for r in rs)
    print(f"| {setup} | {len(rs)} | {p50:,.0f} | {p99:,.0f} | {rounds} | {ratio} | {lost} |")
PY
