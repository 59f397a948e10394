#!/usr/bin/env bash
# TLS against plain TCP, Tessera against Mosquitto, measured with `bench`:
#   - QoS 0 fan-in: `bench fanin --publishers PUBS --qos 0` for DURATION seconds, over TCP
#     and over TLS (server certificate verified with --ca);
#   - handshakes/s: `bench conn --clients CONNS --rate CONN_RATE` (every
#     connection a full TLS 1.3 handshake, no resumption, then CONNECT/CONNACK),
#     over TCP and over TLS; the report's connect_per_s and connect latency
#     percentiles. Set CONN_RATE above what the pair can do and connect_per_s
#     is the capacity, but far above it the listen backlog overflows and SYN
#     retransmits (1 s) dominate the latency: read p50 with the rate.
# The broker (Tessera --shards 1, or Mosquitto) runs on CPU 1, the bench on
# CPU 0 with one tokio worker. Both brokers run at once, each with a plain and
# a TLS listener and the same ECDSA P-256 certificate; runs are interleaved
# (tessera, mosquitto, tessera, mosquitto, ...) ROUNDS times, because other
# work on the machine disturbs single runs. Prints one JSON line per run
# (prefixed with broker and transport) to OUT, and a summary of medians.
#
# Usage: bench/scripts/tls-compare.sh [target/release]
# Env: ROUNDS (3), DURATION (5), PUBS (4), CONNS (2000), CONN_RATE (1500), OUT (tls-compare.jsonl)
set -euo pipefail
BIN=${1:-target/release}
ROUNDS=${ROUNDS:-3}
SECONDS_RUN=${DURATION:-5}
PUBS=${PUBS:-4}
CONNS=${CONNS:-2000}
CONN_RATE=${CONN_RATE:-1500}
OUT=${OUT:-tls-compare.jsonl}
for tool in openssl mosquitto taskset python3 "$BIN/bench" "$BIN/broker"; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done

# shellcheck source=bench/scripts/lib.sh
source "$(dirname "$0")/lib.sh"
work=$(mktemp -d)
# Mosquitto started as root drops to its own user, which must read the files.
chmod 755 "$work"
pids=()
trap cleanup_pids_and_work EXIT

make_server_cert "$work" 127.0.0.1
chmod 644 "$work"/*

T_PLAIN=21883; T_TLS=28883; M_PLAIN=31883; M_TLS=38883
cat > "$work/tessera.toml" <<TOML
[log]
level = "warn"

[[listener]]
kind = "mqtts"
bind = "127.0.0.1:$T_TLS"
cert_file = "$work/srv.pem"
key_file = "$work/srv.key"
TOML
cat > "$work/mosquitto.conf" <<CONF
per_listener_settings false
allow_anonymous true
log_dest none
listener $M_PLAIN 127.0.0.1
listener $M_TLS 127.0.0.1
certfile $work/srv.pem
keyfile $work/srv.key
CONF

taskset -c 1 "$BIN/broker" --shards 1 --listen "127.0.0.1:$T_PLAIN" --admin-listen 127.0.0.1:0 \
    --data-dir "$work/data" --config "$work/tessera.toml" > "$work/tessera.out" 2> "$work/tessera.err" &
pids+=($!); T_PID=$!
taskset -c 1 mosquitto -c "$work/mosquitto.conf" 2> "$work/mosquitto.err" &
pids+=($!); M_PID=$!
for port in $T_PLAIN $T_TLS $M_PLAIN $M_TLS; do
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break
        sleep 0.1
    done
done

run() { # broker transport scenario
    local broker=$1 transport=$2 scenario=$3 port pid tls=()
    case $broker/$transport in
        tessera/tcp) port=$T_PLAIN; pid=$T_PID ;;
        tessera/tls) port=$T_TLS; pid=$T_PID ;;
        mosquitto/tcp) port=$M_PLAIN; pid=$M_PID ;;
        mosquitto/tls) port=$M_TLS; pid=$M_PID ;;
    esac
    [ "$transport" = tls ] && tls=(--tls --ca "$work/ca.pem")
    local args
    case $scenario in
        fanin) args=(fanin --publishers "$PUBS" --qos 0 --duration "$SECONDS_RUN" --warmup 1) ;;
        conn) args=(conn --clients "$CONNS" --rate "$CONN_RATE" --duration 1 --max-failures "$CONNS"
                    --bind 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5) ;;
    esac
    local line
    line=$(taskset -c 0 "$BIN/bench" --threads 1 "${args[@]}" --port "$port" \
        --broker-pid "$pid" "${tls[@]}" --json 2>/dev/null | tail -1) || true
    printf '{"broker_name":"%s","transport_name":"%s","run":%s}\n' "$broker" "$transport" "${line:-null}" >> "$OUT"
}

: > "$OUT"
echo "uptime before: $(uptime)" >&2
for round in $(seq "$ROUNDS"); do
    for scenario in fanin conn; do
        for transport in tcp tls; do
            for broker in tessera mosquitto; do
                run "$broker" "$transport" "$scenario"
            done
        done
    done
    echo "round $round done: $(uptime)" >&2
done

python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(b, t, sc, f):
    v = [f(r["run"]) for r in rows
         if r["run"] and r["broker_name"] == b and r["transport_name"] == t and r["run"]["scenario"] == sc]
    return statistics.median(v) if v else float("nan"), len(v)
fields = {
    "fanin": [("sent msg/s", lambda r: r["sent_msg_per_s"]),
              ("received msg/s", lambda r: r["received_msg_per_s"]),
              ("loss %", lambda r: 100.0 * r["loss_count"] / max(r["expected_count"], 1)),
              ("broker cores", lambda r: r.get("broker_cpu_cores") or 0),
              ("bench cores", lambda r: r.get("bench_cpu_cores") or 0)],
    "conn": [("connects/s", lambda r: r["connect_per_s"]),
             ("connected", lambda r: r["connected_count"]),
             ("p50 us", lambda r: r["connect_latency"]["p50_us"]),
             ("p99 us", lambda r: r["connect_latency"]["p99_us"]),
             ("broker cores", lambda r: r.get("broker_cpu_cores") or 0),
             ("bench cores", lambda r: r.get("bench_cpu_cores") or 0)],
}
for sc, fs in fields.items():
    print(f"\n{sc} (medians)")
    print("| figure | Tessera TCP | Tessera TLS | Mosquitto TCP | Mosquitto TLS | Tessera/Mosquitto TLS | TLS/TCP Tessera | TLS/TCP Mosquitto |")
    print("|---|---|---|---|---|---|---|---|")
    for name, f in fs:
        tt, n = med("tessera", "tcp", sc, f); ts, _ = med("tessera", "tls", sc, f)
        mt, _ = med("mosquitto", "tcp", sc, f); ms, _ = med("mosquitto", "tls", sc, f)
        r = lambda a, b: f"{a / b:.2f}" if b else "-"
        print(f"| {name} (n={n}) | {tt:,.2f} | {ts:,.2f} | {mt:,.2f} | {ms:,.2f} | {r(ts, ms)} | {r(ts, tt)} | {r(ms, mt)} |")
PY
