#!/usr/bin/env bash
# What authentication and the ACL cost, Tessera and Mosquitto side by side
# (docs/SECURITY.md records the figures):
#   - QoS 0 and QoS 1 fan-in (4 publishers, 1 subscriber on bench/#) against
#     each broker open (anonymous, no ACL) and secured (password file and an
#     ACL file with the same rules in each broker's syntax), interleaved
#     T-open, M-open, T-auth, M-auth, $REPS times;
#   - connects with a password, open and secured: $CONNS connections at
#     $RATE/s, connect latency.
# Brokers run pinned to $BROKER_CPU, Tessera with one shard; the bench pinned to
# $BENCH_CPU with one tokio worker, as bench/scripts/compare-all.sh does.
#
# Usage: bench/scripts/auth-overhead.sh
# Environment: BENCH, BROKER, BROKERCTL (binaries; default target/release),
# REPS (3), DURATION (5 s), CONNS (2000), RATE (1000), BROKER_CPU (1),
# BENCH_CPU (0), OUT (logs; a temp dir).
# Build first: cargo build --release -p tessera-broker -p tessera-bench
set -euo pipefail
cd "$(dirname "$0")/../.."

BENCH=${BENCH:-target/release/bench}
BROKER=${BROKER:-target/release/broker}
BROKERCTL=${BROKERCTL:-target/release/brokerctl}
REPS=${REPS:-3}
DURATION=${DURATION:-5}
CONNS=${CONNS:-2000}
RATE=${RATE:-1000}
BROKER_CPU=${BROKER_CPU:-1}
BENCH_CPU=${BENCH_CPU:-0}
OUT=${OUT:-$(mktemp -d /tmp/auth-overhead.XXXXXX)}
mkdir -p "$OUT"
chmod 755 "$OUT"

# shellcheck source=bench/scripts/lib.sh
source bench/scripts/lib.sh  # the script runs from the repo root (cd above)
need_bins "$BENCH" "$BROKER" "$BROKERCTL"
command -v mosquitto_passwd >/dev/null || { echo "missing mosquitto: apt-get install -y mosquitto" >&2; exit 2; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# The same users and rules for both brokers. The rules the bench needs come
# last, after rules for other clients, so a first-match walk is not trivial.
printf '%s\n' benchpw | "$BROKERCTL" passwd add "$OUT/tessera.passwd" bench --iterations 100000
cat > "$OUT/tessera.acl" <<'EOF'
default deny
deny subscribe test/nosubscribe
user admin
allow all #
user bench
deny publish bench/forbidden/#
allow all bench/#
any
allow all clients/%c/#
EOF
mosquitto_passwd -c -b "$OUT/mosquitto.passwd" bench benchpw
cat > "$OUT/mosquitto.acl" <<'EOF'
user admin
topic readwrite #
user bench
topic deny bench/forbidden/#
topic readwrite bench/#
pattern readwrite clients/%c/#
EOF
chmod 644 "$OUT"/*

tport_open=$(free_port); tport_auth=$(free_port); mport_open=$(free_port); mport_auth=$(free_port)
taskset -c "$BROKER_CPU" "$BROKER" --listen "127.0.0.1:$tport_open" --shards 1 \
    --data-dir "$OUT/t-open" > "$OUT/t-open.log" 2>&1 &
pids+=($!)
TESSERA_AUTH__PASSWORD_FILE="$OUT/tessera.passwd" TESSERA_AUTH__ACL_FILE="$OUT/tessera.acl" \
    TESSERA_AUTH__ALLOW_ANONYMOUS=false taskset -c "$BROKER_CPU" "$BROKER" \
    --listen "127.0.0.1:$tport_auth" --shards 1 --data-dir "$OUT/t-auth" > "$OUT/t-auth.log" 2>&1 &
pids+=($!)
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$mport_open" > "$OUT/m-open.conf"
printf 'listener %s 127.0.0.1\nallow_anonymous false\npassword_file %s\nacl_file %s\n' \
    "$mport_auth" "$OUT/mosquitto.passwd" "$OUT/mosquitto.acl" > "$OUT/m-auth.conf"
chmod 644 "$OUT"/*.conf
taskset -c "$BROKER_CPU" mosquitto -c "$OUT/m-open.conf" > "$OUT/m-open.log" 2>&1 &
pids+=($!)
taskset -c "$BROKER_CPU" mosquitto -c "$OUT/m-auth.conf" > "$OUT/m-auth.log" 2>&1 &
pids+=($!)
for p in "$tport_open" "$tport_auth" "$mport_open" "$mport_auth"; do wait_port "$p"; done

cat > "$OUT/summary.py" <<'PY'
import json, sys
name, text = sys.argv[1], sys.argv[2]
try:
    r = json.loads(text.strip().splitlines()[-1])
except Exception:
    print(f"{name}\tFAILED")
    sys.exit()
if r.get("connect_latency") is None:
    print(f"{name}\trecv {r['received_msg_per_s']:.0f} msg/s\tloss {r.get('loss_count')}\tpass {r.get('pass')}")
else:
    lat = r["connect_latency"]
    fails = sum(r.get("failures", {}).values())
    print(f"{name}\tconnected {r.get('connected_count')}\tfailures {fails}\tp50 {lat.get('p50_us')} us\tp99 {lat.get('p99_us')} us")
PY
run() { # name port auth? scenario args...
    local name=$1 port=$2 auth=$3; shift 3
    local creds=()
    [[ $auth == yes ]] && creds=(--username bench --password benchpw)
    local json
    json=$(taskset -c "$BENCH_CPU" "$BENCH" --threads 1 --port "$port" "${creds[@]}" "$@" --json 2>>"$OUT/bench.err" || true)
    python3 "$OUT/summary.py" "$name" "$json"
}

echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD), load $(cut -d' ' -f1-3 /proc/loadavg); logs in $OUT"
for qos in 0 1; do
    for rep in $(seq "$REPS"); do
        for b in "tessera-open $tport_open no" "mosquitto-open $mport_open no" \
                 "tessera-auth $tport_auth yes" "mosquitto-auth $mport_auth yes"; do
            read -r bname bport bauth <<<"$b"
            run "fanin-q$qos $bname #$rep" "$bport" "$bauth" fanin --publishers 4 --qos "$qos" \
                --duration "$DURATION" --warmup 1
        done
    done
done
for rep in $(seq "$REPS"); do
    for b in "tessera-open $tport_open no" "mosquitto-open $mport_open no" \
             "tessera-auth $tport_auth yes" "mosquitto-auth $mport_auth yes"; do
        read -r bname bport bauth <<<"$b"
        run "conn $bname #$rep" "$bport" "$bauth" conn --clients "$CONNS" --rate "$RATE" --duration 1
    done
done
