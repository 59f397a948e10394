#!/usr/bin/env python3
"""Side-by-side runs of the bench against Mosquitto and the Tessera broker.

For every scenario and repetition: start a fresh broker pinned to one CPU
(`taskset -c BROKER_CPU`), run `bench ... --json --broker-pid PID` pinned to
another (`taskset -c BENCH_CPU`), stop the broker, and append the bench's JSON
report to the results file, extended with:

  broker_kind        "mosquitto" or "tessera"
  label, rep         the scenario label below and the repetition number
  exit_code          the bench's exit status (1 = a check failed, e.g. QoS 1 loss)
  wall_s             wall time of the bench process
  interference_cores CPU used on the two pinned CPUs by *other* user processes
                     during the run, in cores (the machine is shared; 0 is a quiet
                     run). Kernel threads (softirq work of our own traffic) are
                     not counted.
  accepted, attempt  a run with more interference than --max-interference is
                     repeated (up to --retries times) and kept with accepted=false

Usage: bench/scripts/compare.py --out results.jsonl [--reps 3] [--only LABEL ...]
Then:  bench/scripts/table.py results.jsonl
"""

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time

# label -> bench arguments. Durations are seconds of measurement after the warmup.
SCENARIOS = {
    "fanin-q0": ["fanin", "--publishers", "8", "--qos", "0", "--size", "64",
                 "--duration", "10", "--warmup", "2"],
    "fanout-q0": ["fanout", "--subscribers", "100", "--qos", "0", "--size", "64",
                  "--duration", "10", "--warmup", "2"],
    "fanin-q1": ["fanin", "--publishers", "8", "--qos", "1", "--size", "64",
                 "--duration", "10", "--warmup", "2"],
    "latency-q0": ["latency", "--rate", "1000", "--qos", "0", "--size", "64",
                   "--duration", "10", "--warmup", "2"],
    "latency-q1": ["latency", "--rate", "1000", "--qos", "1", "--size", "64",
                   "--duration", "10", "--warmup", "2"],
    "conn-10k": ["conn", "--clients", "10000", "--rate", "2000", "--duration", "10",
                 "--bind", "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5"],
    "conn-19k": ["conn", "--clients", "19000", "--rate", "2000", "--duration", "10",
                 "--bind", "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5"],
    "conn-9k": ["conn", "--clients", "9000", "--rate", "2000", "--duration", "10",
                "--bind", "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5"],
    # Paced runs at a load both brokers carry: CPU cost per message and latency
    # below saturation.
    "fanin-q0-200k": ["fanin", "--publishers", "8", "--rate", "25000", "--qos", "0",
                      "--size", "64", "--duration", "10", "--warmup", "2"],
    "fanin-q1-32k": ["fanin", "--publishers", "8", "--rate", "4000", "--qos", "1",
                     "--size", "64", "--duration", "10", "--warmup", "2"],
    # Search for the highest paced QoS 1 fan-in rate without loss.
    **{f"fanin-q1-{k}k": ["fanin", "--publishers", "8", "--rate", str(k * 125), "--qos", "1",
                          "--size", "64", "--duration", "10", "--warmup", "2"]
       for k in (20, 40, 80, 100, 120, 160, 200, 240, 320)},
    # Where Tessera's QoS 0 fan-in starts to drop (see docs/BENCHMARKS.md).
    "fanin-q0-1pub": ["fanin", "--publishers", "1", "--qos", "0", "--size", "64",
                      "--duration", "10", "--warmup", "2"],
    "fanin-q0-800k": ["fanin", "--publishers", "8", "--rate", "100000", "--qos", "0",
                      "--size", "64", "--duration", "10", "--warmup", "2"],
    "fanin-q0-1600k": ["fanin", "--publishers", "8", "--rate", "200000", "--qos", "0",
                       "--size", "64", "--duration", "10", "--warmup", "2"],
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"broker not listening on {port} after {timeout} s")


def start_broker(kind, port, cpu, tessera_bin, workdir, shards=1):
    log = open(os.path.join(workdir, f"{kind}-{port}.log"), "w")
    if kind == "mosquitto":
        conf = os.path.join(workdir, f"mosquitto-{port}.conf")
        with open(conf, "w") as f:
            f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        os.chmod(workdir, 0o755)
        os.chmod(conf, 0o644)
        cmd = ["mosquitto", "-c", conf]
    else:
        cmd = [tessera_bin, "--listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0",
               "--shards", str(shards), "--data-dir", os.path.join(workdir, f"data-{port}")]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    wait_listening(port, proc)
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_task_ticks(cpus):
    """Jiffies the given CPUs spent running tasks (user, nice, system), from
    /proc/stat. Interrupt and softirq time is left out: processes' own CPU times
    exclude it too, and on loopback it is mostly our own traffic."""
    ticks = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name in {f"cpu{c}" for c in cpus}:
                ticks += sum(int(x) for x in fields[:3])
    return ticks


PF_KTHREAD = 0x00200000


def kernel_threads_ticks():
    """Jiffies used so far by kernel threads (ksoftirqd, kworkers, ...). They do
    much of the network work of our own loopback traffic, so their time is not
    counted as interference."""
    ticks = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Fields after the command: state is field 3, flags field 9, utime 14,
        # stime 15 (1-based), so indices 6, 11 and 12 here.
        if int(rest[6]) & PF_KTHREAD:
            ticks += int(rest[11]) + int(rest[12])
    return ticks


def proc_cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def run_once(kind, label, rep, args, opts, workdir):
    port = free_port()
    broker_cpu = None if opts.no_pin else opts.broker_cpu
    broker = start_broker(kind, port, broker_cpu, opts.tessera_bin, workdir, opts.shards)
    try:
        time.sleep(0.5)
        b0 = cpu_task_ticks([opts.bench_cpu, opts.broker_cpu])
        k0 = kernel_threads_ticks()
        broker0 = proc_cpu_s(broker.pid)
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        cmd = [opts.bench_bin, *args,
               "--port", str(port), "--json", "--broker-pid", str(broker.pid)]
        if not opts.no_pin:
            cmd = ["taskset", "-c", str(opts.bench_cpu), *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.monotonic() - start
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        broker1 = proc_cpu_s(broker.pid)
        b1 = cpu_task_ticks([opts.bench_cpu, opts.broker_cpu])
        k1 = kernel_threads_ticks()
    finally:
        stop(broker)
    bench_cpu = (children1.ru_utime + children1.ru_stime
                 - children0.ru_utime - children0.ru_stime)
    hz = os.sysconf("SC_CLK_TCK")
    # Kernel threads may also run on other CPUs; on a 2-CPU machine with both
    # pinned, there are none.
    busy_cores = (b1 - b0 - (k1 - k0)) / hz / wall
    own_cores = (bench_cpu + broker1 - broker0) / wall
    lines = done.stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        report = {"scenario": args[0], "error": "no JSON report",
                  "stderr": done.stderr[-2000:]}
    report.update({
        "broker_kind": kind, "label": label + opts.label_suffix, "rep": rep,
        "shards": opts.shards if kind == "tessera" else None, "pinned": not opts.no_pin, "exit_code": done.returncode,
        "wall_s": round(wall, 2),
        "interference_cores": round(max(0.0, busy_cores - own_cores), 3),
        "command": ("" if opts.no_pin else f"taskset -c {opts.bench_cpu} ")
                   + "bench " + " ".join(args),
    })
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", nargs="*", default=list(SCENARIOS))
    p.add_argument("--brokers", nargs="*", default=["mosquitto", "tessera"])
    p.add_argument("--bench-bin", default="target/release/bench")
    p.add_argument("--tessera-bin", default="target/release/broker")
    p.add_argument("--bench-cpu", type=int, default=0)
    p.add_argument("--broker-cpu", type=int, default=1)
    p.add_argument("--max-interference", type=float, default=0.15,
                   help="cores used by other processes above which a run is repeated")
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--shards", type=int, default=1, help="Tessera's --shards")
    p.add_argument("--no-pin", action="store_true",
                   help="run broker and bench without taskset (all CPUs shared)")
    p.add_argument("--label-suffix", default="",
                   help="appended to each label in the results, e.g. -2shards")
    opts = p.parse_args()
    opts.bench_bin = os.path.abspath(opts.bench_bin)
    opts.tessera_bin = os.path.abspath(opts.tessera_bin)
    workdir = tempfile.mkdtemp(prefix="tessera-compare-")
    with open(opts.out, "a") as out:
        for label in opts.only:
            for rep in range(opts.reps):
                # Alternate brokers within a repetition so slow drifts in the
                # machine's load hit both alike.
                kinds = opts.brokers if rep % 2 == 0 else list(reversed(opts.brokers))
                for kind in kinds:
                    for attempt in range(opts.retries + 1):
                        r = run_once(kind, label, rep, SCENARIOS[label], opts, workdir)
                        quiet = r["interference_cores"] <= opts.max_interference
                        last = attempt == opts.retries
                        # A noisy run is kept as a record but not used for the
                        # table, unless no quiet one could be had.
                        r["accepted"] = quiet or last
                        r["attempt"] = attempt
                        out.write(json.dumps(r) + "\n")
                        out.flush()
                        print(f"{label:14} {kind:9} rep {rep} try {attempt} "
                              f"exit {r['exit_code']} "
                              f"recv {r.get('received_msg_per_s', '-')} msg/s "
                              f"interference {r['interference_cores']} cores",
                              file=sys.stderr)
                        if quiet:
                            break
    print(f"broker logs in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
