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
        let properties =
            if version.is_v5() { ConnectProperties::decode(r)? } else { Default::default() };
        let client_id = r.string()?;
        let will = if will_flag {
            let properties =
                if version.is_v5() { WillProperties::decode(r)? } else { Default::default() };
            let topic = r.string()?;
            let payload = r.binary()?;
            Some(Will { topic, payload, qos: will_qos, retain: will_retain, properties })
        } else {
            None
        };
        let username = if has_username { Some(r.string()?) } else { None };
        let password = if has_password { Some(r.binary()?) } else { None };
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
            return Err(EncodeError::Invalid("MQTT 3.1.1 password without user name"));
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
