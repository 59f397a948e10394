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
use tessera_proto::{Packet, ProtocolVersion, PubAck, PubComp, PubRec, QoS, Str, decode};
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

/// How a subscriber connects again after a lost connection (`--reconnect`).
#[derive(Debug, Clone)]
pub struct Redial {
    /// Its client id.
    pub id: String,
    /// Its client slot (picks `--host` and `--bind`).
    pub slot: usize,
    /// What it subscribes to.
    pub filter: String,
}

/// How often a `--reconnect` subscriber tries to connect again.
const REDIAL_EVERY: Duration = Duration::from_millis(200);

/// Runs one subscriber until `stop` turns true or the connection fails,
/// accounting into `accounting`. With `redial`, a lost connection is made
/// again (until `stop`) and the accounting goes on.
pub async fn run_subscriber(
    client: Client,
    accounting: Accounting,
    cfg: Arc<RunConfig>,
    t: Timeline,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
    redial: Option<Redial>,
) -> SubscriberResult {
    let mut d = Deliveries::new(accounting, &cfg, t);
    // One `changed()` future for the whole run: creating it per iteration
    // registers and unregisters a waiter each time, a measurable cost per read.
    let stopped = stop.changed();
    tokio::pin!(stopped);
    let mut client = client;
    let failure = loop {
        let Some(f) = serve(&mut client, &mut d, &cfg, &t, &live, stopped.as_mut()).await else {
            client.disconnect().await;
            break None;
        };
        let Some(r) = &redial else {
            break Some(f);
        };
        eprintln!("bench: subscriber {}: {f}; connecting again", r.id);
        let again = async {
            loop {
                let c = async {
                    let mut c =
                        mqtt::connect(&cfg.opts, &r.id, r.slot, READ_CHUNK_BYTES, None).await?;
                    // A resumed session has the subscription (and may send
                    // queued messages before a SUBACK would come).
                    if !c.granted.session_present {
                        c.subscribe(&r.filter, cfg.qos).await?;
                    }
                    Ok::<_, Failure>(c)
                };
                match c.await {
                    Ok(c) => return c,
                    Err(_) => tokio::time::sleep(REDIAL_EVERY).await,
                }
            }
        };
        tokio::select! {
            biased;
            _ = stopped.as_mut() => break Some(f),
            c = again => {
                eprintln!("bench: subscriber {}: connected again", r.id);
                client = c;
            }
        }
    };
    if let Some(f) = &failure {
        live.error(format!("subscriber: {f}"));
    }
    d.finish(failure)
}

/// Serves one connection of a subscriber: `None` when `stopped` fired, else
/// why the connection ended.
async fn serve(
    client: &mut Client,
    d: &mut Deliveries,
    cfg: &RunConfig,
    t: &Timeline,
    live: &Live,
    mut stopped: std::pin::Pin<&mut impl std::future::Future>,
) -> Option<Failure> {
    let version = client.version;
    let mut rbuf = std::mem::take(&mut client.rbuf);
    let mut out = BytesMut::new();
    let ping_every = Duration::from_millis(u64::from(cfg.opts.keep_alive_s) * 500);
    let (mut rd, mut wr) = client.stream.split();
    let ping = tokio::time::sleep(ping_every);
    tokio::pin!(ping);
    // What the handshake read past its CONNACK / SUBACK is served before the
    // first read: a resumed session's broker sends queued messages right
    // behind its CONNACK, and once they fill the window it sends nothing more
    // until they are acknowledged (waiting for a read first deadlocked).
    let mut buffered = !rbuf.is_empty();
    loop {
        if buffered {
            buffered = false;
        } else {
            if rbuf.capacity() - rbuf.len() < READ_CHUNK_BYTES / 4 {
                rbuf.reserve(READ_CHUNK_BYTES);
            }
            tokio::select! {
                biased;
                _ = &mut stopped => return None,
                r = rd.read_buf(&mut rbuf) => match r {
                    Ok(0) => return Some(Failure::Closed),
                    Ok(_) => {}
                    Err(e) => return Some(e.into()),
                },
                _ = &mut ping, if !ping_every.is_zero() => {
                    mqtt::put(&Packet::PingReq, version, &mut out);
                    ping.as_mut().reset(tokio::time::Instant::now() + ping_every);
                }
            }
        }
        if let Err(f) = d.take(&mut rbuf, version, clock::now_ns(), cfg, t, live, &mut out) {
            return Some(f);
        }
        if !out.is_empty() {
            if let Err(e) = async {
                wr.write_all(&out).await?;
                wr.flush().await
            }
            .await
            {
                return Some(e.into());
            }
            out.clear();
        }
    }
}

/// What one subscriber has seen so far: the decoding and accounting shared by
/// the task above and the latency scenario's busy-polling thread.
#[derive(Debug)]
pub struct Deliveries {
    accounting: Accounting,
    any_run: bool,
    latency: Histogram<u64>,
    coarse: CoarseBatch,
    /// Topic aliases the broker set up towards us: index = alias.
    aliases: Vec<Option<Str>>,
    aliased: u64,
    series: Series,
}

impl Deliveries {
    /// Nothing seen yet.
    pub fn new(accounting: Accounting, cfg: &RunConfig, t: Timeline) -> Deliveries {
        Deliveries {
            any_run: accounting.is_open(),
            accounting,
            latency: latency_histogram(),
            coarse: CoarseBatch::default(),
            aliases: vec![None; usize::from(cfg.opts.topic_alias_max) + 1],
            aliased: 0,
            series: Series::new(t.start_ns, t.series_span_ns()),
        }
    }

    /// Decodes every whole packet in `rbuf` (bytes that arrived at
    /// `arrival_ns`), accounts for each delivery and appends the
    /// acknowledgements to `out`. An error ends the subscriber.
    #[allow(clippy::too_many_arguments)]
    pub fn take(
        &mut self,
        rbuf: &mut BytesMut,
        version: ProtocolVersion,
        arrival_ns: u64,
        cfg: &RunConfig,
        t: &Timeline,
        live: &Live,
        out: &mut BytesMut,
    ) -> Result<(), Failure> {
        let mut arrived = 0u64;
        let r = loop {
            let packet = match decode(rbuf, version, PACKET_BYTES_MAX) {
                Ok(Some(p)) => p,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.into()),
            };
            match packet {
                Packet::Publish(p) => {
                    arrived += 1;
                    if let Some(alias) = p.properties.topic_alias {
                        self.aliased += 1;
                        if let Err(f) = resolve_alias(&mut self.aliases, alias, &p.topic) {
                            break Err(f);
                        }
                    }
                    match Header::parse(&p.payload) {
                        Some(h) => {
                            self.accounting.record(&h, live.produced(h.publisher));
                            if (self.any_run || h.run_id == cfg.run_id)
                                && h.intended_ns >= t.warm_ns
                            {
                                let ns = arrival_ns.saturating_sub(h.intended_ns);
                                record_ns(&mut self.latency, ns);
                                self.coarse.record(ns);
                            }
                        }
                        None => {
                            self.accounting.record_unparsable();
                        }
                    }
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => mqtt::put(&PubAck::new(p.packet_id), version, out),
                        QoS::ExactlyOnce => mqtt::put(&PubRec::new(p.packet_id), version, out),
                    }
                }
                Packet::PubRel(r) => mqtt::put(&PubComp::new(r.packet_id), version, out),
                Packet::PingResp => {}
                Packet::Disconnect(d) => break Err(Failure::Disconnected(d.reason_code)),
                p => break Err(Failure::Unexpected(p.packet_type())),
            }
        };
        if arrived > 0 {
            self.series.add(arrival_ns, arrived);
            live.received.fetch_add(arrived, Ordering::Relaxed);
            live.latency.flush(&mut self.coarse);
        }
        r
    }

    /// The subscriber's result; `failure` is why it stopped early, if it did.
    pub fn finish(self, failure: Option<Failure>) -> SubscriberResult {
        SubscriberResult {
            accounting: self.accounting,
            latency: self.latency,
            series: self.series,
            failure,
            aliased: self.aliased,
        }
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
