#!/usr/bin/env python3
"""Memory per idle connection of a running broker, over TCP or TLS.

Opens N connections (TLS without certificate checks when tls=1), sends an
MQTT 3.1.1 CONNECT on each, checks the CONNACK, waits 2 s, and prints the
growth of the broker process's resident memory (VmRSS) divided by N.
Usage: idle-tls-memory.py BROKER_PID PORT TLS(0|1) N   (N under the open-files limit)
"""
import socket, ssl, sys, time, os
pid, port, tls, n = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
def rss(p):
    for l in open(f"/proc/{p}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
before = rss(pid)
conns = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    if tls: s = ctx.wrap_socket(s)
    cid = f"idle-{os.getpid()}-{i}".encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    s.sendall(bytes([0x10, len(body)]) + body)
    ack = s.recv(4)
    assert ack[:2] == b"\x20\x02" and ack[3] == 0, ack
    conns.append(s)
time.sleep(2)
after = rss(pid)
print(f"{n} idle {'TLS' if tls else 'TCP'} connections: RSS +{after-before} KiB, {(after-before)*1024/n:.0f} B per connection")
