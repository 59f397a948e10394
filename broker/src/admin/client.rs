//! The admin API client `brokerctl` uses: URL and token handling, one
//! request per call, and the classification of failures into the exit codes
//! scripts rely on.

use std::time::Duration;

use serde_json::Value;

use super::http::{ClientResponse, client_request, percent_encode};

/// The default admin URL (the broker's default `server.admin_listen`).
pub const URL_DEFAULT: &str = "http://127.0.0.1:18083";

/// Why a call failed; each maps to one exit code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad URL or parameters: nothing was sent.
    #[error("{0}")]
    Usage(String),
    /// The broker cannot be reached, or refused the token.
    #[error("{0}")]
    Connection(String),
    /// The thing asked for does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The broker answered with an error (4xx other than 401/404, or 5xx).
    #[error("{0}")]
    Server(String),
}

/// A configured client.
#[derive(Debug, Clone)]
pub struct AdminClient {
    authority: String,
    token: Option<String>,
    timeout: Duration,
}

impl AdminClient {
    /// A client for `url` (`http://HOST:PORT`, optional trailing slash).
    pub fn new(url: &str, token: Option<String>, timeout: Duration) -> Result<Self, ClientError> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            ClientError::Usage(format!(
                "--url {url:?}: expected http://HOST:PORT (the admin API serves plain HTTP; \
                 put TLS in front with a proxy if needed)"
            ))
        })?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(ClientError::Usage(format!(
                "--url {url:?}: expected http://HOST:PORT with no path"
            )));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(AdminClient {
            authority,
            token: token.filter(|t| !t.is_empty()),
            timeout,
        })
    }

    /// Sends `method path?query` and returns the raw response, with HTTP
    /// errors classified.
    pub fn raw(
        &self,
        method: &str,
        path: &[&str],
        query: &[(&str, String)],
    ) -> Result<ClientResponse, ClientError> {
        let mut target = String::new();
        for seg in path {
            target.push('/');
            target.push_str(&percent_encode(seg));
        }
        for (i, (k, v)) in query.iter().enumerate() {
            target.push(if i == 0 { '?' } else { '&' });
            target.push_str(k);
            target.push('=');
            target.push_str(&percent_encode(v));
        }
        let resp = client_request(
            &self.authority,
            method,
            &target,
            self.token.as_deref(),
            self.timeout,
        )
        .map_err(|e| {
            ClientError::Connection(format!(
                "cannot reach the admin API at http://{}: {e}",
                self.authority
            ))
        })?;
        let message = || {
            serde_json::from_slice::<Value>(&resp.body)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&resp.body).trim().to_owned())
        };
        match resp.status {
            200..=299 => Ok(resp),
            401 => Err(ClientError::Connection(format!(
                "the admin API refused the token (HTTP 401): {}; pass --token or set \
                 TESSERA_TOKEN",
                message()
            ))),
            404 => Err(ClientError::NotFound(message())),
            s => Err(ClientError::Server(format!("HTTP {s}: {}", message()))),
        }
    }

    /// Like [`AdminClient::raw`], parsing the body as JSON.
    pub fn json(
        &self,
        method: &str,
        path: &[&str],
        query: &[(&str, String)],
    ) -> Result<Value, ClientError> {
        let resp = self.raw(method, path, query)?;
        serde_json::from_slice(&resp.body)
            .map_err(|e| ClientError::Server(format!("the admin API sent invalid JSON: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let t = Duration::from_secs(1);
        assert_eq!(
            AdminClient::new("http://127.0.0.1:18083/", None, t)
                .unwrap()
                .authority,
            "127.0.0.1:18083"
        );
        assert_eq!(
            AdminClient::new("http://broker", None, t)
                .unwrap()
                .authority,
            "broker:80"
        );
        assert!(matches!(
            AdminClient::new("https://x:1", None, t),
            Err(ClientError::Usage(_))
        ));
        assert!(matches!(
            AdminClient::new("http://x:1/api", None, t),
            Err(ClientError::Usage(_))
        ));
    }
}
