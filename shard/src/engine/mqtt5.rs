//! MQTT 5 connection features of the engine: outbound topic aliases, the payload
//! format check, `$SYS` publish refusal, Response Information, reason strings
//! with the client's Request Problem Information, and server redirection.
//!
//! Part of [`Engine`] (same state, same shard); kept apart from `engine.rs` so
//! the main state machine reads as the packet flow, with one call per feature.

use tessera_proto::{
    AckProperties, ConnAck, ConnAckProperties, Connect, Disconnect, Encode, Packet,
    ProtocolVersion, PubAck, PubComp, PubRec, PubRel, Publish, QoS, ReasonCode, Str, SubAck,
    UnsubAck, Will, topic,
};

use super::{Conn, Engine};
use crate::alias::{AliasPlan, OutboundAliases};
use crate::session::ConnId;

/// What the broker tells connecting clients about another server (MQTT 5
/// section 4.11): every CONNECT is refused with this reason and the Server
/// Reference. 3.1.1 clients get return code 3 (Server unavailable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Redirect {
    /// Serve clients here.
    #[default]
    None,
    /// CONNACK 0x9C Use another server: a temporary move.
    UseAnotherServer,
    /// CONNACK 0x9D Server moved: a permanent move.
    ServerMoved,
}

/// MQTT 5 behaviour the operator chooses (the broker's `[mqtt5]` config section).
#[derive(Debug, Clone)]
pub struct Mqtt5Settings {
    /// Whether error acknowledgements, refused CONNACKs and DISCONNECTs carry
    /// a Reason String.
    pub reason_strings: bool,
    /// Response Information for clients that request it is this prefix
    /// followed by the ClientID; empty: never sent.
    pub response_information_prefix: String,
    /// Whether CONNECTs are redirected to `server_reference`.
    pub redirect: Redirect,
    /// The Server Reference sent with a redirect (and nothing else).
    pub server_reference: Option<Str>,
}

impl Default for Mqtt5Settings {
    fn default() -> Mqtt5Settings {
        Mqtt5Settings {
            reason_strings: true,
            response_information_prefix: "reply/".to_owned(),
            redirect: Redirect::None,
            server_reference: None,
        }
    }
}

/// Whether `topic` is under `$SYS/`, which only the broker publishes to.
pub(super) fn is_sys_topic(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// The short text of the Reason String sent with an error reason code.
pub(super) fn reason_text(rc: ReasonCode) -> &'static str {
    use ReasonCode::*;
    match rc {
        MalformedPacket => "malformed packet",
        ProtocolError => "protocol error",
        ImplementationSpecificError => "refused by the broker",
        UnsupportedProtocolVersion => "unsupported protocol version",
        ClientIdentifierNotValid => "client identifier not valid",
        BadUserNameOrPassword => "bad user name or password",
        NotAuthorized => "not authorized",
        ServerUnavailable => "server unavailable",
        ServerBusy => "server busy",
        Banned => "banned",
        ServerShuttingDown => "server shutting down",
        BadAuthenticationMethod => "authentication not supported",
        KeepAliveTimeout => "no packet within 1.5 times the keep alive",
        SessionTakenOver => "another connection took over the session",
        TopicFilterInvalid => "topic filter invalid",
        TopicNameInvalid => "topic name invalid",
        PacketIdentifierInUse => "packet identifier in use",
        PacketIdentifierNotFound => "packet identifier not found",
        ReceiveMaximumExceeded => "more QoS 2 publications in flight than Receive Maximum",
        TopicAliasInvalid => "topic alias 0 or above the Topic Alias Maximum",
        PacketTooLarge => "packet larger than the Maximum Packet Size",
        MessageRateTooHigh => "message rate too high",
        QuotaExceeded => "quota exceeded",
        AdministrativeAction => "disconnected by an administrator",
        PayloadFormatInvalid => "payload is not valid UTF-8 but its format indicator says so",
        RetainNotSupported => "retain not supported",
        QoSNotSupported => "QoS not supported",
        UseAnotherServer => "use another server",
        ServerMoved => "server moved",
        SharedSubscriptionsNotSupported => "shared subscriptions not supported",
        ConnectionRateExceeded => "connection rate exceeded",
        MaximumConnectTime => "maximum connect time",
        SubscriptionIdentifiersNotSupported => "subscription identifiers not supported",
        WildcardSubscriptionsNotSupported => "wildcard subscriptions not supported",
        _ => "unspecified error",
    }
}

/// Why a PUBLISH is refused without being delivered, if it is: a topic under
/// `$SYS/` (0x87 Not authorized), or a payload that is not UTF-8 although its
/// Payload Format Indicator says it is (0x99, section 3.3.2.3.2).
pub(super) fn publish_refusal(p: &Publish, version: ProtocolVersion) -> Option<ReasonCode> {
    if is_sys_topic(&p.topic) {
        return Some(ReasonCode::NotAuthorized);
    }
    let says_utf8 = version.is_v5() && p.properties.payload_format_indicator == Some(true);
    (says_utf8 && std::str::from_utf8(&p.payload).is_err())
        .then_some(ReasonCode::PayloadFormatInvalid)
}

/// Why a will refuses its CONNECT, if it does: the same rules as a PUBLISH
/// (section 3.1.3.9 allows the 0x99 check at CONNECT).
pub(super) fn will_refusal(w: &Will) -> Option<ReasonCode> {
    if is_sys_topic(&w.topic) {
        return Some(ReasonCode::NotAuthorized);
    }
    let says_utf8 = w.properties.payload_format_indicator == Some(true);
    (says_utf8 && std::str::from_utf8(&w.payload).is_err())
        .then_some(ReasonCode::PayloadFormatInvalid)
}

/// The reason code a packet reports (the first failure of a SUBACK or
/// UNSUBACK), whether it may carry problem information whatever the client
/// asked (CONNACK and DISCONNECT, [MQTT-3.1.2-29]), whether it has a Reason
/// String, and whether it has any problem information. `None` for packets
/// without a Reason String property.
fn problem_view(p: &Packet) -> Option<(ReasonCode, bool, bool, bool)> {
    let ack = |rc: ReasonCode, props: &AckProperties| {
        (rc, false, props.reason_string.is_some(), !props.is_empty())
    };
    let first_error = |codes: &[ReasonCode]| {
        codes
            .iter()
            .copied()
            .find(|c| c.is_error())
            .unwrap_or(ReasonCode::Success)
    };
    Some(match p {
        Packet::PubAck(a) => ack(a.reason_code, &a.properties),
        Packet::PubRec(a) => ack(a.reason_code, &a.properties),
        Packet::PubRel(a) => ack(a.reason_code, &a.properties),
        Packet::PubComp(a) => ack(a.reason_code, &a.properties),
        Packet::SubAck(a) => ack(first_error(&a.reason_codes), &a.properties),
        Packet::UnsubAck(a) => ack(first_error(&a.reason_codes), &a.properties),
        Packet::ConnAck(a) => (
            a.reason_code,
            true,
            a.properties.reason_string.is_some(),
            true,
        ),
        Packet::Disconnect(d) => (
            d.reason_code,
            true,
            d.properties.reason_string.is_some(),
            true,
        ),
        _ => return None,
    })
}

/// Sets the Reason String of a packet [`problem_view`] accepted; `None` also
/// removes its User Properties.
fn set_reason_string(p: &mut Packet, reason: Option<Str>) {
    let (slot, users) = match p {
        Packet::PubAck(PubAck { properties, .. })
        | Packet::PubRec(PubRec { properties, .. })
        | Packet::PubRel(PubRel { properties, .. })
        | Packet::PubComp(PubComp { properties, .. })
        | Packet::SubAck(SubAck { properties, .. })
        | Packet::UnsubAck(UnsubAck { properties, .. }) => (
            &mut properties.reason_string,
            &mut properties.user_properties,
        ),
        Packet::ConnAck(ConnAck { properties, .. }) => (
            &mut properties.reason_string,
            &mut properties.user_properties,
        ),
        Packet::Disconnect(Disconnect { properties, .. }) => (
            &mut properties.reason_string,
            &mut properties.user_properties,
        ),
        other => unreachable!("{:?} has no Reason String", other.packet_type()),
    };
    if reason.is_none() {
        users.clear();
    }
    *slot = reason;
}

impl Engine {
    /// The refusal every CONNECT gets while the operator redirects clients.
    pub(super) fn redirect_refusal(&self) -> Option<ReasonCode> {
        match self.limits.mqtt5.redirect {
            Redirect::None => None,
            Redirect::UseAnotherServer => Some(ReasonCode::UseAnotherServer),
            Redirect::ServerMoved => Some(ReasonCode::ServerMoved),
        }
    }

    /// CONNACK properties of a refused CONNECT: the Server Reference of a
    /// redirect (section 3.2.2.3.16).
    pub(super) fn refusal_properties(&self, rc: ReasonCode) -> ConnAckProperties {
        let mut props = ConnAckProperties::default();
        if matches!(rc, ReasonCode::UseAnotherServer | ReasonCode::ServerMoved) {
            props.server_reference = self.limits.mqtt5.server_reference.clone();
        }
        props
    }

    /// Response Information for a CONNECT that requests it (section
    /// 3.1.2.11.6): the configured prefix and the ClientID, when that makes a
    /// valid topic name to build response topics on.
    pub(super) fn response_information(&self, connect: &Connect) -> Option<Str> {
        let prefix = &self.limits.mqtt5.response_information_prefix;
        if connect.properties.request_response_information != Some(true) || prefix.is_empty() {
            return None;
        }
        let info = format!("{prefix}{}", connect.client_id.as_str());
        topic::validate_topic_name(&info, self.limits.topic_levels_max).ok()?;
        Str::try_from(info).ok()
    }

    /// Answers a PUBLISH that [`publish_refusal`] refused; the message is not
    /// delivered. QoS 1/2: PUBACK/PUBREC with the reason (v5; a 3.1.1 client
    /// gets a plain acknowledgement, it has no way to hear a refusal); the QoS 2
    /// exchange ends there. QoS 0: a payload format error disconnects (0x99),
    /// a `$SYS` publication is dropped silently.
    pub(super) fn refuse_publish(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        p: &Publish,
        rc: ReasonCode,
    ) {
        self.stats.publishes_refused += 1;
        let v5 = self.conn(conn).version.is_v5();
        let rc_on_wire = if v5 { rc } else { ReasonCode::Success };
        match p.qos {
            QoS::AtMostOnce if rc == ReasonCode::PayloadFormatInvalid => {
                self.protocol_error(now_ms, conn, rc);
            }
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let mut ack = PubAck::new(p.packet_id);
                ack.reason_code = rc_on_wire;
                self.send_ack(conn, Packet::PubAck(ack), None);
            }
            QoS::ExactlyOnce => {
                // Not recorded as awaiting PUBREL: a v5 client ends the exchange
                // on an error PUBREC, and a 3.1.1 client's PUBREL gets a PUBCOMP
                // either way.
                let mut ack = PubRec::new(p.packet_id);
                ack.reason_code = rc_on_wire;
                self.send_ack(conn, Packet::PubRec(ack), None);
            }
        }
    }

    /// The packet to write instead of `packet` when its problem information
    /// needs changing, else `None` (the common case, no copy): a Reason String
    /// added to an error report when reason strings are on; Reason String and
    /// User Properties removed from packets other than CONNACK and DISCONNECT
    /// when the client set Request Problem Information to 0 [MQTT-3.1.2-29]. A
    /// Reason String that would push the packet over the client's Maximum
    /// Packet Size is left out [MQTT-3.1.2-25].
    pub(super) fn problem_info_for(&self, c: &Conn, packet: &Packet) -> Option<Packet> {
        if !c.version.is_v5() {
            return None;
        }
        let (rc, always, has_reason, has_any) = problem_view(packet)?;
        let allowed = always || c.problem_info;
        let add = allowed && self.limits.mqtt5.reason_strings && rc.is_error() && !has_reason;
        let strip = !allowed && has_any;
        if !(add || strip) {
            return None;
        }
        let mut copy = packet.clone();
        if strip {
            set_reason_string(&mut copy, None);
            return Some(copy);
        }
        set_reason_string(&mut copy, Some(Str::from_static(reason_text(rc))));
        (copy.encoded_len(c.version) <= c.client_packet_size_max as usize).then_some(copy)
    }

    /// Chooses the outbound topic alias of a delivery to a v5 client that
    /// accepts them (section 3.3.2.3.4) and rewrites `publish` accordingly:
    /// an alias the client knows replaces the topic; otherwise the topic goes
    /// with a fresh alias, or with the least recently used one rebound. Returns
    /// what to [`Engine::commit_alias`] once the packet is written.
    pub(super) fn plan_alias(
        &self,
        conn: ConnId,
        publish: &mut Publish,
    ) -> Option<(Str, AliasPlan)> {
        let c = self.conn(conn);
        if c.out_alias_max == 0 || !c.version.is_v5() {
            return None;
        }
        let plan = match &c.out_aliases {
            Some(m) => m.plan(&publish.topic),
            None => AliasPlan::Bind(1),
        };
        publish.properties.topic_alias = Some(plan.alias());
        let topic = match plan {
            AliasPlan::Known(_) => std::mem::replace(&mut publish.topic, Str::from_static("")),
            AliasPlan::Bind(_) => publish.topic.clone(),
        };
        Some((topic, plan))
    }

    /// Records an alias planned by [`Engine::plan_alias`] whose PUBLISH is written.
    pub(super) fn commit_alias(&mut self, conn: ConnId, topic: &Str, plan: AliasPlan) {
        let c = self.conn_mut(conn);
        let max = c.out_alias_max;
        c.out_aliases
            .get_or_insert_with(|| Box::new(OutboundAliases::new(max)))
            .commit(topic, plan);
    }
}

#[cfg(test)]
mod tests {
    //! Goal: each feature of this module, as a client sees it on the wire.
    //! Method: one engine (one shard), connections driven with decoded packets,
    //! outputs decoded back and compared exactly.

    use bytes::Bytes;
    use tessera_proto::{
        Connect, ConnectProperties, Packet, ProtocolVersion, PubRel, Publish, QoS, ReasonCode, Str,
        Subscribe, Subscription, SubscriptionOptions, Will,
    };

    use super::{Mqtt5Settings, Redirect};
    use crate::engine::{Engine, Limits};
    use crate::session::ConnId;

    const V5: ProtocolVersion = ProtocolVersion::V5;
    const V311: ProtocolVersion = ProtocolVersion::V3_1_1;

    fn connect_packet(version: ProtocolVersion, id: &str, props: ConnectProperties) -> Connect {
        Connect {
            version,
            clean_start: true,
            keep_alive: 0,
            client_id: Str::try_from(id).unwrap(),
            will: None,
            username: None,
            password: None,
            properties: props,
        }
    }

    fn aliases_up_to(n: u16) -> ConnectProperties {
        ConnectProperties {
            topic_alias_maximum: Some(n),
            ..Default::default()
        }
    }

    fn drain(e: &mut Engine, conn: ConnId) -> Vec<Packet> {
        let version = e.version(conn).expect("live connection");
        let mut buf = e.output(conn).map(|o| o.buf.split()).unwrap_or_default();
        let mut out = Vec::new();
        while let Ok(Some(p)) = tessera_proto::decode(&mut buf, version, usize::MAX) {
            out.push(p);
        }
        assert!(buf.is_empty(), "undecodable output");
        out
    }

    /// Connects and returns the connection with its CONNACK consumed.
    fn connect(e: &mut Engine, c: Connect) -> ConnId {
        let conn = e.connect(1, c, false);
        match drain(e, conn).as_slice() {
            [Packet::ConnAck(a)] => assert_eq!(a.reason_code, ReasonCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        conn
    }

    fn subscribe(e: &mut Engine, conn: ConnId, filter: &'static str, qos: QoS) {
        let sub = Subscribe {
            packet_id: 1,
            properties: Default::default(),
            subscriptions: vec![Subscription {
                filter: Str::from_static(filter),
                options: SubscriptionOptions::qos(qos),
            }],
        };
        e.handle_packet(1, conn, Packet::Subscribe(sub));
        assert!(matches!(drain(e, conn).as_slice(), [Packet::SubAck(_)]));
    }

    fn publish(topic: &str, payload: &[u8], qos: QoS, packet_id: u16) -> Publish {
        let mut p = Publish::new(
            Str::try_from(topic).unwrap(),
            Bytes::copy_from_slice(payload),
        );
        p.qos = qos;
        p.packet_id = packet_id;
        p
    }

    fn utf8_claimed(mut p: Publish) -> Publish {
        p.properties.payload_format_indicator = Some(true);
        p
    }

    /// (topic, alias) of every PUBLISH in `packets`.
    fn topics_and_aliases(packets: &[Packet]) -> Vec<(String, Option<u16>)> {
        packets
            .iter()
            .map(|p| match p {
                Packet::Publish(p) => (p.topic.to_string(), p.properties.topic_alias),
                other => panic!("expected PUBLISH, got {other:?}"),
            })
            .collect()
    }

    fn alias_case(
        limit: u16,
        client_max: Option<u16>,
        version: ProtocolVersion,
    ) -> Vec<(String, Option<u16>)> {
        let limits = Limits {
            outbound_topic_alias_max: limit,
            ..Limits::default()
        };
        let mut e = Engine::new(0, 1, limits);
        let props = client_max.map(aliases_up_to).unwrap_or_default();
        let sub = connect(&mut e, connect_packet(version, "sub", props));
        subscribe(&mut e, sub, "a/#", QoS::AtMostOnce);
        let publ = connect(&mut e, connect_packet(V5, "pub", Default::default()));
        for t in ["a/1", "a/1", "a/2", "a/3", "a/1"] {
            e.handle_packet(
                2,
                publ,
                Packet::Publish(publish(t, b"x", QoS::AtMostOnce, 0)),
            );
        }
        topics_and_aliases(&drain(&mut e, sub))
    }

    fn ta(topic: &str, alias: Option<u16>) -> (String, Option<u16>) {
        (topic.to_owned(), alias)
    }

    /// Section 3.3.2.3.4: the first delivery on a topic binds an alias with the
    /// topic; later ones send an empty topic. A full map rebinds its least
    /// recently used alias, with the topic again.
    #[test]
    fn outbound_aliases_bind_then_stand_for_the_topic() {
        assert_eq!(
            alias_case(16, Some(2), V5),
            [
                ta("a/1", Some(1)),
                ta("", Some(1)),
                ta("a/2", Some(2)),
                ta("a/3", Some(1)), // a/1 was the least recently used
                ta("a/1", Some(2)), // then a/2 was
            ]
        );
    }

    /// The broker's cap applies below the client's maximum; a client announcing
    /// no maximum (or 0), and a 3.1.1 client, never get aliases.
    #[test]
    fn outbound_aliases_respect_both_maximums() {
        assert_eq!(
            alias_case(1, Some(10), V5),
            [
                ta("a/1", Some(1)),
                ta("", Some(1)),
                ta("a/2", Some(1)),
                ta("a/3", Some(1)),
                ta("a/1", Some(1)),
            ]
        );
        let none = ["a/1", "a/1", "a/2", "a/3", "a/1"].map(|t| ta(t, None));
        assert_eq!(alias_case(16, None, V5), none);
        assert_eq!(alias_case(16, Some(0), V5), none);
        assert_eq!(alias_case(0, Some(10), V5), none);
        assert_eq!(alias_case(16, Some(10), V311), none);
    }

    /// Aliases belong to the connection: after a reconnect (same session) the
    /// first delivery carries the topic again, and a delivery dropped for the
    /// client's Maximum Packet Size binds nothing.
    #[test]
    fn outbound_aliases_reset_per_connection_and_skip_dropped_deliveries() {
        let mut e = Engine::new(0, 1, Limits::default());
        let mut props = aliases_up_to(4);
        props.session_expiry_interval = Some(60);
        props.maximum_packet_size = Some(64);
        let mut c = connect_packet(V5, "sub", props);
        c.clean_start = false;
        let sub = connect(&mut e, c.clone());
        subscribe(&mut e, sub, "r/#", QoS::AtLeastOnce);
        let publ = connect(&mut e, connect_packet(V5, "pub", Default::default()));
        e.handle_packet(
            2,
            publ,
            Packet::Publish(publish("r/t", &[b'x'; 100], QoS::AtMostOnce, 0)),
        );
        e.handle_packet(
            2,
            publ,
            Packet::Publish(publish("r/t", b"small", QoS::AtMostOnce, 0)),
        );
        e.handle_packet(
            2,
            publ,
            Packet::Publish(publish("r/t", b"again", QoS::AtMostOnce, 0)),
        );
        assert_eq!(
            topics_and_aliases(&drain(&mut e, sub)),
            [ta("r/t", Some(1)), ta("", Some(1))],
            "the oversize delivery is not sent and binds no alias"
        );
        // An unacknowledged QoS 1 delivery, then a reconnect.
        e.handle_packet(
            3,
            publ,
            Packet::Publish(publish("r/t", b"q1", QoS::AtLeastOnce, 1)),
        );
        assert_eq!(topics_and_aliases(&drain(&mut e, sub)), [ta("", Some(1))]);
        e.release(4, sub);
        let sub = e.connect(5, c, false);
        let packets = drain(&mut e, sub);
        assert!(matches!(packets[0], Packet::ConnAck(_)));
        match &packets[1] {
            Packet::Publish(p) => {
                assert!(p.dup);
                assert_eq!(p.topic.as_str(), "r/t", "re-sent with its topic");
            }
            other => panic!("expected the re-sent PUBLISH, got {other:?}"),
        }
        e.handle_packet(
            6,
            publ,
            Packet::Publish(publish("r/t", b"new", QoS::AtMostOnce, 0)),
        );
        assert_eq!(
            topics_and_aliases(&drain(&mut e, sub)),
            [ta("r/t", Some(1))],
            "the new connection starts with no alias bound"
        );
    }

    /// Section 3.3.2.3.2: a payload that is not UTF-8 although its Payload
    /// Format Indicator says so is refused with 0x99 and not delivered: in the
    /// PUBACK or PUBREC at QoS 1/2 (the QoS 2 exchange ends there), with a
    /// DISCONNECT at QoS 0. Valid ones pass with their indicator.
    #[test]
    fn payload_format_invalid_is_refused_and_not_delivered() {
        let mut e = Engine::new(0, 1, Limits::default());
        let sub = connect(&mut e, connect_packet(V5, "sub", Default::default()));
        subscribe(&mut e, sub, "pf", QoS::ExactlyOnce);
        let publ = connect(&mut e, connect_packet(V5, "pub", Default::default()));
        let bad = [0xff, 0xfe];
        e.handle_packet(
            2,
            publ,
            Packet::Publish(utf8_claimed(publish("pf", &bad, QoS::AtLeastOnce, 1))),
        );
        e.handle_packet(
            2,
            publ,
            Packet::Publish(utf8_claimed(publish("pf", &bad, QoS::ExactlyOnce, 2))),
        );
        e.handle_packet(
            2,
            publ,
            Packet::Publish(publish("pf", &bad, QoS::AtLeastOnce, 3)),
        );
        e.handle_packet(
            2,
            publ,
            Packet::Publish(utf8_claimed(publish(
                "pf",
                "é".as_bytes(),
                QoS::AtLeastOnce,
                4,
            ))),
        );
        e.handle_packet(2, publ, Packet::PubRel(PubRel::new(2)));
        let acks = drain(&mut e, publ);
        let codes: Vec<(u16, ReasonCode, bool)> = acks
            .iter()
            .map(|p| match p {
                Packet::PubAck(a) => (
                    a.packet_id,
                    a.reason_code,
                    a.properties.reason_string.is_some(),
                ),
                Packet::PubRec(a) => (
                    a.packet_id,
                    a.reason_code,
                    a.properties.reason_string.is_some(),
                ),
                Packet::PubComp(a) => (
                    a.packet_id,
                    a.reason_code,
                    a.properties.reason_string.is_some(),
                ),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            codes,
            [
                (1, ReasonCode::PayloadFormatInvalid, true),
                (2, ReasonCode::PayloadFormatInvalid, true),
                (3, ReasonCode::Success, false), // no indicator: not checked
                (4, ReasonCode::Success, false),
                // The refused QoS 2 exchange left no state to release.
                (2, ReasonCode::PacketIdentifierNotFound, true),
            ]
        );
        let got: Vec<(Vec<u8>, Option<bool>)> = drain(&mut e, sub)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => (p.payload.to_vec(), p.properties.payload_format_indicator),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [(bad.to_vec(), None), ("é".as_bytes().to_vec(), Some(true))]
        );

        e.handle_packet(
            3,
            publ,
            Packet::Publish(utf8_claimed(publish("pf", &bad, QoS::AtMostOnce, 0))),
        );
        match drain(&mut e, publ).as_slice() {
            [Packet::Disconnect(d)] => {
                assert_eq!(d.reason_code, ReasonCode::PayloadFormatInvalid);
                assert!(d.properties.reason_string.is_some());
            }
            other => panic!("expected DISCONNECT 0x99, got {other:?}"),
        }
        assert!(e.is_ended(publ));
        assert!(drain(&mut e, sub).is_empty());
        assert_eq!(e.stats().publishes_refused, 3);
    }

    /// Only the broker publishes under `$SYS/`: a v5 client's QoS 1/2 PUBLISH
    /// is answered 0x87, a 3.1.1 client's is acknowledged as usual, QoS 0 is
    /// dropped silently; nothing is delivered and the connections stay open.
    #[test]
    fn clients_cannot_publish_to_sys_topics() {
        let mut e = Engine::new(0, 1, Limits::default());
        let sub = connect(&mut e, connect_packet(V5, "sub", Default::default()));
        subscribe(&mut e, sub, "$SYS/#", QoS::AtLeastOnce);
        let p5 = connect(&mut e, connect_packet(V5, "p5", Default::default()));
        let p3 = connect(&mut e, connect_packet(V311, "p3", Default::default()));
        e.handle_packet(
            2,
            p5,
            Packet::Publish(publish("$SYS/broker/uptime", b"1", QoS::AtLeastOnce, 1)),
        );
        e.handle_packet(
            2,
            p5,
            Packet::Publish(publish("$SYS", b"1", QoS::ExactlyOnce, 2)),
        );
        e.handle_packet(
            2,
            p5,
            Packet::Publish(publish("$SYS/x", b"1", QoS::AtMostOnce, 0)),
        );
        e.handle_packet(
            2,
            p3,
            Packet::Publish(publish("$SYS/x", b"1", QoS::AtLeastOnce, 1)),
        );
        e.handle_packet(
            2,
            p3,
            Packet::Publish(publish("$SYS/x", b"1", QoS::ExactlyOnce, 2)),
        );
        e.handle_packet(2, p3, Packet::PubRel(PubRel::new(2)));
        let v5_acks: Vec<ReasonCode> = drain(&mut e, p5)
            .iter()
            .map(|p| match p {
                Packet::PubAck(a) => a.reason_code,
                Packet::PubRec(a) => a.reason_code,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            v5_acks,
            [ReasonCode::NotAuthorized, ReasonCode::NotAuthorized]
        );
        let v3: Vec<&'static str> = drain(&mut e, p3)
            .iter()
            .map(|p| match p {
                Packet::PubAck(_) => "puback",
                Packet::PubRec(_) => "pubrec",
                Packet::PubComp(_) => "pubcomp",
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(v3, ["puback", "pubrec", "pubcomp"]);
        assert!(drain(&mut e, sub).is_empty());
        assert!(!e.is_ended(p5) && !e.is_ended(p3));
        // `$SYSTEM` is not `$SYS`.
        subscribe(&mut e, sub, "$SYSTEM/x", QoS::AtMostOnce);
        e.handle_packet(
            3,
            p5,
            Packet::Publish(publish("$SYSTEM/x", b"ok", QoS::AtMostOnce, 0)),
        );
        assert_eq!(
            topics_and_aliases(&drain(&mut e, sub)),
            [ta("$SYSTEM/x", None)]
        );
    }

    /// A will is held to the same rules at CONNECT.
    #[test]
    fn a_will_to_sys_or_with_a_bad_payload_format_refuses_the_connect() {
        let mut e = Engine::new(0, 1, Limits::default());
        let will = |topic: &'static str, payload: &'static [u8], utf8: bool| {
            let mut w = Will {
                topic: Str::from_static(topic),
                payload: Bytes::from_static(payload),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: Default::default(),
            };
            w.properties.payload_format_indicator = Some(utf8);
            w
        };
        for (w, rc) in [
            (will("$SYS/x", b"bye", false), ReasonCode::NotAuthorized),
            (will("w", &[0xc3], true), ReasonCode::PayloadFormatInvalid),
            (will("w", &[0xc3], false), ReasonCode::Success),
        ] {
            let mut c = connect_packet(V5, "w", Default::default());
            c.will = Some(w);
            let conn = e.connect(1, c, false);
            match drain(&mut e, conn).as_slice() {
                [Packet::ConnAck(a)] => assert_eq!(a.reason_code, rc),
                other => panic!("expected CONNACK, got {other:?}"),
            }
            e.release(2, conn);
        }
    }

    fn rpi_case(
        reason_strings: bool,
        request_problem_info: Option<bool>,
    ) -> (Option<Str>, Option<Str>) {
        let limits = Limits {
            mqtt5: Mqtt5Settings {
                reason_strings,
                ..Mqtt5Settings::default()
            },
            ..Limits::default()
        };
        let mut e = Engine::new(0, 1, limits);
        let props = ConnectProperties {
            request_problem_information: request_problem_info,
            ..Default::default()
        };
        let c = connect(&mut e, connect_packet(V5, "c", props));
        e.handle_packet(
            2,
            c,
            Packet::Publish(utf8_claimed(publish("t", &[0xff], QoS::AtLeastOnce, 1))),
        );
        e.handle_packet(
            2,
            c,
            Packet::Publish(utf8_claimed(publish("t", &[0xff], QoS::AtMostOnce, 0))),
        );
        match drain(&mut e, c).as_slice() {
            [Packet::PubAck(a), Packet::Disconnect(d)] => (
                a.properties.reason_string.clone(),
                d.properties.reason_string.clone(),
            ),
            other => panic!("expected PUBACK and DISCONNECT, got {other:?}"),
        }
    }

    /// Reason strings are on by default; Request Problem Information 0 keeps
    /// them off acknowledgements but not off DISCONNECT [MQTT-3.1.2-29]; the
    /// setting turns them all off.
    #[test]
    fn reason_strings_follow_the_setting_and_request_problem_information() {
        let text = Some(Str::from_static(super::reason_text(
            ReasonCode::PayloadFormatInvalid,
        )));
        assert_eq!(rpi_case(true, None), (text.clone(), text.clone()));
        assert_eq!(rpi_case(true, Some(true)), (text.clone(), text.clone()));
        assert_eq!(rpi_case(true, Some(false)), (None, text));
        assert_eq!(rpi_case(false, None), (None, None));
    }

    /// Section 3.1.2.11.6: Response Information only when requested, built from
    /// the configured prefix and the ClientID; none with an empty prefix.
    #[test]
    fn response_information_is_sent_when_requested() {
        let case = |prefix: &str, requested: Option<bool>| {
            let limits = Limits {
                mqtt5: Mqtt5Settings {
                    response_information_prefix: prefix.to_owned(),
                    ..Mqtt5Settings::default()
                },
                ..Limits::default()
            };
            let mut e = Engine::new(0, 1, limits);
            let props = ConnectProperties {
                request_response_information: requested,
                ..Default::default()
            };
            let conn = e.connect(1, connect_packet(V5, "client-7", props), false);
            match drain(&mut e, conn).as_slice() {
                [Packet::ConnAck(a)] => a
                    .properties
                    .response_information
                    .as_ref()
                    .map(Str::to_string),
                other => panic!("expected CONNACK, got {other:?}"),
            }
        };
        assert_eq!(
            case("reply/", Some(true)).as_deref(),
            Some("reply/client-7")
        );
        assert_eq!(case("reply/", Some(false)), None);
        assert_eq!(case("reply/", None), None);
        assert_eq!(case("", Some(true)), None);
    }

    /// Section 4.11: with a redirect configured every CONNECT is refused, v5
    /// with 0x9C or 0x9D and the Server Reference, 3.1.1 with return code 3.
    #[test]
    fn redirect_refuses_connects_with_the_server_reference() {
        for (redirect, rc) in [
            (Redirect::UseAnotherServer, ReasonCode::UseAnotherServer),
            (Redirect::ServerMoved, ReasonCode::ServerMoved),
        ] {
            let limits = Limits {
                mqtt5: Mqtt5Settings {
                    redirect,
                    server_reference: Some(Str::from_static("other.example:1883")),
                    ..Mqtt5Settings::default()
                },
                ..Limits::default()
            };
            let mut e = Engine::new(0, 1, limits);
            let conn = e.connect(1, connect_packet(V5, "c", Default::default()), false);
            match drain(&mut e, conn).as_slice() {
                [Packet::ConnAck(a)] => {
                    assert_eq!(a.reason_code, rc);
                    assert_eq!(
                        a.properties.server_reference.as_ref().map(Str::as_str),
                        Some("other.example:1883")
                    );
                    assert!(a.properties.reason_string.is_some());
                }
                other => panic!("expected CONNACK, got {other:?}"),
            }
            assert!(e.is_ended(conn));
            let old = e.connect(1, connect_packet(V311, "c3", Default::default()), false);
            match drain(&mut e, old).as_slice() {
                [Packet::ConnAck(a)] => assert_eq!(a.reason_code, ReasonCode::ServerUnavailable),
                other => panic!("expected CONNACK, got {other:?}"),
            }
            assert_eq!(e.session_count(), 0);
        }
    }
}
