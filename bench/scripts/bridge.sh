#!/usr/bin/env bash
# Messages through one MQTT bridge (issue 19, docs/BENCHMARKS.md "Bridges"): Tessera's
# bridge against Mosquitto's own bridge, in one run.
#
# Setups (SETUPS; each a local broker bridged to its own remote broker; the remotes are
# the same kind of broker for every setup, Tessera by default, REMOTE=mosquitto for
# Mosquitto):
#   tessera-sync, tessera-batched - a Tessera (one shard, CPU 0) with a [[bridge]] (out
#               rule br/# at QoS 1) to its remote (CPU 1), persistence.durability sync
#               (the default: a QoS 1 message is acknowledged once fsynced) or batched
#               (acknowledged at once, committed every 10 ms);
#   mosquitto - a Mosquitto (CPU 0) with a bridge (`connection`, `address`,
#               `topic br/# out 1`) to its remote (CPU 1); it acknowledges at once and
#               saves its persistence file every autosave_interval (no fsync per
#               message), so tessera-batched is the like-for-like setup.
# Publishers (bench) connect to the local broker, the subscriber to the remote, so
# every message crosses the bridge. The bench runs unpinned.
#
# Scenarios (SCENARIOS):
#   q0, q1   bench fanin, 4 publishers at full speed, 1 subscriber, QoS 0 / QoS 1:
#            received msg/s at the subscriber (the bridge's throughput), loss
#   outage   QoS 1, 4 publishers at RATE msg/s each with persistent sessions; the
#            remote is stopped (SIGTERM) OUTAGE_S seconds after the start, started
#            again OUTAGE_S later; the subscriber (a persistent session on the
#            remote, `bench --reconnect`) connects again. Reported: the backlog at
#            the restart, seconds until the bridge delivered again and until the
#            backlog was drained, messages/s while draining, and the loss counted
#            by the bench (every message the publishers sent, acknowledged by the
#            local broker, must reach the subscriber: 0 lost).
# q0/q1 runs are interleaved (one per setup in turn) ROUNDS times; the summary prints
# medians and each Tessera setup's ratio to mosquitto, the messages lost (the bench's
# count) and dropped by a Tessera remote (its tessera_messages_dropped_total), and the
# local Tessera store's commit cadence (commits/s, ops per commit, ms per commit).
#
# Usage: bench/scripts/bridge.sh [target/release]
# Env: SETUPS (tessera-sync,tessera-batched,mosquitto), ROUNDS (3), DURATION (5),
#      WARMUP (1), OUT (bridge.jsonl), PORT_BASE (23100),
#      SCENARIOS (q0,q1,outage), REMOTE (tessera|mosquitto), RATE (500 per publisher),
#      OUTAGE_S (60), BRIDGE_VERSION (5: Tessera's bridge protocol), MOSQ_BRIDGE_VERSION
#      (mqttv311, Mosquitto's default; or mqttv50), MAX_INFLIGHT (unset: the defaults;
#      else limits.max_inflight of every Tessera, local and remote, which is also the
#      Receive Maximum a Tessera remote announces and so the Tessera bridge's window,
#      and Mosquitto's max_inflight_messages, its bridge's window)
# Build first: cargo build --release -p tessera-broker -p tessera-bench
set -euo pipefail
BIN=${1:-target/release}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
OUT=${OUT:-bridge.jsonl}
SCENARIOS=${SCENARIOS:-q0,q1,outage}
SETUPS=${SETUPS:-tessera-sync,tessera-batched,mosquitto}
MAX_INFLIGHT=${MAX_INFLIGHT:-}
limits_toml=""
mosquitto_limits=""
if [[ -n $MAX_INFLIGHT ]]; then
    limits_toml=$(printf '[limits]\nmax_inflight = %s\n' "$MAX_INFLIGHT")
    mosquitto_limits="max_inflight_messages $MAX_INFLIGHT"
fi
REMOTE=${REMOTE:-tessera}
RATE=${RATE:-500}
OUTAGE_S=${OUTAGE_S:-60}
BRIDGE_VERSION=${BRIDGE_VERSION:-5}
MOSQ_BRIDGE_VERSION=${MOSQ_BRIDGE_VERSION:-mqttv311}
base=${PORT_BASE:-23100}
OUT=$(realpath -m "$OUT")
cd "$(dirname "$0")/../.."
# shellcheck source=bench/scripts/lib.sh
source bench/scripts/lib.sh
need_bins "$BIN/broker" "$BIN/bench"
for tool in mosquitto taskset curl python3; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done

work=$(mktemp -d)
chmod 755 "$work"
declare -A pid=()
cleanup() {
    for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Setups: tessera-DURABILITY (a Tessera local broker with persistence.durability =
# DURABILITY: sync acknowledges a QoS 1 message once it is fsynced; batched at once,
# committing every 10 ms, as Mosquitto acknowledges at once and saves every
# autosave_interval) and mosquitto. Each has its own local broker (CPU 0) and remote
# (CPU 1); setup i uses ports base+10*i+1 (local), +2 (remote), +3 (local admin), +4
# (remote admin).
read -r -a setups <<<"${SETUPS//,/ }"
declare -A local_port=() remote_port=() local_admin=() remote_admin=()
i=0
for setup in "${setups[@]}"; do
    local_port[$setup]=$((base + 10 * i + 1))
    remote_port[$setup]=$((base + 10 * i + 2))
    local_admin[$setup]=$((base + 10 * i + 3))
    remote_admin[$setup]=$((base + 10 * i + 4))
    i=$((i + 1))
done

# start_remote SETUP: the remote of SETUP on CPU 1, with a data dir / persistence file
# that survives its restart.
start_remote() {
    local setup=$1 port=${remote_port[$1]} admin=${remote_admin[$1]}
    if [[ $REMOTE == mosquitto ]]; then
        mkdir -p "$work/remote-$setup"
        printf 'user root\nlistener %s 127.0.0.1\nallow_anonymous true\nlog_dest file %s\npersistence true\npersistence_location %s/\nmax_queued_messages 0\n' \
            "$port" "$work/remote-$setup.log" "$work/remote-$setup" >"$work/remote-$setup.conf"
        taskset -c 1 mosquitto -c "$work/remote-$setup.conf" 2>>"$work/remote-$setup.err" &
        pid[remote-$setup]=$!
        wait_port "$port"
    else
        printf '[log]\nlevel = "warn"\n%s\n' "$limits_toml" >"$work/remote.toml"
        taskset -c 1 "$BIN/broker" --shards 1 --listen "127.0.0.1:$port" \
            --admin-listen "127.0.0.1:$admin" --data-dir "$work/remote-$setup" \
            --config "$work/remote.toml" >>"$work/remote-$setup.log" 2>&1 &
        pid[remote-$setup]=$!
        wait_ready "$admin"
    fi
}

stop_remote() {
    local setup=$1
    kill -TERM "${pid[remote-$setup]}" 2>/dev/null || true
    wait "${pid[remote-$setup]}" 2>/dev/null || true
    unset "pid[remote-$setup]"
}

# start_local SETUP. Every bridge: out br/# at QoS 1 (messages cross at min(published,
# 1)), a persistent session on the remote, reconnect back-off capped at 5 s (Tessera's
# default cap is 30 s, Mosquitto's restart_timeout too), no queue limit that a 60 s
# outage reaches.
start_local() {
    local setup=$1 port=${local_port[$1]} remote=${remote_port[$1]}
    if [[ $setup == mosquitto ]]; then
        mkdir -p "$work/local-$setup"
        cat >"$work/local-$setup.conf" <<EOF
user root
listener $port 127.0.0.1
allow_anonymous true
log_dest file $work/local-$setup.log
persistence true
persistence_location $work/local-$setup/
max_queued_messages 0
$mosquitto_limits

connection bench
address 127.0.0.1:$remote
bridge_protocol_version $MOSQ_BRIDGE_VERSION
cleansession false
clientid $setup-bench-bridge
restart_timeout 1 5
try_private false
notifications false
topic br/# out 1
EOF
        taskset -c 0 mosquitto -c "$work/local-$setup.conf" 2>"$work/local-$setup.err" &
        pid[local-$setup]=$!
        wait_port "$port"
        return
    fi
    cat >"$work/local-$setup.toml" <<EOF
[log]
level = "warn"

[persistence]
durability = "${setup#tessera-}"

$limits_toml

[[bridge]]
name = "bench"
address = "127.0.0.1:$remote"
version = "$([[ $BRIDGE_VERSION == 5 ]] && echo 5 || echo 3.1.1)"
client_id = "$setup-bench-bridge"
clean_start = false
reconnect_min_ms = 500
reconnect_max_ms = 5000

[[bridge.out]]
topic = "br/#"
qos = 1
EOF
    taskset -c 0 "$BIN/broker" --shards 1 --listen "127.0.0.1:$port" \
        --admin-listen "127.0.0.1:${local_admin[$setup]}" --data-dir "$work/local-$setup" \
        --config "$work/local-$setup.toml" >"$work/local-$setup.log" 2>&1 &
    pid[local-$setup]=$!
    wait_ready "${local_admin[$setup]}"
}

# Waits until setup $1's bridge is connected to its remote.
wait_bridge() {
    local setup=$1
    for _ in $(seq 100); do
        if [[ $setup != mosquitto ]]; then
            curl -s "http://127.0.0.1:${local_admin[$setup]}/metrics" |
                grep -q '^tessera_bridge_up{bridge="bench"} 1' && return 0
        elif [[ $REMOTE == tessera ]]; then
            curl -s "http://127.0.0.1:${remote_admin[$setup]}/api/v1/clients?prefix=$setup-bench-bridge" |
                grep -q "\"$setup-bench-bridge\"" && return 0
        else
            # The remote Mosquitto logs each connect; the last one counts.
            grep "$setup-bench-bridge" "$work/remote-$setup.log" 2>/dev/null |
                tail -1 | grep -q 'New client connected' && return 0
        fi
        sleep 0.2
    done
    echo "bridge of $setup not connected" >&2
    return 1
}

for setup in "${setups[@]}"; do
    start_remote "$setup"
    start_local "$setup"
done
for setup in "${setups[@]}"; do
    wait_bridge "$setup"
done

# remote_drops SETUP: messages a Tessera remote dropped so far (every reason; at a
# full queue of the bench's clean-session subscriber, say), or -1 for a Mosquitto remote.
remote_drops() {
    [[ $REMOTE == tessera ]] || { echo -1; return; }
    curl -s "http://127.0.0.1:${remote_admin[$1]}/metrics" |
        awk '/^tessera_messages_dropped_total/ {s += $2} END {print s + 0}'
}

# local_store SETUP: "commits seconds records" of a Tessera local broker's store so far
# (tessera_persistence_commit_seconds count and sum, tessera_persistence_commit_records
# sum), or "-1 0 0" for Mosquitto.
local_store() {
    [[ $1 != mosquitto ]] || { echo "-1 0 0"; return; }
    curl -s "http://127.0.0.1:${local_admin[$1]}/metrics" | awk '
        /^tessera_persistence_commit_seconds_count/ {c += $2}
        /^tessera_persistence_commit_seconds_sum/ {s += $2}
        /^tessera_persistence_commit_records_sum/ {r += $2}
        END {print c + 0, s + 0, r + 0}'
}

# run SETUP SCENARIO: one q0/q1 bench run, one JSON line to OUT (with the remote's drops
# during the run as "remote_dropped": the bench's loss_count says what did not arrive,
# this where a Tessera remote dropped it).
run() {
    local setup=$1 scenario=$2 qos=${2#q}
    local rc=0 d0 d1 s0 s1
    d0=$(remote_drops "$setup")
    s0=$(local_store "$setup")
    "$BIN/bench" fanin --publishers 4 --subscribers 1 --qos "$qos" \
        --pub-addr "127.0.0.1:${local_port[$setup]}" --host 127.0.0.1 \
        --port "${remote_port[$setup]}" --duration "$DURATION" --warmup "$WARMUP" --drain 30 \
        --topic-prefix "br/$setup/$scenario/$RANDOM" \
        --json >"$work/bench.out" 2>"$work/bench.err" || rc=$?
    d1=$(remote_drops "$setup")
    s1=$(local_store "$setup")
    local before
    before=$(wc -l <"$OUT")
    record_report "$setup" "$scenario" "$rc" "$work/bench.out" "$work/bench.err" "$OUT"
    if (($(wc -l <"$OUT") > before)); then
        python3 - "$OUT" "$d0" "$d1" "$s0" "$s1" <<'PY'
import json, sys
path, d0, d1 = sys.argv[1], int(float(sys.argv[2])), int(float(sys.argv[3]))
s0, s1 = [list(map(float, a.split())) for a in sys.argv[4:6]]
lines = open(path).read().splitlines()
r = json.loads(lines[-1])
r["remote_dropped"] = None if d0 < 0 else d1 - d0
# The local store's commits during the run (warmup, window and drain).
r["local_store"] = None if s0[0] < 0 else {
    "commits": s1[0] - s0[0], "commit_seconds": s1[1] - s0[1], "records": s1[2] - s0[2]}
lines[-1] = json.dumps(r)
open(path, "w").write("\n".join(lines) + "\n")
PY
    fi
}

# outage SETUP: the remote stopped OUTAGE_S s while the publishers go on; one JSON line
# with the bench report and the progress timeline (wall time of each second's line).
outage() {
    local setup=$1
    local run_s=$((OUTAGE_S + 40))
    local rc=0
    : >"$work/progress.txt"
    "$BIN/bench" fanin --publishers 4 --subscribers 1 --qos 1 --rate "$RATE" \
        --persistent --reconnect --client-id-prefix "outage-$setup-$RANDOM" \
        --pub-addr "127.0.0.1:${local_port[$setup]}" --host 127.0.0.1 \
        --port "${remote_port[$setup]}" --duration "$run_s" --warmup 0 --drain 120 --topic-prefix "br/$setup/outage" \
        --json >"$work/bench.out" 2> >(while IFS= read -r l; do
            printf '%s %s\n' "$EPOCHREALTIME" "$l"
        done >"$work/progress.txt") &
    local bench=$!
    pid[bench]=$bench
    sleep 10
    local t_stop=$EPOCHREALTIME
    echo "  $setup: stopping the remote for $OUTAGE_S s" >&2
    stop_remote "$setup"
    sleep "$OUTAGE_S"
    local t_start=$EPOCHREALTIME
    echo "  $setup: starting the remote again" >&2
    start_remote "$setup"
    wait "$bench" || rc=$?
    unset "pid[bench]"
    sleep 0.5
    local line
    line=$(tail -n 1 "$work/bench.out")
    if [[ $line != "{"* ]]; then
        echo "bench gave no report (exit $rc): $setup outage: $(tail -5 "$work/progress.txt")" >&2
        return 0
    fi
    ((rc == 0)) || echo "bench judged FAIL: $setup outage: $(grep -E 'FAIL|lost' "$work/bench.out" | head -3)" >&2
    python3 - "$work/progress.txt" "$t_stop" "$t_start" "$setup" "$line" >>"$OUT" <<'PY'
import json, re, sys
path, t_stop, t_start, setup, report = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
pat = re.compile(r"^(\S+) bench fanin:\s+(\d+)s\s+out\s+(\d+) msg/s\s+in\s+(\d+) msg/s")
lines = []
for l in open(path):
    m = pat.match(l)
    if m:
        lines.append((float(m[1]), int(m[2]), int(m[3]), int(m[4])))
print(json.dumps({"setup": setup, "case": "outage", "t_stop": t_stop, "t_start": t_start,
                  "progress": lines, "report": json.loads(report)}))
PY
}

: >"$OUT"
for round in $(seq "$ROUNDS"); do
    for scenario in ${SCENARIOS//,/ }; do
        [[ $scenario == outage ]] && continue
        for setup in "${setups[@]}"; do
            echo "round $round: $scenario through the $setup bridge" >&2
            wait_bridge "$setup"
            run "$setup" "$scenario"
        done
    done
done
if [[ ,$SCENARIOS, == *,outage,* ]]; then
    for setup in "${setups[@]}"; do
        echo "outage: $setup bridge, remote stopped $OUTAGE_S s" >&2
        wait_bridge "$setup"
        outage "$setup"
    done
fi
for setup in "${setups[@]}"; do
    [[ $setup == mosquitto ]] && continue
    echo "== $setup bridge counters" >&2
    curl -s "http://127.0.0.1:${local_admin[$setup]}/metrics" | grep -E '^tessera_bridge' >&2 || true
done

python3 - "$OUT" <<'PY'
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(list)
outages = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["case"] == "outage":
        outages[r["setup"]] = r
    else:
        runs[(r["case"], r["setup"])].append(dict(r["report"], remote_dropped=r.get("remote_dropped")))
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
tess = [s for s in dict.fromkeys(k[1] for k in runs) if s != "mosquitto"] or \
    [s for s in outages if s != "mosquitto"]
print("| case | " + " | ".join(f"{s} msg/s" for s in tess) + " | mosquitto msg/s | " +
      " | ".join(f"{s} / mosquitto" for s in tess) + " |")
print("|---" * (2 * len(tess) + 2) + "|")
def cell(case, s):
    rs = runs[(case, s)]
    m = med([r["received_msg_per_s"] for r in rs])
    lost = sum(r["loss_count"] for r in rs)
    drops = [r["remote_dropped"] for r in rs if r.get("remote_dropped") is not None]
    dropped = f", remote dropped {sum(drops)}" if drops else ""
    return m, f"{m:,.0f} {[round(r['received_msg_per_s']) for r in rs]} (lost {lost}{dropped})"
for case in ["q0", "q1"]:
    if not runs[(case, "mosquitto")]:
        continue
    m, mtext = cell(case, "mosquitto")
    cells = [cell(case, s) for s in tess if runs[(case, s)]]
    print(f"| QoS {case[1]} fan-in 4 -> 1 | " + " | ".join(c[1] for c in cells) + f" | {mtext} | " +
          " | ".join(f"{c[0]/m:.2f}" for c in cells) + " |")
store = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["case"] != "outage" and r.get("local_store") and r["local_store"]["commits"] > 0:
        store[(r["case"], r["setup"])].append((r["local_store"], r["report"]))
if store:
    print()
    print("| local store, per run (median) | commits/s | store ops per commit | ms per commit | store ops per message |")
    print("|---|---|---|---|---|")
    for (case, setup), xs in sorted(store.items()):
        span = [r["window_s"] + r.get("warmup_s", 0) for _, r in xs]
        cps = med([st["commits"] / max(sp, 1e-9) for (st, _), sp in zip(xs, span)])
        rpc = med([st["records"] / st["commits"] for st, _ in xs])
        mpc = med([1000 * st["commit_seconds"] / st["commits"] for st, _ in xs])
        rpm = med([st["records"] / max(1, r["sent_count"]) for st, r in xs])
        print(f"| {case} {setup} | {cps:,.0f} | {rpc:,.0f} | {mpc:.2f} | {rpm:.2f} |")
if outages:
    print()
    order = [s for s in tess + ["mosquitto"] if s in outages]
    print("| outage | " + " | ".join(order) + " |")
    print("|---" * (len(order) + 1) + "|")
    stats = {}
    for setup, o in outages.items():
        p = o["progress"]
        # Cumulative sent and received at the end of each progress second (rates are per
        # ~1 s interval).
        cs, cr, rows = 0, 0, []
        prev = None
        for (wall, sec, out, inn) in p:
            dt = 1.0 if prev is None else wall - prev
            prev = wall
            cs += out * dt
            cr += inn * dt
            rows.append((wall, cs, cr, out, inn))
        before = [r for r in rows if r[0] <= o["t_start"]]
        backlog = (before[-1][1] - before[-1][2]) if before else 0
        after = [r for r in rows if r[0] > o["t_start"]]
        first = next((r for r in after if r[4] > 0), None)
        rate = sum(x[3] for x in rows[:5]) / max(1, len(rows[:5]))
        # Drained: the backlog is down to at most 2 s of publishing.
        done = next((r for r in after if r[1] - r[2] <= 2 * max(rate, 1)), None)
        rep = o["report"]
        s = {"backlog": backlog, "first": first and first[0] - o["t_start"],
             "drained": done and done[0] - o["t_start"],
             "rate": (done and first and done[0] > first[0]) and (done[2] - first[2] + first[4]) / (done[0] - first[0] + 1),
             "peak": max((r[4] for r in after), default=0),
             "lost": rep["loss_count"], "dup": rep["duplicate_count"], "sent": rep["sent_count"],
             "received": rep["received_count"], "drain": rep.get("drain")}
        stats[setup] = s
    def f(v, fmt):
        return "-" if v is None or v is False else fmt.format(v)
    for label, key, fmt in [("messages published (all acknowledged)", "sent", "{:,}"),
                            ("backlog at the remote's restart", "backlog", "{:,.0f}"),
                            ("s from restart to the first bridged message", "first", "{:.1f}"),
                            ("s from restart until drained", "drained", "{:.1f}"),
                            ("msg/s while draining (first message to drained)", "rate", "{:,.0f}"),
                            ("peak msg/s in one second while draining", "peak", "{:,}"),
                            ("received (distinct)", "received", "{:,}"),
                            ("lost", "lost", "{}"), ("duplicates", "dup", "{}")]:
        print(f"| {label} | " + " | ".join(f(stats[s][key], fmt) for s in order) + " |")
PY
