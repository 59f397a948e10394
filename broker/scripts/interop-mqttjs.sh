#!/usr/bin/env bash
# MQTT.js (the browser and Node.js client) against every listener kind:
# mqtt, mqtts, ws and wss, MQTT 3.1.1 and 5.0, a small and a 70 KB payload
# (many WebSocket frames and TLS records). Needs node and npm (installs the
# `mqtt` package into a temporary directory from the npm registry).
# Usage: broker/scripts/interop-mqttjs.sh [path/to/broker]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BROKER=${1:-target/debug/broker}
work=$(mktemp -d)
pid=
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
(cd "$work" && npm init -y >/dev/null && npm install --silent mqtt@5 >/dev/null)
cp "$here/mqttjs/roundtrip.js" "$work/"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$work/key.pem" -out "$work/cert.pem" -subj /CN=127.0.0.1 \
    -addext subjectAltName=IP:127.0.0.1 2>/dev/null
cat > "$work/tessera.toml" <<TOML
[[listener]]
kind = "mqtts"
bind = "127.0.0.1:0"
cert_file = "$work/cert.pem"
key_file = "$work/key.pem"

[[listener]]
kind = "ws"
bind = "127.0.0.1:0"

[[listener]]
kind = "wss"
bind = "127.0.0.1:0"
cert_file = "$work/cert.pem"
key_file = "$work/key.pem"
TOML
"$BROKER" --shards 2 --listen 127.0.0.1:0 --config "$work/tessera.toml" > "$work/out" 2> "$work/err" &
pid=$!
for _ in $(seq 100); do grep -q "mqtt://" "$work/out" 2>/dev/null && break; sleep 0.1; done
mapfile -t urls < <(sed -n 's/^tessera: listening //p' "$work/out")
failed=0
for url in "${urls[@]}"; do
    for version in 4 5; do
        for bytes in 5 70000; do
            (cd "$work" && node roundtrip.js "$url" "$version" "$bytes") || failed=$((failed + 1))
        done
    done
done
total=$((${#urls[@]} * 4))
echo "$((total - failed)) passed, $failed failed"
[[ $failed == 0 ]]
