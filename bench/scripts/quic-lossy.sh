#!/usr/bin/env bash
# MQTT over QUIC against MQTT over TLS on a lossy, slow link (issue 18's
# acceptance benchmark), measured with `bench` in one run:
#   - QoS 1 latency: `bench latency --qos 1 --rate LAT_RATE` (one paced
#     publisher, one subscriber; latency from each message's intended send time,
#     so a stall counts against every message it delays): p50, p99, max;
#   - QoS 1 throughput: `bench fanin --qos 1 --publishers PUBS --inflight 256`
#     to one subscriber, the broker's `max_inflight` raised to 1024 so that the
#     MQTT windows (by default 32 to the subscriber: 800 msg/s at a 40 ms
#     round trip) are not what limits it, and `max_queued_messages` to 100,000
#     so that the subscriber's queue does not overflow (with the defaults a
#     clean-session queue dropped QoS 1 once back-pressure's hold ran out):
#     messages/s received.
# Interleaved QUIC (CUBIC), QUIC (BBR), TLS... ROUNDS times against one broker
# with two `quic` listeners (`congestion = "cubic"` and `"bbr"`; the bench's
# client uses the same controller, `--quic-congestion`) and an `mqtts` listener
# (same certificate), one shard. The table compares each QUIC variant with TLS.
#
# The link: three network namespaces in a row,
#   tq-cli (bench, 10.77.1.2) -- veth -- tq-mid (router) -- veth -- tq-brk (broker, 10.77.2.2)
# In tq-mid every forwarded packet, both ways, is first dropped with
# probability LOSS (`iptables -m statistic --mode random`), then held DELAY_MS
# by bench/scripts/nfq-delay.py (an NFQUEUE delay line: this kernel has no
# netem). The delay is one-way, so the round trip is 2 x DELAY_MS. The veths
# run without segmentation offloads, so a rule sees (and drops) one wire-size
# packet, not a 64 KB TSO/GSO burst. The delay sits in a router, not in either
# end's socket: both transports see the same path, retransmissions included.
#
# Everything the script makes (namespaces, veths, iptables rules, processes)
# is removed on exit, also on failure or interruption. Needs root, iptables,
# ethtool, openssl, python3 and a release build.
#
# Usage: bench/scripts/quic-lossy.sh [target/release]
# Env: ROUNDS (2), DURATION (10), LAT_RATE (100), PUBS (4), LOSS (0.05),
#      DELAY_MS (20), OUT (quic-lossy.jsonl)
set -euo pipefail
BIN=${1:-target/release}
BIN=$(cd "$BIN" && pwd)
ROUNDS=${ROUNDS:-2}
SECONDS_RUN=${DURATION:-10}
LAT_RATE=${LAT_RATE:-100}
PUBS=${PUBS:-4}
LOSS=${LOSS:-0.05}
DELAY_MS=${DELAY_MS:-20}
OUT=${OUT:-quic-lossy.jsonl}
HERE=$(cd "$(dirname "$0")" && pwd)
for tool in ip iptables ethtool openssl python3 taskset "$BIN/bench" "$BIN/broker"; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 2; }
NS_CLI=tq-cli; NS_MID=tq-mid; NS_BRK=tq-brk
for ns in $NS_CLI $NS_MID $NS_BRK; do
    if ip netns list | grep -qw "$ns"; then
        echo "namespace $ns exists: another run, or a leftover (ip netns del $ns)" >&2
        exit 2
    fi
done

work=$(mktemp -d)
pids=()
made_ns=()
cleanup() {
    set +e
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    # The rules live in tq-mid and go with it; delete them first anyway, so
    # nothing is left queued to a delay line that is gone.
    if ip netns list | grep -qw $NS_MID; then
        ip netns exec $NS_MID iptables -F FORWARD 2>/dev/null
    fi
    # Deleting a namespace deletes its veth ends (and so their peers).
    for ns in "${made_ns[@]}"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Background processes are started with `ip netns exec` itself (which execs
# the program), not through this function, so `$!` is the program's pid.
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

for ns in $NS_CLI $NS_MID $NS_BRK; do
    ip netns add "$ns"
    made_ns+=("$ns")
    in_ns "$ns" ip link set lo up
done
ip link add tqc0 netns $NS_CLI type veth peer name tqc1 netns $NS_MID
ip link add tqb0 netns $NS_BRK type veth peer name tqb1 netns $NS_MID
in_ns $NS_CLI ip addr add 10.77.1.2/24 dev tqc0
in_ns $NS_MID ip addr add 10.77.1.1/24 dev tqc1
in_ns $NS_MID ip addr add 10.77.2.1/24 dev tqb1
in_ns $NS_BRK ip addr add 10.77.2.2/24 dev tqb0
for pair in $NS_CLI:tqc0 $NS_MID:tqc1 $NS_MID:tqb1 $NS_BRK:tqb0; do
    ns=${pair%%:*}; dev=${pair#*:}
    # Wire-size packets: no TSO/GSO/GRO (UDP GSO included), so each rule
    # decision is about one packet.
    in_ns "$ns" ethtool -K "$dev" tso off gso off gro off tx-udp-segmentation off 2>/dev/null ||
        in_ns "$ns" ethtool -K "$dev" tso off gso off gro off
    in_ns "$ns" ip link set "$dev" up
done
in_ns $NS_CLI ip route add default via 10.77.1.1
in_ns $NS_BRK ip route add default via 10.77.2.1
in_ns $NS_MID sysctl -qw net.ipv4.ip_forward=1

ip netns exec $NS_MID python3 "$HERE/nfq-delay.py" 0 "$DELAY_MS" 2> "$work/delay.err" &
pids+=($!)
for _ in $(seq 50); do grep -q "nfq-delay: queue" "$work/delay.err" 2>/dev/null && break; sleep 0.1; done
grep -q "nfq-delay: queue" "$work/delay.err" || { cat "$work/delay.err" >&2; exit 1; }
in_ns $NS_MID iptables -A FORWARD -m statistic --mode random --probability "$LOSS" -j DROP
in_ns $NS_MID iptables -A FORWARD -j NFQUEUE --queue-num 0

# shellcheck source=bench/scripts/lib.sh
source "$HERE/lib.sh"
make_server_cert "$work" 10.77.2.2

P_QUIC=22501; P_TLS=22502; P_QUICB=22503
cat > "$work/tessera.toml" <<TOML
[log]
level = "warn"

[limits]
max_inflight = 1024
max_queued_messages = 100000

[[listener]]
kind = "quic"
bind = "10.77.2.2:$P_QUIC"
cert_file = "$work/srv.pem"
key_file = "$work/srv.key"

[[listener]]
kind = "quic"
bind = "10.77.2.2:$P_QUICB"
cert_file = "$work/srv.pem"
key_file = "$work/srv.key"
congestion = "bbr"

[[listener]]
kind = "mqtts"
bind = "10.77.2.2:$P_TLS"
cert_file = "$work/srv.pem"
key_file = "$work/srv.key"
TOML
ip netns exec $NS_BRK taskset -c 1 "$BIN/broker" --shards 1 --listen 10.77.2.2:22500 \
    --admin-listen 127.0.0.1:0 --data-dir "$work/data" --config "$work/tessera.toml" \
    > "$work/broker.out" 2> "$work/broker.err" &
pids+=($!); B_PID=$!
for _ in $(seq 100); do grep -q "quic://" "$work/broker.out" 2>/dev/null && break; sleep 0.1; done
grep -q "quic://" "$work/broker.out" || { cat "$work/broker.err" >&2; exit 1; }
in_ns $NS_CLI bash -c "exec 3<>/dev/tcp/10.77.2.2/$P_TLS" ||
    { echo "the link does not carry TCP" >&2; exit 1; }

run() { # transport scenario
    local transport=$1 scenario=$2 port args flags
    case $transport in
        quic) port=$P_QUIC; flags=(--quic) ;;
        quic-bbr) port=$P_QUICB; flags=(--quic --quic-congestion bbr) ;;
        tls) port=$P_TLS; flags=(--tls) ;;
    esac
    case $scenario in
        latency) args=(latency --rate "$LAT_RATE") ;;
        fanin) args=(fanin --publishers "$PUBS" --inflight 256) ;;
    esac
    local line
    line=$(in_ns $NS_CLI taskset -c 0 "$BIN/bench" --threads 1 --host 10.77.2.2 --port "$port" \
        "${flags[@]}" --ca "$work/ca.pem" --qos 1 --duration "$SECONDS_RUN" --warmup 2 \
        --drain 10 --broker-pid "$B_PID" --json "${args[@]}" 2>>"$work/bench.err" | tail -1) || true
    printf '{"transport_name":"%s","run":%s}\n' "$transport" "${line:-null}" >> "$OUT"
}

: > "$OUT"
echo "link: loss $LOSS each way, ${DELAY_MS} ms each way; uptime: $(uptime)" >&2
for round in $(seq "$ROUNDS"); do
    for scenario in latency fanin; do
        for transport in quic quic-bbr tls; do
            run "$transport" "$scenario"
        done
    done
    echo "round $round done: $(uptime)" >&2
done
dropped=$(in_ns $NS_MID iptables -L FORWARD -v -x -n | awk '/DROP/ {print $1}')
queued=$(in_ns $NS_MID iptables -L FORWARD -v -x -n | awk '/NFQUEUE/ {print $1}')
echo "link: $dropped packets dropped, $queued delayed" >&2
if [ -s "$work/bench.err" ] && grep -qi "error" "$work/bench.err"; then
    echo "bench stderr (errors):" >&2; grep -i "error" "$work/bench.err" | tail -5 >&2
fi

python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def vals(t, sc, f):
    return [f(r["run"]) for r in rows
            if r["run"] and r["transport_name"] == t and r["run"]["scenario"] == sc]
def med(t, sc, f):
    v = vals(t, sc, f)
    return (statistics.median(v) if v else float("nan")), len(v)
figures = [
    ("latency", "p50 ms", lambda r: r["latency"]["p50_us"] / 1000),
    ("latency", "p99 ms", lambda r: r["latency"]["p99_us"] / 1000),
    ("latency", "max ms", lambda r: r["latency"]["max_us"] / 1000),
    ("latency", "lost", lambda r: r["loss_count"]),
    ("fanin", "received msg/s", lambda r: r["received_msg_per_s"]),
    ("fanin", "p99 ms", lambda r: r["latency"]["p99_us"] / 1000),
    ("fanin", "lost", lambda r: r["loss_count"]),
    ("fanin", "broker cores", lambda r: r.get("broker_cpu_cores") or 0),
]
each = lambda tr, sc, f: ", ".join(f"{x:,.1f}" for x in vals(tr, sc, f))
for quic, label in (("quic", "QUIC (cubic)"), ("quic-bbr", "QUIC (bbr)")):
    print(f"\n| scenario | figure | {label} (median, n) | TLS (median, n) | QUIC / TLS | QUIC runs | TLS runs |")
    print("|---|---|---|---|---|---|---|")
    for sc, name, f in figures:
        q, nq = med(quic, sc, f); t, nt = med("tls", sc, f)
        ratio = f"{q / t:.2f}" if t else "-"
        print(f"| {sc} | {name} | {q:,.1f} (n={nq}) | {t:,.1f} (n={nt}) | {ratio} | {each(quic, sc, f)} | {each('tls', sc, f)} |")
PY
