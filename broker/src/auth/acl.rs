//! The ACL file: which client may publish to which topics and subscribe to
//! which filters. The syntax (docs/SECURITY.md has the full description):
//!
//! ```text
//! # comment
//! default deny                  # or allow: when no rule matches (deny if absent)
//! allow subscribe $SYS/#        # rules before any section apply to every client
//! user alice                    # rules for the user alice
//! allow all sensors/alice/#
//! client dev-7                  # rules for the ClientID dev-7
//! deny publish #
//! any                           # rules for every client again
//! allow all clients/%c/#        # %c: the ClientID, %u: the user name
//! allow publish users/%u/out
//! ```
//!
//! A rule is `allow|deny publish|subscribe|all TOPIC`. The first rule, in
//! file order, whose section applies to the client and whose topic matches
//! decides. A publish matches when the rule's topic (which may contain `+`
//! and `#`) matches the topic name; a subscribe matches when the rule's topic
//! covers every topic the filter can match (`a/#` covers `a/b/+`, `a/+` does
//! not cover `a/#`). `%u` never matches an anonymous client, and neither
//! substitution matches a value containing `/`, `+` or `#`, so a client cannot
//! widen a rule through its own id.

use tessera_shard::authz::{Action, filter_covers as covers};

/// Most rules one ACL file may hold: checks walk them in order.
pub const ACL_RULES_MAX: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    Any,
    User(String),
    Client(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    scope: Scope,
    allow: bool,
    publish: bool,
    subscribe: bool,
    topic: String,
    substitutes: bool,
}

/// A parsed ACL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    default_allow: bool,
    rules: Vec<Rule>,
}

/// A malformed ACL line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {what}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub what: String,
}

impl Acl {
    /// Parses the text of an ACL file.
    pub fn parse(text: &str) -> Result<Acl, ParseError> {
        let mut acl = Acl {
            default_allow: false,
            rules: Vec::new(),
        };
        let mut default_seen = false;
        let mut scope = Scope::Any;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |what: String| ParseError { line: i + 1, what };
            let mut words = line.split_whitespace();
            let keyword = words.next().expect("non-empty line");
            let rest: Vec<&str> = words.collect();
            match (keyword, rest.as_slice()) {
                ("default", [policy]) => {
                    if default_seen {
                        return Err(err("a second default line".into()));
                    }
                    default_seen = true;
                    acl.default_allow = match *policy {
                        "allow" => true,
                        "deny" => false,
                        other => return Err(err(format!("default {other:?}: use allow or deny"))),
                    };
                }
                ("user", [name]) => scope = Scope::User((*name).to_owned()),
                ("client", [id]) => scope = Scope::Client((*id).to_owned()),
                ("any", []) => scope = Scope::Any,
                ("allow" | "deny", [action, topic]) => {
                    let (publish, subscribe) = match *action {
                        "publish" => (true, false),
                        "subscribe" => (false, true),
                        "all" => (true, true),
                        other => {
                            return Err(err(format!(
                                "action {other:?}: use publish, subscribe or all"
                            )));
                        }
                    };
                    tessera_proto::topic::validate_topic_filter(topic, usize::MAX)
                        .map_err(|e| err(format!("topic {topic:?}: {e}")))?;
                    if acl.rules.len() >= ACL_RULES_MAX {
                        return Err(err(format!("more than {ACL_RULES_MAX} rules")));
                    }
                    acl.rules.push(Rule {
                        scope: scope.clone(),
                        allow: keyword == "allow",
                        publish,
                        subscribe,
                        topic: (*topic).to_owned(),
                        substitutes: topic.contains("%u") || topic.contains("%c"),
                    });
                }
                _ => {
                    return Err(err(format!(
                        "cannot read {line:?}: expected default allow|deny, user NAME, \
                         client ID, any, or allow|deny publish|subscribe|all TOPIC"
                    )));
                }
            }
        }
        Ok(acl)
    }

    /// An ACL with no rules and this default.
    pub fn with_default(allow: bool) -> Acl {
        Acl {
            default_allow: allow,
            rules: Vec::new(),
        }
    }

    /// Whether the client may `action` on `topic` (a topic name to publish,
    /// a filter to subscribe).
    pub fn allowed(
        &self,
        client_id: &str,
        username: Option<&str>,
        action: Action,
        topic: &str,
    ) -> bool {
        for r in &self.rules {
            let applies = match &r.scope {
                Scope::Any => true,
                Scope::User(u) => username == Some(u.as_str()),
                Scope::Client(c) => client_id == c,
            };
            let acts = match action {
                Action::Publish => r.publish,
                Action::Subscribe => r.subscribe,
            };
            if !applies || !acts {
                continue;
            }
            let matched = if r.substitutes {
                match substitute(&r.topic, client_id, username) {
                    Some(t) => topic_matches(&t, topic, action),
                    None => false,
                }
            } else {
                topic_matches(&r.topic, topic, action)
            };
            if matched {
                return r.allow;
            }
        }
        self.default_allow
    }
}

/// The rule topic with `%u` and `%c` replaced; `None` when a value is missing
/// or could change the topic's structure.
fn substitute(topic: &str, client_id: &str, username: Option<&str>) -> Option<String> {
    let unsafe_value = |v: &str| v.is_empty() || v.contains(['/', '+', '#']);
    let mut out = topic.to_owned();
    if out.contains("%c") {
        if unsafe_value(client_id) {
            return None;
        }
        out = out.replace("%c", client_id);
    }
    if out.contains("%u") {
        let u = username.filter(|u| !unsafe_value(u))?;
        out = out.replace("%u", u);
    }
    Some(out)
}

fn topic_matches(rule: &str, topic: &str, action: Action) -> bool {
    match action {
        Action::Publish => tessera_proto::topic::matches(rule, topic),
        Action::Subscribe => covers(rule, topic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Action = Action::Publish;
    const S: Action = Action::Subscribe;

    #[test]
    fn first_match_wins_per_section_with_substitution() {
        let acl = Acl::parse(
            "# test\n\
             default deny\n\
             deny subscribe test/nosubscribe\n\
             user alice\n\
             allow all sensors/alice/#\n\
             deny publish sensors/#\n\
             client dev-7\n\
             allow publish dev/only\n\
             any\n\
             allow all clients/%c/#\n\
             allow publish users/%u/out\n\
             allow subscribe test/#\n",
        )
        .unwrap();
        let alice = |a, t| acl.allowed("c1", Some("alice"), a, t);
        assert!(alice(P, "sensors/alice/t"));
        assert!(alice(S, "sensors/alice/+"));
        assert!(!alice(P, "sensors/bob/t"), "the deny after the allow");
        assert!(alice(P, "users/alice/out"));
        assert!(!acl.allowed("c1", Some("bob"), P, "users/alice/out"));
        assert!(
            !acl.allowed("c1", None, P, "users//out"),
            "%u: no anonymous"
        );
        assert!(acl.allowed("dev-7", None, P, "dev/only"));
        assert!(!acl.allowed("dev-8", None, P, "dev/only"));
        assert!(acl.allowed("dev-8", None, P, "clients/dev-8/x"));
        assert!(
            !acl.allowed("a/b", None, P, "clients/a/b/x"),
            "no '/' in %c"
        );
        assert!(!acl.allowed("x", None, S, "test/nosubscribe"));
        assert!(acl.allowed("x", None, S, "test/other"));
        assert!(!acl.allowed("x", None, P, "test/other"), "default deny");
    }

    #[test]
    fn a_subscription_must_be_covered_by_the_rule() {
        assert!(covers("a/#", "a/b/+"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/+", "a/b"));
        assert!(covers("a/+", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/+", "a/b/c"));
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/broker/+"));
    }

    #[test]
    fn malformed_lines_name_the_line() {
        for (text, what) in [
            ("allow publish", "cannot read"),
            ("allow read a/b", "action"),
            ("default maybe", "default"),
            ("allow all a/#/b", "topic"),
            ("user", "cannot read"),
        ] {
            let e = Acl::parse(&format!("# c\n{text}\n")).unwrap_err();
            assert_eq!(e.line, 2, "{text}");
            assert!(e.what.contains(what), "{text}: {e}");
        }
        let e = Acl::parse("default allow\ndefault deny\n").unwrap_err();
        assert_eq!(e.line, 2);
    }
}
