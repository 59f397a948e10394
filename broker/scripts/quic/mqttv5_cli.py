"""MQTT over QUIC interop: the `mqttv5` command line (crate mqttv5-cli) against Tessera.

Goal: a QUIC MQTT client that is not ours, mqttv5-cli's `pub` and `sub`
(`--url quic://`, MQTT 5.0), exchanges messages both ways with a TCP client
at QoS 0, 1 and 2 in each mode issue 18 names: single stream (the default),
multi-stream (`--quic-stream-strategy per-topic`: its packets on data
streams) and 0-RTT allowed (`--quic-early-data`, against a listener with
`zero_rtt = true`).

Method: one broker with a plain listener and two `quic` listeners (the second
with 0-RTT on). For each mode and QoS: a paho-mqtt TCP subscriber, then
`mqttv5 pub` over QUIC, and the message must arrive at that QoS; then
`mqttv5 sub --count 1 --show-properties` over QUIC, the TCP client publishes
once the CLI printed its SUBACK line, and the CLI must print the payload at
that QoS and exit 0. Every wait is bounded.

What it does not show: that 0-RTT data was actually sent. A fresh `mqttv5`
process has no session ticket, so with `--quic-early-data` it logs "no
session ticket available, falling back to 1-RTT" and connects in one round
trip; this checks that the flag works against a 0-RTT listener. The 0-RTT path
itself (a CONNECT in early data, served only after the handshake) is tested
in broker/tests/quic.rs with quinn.

Usage: python3 mqttv5_cli.py PATH/TO/mqttv5 PATH/TO/broker
Exit status 0 when every check passed.
"""

import os
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt

from paho_over_aioquic import STEP, Client, Env, make_certs

MODES = {
    "single-stream": [],
    "multi-stream": ["--quic-stream-strategy", "per-topic"],
    "0-RTT allowed": ["--quic-early-data"],
}


def start_broker(binary, work, certs):
    """The broker with a plain listener and two quic listeners, the second
    with 0-RTT; returns the process, the plain address and the quic URLs in
    listener order."""
    config = os.path.join(work, "tessera.toml")
    tls = f'cert_file = "{certs["server.pem"]}"\nkey_file = "{certs["server.key"]}"\n'
    with open(config, "w") as f:
        f.write('[[listener]]\nkind = "quic"\nbind = "127.0.0.1:0"\n' + tls)
        f.write('\n[[listener]]\nkind = "quic"\nbind = "127.0.0.1:0"\nzero_rtt = true\n' + tls)
    err = open(os.path.join(work, "broker.log"), "w")
    proc = subprocess.Popen(
        [binary, "--shards", "2", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--data-dir", os.path.join(work, "data"), "--config", config],
        stdout=subprocess.PIPE, stderr=err, text=True,
    )
    plain, quic = None, []
    deadline = time.monotonic() + 20
    while (plain is None or len(quic) < 2) and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("tessera: listening "):
            url = line.split()[-1]
            if url.startswith("quic://"):
                quic.append(url)
            elif url.startswith("mqtt://"):
                host, port = url[len("mqtt://"):].rsplit(":", 1)
                plain = (host, int(port))
    if plain is None or len(quic) < 2:
        proc.kill()
        sys.exit(f"broker did not start; see {err.name}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, plain, quic


def cli_publish(cli, url, ca, extra, topic, payload, qos):
    """`mqttv5 pub` over QUIC; fails the check when it does not exit 0.

    At QoS 0 it publishes twice, 300 ms apart: mqttv5 closes its QUIC
    connection right after its last write (quinn's `close` discards what is
    not yet sent), so a lone QoS 0 PUBLISH on a data stream it has just
    opened may never leave the client (seen in multi-stream mode: the message
    arrived whenever a second one followed). Nothing waits for a QoS 0
    message, so the first of two is the one that must cross."""
    again = ["--repeat", "2", "--interval", "300"] if qos == 0 else []
    r = subprocess.run(
        [cli, "pub", "--url", url, "--ca-cert", ca, "--non-interactive", *extra,
         "--client-id", f"cli-pub-{qos}", "--topic", topic, "--message", payload,
         "--qos", str(qos), *again],
        capture_output=True, text=True, timeout=3 * STEP,
    )
    assert r.returncode == 0, f"mqttv5 pub exited {r.returncode}: {r.stderr.strip()[-500:]}"


def cli_subscribe(cli, url, ca, extra, topic, qos, publish):
    """`mqttv5 sub --count 1` over QUIC; once it printed its SUBACK line,
    `publish()` sends the message. Returns what it printed."""
    proc = subprocess.Popen(
        [cli, "sub", "--url", url, "--ca-cert", ca, "--non-interactive", *extra,
         "--client-id", f"cli-sub-{qos}", "--topic", topic, "--qos", str(qos),
         "--count", "1", "--show-properties"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 2 * STEP
        while not any("Subscribed" in line for line in lines):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(
                    f"mqttv5 sub did not subscribe: {''.join(lines)} {proc.stderr.read()[-500:]}")
            time.sleep(0.05)
        publish()
        rc = proc.wait(timeout=2 * STEP)
        reader.join(STEP)
        assert rc == 0, f"mqttv5 sub exited {rc}: {proc.stderr.read()[-500:]}"
        return "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def mode_checks(cli, ca, env, url, mode, extra):
    topic = f"cli/{mode.replace(' ', '-')}"
    tcp = Client(env, f"tcp-{topic.replace('/', '-')}", mqtt.MQTTv5, quic=False)
    tcp.subscribe(f"{topic}/out", 2)
    for qos in (0, 1, 2):
        payload = f"cli {mode} {qos}"
        cli_publish(cli, url, ca, extra, f"{topic}/out", payload, qos)
        m = tcp.expect(f"{topic}/out", payload.encode())
        assert m.qos == qos, f"{mode}: QUIC->TCP QoS {qos} arrived at QoS {m.qos}"
    print(f"  mqttv5 {mode}: QoS 0/1/2 QUIC -> TCP: ok")
    for qos in (0, 1, 2):
        payload = f"tcp {mode} {qos}"
        printed = cli_subscribe(cli, url, ca, extra, f"{topic}/in", qos,
                                lambda: tcp.publish(f"{topic}/in", payload.encode(), qos))
        assert payload in printed, f"{mode}: QoS {qos} TCP->QUIC not printed: {printed!r}"
        assert f"qos: {qos}" in printed, f"{mode}: TCP->QUIC QoS {qos}: {printed!r}"
    print(f"  mqttv5 {mode}: QoS 0/1/2 TCP -> QUIC: ok")
    tcp.close()


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    cli, broker = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as work:
        certs = make_certs(work)
        proc, plain, quic = start_broker(broker, work, certs)
        try:
            env = Env({"mqtt": plain}, None)
            for mode, extra in MODES.items():
                url = quic[1] if "--quic-early-data" in extra else quic[0]
                mode_checks(cli, certs["ca.pem"], env, url, mode, extra)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("mqttv5-cli over QUIC: all checks passed")


if __name__ == "__main__":
    main()
