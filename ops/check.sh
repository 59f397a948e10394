#!/usr/bin/env bash
# Checks the deployment files with the tools that will consume them, and two
# claims against a real broker. CI runs it after `cargo test` (which builds the
# broker). Every check runs; a missing tool is a failure, never a skip.
#
#   lint              shellcheck on kernel-tuning/apply.sh, ops/check.sh and
#                     scripts/test-third-party.sh
#   systemd-analyze   verify ops/systemd/tessera.service
#   promtool          check config, check rules, test rules (alerts_test.yml), and
#                     every Grafana dashboard query parses as PromQL
#   haproxy -c        ops/haproxy/haproxy.cfg
#   contract          every metric name the alerts and dashboard use is in the
#                     contract table of ops/README.md
#   syscalls (live)   a broker traced with strace while it boots, serves MQTT
#                     QoS 1 and shuts down makes no system call outside the
#                     unit's SystemCallFilter=
#   metrics (live)    the traced broker's /metrics passes `promtool check
#                     metrics` and exports every name of the contract but
#                     the cluster and bridge names (tessera_cluster_*,
#                     tessera_bridge_*: tests/bridge.rs checks those)
#   cluster (live)    a two-node cluster elects a leader; its /metrics passes
#                     promtool and exports every cluster name of the contract
#   routing (live)    haproxy.cfg in front of two brokers sends each ClientID
#                     prefix to its node, for MQTT 3.1, 3.1.1 and 5.0 clients
#
# Usage: ops/check.sh            (BROKER=path/to/broker to test another build)
# Needs python3 and the packages in $APT below.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BROKER=${BROKER:-target/debug/broker}
BROKERCTL=${BROKERCTL:-$(dirname "$BROKER")/brokerctl}
APT="apt-get install -y --no-install-recommends systemd prometheus haproxy shellcheck strace mosquitto-clients"

missing=()
for tool in shellcheck systemd-analyze promtool haproxy strace mosquitto_pub mosquitto_sub python3; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "ops/check.sh: missing ${missing[*]}; install with: $APT" >&2
    exit 1
fi
if [[ ! -x $BROKER || ! -x $BROKERCTL ]]; then
    echo "ops/check.sh: no broker binary at $BROKER; build it with" \
        "'cargo build -p tessera-broker --bin broker' or set BROKER=" >&2
    exit 1
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

step() { printf '\n=== %s\n' "$1"; }
fail() {
    echo "FAILED: $1" >&2
    exit 1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_broker NAME ARGS...: starts the broker (through a wrapper command such
# as strace if ARGS begins with one), waits for its listening line and sets
# $port. Its output goes to $tmp/NAME.out.
start_broker() {
    local name=$1 i
    shift
    # Create the log first: the loop below may read it before the process runs.
    : >"$tmp/$name.out"
    "$@" >"$tmp/$name.out" 2>&1 &
    pids+=($!)
    for ((i = 0; i < 200; i++)); do
        port=$(sed -n 's|^tessera: listening mqtt://127\.0\.0\.1:\([0-9]*\)$|\1|p' "$tmp/$name.out")
        [[ -n $port ]] && return 0
        sleep 0.05
    done
    cat "$tmp/$name.out" >&2
    fail "broker $name did not start"
}

step "shellcheck"
shellcheck kernel-tuning/apply.sh ops/check.sh scripts/test-third-party.sh scripts/cluster.sh
echo ok

step "systemd-analyze verify ops/systemd/tessera.service"
# verify checks that ExecStart= is executable; point it at a stand-in with the
# same name, in a copy of the unit, so the check needs no installed broker.
mkdir -p "$tmp/unit"
printf '#!/bin/sh\nexit 0\n' >"$tmp/unit/broker"
chmod +x "$tmp/unit/broker"
sed "s|^ExecStart=/usr/local/bin/broker |ExecStart=$tmp/unit/broker |" \
    ops/systemd/tessera.service >"$tmp/unit/tessera.service"
grep -q "^ExecStart=$tmp/unit/broker " "$tmp/unit/tessera.service" ||
    fail "ExecStart= no longer starts with /usr/local/bin/broker; update ops/check.sh"
systemd-analyze verify --man=no "$tmp/unit/tessera.service"
echo ok

step "promtool"
promtool check config ops/prometheus/prometheus.yml
promtool check rules ops/prometheus/alerts.yml
promtool test rules ops/prometheus/alerts_test.yml

step "Grafana dashboard: JSON, and every query parses as PromQL"
# JSON is YAML, so the queries become a rules file promtool can parse.
python3 - ops/grafana/tessera.json "$tmp/dashboard-rules.yml" <<'EOF'
import json, sys
dash = json.load(open(sys.argv[1]))
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
assert exprs, "no queries"
subst = {"$__rate_interval": "5m", "$job": "tessera", "$instance": ".*"}
rules = []
for i, e in enumerate(exprs):
    for k, v in subst.items():
        e = e.replace(k, v)
    rules.append({"record": f"dashboard:query{i}", "expr": e})
json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"{len(exprs)} queries in {len(dash['panels'])} panels")
EOF
promtool check rules "$tmp/dashboard-rules.yml"

step "haproxy -c -f ops/haproxy/haproxy.cfg"
haproxy -c -f ops/haproxy/haproxy.cfg

step "metric names used are in the ops/README.md contract"
python3 - <<'EOF'
import re, sys
contract = set(re.findall(r"^\| `((?:tessera|process)_[a-z_]+)`", open("ops/README.md").read(), re.M))
assert len(contract) > 10, f"contract table not found ({len(contract)} names)"
used = {}
for f in ["ops/prometheus/alerts.yml", "ops/prometheus/alerts_test.yml", "ops/grafana/tessera.json"]:
    for name in re.findall(r"\b((?:tessera|process)_[a-z_]+)", open(f).read()):
        used.setdefault(re.sub(r"_(bucket|sum|count)$", "", name), set()).add(f)
unknown = {n: fs for n, fs in used.items() if n not in contract}
for n, fs in sorted(unknown.items()):
    print(f"not in the contract: {n} (used in {', '.join(sorted(fs))})", file=sys.stderr)
print(f"{len(used)} names used, {len(contract)} in the contract")
sys.exit(1 if unknown else 0)
EOF

step "live: the broker's system calls stay within the unit's SystemCallFilter="
# expand NAME: a system call, or every call of a @group, recursively.
expand() {
    if [[ $1 != @* ]]; then
        echo "$1"
        return
    fi
    local member
    systemd-analyze syscall-filter "$1" 2>/dev/null | tail -n +2 | while read -r member _; do
        [[ -z $member || $member == \#* ]] && continue
        expand "$member"
    done
}
: >"$tmp/allowed"
: >"$tmp/denied"
while IFS= read -r line; do
    list=${line#SystemCallFilter=}
    target=$tmp/allowed
    if [[ $list == ~* ]]; then
        target=$tmp/denied
        list=${list#\~}
    fi
    for item in $list; do
        expand "$item" >>"$target"
    done
done < <(grep '^SystemCallFilter=' ops/systemd/tessera.service)
sort -u "$tmp/allowed" >"$tmp/allowed.sorted"
sort -u "$tmp/denied" >"$tmp/denied.sorted"
start_broker traced strace -f -qq -o "$tmp/trace" "$BROKER" \
    --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --shards 2 --data-dir "$tmp/traced-data"
strace_pid=${pids[-1]}
admin=$(sed -n 's|^tessera: admin http://\(.*\)$|\1|p' "$tmp/traced.out")
[[ -n $admin ]] || fail "the broker printed no admin address"
mosquitto_sub -p "$port" -t 'check/#' -q 1 -C 1 -W 10 -i check-sub >"$tmp/sub.out" &
sub=$!
sleep 0.5
mosquitto_pub -p "$port" -t check/syscalls -q 1 -m traced -i check-pub
wait "$sub" || fail "the subscriber got nothing from the traced broker"
# The admin thread's system calls (accept, read, write, thread start) are
# traced too: scrape /metrics and check it while the trace runs.
python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
    "http://$admin/metrics" >"$tmp/metrics.txt" || fail "GET /metrics failed"
broker_pid=$(ps -o pid= --ppid "$strace_pid" | tr -d ' ')
[[ -n $broker_pid ]] || fail "cannot find the traced broker's pid"
kill -TERM "$broker_pid"
wait "$strace_pid" || fail "the traced broker did not stop cleanly on SIGTERM"
sed -E 's/^[0-9]+ +//' "$tmp/trace" | grep -oE '^[a-z_0-9]+\(' | tr -d '(' | sort -u >"$tmp/used"
outside=$(comm -23 "$tmp/used" "$tmp/allowed.sorted")
denied=$(comm -12 "$tmp/used" "$tmp/denied.sorted")
echo "$(wc -l <"$tmp/used") distinct system calls, $(wc -l <"$tmp/allowed.sorted") allowed"
[[ -z $outside ]] || fail "system calls outside the filter: $outside"
[[ -z $denied ]] || fail "system calls the filter removes: $denied"
echo ok

step "live: /metrics passes promtool and exports every name in the contract"
promtool check metrics <"$tmp/metrics.txt"
python3 - "$tmp/metrics.txt" <<'EOF'
import re, sys
contract = set(re.findall(r"^\| `((?:tessera|process)_[a-z_]+)`", open("ops/README.md").read(), re.M))
# A single node exports no cluster metrics; the cluster step checks those (and the
# certificate gauge: this node has no TLS listener, a cluster node has its link's).
contract = {n for n in contract if not n.startswith(("tessera_cluster_", "tessera_bridge_", "tessera_certificate_"))}
exported = set(re.findall(r"^# TYPE ([a-z_]+) ", open(sys.argv[1]).read(), re.M))
missing = sorted(contract - exported)
for name in missing:
    print(f"not exported: {name}", file=sys.stderr)
print(f"{len(contract)} names in the contract, {len(exported)} exported")
sys.exit(1 if missing else 0)
EOF

step "live: a two-node cluster exports every cluster name of the contract"
"$BROKERCTL" cluster certs --out "$tmp/certs" --nodes 2 >/dev/null
udp_port() {
    python3 -c 'import socket; s = socket.socket(type=socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
c1=127.0.0.1:$(udp_port)
c2=127.0.0.1:$(udp_port)
for n in 1 2; do
    listen=$c1
    [[ $n == 2 ]] && listen=$c2
    start_broker "cluster-$n" "$BROKER" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
        --shards 1 --data-dir "$tmp/cluster-$n" --node-id "$n" --cluster-listen "$listen" \
        --cluster-peers "1=$c1,2=$c2" --cluster-certs "$tmp/certs"
done
admin=$(sed -n 's|^tessera: admin http://\(.*\)$|\1|p' "$tmp/cluster-1.out")
for ((i = 0; i < 100; i++)); do
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "http://$admin/ready" 2>/dev/null && break
    sleep 0.2
done
python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' \
    "http://$admin/metrics" >"$tmp/cluster-metrics.txt" || fail "GET /metrics of the cluster node failed"
promtool check metrics <"$tmp/cluster-metrics.txt"
python3 - "$tmp/cluster-metrics.txt" <<'EOF'
import re, sys
contract = set(re.findall(r"^\| `(tessera_cluster_[a-z_]+)`", open("ops/README.md").read(), re.M))
text = open(sys.argv[1]).read()
exported = set(re.findall(r"^# TYPE ([a-z_]+) ", text, re.M))
missing = sorted(contract - exported)
for name in missing:
    print(f"not exported: {name}", file=sys.stderr)
assert re.search(r"^tessera_cluster_has_leader 1$", text, re.M), "the cluster has no leader"
assert re.search(r'^tessera_cluster_peer_reachable\{peer="2"\} 1$', text, re.M), "node 2 unreachable"
# brokerctl cluster certs makes certificates valid until 2125-01-01.
assert re.search(r'^tessera_certificate_expiry_timestamp_seconds\{certificate="cluster"\} 4891363200$', text, re.M), "no cluster certificate expiry"
print(f"{len(contract)} cluster names in the contract, {len(missing)} missing")
sys.exit(1 if missing else 0)
EOF

step "live: haproxy.cfg routes each ClientID prefix to its node"
start_broker node-a "$BROKER" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --shards 1 --data-dir "$tmp/a"
port_a=$port
start_broker node-b "$BROKER" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --shards 1 --data-dir "$tmp/b"
port_b=$port
proxy_port=$(free_port)
# node1 and node2 (fleet a) are broker A, node3 (fleet b) is broker B. maxconn
# is lowered so HAProxy starts within a test runner's open-files limit.
sed -e "s|^    bind :1883\$|    bind 127.0.0.1:$proxy_port|" \
    -e "s|10\.0\.0\.1[12]:1883|127.0.0.1:$port_a|" \
    -e "s|10\.0\.0\.13:1883|127.0.0.1:$port_b|" \
    -e 's|^    maxconn 500000$|    maxconn 1000|' \
    ops/haproxy/haproxy.cfg >"$tmp/haproxy.cfg"
[[ $(grep -c "127.0.0.1:" "$tmp/haproxy.cfg") == 7 ]] ||
    fail "haproxy.cfg layout changed (bind and six servers expected); update ops/check.sh"
haproxy -f "$tmp/haproxy.cfg" -db >"$tmp/haproxy.out" 2>&1 &
pids+=($!)
for ((i = 0; i < 100; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$proxy_port") 2>/dev/null && break
    sleep 0.05
done
mosquitto_sub -p "$port_a" -t 'route/#' -v -C 3 -W 10 >"$tmp/node-a.msgs" &
sub_a=$!
mosquitto_sub -p "$port_b" -t 'route/#' -v -C 1 -W 10 >"$tmp/node-b.msgs" &
sub_b=$!
sleep 0.5
for v in mqttv31 mqttv311 mqttv5; do
    mosquitto_pub -p "$proxy_port" -V "$v" -i "fleet-a-$v" -t route/a -m "$v"
done
mosquitto_pub -p "$proxy_port" -V mqttv311 -i fleet-b-1 -t route/b -m mqttv311
wait "$sub_a" || fail "node A did not get fleet a's 3 messages: $(cat "$tmp/node-a.msgs")"
wait "$sub_b" || fail "node B did not get fleet b's message: $(cat "$tmp/node-b.msgs")"
[[ $(sort "$tmp/node-a.msgs" | tr '\n' ' ') == "route/a mqttv31 route/a mqttv311 route/a mqttv5 " ]] ||
    fail "node A got: $(cat "$tmp/node-a.msgs")"
[[ $(cat "$tmp/node-b.msgs") == "route/b mqttv311" ]] || fail "node B got: $(cat "$tmp/node-b.msgs")"
echo ok

printf '\nops/check.sh: all checks passed\n'
