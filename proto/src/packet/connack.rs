//! CONNACK (MQTT 5 section 3.2, 3.1.1 section 3.2).

use bytes::{BufMut, BytesMut};

use crate::codec::Reader;
use crate::error::{DecodeError, Malformed};
use crate::frame::Body;
use crate::properties::{ConnAckProperties, PropertySet};
use crate::reason::{ReasonCode, ReasonContext};
use crate::types::{PacketType, ProtocolVersion};

/// The server's answer to CONNECT.
///
/// In 3.1/3.1.1 the reason code travels as one of six return codes
/// (`ReasonCode::to_v3_connack`); properties exist only in v5.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Whether the server resumed a stored session.
    pub session_present: bool,
    /// Outcome of the connect.
    pub reason_code: ReasonCode,
    /// v5 properties.
    pub properties: ConnAckProperties,
}

impl ConnAck {
    pub(crate) fn decode(r: &mut Reader, version: ProtocolVersion) -> Result<ConnAck, DecodeError> {
        let ack_flags = r.u8()?;
        if ack_flags & 0xFE != 0 {
            return Err(DecodeError::Malformed(Malformed::ConnAckReservedFlags));
        }
        let code = r.u8()?;
        let (reason_code, properties) = if version.is_v5() {
            let rc = ReasonCode::from_u8(code)?;
            if !rc.is_valid_for(ReasonContext::ConnAck) {
                return Err(DecodeError::Malformed(Malformed::InvalidReasonCode));
            }
            (rc, ConnAckProperties::decode(r)?)
        } else {
            (
                ReasonCode::from_v3_connack(code)?,
                ConnAckProperties::default(),
            )
        };
        r.finish()?;
        Ok(ConnAck {
            session_present: ack_flags & 1 != 0,
            reason_code,
            properties,
        })
    }
}

impl Body for ConnAck {
    const TYPE: PacketType = PacketType::ConnAck;

    fn check(&self, _version: ProtocolVersion) -> Result<(), crate::EncodeError> {
        self.properties.check()
    }

    fn body_len(&self, version: ProtocolVersion) -> usize {
        2 + if version.is_v5() {
            self.properties.encoded_len()
        } else {
            0
        }
    }

    fn put_body(&self, version: ProtocolVersion, buf: &mut BytesMut) {
        buf.put_u8(self.session_present as u8);
        if version.is_v5() {
            buf.put_u8(self.reason_code.as_u8());
            self.properties.encode(buf);
        } else {
            buf.put_u8(self.reason_code.to_v3_connack());
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::packet::testing::{assert_vector, encode, hex, s};
    use crate::types::QoS;

    fn connack(session_present: bool, reason_code: ReasonCode) -> ConnAck {
        ConnAck {
            session_present,
            reason_code,
            properties: ConnAckProperties::default(),
        }
    }

    #[test]
    fn v3_1_1_accepted_with_and_without_session() {
        // 20 = CONNACK, 02 = remaining length, ack flags, return code 0 (accepted).
        assert_vector(
            &[0x20, 0x02, 0x00, 0x00],
            ProtocolVersion::V3_1_1,
            connack(false, ReasonCode::Success),
        );
        // Ack flags 0x01: session present.
        assert_vector(
            &[0x20, 0x02, 0x01, 0x00],
            ProtocolVersion::V3_1_1,
            connack(true, ReasonCode::Success),
        );
    }

    #[test]
    fn v3_1_1_return_codes() {
        // 3.1.1 table 3.1: the five refusals and the reason each maps to.
        let codes = [
            (0x01, ReasonCode::UnsupportedProtocolVersion),
            (0x02, ReasonCode::ClientIdentifierNotValid),
            (0x03, ReasonCode::ServerUnavailable),
            (0x04, ReasonCode::BadUserNameOrPassword),
            (0x05, ReasonCode::NotAuthorized),
        ];
        for (code, reason) in codes {
            assert_vector(
                &[0x20, 0x02, 0x00, code],
                ProtocolVersion::V3_1,
                connack(false, reason),
            );
        }
    }

    #[test]
    fn v3_1_1_carries_v5_only_reasons_as_the_nearest_return_code() {
        // Not canonical (0x03 decodes back as ServerUnavailable): encode only.
        let busy = connack(false, ReasonCode::ServerBusy);
        assert_eq!(hex(&encode(&busy, ProtocolVersion::V3_1_1)), "20 02 00 03");
        // A full quota (e.g. the broker's session limit) is the server being
        // unavailable to this client, not the client being unauthorized.
        let quota = connack(false, ReasonCode::QuotaExceeded);
        assert_eq!(hex(&encode(&quota, ProtocolVersion::V3_1_1)), "20 02 00 03");
        let banned = connack(false, ReasonCode::Banned);
        assert_eq!(
            hex(&encode(&banned, ProtocolVersion::V3_1_1)),
            "20 02 00 05"
        );
    }

    #[test]
    fn v5_success_session_present_and_failure() {
        // 20 03: CONNACK, remaining length 3; ack flags; reason code; property length 0.
        assert_vector(
            &[0x20, 0x03, 0x00, 0x00, 0x00],
            ProtocolVersion::V5,
            connack(false, ReasonCode::Success),
        );
        assert_vector(
            &[0x20, 0x03, 0x01, 0x00, 0x00],
            ProtocolVersion::V5,
            connack(true, ReasonCode::Success),
        );
        // 0x87 Not authorized; 0x84 Unsupported Protocol Version; 0x9C Use another server.
        assert_vector(
            &[0x20, 0x03, 0x00, 0x87, 0x00],
            ProtocolVersion::V5,
            connack(false, ReasonCode::NotAuthorized),
        );
        assert_vector(
            &[0x20, 0x03, 0x00, 0x84, 0x00],
            ProtocolVersion::V5,
            connack(false, ReasonCode::UnsupportedProtocolVersion),
        );
        assert_vector(
            &[0x20, 0x03, 0x00, 0x9C, 0x00],
            ProtocolVersion::V5,
            connack(false, ReasonCode::UseAnotherServer),
        );
    }

    #[test]
    fn v5_with_properties() {
        #[rustfmt::skip]
        let wire = [
            0x20, 0x48,                                     // CONNACK, remaining length 72
            0x01,                                           // session present
            0x00,                                           // reason code Success
            0x45,                                           // property length 69
            0x11, 0x00, 0x00, 0x00, 0x3C,                   // session expiry interval 60
            0x21, 0x00, 0x0A,                               // receive maximum 10
            0x24, 0x01,                                     // maximum QoS 1
            0x25, 0x00,                                     // retain available 0
            0x27, 0x00, 0x01, 0x00, 0x00,                   // maximum packet size 65536
            0x12, 0x00, 0x03, b'a', b'b', b'c',             // assigned client id "abc"
            0x22, 0x00, 0x05,                               // topic alias maximum 5
            0x1F, 0x00, 0x02, b'o', b'k',                   // reason string "ok"
            0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v',       // user property k=v
            0x28, 0x00,                                     // wildcard subscriptions 0
            0x29, 0x00,                                     // subscription identifiers 0
            0x2A, 0x01,                                     // shared subscriptions 1
            0x13, 0x00, 0x1E,                               // server keep alive 30
            0x1A, 0x00, 0x02, b'r', b'/',                   // response information "r/"
            0x1C, 0x00, 0x02, b's', b'2',                   // server reference "s2"
            0x15, 0x00, 0x05, b'S', b'C', b'R', b'A', b'M', // authentication method "SCRAM"
            0x16, 0x00, 0x01, 0xFF,                         // authentication data FF
        ];
        let expected = ConnAck {
            session_present: true,
            reason_code: ReasonCode::Success,
            properties: ConnAckProperties {
                session_expiry_interval: Some(60),
                receive_maximum: Some(10),
                maximum_qos: Some(QoS::AtLeastOnce),
                retain_available: Some(false),
                maximum_packet_size: Some(65_536),
                assigned_client_identifier: Some(s("abc")),
                topic_alias_maximum: Some(5),
                reason_string: Some(s("ok")),
                user_properties: vec![(s("k"), s("v"))],
                wildcard_subscription_available: Some(false),
                subscription_identifiers_available: Some(false),
                shared_subscription_available: Some(true),
                server_keep_alive: Some(30),
                response_information: Some(s("r/")),
                server_reference: Some(s("s2")),
                authentication_method: Some(s("SCRAM")),
                authentication_data: Some(Bytes::from_static(&[0xFF])),
            },
        };
        assert_vector(&wire, ProtocolVersion::V5, expected);
    }
}
