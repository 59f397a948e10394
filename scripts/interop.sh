#!/usr/bin/env bash
# Runs the Eclipse Paho MQTT interoperability suite against a fresh release
# broker on a free loopback port.
#
# usage: scripts/interop.sh PAHO_DIR [311|5]
#
#   PAHO_DIR  a checkout of https://github.com/eclipse/paho.mqtt.testing (its
#             root or its interoperability/ directory); nothing of it is copied.
#   311       interoperability/client_test.py (MQTT 3.1.1, the default)
#   5         interoperability/client_test5.py (MQTT 5.0)
#
# The broker starts with `--listen 127.0.0.1:0 --shards $INTEROP_SHARDS`
# (default 2) and TESSERA_LIMITS__MAX_KEEP_ALIVE_S=60 (v5
# test_server_keep_alive expects a Server Keep Alive of 60 for a client asking
# 120); any other TESSERA_* variable of the caller is dropped so runs are
# reproducible. test_subscribe_failure needs a refused subscription: the
# broker runs with an ACL file denying subscriptions to test/nosubscribe
# (TESSERA_AUTH__ACL_FILE, everything else allowed) and
# TESSERA_AUTH__SUBSCRIBE_DENIED_CODE=128, because both suites assert 0x80 for
# the refusal (the 5.0 suite too, where Tessera's default is 0x87 Not
# authorized). INTEROP_SKIP names tests to skip, separated by spaces. The suite is killed after INTEROP_TIMEOUT seconds (default 900).
# Exit status: the suite's (0 when every test run passed).
#
# Why a driver instead of `python3 client_test.py --port N`: client_test.py
# hands its whole command line to unittest.main() after reading --port, and
# unittest rejects the option; and both suites only understand their own
# options, so unittest's -k cannot reach it. The driver below sets the suite's
# options itself, then calls unittest with the test names to run.
set -euo pipefail

usage() {
    echo "usage: $0 PAHO_DIR [311|5]" >&2
    exit 2
}
[[ $# -ge 1 && $# -le 2 ]] || usage
version=${2:-311}
case $version in
    311) suite=client_test.py ;;
    5) suite=client_test5.py ;;
    *) usage ;;
esac
[[ -d $1 ]] || { echo "interop: $1 is not a directory" >&2; exit 2; }
paho=$(cd "$1" && pwd)
[[ -f $paho/$suite ]] || paho=$paho/interoperability
[[ -f $paho/$suite ]] || { echo "interop: no interoperability/$suite under $1" >&2; exit 2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
cargo build --release -p tessera-broker --bin broker
broker_bin=${CARGO_TARGET_DIR:-$root/target}/release/broker

while IFS= read -r name; do
    unset "$name"
done < <(compgen -e | grep '^TESSERA_' || true)

work=$(mktemp -d)
broker_pid=
stop_broker() {
    if [[ -n $broker_pid ]] && kill -0 "$broker_pid" 2>/dev/null; then
        kill -TERM "$broker_pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$broker_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
    fi
    broker_pid=
    rm -rf "$work"
}
trap stop_broker EXIT
trap 'exit 130' INT TERM

printf 'default allow\ndeny subscribe test/nosubscribe\n' >"$work/acl"
TESSERA_LIMITS__MAX_KEEP_ALIVE_S=60 TESSERA_AUTH__ACL_FILE="$work/acl" \
    TESSERA_AUTH__SUBSCRIBE_DENIED_CODE=128 "$broker_bin" \
    --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --shards "${INTEROP_SHARDS:-2}" \
    >"$work/stdout" 2>"$work/stderr" &
broker_pid=$!

addr=
for _ in $(seq 100); do
    addr=$(sed -n 's|^tessera: listening mqtt://||p' "$work/stdout" | head -n 1)
    [[ -n $addr ]] && break
    if ! kill -0 "$broker_pid" 2>/dev/null; then
        break
    fi
    sleep 0.1
done
if [[ -z $addr ]]; then
    echo "interop: the broker did not start; its output:" >&2
    cat "$work/stdout" "$work/stderr" >&2
    exit 1
fi
host=${addr%:*}
port=${addr##*:}
echo "interop: MQTT $version suite $paho/$suite against $addr (broker pid $broker_pid)"

cd "$paho"
status=0
# shellcheck disable=SC2086 # INTEROP_SKIP is a list of names.
timeout "${INTEROP_TIMEOUT:-900}" python3 - "$paho/$suite" "$host" "$port" \
    ${INTEROP_SKIP:-} <<'EOF' || status=$?
import os, runpy, sys, unittest

script, host, port, *skip = sys.argv[1:]
real_main = unittest.main

def main(*args, **kwargs):
    # Called by the suite's __main__ block once its options are parsed.
    test = sys.modules["__main__"].Test
    names = unittest.TestLoader().getTestCaseNames(test)
    kwargs["argv"] = [script, "-v"] + ["Test." + n for n in names if n not in skip]
    return real_main(*args, **kwargs)

unittest.main = main
sys.path.insert(0, os.path.dirname(script))
sys.argv = [script, "--hostname", host, "--port", port]
runpy.run_path(script, run_name="__main__")
EOF
if [[ $status -eq 124 ]]; then
    echo "interop: the suite did not finish within ${INTEROP_TIMEOUT:-900} s" >&2
fi
exit "$status"
