//! JWT passwords: a client sends a JSON Web Token as its MQTT password. The
//! token must be signed with the configured HS256 secret or RS256 public key
//! and carry `exp`; the user name is the configured claim (`sub` by default).
//! The connection is closed when the token expires (MQTT 5: DISCONNECT 0xA0
//! Maximum connect time). No clock leeway: an expired token is refused.
//!
//! ACL from the token: when the configured ACL claim (`acl` by default) is
//! present, it is an object `{"publish": [TOPIC...], "subscribe":
//! [TOPIC...]}` (patterns with `+` and `#`) and it alone decides for that
//! client: what it lists is allowed, anything else denied; the ACL file does
//! not apply. A claim of another shape refuses the token.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tessera_shard::authz::TokenAcl;

/// Most topic patterns one token's ACL claim may list.
pub const TOKEN_ACL_RULES_MAX: usize = 256;

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user name.
    pub username: String,
    /// `exp`, Unix seconds.
    pub expires_unix_s: u64,
    /// The ACL claim, if the token has one.
    pub acl: Option<TokenAcl>,
}

/// Verifies JWT passwords.
#[derive(Clone)]
pub struct JwtVerifier {
    keys: Vec<(Algorithm, DecodingKey)>,
    username_claim: String,
    acl_claim: String,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algs: Vec<_> = self.keys.iter().map(|(a, _)| a).collect();
        f.debug_struct("JwtVerifier")
            .field("algorithms", &algs)
            .field("username_claim", &self.username_claim)
            .finish()
    }
}

/// Why a token is refused (no part of the token in it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    /// Bad signature, algorithm, format or claims.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token's `exp` is past.
    #[error("token expired")]
    Expired,
    /// The user name claim is missing or not a non-empty string.
    #[error("token has no string claim {0:?}")]
    NoUsername(String),
}

impl JwtVerifier {
    /// A verifier from an HS256 secret and/or an RS256 public key (PEM).
    pub fn new(
        hs256_secret: Option<&[u8]>,
        rs256_pem: Option<&[u8]>,
        username_claim: &str,
        acl_claim: &str,
    ) -> Result<JwtVerifier, String> {
        let mut keys = Vec::new();
        if let Some(secret) = hs256_secret {
            if secret.len() < 32 {
                return Err("the HS256 secret must be at least 32 bytes".into());
            }
            keys.push((Algorithm::HS256, DecodingKey::from_secret(secret)));
        }
        if let Some(pem) = rs256_pem {
            let key = DecodingKey::from_rsa_pem(pem)
                .map_err(|e| format!("not an RSA public key in PEM: {e}"))?;
            keys.push((Algorithm::RS256, key));
        }
        Ok(JwtVerifier {
            keys,
            username_claim: username_claim.to_owned(),
            acl_claim: acl_claim.to_owned(),
        })
    }

    /// Whether `password` looks like a JWT (three base64url parts, a JSON
    /// header): only those are checked as tokens.
    pub fn looks_like_token(password: &[u8]) -> bool {
        password.starts_with(b"eyJ")
            && password.iter().filter(|b| **b == b'.').count() == 2
            && password
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    }

    /// The claims of a valid token.
    pub fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| JwtError::Invalid(e.to_string()))?;
        let Some((alg, key)) = self.keys.iter().find(|(a, _)| *a == header.alg) else {
            return Err(JwtError::Invalid(format!(
                "algorithm {:?} is not configured",
                header.alg
            )));
        };
        let mut v = Validation::new(*alg);
        v.leeway = 0;
        v.validate_exp = true;
        v.set_required_spec_claims(&["exp"]);
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, key, &v).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => JwtError::Expired,
                    _ => JwtError::Invalid(e.to_string()),
                }
            })?;
        let exp = data
            .claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| JwtError::Invalid("exp is not a number".into()))?;
        let user = data
            .claims
            .get(&self.username_claim)
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| JwtError::NoUsername(self.username_claim.clone()))?;
        let acl = match data.claims.get(&self.acl_claim) {
            None => None,
            Some(v) => Some(
                token_acl(v)
                    .map_err(|e| JwtError::Invalid(format!("claim {:?}: {e}", self.acl_claim)))?,
            ),
        };
        Ok(Claims {
            username: user.to_owned(),
            expires_unix_s: exp,
            acl,
        })
    }
}

fn token_acl(v: &Value) -> Result<TokenAcl, String> {
    let obj = v
        .as_object()
        .ok_or("expected {\"publish\": [...], \"subscribe\": [...]}")?;
    let list = |key: &str| -> Result<Vec<String>, String> {
        let Some(items) = obj.get(key) else {
            return Ok(Vec::new());
        };
        let items = items.as_array().ok_or(format!("{key} is not a list"))?;
        if items.len() > TOKEN_ACL_RULES_MAX {
            return Err(format!(
                "{key} lists more than {TOKEN_ACL_RULES_MAX} topics"
            ));
        }
        items
            .iter()
            .map(|t| {
                let t = t.as_str().ok_or(format!("{key} holds a non-string"))?;
                tessera_proto::topic::validate_topic_filter(t, usize::MAX)
                    .map_err(|e| format!("{key} topic {t:?}: {e}"))?;
                Ok(t.to_owned())
            })
            .collect()
    };
    if let Some(k) = obj.keys().find(|k| *k != "publish" && *k != "subscribe") {
        return Err(format!("unknown key {k:?} (use publish and subscribe)"));
    }
    Ok(TokenAcl {
        publish: list("publish")?,
        subscribe: list("subscribe")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn token(claims: Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// A key pair made for this test only (`openssl genrsa 2048`).
    const RS_PRIVATE: &[u8] = include_bytes!("testdata/jwt-rs256-test.key");
    const RS_PUBLIC: &[u8] = include_bytes!("testdata/jwt-rs256-test.pub");

    #[test]
    fn rs256_tokens_verify_with_the_public_key_only() {
        let v = JwtVerifier::new(None, Some(RS_PUBLIC), "sub", "acl").unwrap();
        let claims = serde_json::json!({"sub": "rsa-user", "exp": now() + 60});
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(RS_PRIVATE).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&t).unwrap().username, "rsa-user");
        // An HS256 token is refused when only RS256 is configured, even one
        // "signed" with the public key as an HMAC secret (algorithm confusion).
        let confused = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(RS_PUBLIC),
        )
        .unwrap();
        assert!(matches!(v.verify(&confused), Err(JwtError::Invalid(_))));
        assert!(JwtVerifier::new(None, Some(b"not a key"), "sub", "acl").is_err());
    }

    #[test]
    fn valid_expired_and_forged_tokens() {
        let v = JwtVerifier::new(Some(SECRET), None, "sub", "acl").unwrap();
        let good = token(serde_json::json!({"sub": "alice", "exp": now() + 60}));
        assert!(JwtVerifier::looks_like_token(good.as_bytes()));
        assert_eq!(v.verify(&good).unwrap().username, "alice");
        assert_eq!(v.verify(&good).unwrap().acl, None);
        let with_acl = token(serde_json::json!({"sub": "a", "exp": now() + 60,
            "acl": {"publish": ["up/#"], "subscribe": ["down/+"]}}));
        let acl = v.verify(&with_acl).unwrap().acl.unwrap();
        assert_eq!(
            (acl.publish, acl.subscribe),
            (vec!["up/#".into()], vec!["down/+".into()])
        );
        for bad in [
            serde_json::json!(["x"]),
            serde_json::json!({"pub": ["x"]}),
            serde_json::json!({"publish": "x"}),
            serde_json::json!({"publish": ["a/#/b"]}),
        ] {
            let t = token(serde_json::json!({"sub": "a", "exp": now() + 60, "acl": bad}));
            assert!(matches!(v.verify(&t), Err(JwtError::Invalid(_))), "{bad}");
        }
        let old = token(serde_json::json!({"sub": "alice", "exp": now() - 1}));
        assert_eq!(v.verify(&old), Err(JwtError::Expired));
        let no_exp = token(serde_json::json!({"sub": "alice"}));
        assert!(matches!(v.verify(&no_exp), Err(JwtError::Invalid(_))));
        let no_sub = token(serde_json::json!({"exp": now() + 60}));
        assert!(matches!(v.verify(&no_sub), Err(JwtError::NoUsername(_))));
        let other = JwtVerifier::new(Some(&[7u8; 32]), None, "sub", "acl").unwrap();
        assert!(matches!(other.verify(&good), Err(JwtError::Invalid(_))));
        assert!(JwtVerifier::new(Some(b"short"), None, "sub", "acl").is_err());
        assert!(!JwtVerifier::looks_like_token(b"hunter2"));
    }
}
