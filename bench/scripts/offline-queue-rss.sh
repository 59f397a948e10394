#!/usr/bin/env bash
# Offline queue memory: a persistent 3.1.1 session subscribes at QoS 1 and
# goes offline; mosquitto_pub then publishes COUNT QoS 1 messages of 100
# bytes to it, in STEPS rounds. After each round the script prints the
# broker's RSS (VmRSS), the queue gauges of /metrics and the data directory's
# size; at the end the subscriber comes back and the messages it got are
# counted. A measurement, not a test.
#
# mosquitto: Mosquitto with max_queued_messages 0 (no limit) and no
# persistence, the peer: it keeps every queued message in memory.
#
# usage: bench/scripts/offline-queue-rss.sh sync|batched|memory|mosquitto PORT ADMIN_PORT [COUNT] [STEPS]
# e.g.:  bench/scripts/offline-queue-rss.sh sync 22001 22002 200000 4
# Needs a release build of the broker (target/release/broker) and mosquitto-clients.
set -euo pipefail
mode=$1
port=$2
admin=$3
count=${4:-200000}
steps=${5:-4}
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
if [[ $mode == mosquitto ]]; then
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 32\n' \
        "$port" >"$work/mosquitto.conf"
    mosquitto -c "$work/mosquitto.conf" >"$work/log" 2>&1 &
else
    TESSERA_PERSISTENCE__DURABILITY=$mode "$root/target/release/broker" --listen "127.0.0.1:$port" \
        --admin-listen "127.0.0.1:$admin" --shards 1 --data-dir "$work/data" >"$work/log" 2>&1 &
fi
pid=$!
sleep 1
# RssAnon is the process's own memory; RssFile is mostly LMDB's map (page
# cache of the data file, which the kernel can reclaim).
rss() { awk '/^(VmRSS|RssAnon|RssFile)/ {printf "%s %s kB ", $1, $2}' "/proc/$pid/status"; }
gauges() {
    [[ $mode == mosquitto ]] && return 0
    curl -s "http://127.0.0.1:$admin/metrics" |
        awk '/^tessera_queue_bytes/ {printf "%s=%s ", $1, $2} /^tessera_queue_depth/ {printf "depth=%s ", $2}'
}
mosquitto_sub -p "$port" -i qrss-sub -c -q 1 -t qrss/t -W 1 >/dev/null 2>&1 || true
echo "$mode: idle with the offline session: RSS $(rss)"
per=$((count / steps))
line=$(printf '%0100d' 0)
for step in $(seq 1 "$steps"); do
    awk -v n="$per" -v l="$line" 'BEGIN { for (i = 0; i < n; i++) print l }' |
        mosquitto_pub -p "$port" -i qrss-pub -q 1 -t qrss/t -l
    du_kb=$(du -sk "$work/data" 2>/dev/null | cut -f1 || echo 0)
    echo "$mode: $((step * per)) queued: RSS $(rss); $(gauges)data_dir ${du_kb:-0} kB"
done
got=$(timeout 120 mosquitto_sub -p "$port" -i qrss-sub -c -q 1 -t qrss/t -C "$count" -W 100 | wc -l)
echo "$mode: the subscriber came back and received $got of $count; RSS $(rss)"
