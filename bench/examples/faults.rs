//! Cluster figures under faults (issue 16, docs/BENCHMARKS.md "Cluster under faults"),
//! driven by `bench/scripts/cluster-faults.sh`, which starts the clusters and passes the
//! pids and addresses. Each mode kills (SIGKILL) the processes it is given itself, so
//! its clock starts at the kill:
//!
//! - `failover mqtt|etcd PID ADDR[,ADDR..]`: kills the leader PID, then starts a probe
//!   every 20 ms against the survivors (MQTT: a CONNECT of a new ClientID, which is a
//!   raft claim; etcd: a `PUT` through its HTTP gateway) and prints the time from the
//!   kill to the first probe that succeeded: when a new leader accepts writes.
//! - `sessions PID VICTIM OTHERS N [CMD AFTER_MS FIRST_TRY_MS]`: N persistent MQTT 5
//!   sessions (one QoS 1 subscription each) on VICTIM; kills PID (VICTIM's node); every
//!   client reconnects (no clean start, 100 ms between tries) to the other nodes in turn
//!   until a CONNACK accepts it; prints kill-to-CONNACK p50/p99/max and how many came
//!   back with session present. With CMD, `sh -c CMD` runs AFTER_MS after the kill (the
//!   script restarts the node with its disk there) and the clients first try
//!   FIRST_TRY_MS after the kill (a client's reconnect back-off).
//! - `lease PIDS VICTIM N`: N MQTT 5 clients on VICTIM; kills PIDS (the other nodes, a
//!   majority) at once; prints the time from the kill to each client's DISCONNECT (or
//!   the connection's end) with the reason codes: the session lease as observed.
//! - `partition CUT_CMD VICTIM OTHERS N`: N persistent MQTT 5 sessions on VICTIM;
//!   runs `sh -c CUT_CMD` (the script drops VICTIM's cluster traffic with iptables),
//!   and at once every client connects its ClientID to the majority (OTHERS in turn)
//!   while its old connection stays open; prints when the old connections ended (the
//!   lease, with the majority alive), when the majority served them, and whether any
//!   ClientID was served by both at once (a new CONNACK before the old connection's
//!   end): there must be none.
//! - `load PID PUBS SUBS VICTIM_SUB TK_A TK_B SECONDS KILL_AT [PUBLISHERS WINDOW
//!   [RESTART_CMD RESTART_AFTER_MS]]`:
//!   QoS 1 publishers (PUBLISHERS per address of PUBS, WINDOW in flight each, as fast
//!   as acknowledged) and one QoS 1 subscriber per address of SUBS to all of them (and
//!   one on VICTIM_SUB, the node to be killed, unless it is `-`), plus a persistent
//!   session taken over between TK_A and TK_B every 20 ms; PID is killed KILL_AT s
//!   in. Prints PUBACKs/s and deliveries/s (subscribers on the survivors) before, in
//!   the 3 s after and after the kill, the slowest 500 ms after it, takeover
//!   p50/p99/max in the same three spans (by when each ended), and every connection of
//!   a survivor that ended (there should be none). With RESTART_CMD, `sh -c` runs it
//!   RESTART_AFTER_MS after the kill (the script restarts the node with its disk) and
//!   prints when PUBACKs came back to half their rate before the kill.
//!
//! - `netload FAULT_CMD HEAL_CMD PUBS SUBS VICTIM_SUB TK_A TK_B SECONDS FAULT_AT HEAL_AT
//!   PUBLISHERS WINDOW WATCH N MOVE`: the load of `load` (the same publishers,
//!   subscribers and takeover loop), but the fault is a network one: `sh -c FAULT_CMD`
//!   runs FAULT_AT s in and `sh -c HEAL_CMD` HEAL_AT s in (the script cuts, or slows,
//!   the cluster traffic of one node in its network namespace, and heals it). With
//!   WATCH (the faulty node's address, or `-`), N persistent MQTT 5 sessions are
//!   connected there before the fault and watched until they end; with MOVE = 1 their
//!   ClientIDs connect to TK_A and TK_B in turn at the fault while the old connections
//!   stay open (as `partition`). Prints PUBACKs/s and deliveries/s before, during the
//!   fault, 0-3 s after the heal and after that, the slowest 500 ms of the fault, when
//!   PUBACKs came back to half their rate before the fault after the heal, takeover
//!   p50/p99/max in the same spans, the connections of the healthy nodes that ended
//!   (none should), and for the watched sessions when their connections ended (the
//!   lease), when the majority served them and whether any ClientID was served by two
//!   nodes at once.
//!
//! Every mode prints one JSON line last (`{"mode":...}`). Bounded: every wait has a
//! deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tessera_proto::{
    ConnAck, Connect, ConnectProperties, Encode, Packet, ProtocolVersion, PubAck, Publish,
    PublishProperties, QoS, ReasonCode, Str, Subscribe, Subscription, SubscriptionOptions,
};

const V5: ProtocolVersion = ProtocolVersion::V5;
/// Buckets of the load mode's rates.
const BUCKET: Duration = Duration::from_millis(100);

fn send(s: &mut TcpStream, p: &Packet) -> Result<(), String> {
    let mut out = BytesMut::new();
    p.encode(V5, &mut out).map_err(|e| e.to_string())?;
    s.write_all(&out).map_err(|e| e.to_string())
}

/// The next packet, or why not (`timeout` when the read timeout passed with nothing).
fn recv(s: &mut TcpStream, buf: &mut BytesMut) -> Result<Packet, String> {
    loop {
        match tessera_proto::decode(buf, V5, 1 << 20) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => return Err(format!("decode: {e}")),
        }
        let mut chunk = [0u8; 16384];
        match s.read(&mut chunk) {
            Ok(0) => return Err("closed".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err("timeout".into());
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Connects `id` (MQTT 5); the stream, its read buffer and the CONNACK (whatever its
/// code), or why there was none within `wait`.
fn connect(
    addr: SocketAddr,
    id: &str,
    clean: bool,
    wait: Duration,
) -> Result<(TcpStream, BytesMut, ConnAck), String> {
    let mut s = TcpStream::connect_timeout(&addr, wait).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    let c = Connect {
        version: V5,
        clean_start: clean,
        keep_alive: 120,
        client_id: Str::try_from(id).map_err(|e| e.to_string())?,
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties {
            session_expiry_interval: (!clean).then_some(600),
            ..Default::default()
        },
    };
    send(&mut s, &Packet::Connect(Box::new(c)))?;
    let mut buf = BytesMut::new();
    match recv(&mut s, &mut buf)? {
        Packet::ConnAck(a) => Ok((s, buf, a)),
        p => Err(format!("expected CONNACK, got {:?}", p.packet_type())),
    }
}

fn subscribe(s: &mut TcpStream, buf: &mut BytesMut, filter: &str) -> Result<(), String> {
    send(
        s,
        &Packet::Subscribe(Subscribe {
            packet_id: 1,
            properties: Default::default(),
            subscriptions: vec![Subscription {
                filter: Str::try_from(filter).map_err(|e| e.to_string())?,
                options: SubscriptionOptions::qos(QoS::AtLeastOnce),
            }],
        }),
    )?;
    match recv(s, buf)? {
        Packet::SubAck(_) => Ok(()),
        p => Err(format!("expected SUBACK, got {:?}", p.packet_type())),
    }
}

fn kill(pid: i32) {
    // SAFETY: kill(2) with a pid the caller started; no memory is involved.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        eprintln!("kill {pid}: {}", std::io::Error::last_os_error());
        std::process::exit(2);
    }
}

fn addrs(list: &str) -> Vec<SocketAddr> {
    list.split(',')
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| usage(&format!("not an address: {a}")))
        })
        .collect()
}

fn usage(why: &str) -> ! {
    eprintln!("{why}\nusage: see the header of bench/examples/faults.rs");
    std::process::exit(2);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50, p99, max in ms of `t` (sorted here); zeros when empty.
fn spread(t: &mut [Duration]) -> (f64, f64, f64) {
    if t.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    t.sort();
    let at = |q: f64| ms(t[((t.len() as f64 - 1.0) * q).round() as usize]);
    (at(0.5), at(0.99), ms(t[t.len() - 1]))
}

/// One etcd v3 `PUT` through the HTTP gateway: whether it succeeded.
fn etcd_put(addr: SocketAddr, wait: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, wait) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(wait));
    // key "key", value "v", base64.
    let body = r#"{"key":"a2V5","value":"dg=="}"#;
    let req = format!(
        "POST /v3/kv/put HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    text.starts_with("HTTP/1.1 200") && text.contains("\"header\"") && !text.contains("\"error\"")
}

fn failover(args: &[String]) {
    let [kind, pid, list] = args else {
        usage("failover mqtt|etcd PID ADDR[,ADDR..]")
    };
    let etcd = match kind.as_str() {
        "mqtt" => false,
        "etcd" => true,
        _ => usage("failover mqtt|etcd ..."),
    };
    let pid: i32 = pid.parse().unwrap_or_else(|_| usage("PID"));
    let targets = addrs(list);
    let tag = std::process::id();
    let probe = move |i: usize| -> bool {
        let addr = targets[i % targets.len()];
        if etcd {
            etcd_put(addr, Duration::from_secs(10))
        } else {
            connect(
                addr,
                &format!("fo-{tag}-{i}"),
                true,
                Duration::from_secs(10),
            )
            .is_ok_and(|(_, _, a)| a.reason_code == ReasonCode::Success)
        }
    };
    let probe = Arc::new(probe);
    // The survivors take writes before the kill.
    if !(0..2).all(|i| probe(i)) {
        eprintln!("failover: a probe failed before the kill");
        std::process::exit(1);
    }
    let first: Arc<Mutex<Option<Duration>>> = Arc::default();
    let t0 = Instant::now();
    kill(pid);
    let mut i = 2;
    let deadline = t0 + Duration::from_secs(30);
    while first.lock().unwrap().is_none() && Instant::now() < deadline {
        let (probe, first) = (probe.clone(), first.clone());
        thread::spawn(move || {
            if probe(i) {
                let took = t0.elapsed();
                let mut f = first.lock().unwrap();
                *f = Some(f.map_or(took, |t| t.min(took)));
            }
        });
        i += 1;
        thread::sleep(Duration::from_millis(20));
    }
    // A probe started earlier may still finish first.
    thread::sleep(Duration::from_millis(100));
    let took = *first.lock().unwrap();
    match took {
        Some(t) => {
            println!(
                "failover ({kind}): a write accepted {:.0} ms after the kill",
                ms(t)
            );
            println!(
                r#"{{"mode":"failover","kind":"{kind}","ms":{:.1},"probes":{}}}"#,
                ms(t),
                i - 2
            );
        }
        None => {
            println!("failover ({kind}): no write accepted within 30 s");
            println!(r#"{{"mode":"failover","kind":"{kind}","ms":null}}"#);
            std::process::exit(1);
        }
    }
}

fn sessions(args: &[String]) {
    let (pid, victim, others, n, then, first_try) = match args {
        [p, v, o, n] => (p, v, o, n, None, "0"),
        [p, v, o, n, cmd, after, first] => (
            p,
            v,
            o,
            n,
            Some((cmd.clone(), after.clone())),
            first.as_str(),
        ),
        _ => usage("sessions PID VICTIM OTHERS N [CMD AFTER_MS FIRST_TRY_MS]"),
    };
    let first_try =
        Duration::from_millis(first_try.parse().unwrap_or_else(|_| usage("FIRST_TRY_MS")));
    let pid: i32 = pid.parse().unwrap_or_else(|_| usage("PID"));
    let victim: SocketAddr = victim.parse().unwrap_or_else(|_| usage("VICTIM"));
    let others = Arc::new(addrs(others));
    let n: usize = n.parse().unwrap_or_else(|_| usage("N"));
    let tag = std::process::id();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("fs-{tag}-{i}");
        let (mut s, mut buf, ack) = connect(victim, &id, false, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{id} @ victim: {e}"));
        assert_eq!(ack.reason_code, ReasonCode::Success, "{id}: {ack:?}");
        subscribe(&mut s, &mut buf, &format!("fs/{tag}/{i}")).expect("subscribe");
        held.push(s);
    }
    let t0 = Instant::now();
    kill(pid);
    drop(held);
    if let Some((cmd, after)) = then {
        let after: u64 = after.parse().unwrap_or_else(|_| usage("AFTER_MS"));
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(after).saturating_sub(t0.elapsed()));
            let _ = std::process::Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .status();
        });
    }
    let deadline = t0 + Duration::from_secs(60);
    let workers: Vec<_> = (0..n)
        .map(|i| {
            let others = others.clone();
            thread::spawn(move || {
                let id = format!("fs-{tag}-{i}");
                let mut tries = 0usize;
                let mut refusals = Vec::new();
                thread::sleep(first_try.saturating_sub(t0.elapsed()));
                while Instant::now() < deadline {
                    let addr = others[(i + tries) % others.len()];
                    tries += 1;
                    match connect(addr, &id, false, Duration::from_secs(20)) {
                        Ok((s, _, a)) if a.reason_code == ReasonCode::Success => {
                            let took = t0.elapsed();
                            // Held open until every worker is done, like a live client.
                            return (Some((took, a.session_present, s)), tries, refusals);
                        }
                        Ok((_, _, a)) => refusals.push(format!("{:?}", a.reason_code)),
                        Err(e) => refusals.push(e),
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                (None, tries, refusals)
            })
        })
        .collect();
    let mut times = Vec::new();
    let (mut present, mut tries, mut unserved) = (0, 0, 0);
    let mut why: std::collections::BTreeMap<String, usize> = Default::default();
    let mut keep = Vec::new();
    for w in workers {
        let (served, t, refusals) = w.join().expect("worker");
        tries += t;
        for r in refusals {
            *why.entry(r).or_default() += 1;
        }
        match served {
            Some((took, sp, s)) => {
                times.push(took);
                present += usize::from(sp);
                keep.push(s);
            }
            None => unserved += 1,
        }
    }
    let mut from_try: Vec<Duration> = times.iter().map(|t| t.saturating_sub(first_try)).collect();
    let (p50, p99, max) = spread(&mut times);
    let (t50, t99, tmax) = spread(&mut from_try);
    println!(
        "sessions: {n} on the killed node, first reconnect {} ms after the kill; served \
         again elsewhere: {} (session present: {present}), not within 60 s: {unserved}; \
         kill to CONNACK p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms (from the first \
         try: p50 {t50:.0}, p99 {t99:.0}, max {tmax:.0}); {tries} CONNECTs, refusals/errors: \
         {why:?}",
        first_try.as_millis(),
        times.len()
    );
    println!(
        r#"{{"mode":"sessions","n":{n},"first_try_ms":{},"served":{},"present":{present},"p50_ms":{p50:.1},"p99_ms":{p99:.1},"max_ms":{max:.1},"try_p50_ms":{t50:.1},"try_p99_ms":{t99:.1},"try_max_ms":{tmax:.1},"connects":{tries}}}"#,
        first_try.as_millis(),
        times.len()
    );
    if unserved > 0 {
        std::process::exit(1);
    }
}

/// Runs `sh -c cmd`; exits when it fails.
fn sh(cmd: &str) {
    match std::process::Command::new("sh").arg("-c").arg(cmd).status() {
        Ok(st) if st.success() => {}
        other => {
            eprintln!("`{cmd}`: {other:?}");
            std::process::exit(2);
        }
    }
}

fn partition(args: &[String]) {
    let [cut, victim, others, n] = args else {
        usage("partition CUT_CMD VICTIM OTHERS N")
    };
    let victim: SocketAddr = victim.parse().unwrap_or_else(|_| usage("VICTIM"));
    let others = Arc::new(addrs(others));
    let n: usize = n.parse().unwrap_or_else(|_| usage("N"));
    let tag = std::process::id();
    let go = Arc::new(AtomicBool::new(false));
    let t0 = Arc::new(Mutex::new(Instant::now()));
    // The old connections, each watched until it ends.
    let readers: Vec<_> = (0..n)
        .map(|i| {
            let id = format!("fp-{tag}-{i}");
            let (mut s, mut buf, ack) = connect(victim, &id, false, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{id} @ victim: {e}"));
            assert_eq!(ack.reason_code, ReasonCode::Success, "{id}: {ack:?}");
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let (go, t0) = (go.clone(), t0.clone());
            thread::spawn(move || {
                let got = recv(&mut s, &mut buf);
                let at = Instant::now();
                while !go.load(Ordering::Acquire) {
                    thread::yield_now();
                }
                let how = match got {
                    Ok(Packet::Disconnect(d)) => format!("DISCONNECT {:?}", d.reason_code),
                    Ok(p) => format!("{:?}", p.packet_type()),
                    Err(e) => e,
                };
                (at.saturating_duration_since(*t0.lock().unwrap()), how)
            })
        })
        .collect();
    {
        let mut t = t0.lock().unwrap();
        *t = Instant::now();
        sh(cut);
    }
    go.store(true, Ordering::Release);
    let start = *t0.lock().unwrap();
    let deadline = start + Duration::from_secs(60);
    // The same ClientIDs connect to the majority at once.
    let movers: Vec<_> = (0..n)
        .map(|i| {
            let others = others.clone();
            thread::spawn(move || {
                let id = format!("fp-{tag}-{i}");
                let mut tries = 0usize;
                while Instant::now() < deadline {
                    let addr = others[(i + tries) % others.len()];
                    tries += 1;
                    if let Ok((s, _, a)) = connect(addr, &id, false, Duration::from_secs(20))
                        && a.reason_code == ReasonCode::Success
                    {
                        return Some((start.elapsed(), a.session_present, s));
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                None
            })
        })
        .collect();
    let mut old = Vec::new();
    let mut how: std::collections::BTreeMap<String, usize> = Default::default();
    for r in readers {
        let (t, h) = r.join().expect("reader");
        old.push(t);
        *how.entry(h).or_default() += 1;
    }
    let mut new = Vec::new();
    let (mut unserved, mut present, mut overlap) = (0, 0, 0);
    let mut margin = Duration::MAX;
    let mut keep = Vec::new();
    for (i, m) in movers.into_iter().enumerate() {
        match m.join().expect("mover") {
            Some((t, sp, s)) => {
                new.push(t);
                present += usize::from(sp);
                if t < old[i] {
                    overlap += 1;
                }
                margin = margin.min(t.saturating_sub(old[i]));
                keep.push(s);
            }
            None => unserved += 1,
        }
    }
    let (o50, _, omax) = spread(&mut old);
    let omin = old.first().map_or(0.0, |t| ms(*t));
    let (n50, n99, nmax) = spread(&mut new);
    let margin = if margin == Duration::MAX {
        0.0
    } else {
        ms(margin)
    };
    println!(
        "partition: {n} clients of the cut-off node: old connections ended after min \
         {omin:.0}, p50 {o50:.0}, max {omax:.0} ms ({how:?}); served on the majority after \
         p50 {n50:.0}, p99 {n99:.0}, max {nmax:.0} ms ({} served, {present} with session \
         present, {unserved} not within 60 s); live on both at once: {overlap}, smallest gap \
         between the old end and the new CONNACK {margin:.0} ms",
        new.len()
    );
    println!(
        r#"{{"mode":"partition","n":{n},"old_min_ms":{omin:.1},"old_p50_ms":{o50:.1},"old_max_ms":{omax:.1},"served":{},"present":{present},"new_p50_ms":{n50:.1},"new_p99_ms":{n99:.1},"new_max_ms":{nmax:.1},"overlap":{overlap},"min_gap_ms":{margin:.1}}}"#,
        new.len()
    );
    if overlap > 0 || unserved > 0 {
        std::process::exit(1);
    }
}

fn lease(args: &[String]) {
    let [pids, victim, n] = args else {
        usage("lease PIDS VICTIM N")
    };
    let pids: Vec<i32> = pids
        .split(',')
        .map(|p| p.parse().unwrap_or_else(|_| usage("PIDS")))
        .collect();
    let victim: SocketAddr = victim.parse().unwrap_or_else(|_| usage("VICTIM"));
    let n: usize = n.parse().unwrap_or_else(|_| usage("N"));
    let tag = std::process::id();
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let id = format!("fl-{tag}-{i}");
            let (s, buf, ack) = connect(victim, &id, true, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(ack.reason_code, ReasonCode::Success, "{id}: {ack:?}");
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            (s, buf)
        })
        .collect();
    let go = Arc::new(AtomicBool::new(false));
    let t0 = Arc::new(Mutex::new(Instant::now()));
    let readers: Vec<_> = clients
        .into_iter()
        .map(|(mut s, mut buf)| {
            let (go, t0) = (go.clone(), t0.clone());
            thread::spawn(move || {
                let got = recv(&mut s, &mut buf);
                let at = Instant::now();
                while !go.load(Ordering::Acquire) {
                    thread::yield_now();
                }
                let t0 = *t0.lock().unwrap();
                let how = match got {
                    Ok(Packet::Disconnect(d)) => format!("DISCONNECT {:?}", d.reason_code),
                    Ok(p) => format!("{:?}", p.packet_type()),
                    Err(e) => e,
                };
                (at.saturating_duration_since(t0), how)
            })
        })
        .collect();
    {
        let mut t = t0.lock().unwrap();
        *t = Instant::now();
        for p in &pids {
            kill(*p);
        }
    }
    go.store(true, Ordering::Release);
    let mut times = Vec::new();
    let mut how: std::collections::BTreeMap<String, usize> = Default::default();
    for r in readers {
        let (t, h) = r.join().expect("reader");
        times.push(t);
        *how.entry(h).or_default() += 1;
    }
    let (p50, _, max) = spread(&mut times);
    let min = times.first().map_or(0.0, |t| ms(*t));
    println!(
        "lease: {n} clients of a node cut off (the others killed): ended after min {min:.0} \
         ms, p50 {p50:.0} ms, max {max:.0} ms: {how:?}"
    );
    println!(
        r#"{{"mode":"lease","n":{n},"min_ms":{min:.1},"p50_ms":{p50:.1},"max_ms":{max:.1},"disconnect_0x9c":{}}}"#,
        how.get("DISCONNECT UseAnotherServer").copied().unwrap_or(0)
    );
}

/// Counts per [`BUCKET`] since the load started.
struct Buckets(Vec<AtomicU64>);

impl Buckets {
    fn new(span: Duration) -> Buckets {
        let n = (span.as_millis() / BUCKET.as_millis()) as usize + 2;
        Buckets((0..n).map(|_| AtomicU64::new(0)).collect())
    }

    fn add(&self, start: Instant) {
        let i = (start.elapsed().as_millis() / BUCKET.as_millis()) as usize;
        if let Some(b) = self.0.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Mean per second over [from, to).
    fn rate(&self, from: Duration, to: Duration) -> f64 {
        let (a, b) = (
            (from.as_millis() / BUCKET.as_millis()) as usize,
            ((to.as_millis() / BUCKET.as_millis()) as usize).min(self.0.len()),
        );
        if b <= a {
            return 0.0;
        }
        let sum: u64 = self.0[a..b].iter().map(|c| c.load(Ordering::Relaxed)).sum();
        sum as f64 / ((b - a) as f64 * BUCKET.as_secs_f64())
    }

    /// The slowest 500 ms (5 buckets) in [from, to), per second, and where it starts.
    fn slowest(&self, from: Duration, to: Duration) -> (f64, Duration) {
        let mut best = (f64::MAX, from);
        let mut at = from;
        while at + BUCKET * 5 <= to {
            let r = self.rate(at, at + BUCKET * 5);
            if r < best.0 {
                best = (r, at);
            }
            at += BUCKET;
        }
        best
    }
}

/// A survivor's connection that ended: when (since the start), whose, why.
type Ended = Arc<Mutex<Vec<(Duration, String, String)>>>;

struct Load {
    start: Instant,
    stop: AtomicBool,
    acks: Buckets,
    deliveries: Buckets,
    ended: Ended,
}

fn publisher(load: Arc<Load>, addr: SocketAddr, id: String, topic: String, window: usize) {
    let payload = Bytes::from(vec![b'x'; 64]);
    while !load.stop.load(Ordering::Relaxed) {
        let Ok((mut s, mut buf, ack)) = connect(addr, &id, true, Duration::from_secs(5)) else {
            thread::sleep(Duration::from_millis(100));
            continue;
        };
        if ack.reason_code != ReasonCode::Success {
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut next_id = 1u16;
        let mut publish = |s: &mut TcpStream| {
            let p = Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: Str::try_from(topic.as_str()).expect("topic"),
                packet_id: next_id,
                properties: PublishProperties::default(),
                payload: payload.clone(),
            };
            next_id = next_id.checked_add(1).unwrap_or(1);
            send(s, &Packet::Publish(p))
        };
        let mut result = (0..window).try_for_each(|_| publish(&mut s));
        while result.is_ok() && !load.stop.load(Ordering::Relaxed) {
            result = match recv(&mut s, &mut buf) {
                Ok(Packet::PubAck(_)) => {
                    load.acks.add(load.start);
                    publish(&mut s)
                }
                Ok(Packet::Disconnect(d)) => Err(format!("DISCONNECT {:?}", d.reason_code)),
                Ok(_) => Ok(()),
                Err(e) if e == "timeout" => Ok(()),
                Err(e) => Err(e),
            };
        }
        if let Err(e) = result {
            load.ended
                .lock()
                .unwrap()
                .push((load.start.elapsed(), id.clone(), e));
        }
    }
}

fn subscriber(load: Arc<Load>, addr: SocketAddr, id: String, filter: String, count: bool) {
    while !load.stop.load(Ordering::Relaxed) {
        let Ok((mut s, mut buf, ack)) = connect(addr, &id, true, Duration::from_secs(5)) else {
            if !count {
                return; // the victim's subscriber: gone with its node
            }
            thread::sleep(Duration::from_millis(100));
            continue;
        };
        if ack.reason_code != ReasonCode::Success || subscribe(&mut s, &mut buf, &filter).is_err() {
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut result = Ok(());
        while result.is_ok() && !load.stop.load(Ordering::Relaxed) {
            result = match recv(&mut s, &mut buf) {
                Ok(Packet::Publish(p)) => {
                    if count {
                        load.deliveries.add(load.start);
                    }
                    send(&mut s, &Packet::PubAck(PubAck::new(p.packet_id)))
                }
                Ok(Packet::Disconnect(d)) => Err(format!("DISCONNECT {:?}", d.reason_code)),
                Ok(_) => Ok(()),
                Err(e) if e == "timeout" => Ok(()),
                Err(e) => Err(e),
            };
        }
        if let Err(e) = result {
            if !count {
                return;
            }
            load.ended
                .lock()
                .unwrap()
                .push((load.start.elapsed(), id.clone(), e));
        }
    }
}

/// Takes a persistent session over between `a` and `b` every 20 ms: (start since the
/// load's start, CONNECT to CONNACK, accepted with session present).
fn takeovers(
    load: Arc<Load>,
    a: SocketAddr,
    b: SocketAddr,
    id: String,
) -> Vec<(Duration, Duration, bool)> {
    let mut out = Vec::new();
    let mut held = None;
    let mut round = 0usize;
    while !load.stop.load(Ordering::Relaxed) {
        let to = if round.is_multiple_of(2) { a } else { b };
        round += 1;
        let at = load.start.elapsed();
        let started = Instant::now();
        let ok = match connect(to, &id, false, Duration::from_secs(15)) {
            Ok((s, _, ack)) if ack.reason_code == ReasonCode::Success => {
                let first = held.is_none();
                held = Some(s);
                ack.session_present || first
            }
            _ => false,
        };
        out.push((at, started.elapsed(), ok));
        thread::sleep(Duration::from_millis(20));
    }
    out
}

fn load(args: &[String]) {
    const USAGE: &str = "load PID PUBS SUBS VICTIM_SUB TK_A TK_B SECONDS KILL_AT \
                         [PUBLISHERS WINDOW [RESTART_CMD RESTART_AFTER_MS]]";
    let (fixed, rest) = args.split_at(args.len().min(8));
    let [pid, pubs, subs, vsub, tk_a, tk_b, secs, kill_at] = fixed else {
        usage(USAGE)
    };
    let (per, window, restart) = match rest {
        [] => ("2", "16", None),
        [per, w] => (per.as_str(), w.as_str(), None),
        [per, w, cmd, after] => (
            per.as_str(),
            w.as_str(),
            Some((
                cmd.clone(),
                Duration::from_millis(after.parse().unwrap_or_else(|_| usage(USAGE))),
            )),
        ),
        _ => usage(USAGE),
    };
    let pid: i32 = pid.parse().unwrap_or_else(|_| usage("PID"));
    let pubs = addrs(pubs);
    let mut subs: Vec<(SocketAddr, bool)> = addrs(subs).into_iter().map(|a| (a, true)).collect();
    if vsub != "-" {
        subs.push((vsub.parse().unwrap_or_else(|_| usage("VICTIM_SUB")), false));
    }
    let tk_a: SocketAddr = tk_a.parse().unwrap_or_else(|_| usage("TK_A"));
    let tk_b: SocketAddr = tk_b.parse().unwrap_or_else(|_| usage("TK_B"));
    let secs = Duration::from_secs(secs.parse().unwrap_or_else(|_| usage("SECONDS")));
    let kill_at = Duration::from_secs(kill_at.parse().unwrap_or_else(|_| usage("KILL_AT")));
    let per: usize = per.parse().unwrap_or_else(|_| usage("PUBLISHERS"));
    let window: usize = window.parse().unwrap_or_else(|_| usage("WINDOW"));
    if kill_at + Duration::from_secs(4) > secs || kill_at < Duration::from_secs(2) {
        usage("KILL_AT: at least 2 s in and 4 s before the end");
    }
    let tag = std::process::id();
    let load = Arc::new(Load {
        start: Instant::now(),
        stop: AtomicBool::new(false),
        acks: Buckets::new(secs),
        deliveries: Buckets::new(secs),
        ended: Arc::default(),
    });
    let mut threads = Vec::new();
    for (i, (addr, count)) in subs.iter().enumerate() {
        let (load, addr, count) = (load.clone(), *addr, *count);
        threads.push(thread::spawn(move || {
            subscriber(
                load,
                addr,
                format!("ls-{tag}-{i}"),
                format!("ld/{tag}/#"),
                count,
            )
        }));
    }
    thread::sleep(Duration::from_millis(500)); // every node has the route
    for (i, addr) in pubs.iter().enumerate() {
        for j in 0..per {
            let (load, addr) = (load.clone(), *addr);
            threads.push(thread::spawn(move || {
                publisher(
                    load,
                    addr,
                    format!("lp-{tag}-{i}-{j}"),
                    format!("ld/{tag}/{i}/{j}"),
                    window,
                )
            }));
        }
    }
    let tk = {
        let load = load.clone();
        thread::spawn(move || takeovers(load, tk_a, tk_b, format!("lt-{tag}")))
    };
    thread::sleep(kill_at.saturating_sub(load.start.elapsed()));
    let killed = load.start.elapsed();
    kill(pid);
    let restarted = restart.map(|(cmd, after)| {
        thread::sleep((killed + after).saturating_sub(load.start.elapsed()));
        let at = load.start.elapsed();
        sh(&cmd);
        at
    });
    thread::sleep(secs.saturating_sub(load.start.elapsed()));
    load.stop.store(true, Ordering::Relaxed);
    let tks = tk.join().expect("takeovers");
    for t in threads {
        let _ = t.join();
    }
    let during = killed + Duration::from_secs(3);
    let spans = [
        ("before", Duration::from_secs(1), killed),
        ("0-3 s after the kill", killed, during),
        ("after", during, secs),
    ];
    let mut json = format!(
        r#"{{"mode":"load","victim_subscribed":{},"kill_at_ms":{:.0}"#,
        vsub != "-",
        ms(killed)
    );
    for (name, from, to) in spans {
        // A takeover counts where it ended: one waiting through the election is the
        // fault's.
        let within = |at: &Duration, d: &Duration| *at + *d >= from && *at + *d < to;
        let mut t: Vec<Duration> = tks
            .iter()
            .filter(|(at, d, _)| within(at, d))
            .map(|(_, d, _)| *d)
            .collect();
        let failed = tks
            .iter()
            .filter(|(at, d, ok)| within(at, d) && !ok)
            .count();
        let (p50, p99, max) = spread(&mut t);
        let (acks, dels) = (load.acks.rate(from, to), load.deliveries.rate(from, to));
        println!(
            "{name:>22}: PUBACKs {acks:>8.0}/s, deliveries {dels:>8.0}/s; takeovers {} \
             (failed {failed}): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
            t.len()
        );
        let key = name.split(' ').next().unwrap_or(name).replace('-', "_");
        json.push_str(&format!(
            r#","{key}":{{"acks_per_s":{acks:.0},"deliveries_per_s":{dels:.0},"takeovers":{},"takeovers_failed":{failed},"tk_p50_ms":{p50:.2},"tk_p99_ms":{p99:.2},"tk_max_ms":{max:.2}}}"#,
            t.len()
        ));
    }
    let (low, low_at) = load.acks.slowest(killed, secs);
    let ended = load.ended.lock().unwrap().clone();
    println!(
        "slowest 500 ms after the kill: {low:.0} PUBACKs/s, from {:.1} s after it; \
         connections of the survivors that ended: {}{}",
        (low_at - killed).as_secs_f64(),
        ended.len(),
        ended
            .iter()
            .map(|(at, who, why)| format!(" [{:.2} s {who}: {why}]", at.as_secs_f64()))
            .collect::<String>()
    );
    if let Some(at) = restarted {
        // The first 500 ms after the restart at half the rate before the kill, or more.
        let half = load.acks.rate(Duration::from_secs(1), killed) / 2.0;
        let mut from = at;
        let mut back = None;
        while from + BUCKET * 5 <= secs {
            if load.acks.rate(from, from + BUCKET * 5) >= half {
                back = Some(from - at);
                break;
            }
            from += BUCKET;
        }
        let back_ms = back.map_or("null".to_owned(), |d| format!("{:.0}", ms(d)));
        println!(
            "the killed node restarted {:.1} s after the kill; PUBACKs back at half the \
             rate before the kill {back_ms} ms after the restart (null: not by the end)",
            (at - killed).as_secs_f64()
        );
        json.push_str(&format!(
            r#","restart_after_kill_ms":{:.0},"back_after_restart_ms":{back_ms}"#,
            ms(at - killed)
        ));
    }
    json.push_str(&format!(
        r#","slowest_500ms_acks_per_s":{low:.0},"survivors_ended":{}}}"#,
        ended.len()
    ));
    println!("{json}");
}

/// A watched session on the faulty node: when its connection ended (since the load's
/// start) and how, if it did before the end.
fn watch_one(load: Arc<Load>, mut s: TcpStream, mut buf: BytesMut) -> Option<(Duration, String)> {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    while !load.stop.load(Ordering::Relaxed) {
        match recv(&mut s, &mut buf) {
            Err(e) if e == "timeout" => {}
            Ok(Packet::Disconnect(d)) => {
                return Some((
                    load.start.elapsed(),
                    format!("DISCONNECT {:?}", d.reason_code),
                ));
            }
            Ok(_) => {}
            Err(e) => return Some((load.start.elapsed(), e)),
        }
    }
    None
}

/// The first 500 ms from `from` on whose PUBACK rate is at least `rate`: how long after
/// `from` it starts.
fn back_at(acks: &Buckets, from: Duration, end: Duration, rate: f64) -> Option<Duration> {
    let mut at = from;
    while at + BUCKET * 5 <= end {
        if acks.rate(at, at + BUCKET * 5) >= rate {
            return Some(at - from);
        }
        at += BUCKET;
    }
    None
}

fn netload(args: &[String]) {
    const USAGE: &str = "netload FAULT_CMD HEAL_CMD PUBS SUBS VICTIM_SUB TK_A TK_B SECONDS \
                         FAULT_AT HEAL_AT PUBLISHERS WINDOW WATCH N MOVE";
    let [
        fault,
        heal,
        pubs,
        subs,
        vsub,
        tk_a,
        tk_b,
        secs,
        fault_at,
        heal_at,
        per,
        window,
        watch,
        n,
        move_,
    ] = args
    else {
        usage(USAGE)
    };
    let pubs = addrs(pubs);
    let mut subs: Vec<(SocketAddr, bool)> = addrs(subs).into_iter().map(|a| (a, true)).collect();
    if vsub != "-" {
        subs.push((vsub.parse().unwrap_or_else(|_| usage("VICTIM_SUB")), false));
    }
    let tk_a: SocketAddr = tk_a.parse().unwrap_or_else(|_| usage("TK_A"));
    let tk_b: SocketAddr = tk_b.parse().unwrap_or_else(|_| usage("TK_B"));
    let secs_of = |s: &str, what: &str| -> Duration {
        Duration::from_secs_f64(s.parse().unwrap_or_else(|_| usage(what)))
    };
    let secs = secs_of(secs, "SECONDS");
    let fault_at = secs_of(fault_at, "FAULT_AT");
    let heal_at = secs_of(heal_at, "HEAL_AT");
    if fault_at < Duration::from_secs(2)
        || heal_at < fault_at + Duration::from_secs(1)
        || heal_at + Duration::from_secs(4) > secs
    {
        usage("FAULT_AT >= 2 s, HEAL_AT >= FAULT_AT + 1 s, SECONDS >= HEAL_AT + 4 s");
    }
    let per: usize = per.parse().unwrap_or_else(|_| usage("PUBLISHERS"));
    let window: usize = window.parse().unwrap_or_else(|_| usage("WINDOW"));
    let watch: Option<SocketAddr> =
        (watch != "-").then(|| watch.parse().unwrap_or_else(|_| usage("WATCH")));
    let n: usize = n.parse().unwrap_or_else(|_| usage("N"));
    let moving = move_ == "1";
    let tag = std::process::id();
    let load = Arc::new(Load {
        start: Instant::now(),
        stop: AtomicBool::new(false),
        acks: Buckets::new(secs),
        deliveries: Buckets::new(secs),
        ended: Arc::default(),
    });
    // The watched sessions first: connected before any load.
    let watchers: Vec<_> = match watch {
        None => Vec::new(),
        Some(addr) => (0..n)
            .map(|i| {
                let id = format!("fw-{tag}-{i}");
                let (s, buf, ack) = connect(addr, &id, false, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("{id} @ the faulty node: {e}"));
                assert_eq!(ack.reason_code, ReasonCode::Success, "{id}: {ack:?}");
                let load = load.clone();
                thread::spawn(move || watch_one(load, s, buf))
            })
            .collect(),
    };
    let mut threads = Vec::new();
    for (i, (addr, count)) in subs.iter().enumerate() {
        let (load, addr, count) = (load.clone(), *addr, *count);
        threads.push(thread::spawn(move || {
            subscriber(
                load,
                addr,
                format!("ls-{tag}-{i}"),
                format!("ld/{tag}/#"),
                count,
            )
        }));
    }
    thread::sleep(Duration::from_millis(500)); // every node has the route
    for (i, addr) in pubs.iter().enumerate() {
        for j in 0..per {
            let (load, addr) = (load.clone(), *addr);
            threads.push(thread::spawn(move || {
                publisher(
                    load,
                    addr,
                    format!("lp-{tag}-{i}-{j}"),
                    format!("ld/{tag}/{i}/{j}"),
                    window,
                )
            }));
        }
    }
    let tk = {
        let load = load.clone();
        thread::spawn(move || takeovers(load, tk_a, tk_b, format!("lt-{tag}")))
    };
    thread::sleep(fault_at.saturating_sub(load.start.elapsed()));
    let faulted = load.start.elapsed();
    sh(fault);
    // The watched ClientIDs come to the majority at once, their old connections open.
    let movers: Vec<_> = if moving {
        (0..n)
            .map(|i| {
                let load = load.clone();
                let to = [tk_a, tk_b];
                thread::spawn(move || {
                    let id = format!("fw-{tag}-{i}");
                    let mut tries = 0usize;
                    while !load.stop.load(Ordering::Relaxed) {
                        let addr = to[(i + tries) % 2];
                        tries += 1;
                        if let Ok((s, _, a)) = connect(addr, &id, false, Duration::from_secs(20))
                            && a.reason_code == ReasonCode::Success
                        {
                            let at = load.start.elapsed();
                            // Held until the end, like a live client.
                            while !load.stop.load(Ordering::Relaxed) {
                                thread::sleep(Duration::from_millis(50));
                            }
                            drop(s);
                            return Some((at, a.session_present));
                        }
                        thread::sleep(Duration::from_millis(100));
                    }
                    None
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    thread::sleep(heal_at.saturating_sub(load.start.elapsed()));
    let healed = load.start.elapsed();
    sh(heal);
    thread::sleep(secs.saturating_sub(load.start.elapsed()));
    load.stop.store(true, Ordering::Relaxed);
    let tks = tk.join().expect("takeovers");
    for t in threads {
        let _ = t.join();
    }
    let old: Vec<Option<(Duration, String)>> = watchers
        .into_iter()
        .map(|w| w.join().expect("watcher"))
        .collect();
    let new: Vec<Option<(Duration, bool)>> = movers
        .into_iter()
        .map(|m| m.join().expect("mover"))
        .collect();

    let after = healed + Duration::from_secs(3);
    let spans = [
        ("before", Duration::from_secs(1), faulted),
        ("during", faulted, healed),
        ("0-3 s after the heal", healed, after),
        ("after", after, secs),
    ];
    let before_rate = load.acks.rate(Duration::from_secs(1), faulted);
    let mut json = format!(
        r#"{{"mode":"netload","fault_at_ms":{:.0},"heal_at_ms":{:.0},"victim_subscribed":{}"#,
        ms(faulted),
        ms(healed),
        vsub != "-"
    );
    for (name, from, to) in spans {
        let within = |at: &Duration, d: &Duration| *at + *d >= from && *at + *d < to;
        let mut t: Vec<Duration> = tks
            .iter()
            .filter(|(at, d, _)| within(at, d))
            .map(|(_, d, _)| *d)
            .collect();
        let failed = tks
            .iter()
            .filter(|(at, d, ok)| within(at, d) && !ok)
            .count();
        let (p50, p99, max) = spread(&mut t);
        let (acks, dels) = (load.acks.rate(from, to), load.deliveries.rate(from, to));
        let ratio = if before_rate > 0.0 {
            acks / before_rate
        } else {
            0.0
        };
        println!(
            "{name:>22}: PUBACKs {acks:>8.0}/s ({ratio:.2}x before), deliveries {dels:>8.0}/s; \
             takeovers {} (failed {failed}): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
            t.len()
        );
        let key = match name {
            "0-3 s after the heal" => "healed",
            k => k,
        };
        json.push_str(&format!(
            r#","{key}":{{"acks_per_s":{acks:.0},"ratio":{ratio:.3},"deliveries_per_s":{dels:.0},"takeovers":{},"takeovers_failed":{failed},"tk_p50_ms":{p50:.2},"tk_p99_ms":{p99:.2},"tk_max_ms":{max:.2}}}"#,
            t.len()
        ));
    }
    let (low, low_at) = load.acks.slowest(faulted, healed);
    let back = back_at(&load.acks, healed, secs, before_rate / 2.0);
    let back_ms = back.map_or("null".to_owned(), |d| format!("{:.0}", ms(d)));
    let ended = load.ended.lock().unwrap().clone();
    println!(
        "slowest 500 ms of the fault: {low:.0} PUBACKs/s, {:.1} s into it; PUBACKs at half \
         the rate before the fault {back_ms} ms after the heal (null: not by the end); \
         connections of the healthy nodes that ended: {}{}",
        (low_at - faulted).as_secs_f64(),
        ended.len(),
        ended
            .iter()
            .map(|(at, who, why)| format!(" [{:.2} s {who}: {why}]", at.as_secs_f64()))
            .collect::<String>()
    );
    json.push_str(&format!(
        r#","slowest_500ms_acks_per_s":{low:.0},"back_after_heal_ms":{back_ms},"healthy_ended":{}"#,
        ended.len()
    ));
    if watch.is_some() {
        let mut ends: Vec<Duration> = old
            .iter()
            .flatten()
            .map(|(at, _)| at.saturating_sub(faulted))
            .collect();
        let mut how: std::collections::BTreeMap<String, usize> = Default::default();
        for o in &old {
            let h = o.as_ref().map_or("still open", |(_, h)| h.as_str());
            *how.entry(h.to_owned()).or_default() += 1;
        }
        let (e50, _, emax) = spread(&mut ends);
        let emin = ends.first().map_or(0.0, |t| ms(*t));
        json.push_str(&format!(
            r#","watched":{n},"watched_ended":{},"old_min_ms":{emin:.1},"old_p50_ms":{e50:.1},"old_max_ms":{emax:.1}"#,
            ends.len()
        ));
        print!(
            "{n} sessions on the faulty node: {} ended, after min {emin:.0}, p50 {e50:.0}, max \
             {emax:.0} ms from the fault ({how:?})",
            ends.len()
        );
        if moving {
            let (mut overlap, mut present, mut unserved) = (0, 0, 0);
            let mut served = Vec::new();
            let mut margin = Duration::MAX;
            for (o, m) in old.iter().zip(&new) {
                let Some((at, sp)) = m else {
                    unserved += 1;
                    continue;
                };
                served.push(at.saturating_sub(faulted));
                present += usize::from(*sp);
                match o {
                    Some((end, _)) if end <= at => margin = margin.min(*at - *end),
                    _ => overlap += 1,
                }
            }
            let (s50, s99, smax) = spread(&mut served);
            let margin = if margin == Duration::MAX {
                0.0
            } else {
                ms(margin)
            };
            print!(
                "; served on the majority after p50 {s50:.0}, p99 {s99:.0}, max {smax:.0} ms \
                 ({} served, {present} with session present, {unserved} not by the end); live \
                 on two nodes at once: {overlap}, smallest gap old end to new CONNACK \
                 {margin:.0} ms",
                served.len()
            );
            json.push_str(&format!(
                r#","served":{},"present":{present},"new_p50_ms":{s50:.1},"new_p99_ms":{s99:.1},"new_max_ms":{smax:.1},"overlap":{overlap},"min_gap_ms":{margin:.1}"#,
                served.len()
            ));
        }
        println!();
    }
    json.push('}');
    println!("{json}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = args.split_first() else {
        usage("a mode: failover, sessions, lease, partition, load or netload")
    };
    match mode.as_str() {
        "failover" => failover(rest),
        "sessions" => sessions(rest),
        "lease" => lease(rest),
        "partition" => partition(rest),
        "load" => load(rest),
        "netload" => netload(rest),
        m => usage(&format!("unknown mode {m}")),
    }
}
