#!/usr/bin/env bash
# MQTT over QUIC with third-party clients: paho-mqtt (MQTT 3.1.1 and 5.0)
# carried over aioquic streams (a second QUIC stack, not quinn) against the
# broker's `quic` listener: connect, subscribe, QoS 0/1/2 both ways with TCP
# clients, retained, the will of a dropped connection, takeover between QUIC
# and TCP (broker/scripts/quic/paho_over_aioquic.py says how). Installs both
# from PyPI with pip into a temporary directory; needs python3 and pip.
# Usage: broker/scripts/interop-quic.sh [path/to/broker]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BROKER=${1:-target/debug/broker}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip install --quiet --disable-pip-version-check --target "$work/py" \
    aioquic==1.7.2 paho-mqtt==2.2.0
PYTHONPATH="$work/py" timeout 300 python3 "$here/quic/paho_over_aioquic.py" "$BROKER"
