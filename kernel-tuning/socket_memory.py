#!/usr/bin/env python3
"""Kernel memory per idle TCP connection, as quoted in kernel-tuning/README.md.

Opens N loopback connections and reports the growth of each kernel slab cache
(/proc/slabinfo, so run it as root) per connection, then queues 100 bytes on
each and reports the TCP memory the kernel accounts for them (/proc/net/sockstat,
the pages net.ipv4.tcp_mem limits).

  sudo python3 kernel-tuning/socket_memory.py                    # bare socket pairs
  sudo python3 kernel-tuning/socket_memory.py --broker 127.0.0.1:1883
      # idle MQTT 3.1.1 clients of a running broker (both ends are on this host,
      # so per-connection figures include the client's socket too)

Other processes allocate slab at the same time; caches unrelated to sockets
(proc_inode_cache, buffer_head, ...) may move. Keep N below `ulimit -n` / 2.
"""

import argparse
import socket
import time


def slab_bytes():
    sizes = {}
    with open("/proc/slabinfo") as f:
        for line in f.readlines()[2:]:
            fields = line.split()
            sizes[fields[0]] = int(fields[1]) * int(fields[3])  # active objects x size
    return sizes


def tcp_mem_pages():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    raise RuntimeError("no TCP line in /proc/net/sockstat")


def mqtt_connect(client_id):
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=4000, help="connections (default 4000)")
    parser.add_argument("--broker", metavar="HOST:PORT", help="connect MQTT clients to a broker")
    args = parser.parse_args()

    listener = None
    if args.broker:
        host, port = args.broker.rsplit(":", 1)
        target = (host, int(port))
    else:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        target = listener.getsockname()

    time.sleep(0.2)
    before = slab_bytes()
    clients, servers = [], []
    for i in range(args.n):
        c = socket.create_connection(target)
        clients.append(c)
        if listener:
            servers.append(listener.accept()[0])
        else:
            c.sendall(mqtt_connect(f"socket-memory-{i}"))
    if not listener:
        for c in clients:
            if c.recv(4)[:1] != b"\x20":
                raise RuntimeError("no CONNACK")
    time.sleep(1.0)
    after = slab_bytes()

    growth = sorted(((after.get(k, 0) - before.get(k, 0), k) for k in after), reverse=True)
    total = sum(after.values()) - sum(before.values())
    what = "MQTT connection (client and broker sockets)" if args.broker else "socket pair"
    print(f"{args.n} idle connections: slab +{total / args.n:.0f} B per {what}")
    for delta, name in growth[:10]:
        print(f"  {name:24s} {delta / args.n:8.0f} B")

    if listener:
        pages = tcp_mem_pages()
        for c in clients:
            c.sendall(b"x" * 100)
        time.sleep(1.0)
        queued = tcp_mem_pages() - pages
        print(
            f"100 B unread on each server socket: tcp_mem +{queued} pages "
            f"({queued * 4096 / args.n:.0f} B per socket)"
        )


if __name__ == "__main__":
    main()
