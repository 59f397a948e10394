#!/usr/bin/env python3
"""A delay line for packets, for kernels without netem (quic-lossy.sh).

Binds NFQUEUE queue QUEUE (an iptables rule `-j NFQUEUE --queue-num QUEUE`
sends packets to it) and accepts every packet DELAY_MS after it arrived, in
arrival order. Only the verdict crosses to user space: the queue is
configured to copy no payload (NFQNL_COPY_META), and the kernel reinjects
the packet it held, so the delay applies to whole packets of any protocol
(TCP and UDP alike, retransmissions included), not to a proxied byte stream.
Every packet gets the same delay, so verdicts are due in id order and one
batch verdict (NFQNL_MSG_VERDICT_BATCH: "accept every id up to N") releases
all that are due.

Speaks nfnetlink directly (no library): the message layouts are those of
linux/netfilter/nfnetlink_queue.h. Runs until SIGTERM/SIGINT; prints the
packets it delayed to stderr at the end. Must run in the network namespace
of the iptables rule, as root.

Usage: nfq-delay.py QUEUE DELAY_MS
"""

import collections
import os
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
# Packets the kernel holds for us at most; beyond it, it drops them (and the
# run's loss would no longer be the 5 % of the iptables rule). At 20 ms this
# allows 3 million packets/s through.
QUEUE_MAXLEN = 65536
RCVBUF_BYTES = 64 << 20


def attr(kind, payload):
    """One netlink attribute, padded to 4 bytes."""
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def message(msg, queue, attrs, flags=NLM_F_REQUEST, seq=0):
    """An nfnetlink message of the queue subsystem: nlmsghdr, nfgenmsg, attributes."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def configure(sock, queue):
    """Binds the queue, asks for metadata only, and raises its length; each
    step must be acknowledged without error."""
    steps = [
        attr(NFQA_CFG_CMD, struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0, 0)),
        attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META)),
        attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", QUEUE_MAXLEN)),
    ]
    for seq, step in enumerate(steps, 1):
        sock.send(message(NFQNL_MSG_CONFIG, queue, [step], NLM_F_REQUEST | NLM_F_ACK, seq))
        data = sock.recv(65536)
        _, kind, _, _, _ = struct.unpack_from("=IHHII", data)
        if kind != NLMSG_ERROR:
            sys.exit(f"nfq-delay: unexpected answer {kind} to configuration step {seq}")
        (err,) = struct.unpack_from("=i", data, 16)
        if err:
            sys.exit(f"nfq-delay: configuration step {seq} failed: {os.strerror(-err)}")


def packet_ids(data):
    """The ids of the queued packets in one read of the socket."""
    off = 0
    while off + 16 <= len(data):
        length, kind, _, _, _ = struct.unpack_from("=IHHII", data, off)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            a = off + 20  # past nlmsghdr and nfgenmsg
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype & 0x7FFF == NFQA_PACKET_HDR:
                    yield struct.unpack_from(">I", data, a + 4)[0]
                    break
                a += (alen + 3) & ~3
        elif kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, off + 16)
            if err:
                print(f"nfq-delay: netlink error {os.strerror(-err)}", file=sys.stderr)
        off += (length + 3) & ~3


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    queue, delay = int(sys.argv[1]), float(sys.argv[2]) / 1000.0
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF_BYTES)  # SO_RCVBUFFORCE
    sock.bind((0, 0))
    configure(sock, queue)
    sock.setblocking(False)
    stopping = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stopping.append(1))
    held = collections.deque()  # (due, id), in id order
    delayed = 0
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    print(f"nfq-delay: queue {queue}, {delay * 1000:g} ms", file=sys.stderr, flush=True)
    while not stopping:
        # At most 100 ms, so a stop signal is seen (poll is restarted after
        # a signal handler returns).
        timeout_ms = 100.0
        if held:
            timeout_ms = min(timeout_ms, max(0.0, (held[0][0] - time.monotonic()) * 1000.0))
        if poller.poll(timeout_ms):
            while True:
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    break
                except OSError as e:  # ENOBUFS: the kernel dropped messages
                    print(f"nfq-delay: {e}", file=sys.stderr)
                    continue
                due = time.monotonic() + delay
                for pid in packet_ids(data):
                    held.append((due, pid))
        now = time.monotonic()
        last = None
        while held and held[0][0] <= now:
            last = held.popleft()[1]
            delayed += 1
        if last is not None:
            hdr = attr(NFQA_VERDICT_HDR, struct.pack(">II", NF_ACCEPT, last))
            sock.send(message(NFQNL_MSG_VERDICT_BATCH, queue, [hdr]))
    if held:
        hdr = attr(NFQA_VERDICT_HDR, struct.pack(">II", NF_ACCEPT, held[-1][1]))
        sock.send(message(NFQNL_MSG_VERDICT_BATCH, queue, [hdr]))
    print(f"nfq-delay: delayed {delayed} packets", file=sys.stderr)


if __name__ == "__main__":
    main()
