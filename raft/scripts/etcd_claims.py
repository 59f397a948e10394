#!/usr/bin/env python3
"""Session claims against etcd as the older design did them: one create-if-absent
transaction per claim (compare create_revision == 0, then put), through etcd's v3
JSON gateway, from THREADS client threads with keep-alive connections spread over the
members. Prints claims/s and p50/p99 latency (µs).

Usage: etcd_claims.py OPS THREADS HOST:PORT[,HOST:PORT...]
"""
import base64
import http.client
import json
import sys
import threading
import time

ops, threads, endpoints = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
lat = []
lock = threading.Lock()
failed = [0]


def worker(t):
    host, port = endpoints[t % len(endpoints)].split(":")
    conn = http.client.HTTPConnection(host, int(port))
    mine = []
    for i in range(t, ops, threads):
        key = base64.b64encode(b"/sessions/client-%010d" % i).decode()
        val = base64.b64encode(b"node-%d" % (t % len(endpoints) + 1)).decode()
        body = json.dumps({
            "compare": [{"target": "CREATE", "key": key, "create_revision": "0"}],
            "success": [{"request_put": {"key": key, "value": val}}],
        })
        t0 = time.perf_counter()
        conn.request("POST", "/v3/kv/txn", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200 or b'"succeeded":true' not in data:
            failed[0] += 1
        mine.append((time.perf_counter() - t0) * 1e6)
    with lock:
        lat.extend(mine)


start = time.perf_counter()
ths = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
for th in ths:
    th.start()
for th in ths:
    th.join()
secs = time.perf_counter() - start
lat.sort()
print("etcd claims=%d threads=%d : %.0f claims/s, p50 %d us, p99 %d us, failed %d" % (
    ops, threads, ops / secs, lat[len(lat) // 2], lat[int(len(lat) * 0.99)], failed[0]))
