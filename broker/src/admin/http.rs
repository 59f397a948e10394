//! A deliberately small HTTP/1.1 layer for the admin port, server and client
//! side: one request per connection (`Connection: close`), no request bodies,
//! bounded header size and read time. The admin API needs nothing more, and
//! this keeps tokio and hyper out of a glommio process.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Largest request head (request line and headers) accepted, bytes.
pub const REQUEST_HEAD_BYTES_MAX: usize = 16 * 1024;

/// Headers accepted per request.
pub const REQUEST_HEADERS_MAX: usize = 64;

/// Largest response body a client reads, bytes (a listing page of 1000 items
/// with payloads fits well under it).
pub const RESPONSE_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `DELETE`, ...
    pub method: String,
    /// The path, percent-decoded, split into segments (empty ones dropped).
    pub segments: Vec<String>,
    /// Query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

impl Request {
    /// The first value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The socket failed or timed out.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Not an HTTP/1.x request we accept.
    #[error("bad request: {0}")]
    Bad(&'static str),
    /// Head larger than [`REQUEST_HEAD_BYTES_MAX`].
    #[error("request head too large")]
    TooLarge,
}

/// Reads one request head from `stream`.
pub fn read_request(stream: &TcpStream) -> Result<Request, RequestError> {
    let mut reader = BufReader::new(stream.take(REQUEST_HEAD_BYTES_MAX as u64));
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(RequestError::Bad("empty request"));
    }
    if !line.ends_with('\n') {
        return Err(RequestError::TooLarge);
    }
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Bad("malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(RequestError::Bad("not HTTP/1.x"));
    }
    let mut authorization = None;
    for _ in 0..=REQUEST_HEADERS_MAX {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || !h.ends_with('\n') {
            return Err(RequestError::TooLarge);
        }
        let h = h.trim_end();
        if h.is_empty() {
            let (segments, query) = parse_target(target)?;
            return Ok(Request {
                method: method.to_owned(),
                segments,
                query,
                authorization,
            });
        }
        if let Some((name, value)) = h.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(value.trim().to_owned());
        }
    }
    Err(RequestError::Bad("too many headers"))
}

/// Path segments and query parameters of a request target.
type Target = (Vec<String>, Vec<(String, String)>);

fn parse_target(target: &str) -> Result<Target, RequestError> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !path.starts_with('/') {
        return Err(RequestError::Bad("target is not an absolute path"));
    }
    let bad = |_| RequestError::Bad("bad percent-encoding");
    let segments = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode(s, false).map_err(bad))
        .collect::<Result<_, _>>()?;
    let query = query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Ok::<_, RequestError>((
                percent_decode(k, true).map_err(bad)?,
                percent_decode(v, true).map_err(bad)?,
            ))
        })
        .collect::<Result<_, _>>()?;
    Ok((segments, query))
}

/// A `%` escape that is not two hex digits, or bytes that are not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad percent-encoding")]
pub struct BadEncoding;

/// Decodes `%XX` escapes (and `+` as a space in query strings).
pub fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, BadEncoding> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3).ok_or(BadEncoding)?;
                let hex = std::str::from_utf8(hex).map_err(|_| BadEncoding)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| BadEncoding)?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| BadEncoding)
}

/// Encodes everything but unreserved characters (RFC 3986), for one path
/// segment or query value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A response to write.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec_pretty(value).expect("JSON values serialize");
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    /// A JSON error: `{"error": code, "message": message}`.
    pub fn error(status: u16, code: &str, message: impl Into<String>) -> Response {
        Response::json(
            status,
            &serde_json::json!({ "error": code, "message": message.into() }),
        )
    }

    /// Writes the response and closes the write side.
    pub fn write_to(&self, mut stream: &TcpStream) -> io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len()
        );
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(&self.body)?;
        stream.flush()
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// A response a client received.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    /// Status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// Sends one request (no body) to `host:port` and reads the whole response.
/// `path_and_query` is already percent-encoded.
pub fn client_request(
    authority: &str,
    method: &str,
    path_and_query: &str,
    token: Option<&str>,
    timeout: Duration,
) -> io::Result<ClientResponse> {
    use std::net::ToSocketAddrs;
    let addr = authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "address resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut req = format!(
        "{method} {path_and_query} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\
         User-Agent: brokerctl/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream
        .take((RESPONSE_BODY_BYTES_MAX + REQUEST_HEAD_BYTES_MAX) as u64)
        .read_to_end(&mut raw)?;
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_owned());
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("response without a complete head"))?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| bad("response head not UTF-8"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("response without a status code"))?;
    Ok(ClientResponse {
        status,
        body: raw[head_end + 4..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_decode_into_segments_and_parameters() {
        let (seg, q) = parse_target("/api/v1/retained/a%2Fb%20c?filter=s%2F%23&limit=5&x").unwrap();
        assert_eq!(seg, ["api", "v1", "retained", "a/b c"]);
        assert_eq!(
            q,
            [
                ("filter".to_owned(), "s/#".to_owned()),
                ("limit".to_owned(), "5".to_owned()),
                ("x".to_owned(), String::new())
            ]
        );
        assert!(parse_target("/a%zz").is_err());
        assert!(parse_target("/a%f").is_err());
        assert!(parse_target("noslash").is_err());
    }

    #[test]
    fn percent_encoding_round_trips() {
        for s in ["a/b", "sensors/#", "é +%&=?", "\u{0}x"] {
            assert_eq!(percent_decode(&percent_encode(s), true).unwrap(), s);
        }
    }
}
