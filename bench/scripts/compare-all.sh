#!/usr/bin/env bash
# Tessera vs Mosquitto on this machine, as docs/BENCHMARKS.md records it:
#   1. `bench compare` over the scenario matrix (issue 4's shared-subscription
#      fan-in and fan-out with topic aliases included), brokers interleaved
#      (A, B, A, B ...), median of $REPS runs;
#   2. a saturation check: Mosquitto (single-threaded) pinned to one core and the
#      bench to the other, QoS 0 fan-in at full speed, reporting both processes'
#      CPU: the broker near 1.0 core while the bench stays below shows the bench
#      is not the bottleneck.
# Both brokers run pinned to $BROKER_CPU (one loaded at a time), Tessera with one
# shard; the bench runs pinned to $BENCH_CPU with one tokio worker.
#
# Usage: bench/scripts/compare-all.sh [extra bench compare flags]
# Environment: BENCH, BROKER (binaries; default target/release), REPS (3),
# DURATION (5 s), WARMUP (1 s), SCENARIOS (the compare defaults plus conn-5k),
# BROKER_CPU (1), BENCH_CPU (0), OUT (directory for logs and results; a temp dir).
# Build first: cargo build --release -p tessera-broker -p tessera-bench
set -euo pipefail
cd "$(dirname "$0")/../.."

BENCH=${BENCH:-target/release/bench}
BROKER=${BROKER:-target/release/broker}
REPS=${REPS:-3}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
SCENARIOS=${SCENARIOS:-fanin-q0,fanin-q1,fanout-q0,fanout-alias,shared-q1,pubsub-q1,latency-q0,latency-q1,conn-5k}
BROKER_CPU=${BROKER_CPU:-1}
BENCH_CPU=${BENCH_CPU:-0}
OUT=${OUT:-$(mktemp -d /tmp/compare-all.XXXXXX)}
mkdir -p "$OUT"

for bin in "$BENCH" "$BROKER"; do
    [[ -x $bin ]] || { echo "missing $bin: cargo build --release -p tessera-broker -p tessera-bench" >&2; exit 2; }
done
command -v mosquitto >/dev/null || { echo "missing mosquitto: apt-get install -y mosquitto" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    return 1
}

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

mport=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$mport" > "$OUT/mosquitto.conf"
chmod 755 "$OUT"; chmod 644 "$OUT/mosquitto.conf"
taskset -c "$BROKER_CPU" mosquitto -c "$OUT/mosquitto.conf" > "$OUT/mosquitto.log" 2>&1 &
mpid=$!; pids+=("$mpid")
tport=$(free_port)
taskset -c "$BROKER_CPU" "$BROKER" --listen "127.0.0.1:$tport" --shards 1 --data-dir "$OUT/tessera-data" > "$OUT/tessera.log" 2>&1 &
tpid=$!; pids+=("$tpid")
wait_port "$mport"; wait_port "$tport"

echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) mosquitto $(mosquitto -h 2>/dev/null | head -1 | awk '{print $3}'), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# results and logs in $OUT"
set -x
taskset -c "$BENCH_CPU" "$BENCH" compare \
    --a "127.0.0.1:$mport" --a-name mosquitto --a-pid "$mpid" \
    --b "127.0.0.1:$tport" --b-name tessera --b-pid "$tpid" \
    --reps "$REPS" --duration "$DURATION" --warmup "$WARMUP" --threads 1 \
    --scenarios "$SCENARIOS" --markdown --json "$@" | tee "$OUT/compare.txt"
# Saturation: is Mosquitto the bottleneck, or the bench?
taskset -c "$BENCH_CPU" "$BENCH" fanin --publishers 8 --qos 0 --duration 10 --warmup 2 \
    --threads 1 --port "$mport" --broker-pid "$mpid" --json | tee "$OUT/saturation-mosquitto.txt"
taskset -c "$BENCH_CPU" "$BENCH" fanin --publishers 8 --qos 0 --duration 10 --warmup 2 \
    --threads 1 --port "$tport" --broker-pid "$tpid" --json | tee "$OUT/saturation-tessera.txt"
