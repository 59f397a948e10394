#!/usr/bin/env bash
# A cluster under network faults (issue 16, docs/BENCHMARKS.md "the cluster under network
# faults"): 3 broker processes (one shard each), each in its own network namespace joined
# by a veth to a bridge in the root namespace, where the clients (bench/examples/faults.rs,
# mode `netload`) run and reach every node through the bridge. A fault is a set of iptables
# rules in the faulty node's namespace about the other nodes' addresses only, so the
# clients' traffic to that node is never touched; the tool runs the fault FAULT_AT s into
# the load and the heal (the rules flushed) HEAL_AT s in, and times from them. Scenarios:
#   isolate-leader    the leader cut from both other nodes (both ways);
#   isolate-follower  a follower (a minority of one) cut from both other nodes;
#   one-way           a follower receives nothing from the leader, but what it sends
#                     to the leader arrives (INPUT -s leader DROP in its namespace);
#   slow              a follower's packets to and from the other nodes dropped with
#                     probability LOSS (`-m statistic`), then held DELAY_MS by
#                     bench/scripts/nfq-delay.py (NFQUEUE: this kernel has no netem),
#                     each way, so its round trip to them grows by 2 x DELAY_MS.
# The load (as `faults load`): PUBLISHERS QoS 1 publishers on each healthy node, WINDOW
# in flight each, one QoS 1 subscriber per healthy node to all of them (and with
# VICTIM_SUB=1 one on the faulty node), a persistent session taken over between the two
# healthy nodes every 20 ms; WATCH_CLIENTS persistent sessions on the faulty node, which
# for the isolations connect their ClientIDs to the healthy nodes at the fault (their old
# connections open). Each run gets a fresh cluster; afterwards the script prints every
# node's view (leader, commit index) and the healthy nodes'
# `tessera_cluster_sessions_fenced_total`.
#
# Everything the script makes (namespaces, veths, the bridge, the root FORWARD rule,
# processes) carries its pid (cnfn<pid>_<i>, cnfv<pid>_<i>, cnfb<pid>, comment
# cluster-netfaults-<pid>) and is removed on exit, also on failure; leftovers of runs
# whose pid is dead are removed first.
#
# usage: bench/scripts/cluster-netfaults.sh [target/release]
# Env: SCENARIOS (isolate-leader,isolate-follower,one-way,slow), RUNS (2), SECONDS_RUN (24),
#      FAULT_AT (6), HEAL_AT (16), PUBLISHERS (2), WINDOW (16), VICTIM_SUB (1),
#      WATCH_CLIENTS (50), DELAY_MS (200), LOSS (0.05), OUT (cluster-netfaults.jsonl).
# Needs: root, ip, iptables, curl, python3 and a release build (`cargo build --release
# -p tessera-broker -p tessera-bench --bins --example faults`).
set -euo pipefail
BIN=${1:-target/release}
BIN=$(cd "$BIN" && pwd)
root=$(cd "$(dirname "$0")/../.." && pwd)
broker=$BIN/broker
brokerctl=$BIN/brokerctl
faults=$BIN/examples/faults
SCENARIOS=${SCENARIOS:-isolate-leader,isolate-follower,one-way,slow}
RUNS=${RUNS:-2}
SECONDS_RUN=${SECONDS_RUN:-24}
FAULT_AT=${FAULT_AT:-6}
HEAL_AT=${HEAL_AT:-16}
PUBLISHERS=${PUBLISHERS:-2}
WINDOW=${WINDOW:-16}
VICTIM_SUB=${VICTIM_SUB:-1}
WATCH_CLIENTS=${WATCH_CLIENTS:-50}
DELAY_MS=${DELAY_MS:-200}
LOSS=${LOSS:-0.05}
OUT=${OUT:-cluster-netfaults.jsonl}
# shellcheck source=bench/scripts/lib.sh
source "$root/bench/scripts/lib.sh"
need_bins "$broker" "$brokerctl"
[[ -x $faults ]] || { echo "missing $faults: cargo build --release -p tessera-bench --example faults" >&2; exit 2; }
for tool in ip iptables curl python3; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done
[[ $(id -u) == 0 ]] || { echo "needs root (network namespaces)" >&2; exit 2; }

# --- leftovers of dead runs (their pid is in every name) ---
dead() { [[ -n $1 ]] && ! kill -0 "$1" 2>/dev/null; }
sweep() {
    local ns p link rule c
    for ns in $(ip netns list | awk '{print $1}' | grep -E '^cnfn[0-9]+_' || true); do
        p=${ns#cnfn}; p=${p%%_*}
        if dead "$p"; then
            echo "removing leftover namespace $ns" >&2
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^cnf[vb][0-9]+' || true); do
        p=${link#cnf?}; p=${p%%_*}
        if dead "$p"; then
            echo "removing leftover link $link" >&2
            ip link del "$link" 2>/dev/null || true
        fi
    done
    iptables -S FORWARD | { grep -o -- '--comment cluster-netfaults-[0-9]*' || true; } | sort -u | while read -r _ c; do
        if dead "${c#cluster-netfaults-}"; then
            iptables -S FORWARD | { grep -- "--comment $c\\b" || true; } | sed 's/^-A /-D /' | while read -r rule; do
                # shellcheck disable=SC2086 # the rule's words, as iptables -S printed them
                iptables -w $rule
            done
        fi
    done
}
sweep

work=$(mktemp -d)
pids=()
made_ns=()
bridge=cnfb$$
tag=cluster-netfaults-$$
ns_of() { echo "cnfn$$_$1"; }
cleanup() {
    set +e
    local p ns
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for ns in "${made_ns[@]}"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    # Deleting a namespace deletes its veth end, and so the root end.
    for ns in "${made_ns[@]}"; do ip netns del "$ns" 2>/dev/null; done
    for p in 1 2 3; do ip link del "cnfv$$_$p" 2>/dev/null; done
    ip link del "$bridge" 2>/dev/null
    iptables -w -D FORWARD -i "$bridge" -o "$bridge" -m comment --comment "$tag" -j ACCEPT 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the network: a free 10.214.C.0/24, the bridge at .1, node i at .(10+i) ---
used=$(ip -o -4 addr show)
c=$(($$ % 250))
for _ in $(seq 250); do
    [[ $used == *" 10.214.$c."* ]] || break
    c=$(((c + 1) % 250))
done
host=10.214.$c.1
ip link add "$bridge" type bridge
ip addr add "$host/24" dev "$bridge"
ip link set "$bridge" up
# With br_netfilter, bridged frames pass the root FORWARD chain, whose policy may be DROP.
iptables -w -I FORWARD -i "$bridge" -o "$bridge" -m comment --comment "$tag" -j ACCEPT
ipof() { echo "10.214.$c.$((10 + $1))"; }
for i in 1 2 3; do
    ns=$(ns_of "$i")
    ip netns add "$ns"
    made_ns+=("$ns")
    ip -n "$ns" link set lo up
    ip link add "cnfv$$_$i" type veth peer name eth0 netns "$ns"
    ip link set "cnfv$$_$i" master "$bridge"
    ip link set "cnfv$$_$i" up
    ip -n "$ns" addr add "$(ipof "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
done

"$brokerctl" cluster certs --out "$work/certs" --nodes 3 >/dev/null
peers="1=$(ipof 1):7000,2=$(ipof 2):7000,3=$(ipof 3):7000"
mqtt() { echo "$(ipof "$1"):1883"; }
admin() { echo "$(ipof "$1"):8080"; }
declare -A node_pid
# The admin API listens on the bridge's network, not loopback: it wants a token.
token=netfaults-token-$$
acurl() { curl -H "Authorization: Bearer $token" "$@"; }

start_cluster() { # RUN
    local id
    mkdir -p "$work/$1"
    for id in 1 2 3; do
        # `ip netns exec` execs the broker: $! is the broker's pid.
        TESSERA_SERVER__ADMIN_TOKEN=$token ip netns exec "$(ns_of "$id")" "$broker" --shards 1 --listen "$(mqtt "$id")" \
            --admin-listen "$(admin "$id")" --data-dir "$work/$1/node-$id" --node-id "$id" \
            --cluster-listen "$(ipof "$id"):7000" --cluster-peers "$peers" \
            --cluster-certs "$work/certs" >>"$work/$1-node-$id.log" 2>&1 &
        node_pid[$id]=$!
        pids+=($!)
    done
    for id in 1 2 3; do
        for _ in $(seq 150); do
            acurl -sf "http://$(admin "$id")/ready" >/dev/null && break
            sleep 0.2
        done
        acurl -sf "http://$(admin "$id")/ready" >/dev/null || { echo "node $id not ready" >&2; tail -20 "$work/$1-node-$id.log" >&2; exit 1; }
    done
}

stop_cluster() {
    local id
    for id in 1 2 3; do kill "${node_pid[$id]}" 2>/dev/null || true; done
    for id in 1 2 3; do wait "${node_pid[$id]}" 2>/dev/null || true; done
}

view() { # the node's leader and commit index, as "leader/commit", or "-"
    acurl -sf -m 3 "http://$(admin "$1")/api/v1/cluster" 2>/dev/null |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print(str(d.get("leader")) + "/" + str(d.get("commit_index")))' 2>/dev/null || echo -
}

leader() { # the leader's id once a node knows one (up to 30 s)
    local id l
    for _ in $(seq 150); do
        for id in 1 2 3; do
            l=$(view "$id"); l=${l%%/*}
            if [[ $l =~ ^[123]$ ]]; then echo "$l"; return 0; fi
        done
        sleep 0.2
    done
    echo "no leader" >&2
    return 1
}

fenced() {
    acurl -sf -m 3 "http://$(admin "$1")/metrics" | awk '/^tessera_cluster_sessions_fenced_total/ {print $2}'
}

# Rules in node $1's namespace.
ipt() { local n=$1; shift; echo "ip netns exec $(ns_of "$n") iptables -w $*"; }

delay_pid=
start_delay() { # NODE: a delay line on queue 0 in the node's namespace
    ip netns exec "$(ns_of "$1")" python3 "$root/bench/scripts/nfq-delay.py" 0 "$DELAY_MS" 2>"$work/delay.err" &
    delay_pid=$!
    pids+=($!)
    for _ in $(seq 50); do grep -q "nfq-delay: queue" "$work/delay.err" 2>/dev/null && break; sleep 0.1; done
    grep -q "nfq-delay: queue" "$work/delay.err" || { cat "$work/delay.err" >&2; exit 1; }
}
stop_delay() {
    [[ -n $delay_pid ]] || return 0
    kill "$delay_pid" 2>/dev/null || true
    wait "$delay_pid" 2>/dev/null || true
    echo "delay line: $(tail -1 "$work/delay.err")"
    delay_pid=
}

run_one() { # SCENARIO RUN-NUMBER
    local sc=$1 r=$2 l v h1 h2 fault='' heal move=0 o
    local name=$sc-$r
    start_cluster "$name"
    l=$(leader)
    if [[ $sc == isolate-leader ]]; then v=$l; else v=$(((l % 3) + 1)); fi
    h1=$(((v % 3) + 1)); h2=$(((h1 % 3) + 1))
    local cut=()
    heal="$(ipt "$v" -F INPUT) && $(ipt "$v" -F OUTPUT)"
    case $sc in
        isolate-leader | isolate-follower)
            move=1
            for o in "$h1" "$h2"; do
                cut+=("$(ipt "$v" -A INPUT -s "$(ipof "$o")" -j DROP)" "$(ipt "$v" -A OUTPUT -d "$(ipof "$o")" -j DROP)")
            done
            ;;
        one-way)
            cut+=("$(ipt "$v" -A INPUT -s "$(ipof "$l")" -j DROP)")
            ;;
        slow)
            start_delay "$v"
            for o in "$h1" "$h2"; do
                cut+=("$(ipt "$v" -A INPUT -s "$(ipof "$o")" -m statistic --mode random --probability "$LOSS" -j DROP)"
                    "$(ipt "$v" -A INPUT -s "$(ipof "$o")" -j NFQUEUE --queue-num 0 --queue-bypass)"
                    "$(ipt "$v" -A OUTPUT -d "$(ipof "$o")" -m statistic --mode random --probability "$LOSS" -j DROP)"
                    "$(ipt "$v" -A OUTPUT -d "$(ipof "$o")" -j NFQUEUE --queue-num 0 --queue-bypass)")
            done
            ;;
        *) echo "unknown scenario $sc" >&2; exit 2 ;;
    esac
    for o in "${cut[@]}"; do fault+="${fault:+ && }$o"; done
    local hs vsub=-
    hs="$(mqtt "$h1"),$(mqtt "$h2")"
    ((VICTIM_SUB)) && vsub=$(mqtt "$v")
    echo "== $name: leader $l, faulty node $v, healthy $h1 $h2; fault at ${FAULT_AT} s, heal at ${HEAL_AT} s, ${SECONDS_RUN} s in all"
    local line rc=0
    line=$("$faults" netload "$fault" "$heal" "$hs" "$hs" "$vsub" "$(mqtt "$h1")" "$(mqtt "$h2")" \
        "$SECONDS_RUN" "$FAULT_AT" "$HEAL_AT" "$PUBLISHERS" "$WINDOW" "$(mqtt "$v")" \
        "$WATCH_CLIENTS" "$move" 2>>"$work/faults.err" | tee -a /dev/stderr | tail -1) || rc=$?
    [[ $sc == slow ]] && stop_delay
    # Rules left by a tool that died before its heal.
    ip netns exec "$(ns_of "$v")" iptables -w -F INPUT
    ip netns exec "$(ns_of "$v")" iptables -w -F OUTPUT
    sleep 2
    local views=() fen=()
    for o in 1 2 3; do views+=("\"$o\":\"$(view "$o")\""); done
    for o in "$h1" "$h2"; do fen+=("\"$o\":$(fenced "$o" || echo null)"); done
    echo "2 s after the run, leader/commit per node: ${views[*]}; healthy nodes' sessions fenced: ${fen[*]}"
    [[ $line == "{"* ]] || line=null
    printf '{"scenario":"%s","run":%s,"leader":%s,"faulty":%s,"rc":%s,"views":{%s},"healthy_fenced":{%s},"result":%s}\n' \
        "$sc" "$r" "$l" "$v" "$rc" "$(IFS=,; echo "${views[*]}")" "$(IFS=,; echo "${fen[*]}")" "$line" >>"$OUT"
    if ((rc != 0)); then
        echo "faults exited $rc: $(tail -5 "$work/faults.err")" >&2
    fi
    if grep -qiE 'panicked|FATAL' "$work/$name"-node-*.log; then
        echo "a node logged a panic:" >&2
        grep -iE 'panicked|FATAL' "$work/$name"-node-*.log | head -5 >&2
    fi
    stop_cluster
    # Keep the logs of this run for a look afterwards (KEEP_LOGS=dir).
    if [[ -n ${KEEP_LOGS:-} ]]; then mkdir -p "$KEEP_LOGS"; cp "$work/$name"-node-*.log "$KEEP_LOGS/"; fi
    rm -rf "${work:?}/$name"
}

for r in $(seq "$RUNS"); do
    for sc in ${SCENARIOS//,/ }; do
        run_one "$sc" "$r"
    done
done
echo "results in $OUT"
