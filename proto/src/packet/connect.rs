//! CONNECT (MQTT 5 section 3.1, 3.1.1 section 3.1, and 3.1's "MQIsdp" level 3).

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{self, Reader, prefixed_len};
use crate::error::{DecodeError, EncodeError, Malformed};
use crate::frame::Body;
use crate::properties::{ConnectProperties, PropertySet, WillProperties};
use crate::types::{PacketType, ProtocolVersion, QoS, Str};

/// A client's request to connect. The version is the one the client speaks and
/// decides the grammar of every later packet on the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Protocol version from the protocol name and level.
    pub version: ProtocolVersion,
    /// Clean Start (v5) / Clean Session (3.1.1).
    pub clean_start: bool,
    /// Keep alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// Client identifier; may be empty (the server then assigns one, or refuses).
    pub client_id: Str,
    /// The will message, if any.
    pub will: Option<Will>,
    /// User name.
    pub username: Option<Str>,
    /// Password (binary data).
    pub password: Option<Bytes>,
    /// v5 properties; always empty for 3.1 and 3.1.1.
    pub properties: ConnectProperties,
}

/// The will message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic the will is published to.
    pub topic: Str,
    /// Will payload.
    pub payload: Bytes,
    /// QoS of the will publication.
    pub qos: QoS,
    /// Whether the will is retained.
    pub retain: bool,
    /// v5 will properties; always empty for 3.1 and 3.1.1.
    pub properties: WillProperties,
}

const FLAG_RESERVED: u8 = 0x01;
const FLAG_CLEAN: u8 = 0x02;
const FLAG_WILL: u8 = 0x04;
const FLAG_WILL_RETAIN: u8 = 0x20;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_USERNAME: u8 = 0x80;

fn protocol_version(name: &[u8], level: u8) -> Result<ProtocolVersion, DecodeError> {
    match (name, level) {
        (b"MQTT", 4) => Ok(ProtocolVersion::V3_1_1),
        (b"MQTT", 5) => Ok(ProtocolVersion::V5),
        (b"MQIsdp", 3) => Ok(ProtocolVersion::V3_1),
        _ => {
            let mut shown = [0u8; 8];
            let n = name.len().min(8);
            shown[..n].copy_from_slice(&name[..n]);
            Err(DecodeError::UnsupportedProtocol { name: shown, level })
        }
    }
}

impl Connect {
    pub(crate) fn decode(r: &mut Reader) -> Result<Connect, DecodeError> {
        let name = r.binary()?;
        let level = r.u8()?;
        let version = protocol_version(&name, level)?;
        let flags = r.u8()?;
        if flags & FLAG_RESERVED != 0 {
            return Err(DecodeError::Malformed(Malformed::ConnectReservedFlag));
        }
        let will_flag = flags & FLAG_WILL != 0;
        let will_qos = QoS::from_u8((flags >> 3) & 0b11)
            .ok_or(DecodeError::Malformed(Malformed::InvalidQoS))?;
        let will_retain = flags & FLAG_WILL_RETAIN != 0;
        if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
            return Err(DecodeError::Malformed(Malformed::WillFlagsWithoutWill));
        }
        let has_username = flags & FLAG_USERNAME != 0;
        let has_password = flags & FLAG_PASSWORD != 0;
        // [MQTT-3.1.2-22]: 3.1.1 forbids a password without a user name; 5.0 allows it.
        if !version.is_v5() && has_password && !has_username {
            return Err(DecodeError::Malformed(Malformed::PasswordWithoutUsername));
        }
        let keep_alive = r.u16()?;
        let properties = if version.is_v5() {
            ConnectProperties::decode(r)?
        } else {
            Default::default()
        };
        let client_id = r.string()?;
        let will = if will_flag {
            let properties = if version.is_v5() {
                WillProperties::decode(r)?
            } else {
                Default::default()
            };
            let topic = r.string()?;
            let payload = r.binary()?;
            Some(Will {
                topic,
                payload,
                qos: will_qos,
                retain: will_retain,
                properties,
            })
        } else {
            None
        };
        let username = if has_username {
            Some(r.string()?)
        } else {
            None
        };
        let password = if has_password {
            Some(r.binary()?)
        } else {
            None
        };
        r.finish()?;
        Ok(Connect {
            version,
            clean_start: flags & FLAG_CLEAN != 0,
            keep_alive,
            client_id,
            will,
            username,
            password,
            properties,
        })
    }

    fn connect_flags(&self) -> u8 {
        let mut f = 0;
        if self.clean_start {
            f |= FLAG_CLEAN;
        }
        if let Some(w) = &self.will {
            f |= FLAG_WILL | ((w.qos as u8) << 3);
            if w.retain {
                f |= FLAG_WILL_RETAIN;
            }
        }
        if self.username.is_some() {
            f |= FLAG_USERNAME;
        }
        if self.password.is_some() {
            f |= FLAG_PASSWORD;
        }
        f
    }
}

impl Body for Connect {
    const TYPE: PacketType = PacketType::Connect;

    /// CONNECT is encoded in its own version; the connection version is ignored.
    fn check(&self, _version: ProtocolVersion) -> Result<(), EncodeError> {
        if !self.version.is_v5() && self.password.is_some() && self.username.is_none() {
            return Err(EncodeError::Invalid(
                "MQTT 3.1.1 password without user name",
            ));
        }
        if let Some(p) = &self.password {
            codec::check_field(p)?;
        }
        if let Some(w) = &self.will {
            codec::check_field(&w.payload)?;
            w.properties.check()?;
        }
        self.properties.check()
    }

    fn body_len(&self, _version: ProtocolVersion) -> usize {
        let v = self.version;
        let mut n = prefixed_len(v.protocol_name().len()) + 1 + 1 + 2;
        if v.is_v5() {
            n += self.properties.encoded_len();
        }
        n += prefixed_len(self.client_id.len());
        if let Some(w) = &self.will {
            if v.is_v5() {
                n += w.properties.encoded_len();
            }
            n += prefixed_len(w.topic.len()) + prefixed_len(w.payload.len());
        }
        n += self.username.as_ref().map_or(0, |u| prefixed_len(u.len()));
        n += self.password.as_ref().map_or(0, |p| prefixed_len(p.len()));
        n
    }

    fn put_body(&self, _version: ProtocolVersion, buf: &mut BytesMut) {
        let v = self.version;
        codec::put_binary(buf, v.protocol_name().as_bytes());
        buf.put_u8(v.level());
        buf.put_u8(self.connect_flags());
        buf.put_u16(self.keep_alive);
        if v.is_v5() {
            self.properties.encode(buf);
        }
        codec::put_str(buf, &self.client_id);
        if let Some(w) = &self.will {
            if v.is_v5() {
                w.properties.encode(buf);
            }
            codec::put_str(buf, &w.topic);
            codec::put_binary(buf, &w.payload);
        }
        if let Some(u) = &self.username {
            codec::put_str(buf, u);
        }
        if let Some(p) = &self.password {
            codec::put_binary(buf, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::testing::{assert_vector, decode, s};

    fn bytes(b: &'static [u8]) -> Bytes {
        Bytes::from_static(b)
    }

    #[test]
    fn v3_1_1_spec_example_with_will_user_name_and_password() {
        // 3.1.1 section 3.1.2.10, figure 3.6, completed with the payload its flags call for.
        #[rustfmt::skip]
        let wire = [
            0x10, 0x23,                         // CONNECT, remaining length 35
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x04,                               // protocol level 4
            0xCE,                               // user name 1, password 1, will retain 0,
                                                // will QoS 01, will 1, clean session 1, reserved 0
            0x00, 0x0A,                         // keep alive 10
            0x00, 0x02, b'i', b'd',             // client id "id"
            0x00, 0x03, b'a', b'/', b'b',       // will topic "a/b"
            0x00, 0x02, b'h', b'i',             // will message "hi"
            0x00, 0x04, b'u', b's', b'e', b'r', // user name "user"
            0x00, 0x04, b'p', b'a', b's', b's', // password "pass"
        ];
        let expected = Connect {
            version: ProtocolVersion::V3_1_1,
            clean_start: true,
            keep_alive: 10,
            client_id: s("id"),
            will: Some(Will {
                topic: s("a/b"),
                payload: bytes(b"hi"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: WillProperties::default(),
            }),
            username: Some(s("user")),
            password: Some(bytes(b"pass")),
            properties: ConnectProperties::default(),
        };
        assert_vector(&wire, ProtocolVersion::V3_1_1, expected);
    }

    #[test]
    fn v3_1_1_minimal() {
        #[rustfmt::skip]
        let wire = [
            0x10, 0x0D,                         // CONNECT, remaining length 13
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x04,                               // protocol level 4
            0x02,                               // clean session only
            0x00, 0x3C,                         // keep alive 60
            0x00, 0x01, b'x',                   // client id "x"
        ];
        let expected = Connect {
            version: ProtocolVersion::V3_1_1,
            clean_start: true,
            keep_alive: 60,
            client_id: s("x"),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        };
        assert_vector(&wire, ProtocolVersion::V3_1_1, expected);
    }

    #[test]
    fn v3_1_mqisdp_with_retained_qos2_will() {
        #[rustfmt::skip]
        let wire = [
            0x10, 0x1C,                               // CONNECT, remaining length 28
            0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', // protocol name "MQIsdp"
            0x03,                                     // protocol level 3
            0xF6,                                     // user name 1, password 1, will retain 1,
                                                      // will QoS 10, will 1, clean 1, reserved 0
            0x00, 0x1E,                               // keep alive 30
            0x00, 0x03, b'c', b'i', b'd',             // client id "cid"
            0x00, 0x01, b't',                         // will topic "t"
            0x00, 0x00,                               // will message, empty
            0x00, 0x01, b'u',                         // user name "u"
            0x00, 0x01, b'p',                         // password "p"
        ];
        let expected = Connect {
            version: ProtocolVersion::V3_1,
            clean_start: true,
            keep_alive: 30,
            client_id: s("cid"),
            will: Some(Will {
                topic: s("t"),
                payload: Bytes::new(),
                qos: QoS::ExactlyOnce,
                retain: true,
                properties: WillProperties::default(),
            }),
            username: Some(s("u")),
            password: Some(bytes(b"p")),
            properties: ConnectProperties::default(),
        };
        // CONNECT carries its own version; the connection's is not consulted.
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn v5_spec_example_with_will_user_name_and_password() {
        // 5.0 section 3.1.2.12, figure 3-6, completed with the payload its flags call for.
        #[rustfmt::skip]
        let wire = [
            0x10, 0x2A,                         // CONNECT, remaining length 42
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x05,                               // protocol version 5
            0xCE,                               // user name 1, password 1, will retain 0,
                                                // will QoS 01, will 1, clean start 1, reserved 0
            0x00, 0x0A,                         // keep alive 10
            0x05,                               // property length 5
            0x11, 0x00, 0x00, 0x00, 0x0A,       // session expiry interval 10
            0x00, 0x02, b'i', b'd',             // client id "id"
            0x00,                               // will property length 0
            0x00, 0x03, b'a', b'/', b'b',       // will topic "a/b"
            0x00, 0x02, b'h', b'i',             // will payload "hi"
            0x00, 0x04, b'u', b's', b'e', b'r', // user name "user"
            0x00, 0x04, b'p', b'a', b's', b's', // password "pass"
        ];
        let expected = Connect {
            version: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 10,
            client_id: s("id"),
            will: Some(Will {
                topic: s("a/b"),
                payload: bytes(b"hi"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: WillProperties::default(),
            }),
            username: Some(s("user")),
            password: Some(bytes(b"pass")),
            properties: ConnectProperties {
                session_expiry_interval: Some(10),
                ..ConnectProperties::default()
            },
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn v5_with_connect_and_will_properties() {
        // Properties are written in the order our encoder emits them; the
        // specification leaves the order free (see `v5_property_order_is_free`).
        #[rustfmt::skip]
        let wire = [
            0x10, 0x73,                                     // CONNECT, remaining length 115
            0x00, 0x04, b'M', b'Q', b'T', b'T',             // protocol name "MQTT"
            0x05,                                           // protocol version 5
            0xAC,                                           // user name 1, password 0,
                                                            // will retain 1, will QoS 01,
                                                            // will 1, clean start 0, reserved 0
            0x00, 0x3C,                                     // keep alive 60
            0x2F,                                           // property length 47
            0x11, 0x00, 0x00, 0x0E, 0x10,                   // session expiry interval 3600
            0x21, 0x00, 0x14,                               // receive maximum 20
            0x27, 0x00, 0x00, 0x40, 0x00,                   // maximum packet size 16384
            0x22, 0x00, 0x0A,                               // topic alias maximum 10
            0x19, 0x01,                                     // request response information 1
            0x17, 0x00,                                     // request problem information 0
            0x15, 0x00, 0x05, b'S', b'C', b'R', b'A', b'M', // authentication method "SCRAM"
            0x16, 0x00, 0x02, 0x01, 0x02,                   // authentication data 01 02
            0x26, 0x00, 0x01, b'a', 0x00, 0x01, b'b',       // user property a=b
            0x26, 0x00, 0x01, b'a', 0x00, 0x01, b'c',       // user property a=c (same name)
            0x00, 0x03, b'd', b'e', b'v',                   // client id "dev"
            0x25,                                           // will property length 37
            0x18, 0x00, 0x00, 0x00, 0x05,                   // will delay interval 5
            0x01, 0x01,                                     // payload format indicator 1
            0x02, 0x00, 0x00, 0x00, 0x78,                   // message expiry interval 120
            0x03, 0x00, 0x04, b't', b'e', b'x', b't',       // content type "text"
            0x08, 0x00, 0x03, b'r', b'/', b'1',             // response topic "r/1"
            0x09, 0x00, 0x02, 0xAB, 0xCD,                   // correlation data AB CD
            0x26, 0x00, 0x01, b'w', 0x00, 0x01, b'x',       // user property w=x
            0x00, 0x03, b'b', b'y', b'e',                   // will topic "bye"
            0x00, 0x03, b'o', b'f', b'f',                   // will payload "off"
            0x00, 0x02, b'm', b'e',                         // user name "me"
        ];
        let expected = Connect {
            version: ProtocolVersion::V5,
            clean_start: false,
            keep_alive: 60,
            client_id: s("dev"),
            will: Some(Will {
                topic: s("bye"),
                payload: bytes(b"off"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: WillProperties {
                    will_delay_interval: Some(5),
                    payload_format_indicator: Some(true),
                    message_expiry_interval: Some(120),
                    content_type: Some(s("text")),
                    response_topic: Some(s("r/1")),
                    correlation_data: Some(bytes(&[0xAB, 0xCD])),
                    user_properties: vec![(s("w"), s("x"))],
                },
            }),
            username: Some(s("me")),
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: Some(3600),
                receive_maximum: Some(20),
                maximum_packet_size: Some(16_384),
                topic_alias_maximum: Some(10),
                request_response_information: Some(true),
                request_problem_information: Some(false),
                authentication_method: Some(s("SCRAM")),
                authentication_data: Some(bytes(&[0x01, 0x02])),
                user_properties: vec![(s("a"), s("b")), (s("a"), s("c"))],
            },
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn v5_password_without_user_name_is_allowed() {
        // 5.0 section 3.1.2.9 dropped 3.1.1's [MQTT-3.1.2-22].
        #[rustfmt::skip]
        let wire = [
            0x10, 0x12,                         // CONNECT, remaining length 18
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x05,                               // protocol version 5
            0x42,                               // password 1, clean start 1
            0x00, 0x00,                         // keep alive 0
            0x00,                               // property length 0
            0x00, 0x00,                         // client id "" (the server assigns one)
            0x00, 0x03, b'p', b'w', b'd',       // password "pwd"
        ];
        let expected = Connect {
            version: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 0,
            client_id: Str::new(),
            will: None,
            username: None,
            password: Some(bytes(b"pwd")),
            properties: ConnectProperties::default(),
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }

    #[test]
    fn v5_property_order_is_free() {
        #[rustfmt::skip]
        let reordered = [
            0x10, 0x16,                         // CONNECT, remaining length 22
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x05,                               // protocol version 5
            0x02,                               // clean start 1
            0x00, 0x00,                         // keep alive 0
            0x08,                               // property length 8
            0x21, 0x00, 0x05,                   // receive maximum 5
            0x11, 0x00, 0x00, 0x00, 0x3C,       // session expiry interval 60
            0x00, 0x01, b'z',                   // client id "z"
        ];
        #[rustfmt::skip]
        let canonical = [
            0x10, 0x16, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x00,
            0x08,
            0x11, 0x00, 0x00, 0x00, 0x3C,       // session expiry interval first
            0x21, 0x00, 0x05,                   // then receive maximum
            0x00, 0x01, b'z',
        ];
        let expected = Connect {
            version: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 0,
            client_id: s("z"),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: Some(60),
                receive_maximum: Some(5),
                ..ConnectProperties::default()
            },
        };
        assert_eq!(
            decode(&reordered, ProtocolVersion::V5),
            expected.clone().into()
        );
        assert_vector(&canonical, ProtocolVersion::V5, expected);
    }
}
