#!/usr/bin/env bash
# Idle CPU of CLIENTS idle connections (issue 20: what the shard tick costs
# per idle connection): starts Tessera (one shard) and Mosquitto, both pinned
# to CPU 1, holds CLIENTS idle connections to each from two bench processes
# pinned to CPU 0 (opened at RATE per second each), waits until both brokers
# hold them all plus SETTLE seconds (connections park), then reads each
# broker's utime+stime from /proc/PID/stat over WINDOW seconds and prints the
# CPU each used, in per cent of one core, and the ratio.
#
# usage: bench/scripts/idle-cpu.sh CLIENTS RATE KEEPALIVE_S
# e.g.:  flock -x /work/coord/cpu.lock bench/scripts/idle-cpu.sh 19000 2000 60
# Clients ping at half the keep alive (bench `conn`), so KEEPALIVE_S 60 is 633
# PINGREQ/s per broker at 19,000 connections; 600 sends none in the window.
# Needs release builds (cargo build --release -p tessera-broker -p tessera-bench)
# and mosquitto. Environment: BROKER (another Tessera binary, default
# target/release/broker), BENCH (default target/release/bench), SETTLE (10),
# WINDOW (60), MIN_HELD_PCT (98), TESSERA_PORT and MOSQUITTO_PORT (default: free ports on 127.0.0.1).
set -euo pipefail
clients=$1
rate=$2
keep_alive=$3
settle=${SETTLE:-10}
window=${WINDOW:-60}
root=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=bench/scripts/lib.sh
source "$root/bench/scripts/lib.sh"
broker=${BROKER:-$root/target/release/broker}
bench=${BENCH:-$root/target/release/bench}
need_bins "$broker" "$bench"
command -v mosquitto >/dev/null || { echo "missing mosquitto (apt-get install mosquitto)" >&2; exit 2; }
work=$(mktemp -d)
pids=()
trap cleanup_pids_and_work EXIT
tport=${TESSERA_PORT:-$(free_port)}
mport=${MOSQUITTO_PORT:-$(free_port)}
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_connections -1\n' "$mport" >"$work/mosquitto.conf"
taskset -c 1 mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
mpid=$!
pids+=("$mpid")
taskset -c 1 "$broker" --listen "127.0.0.1:$tport" --shards 1 --admin-listen 127.0.0.1:0 \
    --data-dir "$work/data" >"$work/broker.log" 2>&1 &
tpid=$!
pids+=("$tpid")
wait_port "$tport"
wait_port "$mport"
hold=$((clients / rate + 30 + settle + window))
for port in "$tport" "$mport"; do
    taskset -c 0 "$bench" conn --clients "$clients" --rate "$rate" --duration "$hold" \
        --keep-alive "$keep_alive" --bind 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 \
        --port "$port" --json >"$work/bench-$port.json" 2>"$work/bench-$port.err" &
    pids+=("$!")
done
fds() { find "/proc/$1/fd" -maxdepth 1 2>/dev/null | wc -l; }
# A connect that fails (a full accept queue under the opening rate) is not
# retried by `bench conn`: past the deadline the window runs with what both
# brokers hold if that is at least MIN_HELD_PCT per cent of CLIENTS (the
# figures print the fds held), else the run fails.
min_held=$((clients * ${MIN_HELD_PCT:-98} / 100))
deadline=$((SECONDS + clients / rate + 30))
while (($(fds "$tpid") < clients || $(fds "$mpid") < clients)); do
    if ((SECONDS >= deadline)); then
        if (($(fds "$tpid") >= min_held && $(fds "$mpid") >= min_held)); then
            echo "brokers hold $(fds "$tpid") / $(fds "$mpid") fds, not $clients: measuring with those" >&2
            break
        fi
        echo "brokers hold $(fds "$tpid") / $(fds "$mpid") fds, not $clients" >&2
        tail -n 3 "$work"/bench-*.err >&2 || true
        exit 1
    fi
    sleep 1
done
sleep "$settle"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
t0=$(ticks "$tpid")
m0=$(ticks "$mpid")
sleep "$window"
t1=$(ticks "$tpid")
m1=$(ticks "$mpid")
held_t=$(fds "$tpid")
held_m=$(fds "$mpid")
hz=$(getconf CLK_TCK)
python3 - "$t0" "$t1" "$m0" "$m1" "$hz" "$window" "$clients" "$keep_alive" "$held_t" "$held_m" <<'EOF'
import sys
t0, t1, m0, m1, hz, window, clients, ka, ht, hm = map(int, sys.argv[1:])
t = (t1 - t0) / hz / window * 100
m = (m1 - m0) / hz / window * 100
ratio = f"{t / m:.2f}" if m > 0 else "n/a"
print(f"{clients} idle connections, keep alive {ka} s, {window} s window: "
      f"Tessera {t:.3f} % of a core ({t1 - t0} ticks, {ht} fds), "
      f"Mosquitto {m:.3f} % ({m1 - m0} ticks, {hm} fds), ratio {ratio}")
EOF
