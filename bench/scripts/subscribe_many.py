#!/usr/bin/env python3
"""Subscribes many distinct filters over a few MQTT 3.1.1 connections and holds them.

Used by cluster-route-memory.sh to load a broker with N subscriptions (or a cluster with
N routes) without N connections: each connection sends SUBSCRIBE packets of up to 200
filters and waits for each SUBACK (in a Tessera cluster the SUBACK waits until every
node applied the route, so when this prints "subscribed" every route is in place).

Usage: subscribe_many.py HOST PORT CLIENT_PREFIX CONNECTIONS FIRST COUNT TEMPLATE
  TEMPLATE holds {i}: filter i of FIRST..FIRST+COUNT, e.g. "mem/{i}/+/t".
Prints "subscribed N" and then holds the connections until it is killed.
"""
import socket
import struct
import sys
import time


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string(s):
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def read_packet(sock):
    head = sock.recv(1)
    if not head:
        raise SystemExit("the broker closed the connection")
    mult, length = 1, 0
    while True:
        b = sock.recv(1)[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise SystemExit("the broker closed the connection")
        body += chunk
    return head[0], body


def main():
    host, port, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    conns, first, count, template = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
    socks = []
    per = (count + conns - 1) // conns
    done = 0
    for c in range(conns):
        s = socket.create_connection((host, port))
        var = string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 600)
        payload = string(f"{prefix}-{c}")
        s.sendall(bytes([0x10]) + varint(len(var) + len(payload)) + var + payload)
        kind, body = read_packet(s)
        if kind != 0x20 or body[1] != 0:
            raise SystemExit(f"CONNECT refused: {kind:#x} {body!r}")
        ids = range(first + c * per, min(first + (c + 1) * per, first + count))
        pid = 1
        batch = list(ids)
        for k in range(0, len(batch), 200):
            chunk = batch[k:k + 200]
            body = struct.pack("!H", pid)
            for i in chunk:
                body += string(template.format(i=i)) + bytes([0])
            s.sendall(bytes([0x82]) + varint(len(body)) + body)
            kind, ack = read_packet(s)
            if kind != 0x90 or any(code >= 0x80 for code in ack[2:]):
                raise SystemExit(f"SUBSCRIBE refused: {kind:#x} {ack[2:10]!r}")
            done += len(chunk)
            pid = pid % 65535 + 1
        socks.append(s)
    print(f"subscribed {done}", flush=True)
    # Hold the connections (keep alive 600 s is longer than any run).
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
