//! Proptest strategies that generate valid packets for a given protocol version.
//!
//! "Valid" means exactly what round-trips through this codec: a packet drawn from
//! `packet(version)` encodes without error in `version` and decodes back equal.
//! So for 3.1 and 3.1.1 every property set is empty and every reason code is one
//! the 3.1.1 wire can express (CONNACK: the six return codes; SUBACK: granted QoS
//! 0/1/2 or 0x80 failure; the publish acknowledgments and DISCONNECT: `Success`;
//! UNSUBACK: no reason codes at all). For v5 reason codes are those allowed in
//! their packet (`ReasonCode::is_valid_for`) and properties are random subsets
//! with in-range values (Receive Maximum and Maximum Packet Size at least 1,
//! subscription identifiers 1..=268,435,455, topic alias at least 1, CONNACK
//! Maximum QoS 0 or 1, authentication data only with a method).
//!
//! Collections (user properties, subscriptions, reason codes) hold at most 3
//! entries, strings at most 39 characters and binary data at most 63 bytes, so
//! property tests run fast: these strategies explore the grammar, not the size
//! limits.
//!
//! What it does not generate: invalid or adversarial input (the decoder's
//! negative tests and fuzz targets cover that), nor topic filters that the broker
//! would refuse (the codec does not judge filter syntax, but the filters drawn here
//! are syntactically valid so simulation tests can subscribe with them).

use std::fmt;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::{BoxedStrategy, Union};

use crate::VARINT_MAX;
use crate::packet::{
    Auth, ConnAck, Connect, Disconnect, Packet, PubAck, PubComp, PubRec, PubRel, Publish, SubAck,
    Subscribe, Subscription, UnsubAck, Unsubscribe, Will,
};
use crate::properties::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, SubscribeProperties, UnsubscribeProperties, WillProperties,
};
use crate::reason::{ALL_REASON_CODES, ReasonCode, ReasonContext};
use crate::types::{ProtocolVersion, QoS, RetainHandling, Str, SubscriptionOptions};

/// Exclusive bound on the length of generated collections.
const COLLECTION_LEN_MAX: usize = 4;
/// Exclusive bound on the characters of a generated string.
const STR_CHARS_MAX: usize = 40;
/// Exclusive bound on the bytes of generated binary data and payloads.
const BINARY_BYTES_MAX: usize = 64;

/// Any of the three protocol versions.
pub fn protocol_version() -> impl Strategy<Value = ProtocolVersion> {
    select(vec![
        ProtocolVersion::V3_1,
        ProtocolVersion::V3_1_1,
        ProtocolVersion::V5,
    ])
}

/// Any QoS level.
pub fn qos() -> impl Strategy<Value = QoS> {
    select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

/// A non-zero packet identifier.
pub fn packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

/// A character of an MQTT string: mostly ASCII letters, often separators and
/// multi-byte characters (2, 3 and 4 bytes of UTF-8), sometimes any scalar value.
/// Never U+0000, which MQTT strings must not contain.
fn str_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::char::range('a', 'z'),
        2 => select(vec![
            '/', ' ', '$', '+', '#', 'é', 'ß', '€', '中', '\u{FFFD}', '😀', '𝄞', '\u{7F}', '\u{1}',
        ]),
        1 => any::<char>(),
    ]
    .prop_map(|c| if c == '\0' { '0' } else { c })
}

/// A character of a topic name or filter level: like `str_char` but without the
/// level separator and the wildcards, which carry meaning in topics.
fn level_char() -> impl Strategy<Value = char> {
    str_char().prop_map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c })
}

fn to_str(s: String) -> Str {
    Str::try_from(s).expect("generated strings follow the MQTT string rules")
}

/// A valid MQTT UTF-8 string (section 1.5.4): 0 to 39 characters, no U+0000,
/// with non-ASCII and multi-byte characters.
pub fn str_strategy() -> impl Strategy<Value = Str> {
    vec(str_char(), 0..STR_CHARS_MAX).prop_map(|cs| to_str(cs.into_iter().collect()))
}

/// One topic level: 0 to 9 characters without `/`, `+` or `#`.
fn topic_level() -> impl Strategy<Value = String> {
    vec(level_char(), 0..10).prop_map(|cs| cs.into_iter().collect())
}

/// A valid topic name: non-empty, one to four levels, no wildcard characters.
pub fn topic_name() -> impl Strategy<Value = Str> {
    vec(topic_level(), 1..5).prop_map(|levels| {
        let mut name = levels.join("/");
        if name.is_empty() {
            // A single empty level: topic names need at least one character.
            name.push('t');
        }
        to_str(name)
    })
}

/// A syntactically valid topic filter: levels that are names or `+`, optionally
/// ending in `#`; a quarter of them shared (`$share/{group}/{filter}`).
pub fn topic_filter() -> impl Strategy<Value = Str> {
    let level = prop_oneof![3 => topic_level(), 1 => Just("+".to_owned())];
    let filter = (vec(level, 1..5), any::<bool>()).prop_map(|(mut levels, multi)| {
        if multi {
            levels.push("#".to_owned());
        }
        let filter = levels.join("/");
        if filter.is_empty() {
            "f".to_owned()
        } else {
            filter
        }
    });
    let group = vec(level_char(), 1..10).prop_map(|cs| cs.into_iter().collect::<String>());
    prop_oneof![
        3 => filter.clone(),
        1 => (group, filter).prop_map(|(g, f)| format!("$share/{g}/{f}")),
    ]
    .prop_map(to_str)
}

/// Binary data (section 1.5.6) of 0 to 63 bytes.
pub fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..BINARY_BYTES_MAX).prop_map(Bytes::from)
}

/// User properties: 0 to 3 name/value pairs, names possibly repeated.
pub fn user_properties() -> impl Strategy<Value = Vec<(Str, Str)>> {
    vec((str_strategy(), str_strategy()), 0..COLLECTION_LEN_MAX)
}

/// A subscription identifier: 1..=268,435,455, spread over every variable byte
/// integer length.
pub fn subscription_identifier() -> impl Strategy<Value = u32> {
    prop_oneof![
        1..=127u32,
        128..=16_383u32,
        16_384..=2_097_151u32,
        2_097_152..=VARINT_MAX
    ]
}

/// A topic alias: 1..=65,535 (0 is a protocol error).
pub fn topic_alias() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

/// An authentication method, and data only when there is a method (a v5
/// protocol error otherwise).
fn authentication() -> impl Strategy<Value = (Option<Str>, Option<Bytes>)> {
    option::of((str_strategy(), option::of(binary()))).prop_map(|auth| match auth {
        Some((method, data)) => (Some(method), data),
        None => (None, None),
    })
}

/// A reason code allowed in `ctx` by MQTT 5 table 2-6.
pub fn reason_code(ctx: ReasonContext) -> impl Strategy<Value = ReasonCode> {
    select(
        ALL_REASON_CODES
            .iter()
            .copied()
            .filter(|rc| rc.is_valid_for(ctx))
            .collect::<Vec<_>>(),
    )
}

/// The generated value for v5, the default (empty properties, `Success`, ...) for
/// 3.1 and 3.1.1, which cannot carry it.
fn v5_or_default<T, S>(version: ProtocolVersion, v5: S) -> BoxedStrategy<T>
where
    T: Default + Clone + fmt::Debug + 'static,
    S: Strategy<Value = T> + 'static,
{
    if version.is_v5() {
        v5.boxed()
    } else {
        Just(T::default()).boxed()
    }
}

// ---------------------------------------------------------------------------
// v5 property sets.

/// CONNECT properties: a random subset, values in range.
pub fn connect_properties() -> impl Strategy<Value = ConnectProperties> {
    (
        option::of(any::<u32>()),
        option::of(1..=u16::MAX),
        option::of(1..=u32::MAX),
        option::of(any::<u16>()),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        authentication(),
        user_properties(),
    )
        .prop_map(
            |(sei, rm, mps, tam, rri, rpi, (am, ad), up)| ConnectProperties {
                session_expiry_interval: sei,
                receive_maximum: rm,
                maximum_packet_size: mps,
                topic_alias_maximum: tam,
                request_response_information: rri,
                request_problem_information: rpi,
                authentication_method: am,
                authentication_data: ad,
                user_properties: up,
            },
        )
}

/// Will properties of CONNECT: a random subset.
pub fn will_properties() -> impl Strategy<Value = WillProperties> {
    (
        option::of(any::<u32>()),
        option::of(any::<bool>()),
        option::of(any::<u32>()),
        option::of(str_strategy()),
        option::of(topic_name()),
        option::of(binary()),
        user_properties(),
    )
        .prop_map(|(wdi, pfi, mei, ct, rt, cd, up)| WillProperties {
            will_delay_interval: wdi,
            payload_format_indicator: pfi,
            message_expiry_interval: mei,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
        })
}

/// CONNACK properties: a random subset, Maximum QoS only 0 or 1.
pub fn connack_properties() -> impl Strategy<Value = ConnAckProperties> {
    let limits = (
        option::of(any::<u32>()),
        option::of(1..=u16::MAX),
        option::of(select(vec![QoS::AtMostOnce, QoS::AtLeastOnce])),
        option::of(any::<bool>()),
        option::of(1..=u32::MAX),
        option::of(any::<u16>()),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        option::of(any::<bool>()),
        option::of(any::<u16>()),
    );
    let texts = (
        option::of(str_strategy()),
        option::of(str_strategy()),
        user_properties(),
        option::of(str_strategy()),
        option::of(str_strategy()),
        authentication(),
    );
    (limits, texts).prop_map(
        |((sei, rm, mq, ra, mps, tam, wsa, sia, ssa, ska), (aci, rs, up, ri, sr, (am, ad)))| {
            ConnAckProperties {
                session_expiry_interval: sei,
                receive_maximum: rm,
                maximum_qos: mq,
                retain_available: ra,
                maximum_packet_size: mps,
                assigned_client_identifier: aci,
                topic_alias_maximum: tam,
                reason_string: rs,
                user_properties: up,
                wildcard_subscription_available: wsa,
                subscription_identifiers_available: sia,
                shared_subscription_available: ssa,
                server_keep_alive: ska,
                response_information: ri,
                server_reference: sr,
                authentication_method: am,
                authentication_data: ad,
            }
        },
    )
}

/// PUBLISH properties: a random subset, with 0 to 3 subscription identifiers.
pub fn publish_properties() -> impl Strategy<Value = PublishProperties> {
    (
        option::of(any::<bool>()),
        option::of(any::<u32>()),
        option::of(topic_alias()),
        option::of(topic_name()),
        option::of(binary()),
        user_properties(),
        vec(subscription_identifier(), 0..COLLECTION_LEN_MAX),
        option::of(str_strategy()),
    )
        .prop_map(|(pfi, mei, ta, rt, cd, up, sids, ct)| PublishProperties {
            payload_format_indicator: pfi,
            message_expiry_interval: mei,
            topic_alias: ta,
            response_topic: rt,
            correlation_data: cd,
            user_properties: up,
            subscription_identifiers: sids,
            content_type: ct,
        })
}

/// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
pub fn ack_properties() -> impl Strategy<Value = AckProperties> {
    (option::of(str_strategy()), user_properties()).prop_map(|(reason_string, user_properties)| {
        AckProperties {
            reason_string,
            user_properties,
        }
    })
}

/// SUBSCRIBE properties: an optional subscription identifier and user properties.
pub fn subscribe_properties() -> impl Strategy<Value = SubscribeProperties> {
    (option::of(subscription_identifier()), user_properties()).prop_map(
        |(subscription_identifier, user_properties)| SubscribeProperties {
            subscription_identifier,
            user_properties,
        },
    )
}

/// UNSUBSCRIBE properties: user properties only.
pub fn unsubscribe_properties() -> impl Strategy<Value = UnsubscribeProperties> {
    user_properties().prop_map(|user_properties| UnsubscribeProperties { user_properties })
}

/// DISCONNECT properties: a random subset.
pub fn disconnect_properties() -> impl Strategy<Value = DisconnectProperties> {
    (
        option::of(any::<u32>()),
        option::of(str_strategy()),
        user_properties(),
        option::of(str_strategy()),
    )
        .prop_map(|(sei, rs, up, sr)| DisconnectProperties {
            session_expiry_interval: sei,
            reason_string: rs,
            user_properties: up,
            server_reference: sr,
        })
}

/// AUTH properties: data only with a method.
pub fn auth_properties() -> impl Strategy<Value = AuthProperties> {
    (
        authentication(),
        option::of(str_strategy()),
        user_properties(),
    )
        .prop_map(
            |((authentication_method, authentication_data), reason_string, user_properties)| {
                AuthProperties {
                    authentication_method,
                    authentication_data,
                    reason_string,
                    user_properties,
                }
            },
        )
}

// ---------------------------------------------------------------------------
// Packets.

/// A will message; properties only in v5.
pub fn will(version: ProtocolVersion) -> impl Strategy<Value = Will> {
    (
        topic_name(),
        binary(),
        qos(),
        any::<bool>(),
        v5_or_default(version, will_properties()),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        })
}

/// A CONNECT whose own `version` is `version`. In 3.1/3.1.1 a password comes only
/// with a user name [MQTT-3.1.2-22]; v5 allows it alone.
pub fn connect(version: ProtocolVersion) -> impl Strategy<Value = Connect> {
    let credentials = if version.is_v5() {
        (option::of(str_strategy()), option::of(binary())).boxed()
    } else {
        option::of((str_strategy(), option::of(binary())))
            .prop_map(|c| match c {
                Some((username, password)) => (Some(username), password),
                None => (None, None),
            })
            .boxed()
    };
    (
        any::<bool>(),
        any::<u16>(),
        str_strategy(),
        option::of(will(version)),
        credentials,
        v5_or_default(version, connect_properties()),
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, will, (username, password), properties)| {
                Connect {
                    version,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                }
            },
        )
}

/// A CONNACK: any v5 CONNACK reason, or one of the six 3.1.1 return codes.
pub fn connack(version: ProtocolVersion) -> impl Strategy<Value = ConnAck> {
    let reason = if version.is_v5() {
        reason_code(ReasonContext::ConnAck).boxed()
    } else {
        (0u8..=5)
            .prop_map(|code| {
                ReasonCode::from_v3_connack(code).expect("0..=5 are 3.1.1 return codes")
            })
            .boxed()
    };
    (
        any::<bool>(),
        reason,
        v5_or_default(version, connack_properties()),
    )
        .prop_map(|(session_present, reason_code, properties)| ConnAck {
            session_present,
            reason_code,
            properties,
        })
}

/// A PUBLISH: QoS 0 has packet id 0 and no DUP; QoS 1/2 a non-zero id. In v5 one
/// in eight has an empty topic replaced by a topic alias.
pub fn publish(version: ProtocolVersion) -> impl Strategy<Value = Publish> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        packet_id(),
        topic_name(),
        v5_or_default(version, publish_properties()),
        binary(),
        proptest::bool::weighted(0.125),
        topic_alias(),
    )
        .prop_map(
            move |(qos, dup, retain, id, topic, mut properties, payload, alias_only, alias)| {
                let (dup, packet_id) = if qos == QoS::AtMostOnce {
                    (false, 0)
                } else {
                    (dup, id)
                };
                let topic = if version.is_v5() && alias_only {
                    properties.topic_alias.get_or_insert(alias);
                    Str::new()
                } else {
                    topic
                };
                Publish {
                    dup,
                    qos,
                    retain,
                    topic,
                    packet_id,
                    properties,
                    payload,
                }
            },
        )
}

/// The reason code of a publish acknowledgment: any allowed in `ctx` for v5,
/// `Success` for 3.1/3.1.1, which have none.
fn ack_reason(version: ProtocolVersion, ctx: ReasonContext) -> BoxedStrategy<ReasonCode> {
    if version.is_v5() {
        reason_code(ctx).boxed()
    } else {
        Just(ReasonCode::Success).boxed()
    }
}

/// The fields every publish acknowledgment has.
fn ack_fields(
    version: ProtocolVersion,
    ctx: ReasonContext,
) -> impl Strategy<Value = (u16, ReasonCode, AckProperties)> {
    (
        packet_id(),
        ack_reason(version, ctx),
        v5_or_default(version, ack_properties()),
    )
}

/// A PUBACK.
pub fn puback(version: ProtocolVersion) -> impl Strategy<Value = PubAck> {
    ack_fields(version, ReasonContext::PubAckRec).prop_map(
        |(packet_id, reason_code, properties)| PubAck {
            packet_id,
            reason_code,
            properties,
        },
    )
}

/// A PUBREC.
pub fn pubrec(version: ProtocolVersion) -> impl Strategy<Value = PubRec> {
    ack_fields(version, ReasonContext::PubAckRec).prop_map(
        |(packet_id, reason_code, properties)| PubRec {
            packet_id,
            reason_code,
            properties,
        },
    )
}

/// A PUBREL.
pub fn pubrel(version: ProtocolVersion) -> impl Strategy<Value = PubRel> {
    ack_fields(version, ReasonContext::PubRelComp).prop_map(
        |(packet_id, reason_code, properties)| PubRel {
            packet_id,
            reason_code,
            properties,
        },
    )
}

/// A PUBCOMP.
pub fn pubcomp(version: ProtocolVersion) -> impl Strategy<Value = PubComp> {
    ack_fields(version, ReasonContext::PubRelComp).prop_map(
        |(packet_id, reason_code, properties)| PubComp {
            packet_id,
            reason_code,
            properties,
        },
    )
}

/// Subscription options: only the QoS in 3.1/3.1.1; in v5 all options, except
/// no-local on a shared subscription [MQTT-3.8.3-4].
pub fn subscription(version: ProtocolVersion) -> impl Strategy<Value = Subscription> {
    let retain_handling = select(vec![
        RetainHandling::SendAtSubscribe,
        RetainHandling::SendIfNew,
        RetainHandling::DoNotSend,
    ]);
    (
        topic_filter(),
        qos(),
        any::<bool>(),
        any::<bool>(),
        retain_handling,
    )
        .prop_map(
            move |(filter, qos, no_local, retain_as_published, retain_handling)| {
                let options = if version.is_v5() {
                    SubscriptionOptions {
                        qos,
                        no_local: no_local && !filter.starts_with("$share/"),
                        retain_as_published,
                        retain_handling,
                    }
                } else {
                    SubscriptionOptions::qos(qos)
                };
                Subscription { filter, options }
            },
        )
}

/// A SUBSCRIBE with 1 to 3 filters.
pub fn subscribe(version: ProtocolVersion) -> impl Strategy<Value = Subscribe> {
    (
        packet_id(),
        v5_or_default(version, subscribe_properties()),
        vec(subscription(version), 1..COLLECTION_LEN_MAX),
    )
        .prop_map(|(packet_id, properties, subscriptions)| Subscribe {
            packet_id,
            properties,
            subscriptions,
        })
}

/// A SUBACK with 1 to 3 codes: any SUBACK reason in v5; granted QoS 0/1/2 or
/// `UnspecifiedError` (return code 0x80) in 3.1/3.1.1.
pub fn suback(version: ProtocolVersion) -> impl Strategy<Value = SubAck> {
    let reason = if version.is_v5() {
        reason_code(ReasonContext::SubAck).boxed()
    } else {
        select(vec![
            ReasonCode::Success,
            ReasonCode::GrantedQoS1,
            ReasonCode::GrantedQoS2,
            ReasonCode::UnspecifiedError,
        ])
        .boxed()
    };
    (
        packet_id(),
        v5_or_default(version, ack_properties()),
        vec(reason, 1..COLLECTION_LEN_MAX),
    )
        .prop_map(|(packet_id, properties, reason_codes)| SubAck {
            packet_id,
            properties,
            reason_codes,
        })
}

/// An UNSUBSCRIBE with 1 to 3 filters.
pub fn unsubscribe(version: ProtocolVersion) -> impl Strategy<Value = Unsubscribe> {
    (
        packet_id(),
        v5_or_default(version, unsubscribe_properties()),
        vec(topic_filter(), 1..COLLECTION_LEN_MAX),
    )
        .prop_map(|(packet_id, properties, filters)| Unsubscribe {
            packet_id,
            properties,
            filters,
        })
}

/// An UNSUBACK: 1 to 3 reason codes in v5, none in 3.1/3.1.1.
pub fn unsuback(version: ProtocolVersion) -> impl Strategy<Value = UnsubAck> {
    let reasons = if version.is_v5() {
        vec(reason_code(ReasonContext::UnsubAck), 1..COLLECTION_LEN_MAX).boxed()
    } else {
        Just(Vec::new()).boxed()
    };
    (
        packet_id(),
        v5_or_default(version, ack_properties()),
        reasons,
    )
        .prop_map(|(packet_id, properties, reason_codes)| UnsubAck {
            packet_id,
            properties,
            reason_codes,
        })
}

/// A DISCONNECT: any DISCONNECT reason and properties in v5, a bare `Success`
/// in 3.1/3.1.1.
pub fn disconnect(version: ProtocolVersion) -> impl Strategy<Value = Disconnect> {
    (
        ack_reason(version, ReasonContext::Disconnect),
        v5_or_default(version, disconnect_properties()),
    )
        .prop_map(|(reason_code, properties)| Disconnect {
            reason_code,
            properties,
        })
}

/// An AUTH (MQTT 5.0 only, so it takes no version).
pub fn auth() -> impl Strategy<Value = Auth> {
    (reason_code(ReasonContext::Auth), auth_properties()).prop_map(|(reason_code, properties)| {
        Auth {
            reason_code,
            properties,
        }
    })
}

/// Any of the fifteen packets that exist in `version` (AUTH only in v5), each
/// type equally likely. A CONNECT carries `version` as its own.
pub fn packet(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let mut arms: Vec<BoxedStrategy<Packet>> = vec![
        connect(version).prop_map(Packet::from).boxed(),
        connack(version).prop_map(Packet::ConnAck).boxed(),
        publish(version).prop_map(Packet::Publish).boxed(),
        puback(version).prop_map(Packet::PubAck).boxed(),
        pubrec(version).prop_map(Packet::PubRec).boxed(),
        pubrel(version).prop_map(Packet::PubRel).boxed(),
        pubcomp(version).prop_map(Packet::PubComp).boxed(),
        subscribe(version).prop_map(Packet::Subscribe).boxed(),
        suback(version).prop_map(Packet::SubAck).boxed(),
        unsubscribe(version).prop_map(Packet::Unsubscribe).boxed(),
        unsuback(version).prop_map(Packet::UnsubAck).boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect(version).prop_map(Packet::Disconnect).boxed(),
    ];
    if version.is_v5() {
        arms.push(auth().prop_map(Packet::Auth).boxed());
    }
    Union::new(arms)
}
