//! The max-rate publisher of `fanin` and `fanout`, and the acknowledgement handling
//! every publisher shares.
//!
//! One task per connection, alternating between encoding and writing in one
//! `select!` loop: it encodes messages while it holds fewer than
//! `--inflight-bytes` unwritten bytes (and, at QoS 1/2, while its window has room),
//! writes what it holds as fast as the kernel accepts it, and reads
//! acknowledgements. So QoS 0 is paced by TCP back-pressure and QoS 1/2 by the
//! broker's acknowledgements; nothing buffers without bound. With `--rate` it
//! also never runs ahead of its schedule (message `i` is due at
//! `start + i / rate`); tokio's 1 ms timer makes that schedule coarse, which is
//! fine for throughput (the `latency` scenario paces precisely).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Buf, BytesMut};
use tessera_proto::{Packet, PubRel, Publish, QoS, Str, decode};
use tokio::io::AsyncReadExt;

use crate::clock;
use crate::mqtt::{self, Client, Failure, PACKET_BYTES_MAX, READ_CHUNK_BYTES};
use crate::payload::Header;
use crate::run::{RunConfig, Timeline, sleep_until_ns};
use crate::stats::{Live, Series};
use crate::window::{AckOutcome, Window};

/// What a publisher did.
#[derive(Debug)]
pub struct PublisherResult {
    /// Messages produced (sequence numbers 0..sent).
    pub sent: u64,
    /// When the last message was produced, on the bench clock.
    pub last_ns: u64,
    /// Messages produced over time.
    pub series: Series,
    /// Why it stopped early, if it did.
    pub failure: Option<Failure>,
}

/// Applies one packet from the broker to a publisher: acknowledgements move the
/// window and may queue a PUBREL in `out`; anything unexpected is an error.
pub fn on_publisher_packet(
    packet: Packet,
    window: &mut Option<Window>,
    version: tessera_proto::ProtocolVersion,
    out: &mut BytesMut,
    live: &Live,
) -> Result<(), Failure> {
    match packet {
        Packet::PingResp => Ok(()),
        Packet::Disconnect(d) => Err(Failure::Disconnected(d.reason_code)),
        p @ (Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_)) => {
            let Some(w) = window.as_mut() else {
                live.error("acknowledgement for a QoS 0 publish");
                return Ok(());
            };
            match w.on_ack(&p) {
                AckOutcome::Completed => {}
                AckOutcome::Release(id) => mqtt::put(&PubRel::new(id), version, out),
                AckOutcome::Rejected(rc) => live.error(format!("publish refused: {rc:?}")),
                AckOutcome::Unexpected(id) => live.error(format!(
                    "{:?} for packet id {id}, which was not awaiting it",
                    p.packet_type()
                )),
                AckOutcome::NotAnAck => unreachable!("matched acknowledgements only"),
            }
            Ok(())
        }
        p => Err(Failure::Unexpected(p.packet_type())),
    }
}

/// Everything one max-rate publisher needs.
#[derive(Debug, Clone)]
pub struct PublisherPlan {
    /// Index of this publisher (the payload's `publisher`).
    pub id: u32,
    /// Topic it publishes to.
    pub topic: Str,
    /// Messages per second; `None` for as fast as allowed. Paced messages carry
    /// their scheduled time as intended send time, so their latency includes any
    /// delay in sending them (coordinated omission).
    pub rate: Option<f64>,
    /// Publish with the retain flag.
    pub retain: bool,
    /// MQTT 5: publish under topic alias 1 (the topic is sent once), when the
    /// broker's CONNACK allows aliases.
    pub topic_alias: bool,
}

/// Runs one max-rate publisher from `t.start_ns` until `t.end_ns` or `cfg.count`
/// messages, then waits (until `t.drain_end_ns`) for its window to empty, and
/// disconnects.
pub async fn run_publisher(
    mut client: Client,
    plan: PublisherPlan,
    cfg: Arc<RunConfig>,
    t: Timeline,
    live: Arc<Live>,
) -> PublisherResult {
    let version = client.version;
    let mut window = match cfg.qos {
        QoS::AtMostOnce => None,
        qos => Some(Window::new(qos, cfg.window(client.granted.receive_maximum))),
    };
    let mut series = Series::new(t.start_ns, t.series_span_ns());
    let mut rbuf = std::mem::take(&mut client.rbuf);
    let mut out = BytesMut::with_capacity(cfg.inflight_bytes + 2 * cfg.size);
    let mut seq: u64 = 0;
    let mut last_ns = t.start_ns;
    let mut stopping = false;
    let mut failure = None;
    let alias = plan.topic_alias && client.granted.topic_alias_maximum >= 1;
    if plan.topic_alias && !alias {
        live.error("the broker's CONNACK allows no topic aliases (Topic Alias Maximum 0)");
    }
    let mut alias_set = false;

    // Due time of message `seq` when paced.
    let due_ns = |seq: u64| {
        plan.rate
            .map(|r| t.start_ns + (seq as f64 * 1e9 / r) as u64)
    };

    sleep_until_ns(t.start_ns).await;
    let (mut rd, mut wr) = client.stream.split();
    let end = tokio::time::sleep_until(clock::instant_at(t.end_ns).into());
    let drain_end = tokio::time::sleep_until(clock::instant_at(t.drain_end_ns).into());
    let pace = tokio::time::sleep_until(clock::instant_at(t.start_ns).into());
    tokio::pin!(end, drain_end, pace);
    'run: loop {
        // Set when the schedule, not the window or the socket, is what holds
        // the next message back.
        let mut ahead_of_schedule = false;
        if !stopping && out.len() < cfg.inflight_bytes {
            let now = clock::now_ns();
            let mut n = ((cfg.inflight_bytes - out.len()) / (cfg.size + 16)).max(1) as u64;
            n = n.min(cfg.count - seq);
            if let Some(w) = &window {
                n = n.min(w.room() as u64);
            }
            if let Some(r) = plan.rate {
                let due = (now.saturating_sub(t.start_ns) as f64 * r / 1e9) as u64 + 1;
                let behind = due.saturating_sub(seq);
                n = n.min(behind);
                // Only the schedule arms the pace timer: when the window is
                // what holds the next message back (a broker holding its
                // acknowledgements) and the schedule is already due, the
                // timer would fire at once, again and again, and spin.
                if behind == 0 {
                    let next = due_ns(seq).expect("paced");
                    pace.as_mut().reset(clock::instant_at(next).into());
                    ahead_of_schedule = true;
                }
            }
            if now >= t.end_ns || seq >= cfg.count {
                stopping = true;
            } else if n > 0 {
                let mut payloads = BytesMut::with_capacity(n as usize * cfg.size);
                for k in 0..n {
                    Header {
                        run_id: cfg.run_id,
                        publisher: plan.id,
                        seq: seq + k,
                        intended_ns: due_ns(seq + k).unwrap_or(now),
                    }
                    .put(cfg.size, &mut payloads);
                }
                let mut payloads = payloads.freeze();
                // Published before any of these bytes can reach the socket.
                live.set_produced(plan.id, seq + n);
                for _ in 0..n {
                    let packet_id = window
                        .as_mut()
                        .map_or(0, |w| w.allocate().expect("room was checked"));
                    // With an alias, only the first PUBLISH carries the topic.
                    let topic = if alias && alias_set {
                        Str::new()
                    } else {
                        plan.topic.clone()
                    };
                    let mut publish = Publish {
                        qos: cfg.qos,
                        packet_id,
                        retain: plan.retain,
                        ..Publish::new(topic, payloads.split_to(cfg.size))
                    };
                    if alias {
                        publish.properties.topic_alias = Some(1);
                        alias_set = true;
                    }
                    mqtt::put(&publish, version, &mut out);
                }
                seq += n;
                last_ns = now;
                series.add(now, n);
                live.sent.fetch_add(n, Ordering::Relaxed);
            }
        }
        let in_flight = window.as_ref().map_or(0, Window::in_flight);
        if stopping && out.is_empty() && in_flight == 0 {
            break;
        }
        if rbuf.capacity() - rbuf.len() < READ_CHUNK_BYTES / 4 {
            rbuf.reserve(READ_CHUNK_BYTES);
        }
        tokio::select! {
            biased;
            r = rd.read_buf(&mut rbuf) => match r {
                Ok(0) => {
                    failure = Some(Failure::Closed);
                    break 'run;
                }
                Ok(_) => {}
                Err(e) => {
                    failure = Some(e.into());
                    break 'run;
                }
            },
            // On TLS an emptied `out` may still wait in the session: flush it.
            r = wr.write_or_flush(&out), if !out.is_empty() || wr.needs_flush() => match r {
                Ok(n) => out.advance(n),
                Err(e) => {
                    failure = Some(e.into());
                    break 'run;
                }
            },
            _ = &mut end, if !stopping => stopping = true,
            _ = &mut pace, if ahead_of_schedule && !stopping => {}
            _ = &mut drain_end, if stopping => {
                failure = Some(Failure::Timeout);
                live.error(format!(
                    "publisher {} still had {in_flight} unacknowledged messages and {} unwritten bytes after --drain",
                    plan.id,
                    out.len()
                ));
                break 'run;
            }
        }
        loop {
            match decode(&mut rbuf, version, PACKET_BYTES_MAX) {
                Ok(None) => break,
                Ok(Some(p)) => {
                    if let Err(f) = on_publisher_packet(p, &mut window, version, &mut out, &live) {
                        failure = Some(f);
                        break 'run;
                    }
                }
                Err(e) => {
                    failure = Some(e.into());
                    break 'run;
                }
            }
        }
    }
    match &failure {
        Some(Failure::Timeout) => {}
        Some(f) => live.error(format!("publisher: {f}")),
        None => client.disconnect().await,
    }
    PublisherResult {
        sent: seq,
        last_ns,
        series,
        failure,
    }
}
