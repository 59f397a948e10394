//! Network namespaces for the process fault tests (issue 16, `cluster_faults`): each
//! broker node runs in its own namespace, joined by a veth pair to a bridge in the root
//! namespace, so the test can cut, slow and drop the traffic between two nodes with
//! `iptables` inside their namespaces while its own clients (in the root namespace,
//! through the bridge's address) still reach every node.
//!
//! Layout, per [`Net`]: a bridge `tsb<pid>_<k>` with address `10.213.C.1/24` (C chosen
//! free under a file lock, so concurrent test processes and threads never share a
//! subnet); node `i` (from 1) in namespace `tsn<pid>_<k>_<i>`, its veth `tsv<pid>_<k>_<i>`
//! on the bridge and `eth0` with `10.213.C.(10+i)` inside, `lo` up. Every name is at
//! most 15 characters and carries the test process's pid, so [`sweep`] (run once per
//! process, before the first `Net`) removes what a dead run left (its processes, its
//! namespaces, links and root `FORWARD` rules).
//!
//! Faults are `iptables` rules in the nodes' own namespaces (so they go with them):
//! drops for partitions (two-way, one-way, a node isolated from the other nodes but
//! not from the test's clients), `-m statistic --mode random` drops for loss, and
//! `NFQUEUE` to `bench/scripts/nfq-delay.py` for delay (this kernel has no netem).
//! [`Net::heal`] removes every fault. Drop removes every rule, delay process,
//! process in the namespaces (the broker nodes included), namespace, link and root rule
//! it made, also when the test panics. Needs root, `ip`, `iptables` and `python3`: a
//! missing one fails the test (the `third-party` feature's script installs them).

use std::io::Read;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The /16 the test subnets are taken from (one /24 per `Net`).
const NET16: [u8; 2] = [10, 213];
const LOCK_FILE: &str = "/tmp/tessera-netns.lock";

/// Runs `program args`; its stdout, or the error with stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program} {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `program args` and panics if it fails.
fn must(program: &str, args: &[&str]) -> String {
    run(program, args).unwrap_or_else(|e| panic!("{e}"))
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in a name `<prefix><pid>_...` of ours, if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = ["tsn", "tsb", "tsv"]
        .iter()
        .find_map(|p| name.strip_prefix(p))?;
    rest.split('_').next()?.parse().ok()
}

/// Kills every process in namespace `ns` (SIGKILL), waiting (bounded) until none is
/// left.
fn kill_in_ns(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = run("ip", &["netns", "pids", ns]).unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid; at worst it names a process already gone.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes what runs of dead processes left: the processes in their namespaces, the
/// namespaces, their links and their root `FORWARD` rules. Once per process.
pub fn sweep() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let dead = |name: &str| owner_pid(name).is_some_and(|pid| !pid_alive(pid));
        for line in run("ip", &["netns", "list"]).unwrap_or_default().lines() {
            let ns = line.split_whitespace().next().unwrap_or("");
            if dead(ns) {
                eprintln!("netns: removing leftover namespace {ns}");
                kill_in_ns(ns);
                let _ = run("ip", &["netns", "del", ns]);
            }
        }
        for line in run("ip", &["-o", "link", "show"])
            .unwrap_or_default()
            .lines()
        {
            // "12: tsv123_0_1@if2: <...>"
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or("");
            if dead(name) {
                eprintln!("netns: removing leftover link {name}");
                let _ = run("ip", &["link", "del", name]);
            }
        }
        for rule in run("iptables", &["-S", "FORWARD"])
            .unwrap_or_default()
            .lines()
        {
            let ours = rule
                .split_whitespace()
                .any(|w| owner_pid(w).is_some() && dead(w));
            if ours && let Some(spec) = rule.strip_prefix("-A ") {
                let mut args = vec!["-D"];
                args.extend(spec.split_whitespace());
                let _ = run("iptables", &args);
            }
        }
    });
}

/// An exclusive `flock` on [`LOCK_FILE`], released on drop.
struct FileLock(std::fs::File);

impl FileLock {
    fn take() -> FileLock {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .expect("open the netns lock file");
        // SAFETY: flock(2) on a descriptor we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        FileLock(f)
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// One iptables rule made by the test, deleted by spec.
#[derive(Debug, Clone)]
struct Rule {
    /// The namespace (`None`: the root namespace).
    ns: Option<String>,
    chain: &'static str,
    spec: Vec<String>,
}

impl Rule {
    fn args(&self, op: &'static str) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(ns) = &self.ns {
            a.extend(["netns".into(), "exec".into(), ns.clone(), "iptables".into()]);
        }
        a.push("-w".into());
        a.push(op.into());
        a.push(self.chain.into());
        a.extend(self.spec.iter().cloned());
        a
    }

    fn program(&self) -> &'static str {
        if self.ns.is_some() { "ip" } else { "iptables" }
    }

    fn add(&self) {
        let args = self.args("-A");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        must(self.program(), &args);
    }

    fn delete(&self) -> Result<String, String> {
        let args = self.args("-D");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(self.program(), &args)
    }
}

/// A delay line (`nfq-delay.py`) running in one namespace.
struct Delay {
    child: Child,
}

/// One node's place in the network.
#[derive(Debug, Clone)]
pub struct NetNode {
    pub ns: String,
    pub veth: String,
    pub ip: Ipv4Addr,
}

/// The network of one test: a bridge and a namespace per node. See the module doc.
pub struct Net {
    pub bridge: String,
    /// The bridge's address: the test's clients reach the nodes from it.
    pub host_ip: Ipv4Addr,
    pub nodes: Vec<NetNode>,
    /// Root-namespace rules (the bridge's FORWARD accept), kept until drop.
    root_rules: Vec<Rule>,
    /// Fault rules in the nodes' namespaces, removed by [`Net::heal`].
    faults: Vec<Rule>,
    delays: Vec<Delay>,
}

impl Net {
    /// A bridge and `nodes` namespaces (nodes numbered from 1).
    pub fn new(nodes: usize) -> Net {
        assert!((1..=200).contains(&nodes));
        for tool in ["ip", "iptables", "python3"] {
            assert!(
                run("sh", &["-c", &format!("command -v {tool}")]).is_ok(),
                "netns: `{tool}` is missing (scripts/test-third-party.sh installs it)"
            );
        }
        // SAFETY: geteuid(2) has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "netns: needs root");
        sweep();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let bridge = format!("tsb{pid}_{k}");
        let mut net = Net {
            bridge: bridge.clone(),
            host_ip: Ipv4Addr::UNSPECIFIED,
            nodes: Vec::new(),
            root_rules: Vec::new(),
            faults: Vec::new(),
            delays: Vec::new(),
        };
        {
            // Choose a free /24 and take it (the bridge's address) under the lock.
            let _lock = FileLock::take();
            let used = must("ip", &["-o", "-4", "addr", "show"]);
            let start = (pid.wrapping_mul(7).wrapping_add(k.wrapping_mul(13))) % 250;
            let c = (0..250)
                .map(|i| ((start + i) % 250) as u8)
                .find(|c| !used.contains(&format!(" {}.{}.{c}.", NET16[0], NET16[1])))
                .expect("a free /24 in 10.213.0.0/16");
            net.host_ip = Ipv4Addr::new(NET16[0], NET16[1], c, 1);
            must("ip", &["link", "add", &bridge, "type", "bridge"]);
            must(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("{}/24", net.host_ip),
                    "dev",
                    &bridge,
                ],
            );
        }
        must("ip", &["link", "set", &bridge, "up"]);
        // With br_netfilter, bridged frames pass the root FORWARD chain, whose policy
        // may be DROP (Docker's): accept what stays on our bridge.
        let accept = Rule {
            ns: None,
            chain: "FORWARD",
            spec: ["-i", &bridge, "-o", &bridge, "-j", "ACCEPT"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        let args = accept.args("-I");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        must("iptables", &args);
        net.root_rules.push(accept);
        let o = net.host_ip.octets();
        for i in 1..=nodes {
            let node = NetNode {
                ns: format!("tsn{pid}_{k}_{i}"),
                veth: format!("tsv{pid}_{k}_{i}"),
                ip: Ipv4Addr::new(o[0], o[1], o[2], 10 + i as u8),
            };
            net.nodes.push(node.clone());
            must("ip", &["netns", "add", &node.ns]);
            must("ip", &["-n", &node.ns, "link", "set", "lo", "up"]);
            must(
                "ip",
                &[
                    "link", "add", &node.veth, "type", "veth", "peer", "name", "eth0", "netns",
                    &node.ns,
                ],
            );
            must("ip", &["link", "set", &node.veth, "master", &bridge]);
            must("ip", &["link", "set", &node.veth, "up"]);
            must(
                "ip",
                &[
                    "-n",
                    &node.ns,
                    "addr",
                    "add",
                    &format!("{}/24", node.ip),
                    "dev",
                    "eth0",
                ],
            );
            must("ip", &["-n", &node.ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    pub fn node(&self, id: u64) -> &NetNode {
        &self.nodes[id as usize - 1]
    }

    /// The command prefix that runs a program in node `id`'s namespace (`ip netns
    /// exec` execs the program, so the child's pid is the program's).
    pub fn exec_prefix(&self, id: u64) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.node(id).ns.clone(),
        ]
    }

    fn fault(&mut self, id: u64, chain: &'static str, spec: &[&str]) {
        let rule = Rule {
            ns: Some(self.node(id).ns.clone()),
            chain,
            spec: spec.iter().map(|s| s.to_string()).collect(),
        };
        rule.add();
        self.faults.push(rule);
    }

    /// Drops everything `from` sends to `to` (one way: `to` → `from` still passes).
    pub fn drop_one_way(&mut self, from: u64, to: u64) {
        let src = self.node(from).ip.to_string();
        self.fault(to, "INPUT", &["-s", &src, "-j", "DROP"]);
    }

    /// Cuts the link between `a` and `b` both ways.
    pub fn partition(&mut self, a: u64, b: u64) {
        self.drop_one_way(a, b);
        self.drop_one_way(b, a);
    }

    /// Cuts `id` from every other node, both ways; the test's clients (the bridge's
    /// address) still reach it, so they can see it fence them.
    pub fn isolate(&mut self, id: u64) {
        for other in 1..=self.nodes.len() as u64 {
            if other != id {
                self.partition(id, other);
            }
        }
    }

    /// Drops each packet between `a` and `b` (both ways) with probability `p`.
    pub fn loss(&mut self, a: u64, b: u64, p: f64) {
        let p = format!("{p}");
        for (x, y) in [(a, b), (b, a)] {
            let src = self.node(y).ip.to_string();
            self.fault(
                x,
                "INPUT",
                &[
                    "-s",
                    &src,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ],
            );
        }
    }

    /// Delays every packet between `a` and `b` by `ms` each way: each side queues what
    /// it sends to the other to an `nfq-delay.py` in its namespace.
    pub fn delay(&mut self, a: u64, b: u64, ms: u64) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/scripts/nfq-delay.py");
        for (x, y) in [(a, b), (b, a)] {
            let queue = (self.delays.len() % 60_000).to_string();
            let mut cmd = Command::new("ip");
            cmd.args(self.exec_prefix(x).iter().skip(1))
                .args(["python3", script, &queue, &ms.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().expect("spawn nfq-delay.py");
            // Wait (bounded) for its "nfq-delay: queue" line: the queue is bound.
            let mut err = child.stderr.take().expect("stderr");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                let mut seen = Vec::new();
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(16).any(|w| w == b"nfq-delay: queue") {
                        let _ = tx.send(Ok(()));
                        // Keep draining so the script never blocks on stderr.
                        let mut sink = Vec::new();
                        let _ = err.read_to_end(&mut sink);
                        return;
                    }
                }
                let _ = tx.send(Err(String::from_utf8_lossy(&seen).into_owned()));
            });
            let ready = rx.recv_timeout(Duration::from_secs(10));
            self.delays.push(Delay { child });
            match ready {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("nfq-delay.py did not start: {e}"),
                Err(_) => panic!("nfq-delay.py did not start within 10 s"),
            }
            let dst = self.node(y).ip.to_string();
            // --queue-bypass: if the delay line is gone, packets pass rather than drop.
            self.fault(
                x,
                "OUTPUT",
                &[
                    "-d",
                    &dst,
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    &queue,
                    "--queue-bypass",
                ],
            );
        }
    }

    /// Removes every fault: partitions, loss and delay (its processes stopped).
    pub fn heal(&mut self) {
        for rule in self.faults.drain(..).rev() {
            if let Err(e) = rule.delete() {
                eprintln!("netns: heal: {e}");
            }
        }
        for mut d in self.delays.drain(..) {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.heal();
        for node in &self.nodes {
            kill_in_ns(&node.ns);
            let _ = run("ip", &["netns", "del", &node.ns]);
            let _ = run("ip", &["link", "del", &node.veth]);
        }
        for rule in self.root_rules.drain(..) {
            let _ = rule.delete();
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}
