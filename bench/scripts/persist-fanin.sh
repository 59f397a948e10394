#!/usr/bin/env bash
# One persistence benchmark run: starts a broker (Tessera with
# persistence.durability = MODE, or Mosquitto), counts the fdatasync/fsync
# calls it makes during `bench fanin BENCH_ARGS...` with strace, prints the
# bench's rate/accounting/latency lines and the fsyncs per second.
#
# usage: bench/scripts/persist-fanin.sh sync|batched|memory|mosquitto PORT BENCH_ARGS...
# e.g.:  bench/scripts/persist-fanin.sh sync 19101 --qos 1 --persistent --publishers 8 \
#            --rate 5000 --duration 8 --warmup 2
# Needs release builds of broker and bench (target/release), strace, mosquitto.
set -euo pipefail
mode=$1
port=$2
shift 2
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/target/release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [[ $mode == mosquitto ]]; then
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000\nmax_inflight_messages 32\n' \
        "$port" >"$work/mosquitto.conf"
    mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
else
    TESSERA_PERSISTENCE__DURABILITY=$mode "$bin/broker" --listen "127.0.0.1:$port" --shards 2 \
        --data-dir "$work/data" >/dev/null 2>&1 &
fi
pid=$!
sleep 1
strace -f --seccomp-bpf -e trace=fdatasync,fsync -c -o "$work/strace.txt" -p "$pid" 2>/dev/null &
spid=$!
sleep 0.3
t0=$(date +%s.%N)
"$bin/bench" fanin --port "$port" "$@" 2>&1 | grep -E '^  (rate|accounting|latency)' || true
t1=$(date +%s.%N)
kill -INT "$spid" 2>/dev/null || true
wait "$spid" 2>/dev/null || true
kill "$pid"
wait "$pid" 2>/dev/null || true
syncs=$(awk '$NF ~ /^f(data)?sync$/ {s += $4} END {print s + 0}' "$work/strace.txt")
echo "$mode: $syncs fsync/fdatasync calls in $(echo "$t1 - $t0" | bc) s"
