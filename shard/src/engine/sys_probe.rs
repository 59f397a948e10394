//! The engine's side of `$SYS` topics (see [`crate::sys`]): every shard sends its
//! counters to shard 0 each interval; shard 0 publishes the totals as retained
//! QoS 0 messages through the normal publish path, so subscribers on any shard
//! get them like any other message.

use tessera_proto::{Packet, PacketType, QoS};

use super::Engine;
use crate::mesh::{MeshMsg, ShardId};
use crate::message::Message;
use crate::session::ConnId;
use crate::sys::SysReport;

impl Engine {
    /// Counts bytes the driver read from clients, for `$SYS/broker/bytes/received`.
    pub fn record_bytes_received(&mut self, bytes: usize) {
        self.stats.bytes_received += bytes as u64;
    }

    /// `pings` PINGREQs that the driver read and answered itself for a connection
    /// that has no task (a parked connection, `broker/src/server/park.rs`): the
    /// driver read the PINGREQs and wrote `answered` PINGRESPs straight to the
    /// socket. Keeps the connection alive and counts the packets and bytes as
    /// [`Engine::handle_packet`] and the output path would; the PINGRESPs that
    /// were not written (`pings - answered`, the socket's buffer was full) go
    /// to the connection's output, which wakes it. Returns false, changing
    /// nothing, when `conn` is gone or ended.
    ///
    /// A PINGRESP needs no ordering with the rest of the output: there is no
    /// output (the connection is parked only with none buffered or held), and
    /// it acknowledges nothing that must be durable first.
    pub fn pings_answered(&mut self, now_ms: u64, conn: ConnId, pings: u32, answered: u32) -> bool {
        let Some(c) = self.slot_mut(conn) else {
            return false;
        };
        if c.ended {
            return false;
        }
        c.last_packet_ms = now_ms;
        let answered = answered.min(pings);
        self.stats.bytes_received += 2 * u64::from(pings);
        self.stats.bytes_sent += 2 * u64::from(answered);
        for _ in 0..pings {
            self.probe.packet_received(PacketType::PingReq);
        }
        for _ in 0..answered {
            self.probe.packet_sent(PacketType::PingResp);
        }
        for _ in answered..pings {
            self.write_packet(conn, &Packet::PingResp);
        }
        true
    }

    /// This shard's counters as they stand.
    pub fn sys_report(&self) -> SysReport {
        SysReport {
            clients_connected: self.connection_count() as u64,
            sessions: self.session_count() as u64,
            subscriptions: self.subscription_count() as u64,
            messages_received: self.stats.publishes_received,
            messages_sent: self.stats.publishes_sent,
            bytes_received: self.stats.bytes_received,
            bytes_sent: self.stats.bytes_sent,
            cluster_forwarded: self.stats.remote_forwards_sent,
            cluster_received: self.stats.remote_publishes_received,
        }
    }

    /// On shard 0 of a node in a cluster: the cluster's view for `$SYS/broker/cluster/`
    /// (a no-op on other shards or with `$SYS` off).
    pub fn set_sys_cluster(&mut self, cluster: crate::sys::SysCluster) {
        if let Some(p) = self.sys_publisher.as_mut() {
            p.set_cluster(cluster);
        }
    }

    /// Called from `tick`: once per `$SYS` interval, reports to shard 0; shard 0
    /// also publishes what changed.
    pub(super) fn sys_tick(&mut self, now_ms: u64) {
        let interval_ms = self.limits.sys.interval_ms;
        if interval_ms == 0 || now_ms < self.sys_due_ms {
            return;
        }
        self.sys_due_ms = now_ms + interval_ms;
        let report = self.sys_report();
        if self.shard != 0 {
            self.outbox[0].push(MeshMsg::SysReport(report));
            return;
        }
        let retained = self.retained_count() as u64;
        let publisher = self
            .sys_publisher
            .as_mut()
            .expect("shard 0 aggregates $SYS reports when they are enabled");
        publisher.report(0, report);
        let round = publisher.round(now_ms, retained, &self.limits.sys.version);
        for (topic, payload) in round {
            let msg = Message {
                topic,
                payload,
                qos: QoS::AtMostOnce,
                retain: true,
                properties: None,
                expires_at_ms: None,
                origin: None,
                received_us: self.now_us,
            };
            self.publish(now_ms, msg);
        }
    }

    /// A `$SYS` report from shard `from`; only shard 0 receives them.
    pub(super) fn on_sys_report(&mut self, from: ShardId, report: SysReport) {
        assert_eq!(
            self.shard, 0,
            "$SYS report from shard {from} sent to a shard other than 0"
        );
        self.sys_publisher
            .as_mut()
            .expect("shard 0 aggregates $SYS reports when they are enabled")
            .report(from, report);
    }
}

#[cfg(test)]
mod tests {
    //! Goal: `$SYS` totals cover every shard and reach subscribers on any shard.
    //! Method: two engines joined by an in-memory mesh drained until quiet;
    //! the clock is the argument of `tick`.

    use crate::engine::testing::{connect_packet, pump_mesh};
    use tessera_proto::{
        Packet, ProtocolVersion, Publish, QoS, Str, Subscribe, Subscription, SubscriptionOptions,
    };

    use crate::engine::{Engine, Limits};
    use crate::session::ConnId;
    use crate::sys::SysSettings;

    fn cluster(interval_ms: u64) -> Vec<Engine> {
        let limits = Limits {
            sys: SysSettings {
                interval_ms,
                version: "tessera test".to_owned(),
            },
            ..Limits::default()
        };
        (0..2).map(|k| Engine::new(k, 2, limits.clone())).collect()
    }

    fn connect(engines: &mut [Engine], shard: usize, id: &'static str) -> ConnId {
        let c = connect_packet(ProtocolVersion::V5, id, true);
        let conn = engines[shard].connect(1, c, false);
        pump_mesh(engines, 1);
        conn
    }

    fn subscribe(engines: &mut [Engine], shard: usize, conn: ConnId, filter: &'static str) {
        let sub = Subscribe {
            packet_id: 1,
            properties: Default::default(),
            subscriptions: vec![Subscription {
                filter: Str::from_static(filter),
                options: SubscriptionOptions::qos(QoS::AtMostOnce),
            }],
        };
        engines[shard].handle_packet(1, conn, Packet::Subscribe(sub));
        pump_mesh(engines, 1);
    }

    /// (topic, payload) of the PUBLISH packets written to `conn`.
    fn received(e: &mut Engine, conn: ConnId) -> Vec<(String, String)> {
        let mut buf = e.output(conn).map(|o| o.buf.split()).unwrap_or_default();
        let mut out = Vec::new();
        while let Ok(Some(p)) = tessera_proto::decode(&mut buf, ProtocolVersion::V5, usize::MAX) {
            if let Packet::Publish(p) = p {
                out.push((
                    p.topic.to_string(),
                    String::from_utf8(p.payload.to_vec()).unwrap(),
                ));
            }
        }
        out
    }

    fn one_round(engines: &mut [Engine], now_ms: u64) {
        // Shard 1 first, so that shard 0 publishes with its fresh report.
        engines[1].tick(now_ms);
        pump_mesh(engines, now_ms);
        engines[0].tick(now_ms);
        pump_mesh(engines, now_ms);
    }

    #[test]
    fn totals_cover_every_shard_and_reach_subscribers_on_any_shard() {
        let mut engines = cluster(1000);
        let watcher = connect(&mut engines, 1, "watcher");
        subscribe(&mut engines, 1, watcher, "$SYS/broker/clients/+");
        subscribe(&mut engines, 1, watcher, "$SYS/broker/messages/received");
        let a = connect(&mut engines, 0, "a");
        connect(&mut engines, 0, "b");
        let publ = Publish::new(Str::from_static("t"), bytes::Bytes::from_static(b"x"));
        engines[0].handle_packet(2, a, Packet::Publish(publ));
        received(&mut engines[1], watcher);

        one_round(&mut engines, 10_000);
        let mut got = received(&mut engines[1], watcher);
        got.sort();
        let expected = [
            ("$SYS/broker/clients/connected", "3"),
            ("$SYS/broker/clients/disconnected", "0"),
            ("$SYS/broker/clients/maximum", "3"),
            ("$SYS/broker/clients/total", "3"),
            ("$SYS/broker/messages/received", "1"),
        ]
        .map(|(t, p)| (t.to_owned(), p.to_owned()));
        assert_eq!(got, expected);

        // Within the interval nothing is reported; after it, only changes.
        engines[0].release(10_500, a);
        one_round(&mut engines, 10_500);
        assert!(received(&mut engines[1], watcher).is_empty());
        one_round(&mut engines, 11_000);
        assert_eq!(
            received(&mut engines[1], watcher),
            [
                ("$SYS/broker/clients/connected".to_owned(), "2".to_owned()),
                ("$SYS/broker/clients/total".to_owned(), "2".to_owned()),
            ]
        );

        // Retained: a later subscriber on the other shard gets the values.
        let late = connect(&mut engines, 0, "late");
        subscribe(&mut engines, 0, late, "$SYS/broker/version");
        assert_eq!(
            received(&mut engines[0], late),
            [("$SYS/broker/version".to_owned(), "tessera test".to_owned())]
        );
    }

    #[test]
    fn an_interval_of_zero_publishes_nothing() {
        let mut engines = cluster(0);
        let watcher = connect(&mut engines, 1, "watcher");
        subscribe(&mut engines, 1, watcher, "$SYS/#");
        received(&mut engines[1], watcher);
        for t in [1_000, 20_000, 40_000] {
            one_round(&mut engines, t);
        }
        assert!(received(&mut engines[1], watcher).is_empty());
        assert!(!engines[1].has_outbox());
        assert_eq!(engines[0].retained_count(), 0);
    }
}
