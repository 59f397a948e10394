//! Security in the engine (`impl Engine`): the ACL checks on PUBLISH, SUBSCRIBE
//! and the will, MQTT 5 re-authentication (AUTH 0x19), credential expiry
//! (DISCONNECT 0xA0) and per-connection publish rate limits (0x97).
//!
//! Policy lives behind [`AuthHook`], implemented by the broker; this file only
//! applies its answers. Publish decisions are cached per session
//! ([`crate::authz::AclCache`]), keyed by topic and invalidated when the hook's
//! generation changes, so a publisher pays one hash lookup per message.

use std::rc::Rc;

use bytes::Bytes;
use tessera_proto::{Auth, AuthProperties, Connect, Disconnect, Packet, Publish, ReasonCode, Str};

use super::{CloseReason, Engine};
use crate::authz::{Action, Admission, AuthHook, AuthStep};
use crate::session::{ConnId, SessionAuth, SessionIdx};

/// A token bucket on the engine's millisecond clock: `rate` tokens per second,
/// bursts of one second's worth. Tokens are kept in thousandths so a refill
/// after one millisecond is exact.
#[derive(Debug, Clone)]
pub(super) struct RateBucket {
    rate_per_s: u64,
    tokens_milli: u64,
    at_ms: u64,
}

impl RateBucket {
    pub(super) fn new(rate_per_s: u32, now_ms: u64) -> RateBucket {
        RateBucket {
            rate_per_s: u64::from(rate_per_s),
            tokens_milli: u64::from(rate_per_s) * 1000,
            at_ms: now_ms,
        }
    }

    /// Takes `n` tokens if there are that many.
    pub(super) fn take(&mut self, now_ms: u64, n: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.at_ms);
        self.at_ms = self.at_ms.max(now_ms);
        let cap = self.rate_per_s * 1000;
        self.tokens_milli = (self.tokens_milli + elapsed * self.rate_per_s).min(cap);
        let need = n.saturating_mul(1000);
        if self.tokens_milli >= need {
            self.tokens_milli -= need;
            true
        } else {
            false
        }
    }
}

/// Per-connection security state; boxed in the connection when needed.
#[derive(Debug, Default)]
pub(super) struct ConnGuard {
    /// The enhanced authentication method of CONNECT; re-authentication must
    /// use the same.
    method: Option<Str>,
    /// A re-authentication in progress: the method's state.
    reauth_state: Option<Bytes>,
    /// When the credentials expire, in engine milliseconds.
    expires_at_ms: Option<u64>,
    publish_rate: Option<RateBucket>,
    publish_bytes: Option<RateBucket>,
}

impl Engine {
    /// Installs the broker's authentication and ACL hook (once, at boot).
    pub fn set_auth_hook(&mut self, hook: Rc<dyn AuthHook>) {
        self.auth_hook = Some(hook);
    }

    /// Why an authenticated CONNECT is still refused: an authentication
    /// method the driver did not complete (0x8C, MQTT 5 section 3.1.2.11.9:
    /// the client must not believe it authenticated), or a will the ACL does
    /// not let it publish (0x87).
    pub(super) fn admission_refusal(
        &self,
        connect: &Connect,
        admission: &Admission,
    ) -> Option<ReasonCode> {
        if connect.properties.authentication_method.is_some() && admission.auth_method.is_none() {
            return Some(ReasonCode::BadAuthenticationMethod);
        }
        if let (Some(hook), Some(w)) = (&self.auth_hook, &connect.will) {
            let user = connect.username.as_ref().map(Str::as_str);
            let allowed = match &admission.token_acl {
                Some(t) => t.allows(Action::Publish, &w.topic),
                None => hook.allowed(connect.client_id.as_str(), user, Action::Publish, &w.topic),
            };
            if !allowed {
                return Some(ReasonCode::NotAuthorized);
            }
        }
        None
    }

    /// Records who the accepted connection is; returns the Authentication
    /// Method and Data for the CONNACK.
    pub(super) fn attach_auth(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        idx: SessionIdx,
        connect: &Connect,
        admission: Admission,
    ) -> (Option<Str>, Option<Bytes>) {
        if self.auth_hook.is_some() {
            let s = self.session_mut(idx);
            let auth = s.auth.get_or_insert_with(Box::default);
            let username = connect.username.as_ref().map(Str::compact);
            if auth.username != username || auth.token_acl != admission.token_acl {
                // Another user or other token rules: old decisions do not apply.
                **auth = SessionAuth {
                    username,
                    token_acl: admission.token_acl.clone(),
                    ..SessionAuth::default()
                };
            }
        }
        let (rate, bytes) = (
            self.limits.publish_rate_per_s,
            self.limits.publish_bytes_per_s,
        );
        if admission != Admission::default() || rate > 0 || bytes > 0 {
            let guard = ConnGuard {
                method: admission.auth_method.clone(),
                reauth_state: None,
                expires_at_ms: admission.expires_at_ms,
                publish_rate: (rate > 0).then(|| RateBucket::new(rate, now_ms)),
                publish_bytes: (bytes > 0).then(|| RateBucket::new(bytes, now_ms)),
            };
            self.conn_mut(conn).guard = Some(Box::new(guard));
            if let Some(t) = admission.expires_at_ms {
                self.arm_credentials(conn, t);
            }
        }
        (admission.auth_method, admission.auth_data)
    }

    /// Why a PUBLISH is not accepted: over the connection's rate (0x97) or
    /// denied by the ACL (0x87).
    pub(super) fn publish_gate(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        idx: SessionIdx,
        p: &Publish,
    ) -> Option<ReasonCode> {
        if let Some(g) = self.conn_mut(conn).guard.as_deref_mut() {
            let over_rate = g.publish_rate.as_mut().is_some_and(|b| !b.take(now_ms, 1));
            let over_bytes = g
                .publish_bytes
                .as_mut()
                .is_some_and(|b| !b.take(now_ms, p.payload.len() as u64));
            if over_rate || over_bytes {
                self.stats.publishes_rate_limited += 1;
                return Some(ReasonCode::QuotaExceeded);
            }
        }
        let hook = self.auth_hook.clone()?;
        let generation = hook.generation();
        let s = self.session_mut(idx);
        let auth = s.auth.get_or_insert_with(Box::default);
        if let Some(allowed) = auth.acl.get(generation, &p.topic) {
            return (!allowed).then_some(ReasonCode::NotAuthorized);
        }
        let s = self.session(idx);
        let auth = s.auth.as_ref();
        let user = auth.and_then(|a| a.username.as_ref());
        let allowed = match auth.and_then(|a| a.token_acl.as_ref()) {
            Some(t) => t.allows(Action::Publish, &p.topic),
            None => hook.allowed(
                s.client_id.as_str(),
                user.map(Str::as_str),
                Action::Publish,
                &p.topic,
            ),
        };
        let auth = self.session_mut(idx).auth.as_mut().expect("created above");
        auth.acl.put(generation, &p.topic, allowed);
        (!allowed).then_some(ReasonCode::NotAuthorized)
    }

    /// Why the session's client may not subscribe to `filter` (the filter of
    /// a shared subscription without its `$share/{group}/` prefix), if the
    /// ACL denies it.
    pub(super) fn subscribe_refusal(&self, idx: SessionIdx, filter: &str) -> Option<ReasonCode> {
        let hook = self.auth_hook.as_ref()?;
        let s = self.session(idx);
        let auth = s.auth.as_ref();
        let user = auth.and_then(|a| a.username.as_ref());
        let allowed = match auth.and_then(|a| a.token_acl.as_ref()) {
            Some(t) => t.allows(Action::Subscribe, filter),
            None => hook.allowed(
                s.client_id.as_str(),
                user.map(Str::as_str),
                Action::Subscribe,
                filter,
            ),
        };
        (!allowed).then(|| hook.subscribe_denied())
    }

    /// AUTH from a connected client (MQTT 5 section 4.12.1): re-authentication
    /// with the method of its CONNECT. Anything else is a protocol error.
    pub(super) fn on_auth(&mut self, now_ms: u64, conn: ConnId, idx: SessionIdx, a: Auth) {
        let hook = self.auth_hook.clone();
        let c = self.conn_mut(conn);
        let (Some(hook), Some(g)) = (hook, c.guard.as_deref_mut()) else {
            return self.protocol_error(now_ms, conn, ReasonCode::ProtocolError);
        };
        let Some(method) = g.method.clone() else {
            return self.protocol_error(now_ms, conn, ReasonCode::ProtocolError);
        };
        if a.properties.authentication_method.as_ref() != Some(&method) {
            return self.protocol_error(now_ms, conn, ReasonCode::ProtocolError);
        }
        let state = match (a.reason_code, g.reauth_state.take()) {
            (ReasonCode::ReAuthenticate, None) => None,
            (ReasonCode::ContinueAuthentication, Some(state)) => Some(state),
            _ => return self.protocol_error(now_ms, conn, ReasonCode::ProtocolError),
        };
        let data = a.properties.authentication_data.unwrap_or_default();
        match hook.auth_step(&method, state.as_deref(), &data) {
            AuthStep::Continue { data, state } => {
                if let Some(g) = self.conn_mut(conn).guard.as_deref_mut() {
                    g.reauth_state = Some(state);
                }
                self.send_auth(
                    conn,
                    ReasonCode::ContinueAuthentication,
                    &method,
                    Some(data),
                );
            }
            AuthStep::Success { data, username } => {
                let s = self.session_mut(idx);
                let auth = s.auth.get_or_insert_with(Box::default);
                if auth.username.as_ref() != Some(&username) || auth.token_acl.is_some() {
                    **auth = SessionAuth {
                        username: Some(username.compact()),
                        ..SessionAuth::default()
                    };
                }
                self.send_auth(conn, ReasonCode::Success, &method, data);
            }
            AuthStep::Failure(_) => {
                // Section 4.12.1: a failed re-authentication ends the connection.
                self.stats.reauth_failures += 1;
                let rc = ReasonCode::NotAuthorized;
                self.write_packet(conn, &Packet::Disconnect(Disconnect::new(rc)));
                self.end_conn(now_ms, conn, CloseReason::ProtocolError(rc));
            }
        }
    }

    fn send_auth(&mut self, conn: ConnId, rc: ReasonCode, method: &Str, data: Option<Bytes>) {
        let auth = Auth {
            reason_code: rc,
            properties: AuthProperties {
                authentication_method: Some(method.clone()),
                authentication_data: data,
                ..AuthProperties::default()
            },
        };
        self.write_packet(conn, &Packet::Auth(auth));
    }

    /// Disconnects every client for which `pred(client_id, username)` holds
    /// (v5: DISCONNECT with `rc`), e.g. after a ban list reload. Returns how
    /// many. Their sessions follow the normal rules of an ended connection.
    pub fn disconnect_where(
        &mut self,
        now_ms: u64,
        rc: ReasonCode,
        pred: impl FnMut(&str, Option<&str>) -> bool,
    ) -> usize {
        self.end_conns_where(now_ms, rc, CloseReason::ProtocolError(rc), pred)
    }

    /// Ends every live connection for which `pred(client_id, username)` holds,
    /// v5 clients with DISCONNECT `rc`, as `reason`. Returns how many.
    pub(super) fn end_conns_where(
        &mut self,
        now_ms: u64,
        rc: ReasonCode,
        reason: CloseReason,
        mut pred: impl FnMut(&str, Option<&str>) -> bool,
    ) -> usize {
        let mut hit = Vec::new();
        for (slot, c) in self.conns.iter().enumerate() {
            let Some(c) = c else { continue };
            if c.ended || c.session == SessionIdx::MAX {
                continue;
            }
            let s = self.session(c.session);
            let user = s.auth.as_ref().and_then(|a| a.username.as_ref());
            if pred(s.client_id.as_str(), user.map(Str::as_str)) {
                hit.push(ConnId {
                    slot: slot as u32,
                    serial: c.serial,
                });
            }
        }
        for &conn in &hit {
            if self.conn(conn).version.is_v5() {
                self.write_packet(conn, &Packet::Disconnect(Disconnect::new(rc)));
            }
            self.end_conn(now_ms, conn, reason);
        }
        hit.len()
    }

    /// The credential expiry timer of `conn` came due (`timers`): closes the
    /// connection if its credentials expired (a JWT's `exp`); v5 clients get
    /// DISCONNECT 0xA0 Maximum connect time.
    pub(super) fn credentials_due(&mut self, now_ms: u64, conn: ConnId) {
        let expired = self.slot(conn).filter(|c| !c.ended).is_some_and(|c| {
            c.guard
                .as_ref()
                .and_then(|g| g.expires_at_ms)
                .is_some_and(|t| now_ms >= t)
        });
        if !expired {
            return;
        }
        self.stats.credentials_expired += 1;
        let rc = ReasonCode::MaximumConnectTime;
        if self.conn(conn).version.is_v5() {
            self.write_packet(conn, &Packet::Disconnect(Disconnect::new(rc)));
        }
        self.end_conn(now_ms, conn, CloseReason::ProtocolError(rc));
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use bytes::Bytes;
    use tessera_proto::{Connect, Packet, ProtocolVersion, PubAck, Publish, QoS, ReasonCode, Str};

    use super::RateBucket;
    use crate::authz::{Action, AuthHook, AuthStep};
    use crate::engine::{Engine, Limits};

    /// Denies publishing to `deny/...`; counts its calls.
    #[derive(Debug, Default)]
    struct CountingHook {
        calls: Cell<u32>,
        generation: Cell<u64>,
    }

    impl AuthHook for CountingHook {
        fn generation(&self) -> u64 {
            self.generation.get()
        }
        fn allowed(&self, _: &str, _: Option<&str>, _: Action, topic: &str) -> bool {
            self.calls.set(self.calls.get() + 1);
            !topic.starts_with("deny/")
        }
        fn auth_step(&self, _: &str, _: Option<&[u8]>, _: &[u8]) -> AuthStep {
            AuthStep::Failure(ReasonCode::BadAuthenticationMethod)
        }
    }

    fn publish(topic: &'static str, id: u16) -> Packet {
        let mut p = Publish::new(Str::from_static(topic), Bytes::from_static(b"x"));
        p.qos = QoS::AtLeastOnce;
        p.packet_id = id;
        Packet::Publish(p)
    }

    fn acks(e: &mut Engine, conn: crate::session::ConnId) -> Vec<(u16, ReasonCode)> {
        let mut buf = e.output(conn).map(|o| o.buf.split()).unwrap_or_default();
        let mut out = Vec::new();
        while let Ok(Some(p)) = tessera_proto::decode(&mut buf, ProtocolVersion::V5, usize::MAX) {
            if let Packet::PubAck(PubAck {
                packet_id,
                reason_code,
                ..
            }) = p
            {
                out.push((packet_id, reason_code));
            }
        }
        out
    }

    /// The ACL hook is asked once per topic per session, not per message,
    /// until its generation changes (a reload).
    #[test]
    fn publish_decisions_are_cached_per_session_until_a_reload() {
        let hook = Rc::new(CountingHook::default());
        let mut e = Engine::new(0, 1, Limits::default());
        e.set_auth_hook(hook.clone());
        let c = Connect {
            version: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 0,
            client_id: Str::from_static("cached"),
            will: None,
            username: None,
            password: None,
            properties: Default::default(),
        };
        let conn = e.connect(1, c, false);
        for id in 1..=100 {
            e.handle_packet(2, conn, publish("ok/t", id));
            e.handle_packet(2, conn, publish("deny/t", id));
        }
        assert_eq!(hook.calls.get(), 2, "one check per topic");
        let got = acks(&mut e, conn);
        assert_eq!(got.len(), 200);
        assert!(got.iter().step_by(2).all(|a| a.1 == ReasonCode::Success));
        assert!(
            got.iter()
                .skip(1)
                .step_by(2)
                .all(|a| a.1 == ReasonCode::NotAuthorized)
        );
        hook.generation.set(1);
        e.handle_packet(3, conn, publish("ok/t", 1));
        assert_eq!(hook.calls.get(), 3, "a new generation checks again");
    }

    #[test]
    fn the_rate_bucket_allows_a_burst_then_the_rate() {
        let mut b = RateBucket::new(10, 0);
        assert!((0..10).all(|_| b.take(0, 1)), "one second's burst");
        assert!(!b.take(0, 1));
        assert!(b.take(100, 1), "100 ms refill one token at 10/s");
        assert!(!b.take(100, 1));
        assert!(!b.take(5_000, 11), "never more than the burst");
        assert!(b.take(5_000, 10));
    }
}
