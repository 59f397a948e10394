//! The engine's security hooks: what the broker's authentication and ACL code
//! (in `tessera-broker`'s `auth` module) answers for the engine, and the
//! per-session cache that makes ACL checks free on the publish path after the
//! first message to a topic.
//!
//! The engine stays sans-IO and policy-free: it asks an [`AuthHook`] whether a
//! client may publish to a topic or subscribe to a filter, and hands it the
//! steps of an MQTT 5 re-authentication (AUTH 0x19). Authentication at CONNECT
//! happens in the driver before the engine sees the connection; what it
//! decided reaches the engine as an [`Admission`].
//!
//! One hook exists per shard (an `Rc` shared by the driver and the engine), on
//! every shard. Without a hook the engine allows everything and refuses any
//! authentication method (0x8C), as an unauthenticated broker must.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tessera_proto::Str;

/// What a client asks to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// PUBLISH to a topic name (the will included).
    Publish,
    /// SUBSCRIBE to a topic filter.
    Subscribe,
}

/// The result of one step of an enhanced authentication exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Send AUTH 0x18 with `data`; keep `state` (opaque to the engine) for the
    /// client's next AUTH.
    Continue {
        /// Authentication Data for the client.
        data: Bytes,
        /// What the method needs to check the client's next step.
        state: Bytes,
    },
    /// Authenticated; the last server message, if the method has one, goes in
    /// the CONNACK or AUTH 0x00.
    Success {
        /// Authentication Data for the client.
        data: Option<Bytes>,
        /// The authenticated user name.
        username: Str,
    },
    /// Refused with this reason code (0x86, 0x87 or 0x8C).
    Failure(tessera_proto::ReasonCode),
}

/// The broker's answers for the engine. Implemented by the broker's auth
/// module; lives on one shard (no `Send` needed).
pub trait AuthHook: std::fmt::Debug {
    /// Changes whenever the rules change (a reload); cached decisions taken
    /// under another generation are discarded.
    fn generation(&self) -> u64;

    /// Whether the client may do `action` on `topic` (a topic name for
    /// publish, a filter for subscribe).
    fn allowed(&self, client_id: &str, username: Option<&str>, action: Action, topic: &str)
    -> bool;

    /// One step of an enhanced authentication with `method`: `state` is `None`
    /// for the first step (the client's initial data), else what the previous
    /// [`AuthStep::Continue`] returned.
    fn auth_step(&self, method: &str, state: Option<&[u8]>, data: &[u8]) -> AuthStep;

    /// The SUBACK reason code of a subscription the ACL denies (v5; 3.1.1
    /// clients always get 0x80): 0x87 Not authorized unless the operator
    /// chose 0x80 Unspecified error.
    fn subscribe_denied(&self) -> tessera_proto::ReasonCode {
        tessera_proto::ReasonCode::NotAuthorized
    }
}

/// What the driver decided about a connection before the engine accepts it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// The enhanced authentication method the client used (echoed in CONNACK,
    /// and the only method its re-authentication may use).
    pub auth_method: Option<Str>,
    /// The method's last server message, sent in the CONNACK.
    pub auth_data: Option<Bytes>,
    /// When the credentials expire (a JWT's `exp`), in engine milliseconds:
    /// the connection is closed then (v5: DISCONNECT 0xA0).
    pub expires_at_ms: Option<u64>,
    /// ACL rules carried by the credentials (a JWT claim); when present they
    /// alone decide for this client, instead of the hook.
    pub token_acl: Option<Arc<TokenAcl>>,
    /// In a cluster, the epoch of this node's committed claim of the ClientID the
    /// connection is served under (named in the client log line).
    pub claim_epoch: Option<u64>,
}

/// Topic rules carried by a credential: the topics (with `+`/`#`) the client
/// may publish to and the filters it may subscribe within. Anything else is
/// denied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenAcl {
    /// Topic patterns the client may publish to.
    pub publish: Vec<String>,
    /// Topic patterns covering the filters the client may subscribe to.
    pub subscribe: Vec<String>,
}

impl TokenAcl {
    /// Whether the rules allow `action` on `topic`.
    pub fn allows(&self, action: Action, topic: &str) -> bool {
        match action {
            Action::Publish => self
                .publish
                .iter()
                .any(|p| tessera_proto::topic::matches(p, topic)),
            Action::Subscribe => self.subscribe.iter().any(|p| filter_covers(p, topic)),
        }
    }
}

/// Whether every topic `filter` can match is matched by the pattern `rule`:
/// `a/#` covers `a/b/+`, `a/+` does not cover `a/#`. A wildcard first level
/// never covers `$` topics [MQTT-4.7.2-1].
pub fn filter_covers(rule: &str, filter: &str) -> bool {
    if filter.starts_with('$') && rule.starts_with(['+', '#']) {
        return false;
    }
    let mut r = rule.split('/');
    let mut f = filter.split('/');
    loop {
        match (r.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(fl)) if fl != "#" => {}
            (Some(rl), Some(fl)) if rl != "+" && rl == fl && fl != "+" && fl != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Topics whose publish decision one session caches. A session publishing to
/// more distinct topics than this starts over (the cache is cleared), so the
/// memory is bounded and the common case (a few topics) never re-checks.
pub const ACL_CACHE_TOPICS_MAX: usize = 64;

/// Publish decisions of one session, valid for one hook generation. Lives in
/// the session on its owner shard; boxed there and created on the first
/// check, so idle sessions without a hook pay one pointer.
#[derive(Debug, Default)]
pub struct AclCache {
    generation: u64,
    publish: HashMap<Str, bool>,
}

impl AclCache {
    /// The cached publish decision for `topic` under `generation`.
    pub fn get(&mut self, generation: u64, topic: &str) -> Option<bool> {
        if self.generation != generation {
            self.generation = generation;
            self.publish.clear();
            return None;
        }
        self.publish.get(topic.as_bytes()).copied()
    }

    /// Records a decision (the topic is compacted so it pins no read buffer).
    pub fn put(&mut self, generation: u64, topic: &Str, allowed: bool) {
        if self.generation != generation {
            self.generation = generation;
            self.publish.clear();
        }
        if self.publish.len() >= ACL_CACHE_TOPICS_MAX {
            self.publish.clear();
        }
        self.publish.insert(topic.compact(), allowed);
    }

    /// Decisions held.
    pub fn len(&self) -> usize {
        self.publish.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.publish.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: &str) -> Str {
        Str::try_from(t).unwrap()
    }

    #[test]
    fn token_rules_allow_only_what_they_list() {
        let t = TokenAcl {
            publish: vec!["up/+/data".into()],
            subscribe: vec!["down/#".into()],
        };
        assert!(t.allows(Action::Publish, "up/7/data"));
        assert!(!t.allows(Action::Publish, "up/7/other"));
        assert!(t.allows(Action::Subscribe, "down/+/cmd"));
        assert!(!t.allows(Action::Subscribe, "up/7/data"));
        assert!(filter_covers("a/#", "a"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(!filter_covers("#", "$SYS/x"));
    }

    #[test]
    fn the_cache_is_bounded_and_dropped_on_a_new_generation() {
        let mut c = AclCache::default();
        c.put(1, &s("a"), true);
        assert_eq!(c.get(1, "a"), Some(true));
        assert_eq!(c.get(2, "a"), None, "a reload invalidates");
        assert!(c.is_empty());
        for i in 0..(ACL_CACHE_TOPICS_MAX + 5) {
            c.put(2, &s(&format!("t/{i}")), i % 2 == 0);
            assert!(c.len() <= ACL_CACHE_TOPICS_MAX);
        }
    }
}
