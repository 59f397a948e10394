//! Who publishes where and who subscribes to what: the [`Plan`] of a message
//! scenario (`fanin`, `fanout`, `pub`, `sub`, `pubsub`, `shared`), built from the
//! command line, and which publishers each subscriber should hear.
//!
//! Topic templates expand `%i` to the client's index within its role, `%c` to its
//! client id and `%%` to `%`. Which publishers a subscriber hears is decided with
//! the codec's own matcher ([`tessera_proto::topic::matches`]) on the topics the
//! publishers actually use, so a broker that delivers a message to a subscriber
//! whose filter does not match it is caught (the message counts as corrupt).

use std::collections::HashMap;

use tessera_proto::topic::{has_wildcards, matches, parse_shared};

/// One message scenario's clients and topics.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// `fanin`, `fanout`, `pub`, `sub`, `pubsub` or `shared`.
    pub scenario: &'static str,
    /// Topic of each publisher.
    pub pub_topics: Vec<String>,
    /// What each subscriber subscribes to (a `$share/...` filter for members of
    /// a shared-subscription group).
    pub sub_filters: Vec<String>,
    /// Shared-subscription groups: the subscriber indices of each group's members.
    pub groups: Vec<Vec<u32>>,
    /// Messages per second per publisher; `None`: as fast as allowed.
    pub rate: Option<f64>,
    /// Publish retained messages.
    pub retain: bool,
    /// MQTT 5 topic aliases, both directions.
    pub topic_alias: bool,
    /// The publishers are elsewhere (`bench sub`): account for any run.
    pub open: bool,
}

/// Expands a topic template for client `index` whose client id is `client_id`.
pub fn expand(template: &str, index: u32, client_id: &str) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('i') => out.push_str(&index.to_string()),
            Some('c') => out.push_str(client_id),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The part of a subscription that matches topics: FILTER of `$share/G/FILTER`.
pub fn match_part(filter: &str) -> &str {
    match parse_shared(filter) {
        Ok(Some(s)) => s.filter,
        _ => filter,
    }
}

impl Plan {
    /// For each subscriber, the publishers (ascending) whose topic its filter
    /// matches. Filters without wildcards are looked up, others matched against
    /// every topic once per distinct filter.
    pub fn hears(&self) -> Vec<Vec<u32>> {
        let mut by_topic: HashMap<&str, Vec<u32>> = HashMap::new();
        for (p, t) in self.pub_topics.iter().enumerate() {
            by_topic.entry(t.as_str()).or_default().push(p as u32);
        }
        let mut by_filter: HashMap<&str, Vec<u32>> = HashMap::new();
        self.sub_filters
            .iter()
            .map(|f| {
                let f = match_part(f);
                if !has_wildcards(f) {
                    return by_topic.get(f).cloned().unwrap_or_default();
                }
                by_filter
                    .entry(f)
                    .or_insert_with(|| {
                        (0..self.pub_topics.len() as u32)
                            .filter(|&p| matches(f, &self.pub_topics[p as usize]))
                            .collect()
                    })
                    .clone()
            })
            .collect()
    }

    /// The group of each subscriber, if it is a member of one.
    pub fn group_of(&self) -> Vec<Option<u32>> {
        let mut g = vec![None; self.sub_filters.len()];
        for (k, members) in self.groups.iter().enumerate() {
            for &m in members {
                g[m as usize] = Some(k as u32);
            }
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_expand_index_and_client_id() {
        assert_eq!(expand("a/%i/%c/%%/%x", 7, "id"), "a/7/id/%/%x");
        assert_eq!(expand("%", 0, "id"), "%");
    }

    #[test]
    fn hears_matches_plain_wildcard_and_shared_filters() {
        let plan = Plan {
            pub_topics: vec!["b/0".into(), "b/1".into(), "c/0".into()],
            sub_filters: vec![
                "b/#".into(),
                "b/1".into(),
                "$share/g/+/0".into(),
                "nothing".into(),
            ],
            groups: vec![vec![2]],
            ..Plan::default()
        };
        assert_eq!(
            plan.hears(),
            vec![vec![0, 1], vec![1], vec![0, 2], Vec::<u32>::new()]
        );
        assert_eq!(plan.group_of(), vec![None, None, Some(0), None]);
    }
}
