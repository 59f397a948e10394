//! The ban list file: one ban per line, `clientid ID`, `username NAME` or
//! `ip ADDR[/PREFIX]` (IPv4 or IPv6, a CIDR block or one address). Managed
//! with `brokerctl ban add|delete|list FILE`, reloaded like the other files.
//! An IP ban refuses the connection before its CONNECT is read; the others
//! refuse the CONNECT (MQTT 5 0x8A Banned, 3.1.1 return code 5).

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Most bans one file may hold (IP bans are checked by a linear walk).
pub const BANS_MAX: usize = 100_000;

/// One ban.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ban {
    /// A ClientID.
    ClientId(String),
    /// A user name.
    Username(String),
    /// An address block.
    Ip(IpAddr, u8),
}

impl Ban {
    fn ip_matches(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
        match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            (IpAddr::V4(_), IpAddr::V6(a)) => a
                .to_ipv4_mapped()
                .is_some_and(|a| Ban::ip_matches(net, prefix, IpAddr::V4(a))),
            (IpAddr::V6(_), IpAddr::V4(_)) => false,
        }
    }
}

impl fmt::Display for Ban {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ban::ClientId(c) => write!(f, "clientid {c}"),
            Ban::Username(u) => write!(f, "username {u}"),
            Ban::Ip(ip, p) => write!(f, "ip {ip}/{p}"),
        }
    }
}

impl FromStr for Ban {
    type Err = String;

    fn from_str(line: &str) -> Result<Ban, String> {
        let (kind, value) = line
            .trim()
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("cannot read {line:?}: expected KIND VALUE"))?;
        let value = value.trim();
        if value.is_empty() {
            return Err(format!("{kind}: empty value"));
        }
        match kind {
            "clientid" => Ok(Ban::ClientId(value.to_owned())),
            "username" => Ok(Ban::Username(value.to_owned())),
            "ip" => {
                let (addr, prefix) = match value.split_once('/') {
                    Some((a, p)) => (a, Some(p)),
                    None => (value, None),
                };
                let ip: IpAddr = addr
                    .parse()
                    .map_err(|_| format!("ip {value:?}: not an IP address"))?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let prefix = match prefix {
                    None => max,
                    Some(p) => p
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= max)
                        .ok_or_else(|| format!("ip {value:?}: prefix must be 0 to {max}"))?,
                };
                Ok(Ban::Ip(ip, prefix))
            }
            other => Err(format!(
                "unknown ban kind {other:?}: use clientid, username or ip"
            )),
        }
    }
}

/// The bans in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BanList {
    bans: BTreeSet<Ban>,
}

impl BanList {
    /// Parses a ban file; errors name the line.
    pub fn parse(text: &str) -> Result<BanList, String> {
        let mut bans = BTreeSet::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let ban = line.parse().map_err(|e| format!("line {}: {e}", i + 1))?;
            if bans.len() >= BANS_MAX {
                return Err(format!("line {}: more than {BANS_MAX} bans", i + 1));
            }
            bans.insert(ban);
        }
        Ok(BanList { bans })
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        self.bans.iter().map(|b| format!("{b}\n")).collect()
    }

    /// Adds a ban; false if it was there.
    pub fn add(&mut self, ban: Ban) -> bool {
        self.bans.insert(ban)
    }

    /// Removes a ban; false if it was not there.
    pub fn remove(&mut self, ban: &Ban) -> bool {
        self.bans.remove(ban)
    }

    /// The bans, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &Ban> {
        self.bans.iter()
    }

    /// Whether the address is banned.
    pub fn ip_banned(&self, ip: IpAddr) -> bool {
        self.bans
            .iter()
            .any(|b| matches!(b, Ban::Ip(net, p) if Ban::ip_matches(*net, *p, ip)))
    }

    /// Whether the ClientID or the user name is banned.
    pub fn client_banned(&self, client_id: &str, username: Option<&str>) -> bool {
        self.bans.contains(&Ban::ClientId(client_id.to_owned()))
            || username.is_some_and(|u| self.bans.contains(&Ban::Username(u.to_owned())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_match_ids_names_and_address_blocks() {
        let list = BanList::parse(
            "# bans\nclientid evil\nusername mallory\nip 10.1.0.0/16\nip ::1\nip 192.0.2.7\n",
        )
        .unwrap();
        assert!(list.client_banned("evil", None));
        assert!(list.client_banned("x", Some("mallory")));
        assert!(!list.client_banned("x", Some("alice")));
        assert!(list.ip_banned("10.1.200.3".parse().unwrap()));
        assert!(!list.ip_banned("10.2.0.1".parse().unwrap()));
        assert!(list.ip_banned("::1".parse().unwrap()));
        assert!(list.ip_banned("::ffff:192.0.2.7".parse().unwrap()));
        assert!(!list.ip_banned("127.0.0.1".parse().unwrap()));
        let back = BanList::parse(&list.to_text()).unwrap();
        assert_eq!(back, list);
    }

    #[test]
    fn bad_lines_name_the_line() {
        for (text, what) in [
            ("clientid", "expected KIND VALUE"),
            ("ip 300.1.1.1", "not an IP"),
            ("ip 10.0.0.0/33", "prefix"),
            ("host x", "unknown ban kind"),
        ] {
            let e = BanList::parse(&format!("\n{text}")).unwrap_err();
            assert!(e.starts_with("line 2:") && e.contains(what), "{text}: {e}");
        }
    }
}
