//! The engine's answers to the admin API (see [`crate::admin`]): listings
//! built from the shard's own state, and the operator's actions, applied
//! through the same paths the protocol uses (a kick ends the connection like a
//! takeover does, a retained delete is a retained update broadcast to every
//! shard). Runs on the shard's thread, between packets, when the admin thread
//! asks; never on the hot path.

use tessera_proto::{Disconnect, Packet, ProtocolVersion, ReasonCode, Str, topic};

use super::{CloseReason, Engine};
use crate::admin::{
    Page, PageSelector, RetainedFilter, RetainedInfo, SessionDetail, SessionFilter, SessionInfo,
    ShardGauges, SubscriptionFilter, SubscriptionInfo,
};
use crate::message::Message;
use crate::session::Session;

/// Longest reason text a kick sends in the v5 DISCONNECT (bytes).
pub const KICK_REASON_BYTES_MAX: usize = 256;

fn protocol_name(v: ProtocolVersion) -> &'static str {
    match v {
        ProtocolVersion::V3_1 => "3.1",
        ProtocolVersion::V3_1_1 => "3.1.1",
        ProtocolVersion::V5 => "5.0",
    }
}

impl Engine {
    /// The shard's gauges as they stand (walks the sessions: for scrapes).
    pub fn gauges(&self) -> ShardGauges {
        let mut g = ShardGauges {
            subscriptions: self.subscription_count(),
            retained: self.retained_count(),
            route_filters: self.routes.filter_count(),
            queue_bytes_memory: self.queue_bytes_memory(),
            queue_bytes_disk: self.queue_bytes_disk(),
            ..ShardGauges::default()
        };
        for s in self.sessions.iter().flatten() {
            if s.conn.is_some() {
                g.sessions_online += 1;
            } else {
                g.sessions_offline += 1;
            }
            g.queued += s.queue.len();
            g.inflight += s.inflight().len();
        }
        g
    }

    fn session_info(&self, now_ms: u64, s: &Session) -> SessionInfo {
        let keep_alive_s = s.conn.and_then(|c| self.slot(c)).map(|c| c.keep_alive_s);
        let listener = s.conn.and_then(|c| self.slot(c)).map(|c| c.listener);
        let disconnected_for_s = s
            .disconnected_at_ms
            .filter(|_| s.conn.is_none())
            .map(|at| now_ms.saturating_sub(at) / 1000);
        let expires_in_s = match (s.disconnected_at_ms, s.conn) {
            (Some(at), None) if s.expiry_interval_s != u32::MAX => {
                let end = at.saturating_add(u64::from(s.expiry_interval_s) * 1000);
                Some(end.saturating_sub(now_ms).div_ceil(1000))
            }
            _ => None,
        };
        SessionInfo {
            client_id: s.client_id.to_string(),
            shard: self.shard,
            connected: s.conn.is_some(),
            protocol: protocol_name(s.version),
            keep_alive_s,
            listener,
            expiry_interval_s: s.expiry_interval_s,
            disconnected_for_s,
            expires_in_s,
            subscriptions: s.subscriptions.len(),
            inflight: s.inflight().len(),
            queued: s.queue.len(),
        }
    }

    fn session_by_id(&self, client_id: &str) -> Option<&Session> {
        let key = Str::try_from(client_id).ok()?;
        let idx = *self.by_client_id.get(&key)?;
        Some(self.session(idx))
    }

    /// Sessions matching `f`, paged by ClientID.
    pub fn admin_sessions(&self, now_ms: u64, f: &SessionFilter) -> Page<SessionInfo> {
        let mut sel = PageSelector::new(f.limit);
        for s in self.sessions.iter().flatten() {
            let id = s.client_id.as_str();
            if f.prefix.as_deref().is_some_and(|p| !id.starts_with(p))
                || f.connected.is_some_and(|c| c != s.conn.is_some())
            {
                continue;
            }
            let after = f.after.as_deref().is_none_or(|a| id > a);
            sel.offer(id, after, || self.session_info(now_ms, s));
        }
        sel.finish()
    }

    /// One session with its subscriptions.
    pub fn admin_session(&self, now_ms: u64, client_id: &str) -> Option<SessionDetail> {
        let s = self.session_by_id(client_id)?;
        let mut subscriptions: Vec<SubscriptionInfo> = s
            .subscriptions
            .iter()
            .map(|(filter, e)| subscription_info(s, filter, e))
            .collect();
        subscriptions.sort();
        let idx = self.by_client_id[&s.client_id];
        Some(SessionDetail {
            info: self.session_info(now_ms, s),
            subscriptions,
            has_will: s.will.is_some() || self.delayed_wills.contains_key(&idx),
        })
    }

    /// Subscriptions matching `f`, paged by (ClientID, filter).
    pub fn admin_subscriptions(&self, f: &SubscriptionFilter) -> Page<SubscriptionInfo> {
        let mut sel = PageSelector::new(f.limit);
        let sessions: Box<dyn Iterator<Item = &Session>> = match &f.client_id {
            Some(id) => Box::new(self.session_by_id(id).into_iter()),
            None => Box::new(self.sessions.iter().flatten().map(|s| &**s)),
        };
        for s in sessions {
            for (filter, e) in &s.subscriptions {
                if f.filter_contains
                    .as_deref()
                    .is_some_and(|c| !filter.as_str().contains(c))
                {
                    continue;
                }
                let key = (s.client_id.as_str(), filter.as_str());
                let after = f
                    .after
                    .as_ref()
                    .is_none_or(|(c, fl)| key > (c.as_str(), fl.as_str()));
                sel.offer(key, after, || subscription_info(s, filter, e));
            }
        }
        sel.finish()
    }

    fn retained_info(&self, now_ms: u64, topic: &str) -> Option<RetainedInfo> {
        let m = self.retained.get(topic, ())?.message.as_ref()?;
        retained_message_info(now_ms, m)
    }

    /// Retained messages (this shard's replica) matching `f`, paged by topic.
    /// With a topic filter only the matching part of the table is walked.
    pub fn admin_retained(&self, now_ms: u64, f: &RetainedFilter) -> Page<RetainedInfo> {
        let mut sel = PageSelector::new(f.limit);
        let mut offer = |m: &Message| {
            let Some(info) = retained_message_info(now_ms, m) else {
                return;
            };
            let after = f.after.as_deref().is_none_or(|a| m.topic.as_str() > a);
            sel.offer(m.topic.clone(), after, || info);
        };
        match f.topic_filter.as_deref() {
            // An invalid filter matches nothing (and must not reach the walk).
            Some(flt) if topic::validate_topic_filter(flt, topic::TOPIC_LEVELS_MAX).is_err() => {}
            Some(flt) => self.retained.for_each_name_matching(flt, |_, e| {
                if let Some(m) = &e.message {
                    offer(m);
                }
            }),
            None => self.retained.for_each(|_, _, e| {
                if let Some(m) = &e.message {
                    offer(m);
                }
            }),
        }
        sel.finish()
    }

    /// The retained message of `topic`, if any.
    pub fn admin_retained_get(&self, now_ms: u64, topic: &str) -> Option<RetainedInfo> {
        self.retained_info(now_ms, topic)
    }

    /// Clears the retained message of `topic` on every shard, as a retained
    /// PUBLISH with an empty payload would, without delivering anything to
    /// subscribers. Returns whether there was one.
    pub fn admin_retained_delete(&mut self, now_ms: u64, topic: &str) -> bool {
        let Ok(t) = Str::try_from(topic) else {
            return false;
        };
        if self.retained_info(now_ms, &t).is_none() {
            return false;
        }
        self.retain_update(now_ms, t.compact(), None, None);
        true
    }

    /// Disconnects the client of `client_id`: v5 clients get DISCONNECT 0x98
    /// (Administrative action) with `reason` as its Reason String. The will is
    /// published, as for any close the client did not ask for; a persistent
    /// session stays. Returns false when no client with that id is connected.
    pub fn admin_kick(&mut self, now_ms: u64, client_id: &str, reason: Option<&str>) -> bool {
        let Some(conn) = self.session_by_id(client_id).and_then(|s| s.conn) else {
            return false;
        };
        if self.conn(conn).version.is_v5() {
            let mut d = Disconnect::new(ReasonCode::AdministrativeAction);
            d.properties.reason_string = reason
                .map(|r| truncate_utf8(r, KICK_REASON_BYTES_MAX))
                .and_then(|r| Str::try_from(r).ok());
            self.write_packet(conn, &Packet::Disconnect(d));
        }
        tracing::info!(
            shard = self.shard,
            client_id,
            reason = reason.unwrap_or(""),
            "admin: client kicked"
        );
        self.end_conn(now_ms, conn, CloseReason::Administrative);
        true
    }

    /// Ends the session of `client_id` now, as its expiry would: a connected
    /// client is kicked first (v5: DISCONNECT 0x98), a delayed will is
    /// published, subscriptions and queued messages are discarded. Returns
    /// false when there is no such session.
    pub fn admin_expire_session(&mut self, now_ms: u64, client_id: &str) -> bool {
        if self.session_by_id(client_id).is_none() {
            return false;
        }
        self.admin_kick(now_ms, client_id, Some("session expired by an operator"));
        // A non-persistent session ended with its connection.
        let Some(idx) = Str::try_from(client_id)
            .ok()
            .and_then(|k| self.by_client_id.get(&k).copied())
        else {
            return true;
        };
        if let Some(d) = self.delayed_wills.remove(&idx) {
            self.publish_will(now_ms, d.will, d.origin);
        }
        self.stats.sessions_expired += 1;
        self.destroy_session(now_ms, idx);
        tracing::info!(shard = self.shard, client_id, "admin: session expired");
        true
    }
}

/// What the admin API shows of a retained message, unless it expired.
fn retained_message_info(now_ms: u64, m: &Message) -> Option<RetainedInfo> {
    if m.is_expired(now_ms) {
        return None;
    }
    Some(RetainedInfo {
        topic: m.topic.to_string(),
        payload: m.payload.clone(),
        qos: m.qos as u8,
        expires_in_s: m
            .expires_at_ms
            .map(|t| t.saturating_sub(now_ms).div_ceil(1000)),
    })
}

fn subscription_info(
    s: &Session,
    filter: &Str,
    e: &crate::session::SubscriptionEntry,
) -> SubscriptionInfo {
    SubscriptionInfo {
        client_id: s.client_id.to_string(),
        filter: filter.to_string(),
        qos: e.options.qos as u8,
        no_local: e.options.no_local,
        retain_as_published: e.options.retain_as_published,
        retain_handling: e.options.retain_handling as u8,
        subscription_id: e.subscription_id,
    }
}

/// `text` cut to at most `max` bytes at a character boundary.
fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    //! Goal: the admin answers match the engine's state, and the actions behave
    //! as the protocol paths they reuse. Method: one engine, packets in, the
    //! admin methods' results and the connections' output checked.

    use bytes::BytesMut;
    use tessera_proto::{
        Connect, Packet, ProtocolVersion, Publish, QoS, Str, Subscribe, Subscription,
        SubscriptionOptions,
    };

    use crate::admin::{RetainedFilter, SessionFilter, SubscriptionFilter};
    use crate::engine::{Engine, Limits};
    use crate::session::ConnId;

    fn connect(e: &mut Engine, id: &str, version: ProtocolVersion, clean: bool) -> ConnId {
        let mut c = Connect {
            version,
            clean_start: clean,
            keep_alive: 30,
            client_id: Str::try_from(id).unwrap(),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        };
        if version.is_v5() && !clean {
            c.properties.session_expiry_interval = Some(3600);
        }
        let conn = e.connect(1, c, false);
        e.output(conn).unwrap().buf.clear();
        conn
    }

    fn decode_all(e: &mut Engine, conn: ConnId, v: ProtocolVersion) -> Vec<Packet> {
        let mut buf: BytesMut = std::mem::take(&mut e.output(conn).unwrap().buf);
        let mut out = Vec::new();
        while let Ok(Some(p)) = tessera_proto::decode(&mut buf, v, u32::MAX as usize) {
            out.push(p);
        }
        out
    }

    #[test]
    fn listings_page_and_filter() {
        let mut e = Engine::new(0, 1, Limits::default());
        for i in 0..5 {
            connect(&mut e, &format!("dev-{i}"), ProtocolVersion::V3_1_1, true);
        }
        let other = connect(&mut e, "other", ProtocolVersion::V5, false);
        e.connection_lost(2, other);
        let f = SessionFilter {
            prefix: Some("dev-".into()),
            limit: 2,
            ..Default::default()
        };
        let p = e.admin_sessions(5, &f);
        assert_eq!(p.total, 5);
        let ids: Vec<_> = p.items.iter().map(|s| s.client_id.as_str()).collect();
        assert_eq!(ids, ["dev-0", "dev-1"]);
        let f = SessionFilter {
            after: Some("dev-3".into()),
            limit: 10,
            ..f
        };
        let ids: Vec<_> = e
            .admin_sessions(5, &f)
            .items
            .into_iter()
            .map(|s| s.client_id)
            .collect();
        assert_eq!(ids, ["dev-4"]);
        let offline = e.admin_sessions(
            5,
            &SessionFilter {
                connected: Some(false),
                limit: 10,
                ..Default::default()
            },
        );
        assert_eq!(offline.items.len(), 1);
        assert_eq!(offline.items[0].client_id, "other");
        assert_eq!(offline.items[0].expires_in_s, Some(3600));
        let g = e.gauges();
        assert_eq!((g.sessions_online, g.sessions_offline), (5, 1));
    }

    #[test]
    fn kick_sends_administrative_action_to_v5_and_keeps_persistent_sessions() {
        let mut e = Engine::new(0, 1, Limits::default());
        let c = connect(&mut e, "v5", ProtocolVersion::V5, false);
        assert!(e.admin_kick(3, "v5", Some("maintenance")));
        let out = decode_all(&mut e, c, ProtocolVersion::V5);
        match &out[..] {
            [Packet::Disconnect(d)] => {
                assert_eq!(
                    d.reason_code,
                    tessera_proto::ReasonCode::AdministrativeAction
                );
                assert_eq!(
                    d.properties.reason_string.as_ref().map(Str::as_str),
                    Some("maintenance")
                );
            }
            other => panic!("expected one DISCONNECT, got {other:?}"),
        }
        assert!(e.is_ended(c));
        assert!(!e.admin_kick(4, "v5", None), "no longer connected");
        assert!(e.admin_session(4, "v5").is_some(), "the session persists");
        assert!(e.admin_expire_session(5, "v5"));
        assert!(e.admin_session(5, "v5").is_none());
        assert!(!e.admin_expire_session(5, "v5"));
    }

    #[test]
    fn subscriptions_and_retained_are_listed_and_retained_deletes() {
        let mut e = Engine::new(0, 1, Limits::default());
        let c = connect(&mut e, "sub", ProtocolVersion::V3_1_1, true);
        let sub = Subscribe {
            packet_id: 1,
            properties: Default::default(),
            subscriptions: vec![
                Subscription {
                    filter: Str::from_static("a/#"),
                    options: SubscriptionOptions::qos(QoS::AtLeastOnce),
                },
                Subscription {
                    filter: Str::from_static("b/+"),
                    options: SubscriptionOptions::qos(QoS::AtMostOnce),
                },
            ],
        };
        e.handle_packet(2, c, Packet::Subscribe(sub));
        let subs = e.admin_subscriptions(&SubscriptionFilter {
            client_id: Some("sub".into()),
            limit: 10,
            ..Default::default()
        });
        let filters: Vec<_> = subs
            .items
            .iter()
            .map(|s| (s.filter.as_str(), s.qos))
            .collect();
        assert_eq!(filters, [("a/#", 1), ("b/+", 0)]);
        let p = connect(&mut e, "pub", ProtocolVersion::V3_1_1, true);
        let mut publish = Publish::new(Str::from_static("a/x"), "hello".into());
        publish.retain = true;
        e.handle_packet(3, p, Packet::Publish(publish));
        let r = e.admin_retained(
            4,
            &RetainedFilter {
                topic_filter: Some("a/#".into()),
                limit: 10,
                ..Default::default()
            },
        );
        assert_eq!(r.items.len(), 1);
        assert_eq!(&r.items[0].payload[..], b"hello");
        e.output(c).unwrap().buf.clear();
        assert!(e.admin_retained_delete(5, "a/x"));
        assert!(e.admin_retained_get(5, "a/x").is_none());
        assert!(!e.admin_retained_delete(5, "a/x"));
        assert!(
            e.output(c).unwrap().buf.is_empty(),
            "a delete delivers nothing to subscribers"
        );
    }
}
