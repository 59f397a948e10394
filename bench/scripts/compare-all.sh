#!/usr/bin/env bash
# Tessera vs Mosquitto on this machine, as docs/BENCHMARKS.md records it:
#   1. `bench compare` over the scenario matrix (issue 4's shared-subscription
#      fan-in and fan-out with topic aliases included), brokers interleaved
#      (A, B, A, B ...), median of $REPS runs;
#   2. a saturation check: each broker pinned to one core and the bench to the
#      other, QoS 0 fan-in at full speed, reporting both processes' CPU. Mosquitto
#      (single-threaded) near 1.0 core while the bench stays below 1.0 shows the
#      bench is not the bottleneck;
#   3. $CONNS idle connections (default 19,000: the open-files hard limit is
#      20,000) against a fresh broker each, over 4 source addresses, with the
#      broker's RSS per connection, and the bench's own RSS.
# Brokers run pinned to $BROKER_CPU (one loaded at a time), Tessera with one
# shard; the bench runs pinned to $BENCH_CPU with one tokio worker. Brokers and
# bench run at nice $NICE so compiles sharing the machine disturb them less, or
# with SCHED=fifo under SCHED_FIFO priority 10 (root only; the kernel's RT
# throttling still leaves 5 % of each CPU to others, so a saturated process
# shows 0.95 cores), which on a busy machine is the only way to give each side
# its whole core.
#
# Usage: bench/scripts/compare-all.sh [extra bench compare flags]
# Environment: BENCH, BROKER (binaries; default target/release), REPS (3),
# DURATION (5 s), WARMUP (1 s), SCENARIOS (the compare defaults), CONNS (19000),
# BROKER_CPU (1), BENCH_CPU (0), NICE (-10), SCHED (nice or fifo),
# OUT (logs and results; a temp dir).
# Build first: cargo build --release -p tessera-broker -p tessera-bench
set -euo pipefail
cd "$(dirname "$0")/../.."

BENCH=${BENCH:-target/release/bench}
BROKER=${BROKER:-target/release/broker}
REPS=${REPS:-3}
DURATION=${DURATION:-5}
WARMUP=${WARMUP:-1}
SCENARIOS=${SCENARIOS:-fanin-q0,fanin-q1,fanout-q0,fanout-alias,shared-q1,pubsub-q1,latency-q0,latency-q1}
CONNS=${CONNS:-19000}
BROKER_CPU=${BROKER_CPU:-1}
BENCH_CPU=${BENCH_CPU:-0}
NICE=${NICE:--10}
SCHED=${SCHED:-nice}
if [[ $SCHED == fifo ]]; then prio=(chrt -f 10); else prio=(nice -n "$NICE"); fi
OUT=${OUT:-$(mktemp -d /tmp/compare-all.XXXXXX)}
mkdir -p "$OUT"

# shellcheck source=bench/scripts/lib.sh
source bench/scripts/lib.sh  # the script runs from the repo root (cd above)
need_bins "$BENCH" "$BROKER"
command -v mosquitto >/dev/null || { echo "missing mosquitto: apt-get install -y mosquitto" >&2; exit 2; }

# Foreground only: a shell function run with & is a subshell, and $! would be
# its pid, not the program's (background starts spell out nice and taskset, which
# all exec, so $! is the program's pid).
pinned() { local cpu=$1; shift; "${prio[@]}" taskset -c "$cpu" "$@"; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# start_mosquitto / start_tessera: set mport/mpid or tport/tpid.
start_mosquitto() {
    mport=$(free_port)
    printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$mport" > "$OUT/mosquitto-$mport.conf"
    chmod 755 "$OUT"; chmod 644 "$OUT/mosquitto-$mport.conf"
    "${prio[@]}" taskset -c "$BROKER_CPU" mosquitto -c "$OUT/mosquitto-$mport.conf" > "$OUT/mosquitto-$mport.log" 2>&1 &
    mpid=$!; pids+=("$mpid")
    wait_port "$mport"
}
start_tessera() {
    tport=$(free_port)
    "${prio[@]}" taskset -c "$BROKER_CPU" "$BROKER" --listen "127.0.0.1:$tport" --shards 1 \
        --data-dir "$OUT/tessera-data-$tport" > "$OUT/tessera-$tport.log" 2>&1 &
    tpid=$!; pids+=("$tpid")
    wait_port "$tport"
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) mosquitto $(mosquitto -h 2>/dev/null | head -1 | awk '{print $3}'), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# results and logs in $OUT"
start_mosquitto
start_tessera
set -x
# Exit status 1 means some run failed a check (e.g. QoS 1 loss); the table says which.
pinned "$BENCH_CPU" "$BENCH" compare \
    --a "127.0.0.1:$mport" --a-name mosquitto --a-pid "$mpid" \
    --b "127.0.0.1:$tport" --b-name tessera --b-pid "$tpid" \
    --reps "$REPS" --duration "$DURATION" --warmup "$WARMUP" --threads 1 \
    --scenarios "$SCENARIOS" --markdown --json "$@" | tee "$OUT/compare.txt" || true
# Saturation: is the broker the bottleneck, or the bench?
for side in mosquitto tessera; do
    if [[ $side == mosquitto ]]; then port=$mport pid=$mpid; else port=$tport pid=$tpid; fi
    pinned "$BENCH_CPU" "$BENCH" fanin --publishers 8 --qos 0 --duration 10 --warmup 2 \
        --threads 1 --port "$port" --broker-pid "$pid" --json | tee "$OUT/saturation-$side.txt" || true
done
{ set +x; } 2>/dev/null
stop "$mpid"; stop "$tpid"
# Idle connections, each broker fresh so its RSS growth is the connections'.
for side in mosquitto tessera; do
    if [[ $side == mosquitto ]]; then start_mosquitto; port=$mport pid=$mpid; else start_tessera; port=$tport pid=$tpid; fi
    set -x
    "${prio[@]}" taskset -c "$BENCH_CPU" "$BENCH" conn --clients "$CONNS" --rate 2000 --duration 10 \
        --bind 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 --port "$port" --broker-pid "$pid" --json \
        > "$OUT/conn-$side.txt" 2>&1 &
    { set +x; } 2>/dev/null
    bpid=$!
    # The bench's own RSS at the end of the hold, for its bytes per connection.
    sleep $(( CONNS / 2000 + 8 ))
    echo "bench VmRSS during the $side hold: $(grep VmRSS "/proc/$bpid/status" 2>/dev/null || echo gone)" | tee "$OUT/conn-$side-bench-rss.txt"
    wait "$bpid" || true
    grep -v '^bench conn: ' "$OUT/conn-$side.txt"
    stop "$pid"
done
