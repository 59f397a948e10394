//! The QUIC link between nodes over real UDP sockets on 127.0.0.1.
//!
//! Goal: what raft and the data plane rely on from the link. Calls on every channel reach
//! the peer's service with the caller's id taken from its certificate; a stalled snapshot
//! transfer does not hold up raft calls on the same connection; a node whose certificate
//! comes from another CA is refused both ways, as is a node of another cluster protocol
//! version (with a reason that says so); a peer that dies without a word (its runtime
//! dropped, like kill -9) is reported unreachable and reconnected once it is back; hostile
//! bytes from an authenticated peer are refused without harm.
//!
//! Method: each node is a `Link` on a tokio runtime, certificates made in memory with the
//! crate's `ClusterCa`. Waits are bounded by deadlines; nothing asserts a speed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_raft::link::certs::ClusterCa;
use tessera_raft::link::{Link, LinkCerts, LinkConfig};
use tessera_raft::transport::{BoxFuture, Channel, NodeId, Service, Transport, TransportError};
use tokio::sync::Semaphore;

fn certs(ca: &ClusterCa, id: NodeId) -> LinkCerts {
    let (cert, key) = ca.node_cert(id, Some("127.0.0.1")).unwrap();
    LinkCerts::from_pem(ca.cert_pem().as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Short liveness settings so a dead peer is noticed within a second.
fn config(
    id: NodeId,
    listen: SocketAddr,
    certs: LinkCerts,
    peers: &[(NodeId, SocketAddr)],
) -> LinkConfig {
    let mut config = LinkConfig::new(id, listen, certs);
    config.peers = peers.iter().copied().collect::<BTreeMap<_, _>>();
    config.idle_timeout = Duration::from_millis(600);
    config.keep_alive = Duration::from_millis(100);
    config.backoff_min = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(400);
    config.duplicate_grace = Duration::from_millis(300);
    config
}

/// Answers `<from>:<channel>:<request>`; snapshot requests wait for a permit of `gate`.
struct Echo {
    gate: Arc<Semaphore>,
}

impl Echo {
    fn open() -> Arc<Echo> {
        Arc::new(Echo {
            gate: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
        })
    }
}

impl Service for Echo {
    fn serve(
        &self,
        from: NodeId,
        channel: Channel,
        request: Bytes,
    ) -> BoxFuture<'_, Result<Bytes, String>> {
        Box::pin(async move {
            if request.as_ref() == b"fail" {
                return Err("refused on purpose".to_owned());
            }
            if channel == Channel::Snapshot {
                let _permit = self.gate.acquire().await.map_err(|e| e.to_string())?;
                return Ok(Bytes::from(format!(
                    "{from}:{channel}:{} bytes",
                    request.len()
                )));
            }
            let mut answer = format!("{from}:{channel}:").into_bytes();
            answer.extend_from_slice(&request);
            Ok(Bytes::from(answer))
        })
    }
}

/// Retries `call` until it succeeds or the deadline passes.
async fn call_until_ok(
    link: &Link,
    to: NodeId,
    channel: Channel,
    request: &'static [u8],
    within: Duration,
) -> Bytes {
    let deadline = Instant::now() + within;
    loop {
        match link.call(to, channel, Bytes::from_static(request)).await {
            Ok(answer) => return answer,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!(
                "node {} -> {to} on {channel}: still failing after {within:?}: {e}",
                link.node_id()
            ),
        }
    }
}

fn three_nodes(ca: &ClusterCa) -> Vec<Link> {
    // Bind first (port 0), then tell each node the others' addresses.
    let links: Vec<Link> = (1..=3)
        .map(|id| Link::start(config(id, localhost(), certs(ca, id), &[])).unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = links.iter().map(|l| l.local_addr().unwrap()).collect();
    for link in &links {
        for (i, addr) in addrs.iter().enumerate() {
            let id = i as NodeId + 1;
            if id != link.node_id() {
                link.set_peer(id, *addr);
            }
        }
    }
    links
}

#[tokio::test(flavor = "current_thread")]
async fn calls_on_every_channel_carry_the_callers_certified_id() {
    let ca = ClusterCa::generate().unwrap();
    let links = three_nodes(&ca);
    for link in &links {
        assert!(link.set_service(Echo::open()));
    }
    for from in &links {
        for to in 1..=3 {
            if to == from.node_id() {
                continue;
            }
            for channel in Channel::ALL {
                let answer =
                    call_until_ok(from, to, channel, b"ping", Duration::from_secs(10)).await;
                let expected = if channel == Channel::Snapshot {
                    format!("{}:{channel}:4 bytes", from.node_id())
                } else {
                    format!("{}:{channel}:ping", from.node_id())
                };
                assert_eq!(answer, Bytes::from(expected));
            }
        }
    }
    // Many requests in flight on one stream: each answer matches its request.
    let calls = (0..200).map(|i| {
        let link = links[0].clone();
        async move {
            let request = Bytes::from(format!("request {i}"));
            let answer = link.call(2, Channel::Raft, request).await.unwrap();
            assert_eq!(answer, Bytes::from(format!("1:raft:request {i}")));
        }
    });
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    for handle in handles {
        handle.await.unwrap();
    }
    // One connection per pair, however both sides dialed at start.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for link in &links {
        let peers = link.peers();
        assert_eq!(peers.len(), 2);
        for peer in peers {
            assert!(peer.reachable, "{peer:?}");
            assert!(peer.rtt.is_some());
        }
    }
    // The service's error comes back as Remote; an oversize request never leaves.
    assert!(matches!(
        links[0].call(2, Channel::Admin, Bytes::from_static(b"fail")).await,
        Err(TransportError::Remote { node: 2, ref reason }) if reason == "refused on purpose"
    ));
    let too_big = Bytes::from(vec![0u8; 4 << 20 | 1]);
    assert_eq!(
        links[0].call(2, Channel::Admin, too_big).await,
        Err(TransportError::TooLarge(4 << 20 | 1))
    );
    assert_eq!(
        links[0].call(9, Channel::Raft, Bytes::new()).await,
        Err(TransportError::UnknownPeer(9))
    );
    for link in &links {
        link.shutdown();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn requests_before_the_service_is_set_are_answered_not_ready() {
    let ca = ClusterCa::generate().unwrap();
    let links = three_nodes(&ca);
    links[0].set_service(Echo::open());
    // Node 2 has no service yet: a clear "not ready", not a hang or a timeout.
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match links[0]
            .call(2, Channel::Raft, Bytes::from_static(b"x"))
            .await
        {
            Err(TransportError::Remote { reason, .. }) => break reason,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("expected not ready, got {other:?}"),
        }
    };
    assert!(err.contains("not ready"), "{err}");
    links[1].set_service(Echo::open());
    assert!(
        !links[1].set_service(Echo::open()),
        "the service is set once"
    );
    let answer = links[0]
        .call(2, Channel::Raft, Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(answer, Bytes::from_static(b"1:raft:x"));
    for link in &links {
        link.shutdown();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_stalled_snapshot_transfer_does_not_delay_raft_calls() {
    let ca = ClusterCa::generate().unwrap();
    let links = three_nodes(&ca);
    let closed_gate = Arc::new(Echo {
        gate: Arc::new(Semaphore::new(0)),
    });
    links[0].set_service(Echo::open());
    links[1].set_service(closed_gate.clone());
    call_until_ok(
        &links[0],
        2,
        Channel::Raft,
        b"warm-up",
        Duration::from_secs(10),
    )
    .await;

    // The first snapshot chunk is held by the service; the second, 32 MiB, cannot be read
    // behind it (snapshot requests are served in order), so it fills the stream's flow
    // control window and its sender stalls.
    let first = tokio::spawn({
        let link = links[0].clone();
        async move {
            link.call(2, Channel::Snapshot, Bytes::from(vec![1u8; 1 << 20]))
                .await
        }
    });
    let second = tokio::spawn({
        let link = links[0].clone();
        async move {
            link.call(2, Channel::Snapshot, Bytes::from(vec![2u8; 32 << 20]))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Raft calls on the same connection go through meanwhile.
    for i in 0..50 {
        let request = Bytes::from(format!("append {i}"));
        let answer = links[0].call(2, Channel::Raft, request).await.unwrap();
        assert_eq!(answer, Bytes::from(format!("1:raft:append {i}")));
    }
    let answer = links[1]
        .call(1, Channel::Forward, Bytes::from_static(b"publish"))
        .await
        .unwrap();
    assert_eq!(answer, Bytes::from_static(b"2:forward:publish"));
    assert!(
        !first.is_finished() && !second.is_finished(),
        "the snapshot transfer is still held"
    );

    // Open the gate: both chunks arrive whole, in order.
    closed_gate.gate.add_permits(2);
    assert_eq!(
        first.await.unwrap().unwrap(),
        Bytes::from(format!("1:snapshot:{} bytes", 1 << 20))
    );
    assert_eq!(
        second.await.unwrap().unwrap(),
        Bytes::from(format!("1:snapshot:{} bytes", 32 << 20))
    );
    for link in &links {
        link.shutdown();
    }
}

/// Why `node` cannot reach `peer`, once it tried (the peer must stay unreachable).
async fn refusal_reason(node: &Link, peer: NodeId) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = node.peers().into_iter().find(|p| p.id == peer).unwrap();
        assert!(!stats.reachable);
        if let Some(reason) = stats.last_error {
            return reason;
        }
        assert!(Instant::now() < deadline, "never tried node {peer}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_with_a_certificate_from_another_ca_is_refused() {
    let ca = ClusterCa::generate().unwrap();
    let other_ca = ClusterCa::generate().unwrap();
    let node1 = Link::start(config(1, localhost(), certs(&ca, 1), &[])).unwrap();
    // Node 3 trusts its own CA and presents a certificate from it.
    let intruder = Link::start(config(
        3,
        localhost(),
        certs(&other_ca, 3),
        &[(1, node1.local_addr().unwrap())],
    ))
    .unwrap();
    node1.set_peer(3, intruder.local_addr().unwrap());
    node1.set_service(Echo::open());
    intruder.set_service(Echo::open());

    let reason = refusal_reason(&node1, 3).await;
    assert!(
        reason.contains("not signed by this cluster's CA"),
        "{reason}"
    );
    assert!(matches!(
        node1.call(3, Channel::Raft, Bytes::from_static(b"x")).await,
        Err(TransportError::Unreachable { node: 3, .. })
    ));
    // And the other way round: node 3 never reaches node 1's service.
    for _ in 0..5 {
        let result = intruder
            .call(1, Channel::Raft, Bytes::from_static(b"x"))
            .await;
        assert!(
            matches!(
                result,
                Err(TransportError::Unreachable { node: 1, .. }) | Err(TransportError::Timeout(1))
            ),
            "{result:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = intruder
        .discover(node1.local_addr().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Unreachable { .. }), "{err:?}");
    node1.shutdown();
    intruder.shutdown();
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_found_by_address_alone_is_identified_by_its_certificate() {
    let ca = ClusterCa::generate().unwrap();
    let node1 = Link::start(config(1, localhost(), certs(&ca, 1), &[])).unwrap();
    node1.set_service(Echo::open());
    // A joining node knows an address, not an id.
    let joiner = Link::start(config(4, localhost(), certs(&ca, 4), &[])).unwrap();
    joiner.set_service(Echo::open());
    assert_eq!(
        joiner.discover(node1.local_addr().unwrap()).await.unwrap(),
        1
    );
    let answer = joiner
        .call(1, Channel::Admin, Bytes::from_static(b"join"))
        .await
        .unwrap();
    assert_eq!(answer, Bytes::from_static(b"4:admin:join"));
    // Node 1 learned node 4 from the connection and can call back on it.
    let answer = node1
        .call(4, Channel::Raft, Bytes::from_static(b"welcome"))
        .await
        .unwrap();
    assert_eq!(answer, Bytes::from_static(b"1:raft:welcome"));
    node1.shutdown();
    joiner.shutdown();
}

/// A node on its own thread and runtime, so it can die without closing anything (the
/// runtime is dropped, as a killed process would vanish).
struct Process {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Process {
    fn start(config: LinkConfig) -> Process {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (ready, is_ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let link = Link::start(config).unwrap();
                link.set_service(Echo::open());
                ready.send(()).unwrap();
                // Serve until told to die; then return without shutting the link down.
                while stopped.try_recv().is_err() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
            drop(runtime);
        });
        is_ready.recv().unwrap();
        Process {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_dead_peer_is_reported_unreachable_and_reconnected_when_it_returns() {
    let ca = ClusterCa::generate().unwrap();
    // Reserve node 2's port: bind, read, release.
    let node2_addr = std::net::UdpSocket::bind(localhost())
        .unwrap()
        .local_addr()
        .unwrap();
    let node1 = Link::start(config(1, localhost(), certs(&ca, 1), &[(2, node2_addr)])).unwrap();
    node1.set_service(Echo::open());
    let node1_addr = node1.local_addr().unwrap();

    let mut node2 = Process::start(config(2, node2_addr, certs(&ca, 2), &[(1, node1_addr)]));
    call_until_ok(&node1, 2, Channel::Raft, b"hello", Duration::from_secs(10)).await;
    node2.kill();

    // Within a few idle timeouts the peer is reported unreachable and calls fail fast.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = node1.peers().into_iter().find(|p| p.id == 2).unwrap();
        if !stats.reachable && stats.last_error.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 2 still reported reachable: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let result = node1.call(2, Channel::Raft, Bytes::from_static(b"x")).await;
    assert!(
        matches!(
            result,
            Err(TransportError::Unreachable { node: 2, .. }) | Err(TransportError::Timeout(2))
        ),
        "{result:?}"
    );

    // Node 2 comes back on the same address (a new process, same certificate).
    let _node2 = Process::start(config(2, node2_addr, certs(&ca, 2), &[(1, node1_addr)]));
    let answer = call_until_ok(&node1, 2, Channel::Raft, b"again", Duration::from_secs(15)).await;
    assert_eq!(answer, Bytes::from_static(b"1:raft:again"));
    let stats = node1.peers().into_iter().find(|p| p.id == 2).unwrap();
    assert!(
        stats.reachable && stats.connects >= 2 && stats.last_error.is_none(),
        "{stats:?}"
    );
    assert!(stats.calls_failed >= 1, "{stats:?}");
    node1.shutdown();
}

#[tokio::test(flavor = "current_thread")]
async fn hostile_bytes_from_an_authenticated_peer_are_refused_without_harm() {
    let ca = ClusterCa::generate().unwrap();
    let node1 = Link::start(config(1, localhost(), certs(&ca, 1), &[])).unwrap();
    node1.set_service(Echo::open());
    let node1_addr = node1.local_addr().unwrap();

    // A raw QUIC client with node 2's valid certificate that does not follow the protocol.
    let node2 = certs(&ca, 2);
    let client_tls =
        quinn::crypto::rustls::QuicClientConfig::try_from(node2.client_config().unwrap()).unwrap();
    let mut endpoint = quinn::Endpoint::client(localhost()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(client_tls)));
    let conn = endpoint
        .connect(node1_addr, "node-1")
        .unwrap()
        .await
        .unwrap();
    // Hello first, as a node would.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut hello = b"TSLK\x01\x00".to_vec();
    hello.extend_from_slice(&1u64.to_be_bytes());
    send.write_all(&hello).await.unwrap();
    send.finish().unwrap();
    let mut reply = [0u8; 14];
    recv.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[..6], b"TSLK\x01\x00");

    let hostile: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\n\r\n",                           // not the magic
        b"TSLK\x01\x07",                                     // unknown channel
        b"TSLK\x01\x01\xff\xff\xff\xff\0\0\0\0\0\0\0\x01\0", // 4 GiB frame on raft
        b"TSLK\x01\x01\0\0\0\x0a\0\0\0\0\0\0\0\x01\x05x",    // unknown frame kind
    ];
    for bytes in hostile {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        // The node stops the stream (or ends it) instead of answering or panicking.
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf)).await;
        assert!(matches!(read, Ok(Err(_)) | Ok(Ok(None))), "{read:?}");
    }

    // The node still serves a well-behaved peer.
    let good = Link::start(config(3, localhost(), certs(&ca, 3), &[(1, node1_addr)])).unwrap();
    let answer = call_until_ok(
        &good,
        1,
        Channel::Raft,
        b"still here",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(answer, Bytes::from_static(b"3:raft:still here"));
    good.shutdown();
    node1.shutdown();
}

/// A node of another Tessera version (another cluster protocol, a different ALPN) is
/// refused at the handshake both ways, and the dialing node says why: nodes of two
/// versions never exchange raft entries or forwarded batches they would misread.
#[tokio::test(flavor = "current_thread")]
async fn a_node_of_another_cluster_protocol_version_is_refused_with_a_clear_reason() {
    let ca = ClusterCa::generate().unwrap();
    let old_alpn = b"tessera-cluster/1".to_vec();
    assert_ne!(tessera_raft::link::tls::ALPN, &old_alpn[..]);

    // An "old" node 2: a raw QUIC server with node 2's valid certificate that speaks the
    // old protocol. Node 1 dials it.
    let node2 = certs(&ca, 2);
    let mut server_tls = node2.server_config().unwrap();
    server_tls.alpn_protocols = vec![old_alpn.clone()];
    let server_tls = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).unwrap();
    let old = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(server_tls)),
        localhost(),
    )
    .unwrap();
    let old_addr = old.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        let incoming = old.accept().await.expect("node 1 dials");
        incoming.await.map(|_| ()).map_err(|e| e.to_string())
    });
    let node1 = Link::start(config(1, localhost(), certs(&ca, 1), &[(2, old_addr)])).unwrap();
    node1.set_service(Echo::open());
    let reason = refusal_reason(&node1, 2).await;
    assert!(
        reason.contains("another cluster protocol version"),
        "{reason}"
    );
    let refused = accepting.await.unwrap();
    assert!(refused.is_err(), "the old node's handshake completed");

    // An old node 3 dialing node 1: refused at the handshake.
    let node3 = certs(&ca, 3);
    let mut client_tls = node3.client_config().unwrap();
    client_tls.alpn_protocols = vec![old_alpn];
    let client_tls = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap();
    let mut endpoint = quinn::Endpoint::client(localhost()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(client_tls)));
    let dialed = endpoint
        .connect(node1.local_addr().unwrap(), "node-1")
        .unwrap()
        .await;
    let err = dialed.map(|_| ()).unwrap_err();
    assert!(
        tessera_raft::link::describe_handshake_error(&err, true)
            .contains("another cluster protocol version"),
        "{err}"
    );
    node1.shutdown();
}
