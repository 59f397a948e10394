#!/usr/bin/env bash
# Three etcd 3.4 members on loopback (fsync on, the default), then session claims as
# create-if-absent transactions (etcd_claims.py). Needs Debian's etcd-server.
# Usage: raft/scripts/etcd-claims.sh [OPS] [THREADS] [BASE_PORT]
set -euo pipefail
ops=${1:-5000}; threads=${2:-64}; base=${3:-24379}
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d "${TMPDIR:-$PWD}/etcd-bench.XXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
cluster=""
for i in 1 2 3; do
  cluster+="m$i=http://127.0.0.1:$((base + 2 * i - 1)),"
done
cluster=${cluster%,}
endpoints=""
for i in 1 2 3; do
  c=$((base + 2 * i - 2)); p=$((base + 2 * i - 1))
  etcd --name "m$i" --data-dir "$dir/m$i" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$cluster" --initial-cluster-state new --log-level error \
    > "$dir/m$i.log" 2>&1 &
  pids+=($!)
  endpoints+="127.0.0.1:$c,"
done
endpoints=${endpoints%,}
for _ in $(seq 100); do
  ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done
python3 "$here/etcd_claims.py" "$ops" "$threads" "$endpoints"
