#!/usr/bin/env bash
# Issue 15, ids on the local mesh (docs/ARCHITECTURE.md "Several shards per node"): the
# cost of giving every publication a PubId on its shard and noting it on the shard that
# receives a copy over the local mesh. Two single-node clusters (so the engines are in cluster mode and give ids),
# 2 shards each, one on main and one on this change, measured alternately; client ids
# fixed (prefix h15m40) so the 4 fan-in publishers are on shard 0 and the subscriber on
# shard 1: every fan-in message crosses the mesh. The bench runs unpinned, as do the
# brokers (2-core machine).
# Usage: bench/scripts/mesh-ids.sh MAIN_BIN_DIR IDS_BIN_DIR (each with broker, bench and
# brokerctl: e.g. release builds of main and of the change, copied aside)
# Env: ROUNDS (5), DURATION (5), WARMUP (1), OUT (/tmp/mesh-ids.jsonl), PORT_BASE (24600)
set -euo pipefail
MAIN=$1 IDS=$2
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
OUT=${OUT:-/tmp/mesh-ids.jsonl}
SCENARIOS=${SCENARIOS:-fanin-q0,fanin-q1,fanout-q0}
base=${PORT_BASE:-24600}
cd "$(dirname "$0")/../.."
# shellcheck source=bench/scripts/lib.sh
source bench/scripts/lib.sh
work=$(mktemp -d)
chmod 755 "$work"
pids=()
trap cleanup_pids_and_work EXIT
printf '[log]\nlevel = "warn"\n' >"$work/tessera.toml"
"$MAIN/brokerctl" cluster certs --out "$work/certs" --nodes 1 >/dev/null
i=0
for setup in main ids; do
    i=$((i + 1))
    bin=$MAIN; [[ $setup == ids ]] && bin=$IDS
    "$bin/broker" --shards 2 --listen "127.0.0.1:$((base + i))" \
        --admin-listen "127.0.0.1:$((base + 20 + i))" --data-dir "$work/$setup" \
        --config "$work/tessera.toml" --node-id 1 \
        --cluster-listen "127.0.0.1:$((base + 10 + i))" --cluster-peers "1=127.0.0.1:$((base + 10 + i))" \
        --cluster-certs "$work/certs" >"$work/$setup.log" 2>&1 &
    pids+=($!)
done
wait_ready $((base + 21))
wait_ready $((base + 22))
run() {
    local setup=$1 scenario=$2 port=$((base + 1)) args=()
    [[ $setup == ids ]] && port=$((base + 2))
    case $scenario in
        fanin-q0) args=(fanin --publishers 4 --subscribers 1 --qos 0) ;;
        fanin-q1) args=(fanin --publishers 4 --subscribers 1 --qos 1) ;;
        fanout-q0) args=(fanout --subscribers 100 --qos 0) ;;
    esac
    local rc=0
    "$MAIN/bench" "${args[@]}" --port "$port" --host 127.0.0.1 --client-id-prefix h15m40 \
        --duration "$DURATION" --warmup "$WARMUP" --topic-prefix "h15m/$scenario/$RANDOM" \
        --json >"$work/bench.out" 2>"$work/bench.err" || rc=$?
    record_report "$setup" "$scenario" "$rc" "$work/bench.out" "$work/bench.err" "$OUT"
}
: >"$OUT"
for round in $(seq "$ROUNDS"); do
    for scenario in ${SCENARIOS//,/ }; do
        order="main ids"; ((round % 2 == 0)) && order="ids main"
        for setup in $order; do
            echo "round $round: $scenario on $setup" >&2
            run "$setup" "$scenario"
        done
    done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[(r["case"], r["setup"])].append(r["report"]["received_msg_per_s"])
for case in ["fanin-q0", "fanin-q1", "fanout-q0"]:
    m, i = runs[(case, "main")], runs[(case, "ids")]
    if not m or not i: continue
    mm, mi = statistics.median(m), statistics.median(i)
    print(f"| {case} | main {mm:,.0f} | ids {mi:,.0f} | ids/main {mi/mm:.3f} | main runs {[round(x) for x in m]} | ids runs {[round(x) for x in i]} |")
PY
