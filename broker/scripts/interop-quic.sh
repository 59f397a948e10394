#!/usr/bin/env bash
# MQTT over QUIC with third-party clients: paho-mqtt (MQTT 3.1.1 and 5.0)
# carried over aioquic streams (a second QUIC stack, not quinn) against the
# broker's `quic` listener: connect, subscribe, QoS 0/1/2 both ways with TCP
# clients, retained, the will of a dropped connection, takeover between QUIC
# and TCP (broker/scripts/quic/paho_over_aioquic.py says how). Installs both
# from PyPI with pip into a temporary directory; needs python3 and pip.
# Then, given the `mqttv5` binary of mqttv5-cli (crates.io), that client over
# QUIC in single-stream, multi-stream and 0-RTT mode, QoS 0/1/2 both ways
# with a TCP client (broker/scripts/quic/mqttv5_cli.py).
# Usage: broker/scripts/interop-quic.sh [path/to/broker] [path/to/mqttv5]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BROKER=${1:-target/debug/broker}
MQTTV5=${2:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip install --quiet --disable-pip-version-check --target "$work/py" \
    aioquic==1.7.2 paho-mqtt==2.2.0
PYTHONPATH="$work/py" timeout 300 python3 "$here/quic/paho_over_aioquic.py" "$BROKER"
if [[ -n $MQTTV5 ]]; then
    PYTHONPATH="$work/py:$here/quic" timeout 300 python3 "$here/quic/mqttv5_cli.py" "$MQTTV5" "$BROKER"
fi
