//! The client side of MQTT over WebSocket (RFC 6455) for bridges: the upgrade
//! request with the `mqtt` subprotocol, the response check, binary frames
//! masked as a client must, and the decoding of the server's unmasked frames
//! (PING answered, CLOSE ends the link, a masked or text frame is an error).

use crate::transport::ws::accept_key;

/// The upgrade request and its `Sec-WebSocket-Key`.
pub fn upgrade_request(host: &str, path: &str) -> (Vec<u8>, String) {
    let mut nonce = [0u8; 16];
    let seed = super::jitter_seed().to_le_bytes();
    nonce[..8].copy_from_slice(&seed);
    nonce[8..].copy_from_slice(&super::jitter_seed().to_le_bytes());
    let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, nonce);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
    (request.into_bytes(), key)
}

/// A WebSocket client after a successful upgrade.
#[derive(Debug)]
pub struct WsClient {
    input: Vec<u8>,
    pos: usize,
    /// Payload bytes of the current data frame still to hand out.
    payload_left: u64,
    /// A PONG to send.
    reply: Option<Vec<u8>>,
    closed: bool,
    mask_state: u64,
}

impl WsClient {
    /// Checks the server's response (status 101, the accept key).
    pub fn check_response(response: &[u8], key: &str) -> Result<WsClient, String> {
        let text = String::from_utf8_lossy(response);
        let mut lines = text.split("\r\n");
        let status = lines.next().unwrap_or_default();
        if !status.starts_with("HTTP/1.1 101") {
            return Err(format!("the remote answered {status:?}, not 101"));
        }
        let want = accept_key(key);
        let accepted = lines.any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == want
            })
        });
        if !accepted {
            return Err("wrong or missing Sec-WebSocket-Accept".into());
        }
        Ok(WsClient {
            input: Vec::new(),
            pos: 0,
            payload_left: 0,
            reply: None,
            closed: false,
            mask_state: super::jitter_seed() | 1,
        })
    }

    /// Bytes read from the socket.
    pub fn push_input(&mut self, data: &[u8]) {
        if self.pos == self.input.len() {
            self.input.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 {
            self.input.drain(..self.pos);
            self.pos = 0;
        }
        self.input.extend_from_slice(data);
    }

    /// Whether the server sent CLOSE.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// A control frame to send back (PONG), if any.
    pub fn take_control_reply(&mut self) -> Option<Vec<u8>> {
        self.reply.take()
    }

    /// Copies MQTT bytes of data frames into `buf`: `Ok(None)` when more input
    /// is needed.
    pub fn take_payload(&mut self, buf: &mut [u8]) -> Result<Option<usize>, String> {
        loop {
            let rest = &self.input[self.pos..];
            if self.payload_left > 0 {
                let n = (rest.len() as u64)
                    .min(self.payload_left)
                    .min(buf.len() as u64) as usize;
                if n == 0 {
                    return Ok(None);
                }
                buf[..n].copy_from_slice(&rest[..n]);
                self.pos += n;
                self.payload_left -= n as u64;
                return Ok(Some(n));
            }
            if rest.len() < 2 || self.closed {
                return Ok(None);
            }
            let opcode = rest[0] & 0x0F;
            if rest[1] & 0x80 != 0 {
                return Err("masked frame from the server".into());
            }
            let (len, header) = match rest[1] & 0x7F {
                126 if rest.len() >= 4 => (u64::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
                127 if rest.len() >= 10 => (
                    u64::from_be_bytes(rest[2..10].try_into().expect("8 bytes")),
                    10,
                ),
                126 | 127 => return Ok(None),
                n => (u64::from(n), 2),
            };
            match opcode {
                0 | 2 => {
                    self.pos += header;
                    self.payload_left = len;
                }
                8 => {
                    self.closed = true;
                    return Ok(None);
                }
                9 | 10 => {
                    if len > 125 {
                        return Err("control frame over 125 bytes".into());
                    }
                    let total = header + len as usize;
                    if rest.len() < total {
                        return Ok(None);
                    }
                    if opcode == 9 {
                        let payload = rest[header..total].to_vec();
                        let mut pong = Vec::new();
                        self.frame_op(0x8A, &payload, &mut pong);
                        self.reply = Some(pong);
                    }
                    self.pos += total;
                }
                other => return Err(format!("unexpected WebSocket opcode {other}")),
            }
        }
    }

    /// Appends `data` as one masked binary frame.
    pub fn frame(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.frame_op(0x82, data, out);
    }

    fn frame_op(&mut self, first: u8, data: &[u8], out: &mut Vec<u8>) {
        out.push(first);
        let len = data.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= usize::from(u16::MAX) {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        // xorshift: the mask only has to be unpredictable to web content in a
        // browser (RFC 6455 section 10.3), which a bridge has none of.
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.mask_state = x;
        let mask = (x as u32).to_be_bytes();
        out.extend_from_slice(&mask);
        out.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_across_reads_and_pings_are_answered() {
        let (_, key) = upgrade_request("h", "/mqtt");
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            accept_key(&key)
        );
        let mut ws = WsClient::check_response(resp.as_bytes(), &key).unwrap();
        assert!(WsClient::check_response(b"HTTP/1.1 200 OK\r\n\r\n", &key).is_err());
        // A ping, then a binary frame in two pieces.
        ws.push_input(&[0x89, 0x01, b'p', 0x82, 0x03, 1]);
        let mut buf = [0u8; 8];
        assert_eq!(ws.take_payload(&mut buf), Ok(Some(1)));
        assert_eq!(buf[0], 1);
        let pong = ws.take_control_reply().unwrap();
        assert_eq!(pong[0], 0x8A);
        assert_eq!(ws.take_payload(&mut buf), Ok(None));
        ws.push_input(&[2, 3]);
        assert_eq!(ws.take_payload(&mut buf), Ok(Some(2)));
        assert_eq!(&buf[..2], &[2, 3]);
        ws.push_input(&[0x82, 0x81, 0, 0, 0, 0, 0]);
        assert!(ws.take_payload(&mut buf).is_err());
    }

    #[test]
    fn frames_are_masked() {
        let (_, key) = upgrade_request("h", "/");
        let resp = format!(
            "HTTP/1.1 101 x\r\nsec-websocket-accept: {}\r\n\r\n",
            accept_key(&key)
        );
        let mut ws = WsClient::check_response(resp.as_bytes(), &key).unwrap();
        let mut out = Vec::new();
        ws.frame(&[9; 200], &mut out);
        assert_eq!(out[0], 0x82);
        assert_eq!(out[1], 0x80 | 126);
        assert_eq!(u16::from_be_bytes([out[2], out[3]]), 200);
        let mask = &out[4..8];
        let unmasked: Vec<u8> = out[8..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i & 3])
            .collect();
        assert_eq!(unmasked, vec![9; 200]);
    }
}
