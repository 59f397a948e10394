"""MQTT over QUIC interop: paho-mqtt carried over aioquic streams against Tessera.

Goal: clients that share no code with the broker (paho-mqtt for MQTT, aioquic
for QUIC, both from PyPI) get the behaviour the goal of issue 18 names over a
`quic` listener, for MQTT 3.1.1 and 5.0: connect, subscribe, QoS 0/1/2 both
ways with a TCP client, retained messages, the will of a dropped connection,
takeover between a QUIC and a TCP connection of the same ClientID.

Method: an asyncio thread listens on a Unix socket; every paho client with
`transport="unix"` that connects to it gets its own QUIC connection (aioquic,
ALPN `mqtt`, the test CA) with one bidirectional stream, and the relay copies
bytes both ways (single-stream mode: the stream carries every MQTT packet,
CONNECT first). When paho closes its socket the relay closes the QUIC
connection; when the broker ends the stream or the connection, paho's socket
ends. The TCP clients are paho-mqtt too. paho's network loop is pumped by hand
(`loop()`), so nothing reconnects behind the test's back and every wait is
bounded.

Usage: python3 paho_over_aioquic.py PATH/TO/broker
Exit status 0 when every check passed.
"""

import asyncio
import datetime
import ipaddress
import os
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt
from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

STEP = 10.0  # seconds for one expected event


def make_certs(work):
    """A CA and a server certificate for localhost/127.0.0.1, as PEM files."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "interop CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {n: os.path.join(work, n) for n in ("ca.pem", "server.pem", "server.key")}
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["server.pem"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["server.key"], "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return paths


def start_broker(binary, work, certs):
    config = os.path.join(work, "tessera.toml")
    with open(config, "w") as f:
        f.write(
            '[[listener]]\nkind = "quic"\nbind = "127.0.0.1:0"\n'
            f'cert_file = "{certs["server.pem"]}"\nkey_file = "{certs["server.key"]}"\n'
        )
    err = open(os.path.join(work, "broker.log"), "w")
    proc = subprocess.Popen(
        [binary, "--shards", "2", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--data-dir", os.path.join(work, "data"), "--config", config],
        stdout=subprocess.PIPE, stderr=err, text=True,
    )
    urls = {}
    deadline = time.monotonic() + 20
    while "mqtt" not in urls and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("tessera: listening "):
            url = line.split()[-1]
            scheme, rest = url.split("://", 1)
            host, port = rest.rsplit(":", 1)
            urls[scheme] = (host, int(port))
    if "mqtt" not in urls or "quic" not in urls:
        proc.kill()
        sys.exit(f"broker did not start; see {err.name}")
    # Keep draining stdout so the broker never blocks on it.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, urls


class MqttStream(QuicConnectionProtocol):
    """One QUIC connection carrying one MQTT stream to a Unix socket."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writer = None
        self.stream_id = None
        self.ended = asyncio.Event()

    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived) and event.stream_id == self.stream_id:
            if event.data:
                self.writer.write(event.data)
            if event.end_stream:
                self.ended.set()
        elif isinstance(event, ConnectionTerminated):
            self.ended.set()


class Relay:
    """The Unix socket paho connects to; each connection becomes a QUIC one."""

    def __init__(self, quic_addr, ca_file, path):
        self.quic_addr = quic_addr
        self.ca_file = ca_file
        self.path = path
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        if not ready.wait(STEP):
            sys.exit("relay did not start")

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_unix_server(self._handle, path=self.path))
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer):
        config = QuicConfiguration(is_client=True, alpn_protocols=["mqtt"])
        config.load_verify_locations(self.ca_file)
        config.server_name = "localhost"
        host, port = self.quic_addr
        try:
            async with quic_connect(host, port, configuration=config,
                                    create_protocol=MqttStream) as proto:
                proto.writer = writer
                proto.stream_id = proto._quic.get_next_available_stream_id()

                async def up():
                    while True:
                        data = await reader.read(65536)
                        if not data:
                            return
                        proto._quic.send_stream_data(proto.stream_id, data)
                        proto.transmit()

                up_task = asyncio.ensure_future(up())
                end_task = asyncio.ensure_future(proto.ended.wait())
                await asyncio.wait({up_task, end_task}, return_when=asyncio.FIRST_COMPLETED)
                up_task.cancel()
                end_task.cancel()
                # Leaving the context closes the QUIC connection.
        except Exception as e:  # a refused handshake: paho sees its socket end
            print(f"relay: QUIC connection failed: {e!r}", file=sys.stderr)
        finally:
            writer.close()


class Client:
    """A paho client over QUIC (through the relay) or TCP, pumped by hand."""

    def __init__(self, env, client_id, version, quic, clean=True, expiry=None, will=None):
        self.env = env
        self.version = version
        self.quic = quic
        v5 = version == mqtt.MQTTv5
        kwargs = {} if v5 else {"clean_session": clean}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=version, transport="unix" if quic else "tcp", **kwargs)
        self.c.reconnect_delay_set(min_delay=120, max_delay=120)
        self.messages = []
        self.connack = None
        self.disconnected = False
        self.subacks = set()
        self.acked = set()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a: setattr(self, "disconnected", True)
        self.c.on_message = lambda c, u, m: self.messages.append(m)
        self.c.on_subscribe = lambda c, u, mid, rc, p: self.subacks.add(mid)
        self.c.on_publish = lambda c, u, mid, rc, p: self.acked.add(mid)
        if will:
            self.c.will_set(will[0], will[1], qos=1)
        props = None
        if v5 and expiry:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = expiry
        if quic:
            args = (env.relay.path,)
        else:
            args = env.urls["mqtt"]
        extra = {"clean_start": clean, "properties": props} if v5 else {}
        self.c.connect(*args, keepalive=30, **extra)
        self.pump(lambda: self.connack is not None, f"CONNACK for {client_id}")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = (reason_code, flags.session_present)

    def pump(self, done, what, others=()):
        deadline = time.monotonic() + STEP
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {STEP} s")
            for c in (self, *others):
                if not c.disconnected:
                    c.c.loop(timeout=0.01)

    def subscribe(self, topic, qos):
        _, mid = self.c.subscribe(topic, qos)
        self.pump(lambda: mid in self.subacks, f"SUBACK for {topic}")

    def publish(self, topic, payload, qos, retain=False):
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            self.pump(lambda: info.mid in self.acked, f"ack of QoS {qos} {topic}")
        else:
            self.pump(lambda: info.is_published(), f"send of {topic}")

    def expect(self, topic, payload, others=()):
        def arrived():
            return any(m.topic == topic and m.payload == payload for m in self.messages)
        self.pump(arrived, f"{payload!r} on {topic}", others)
        return next(m for m in self.messages if m.topic == topic and m.payload == payload)

    def drop(self):
        """Closes the socket without DISCONNECT (the application vanished)."""
        self.c.socket().close()
        self.disconnected = True

    def close(self):
        if not self.disconnected:
            self.c.disconnect()
            self.pump(lambda: self.disconnected, "end of the connection")


class Env:
    def __init__(self, urls, relay):
        self.urls = urls
        self.relay = relay


def scenario(env, version, tag):
    """Every check of the goal in one MQTT version; raises on the first failure."""
    v = version
    topic = f"interop/{tag}"
    sub = Client(env, f"{tag}-quic-sub", v, quic=True)
    assert sub.connack[0] == 0, f"CONNACK over QUIC: {sub.connack}"
    sub.subscribe(topic + "/#", 2)
    tcp_pub = Client(env, f"{tag}-tcp-pub", v, quic=False)
    for qos in (0, 1, 2):
        tcp_pub.publish(f"{topic}/in", f"tcp {qos}".encode(), qos)
        m = sub.expect(f"{topic}/in", f"tcp {qos}".encode(), (tcp_pub,))
        assert m.qos == qos, f"TCP->QUIC QoS {qos} arrived at QoS {m.qos}"
    print(f"  {tag}: connect, subscribe, QoS 0/1/2 TCP -> QUIC: ok")

    tcp_sub = Client(env, f"{tag}-tcp-sub", v, quic=False)
    tcp_sub.subscribe(f"{topic}/out", 2)
    quic_pub = Client(env, f"{tag}-quic-pub", v, quic=True)
    for qos in (0, 1, 2):
        quic_pub.publish(f"{topic}/out", f"quic {qos}".encode(), qos)
        m = tcp_sub.expect(f"{topic}/out", f"quic {qos}".encode(), (quic_pub,))
        assert m.qos == qos, f"QUIC->TCP QoS {qos} arrived at QoS {m.qos}"
    print(f"  {tag}: QoS 0/1/2 QUIC -> TCP: ok")

    quic_pub.publish(f"{topic}/kept", b"retained", 1, retain=True)
    late = Client(env, f"{tag}-quic-late", v, quic=True)
    late.subscribe(f"{topic}/kept", 1)
    m = late.expect(f"{topic}/kept", b"retained")
    assert m.retain, "a retained message arrives with the retain flag"
    print(f"  {tag}: retained over QUIC: ok")

    tcp_sub.subscribe(f"{topic}/will", 1)
    willing = Client(env, f"{tag}-quic-will", v, quic=True, will=(f"{topic}/will", b"gone"))
    willing.drop()
    tcp_sub.expect(f"{topic}/will", b"gone")
    print(f"  {tag}: will of a dropped QUIC connection: ok")

    # Takeover QUIC -> TCP -> QUIC with one persistent session.
    cid = f"{tag}-roaming"
    first = Client(env, cid, v, quic=True, clean=False, expiry=300)
    first.subscribe(f"{topic}/roam", 1)
    second = Client(env, cid, v, quic=False, clean=False, expiry=300)
    assert second.connack[1], "TCP takeover: session present"
    first.pump(lambda: first.disconnected, "end of the QUIC connection taken over")
    quic_pub.publish(f"{topic}/roam", b"to tcp", 1)
    second.expect(f"{topic}/roam", b"to tcp", (quic_pub,))
    third = Client(env, cid, v, quic=True, clean=False, expiry=300)
    assert third.connack[1], "QUIC takeover: session present"
    second.pump(lambda: second.disconnected, "end of the TCP connection taken over")
    quic_pub.publish(f"{topic}/roam", b"to quic", 1)
    third.expect(f"{topic}/roam", b"to quic", (quic_pub,))
    print(f"  {tag}: takeover QUIC -> TCP -> QUIC with the session: ok")

    for c in (sub, tcp_pub, tcp_sub, quic_pub, late, third):
        c.close()


def main():
    binary = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as work:
        certs = make_certs(work)
        proc, urls = start_broker(binary, work, certs)
        try:
            relay = Relay(urls["quic"], certs["ca.pem"], os.path.join(work, "relay.sock"))
            env = Env(urls, relay)
            failed = 0
            for version, tag in ((mqtt.MQTTv5, "v5"), (mqtt.MQTTv311, "v311")):
                try:
                    scenario(env, version, tag)
                    print(f"paho over aioquic, MQTT {tag}: passed")
                except AssertionError as e:
                    failed += 1
                    print(f"paho over aioquic, MQTT {tag}: FAILED: {e}")
            if failed:
                with open(os.path.join(work, "broker.log")) as f:
                    print(f.read()[-4000:], file=sys.stderr)
            sys.exit(1 if failed else 0)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
