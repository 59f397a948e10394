//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as the MQTT 5 enhanced authentication
//! method `SCRAM-SHA-256`: the server side, stateless between steps (the
//! state of an exchange is returned to the caller, who keeps it with the
//! connection).
//!
//! Exchange: CONNECT carries the client-first message as Authentication Data;
//! the server answers AUTH 0x18 with server-first; the client answers AUTH
//! 0x18 with client-final; the server checks the proof and sends CONNACK 0x00
//! with server-final (its own proof). Re-authentication (AUTH 0x19) runs the
//! same exchange on a live connection. No channel binding (`n,,` only).
//!
//! Only what the password file's SCRAM keys allow is checked here: StoredKey
//! and ServerKey, never a password. An unknown user gets a plausible challenge
//! (a salt derived from its name with a per-process key) and fails at the
//! proof, so the exchange does not reveal which users exist.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tessera_proto::{ReasonCode, Str};
use tessera_shard::authz::AuthStep;

use super::passwd::{PasswordFile, SCRAM_ITERATIONS_DEFAULT, hmac_sha256, random_bytes};

/// The method name in CONNECT and AUTH.
pub const METHOD: &str = "SCRAM-SHA-256";

/// Bytes of the server's nonce (base64-encoded on the wire).
const NONCE_BYTES: usize = 18;

/// Longest SCRAM message accepted: names and nonces are short.
const MESSAGE_BYTES_MAX: usize = 4096;

/// One step of the exchange. `state` is `None` for the client-first message.
/// `fake_key` makes unknown users' challenges stable and unguessable.
pub fn step(users: &PasswordFile, fake_key: &[u8], state: Option<&[u8]>, data: &[u8]) -> AuthStep {
    let fail = AuthStep::Failure(ReasonCode::BadUserNameOrPassword);
    if data.len() > MESSAGE_BYTES_MAX {
        return fail;
    }
    let Ok(msg) = std::str::from_utf8(data) else {
        return fail;
    };
    match state {
        None => server_first(users, fake_key, msg).unwrap_or(fail),
        Some(state) => server_final(users, state, msg).unwrap_or(fail),
    }
}

fn server_first(users: &PasswordFile, fake_key: &[u8], msg: &str) -> Option<AuthStep> {
    // gs2-header: "n,," (no channel binding, no authzid) or "y,,".
    let bare = msg
        .strip_prefix("n,,")
        .or_else(|| msg.strip_prefix("y,,"))?;
    let mut parts = bare.split(',');
    let user = decode_saslname(parts.next()?.strip_prefix("n=")?)?;
    let client_nonce = parts.next()?.strip_prefix("r=")?;
    if client_nonce.is_empty()
        || !client_nonce
            .chars()
            .all(|c| c.is_ascii_graphic() && c != ',')
    {
        return None;
    }
    let (salt, iterations) = match users.get(&user).and_then(|e| e.scram.as_ref()) {
        Some(k) => (k.salt.clone(), k.iterations),
        None => (
            hmac_sha256(fake_key, user.as_bytes())[..16].to_vec(),
            SCRAM_ITERATIONS_DEFAULT,
        ),
    };
    let nonce = format!("{client_nonce}{}", B64.encode(random_bytes(NONCE_BYTES)));
    let server_first = format!("r={nonce},s={},i={iterations}", B64.encode(salt));
    let state = format!("{user}\0{bare}\0{server_first}");
    Some(AuthStep::Continue {
        data: Bytes::from(server_first),
        state: Bytes::from(state),
    })
}

fn server_final(users: &PasswordFile, state: &[u8], msg: &str) -> Option<AuthStep> {
    let state = std::str::from_utf8(state).ok()?;
    let mut st = state.split('\0');
    let (user, client_first_bare, server_first) = (st.next()?, st.next()?, st.next()?);
    let nonce = server_first.strip_prefix("r=")?.split(',').next()?;
    let (without_proof, proof) = msg.rsplit_once(",p=")?;
    let mut parts = without_proof.split(',');
    let channel = parts.next()?.strip_prefix("c=")?;
    // "biws" = base64("n,,"), "eSws" = base64("y,,").
    if channel != "biws" && channel != "eSws" {
        return None;
    }
    if parts.next()?.strip_prefix("r=")? != nonce {
        return None;
    }
    let proof = B64.decode(proof).ok()?;
    let keys = users.get(user)?.scram.as_ref()?;
    if proof.len() != 32 {
        return None;
    }
    let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
    let client_signature = hmac_sha256(&keys.stored_key, auth_message.as_bytes());
    let client_key: Vec<u8> = proof
        .iter()
        .zip(client_signature)
        .map(|(p, s)| p ^ s)
        .collect();
    let stored: [u8; 32] = Sha256::digest(&client_key).into();
    if !bool::from(stored.ct_eq(&keys.stored_key)) {
        return None;
    }
    let server_signature = hmac_sha256(&keys.server_key, auth_message.as_bytes());
    Some(AuthStep::Success {
        data: Some(Bytes::from(format!("v={}", B64.encode(server_signature)))),
        username: Str::try_from(user).ok()?,
    })
}

/// RFC 5802 saslname: `=2C` is `,` and `=3D` is `=`; any other `=` is invalid.
fn decode_saslname(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i + 1..i + 3)? {
            "2C" => out.push(','),
            "3D" => out.push('='),
            _ => return None,
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::super::passwd::{Entry, scram_salted_password};
    use super::*;

    /// The client side, as a test would write it from RFC 5802.
    fn client_final(password: &str, client_first_bare: &str, server_first: &str) -> String {
        let mut fields = server_first.split(',');
        let nonce = fields.next().unwrap().strip_prefix("r=").unwrap();
        let salt = B64
            .decode(fields.next().unwrap().strip_prefix("s=").unwrap())
            .unwrap();
        let it: u32 = fields
            .next()
            .unwrap()
            .strip_prefix("i=")
            .unwrap()
            .parse()
            .unwrap();
        let salted = scram_salted_password(password.as_bytes(), &salt, it);
        let client_key = hmac_sha256(&salted, b"Client Key");
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let without = format!("c=biws,r={nonce}");
        let auth = format!("{client_first_bare},{server_first},{without}");
        let sig = hmac_sha256(&stored, auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
        format!("{without},p={}", B64.encode(proof))
    }

    fn run(users: &PasswordFile, user: &str, password: &str) -> AuthStep {
        let bare = format!("n={user},r=abcdefgh");
        let AuthStep::Continue { data, state } =
            step(users, b"k", None, format!("n,,{bare}").as_bytes())
        else {
            panic!("no challenge");
        };
        let server_first = std::str::from_utf8(&data).unwrap();
        assert!(server_first.starts_with("r=abcdefgh"));
        let fin = client_final(password, &bare, server_first);
        step(users, b"k", Some(&state), fin.as_bytes())
    }

    #[test]
    fn the_right_password_succeeds_and_a_wrong_one_fails() {
        let mut users = PasswordFile::default();
        users.set("alice", Entry::new(b"pw", 1, Some(64)));
        users.set("nokeys", Entry::new(b"pw", 1, None));
        match run(&users, "alice", "pw") {
            AuthStep::Success { data, username } => {
                assert_eq!(username, "alice");
                assert!(data.unwrap().starts_with(b"v="));
            }
            other => panic!("{other:?}"),
        }
        let fail = AuthStep::Failure(ReasonCode::BadUserNameOrPassword);
        assert_eq!(run(&users, "alice", "wrong"), fail);
        assert_eq!(
            run(&users, "ghost", "pw"),
            fail,
            "unknown users get a challenge"
        );
        assert_eq!(run(&users, "nokeys", "pw"), fail);
        assert_eq!(step(&users, b"k", None, b"p=tls,,n=a,r=x"), fail);
        assert_eq!(step(&users, b"k", None, b"n,,n=a=,r=x"), fail);
    }

    #[test]
    fn saslnames_decode() {
        assert_eq!(decode_saslname("a=2Cb=3Dc").as_deref(), Some("a,b=c"));
        assert_eq!(decode_saslname("a=2"), None);
        assert_eq!(decode_saslname(""), None);
    }
}
