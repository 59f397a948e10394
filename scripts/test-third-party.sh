#!/usr/bin/env bash
# The tests that need programs beyond Rust and a C toolchain: the second test
# command beside the README's `cargo test --workspace` (`just test-third-party`;
# CI runs both). Installs what it needs (apt-get as root, npm into a temporary
# directory), then runs:
#
#   1. the cargo tests behind the `third-party` feature: bench/tests/mosquitto.rs
#      and the Mosquitto test of bench/tests/tls.rs (Mosquitto is the reference
#      broker the bench is checked against), broker/tests/bridge_mosquitto.rs
#      (bridges to Mosquitto 3.1.1 and 5), and the disk-full (a tmpfs: root) and
#      clock-jump (libfaketime) tests of broker/tests/cluster_failures.rs;
#   1b. broker/tests/cluster_faults.rs: broker nodes in network namespaces under
#      SIGSTOP (`ip`, `iptables`, `python3` for bench/scripts/nfq-delay.py; as root),
#      one scenario at a time; its kill -9 and network scenarios are #[ignore]d with
#      their reasons and run with `just chaos`;
#   2. ops/check.sh: the ops files checked by systemd-analyze, promtool,
#      haproxy and shellcheck, the live syscall check under strace, and
#      `promtool check metrics` on a live broker;
#   3. broker/scripts/interop-mqttjs.sh: MQTT.js (node) over the mqtt, mqtts, ws
#      and wss listeners;
#   4. broker/scripts/interop-quic.sh: paho-mqtt over aioquic (both pip-installed
#      into a temporary directory) against the quic listener, MQTT 3.1.1 and 5.0;
#      then mqttv5-cli (`cargo install`ed into target/third-party-tools, kept
#      there for the next run) over QUIC: single-stream, multi-stream, 0-RTT.
#
# A program that is still missing fails its step: nothing is skipped.
# Usage: scripts/test-third-party.sh   (as root, or with the packages below installed)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Debian packages and the commands they bring.
declare -A package=(
    [mosquitto]=mosquitto
    [mosquitto_pub]=mosquitto-clients
    [mosquitto_sub]=mosquitto-clients
    [systemd-analyze]=systemd
    [promtool]=prometheus
    [haproxy]=haproxy
    [shellcheck]=shellcheck
    [strace]=strace
    [openssl]=openssl
    [node]=nodejs
    [npm]=npm
    [faketime]=faketime
    [ip]=iproute2
    [iptables]=iptables
    [python3]=python3
)
need=()
for tool in "${!package[@]}"; do
    # Debian puts mosquitto in /usr/sbin, which a user's PATH may lack.
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || need+=("${package[$tool]}")
done
if ((${#need[@]})); then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    echo "test-third-party: installing ${need[*]}"
    if ((EUID != 0)); then
        echo "test-third-party: run as root, or install: apt-get install -y ${need[*]}" >&2
        exit 1
    fi
    # Package scripts must not start daemons (mosquitto, prometheus, haproxy).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
fi

step() { printf '\n=== test-third-party: %s\n' "$1"; }

step "cargo tests with --features third-party (Mosquitto, tmpfs, libfaketime)"
# The test targets that use the feature; the others already ran in the README's
# command, whose build this reuses (--workspace keeps the same dependency features).
cargo test --workspace --features tessera-bench/third-party --test mosquitto --test tls
cargo test -p tessera-broker --features third-party --test bridge_mosquitto --test cluster_failures

step "cluster fault scenarios in network namespaces (root, ip, iptables)"
# One at a time: each runs three nodes and a client load on a machine of two cores.
cargo test -p tessera-broker --features third-party --test cluster_faults -- --test-threads 1

step "broker build for the live checks"
cargo build -p tessera-broker --bin broker

step "ops/check.sh (systemd-analyze, promtool, haproxy, shellcheck, strace)"
BROKER=target/debug/broker ops/check.sh

step "MQTT.js over mqtt, mqtts, ws and wss"
broker/scripts/interop-mqttjs.sh target/debug/broker

step "mqttv5-cli (crates.io) for the QUIC interop"
# A QUIC MQTT client that is not ours. Built from source once per target
# directory; --target-dir keeps its build, so a changed version rebuilds only
# what changed. --debug: an unoptimised build is all a test client needs and
# costs about 3 CPU-minutes (measured: 167 s user + 15 s system). On one
# loaded machine a release install took 33 min with 2 jobs, --debug 19 min
# with 1 job.
MQTTV5_VERSION=0.29.10
tools=target/third-party-tools
if ! "$tools/bin/mqttv5" --version 2>/dev/null | grep -qF "$MQTTV5_VERSION"; then
    cargo install --debug mqttv5-cli --version "$MQTTV5_VERSION" --root "$tools" \
        --target-dir "$tools/build"
fi

step "paho-mqtt over aioquic, and mqttv5-cli, against the quic listener"
broker/scripts/interop-quic.sh target/debug/broker "$tools/bin/mqttv5"
