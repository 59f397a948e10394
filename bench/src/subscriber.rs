//! The subscriber every message scenario uses: reads deliveries, acknowledges them
//! (PUBACK at QoS 1; PUBREC then PUBCOMP at QoS 2), and accounts for each one:
//! loss, duplicates and order per publisher ([`Accounting`]), arrival counts over
//! time, and latency from the payload's intended send time.
//!
//! One task per connection. Acknowledgements for one read are written before the
//! next read; they are small, and both brokers read their sockets independently of
//! writing, so this cannot deadlock.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use hdrhistogram::Histogram;
use tessera_proto::{Packet, PubAck, PubComp, PubRec, QoS, Str, decode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::accounting::Accounting;
use crate::clock;
use crate::mqtt::{self, Client, Failure, PACKET_BYTES_MAX, READ_CHUNK_BYTES};
use crate::payload::Header;
use crate::run::{RunConfig, Timeline};
use crate::stats::{CoarseBatch, Live, Series, latency_histogram, record_ns};

/// What a subscriber saw.
#[derive(Debug)]
pub struct SubscriberResult {
    /// Per-publisher accounting.
    pub accounting: Accounting,
    /// Latency of messages intended to be sent in the window, ns.
    pub latency: Histogram<u64>,
    /// Arrivals over time.
    pub series: Series,
    /// Why it stopped early, if it did.
    pub failure: Option<Failure>,
    /// Deliveries that carried a topic alias (MQTT 5).
    pub aliased: u64,
}

/// Runs one subscriber until `stop` turns true or the connection fails,
/// accounting into `accounting`.
pub async fn run_subscriber(
    mut client: Client,
    mut accounting: Accounting,
    cfg: Arc<RunConfig>,
    t: Timeline,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
) -> SubscriberResult {
    let version = client.version;
    let any_run = accounting.is_open();
    let mut latency = latency_histogram();
    let mut coarse = CoarseBatch::default();
    // Topic aliases the broker set up towards us: index = alias.
    let mut aliases: Vec<Option<Str>> = vec![None; usize::from(cfg.opts.topic_alias_max) + 1];
    let mut aliased = 0u64;
    let mut series = Series::new(t.start_ns, t.series_span_ns());
    let mut rbuf = std::mem::take(&mut client.rbuf);
    let mut out = BytesMut::new();
    let mut failure = None;
    let ping_every = Duration::from_millis(u64::from(cfg.opts.keep_alive_s) * 500);
    let (mut rd, mut wr) = client.stream.split();
    let ping = tokio::time::sleep(ping_every);
    // One `changed()` future for the whole loop: creating it per iteration
    // registers and unregisters a waiter each time, a measurable cost per read.
    let stopped = stop.changed();
    tokio::pin!(ping, stopped);

    'run: loop {
        if rbuf.capacity() - rbuf.len() < READ_CHUNK_BYTES / 4 {
            rbuf.reserve(READ_CHUNK_BYTES);
        }
        tokio::select! {
            biased;
            _ = &mut stopped => break 'run,
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
            _ = &mut ping, if !ping_every.is_zero() => {
                mqtt::put(&Packet::PingReq, version, &mut out);
                ping.as_mut().reset(tokio::time::Instant::now() + ping_every);
            }
        }
        let arrival_ns = clock::now_ns();
        let mut arrived = 0u64;
        loop {
            let packet = match decode(&mut rbuf, version, PACKET_BYTES_MAX) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    failure = Some(e.into());
                    break 'run;
                }
            };
            match packet {
                Packet::Publish(p) => {
                    arrived += 1;
                    if let Some(alias) = p.properties.topic_alias {
                        aliased += 1;
                        if let Err(f) = resolve_alias(&mut aliases, alias, &p.topic) {
                            failure = Some(f);
                            break 'run;
                        }
                    }
                    match Header::parse(&p.payload) {
                        Some(h) => {
                            accounting.record(&h, live.produced(h.publisher));
                            if (any_run || h.run_id == cfg.run_id) && h.intended_ns >= t.warm_ns {
                                let ns = arrival_ns.saturating_sub(h.intended_ns);
                                record_ns(&mut latency, ns);
                                coarse.record(ns);
                            }
                        }
                        None => {
                            accounting.record_unparsable();
                        }
                    }
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => mqtt::put(&PubAck::new(p.packet_id), version, &mut out),
                        QoS::ExactlyOnce => mqtt::put(&PubRec::new(p.packet_id), version, &mut out),
                    }
                }
                Packet::PubRel(r) => mqtt::put(&PubComp::new(r.packet_id), version, &mut out),
                Packet::PingResp => {}
                Packet::Disconnect(d) => {
                    failure = Some(Failure::Disconnected(d.reason_code));
                    break 'run;
                }
                p => {
                    failure = Some(Failure::Unexpected(p.packet_type()));
                    break 'run;
                }
            }
        }
        if arrived > 0 {
            series.add(arrival_ns, arrived);
            live.received.fetch_add(arrived, Ordering::Relaxed);
            live.latency.flush(&mut coarse);
        }
        if !out.is_empty() {
            if let Err(e) = async {
                wr.write_all(&out).await?;
                wr.flush().await
            }
            .await
            {
                failure = Some(e.into());
                break 'run;
            }
            out.clear();
        }
    }
    match &failure {
        Some(f) => live.error(format!("subscriber: {f}")),
        None => client.disconnect().await,
    }
    SubscriberResult {
        accounting,
        latency,
        series,
        failure,
        aliased,
    }
}

/// Applies a PUBLISH's topic alias: a topic sets it, an empty topic uses it.
/// An alias above what we announced, or used before it was set, is the broker's
/// protocol error.
fn resolve_alias(aliases: &mut [Option<Str>], alias: u16, topic: &Str) -> Result<(), Failure> {
    let Some(slot) = aliases.get_mut(usize::from(alias)).filter(|_| alias > 0) else {
        return Err(Failure::Protocol(format!(
            "topic alias {alias} above the Topic Alias Maximum we announced"
        )));
    };
    if !topic.is_empty() {
        *slot = Some(topic.clone());
        Ok(())
    } else if slot.is_some() {
        Ok(())
    } else {
        Err(Failure::Protocol(format!(
            "topic alias {alias} used before the broker set it"
        )))
    }
}
