//! Topic names, topic filters and shared subscriptions (MQTT 5.0 sections 4.7 and 4.8.2,
//! MQTT 3.1.1 section 4.7): validation, `$share/` parsing and the match function.
//!
//! Everything here works on borrowed `&str` and allocates nothing, so the broker can call
//! it per PUBLISH and per SUBSCRIBE. Topic depth is attacker-controlled, so every function
//! walks its input once, left to right, in a loop bounded by the input's length, and the
//! validators reject topics deeper than a caller-supplied bound (normally
//! [`TOPIC_LEVELS_MAX`]). Nothing recurses on input depth.
//!
//! What this module does not do:
//! - Decode strings. The codec's string type has already rejected ill-formed UTF-8, U+0000
//!   and strings over 65,535 bytes; the validators repeat the last two checks only because
//!   a `&str` may also come from configuration or an in-process API.
//! - Index subscriptions. The route index (a trie) lives in the broker; [`matches()`] is the
//!   one-filter-against-one-topic definition that the index must agree with.
//! - Broker policy: whether clients may publish to `$`-topics (the spec says the server
//!   SHOULD prevent it), whether shared subscriptions are enabled, and protocol version.
//!   MQTT 3.1.1 has no shared subscriptions, so there `$share/...` is an ordinary filter and
//!   the caller decides whether to call [`parse_shared`] at all.
//! - Topic aliases, which are resolved by the session before a topic name reaches here.

use std::fmt;

/// The deepest topic name or filter, in levels, that the broker accepts by default.
///
/// The spec puts no bound on depth, but depth is chosen by the client, and every level
/// costs work: one step of [`matches()`], one node visited in the route trie, one level
/// stored per subscription. A named bound keeps that work per topic finite and known, so
/// a client cannot make a single PUBLISH or SUBSCRIBE arbitrarily expensive. Matching walks
/// levels in a bounded iterative loop and never recurses on input depth, so even an
/// unvalidated topic cannot exhaust the stack. Real deployments rarely exceed a dozen
/// levels; 128 leaves ample room.
pub const TOPIC_LEVELS_MAX: usize = 128;

/// The longest topic name or filter, in bytes of UTF-8: the most a two-byte length prefix
/// can announce (MQTT 5.0 section 1.5.4, 3.1.1 section 1.5.3).
pub const TOPIC_BYTES_MAX: usize = 65_535;

// A topic of `TOPIC_BYTES_MAX` bytes has at most `TOPIC_BYTES_MAX + 1` levels (all
// separators). A level bound above that could never trigger, which would mean the two
// limits were set without regard to each other.
const _: () = assert!(TOPIC_LEVELS_MAX >= 1 && TOPIC_LEVELS_MAX <= TOPIC_BYTES_MAX + 1);

/// MQTT 5 reason code 0x8F, Topic Filter invalid: SUBACK and UNSUBACK per filter.
const REASON_TOPIC_FILTER_INVALID: u8 = 0x8F;
/// MQTT 5 reason code 0x90, Topic Name invalid: PUBACK, PUBREC or DISCONNECT.
const REASON_TOPIC_NAME_INVALID: u8 = 0x90;

/// The prefix that marks a shared subscription (MQTT 5.0 section 4.8.2).
const SHARE_PREFIX: &str = "$share/";

/// Whether a string was checked as a topic name (PUBLISH) or a topic filter (SUBSCRIBE,
/// UNSUBSCRIBE). Faults common to both carry it so the right reason code can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// A topic name, the destination of a PUBLISH; wildcards are not allowed.
    Name,
    /// A topic filter, the subject of a subscription; wildcards are allowed.
    Filter,
}

impl fmt::Display for TopicKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TopicKind::Name => "name",
            TopicKind::Filter => "filter",
        })
    }
}

/// Why a topic name, topic filter or shared subscription filter is invalid.
///
/// When a string has several faults, the validators report the first one found scanning
/// left to right, after the whole-string checks for emptiness and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The string is empty (MQTT-4.7.3-1).
    #[error("topic {kind} is empty")]
    Empty {
        /// What was being validated.
        kind: TopicKind,
    },
    /// The string is longer than [`TOPIC_BYTES_MAX`] (MQTT-4.7.3-3).
    #[error("topic {kind} is {length_bytes} bytes, more than the 65535 allowed")]
    TooLong {
        /// What was being validated.
        kind: TopicKind,
        /// Length of the string in bytes.
        length_bytes: usize,
    },
    /// The string has more levels than the bound in force. The actual depth is not
    /// reported because counting stops as soon as the bound is passed.
    #[error("topic {kind} has more than {levels_max} levels")]
    TooManyLevels {
        /// What was being validated.
        kind: TopicKind,
        /// The bound in force.
        levels_max: usize,
    },
    /// The string contains U+0000 (MQTT-4.7.3-2).
    #[error("topic {kind} contains U+0000")]
    ContainsNul {
        /// What was being validated.
        kind: TopicKind,
    },
    /// A topic name contains `+` or `#` (MQTT-4.7.0-1).
    #[error("topic name contains a wildcard")]
    WildcardInName,
    /// A filter has `#` somewhere other than as the whole last level (MQTT-4.7.1-1).
    #[error("'#' is not the whole last level of the topic filter")]
    MultiLevelWildcardMisplaced,
    /// A filter has `+` sharing a level with other characters (MQTT-4.7.1-2).
    #[error("'+' does not occupy a whole level of the topic filter")]
    SingleLevelWildcardMisplaced,
    /// A shared subscription has an empty ShareName, as in `$share//x` (MQTT-4.8.2-1).
    #[error("shared subscription has an empty share name")]
    ShareNameEmpty,
    /// A shared subscription's ShareName contains `+` or `#` (MQTT-4.8.2-2).
    #[error("shared subscription's share name contains a wildcard")]
    ShareNameWildcard,
    /// A shared subscription has no topic filter after `$share/{ShareName}/`, as in
    /// `$share/g` or `$share/g/` (MQTT-4.8.2-2).
    #[error("shared subscription has no topic filter after the share name")]
    SharedFilterMissing,
}

impl TopicError {
    /// The MQTT 5 reason code the broker must send for this fault: 0x90 (Topic Name
    /// invalid) for a topic name, 0x8F (Topic Filter invalid) for a topic filter,
    /// including every shared subscription fault.
    pub fn reason_code(&self) -> u8 {
        match self.kind() {
            TopicKind::Name => REASON_TOPIC_NAME_INVALID,
            TopicKind::Filter => REASON_TOPIC_FILTER_INVALID,
        }
    }

    /// Whether the fault was found in a topic name or a topic filter.
    pub fn kind(&self) -> TopicKind {
        match *self {
            TopicError::Empty { kind }
            | TopicError::TooLong { kind, .. }
            | TopicError::TooManyLevels { kind, .. }
            | TopicError::ContainsNul { kind } => kind,
            TopicError::WildcardInName => TopicKind::Name,
            TopicError::MultiLevelWildcardMisplaced
            | TopicError::SingleLevelWildcardMisplaced
            | TopicError::ShareNameEmpty
            | TopicError::ShareNameWildcard
            | TopicError::SharedFilterMissing => TopicKind::Filter,
        }
    }
}

/// The levels of a topic name or filter: the pieces between `/` separators, in order.
///
/// Adjacent, leading and trailing separators give empty levels, which the spec treats as
/// ordinary levels: `"/"` has two empty levels, `"a//b"` has three. An empty string
/// yields one empty level (and is not a valid topic or filter).
pub fn levels(s: &str) -> impl Iterator<Item = &str> {
    s.split('/')
}

/// True if `filter` contains `+` or `#` anywhere. On a valid filter this means it has a
/// wildcard level and can match more than one topic name.
#[must_use]
pub fn has_wildcards(filter: &str) -> bool {
    filter.bytes().any(|b| b == b'+' || b == b'#')
}

/// Checks a topic name, as carried by PUBLISH or a Will: non-empty, at most
/// [`TOPIC_BYTES_MAX`] bytes, no U+0000, no `+` or `#`, at most `levels_max` levels.
///
/// Names starting with `$` are valid (`$SYS/broker/uptime`); whether a client may publish
/// to one is broker policy. Errors report [`TopicKind::Name`] and map to reason 0x90.
pub fn validate_topic_name(name: &str, levels_max: usize) -> Result<(), TopicError> {
    scan(name, levels_max, TopicKind::Name)
}

/// Checks a topic filter, as carried by SUBSCRIBE or UNSUBSCRIBE: non-empty, at most
/// [`TOPIC_BYTES_MAX`] bytes, no U+0000, at most `levels_max` levels, `#` only as the
/// whole last level and `+` only as a whole level. Empty levels are allowed (`a//b`, `/`).
///
/// This checks the plain filter grammar and does not interpret `$share/`: under that
/// grammar `$share//x` is a valid filter. An MQTT 5 SUBSCRIBE must go through
/// [`parse_shared`] first. Errors report [`TopicKind::Filter`] and map to reason 0x8F.
pub fn validate_topic_filter(filter: &str, levels_max: usize) -> Result<(), TopicError> {
    scan(filter, levels_max, TopicKind::Filter)
}

/// The two parts of a shared subscription filter `$share/{ShareName}/{filter}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SharedFilter<'a> {
    /// The ShareName: at least one character, no `/`, `+` or `#`.
    pub group: &'a str,
    /// The topic filter that messages are matched against; a valid, non-empty filter.
    pub filter: &'a str,
}

/// True if `filter` starts with `$share/`, i.e. requests a shared subscription in MQTT 5.
/// This checks only the prefix; [`parse_shared`] checks the rest.
#[must_use]
pub fn is_shared(filter: &str) -> bool {
    filter.starts_with(SHARE_PREFIX)
}

/// Splits a shared subscription filter `$share/{ShareName}/{filter}` into its parts.
///
/// Returns `Ok(None)` when `filter` does not start with `$share/` (including a filter that
/// is exactly `$share`, which is an ordinary filter). Otherwise the ShareName runs up to
/// the next `/`, so it can never contain `/`, and everything after that `/` is the topic
/// filter: `$share/g/a/b` is group `g`, filter `a/b`, and `$share/g//x` is group `g`,
/// filter `/x`. The whole string must be at most [`TOPIC_BYTES_MAX`] bytes with no U+0000,
/// the ShareName must be non-empty without `+` or `#`, and the filter must be a valid
/// non-empty topic filter of at most [`TOPIC_LEVELS_MAX`] levels (the `$share/{ShareName}/`
/// prefix does not count towards depth). A caller enforcing a tighter depth bound calls
/// [`validate_topic_filter`] on the returned filter as well.
pub fn parse_shared(filter: &str) -> Result<Option<SharedFilter<'_>>, TopicError> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return Ok(None);
    };
    // The length bound applies to the string as it travels on the wire, prefix included.
    if filter.len() > TOPIC_BYTES_MAX {
        return Err(TopicError::TooLong {
            kind: TopicKind::Filter,
            length_bytes: filter.len(),
        });
    }
    // Without a second separator there is no filter at all (`$share/g`). Treating that as
    // an empty filter gives it the same error as `$share/g/`, since the spec forbids both,
    // while a fault in the share name, which comes first, is still reported first.
    let (group, inner) = rest.split_once('/').unwrap_or((rest, ""));
    if group.is_empty() {
        return Err(TopicError::ShareNameEmpty);
    }
    for b in group.bytes() {
        match b {
            b'\0' => {
                return Err(TopicError::ContainsNul {
                    kind: TopicKind::Filter,
                });
            }
            b'+' | b'#' => return Err(TopicError::ShareNameWildcard),
            _ => {}
        }
    }
    if inner.is_empty() {
        return Err(TopicError::SharedFilterMissing);
    }
    validate_topic_filter(inner, TOPIC_LEVELS_MAX)?;
    Ok(Some(SharedFilter {
        group,
        filter: inner,
    }))
}

/// True if the topic name `topic` matches the topic filter `filter` (MQTT 5.0 section
/// 4.7, 3.1.1 section 4.7).
///
/// - A level of the filter matches the same level of the topic if the two are equal
///   (case-sensitive, byte for byte) or the filter's level is `+`, which matches exactly
///   one level, including an empty one: `sport/+` matches `sport/` but not `sport`.
/// - A last level `#` matches the parent level and any number of child levels:
///   `sport/#` matches `sport`, `sport/` and `sport/tennis/player1`.
/// - A topic starting with `$` is not matched by a filter whose first level is `+` or `#`
///   (section 4.7.2), but is matched by one that names that level: `$SYS/#` matches
///   `$SYS/broker/uptime`, `#` does not.
///
/// Pass the filter part of a shared subscription, not the `$share/...` string. Inputs are
/// expected to be valid; on invalid ones the result is unspecified but the function never
/// panics, and it treats a level as a wildcard only when the level is exactly `+` or `#`.
/// An empty filter or topic matches nothing. Allocation-free; the loop runs at most once
/// per topic level plus once.
#[must_use]
pub fn matches(filter: &str, topic: &str) -> bool {
    if filter.is_empty() || topic.is_empty() {
        return false;
    }
    // Section 4.7.2: `$`-topics are reserved for the server's own use, so a wildcard in
    // the first level must not reach them by accident.
    if topic.starts_with('$') && matches!(levels(filter).next(), Some("+" | "#")) {
        return false;
    }
    let mut filter_levels = levels(filter);
    let mut topic_levels = levels(topic);
    // Each iteration consumes one level of the topic or returns, so the loop is bounded by
    // the topic's depth without an explicit counter.
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            // `#` matches whatever is left of the topic, even nothing (the parent level).
            // It must be the filter's last level; on an invalid filter like `#/a` the `#`
            // matches nothing rather than everything.
            (Some("#"), _) => return filter_levels.next().is_none(),
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// One left-to-right pass over `s` that checks everything a name or filter must satisfy,
/// stopping at the first fault. Scanning bytes is sound for UTF-8: `/`, `+`, `#` and NUL
/// are ASCII, and ASCII bytes never occur inside a multi-byte sequence.
fn scan(s: &str, levels_max: usize, kind: TopicKind) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty { kind });
    }
    if s.len() > TOPIC_BYTES_MAX {
        return Err(TopicError::TooLong {
            kind,
            length_bytes: s.len(),
        });
    }
    let too_many_levels = TopicError::TooManyLevels { kind, levels_max };
    let mut level_count: usize = 1;
    if level_count > levels_max {
        return Err(too_many_levels);
    }
    let bytes = s.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        // A wildcard occupies a whole level when it is bounded by separators or the ends.
        let level_starts_here = i == 0 || bytes[i - 1] == b'/';
        let level_ends_after = i + 1 == bytes.len() || bytes[i + 1] == b'/';
        match b {
            b'\0' => return Err(TopicError::ContainsNul { kind }),
            b'/' => {
                level_count += 1;
                if level_count > levels_max {
                    return Err(too_many_levels);
                }
            }
            b'+' | b'#' if kind == TopicKind::Name => return Err(TopicError::WildcardInName),
            b'+' if !(level_starts_here && level_ends_after) => {
                return Err(TopicError::SingleLevelWildcardMisplaced);
            }
            // `#` must also be the last byte, which makes it the whole last level.
            b'#' if !(level_starts_here && i + 1 == bytes.len()) => {
                return Err(TopicError::MultiLevelWildcardMisplaced);
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Goal: pin the exact behaviour of validation, shared subscription parsing and
    //! matching. Method: every example from MQTT 5.0 sections 4.7.1.2, 4.7.1.3, 4.7.2,
    //! 4.7.3 and 4.8.2 as a unit test, boundary cases for the limits, then property tests
    //! against a deliberately simple reference matcher and for absence of panics.

    use super::*;

    use proptest::prelude::*;

    const FILTER: TopicKind = TopicKind::Filter;
    const NAME: TopicKind = TopicKind::Name;

    fn name_ok(s: &str) -> Result<(), TopicError> {
        validate_topic_name(s, TOPIC_LEVELS_MAX)
    }

    fn filter_ok(s: &str) -> Result<(), TopicError> {
        validate_topic_filter(s, TOPIC_LEVELS_MAX)
    }

    // Section 4.7.1.2, multi-level wildcard.
    #[test]
    fn spec_multi_level_wildcard_matches() {
        let f = "sport/tennis/player1/#";
        assert!(matches(f, "sport/tennis/player1"));
        assert!(matches(f, "sport/tennis/player1/ranking"));
        assert!(matches(f, "sport/tennis/player1/score/wimbledon"));
        assert!(!matches(f, "sport/tennis/player2"));
        assert!(!matches(f, "sport/tennis"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/#", "sport/"));
    }

    #[test]
    fn spec_multi_level_wildcard_validity() {
        assert_eq!(filter_ok("#"), Ok(()));
        assert_eq!(filter_ok("sport/tennis/#"), Ok(()));
        assert_eq!(
            filter_ok("sport/tennis#"),
            Err(TopicError::MultiLevelWildcardMisplaced)
        );
        assert_eq!(
            filter_ok("sport/tennis/#/ranking"),
            Err(TopicError::MultiLevelWildcardMisplaced)
        );
        assert_eq!(
            filter_ok("#/"),
            Err(TopicError::MultiLevelWildcardMisplaced)
        );
        assert_eq!(
            filter_ok("##"),
            Err(TopicError::MultiLevelWildcardMisplaced)
        );
        assert_eq!(
            filter_ok("#a"),
            Err(TopicError::MultiLevelWildcardMisplaced)
        );
    }

    // Section 4.7.1.3, single-level wildcard.
    #[test]
    fn spec_single_level_wildcard_matches() {
        let f = "sport/tennis/+";
        assert!(matches(f, "sport/tennis/player1"));
        assert!(matches(f, "sport/tennis/player2"));
        assert!(!matches(f, "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
    }

    #[test]
    fn spec_single_level_wildcard_validity() {
        assert_eq!(filter_ok("+"), Ok(()));
        assert_eq!(filter_ok("+/tennis/#"), Ok(()));
        assert_eq!(filter_ok("sport/+/player1"), Ok(()));
        assert_eq!(
            filter_ok("sport+"),
            Err(TopicError::SingleLevelWildcardMisplaced)
        );
        assert_eq!(
            filter_ok("+sport"),
            Err(TopicError::SingleLevelWildcardMisplaced)
        );
        assert_eq!(
            filter_ok("a/++/b"),
            Err(TopicError::SingleLevelWildcardMisplaced)
        );
        assert_eq!(
            filter_ok("+#"),
            Err(TopicError::SingleLevelWildcardMisplaced)
        );
        assert_eq!(filter_ok("+/+/+"), Ok(()));
    }

    // Section 4.7.2, topics beginning with `$`.
    #[test]
    fn spec_dollar_topics() {
        assert!(!matches("#", "$SYS/broker/uptime"));
        assert!(!matches("#", "$SYS"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(!matches("+", "$SYS"));
        assert!(!matches("+/#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        // Only the first level is special: `$` later in a topic is an ordinary character.
        assert!(matches("#", "a/$SYS"));
        assert!(matches("+/+", "a/$b"));
        assert_eq!(name_ok("$SYS/broker/uptime"), Ok(()));
        assert_eq!(name_ok("$"), Ok(()));
    }

    // Section 4.7.3: case sensitivity, spaces, leading separators, `/` alone.
    #[test]
    fn spec_topic_semantics() {
        assert!(!matches("ACCOUNTS", "Accounts"));
        assert!(matches("Accounts payable", "Accounts payable"));
        assert_eq!(name_ok("Accounts payable"), Ok(()));
        assert!(!matches("finance", "/finance"));
        assert!(!matches("/finance", "finance"));
        assert_eq!(name_ok("/"), Ok(()));
        assert_eq!(filter_ok("/"), Ok(()));
        assert!(matches("/", "/"));
        assert!(matches("+/+", "/"));
        assert!(!matches("+", "/"));
        assert_eq!(filter_ok("a//b"), Ok(()));
        assert!(matches("a/+/b", "a//b"));
    }

    #[test]
    fn names_reject_wildcards() {
        assert_eq!(name_ok("sport/+"), Err(TopicError::WildcardInName));
        assert_eq!(name_ok("sport/#"), Err(TopicError::WildcardInName));
        assert_eq!(name_ok("sport#"), Err(TopicError::WildcardInName));
        assert_eq!(name_ok("a+b"), Err(TopicError::WildcardInName));
    }

    #[test]
    fn empty_is_rejected() {
        assert_eq!(name_ok(""), Err(TopicError::Empty { kind: NAME }));
        assert_eq!(filter_ok(""), Err(TopicError::Empty { kind: FILTER }));
        assert!(!matches("", ""));
        assert!(!matches("#", ""));
        assert!(!matches("", "a"));
    }

    #[test]
    fn nul_is_rejected() {
        assert_eq!(name_ok("a\0b"), Err(TopicError::ContainsNul { kind: NAME }));
        assert_eq!(
            filter_ok("\0"),
            Err(TopicError::ContainsNul { kind: FILTER })
        );
        assert_eq!(
            filter_ok("a/+/\0"),
            Err(TopicError::ContainsNul { kind: FILTER })
        );
    }

    #[test]
    fn length_bound_is_exact() {
        let longest = "a".repeat(TOPIC_BYTES_MAX);
        let too_long = "a".repeat(TOPIC_BYTES_MAX + 1);
        assert_eq!(name_ok(&longest), Ok(()));
        assert_eq!(filter_ok(&longest), Ok(()));
        assert_eq!(
            name_ok(&too_long),
            Err(TopicError::TooLong {
                kind: NAME,
                length_bytes: TOPIC_BYTES_MAX + 1
            })
        );
        assert_eq!(
            filter_ok(&too_long),
            Err(TopicError::TooLong {
                kind: FILTER,
                length_bytes: TOPIC_BYTES_MAX + 1
            })
        );
    }

    #[test]
    fn depth_bound_is_exact() {
        // `TOPIC_LEVELS_MAX` levels take `TOPIC_LEVELS_MAX - 1` separators.
        let deepest = vec!["a"; TOPIC_LEVELS_MAX].join("/");
        let too_deep = vec!["a"; TOPIC_LEVELS_MAX + 1].join("/");
        let err = |kind| TopicError::TooManyLevels {
            kind,
            levels_max: TOPIC_LEVELS_MAX,
        };
        assert_eq!(name_ok(&deepest), Ok(()));
        assert_eq!(filter_ok(&deepest), Ok(()));
        assert_eq!(name_ok(&too_deep), Err(err(NAME)));
        assert_eq!(filter_ok(&too_deep), Err(err(FILTER)));
        // Empty levels count: a string of separators alone is as deep as any other.
        let slashes = "/".repeat(TOPIC_LEVELS_MAX);
        assert_eq!(name_ok(&slashes), Err(err(NAME)));
        assert_eq!(name_ok(&slashes[1..]), Ok(()));
    }

    #[test]
    fn depth_bound_is_the_callers() {
        assert_eq!(validate_topic_filter("a/b/#", 3), Ok(()));
        assert_eq!(
            validate_topic_filter("a/b/c/#", 3),
            Err(TopicError::TooManyLevels {
                kind: FILTER,
                levels_max: 3
            })
        );
        assert_eq!(validate_topic_name("a", 1), Ok(()));
        assert_eq!(
            validate_topic_name("a", 0),
            Err(TopicError::TooManyLevels {
                kind: NAME,
                levels_max: 0
            })
        );
    }

    #[test]
    fn first_fault_left_to_right_is_reported() {
        assert_eq!(
            filter_ok("a+/\0"),
            Err(TopicError::SingleLevelWildcardMisplaced)
        );
        assert_eq!(
            filter_ok("\0/a+"),
            Err(TopicError::ContainsNul { kind: FILTER })
        );
        assert_eq!(
            validate_topic_filter("a/b/c+", 2),
            Err(TopicError::TooManyLevels {
                kind: FILTER,
                levels_max: 2
            })
        );
    }

    #[test]
    fn multi_byte_levels() {
        assert_eq!(name_ok("température/salle-à-manger/🌡"), Ok(()));
        assert!(matches("température/+/🌡", "température/salle-à-manger/🌡"));
        assert!(!matches("températurE/#", "température/x"));
    }

    // Section 4.8.2, shared subscriptions.
    #[test]
    fn spec_shared_subscriptions() {
        assert_eq!(
            parse_shared("$share/consumer1/sport/tennis/+"),
            Ok(Some(SharedFilter {
                group: "consumer1",
                filter: "sport/tennis/+"
            }))
        );
        assert_eq!(
            parse_shared("$share/consumer2/sport/tennis/+"),
            Ok(Some(SharedFilter {
                group: "consumer2",
                filter: "sport/tennis/+"
            }))
        );
        // The spec's own example: a filter that itself starts with a separator.
        assert_eq!(
            parse_shared("$share/consumer1//finance"),
            Ok(Some(SharedFilter {
                group: "consumer1",
                filter: "/finance"
            }))
        );
        assert_eq!(
            parse_shared("$share/g/#"),
            Ok(Some(SharedFilter {
                group: "g",
                filter: "#"
            }))
        );
        let shared = parse_shared("$share/consumer1/sport/tennis/+")
            .unwrap()
            .unwrap();
        assert!(matches(shared.filter, "sport/tennis/player1"));
    }

    #[test]
    fn shared_subscription_errors() {
        assert_eq!(
            parse_shared("$share/g"),
            Err(TopicError::SharedFilterMissing)
        );
        assert_eq!(
            parse_shared("$share/g/"),
            Err(TopicError::SharedFilterMissing)
        );
        assert_eq!(parse_shared("$share/"), Err(TopicError::ShareNameEmpty));
        assert_eq!(parse_shared("$share/+"), Err(TopicError::ShareNameWildcard));
        assert_eq!(parse_shared("$share//x"), Err(TopicError::ShareNameEmpty));
        assert_eq!(parse_shared("$share//"), Err(TopicError::ShareNameEmpty));
        assert_eq!(
            parse_shared("$share/g+/x"),
            Err(TopicError::ShareNameWildcard)
        );
        assert_eq!(
            parse_shared("$share/+/x"),
            Err(TopicError::ShareNameWildcard)
        );
        assert_eq!(
            parse_shared("$share/#/x"),
            Err(TopicError::ShareNameWildcard)
        );
        assert_eq!(
            parse_shared("$share/g+\0/x"),
            Err(TopicError::ShareNameWildcard)
        );
        assert_eq!(
            parse_shared("$share/g\0/x"),
            Err(TopicError::ContainsNul { kind: FILTER })
        );
        assert_eq!(
            parse_shared("$share/g/sport+"),
            Err(TopicError::SingleLevelWildcardMisplaced)
        );
        assert_eq!(
            parse_shared("$share/g/#/x"),
            Err(TopicError::MultiLevelWildcardMisplaced)
        );
        let deep = format!("$share/g/{}", vec!["a"; TOPIC_LEVELS_MAX].join("/"));
        assert!(parse_shared(&deep).unwrap().is_some());
        let too_deep = format!("$share/g/{}", vec!["a"; TOPIC_LEVELS_MAX + 1].join("/"));
        assert_eq!(
            parse_shared(&too_deep),
            Err(TopicError::TooManyLevels {
                kind: FILTER,
                levels_max: TOPIC_LEVELS_MAX
            })
        );
        let too_long = format!("$share/g/{}", "a".repeat(TOPIC_BYTES_MAX));
        assert_eq!(
            parse_shared(&too_long),
            Err(TopicError::TooLong {
                kind: FILTER,
                length_bytes: too_long.len()
            })
        );
    }

    #[test]
    fn non_shared_filters() {
        for f in [
            "sport/#",
            "$share",
            "$sharex/g/a",
            "$SHARE/g/a",
            "share/g/a",
            "",
            "#",
        ] {
            assert_eq!(parse_shared(f), Ok(None), "{f:?}");
            assert!(!is_shared(f), "{f:?}");
        }
        assert!(is_shared("$share/g/a"));
        // `is_shared` checks the prefix only.
        assert!(is_shared("$share//"));
        // As a plain (3.1.1) filter, `$share/...` follows the ordinary grammar.
        assert_eq!(filter_ok("$share//x"), Ok(()));
    }

    #[test]
    fn reason_codes() {
        assert_eq!(TopicError::Empty { kind: NAME }.reason_code(), 0x90);
        assert_eq!(TopicError::Empty { kind: FILTER }.reason_code(), 0x8F);
        assert_eq!(
            TopicError::TooLong {
                kind: NAME,
                length_bytes: 1
            }
            .reason_code(),
            0x90
        );
        assert_eq!(
            TopicError::TooManyLevels {
                kind: FILTER,
                levels_max: 1
            }
            .reason_code(),
            0x8F
        );
        assert_eq!(TopicError::ContainsNul { kind: NAME }.reason_code(), 0x90);
        assert_eq!(TopicError::WildcardInName.reason_code(), 0x90);
        assert_eq!(TopicError::MultiLevelWildcardMisplaced.reason_code(), 0x8F);
        assert_eq!(TopicError::SingleLevelWildcardMisplaced.reason_code(), 0x8F);
        assert_eq!(TopicError::ShareNameEmpty.reason_code(), 0x8F);
        assert_eq!(TopicError::ShareNameWildcard.reason_code(), 0x8F);
        assert_eq!(TopicError::SharedFilterMissing.reason_code(), 0x8F);
        // Validators report the kind they checked, so the code follows the packet type.
        assert_eq!(name_ok("a+").unwrap_err().reason_code(), 0x90);
        assert_eq!(filter_ok("a+").unwrap_err().reason_code(), 0x8F);
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            TopicError::Empty { kind: NAME }.to_string(),
            "topic name is empty"
        );
        assert_eq!(
            TopicError::TooManyLevels {
                kind: FILTER,
                levels_max: 128
            }
            .to_string(),
            "topic filter has more than 128 levels"
        );
    }

    #[test]
    fn levels_and_wildcards_helpers() {
        assert_eq!(levels("a/b/c").collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(levels("/").collect::<Vec<_>>(), ["", ""]);
        assert_eq!(levels("a//b").collect::<Vec<_>>(), ["a", "", "b"]);
        assert_eq!(levels("").collect::<Vec<_>>(), [""]);
        assert!(has_wildcards("a/+/b"));
        assert!(has_wildcards("#"));
        assert!(!has_wildcards("a/b"));
        assert!(!has_wildcards("$SYS/x"));
    }

    #[test]
    fn invalid_filters_match_conservatively() {
        // Not a contract for valid inputs, but `#` not last must not match everything.
        assert!(!matches("#/a", "x/y"));
        assert!(!matches("a/#/b", "a/x/b"));
        // A level is a wildcard only when it is exactly `+` or `#`.
        assert!(!matches("sport+", "sportx"));
        assert!(matches("sport+", "sport+"));
        assert!(!matches("a/b#", "a/bc"));
    }

    /// A reference matcher that says the spec's rules as directly as possible, on vectors
    /// of levels and by recursion. Fine for tests, whose inputs are small; the real
    /// matcher must not recurse on input depth.
    fn reference_matches(filter: &str, topic: &str) -> bool {
        fn go(f: &[&str], t: &[&str]) -> bool {
            match (f.first(), t.first()) {
                (Some(&"#"), _) => f.len() == 1,
                (Some(&"+"), Some(_)) => go(&f[1..], &t[1..]),
                (Some(a), Some(b)) => a == b && go(&f[1..], &t[1..]),
                (None, None) => true,
                _ => false,
            }
        }
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        let dollar_shielded = topic.starts_with('$') && (f[0] == "+" || f[0] == "#");
        !dollar_shielded && go(&f, &t)
    }

    /// Valid topic names: one to ten levels of arbitrary text without separators,
    /// wildcards or NUL; levels may be empty and may start with `$`.
    fn topic_name() -> impl Strategy<Value = String> {
        prop::collection::vec("[^/+#\u{0}]{0,6}", 1..10).prop_map(|v| v.join("/"))
    }

    /// Topic-shaped strings over a small alphabet, so that filters and topics share
    /// levels often enough for matches to be interesting.
    fn small_topic() -> impl Strategy<Value = String> {
        "[ab$/]{1,10}"
    }

    /// Filters over the same small alphabet plus wildcards; not all of them are valid.
    fn small_filter() -> impl Strategy<Value = String> {
        "[ab$+#/]{1,10}"
    }

    proptest! {
        #[test]
        fn every_topic_matches_itself(t in topic_name()) {
            prop_assume!(!t.is_empty());
            prop_assert_eq!(validate_topic_name(&t, TOPIC_LEVELS_MAX), Ok(()));
            prop_assert!(matches(&t, &t));
        }

        #[test]
        fn hash_matches_every_topic_not_starting_with_dollar(t in topic_name()) {
            prop_assume!(!t.is_empty());
            prop_assert_eq!(matches("#", &t), !t.starts_with('$'));
        }

        #[test]
        fn topic_with_hash_appended_matches_topic(t in topic_name()) {
            prop_assume!(!t.is_empty());
            let f = format!("{t}/#");
            prop_assert_eq!(validate_topic_filter(&f, TOPIC_LEVELS_MAX), Ok(()));
            prop_assert!(matches(&f, &t));
        }

        #[test]
        fn replacing_a_level_with_plus_still_matches(t in topic_name(), pick in any::<usize>()) {
            prop_assume!(!t.is_empty());
            let mut f: Vec<&str> = t.split('/').collect();
            let i = pick % f.len();
            f[i] = "+";
            let f = f.join("/");
            prop_assert_eq!(validate_topic_filter(&f, TOPIC_LEVELS_MAX), Ok(()));
            prop_assert_eq!(matches(&f, &t), !(i == 0 && t.starts_with('$')));
        }

        #[test]
        fn valid_names_are_valid_filters(s in any::<String>()) {
            if validate_topic_name(&s, TOPIC_LEVELS_MAX).is_ok() {
                prop_assert_eq!(validate_topic_filter(&s, TOPIC_LEVELS_MAX), Ok(()));
            }
        }

        #[test]
        fn agrees_with_reference_on_valid_inputs(f in small_filter(), t in small_topic()) {
            prop_assume!(validate_topic_filter(&f, TOPIC_LEVELS_MAX).is_ok());
            prop_assume!(validate_topic_name(&t, TOPIC_LEVELS_MAX).is_ok());
            prop_assert_eq!(matches(&f, &t), reference_matches(&f, &t));
        }

        #[test]
        fn never_panics_on_arbitrary_strings(f in any::<String>(), t in any::<String>()) {
            let _ = matches(&f, &t);
            let _ = matches(&t, &f);
            let _ = validate_topic_name(&f, TOPIC_LEVELS_MAX);
            let _ = validate_topic_filter(&f, TOPIC_LEVELS_MAX);
            let _ = parse_shared(&f);
        }

        #[test]
        fn never_panics_on_topic_shaped_strings(f in small_filter(), t in small_filter()) {
            let _ = matches(&f, &t);
            let _ = validate_topic_filter(&f, 3);
            let _ = parse_shared(&format!("$share/{f}"));
        }

        #[test]
        fn shared_filter_round_trips(g in "[^/+#\u{0}]{1,6}", t in topic_name()) {
            prop_assume!(!t.is_empty());
            let s = format!("$share/{g}/{t}");
            prop_assert_eq!(
                parse_shared(&s),
                Ok(Some(SharedFilter { group: &g, filter: &t }))
            );
        }
    }
}
