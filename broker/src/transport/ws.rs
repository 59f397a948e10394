//! WebSocket (RFC 6455), server side, sans-IO: the HTTP upgrade and the frame
//! codec that turns a stream of client frames into MQTT bytes and MQTT bytes
//! into server frames.
//!
//! MQTT over WebSocket (MQTT 5.0 section 6, 3.1.1 section 6) carries MQTT bytes
//! in binary frames with no alignment between frames and packets, so the codec
//! is a byte transform: [`WsDecoder::decode`] unmasks payload bytes in place and
//! drops frame headers, never buffering a whole frame (a frame of any length
//! costs at most 14 bytes of header state), and the MQTT codec frames packets
//! as it does on TCP. The state is a few dozen bytes and `Send`, so it moves
//! with a connection handed off to its owner shard.
//!
//! Not here: text frames (refused, MQTT requires binary), extensions
//! (permessage-deflate is never negotiated), HTTP/2 WebSockets.

use std::fmt;

use base64::Engine as _;

/// The GUID of RFC 6455 section 1.3, appended to the client's key.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest HTTP upgrade request accepted, bytes: browsers send well under 2 KiB.
pub const HANDSHAKE_BYTES_MAX: usize = 8192;

/// Most header lines in an upgrade request.
const HEADERS_COUNT_MAX: usize = 48;

/// Subprotocols served, in order of preference: `mqtt` (MQTT 3.1.1 and 5.0)
/// and `mqttv3.1` (what MQTT 3.1 clients ask for).
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Largest control frame payload (RFC 6455 section 5.5).
const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;

/// What an upgrade request turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// More bytes are needed.
    Incomplete,
    /// A valid upgrade: send `response`; the request was the first `consumed`
    /// bytes, the rest are already WebSocket frames.
    Accept {
        /// The `101 Switching Protocols` response.
        response: Vec<u8>,
        /// Length of the request.
        consumed: usize,
        /// The subprotocol chosen, if the client offered any.
        protocol: Option<&'static str>,
    },
    /// Refused: send `response`, then close. `reason` is for the log.
    Reject {
        /// An HTTP error response.
        response: Vec<u8>,
        /// Why, in words.
        reason: String,
    },
}

/// Parses the client's HTTP upgrade request in `buf` for a listener serving
/// `path` (the query string is ignored).
pub fn parse_upgrade(buf: &[u8], path: &str) -> Upgrade {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_COUNT_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < HANDSHAKE_BYTES_MAX => {
            return Upgrade::Incomplete;
        }
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return reject(
                431,
                "Request Header Fields Too Large",
                "",
                "request too large",
            );
        }
        Err(e) => return reject(400, "Bad Request", "", &format!("bad HTTP request: {e}")),
    };
    if req.method != Some("GET") {
        return reject(405, "Method Not Allowed", "", "method is not GET");
    }
    let req_path = req.path.unwrap_or("");
    let req_path = req_path.split_once('?').map_or(req_path, |(p, _)| p);
    if req_path != path {
        return reject(
            404,
            "Not Found",
            "",
            &format!("path {req_path:?} is not the MQTT path {path:?}"),
        );
    }
    let headers: &[httparse::Header<'_>] = req.headers;
    let header = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &'static str, token: &str| {
        header(name).any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return reject(
            426,
            "Upgrade Required",
            "Upgrade: websocket\r\n",
            "not a WebSocket upgrade request",
        );
    }
    if !header("sec-websocket-version").any(|v| v.trim() == "13") {
        return reject(
            426,
            "Upgrade Required",
            "Sec-WebSocket-Version: 13\r\n",
            "WebSocket version is not 13",
        );
    }
    let Some(key) = header("sec-websocket-key").next().map(str::trim) else {
        return reject(400, "Bad Request", "", "no Sec-WebSocket-Key");
    };
    let key_ok = base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16);
    if !key_ok {
        return reject(
            400,
            "Bad Request",
            "",
            "Sec-WebSocket-Key is not 16 bytes of base64",
        );
    }
    // The client's offers in its order; the first one served wins. A client
    // that offers none is served (some embedded clients send no header); one
    // that offers only others is refused, since it would close the connection
    // on a response without its protocol anyway.
    let offers: Vec<&str> = header("sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let protocol = offers
        .iter()
        .find_map(|o| SUBPROTOCOLS.iter().copied().find(|p| p == o));
    if !offers.is_empty() && protocol.is_none() {
        return reject(
            400,
            "Bad Request",
            "",
            &format!("no supported subprotocol in {offers:?}; the broker speaks mqtt, mqttv3.1"),
        );
    }
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = protocol {
        response.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    response.push_str("\r\n");
    Upgrade::Accept {
        response: response.into_bytes(),
        consumed,
        protocol,
    }
}

/// `Sec-WebSocket-Accept` for a client key (RFC 6455 section 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

fn reject(code: u16, text: &str, extra_headers: &str, reason: &str) -> Upgrade {
    let body = format!("{reason}\n");
    let response = format!(
        "HTTP/1.1 {code} {text}\r\nConnection: close\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    Upgrade::Reject {
        response: response.into_bytes(),
        reason: reason.to_owned(),
    }
}

/// Why a client's frames were refused. The connection is closed with the
/// close code [`WsError::close_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsError {
    /// An unmasked client frame (RFC 6455 section 5.1).
    Unmasked,
    /// Reserved bits set, with no extension negotiated.
    ReservedBits,
    /// An opcode that is not defined.
    BadOpcode(u8),
    /// A text frame: MQTT travels in binary frames only.
    Text,
    /// A continuation frame outside a fragmented message, or a new message
    /// inside one.
    BadFragment,
    /// A control frame longer than 125 bytes or fragmented.
    BadControl,
    /// A 64-bit length with the most significant bit set.
    BadLength,
}

impl WsError {
    /// The close code sent with the refusal.
    pub fn close_code(self) -> u16 {
        match self {
            WsError::Text => 1003,
            _ => 1002,
        }
    }
}

impl fmt::Display for WsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WsError::Unmasked => f.write_str("unmasked client frame"),
            WsError::ReservedBits => f.write_str("reserved bits set"),
            WsError::BadOpcode(op) => write!(f, "undefined opcode {op:#x}"),
            WsError::Text => f.write_str("text frame (MQTT needs binary frames)"),
            WsError::BadFragment => f.write_str("bad fragmentation"),
            WsError::BadControl => f.write_str("control frame too long or fragmented"),
            WsError::BadLength => f.write_str("frame length out of range"),
        }
    }
}

impl std::error::Error for WsError {}

/// Where the decoder is within the client's frame stream.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Collecting a header (2 to 14 bytes) in `header[..len]`.
    Header { len: u8 },
    /// In a frame's payload.
    Payload {
        remaining: u64,
        mask: [u8; 4],
        /// Position in the mask of the next byte.
        phase: u8,
        /// The control opcode, for control frames (their payload is kept).
        control: Option<u8>,
    },
}

/// Decodes client frames into MQTT bytes and remembers the control frames
/// the connection must answer.
#[derive(Clone)]
pub struct WsDecoder {
    state: State,
    header: [u8; 14],
    /// Inside a fragmented binary message.
    in_message: bool,
    control: [u8; CONTROL_PAYLOAD_BYTES_MAX],
    control_len: u8,
    /// A PING payload waiting to be echoed in a PONG.
    pong: Option<([u8; CONTROL_PAYLOAD_BYTES_MAX], u8)>,
    /// The client sent CLOSE: nothing after it is read.
    closed: bool,
}

impl fmt::Debug for WsDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsDecoder")
            .field("state", &self.state)
            .field("in_message", &self.in_message)
            .field("pong_pending", &self.pong.is_some())
            .field("closed", &self.closed)
            .finish()
    }
}

impl Default for WsDecoder {
    fn default() -> Self {
        WsDecoder {
            state: State::Header { len: 0 },
            header: [0; 14],
            in_message: false,
            control: [0; CONTROL_PAYLOAD_BYTES_MAX],
            control_len: 0,
            pong: None,
            closed: false,
        }
    }
}

/// Bytes of a header whose first `len` bytes are in `h` (2 until the second
/// byte is known).
fn header_len(h: &[u8], len: usize) -> usize {
    if len < 2 {
        return 2;
    }
    let ext = match h[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + 4
}

impl WsDecoder {
    /// Decodes the raw bytes in `data` in place: on return, `data[..n]` holds
    /// the MQTT bytes the frames carried, `n` returned. Header and control bytes
    /// are consumed into the decoder's state. After a CLOSE frame the rest is
    /// ignored ([`WsDecoder::is_closed`]).
    pub fn decode(&mut self, data: &mut [u8]) -> Result<usize, WsError> {
        let mut r = 0;
        let mut w = 0;
        while r < data.len() && !self.closed {
            match self.state {
                State::Header { len } => {
                    let mut len = usize::from(len);
                    let mut need = header_len(&self.header, len);
                    while len < need && r < data.len() {
                        self.header[len] = data[r];
                        len += 1;
                        r += 1;
                        need = header_len(&self.header, len);
                    }
                    // Refuse an unmasked frame as soon as its second byte
                    // is known, not after waiting for a mask it lacks.
                    if len >= 2 && self.header[1] & 0x80 == 0 {
                        return Err(WsError::Unmasked);
                    }
                    if len < need {
                        self.state = State::Header { len: len as u8 };
                        break;
                    }
                    self.start_frame(need)?;
                }
                State::Payload {
                    remaining,
                    mask,
                    phase,
                    control,
                } => {
                    let take =
                        (data.len() - r).min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    match control {
                        None => {
                            for i in 0..take {
                                data[w + i] = data[r + i] ^ mask[(usize::from(phase) + i) & 3];
                            }
                            w += take;
                        }
                        Some(_) => {
                            let at = usize::from(self.control_len);
                            for i in 0..take {
                                self.control[at + i] =
                                    data[r + i] ^ mask[(usize::from(phase) + i) & 3];
                            }
                            self.control_len += take as u8;
                        }
                    }
                    r += take;
                    let remaining = remaining - take as u64;
                    let phase = ((usize::from(phase) + take) & 3) as u8;
                    self.state = State::Payload {
                        remaining,
                        mask,
                        phase,
                        control,
                    };
                    if remaining == 0 {
                        self.end_frame(control);
                    }
                }
            }
        }
        Ok(w)
    }

    /// Checks a complete header of `len` bytes and enters its payload.
    fn start_frame(&mut self, len: usize) -> Result<(), WsError> {
        let h = self.header;
        let fin = h[0] & 0x80 != 0;
        if h[0] & 0x70 != 0 {
            return Err(WsError::ReservedBits);
        }
        if h[1] & 0x80 == 0 {
            return Err(WsError::Unmasked);
        }
        let opcode = h[0] & 0x0f;
        let length = match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => {
                let l = u64::from_be_bytes(h[2..10].try_into().expect("8 bytes"));
                if l >> 63 != 0 {
                    return Err(WsError::BadLength);
                }
                l
            }
            l => u64::from(l),
        };
        let mask: [u8; 4] = h[len - 4..len].try_into().expect("4 bytes");
        let control = match opcode {
            0x0 => {
                if !self.in_message {
                    return Err(WsError::BadFragment);
                }
                self.in_message = !fin;
                None
            }
            0x1 => return Err(WsError::Text),
            0x2 => {
                if self.in_message {
                    return Err(WsError::BadFragment);
                }
                self.in_message = !fin;
                None
            }
            0x8..=0xa => {
                if !fin || length > CONTROL_PAYLOAD_BYTES_MAX as u64 {
                    return Err(WsError::BadControl);
                }
                self.control_len = 0;
                Some(opcode)
            }
            op => return Err(WsError::BadOpcode(op)),
        };
        self.state = State::Payload {
            remaining: length,
            mask,
            phase: 0,
            control,
        };
        if length == 0 {
            self.end_frame(control);
        }
        Ok(())
    }

    fn end_frame(&mut self, control: Option<u8>) {
        self.state = State::Header { len: 0 };
        match control {
            Some(0x8) => self.closed = true,
            Some(0x9) => self.pong = Some((self.control, self.control_len)),
            _ => {}
        }
    }

    /// Whether the client sent CLOSE.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether a PONG waits to be sent.
    pub fn has_pong(&self) -> bool {
        self.pong.is_some()
    }

    /// Appends the PONG answering the last PING, if any, to `out`.
    pub fn take_pong(&mut self, out: &mut Vec<u8>) {
        if let Some((payload, len)) = self.pong.take() {
            let len = usize::from(len);
            out.extend_from_slice(&[0x8a, len as u8]);
            out.extend_from_slice(&payload[..len]);
        }
    }
}

/// Writes the header of a final binary server frame of `len` payload bytes
/// into `out`; returns the header length (2, 4 or 10 bytes).
pub fn binary_header(len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = 0x82;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if let Ok(l) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&l.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// A server CLOSE frame with `code` (RFC 6455 section 5.5.1).
pub fn close_frame(code: u16) -> [u8; 4] {
    let c = code.to_be_bytes();
    [0x88, 0x02, c[0], c[1]]
}

#[cfg(test)]
mod tests {
    //! Goal: the upgrade and the frame codec follow RFC 6455 for every case a
    //! client can produce. Method: hand-built requests and frames, exact outputs.

    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(path: &str, extra: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, \
             Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn status(u: &Upgrade) -> String {
        let bytes = match u {
            Upgrade::Accept { response, .. } | Upgrade::Reject { response, .. } => response,
            Upgrade::Incomplete => return "incomplete".into(),
        };
        String::from_utf8_lossy(bytes)
            .lines()
            .next()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn upgrade_negotiates_mqtt_and_keeps_following_bytes() {
        let mut req = request("/mqtt?x=1", "Sec-WebSocket-Protocol: foo, mqtt\r\n").into_bytes();
        let len = req.len();
        req.extend_from_slice(&[0x82, 0x80]);
        let up = parse_upgrade(&req, "/mqtt");
        let Upgrade::Accept {
            response,
            consumed,
            protocol,
        } = &up
        else {
            panic!("{up:?}");
        };
        assert_eq!(*consumed, len);
        assert_eq!(*protocol, Some("mqtt"));
        let text = String::from_utf8(response.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 "), "{text}");
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: mqtt\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn upgrade_refusals_name_the_problem() {
        assert_eq!(
            status(&parse_upgrade(
                request("/mqtt", "").as_bytes()[..20].as_ref(),
                "/mqtt"
            )),
            "incomplete"
        );
        assert_eq!(
            status(&parse_upgrade(request("/other", "").as_bytes(), "/mqtt")),
            "HTTP/1.1 404 Not Found"
        );
        let bad_proto = request("/mqtt", "Sec-WebSocket-Protocol: chat\r\n");
        let up = parse_upgrade(bad_proto.as_bytes(), "/mqtt");
        assert_eq!(status(&up), "HTTP/1.1 400 Bad Request");
        assert!(matches!(&up, Upgrade::Reject { reason, .. } if reason.contains("chat")));
        let v8 = request("/mqtt", "").replace("Version: 13", "Version: 8");
        assert_eq!(
            status(&parse_upgrade(v8.as_bytes(), "/mqtt")),
            "HTTP/1.1 426 Upgrade Required"
        );
        let plain = "GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            status(&parse_upgrade(plain.as_bytes(), "/mqtt")),
            "HTTP/1.1 426 Upgrade Required"
        );
        let post = request("/mqtt", "").replacen("GET", "POST", 1);
        assert_eq!(
            status(&parse_upgrade(post.as_bytes(), "/mqtt")),
            "HTTP/1.1 405 Method Not Allowed"
        );
        let huge = vec![b'G'; HANDSHAKE_BYTES_MAX + 1];
        assert_eq!(
            status(&parse_upgrade(&huge, "/mqtt")),
            "HTTP/1.1 431 Request Header Fields Too Large"
        );
        // An MQTT client that connected to the WebSocket port by mistake.
        let mqtt = b"\x10\x12\x00\x04MQTT\x04\x02\x00\x1e";
        assert_eq!(
            status(&parse_upgrade(mqtt, "/mqtt")),
            "HTTP/1.1 400 Bad Request"
        );
        let no_proto = parse_upgrade(request("/mqtt", "").as_bytes(), "/mqtt");
        assert!(matches!(no_proto, Upgrade::Accept { protocol: None, .. }));
    }

    /// A masked client frame with `opcode`, `fin` and `payload`.
    fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        f
    }

    #[test]
    fn decodes_frames_split_at_every_byte_boundary() {
        let big: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let mut stream = frame(0x2, false, b"hello ");
        stream.extend(frame(0x9, true, b"ping!"));
        stream.extend(frame(0x0, true, b"world"));
        stream.extend(frame(0x2, true, &big[..300]));
        stream.extend(frame(0x2, true, &big));
        stream.extend(frame(0x2, true, b""));
        let mut expected = b"hello world".to_vec();
        expected.extend_from_slice(&big[..300]);
        expected.extend_from_slice(&big);
        for chunk in [1, 2, 3, 7, 13, 4096, stream.len()] {
            let mut dec = WsDecoder::default();
            let mut out = Vec::new();
            for piece in stream.chunks(chunk) {
                let mut piece = piece.to_vec();
                let n = dec.decode(&mut piece).unwrap();
                out.extend_from_slice(&piece[..n]);
            }
            assert_eq!(out, expected, "chunk {chunk}");
            let mut pong = Vec::new();
            dec.take_pong(&mut pong);
            assert_eq!(pong, b"\x8a\x05ping!");
            assert!(!dec.has_pong() && !dec.is_closed());
        }
    }

    #[test]
    fn close_stops_decoding() {
        let mut stream = frame(0x2, true, b"ab");
        stream.extend(frame(0x8, true, &1000u16.to_be_bytes()));
        stream.extend(frame(0x2, true, b"ignored"));
        let mut dec = WsDecoder::default();
        let n = dec.decode(&mut stream).unwrap();
        assert_eq!(&stream[..n], b"ab");
        assert!(dec.is_closed());
    }

    #[test]
    fn refuses_what_rfc_6455_forbids() {
        let cases: [(Vec<u8>, WsError); 7] = [
            (vec![0x82, 0x01, b'x'], WsError::Unmasked),
            (frame(0x1, true, b"text"), WsError::Text),
            (frame(0x0, true, b"cont"), WsError::BadFragment),
            (
                [frame(0x2, false, b"a"), frame(0x2, true, b"b")].concat(),
                WsError::BadFragment,
            ),
            (frame(0x9, true, &[0; 126]), WsError::BadControl),
            (frame(0x3, true, b""), WsError::BadOpcode(3)),
            (frame(0xc2, true, b""), WsError::ReservedBits),
        ];
        for (mut bytes, err) in cases {
            assert_eq!(WsDecoder::default().decode(&mut bytes), Err(err));
        }
        let mut huge = vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(
            WsDecoder::default().decode(&mut huge),
            Err(WsError::BadLength)
        );
    }

    #[test]
    fn binary_headers_use_the_shortest_length() {
        let header = |len| {
            let mut h = [0; 10];
            let n = binary_header(len, &mut h);
            h[..n].to_vec()
        };
        assert_eq!(header(125), [0x82, 125]);
        assert_eq!(header(126), [0x82, 126, 0, 126]);
        assert_eq!(header(65_536), [0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(close_frame(1000), [0x88, 2, 0x03, 0xe8]);
    }
}
