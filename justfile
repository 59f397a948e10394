# Tessera task runner. Install just with `pip install rust-just` (seconds) or
# `cargo install just` (minutes).

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Run the whole test suite (the same command as README and CI): needs only
# the Rust toolchain and a C toolchain (gcc, make).
test:
    cargo test --workspace

# The tests that need third-party programs (Mosquitto, promtool, systemd-analyze,
# haproxy, shellcheck, strace, MQTT.js): installs them with apt-get and npm, then
# runs the `third-party` cargo tests, ops/check.sh and the MQTT.js interop.
test-third-party:
    scripts/test-third-party.sh

# The cluster fault scenarios (broker/tests/cluster_faults.rs: nodes in network
# namespaces under kill -9, SIGSTOP, partitions, loss and delay) for SECONDS each
# instead of CI's 30, ignored ones included; CHAOS_SEED=N replays a fault schedule.
# Needs root, ip, iptables and python3.
chaos SECONDS="120":
    CHAOS_SECONDS={{SECONDS}} cargo test -p tessera-broker --features third-party --test cluster_faults -- --nocapture --test-threads 1 --include-ignored

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy -p tessera-bench --all-targets --features third-party -- -D warnings

# Run every fuzz target of the codec for FUZZ_SECONDS each (needs cargo-fuzz;
# the stable toolchain runs it with RUSTC_BOOTSTRAP=1).
fuzz FUZZ_SECONDS="60":
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
    cd proto && for t in $(RUSTC_BOOTSTRAP=1 cargo fuzz list); do \
        RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" -- -max_total_time={{FUZZ_SECONDS}}; \
    done

# Build the fuzz targets without running them (what CI does).
fuzz-build:
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
    cd proto && RUSTC_BOOTSTRAP=1 cargo fuzz build

# Codec micro-benchmarks (criterion) and the allocation report.
bench-proto:
    cargo bench -p tessera-proto --bench codec -- --measurement-time 3
    cargo run --release -p tessera-proto --example alloc_report

# Check ops/ and kernel-tuning/ with the real tools (see ops/README.md for the packages).
check-ops:
    cargo build -p tessera-broker --bin broker
    ops/check.sh

# PAHO_DIR is a checkout of github.com/eclipse/paho.mqtt.testing; see
# scripts/interop.sh for the broker settings and the tests skipped.
# Run the Paho interoperability suite (VERSION 311 or 5) against a fresh broker.
interop PAHO_DIR VERSION="311":
    cd "{{invocation_directory()}}" && "{{justfile_directory()}}/scripts/interop.sh" "{{PAHO_DIR}}" "{{VERSION}}"

# MQTT.js over mqtt, mqtts, ws and wss (needs node and npm).
interop-mqttjs:
    cargo build -p tessera-broker --bin broker
    broker/scripts/interop-mqttjs.sh target/debug/broker

# paho-mqtt over aioquic streams against the quic listener (pip-installs both).
interop-quic:
    cargo build -p tessera-broker --bin broker
    broker/scripts/interop-quic.sh target/debug/broker

# TLS handshakes/s and QoS 0 fan-in over TLS and TCP, against Mosquitto.
bench-tls:
    cargo build --release -p tessera-broker --bin broker
    broker/scripts/bench-tls.sh target/release/broker

# Start N cluster nodes on this machine (MQTT 127.0.0.1:1883.., admin :18083..,
# cluster :7000..; data and logs under ./data/cluster/), wait for a leader.
run-cluster N="3":
    scripts/cluster.sh run {{N}}

# Stop the local cluster gracefully.
stop-cluster:
    scripts/cluster.sh stop

# The local cluster's members, roles and indexes (brokerctl cluster status).
cluster-status:
    scripts/cluster.sh status
