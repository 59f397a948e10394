#!/usr/bin/env bash
# A local Tessera cluster on this machine, for trying the cluster out (`just run-cluster`).
#
#   scripts/cluster.sh run [N]   build, make certificates on first use, start N nodes
#                                (default 3), wait until a leader is elected and every
#                                node is ready, print each node's URLs
#   scripts/cluster.sh stop      stop the nodes gracefully (SIGTERM, then wait)
#   scripts/cluster.sh status    `brokerctl cluster status` against node 1
#
# Node i listens for MQTT on 127.0.0.1:(1882+i), its admin API on 127.0.0.1:(18082+i)
# and the cluster link on 127.0.0.1:(6999+i) (UDP); MQTT_BASE, ADMIN_BASE and
# CLUSTER_BASE move them (node 1's ports). Everything lives under
# ./data/cluster/ (DIR to change it): certs/, node-<i>/ (data), node-<i>.log and
# node-<i>.pid. A restarted node rejoins with its data. The number of nodes is fixed
# when the cluster is first created; to start over with another N, stop it and remove
# the directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DIR=${DIR:-data/cluster}
BIN=${BIN:-target/debug}
WAIT_S=${WAIT_S:-60}
MQTT_BASE=${MQTT_BASE:-1883}
ADMIN_BASE=${ADMIN_BASE:-18083}
CLUSTER_BASE=${CLUSTER_BASE:-7000}

die() {
    echo "cluster.sh: $*" >&2
    exit 1
}

ready() { # ready ADMIN_PORT: /ready answers 200
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "http://127.0.0.1:$1/ready" 2>/dev/null
}

leader() { # leader ADMIN_PORT: prints the leader's id, or nothing
    python3 -c 'import json, sys, urllib.request
v = json.load(urllib.request.urlopen(sys.argv[1], timeout=2))
print(v["leader"] if v.get("leader") else "")' "http://127.0.0.1:$1/api/v1/cluster" 2>/dev/null || true
}

run() {
    local n=${1:-3} i peers=""
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, not '$n'"
    cargo build -p tessera-broker --bins
    mkdir -p "$DIR"
    if [[ -f $DIR/size && $(cat "$DIR/size") != "$n" ]]; then
        die "$DIR holds a cluster of $(cat "$DIR/size") nodes; run it with that N, or stop it and remove $DIR to start over with $n"
    fi
    echo "$n" >"$DIR/size"
    [[ -f $DIR/certs/ca.pem ]] || echo "making the cluster's certificates in $DIR/certs"
    "$BIN/brokerctl" cluster certs --out "$DIR/certs" --nodes "$n" >/dev/null
    for ((i = 1; i <= n; i++)); do
        peers+="${peers:+,}$i=127.0.0.1:$((CLUSTER_BASE - 1 + i))"
    done
    for ((i = 1; i <= n; i++)); do
        if [[ -f $DIR/node-$i.pid ]] && kill -0 "$(cat "$DIR/node-$i.pid")" 2>/dev/null; then
            echo "node $i already runs (pid $(cat "$DIR/node-$i.pid"))"
            continue
        fi
        "$BIN/broker" --listen "127.0.0.1:$((MQTT_BASE - 1 + i))" --admin-listen "127.0.0.1:$((ADMIN_BASE - 1 + i))" \
            --data-dir "$DIR/node-$i" --node-id "$i" --cluster-listen "127.0.0.1:$((CLUSTER_BASE - 1 + i))" \
            --cluster-peers "$peers" --cluster-certs "$DIR/certs" >>"$DIR/node-$i.log" 2>&1 &
        echo $! >"$DIR/node-$i.pid"
    done
    local deadline=$((SECONDS + WAIT_S)) all
    while :; do
        all=1
        for ((i = 1; i <= n; i++)); do
            kill -0 "$(cat "$DIR/node-$i.pid")" 2>/dev/null ||
                die "node $i exited; see $DIR/node-$i.log: $(tail -n 3 "$DIR/node-$i.log")"
            ready $((ADMIN_BASE - 1 + i)) || all=0
        done
        [[ $all == 1 && -n $(leader "$ADMIN_BASE") ]] && break
        ((SECONDS < deadline)) || die "no leader with every node ready within ${WAIT_S}s; see $DIR/node-*.log"
        sleep 0.2
    done
    echo "cluster of $n nodes up, leader: node $(leader "$ADMIN_BASE")"
    for ((i = 1; i <= n; i++)); do
        echo "node $i: mqtt://127.0.0.1:$((MQTT_BASE - 1 + i))  admin http://127.0.0.1:$((ADMIN_BASE - 1 + i))  cluster 127.0.0.1:$((CLUSTER_BASE - 1 + i))/udp  log $DIR/node-$i.log"
    done
}

stop() {
    local pidfile pid i
    shopt -s nullglob
    for pidfile in "$DIR"/node-*.pid; do
        pid=$(cat "$pidfile")
        if kill -TERM "$pid" 2>/dev/null; then
            for ((i = 0; i < 100; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -0 "$pid" 2>/dev/null && echo "pid $pid did not stop within 10 s" >&2
        fi
        rm -f "$pidfile"
    done
    echo "stopped"
}

case ${1:-} in
run) run "${2:-3}" ;;
stop) stop ;;
status) "$BIN/brokerctl" cluster status --url "http://127.0.0.1:$ADMIN_BASE" ;;
*) die "usage: scripts/cluster.sh run [N] | stop | status" ;;
esac
