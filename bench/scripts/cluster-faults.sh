#!/usr/bin/env bash
# A cluster under faults (issue 16, docs/BENCHMARKS.md "Cluster under faults"): real
# broker processes on loopback (3 nodes, one shard each), killed with SIGKILL by
# bench/examples/faults.rs, which times from the kill:
#   1. failover: the leader killed, time until a survivor accepts a claim (a CONNECT of
#      a new ClientID), against etcd's time until a PUT succeeds after its leader is
#      killed (3 etcd members, defaults, or ETCD_ELECTION_MS), interleaved round by
#      round; the killed member restarts with its data dir between rounds;
#   2. sessions: a follower holding N persistent sessions killed, its clients
#      reconnect to the other nodes: time from the kill to CONNACK (no restart: the
#      sessions are not replicated, so they start afresh once the dead node's lease ran
#      out; then again with the node restarted RESTART_MS after the kill and the
#      clients back RECONNECT_MS after it, a reconnect back-off: session present);
#   3. lease: the two other nodes killed, time until the cut-off node's clients get
#      DISCONNECT (0x9C): the session lease as observed;
#   4. partition: a follower's cluster traffic dropped with iptables (its UDP port, both
#      ways, on loopback), its LEASE_CLIENTS persistent clients connect their ClientIDs
#      to the majority at once while their old connections stay open: when the old
#      ones end (the lease, the majority alive), when the majority serves the new ones,
#      and whether any ClientID was served by both at once (needs root and iptables);
#   5. load: QoS 1 publishers and a takeover loop on two nodes, subscribers on both
#      (and in a first run on the third too), the leader (the third) killed KILL_AT s in: PUBACKs/s and deliveries/s before, in the
#      3 s after and after the kill, takeover p50/p99/max in the same spans, and any
#      connection of a survivor that ended (none should: a failover is shorter than
#      the lease); then `tessera_cluster_sessions_fenced_total` of the survivors; a
#      third run restarts the killed leader (with a subscriber) LOAD_RESTART_MS after
#      the kill: when PUBACKs come back to half their rate.
# Everything shares the machine (no pinning): the brokers, etcd and the clients.
#
# usage: bench/scripts/cluster-faults.sh [target/release]
# Env: ROUNDS (5, failover rounds per system), SESSIONS (100), LEASE_CLIENTS (50),
#      RESTART_MS (500), RECONNECT_MS (3000), LOAD_RESTART_MS (4000), LOAD_SECONDS (14), KILL_AT (5), PUBLISHERS (2 per node),
#      WINDOW (16), SCENARIOS (failover,sessions,lease,partition,load), ETCD_ELECTION_MS (unset:
#      etcd's default 1000), PORT_BASE (23500), OUT (cluster-faults.jsonl).
# Needs: a release build (`cargo build --release -p tessera-broker -p tessera-bench
# --bins --example faults`), curl, python3, and etcd (`apt-get install etcd-server`)
# for the failover comparison.
set -euo pipefail
BIN=${1:-target/release}
BIN=$(cd "$BIN" && pwd)
root=$(cd "$(dirname "$0")/../.." && pwd)
broker=$BIN/broker
brokerctl=$BIN/brokerctl
faults=$BIN/examples/faults
ROUNDS=${ROUNDS:-5}
SESSIONS=${SESSIONS:-100}
LEASE_CLIENTS=${LEASE_CLIENTS:-50}
RESTART_MS=${RESTART_MS:-500}
RECONNECT_MS=${RECONNECT_MS:-3000}
LOAD_RESTART_MS=${LOAD_RESTART_MS:-4000}
LOAD_SECONDS=${LOAD_SECONDS:-14}
KILL_AT=${KILL_AT:-5}
PUBLISHERS=${PUBLISHERS:-2}
WINDOW=${WINDOW:-16}
SCENARIOS=${SCENARIOS:-failover,sessions,lease,partition,load}
base=${PORT_BASE:-23500}
OUT=${OUT:-cluster-faults.jsonl}
# shellcheck source=bench/scripts/lib.sh
source "$root/bench/scripts/lib.sh"
need_bins "$broker" "$brokerctl"
[[ -x $faults ]] || { echo "missing $faults: cargo build --release -p tessera-bench --example faults" >&2; exit 2; }
for tool in curl python3; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done
has() { [[ ",$SCENARIOS," == *",$1,"* ]]; }
# Deletes every INPUT rule whose comment is $1.
heal_rules() {
    local r
    iptables -S INPUT | { grep -- "--comment $1 " || true; } | sed 's/^-A /-D /' | while read -r r; do
        # shellcheck disable=SC2086 # the rule's words, as iptables -S printed them
        iptables $r
    done
}
if has failover && ! command -v etcd >/dev/null; then
    echo "missing: etcd (apt-get install -y etcd-server), or SCENARIOS without failover" >&2
    exit 2
fi

if has partition; then
    if ! command -v iptables >/dev/null || [[ $(id -u) != 0 ]]; then
        echo "partition needs root and iptables (apt-get install -y iptables), or SCENARIOS without it" >&2
        exit 2
    fi
    # Rules of runs that died (their pid is in the rule's comment) go first.
    iptables -S INPUT | { grep -o -- '--comment cluster-faults-[0-9]*' || true; } | sort -u | while read -r _ c; do
        kill -0 "${c#cluster-faults-}" 2>/dev/null || heal_rules "$c"
    done
fi
work=$(mktemp -d)
pids=()
# Processes this run started: the array for the trap, plus the pid files of nodes
# restarted by the faults tool.
cleanup() {
    has partition && heal_rules "cluster-faults-$$"
    local f
    for f in "$work"/*.pid; do
        [[ -e $f ]] && pids+=("$(cat "$f")")
    done
    cleanup_pids_and_work
}
trap cleanup EXIT
"$brokerctl" cluster certs --out "$work/certs" --nodes 3 >/dev/null
peers="1=127.0.0.1:$((base + 11)),2=127.0.0.1:$((base + 12)),3=127.0.0.1:$((base + 13))"
declare -A node_pid

mqtt() { echo "127.0.0.1:$((base + $1))"; }
admin() { echo "127.0.0.1:$((base + 20 + $1))"; }

# The command line of node $1 of run $2 (its data dir is the run's), in `cmd`.
node_args() {
    cmd=("$broker" --shards 1 --listen "$(mqtt "$1")" --admin-listen "$(admin "$1")"
        --data-dir "$work/$2/node-$1" --node-id "$1"
        --cluster-listen "127.0.0.1:$((base + 10 + $1))" --cluster-peers "$peers"
        --cluster-certs "$work/certs")
}

start_node() {
    node_args "$1" "$2"
    "${cmd[@]}" >>"$work/$2-node-$1.log" 2>&1 &
    node_pid[$1]=$!
    pids+=($!)
}

start_cluster() {
    mkdir -p "$work/$1"
    for id in 1 2 3; do start_node "$id" "$1"; done
    for id in 1 2 3; do wait_ready "$((base + 20 + id))"; done
    wait_leader
}

# Prints the leader's id once the nodes agree on one (up to 30 s).
leader() {
    local id l
    for _ in $(seq 150); do
        for id in 1 2 3; do
            l=$(curl -sf "http://$(admin "$id")/api/v1/cluster" 2>/dev/null |
                python3 -c 'import json,sys; print(json.load(sys.stdin).get("leader") or "")' 2>/dev/null) || l=
            if [[ -n $l ]]; then echo "$l"; return 0; fi
        done
        sleep 0.2
    done
    echo "no leader" >&2
    return 1
}
wait_leader() { leader >/dev/null; }

stop_cluster() {
    local id
    for id in 1 2 3; do kill "${node_pid[$id]}" 2>/dev/null || true; done
    for id in 1 2 3; do wait "${node_pid[$id]}" 2>/dev/null || true; done
    local f p
    for f in "$work"/*.pid; do
        [[ -e $f ]] || continue
        p=$(cat "$f")
        kill "$p" 2>/dev/null || true
        # Not this shell's child: wait until it is gone (its ports are free then).
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        rm -f "$f"
    done
}

fenced() {
    curl -sf "http://$(admin "$1")/metrics" | awk '/^tessera_cluster_sessions_fenced_total/ {print $2}'
}

record() { # SCENARIO JSON-LINE
    printf '{"scenario":"%s","result":%s}\n' "$1" "$2" >>"$OUT"
}

# --- etcd ---
declare -A etcd_pid
etcd_port() { echo $((base + 40 + $1)); }
etcd_cluster="e1=http://127.0.0.1:$((base + 51)),e2=http://127.0.0.1:$((base + 52)),e3=http://127.0.0.1:$((base + 53))"
start_etcd() {
    local extra=()
    [[ -n ${ETCD_ELECTION_MS:-} ]] && extra=(--election-timeout "$ETCD_ELECTION_MS")
    etcd --name "e$1" --data-dir "$work/etcd-$1" \
        --listen-client-urls "http://127.0.0.1:$(etcd_port "$1")" \
        --advertise-client-urls "http://127.0.0.1:$(etcd_port "$1")" \
        --listen-peer-urls "http://127.0.0.1:$((base + 50 + $1))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((base + 50 + $1))" \
        --initial-cluster "$etcd_cluster" --initial-cluster-token "faults-$$" \
        --initial-cluster-state new "${extra[@]}" >>"$work/etcd-$1.log" 2>&1 &
    etcd_pid[$1]=$!
    pids+=($!)
}
# Prints etcd's leader member number (1-3) once every member is healthy (up to 30 s).
etcd_leader() {
    local id st
    for _ in $(seq 150); do
        local ok=1 lead=
        for id in 1 2 3; do
            st=$(curl -sf -X POST "http://127.0.0.1:$(etcd_port "$id")/v3/maintenance/status" -d '{}' 2>/dev/null) || { ok=0; break; }
            if python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d["header"]["member_id"]==d["leader"] else 1)' "$st"; then
                lead=$id
            fi
            curl -sf "http://127.0.0.1:$(etcd_port "$id")/health" | grep -q '"true"' || ok=0
        done
        if ((ok)) && [[ -n $lead ]]; then echo "$lead"; return 0; fi
        sleep 0.2
    done
    echo "etcd: no healthy leader" >&2
    return 1
}

others() { # the MQTT (or etcd client) addresses of every node but $1, comma-separated
    local id out=() f=${2:-mqtt}
    for id in 1 2 3; do
        ((id == $1)) && continue
        if [[ $f == mqtt ]]; then out+=("$(mqtt "$id")"); else out+=("127.0.0.1:$(etcd_port "$id")"); fi
    done
    local IFS=,
    echo "${out[*]}"
}

if has failover; then
    echo "== failover: leader killed, $ROUNDS rounds each, Tessera and etcd interleaved"
    start_cluster failover
    for id in 1 2 3; do start_etcd "$id"; done
    etcd_leader >/dev/null
    for r in $(seq "$ROUNDS"); do
        l=$(leader)
        line=$("$faults" failover mqtt "${node_pid[$l]}" "$(others "$l")" | tail -1)
        echo "round $r tessera (leader $l killed): $line"
        record failover-tessera "$line"
        wait "${node_pid[$l]}" 2>/dev/null || true
        start_node "$l" failover
        wait_ready "$((base + 20 + l))"
        e=$(etcd_leader)
        line=$("$faults" failover etcd "${etcd_pid[$e]}" "$(others "$e" etcd)" | tail -1)
        echo "round $r etcd (leader e$e killed): $line"
        record failover-etcd "$line"
        wait "${etcd_pid[$e]}" 2>/dev/null || true
        start_etcd "$e"
        etcd_leader >/dev/null
        wait_leader
    done
    stop_cluster
    for id in 1 2 3; do kill "${etcd_pid[$id]}" 2>/dev/null || true; done
    for id in 1 2 3; do wait "${etcd_pid[$id]}" 2>/dev/null || true; done
fi

# A follower (not the leader): its kill costs no election.
follower() { local l; l=$(leader); echo $(((l % 3) + 1)); }

if has sessions; then
    echo "== sessions: a follower holding $SESSIONS persistent sessions killed, not restarted"
    start_cluster sessions
    v=$(follower)
    line=$("$faults" sessions "${node_pid[$v]}" "$(mqtt "$v")" "$(others "$v")" "$SESSIONS" | tail -1)
    echo "node $v killed: $line"
    record sessions-dead "$line"
    stop_cluster
    echo "== sessions: the same, the node restarted with its disk ${RESTART_MS} ms after the kill, clients back after ${RECONNECT_MS} ms"
    start_cluster sessions2
    v=$(follower)
    node_args "$v" sessions2
    restart="$(printf '%q ' "${cmd[@]}") >>$work/sessions2-node-$v.log 2>&1 & echo \$! > $work/restart-$v.pid"
    line=$("$faults" sessions "${node_pid[$v]}" "$(mqtt "$v")" "$(others "$v")" "$SESSIONS" \
        "$restart" "$RESTART_MS" "$RECONNECT_MS" | tail -1)
    echo "node $v killed and restarted: $line"
    record sessions-restarted "$line"
    stop_cluster
fi

if has lease; then
    echo "== lease: two of three nodes killed, $LEASE_CLIENTS clients on the third"
    start_cluster lease
    v=$(follower)
    kills=()
    for id in 1 2 3; do ((id == v)) || kills+=("${node_pid[$id]}"); done
    line=$("$faults" lease "$(IFS=,; echo "${kills[*]}")" "$(mqtt "$v")" "$LEASE_CLIENTS" | tail -1)
    echo "node $v cut off: $line"
    record lease "$line"
    echo "node $v fenced: $(fenced "$v")"
    stop_cluster
fi

if has partition; then
    echo "== partition: a follower's cluster traffic dropped, its $LEASE_CLIENTS clients move to the majority"
    start_cluster partition
    v=$(follower)
    port=$((base + 10 + v))
    c="cluster-faults-$$"
    cut="iptables -I INPUT -p udp --dport $port -m comment --comment $c -j DROP && iptables -I INPUT -p udp --sport $port -m comment --comment $c -j DROP"
    line=$("$faults" partition "$cut" "$(mqtt "$v")" "$(others "$v")" "$LEASE_CLIENTS" | tail -1) || true
    heal_rules "$c"
    echo "node $v cut off: $line"
    record partition "$line"
    echo "node $v fenced: $(fenced "$v")"
    stop_cluster
fi

# The load twice: the killed leader with a subscriber of the publishers' topics (a
# QoS 1 PUBACK waits for every node it was forwarded to: ARCHITECTURE "QoS across
# nodes"), and without one.
load_run() { # RUN VICTIM_SUBSCRIBED(1/0) [RESTART_MS]
    echo "== load ($1): QoS 1 publishers ($PUBLISHERS per survivor, window $WINDOW) and takeovers, the leader killed at ${KILL_AT} s${3:+, restarted $3 ms later}"
    start_cluster "$1"
    local l s vsub=- restart=()
    l=$(leader)
    s=$(others "$l")
    (($2)) && vsub=$(mqtt "$l")
    if [[ -n ${3:-} ]]; then
        node_args "$l" "$1"
        restart=("$(printf '%q ' "${cmd[@]}") >>$work/$1-node-$l.log 2>&1 & echo \$! > $work/restart-$l.pid" "$3")
    fi
    line=$("$faults" load "${node_pid[$l]}" "$s" "$s" "$vsub" "${s%,*}" "${s#*,}" \
        "$LOAD_SECONDS" "$KILL_AT" "$PUBLISHERS" "$WINDOW" "${restart[@]}" | tee -a /dev/stderr | tail -1)
    record "$1" "$line"
    for id in 1 2 3; do
        ((id == l)) || echo "node $id (survivor) tessera_cluster_sessions_fenced_total: $(fenced "$id")"
    done
    stop_cluster
}
if has load; then
    load_run load-victim-subscribed 1
    load_run load-victim-not-subscribed 0
    # How long the stall behind a dead subscriber's node lasts once it is back.
    LOAD_SECONDS=$((LOAD_SECONDS + 4)) load_run load-victim-subscribed-restarted 1 "$LOAD_RESTART_MS"
fi
echo "results in $OUT"
