#!/usr/bin/env python3
"""Markdown table of compare.py results: per scenario and metric, the median over
accepted runs for each broker, the range (min-max) and Tessera / Mosquitto.

Usage: bench/scripts/table.py results.jsonl
"""

import json
import statistics
import sys
from collections import defaultdict


def loss_pct(r):
    e = r.get("expected_count") or 0
    return 100.0 * r.get("loss_count", 0) / e if e else None


def get(*path):
    def f(r):
        for p in path:
            r = r.get(p) if isinstance(r, dict) else None
            if r is None:
                return None
        return r
    return f


def failures(r):
    return sum(r.get("failures", {}).values())


RATE = [("delivered msg/s", get("received_msg_per_s"), "{:,.0f}"),
        ("sent msg/s", get("sent_msg_per_s"), "{:,.0f}"),
        ("loss %", loss_pct, "{:.2f}"),
        ("broker CPU cores", get("broker_cpu_cores"), "{:.2f}"),
        ("bench CPU cores", get("bench_cpu_cores"), "{:.2f}")]
PACED = RATE[:3] + [("broker CPU cores", get("broker_cpu_cores"), "{:.2f}"),
                    ("latency p50 µs", get("latency", "p50_us"), "{:,.0f}"),
                    ("latency p99 µs", get("latency", "p99_us"), "{:,.0f}")]
LATENCY = [("p50 µs", get("latency", "p50_us"), "{:,.1f}"),
           ("p99 µs", get("latency", "p99_us"), "{:,.1f}"),
           ("p99.9 µs", get("latency", "p999_us"), "{:,.1f}"),
           ("max µs", get("latency", "max_us"), "{:,.1f}"),
           ("bench send lag p99 µs", get("send_lag", "p99_us"), "{:,.1f}")]
CONN = [("connected", get("connected_count"), "{:,.0f}"),
        ("failed or dropped", failures, "{:,.0f}"),
        ("connect p50 µs", get("connect_latency", "p50_us"), "{:,.0f}"),
        ("connect p99 µs", get("connect_latency", "p99_us"), "{:,.0f}"),
        ("broker RSS after, MiB", lambda r: (r.get("broker_rss_after_bytes") or 0) / 2**20,
         "{:,.1f}"),
        ("broker RSS per connection, bytes", get("broker_rss_per_connection_bytes"),
         "{:,.0f}")]
METRICS = {"fanin-q0": RATE, "fanout-q0": RATE, "fanin-q1": RATE,
           "latency-q0": LATENCY, "latency-q1": LATENCY,
           "conn-19k": CONN, "conn-10k": CONN, "conn-9k": CONN,
           "fanin-q0-200k": PACED, "fanin-q1-32k": PACED,
           "fanin-q0-1pub": RATE, "fanin-q0-800k": PACED, "fanin-q0-1600k": PACED,
           "fanin-q1-20k": PACED, "fanin-q1-40k": PACED, "fanin-q1-80k": PACED,
           **{f"fanin-q1-{k}k": PACED for k in (100, 120, 160, 200, 240, 320)},
           "fanin-q0-2shards": RATE}


def fmt(fmt_s, v):
    return "-" if v is None else fmt_s.format(v)


def main():
    runs = defaultdict(list)
    with open(sys.argv[1]) as f:
        for line in f:
            r = json.loads(line)
            if r.get("accepted", True):
                runs[(r["label"], r["broker_kind"])].append(r)
    labels = [l for l in METRICS if any(k[0] == l for k in runs)]
    print("| scenario | metric | Mosquitto | Tessera | Tessera / Mosquitto |")
    print("|---|---|---:|---:|---:|")
    for label in labels:
        m, t = runs.get((label, "mosquitto"), []), runs.get((label, "tessera"), [])
        for i, (name, fn, fs) in enumerate(METRICS[label]):
            cells = []
            medians = []
            for rs in (m, t):
                vals = [v for v in map(fn, rs) if v is not None]
                if not vals:
                    cells.append("-")
                    medians.append(None)
                    continue
                med = statistics.median(vals)
                medians.append(med)
                rng = f" ({fmt(fs, min(vals))}–{fmt(fs, max(vals))})" if len(vals) > 1 else ""
                cells.append(fmt(fs, med) + rng)
            ratio = ("{:.2f}".format(medians[1] / medians[0])
                     if None not in medians and medians[0] else "-")
            head = f"{label} ({len(m)}+{len(t)} runs)" if i == 0 else ""
            print(f"| {head} | {name} | {cells[0]} | {cells[1]} | {ratio} |")
    noisy = [r for rs in runs.values() for r in rs if r["interference_cores"] > 0.15]
    exits = defaultdict(list)
    for (label, kind), rs in runs.items():
        for r in rs:
            if r["exit_code"] != 0:
                exits[(label, kind)].append(
                    f"exit {r['exit_code']}: " + "; ".join(r.get("verdict", [])))
    print()
    print(f"Accepted runs with more than 0.15 cores of interference: {len(noisy)}")
    for (label, kind), msgs in sorted(exits.items()):
        print(f"- {label} / {kind}: {len(msgs)} failed runs, e.g. {msgs[0]}")


if __name__ == "__main__":
    main()
