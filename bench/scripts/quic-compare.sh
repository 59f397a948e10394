#!/usr/bin/env bash
# MQTT over QUIC against TLS (and TCP) on one Tessera, measured with `bench`
# (issue 18), for several layouts of the QUIC listener at once:
#   - s1e1: --shards 1, the quic listener with `endpoints = 1` (one endpoint
#     thread, the layout before steering);
#   - s1e2: --shards 1, `endpoints = 2` (two endpoint threads, steered);
#   - s2e2: --shards 2, endpoints at their default (one per shard: 2).
# Each broker has an mqtt, an mqtts and a quic listener with the same ECDSA
# P-256 certificate, so every QUIC figure has its TLS peer measured on the
# same broker in the same round. Scenarios (bench, release):
#   - burst: `conn --clients CONNS --rate 100000` (all at once): handshakes/s
#     through CONNACK;
#   - steady: `conn --clients CONNS --rate CONN_RATE`;
#   - fanin: `fanin --publishers PUBS --qos 0`, received msg/s.
# Runs are interleaved (setup, scenario, transport) ROUNDS times; nothing is
# pinned (a 2-shard broker needs both CPUs; the bench shares them). Prints one
# JSON line per run to OUT and a table of medians with QUIC/TLS ratios.
#
# Usage: bench/scripts/quic-compare.sh [target/release]
# Env: ROUNDS (3), DURATION (5), PUBS (4), CONNS (2000), CONN_RATE (2000),
#      PORT_BASE (23000: uses PORT_BASE..PORT_BASE+8), SETUPS ("s1e1 s1e2 s2e2"),
#      SCENARIOS ("burst steady fanin"), OUT (quic-compare.jsonl)
set -euo pipefail
BIN=${1:-target/release}
ROUNDS=${ROUNDS:-3}
SECONDS_RUN=${DURATION:-5}
PUBS=${PUBS:-4}
CONNS=${CONNS:-2000}
CONN_RATE=${CONN_RATE:-2000}
PORT_BASE=${PORT_BASE:-23000}
SETUPS=${SETUPS:-s1e1 s1e2 s2e2}
SCENARIOS=${SCENARIOS:-burst steady fanin}
OUT=${OUT:-quic-compare.jsonl}
# shellcheck source=bench/scripts/lib.sh
source "$(dirname "$0")/lib.sh"
need_bins "$BIN/bench" "$BIN/broker"
for tool in openssl python3; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done

work=$(mktemp -d)
pids=()
trap cleanup_pids_and_work EXIT
make_server_cert "$work" 127.0.0.1

declare -A tcp_port tls_port quic_port broker_pid
k=0
for setup in $SETUPS; do
    case $setup in
        s1e1) shards=1; endpoints="endpoints = 1" ;;
        s1e2) shards=1; endpoints="endpoints = 2" ;;
        s2e2) shards=2; endpoints="" ;;
        *) echo "unknown setup $setup" >&2; exit 2 ;;
    esac
    tcp_port[$setup]=$((PORT_BASE + 3 * k))
    tls_port[$setup]=$((PORT_BASE + 3 * k + 1))
    quic_port[$setup]=$((PORT_BASE + 3 * k + 2))
    cat > "$work/$setup.toml" <<TOML
[log]
level = "warn"

[[listener]]
kind = "mqtts"
bind = "127.0.0.1:${tls_port[$setup]}"
cert_file = "$work/srv.pem"
key_file = "$work/srv.key"

[[listener]]
kind = "quic"
bind = "127.0.0.1:${quic_port[$setup]}"
cert_file = "$work/srv.pem"
key_file = "$work/srv.key"
$endpoints
TOML
    "$BIN/broker" --shards "$shards" --listen "127.0.0.1:${tcp_port[$setup]}" \
        --admin-listen 127.0.0.1:0 --data-dir "$work/data-$setup" --config "$work/$setup.toml" \
        > "$work/$setup.out" 2> "$work/$setup.err" &
    pids+=($!)
    broker_pid[$setup]=$!
    wait_port "${tls_port[$setup]}"
    k=$((k + 1))
done

run() { # setup scenario transport
    local setup=$1 scenario=$2 transport=$3 port flags=() args
    case $transport in
        tcp) port=${tcp_port[$setup]} ;;
        tls) port=${tls_port[$setup]}; flags=(--tls --ca "$work/ca.pem") ;;
        quic) port=${quic_port[$setup]}; flags=(--quic --ca "$work/ca.pem") ;;
    esac
    case $scenario in
        burst) args=(--duration 2 conn --clients "$CONNS" --rate 100000 --max-failures "$CONNS") ;;
        steady) args=(--duration 1 conn --clients "$CONNS" --rate "$CONN_RATE" --max-failures "$CONNS") ;;
        fanin) args=(--duration "$SECONDS_RUN" --warmup 1 fanin --publishers "$PUBS" --qos 0) ;;
    esac
    local rc=0
    "$BIN/bench" --port "$port" "${flags[@]}" --broker-pid "${broker_pid[$setup]}" --json \
        "${args[@]}" > "$work/run.out" 2> "$work/run.err" || rc=$?
    record_report "$setup" "$scenario/$transport" "$rc" "$work/run.out" "$work/run.err" "$OUT"
}

: > "$OUT"
echo "uptime before: $(uptime)" >&2
for round in $(seq "$ROUNDS"); do
    for setup in $SETUPS; do
        for scenario in $SCENARIOS; do
            transports="quic tls"
            [ "$scenario" = fanin ] && transports="quic tls tcp"
            for transport in $transports; do
                run "$setup" "$scenario" "$transport"
            done
        done
    done
    echo "round $round done: $(uptime)" >&2
done
grep -h "RcvbufErrors" /proc/net/snmp | tail -1 >&2

python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def runs(setup, case):
    return [r["report"] for r in rows if r["setup"] == setup and r["case"] == case]
def fig(scenario, rep):
    if scenario == "fanin":
        return rep["received_msg_per_s"]
    return rep["connect_per_s"]
def detail(scenario, rep):
    if scenario == "fanin":
        lost = rep.get("loss_count", 0)
        return f"{rep['received_msg_per_s']:,.0f} (lost {lost:,}, broker {rep.get('broker_cpu_cores') or 0:.2f} cores)"
    lat = rep["connect_latency"]
    return (f"{rep['connect_per_s']:,.0f}/s, {rep['connected_count']} of {rep.get('clients', rep['connected_count'])}"
            f", p50 {lat['p50_us'] / 1000:.1f} ms, p99 {lat['p99_us'] / 1000:.1f} ms"
            f", broker {rep.get('broker_cpu_cores') or 0:.2f} cores")
setups = sorted({r["setup"] for r in rows}, key=["s1e1", "s1e2", "s2e2"].index)
for scenario in ["burst", "steady", "fanin"]:
    if not any(r["case"].startswith(scenario + "/") for r in rows):
        continue
    print(f"\n{scenario}: each run, then medians and QUIC/TLS")
    for s in setups:
        for t in ["quic", "tls", "tcp"]:
            for rep in runs(s, f"{scenario}/{t}"):
                print(f"  {s} {t}: {detail(scenario, rep)}")
    print("| setup | QUIC | TLS | QUIC / TLS |")
    print("|---|---:|---:|---:|")
    for s in setups:
        q = [fig(scenario, r) for r in runs(s, f"{scenario}/quic")]
        t = [fig(scenario, r) for r in runs(s, f"{scenario}/tls")]
        if q and t:
            mq, mt = statistics.median(q), statistics.median(t)
            print(f"| {s} | {mq:,.0f} | {mt:,.0f} | {mq / mt:.2f} |")
PY
