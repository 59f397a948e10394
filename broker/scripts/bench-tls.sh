#!/usr/bin/env bash
# TLS against plain TCP, Tessera against Mosquitto, with third-party clients
# only (written before the bench tool had TLS; bench/scripts/tls-compare.sh
# measures the same with `bench --tls`, brokers and bench pinned):
#   - handshakes/s: `openssl s_time -new` (full handshakes, no resumption),
#     CLIENTS processes in parallel for SECONDS each; the broker sees a TLS
#     connection that closes without CONNECT, the same for both brokers.
#   - QoS 0 fan-in: PUBS `mosquitto_pub -l` publishers, MSGS messages of 64 B
#     each, into one `mosquitto_sub`. published/s = messages sent / time until
#     every publisher finished (what the broker took in); received/s =
#     messages received / (time of the last one received - start), `-F %U`
#     timestamping every message at the subscriber. A broker that drops QoS 0
#     messages for a subscriber that falls behind (Tessera's bounded queues)
#     receives fewer: read `received` with the rate.
# Runs are interleaved (tessera, mosquitto, tessera, mosquitto) ROUNDS times,
# because this machine's 2 cores are shared by broker and clients (and by
# whatever else runs): read ratios, not absolute figures.
#
# Usage: broker/scripts/bench-tls.sh [path/to/broker]
# Env: SHARDS (2), ROUNDS (2), SECONDS_HS (5), CLIENTS (2), PUBS (4), MSGS (50000)
set -euo pipefail
BROKER=${1:-target/release/broker}
SHARDS=${SHARDS:-2}
ROUNDS=${ROUNDS:-2}
SECONDS_HS=${SECONDS_HS:-5}
CLIENTS=${CLIENTS:-2}
PUBS=${PUBS:-4}
MSGS=${MSGS:-50000}
for tool in openssl mosquitto mosquitto_pub mosquitto_sub "$BROKER"; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done

work=$(mktemp -d)
# Mosquitto started as root drops to its own user, which must read the files.
chmod 755 "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# ECDSA P-256 server certificate for 127.0.0.1, signed by a throwaway CA.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$work/ca.key" -out "$work/ca.pem" -subj /CN=bench-ca 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$work/srv.key" -out "$work/srv.csr" -subj /CN=127.0.0.1 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' > "$work/ext"
openssl x509 -req -in "$work/srv.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -days 2 -extfile "$work/ext" -out "$work/srv.pem" 2>/dev/null
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

"$BROKER" --shards "$SHARDS" --listen "127.0.0.1:$T_PLAIN" --config "$work/tessera.toml" \
    > "$work/tessera.out" 2> "$work/tessera.err" &
pids+=($!)
mosquitto -c "$work/mosquitto.conf" 2> "$work/mosquitto.err" &
pids+=($!)
sleep 0.3
kill -0 "${pids[-1]}" 2>/dev/null || { echo "mosquitto did not start:" >&2; cat "$work/mosquitto.err" >&2; exit 1; }
for _ in $(seq 100); do
    grep -q "mqtt://" "$work/tessera.out" 2>/dev/null && break
    sleep 0.1
done
sleep 0.5

handshakes() { # port -> handshakes/s over all clients
    local port=$1 total=0
    for c in $(seq "$CLIENTS"); do
        openssl s_time -connect "127.0.0.1:$port" -new -time "$SECONDS_HS" \
            > "$work/st.$c" 2>&1 &
    done
    wait
    for c in $(seq "$CLIENTS"); do
        n=$(grep -m1 -oE '^[0-9]+ connections in' "$work/st.$c" | cut -d' ' -f1)
        total=$((total + ${n:-0}))
    done
    echo $((total / SECONDS_HS))
}

fanin() { # port tls(0/1) -> "received/s received sent"
    local port=$1 tls=()
    [[ $2 == 1 ]] && tls=(--cafile "$work/ca.pem")
    local total=$((PUBS * MSGS))
    mosquitto_sub -h 127.0.0.1 -p "$port" "${tls[@]}" -t 'f/#' -q 0 -F '%U' \
        -C "$total" -W 30 > "$work/sub.out" 2>/dev/null &
    local sub=$!
    sleep 0.5
    local start
    start=$(date +%s.%N)
    local line pubs=()
    line=$(head -c 63 /dev/zero | tr '\0' x)
    for p in $(seq "$PUBS"); do
        yes "$line" | head -n "$MSGS" |
            mosquitto_pub -h 127.0.0.1 -p "$port" "${tls[@]}" -t "f/$p" -q 0 -l &
        pubs+=($!)
    done
    wait "${pubs[@]}" 2>/dev/null || true
    local sent_at
    sent_at=$(date +%s.%N)
    wait "$sub" 2>/dev/null || true
    local got last
    got=$(wc -l < "$work/sub.out")
    last=$(tail -n1 "$work/sub.out")
    awk -v g="$got" -v s="$start" -v p="$sent_at" -v l="${last:-$start}" -v t="$total" \
        'BEGIN { d = l - s; if (d <= 0) d = 1e-9; e = p - s;
                 printf "%d %d %d %d\n", t / e, g / d, g, t }'
}

echo "# $(date -u +%FT%TZ) shards=$SHARDS clients=$CLIENTS x ${SECONDS_HS}s, fan-in $PUBS x $MSGS x 64 B"
echo "round broker transport handshakes_per_s published_per_s received_per_s received sent"
for r in $(seq "$ROUNDS"); do
    for b in tessera mosquitto; do
        if [[ $b == tessera ]]; then plain=$T_PLAIN; tlsp=$T_TLS; else plain=$M_PLAIN; tlsp=$M_TLS; fi
        echo "$r $b tcp - $(fanin "$plain" 0)"
        echo "$r $b tls $(handshakes "$tlsp") $(fanin "$tlsp" 1)"
    done
done
