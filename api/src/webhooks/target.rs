//! Where a webhook may be sent (the defence against server-side request forgery): the URL
//! policy checked at registration and again before every attempt, and the resolution that
//! pins an attempt to the addresses it checked.
//!
//! A URL must be `https`, without user name or password, and its host must not be, or resolve
//! to, an internal address (private, loopback, link-local, CGNAT, multicast, documentation,
//! ...; IPv4 inside IPv6 is judged as the IPv4 address). The operator's allow list
//! (`--webhook-allow`) exempts a host by name, or an address by network; a URL whose host is
//! exempt may also use `http`. The check before an attempt resolves the name once and the
//! attempt connects to exactly those addresses, so a DNS answer that changes between the check
//! and the connection (rebinding) cannot reach an address the check did not see.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use reqwest::Url;

use crate::client_ip::Cidr;

/// The longest URL an endpoint may have, in characters.
pub const MAX_URL_CHARS: usize = 2048;

/// One entry of `--webhook-allow`: a host name, or an address or network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowEntry {
    /// A host name, lowercase, without a trailing dot.
    Host(String),
    Net(Cidr),
}

impl FromStr for AllowEntry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bare = s.trim_start_matches('[').trim_end_matches(']');
        if let Ok(net) = bare.parse::<Cidr>() {
            return Ok(Self::Net(net));
        }
        let host = s.trim_end_matches('.').to_ascii_lowercase();
        let valid = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if valid {
            Ok(Self::Host(host))
        } else {
            Err(format!("{s:?} is neither a host name nor an IP network"))
        }
    }
}

/// The operator's exemptions from the address policy.
#[derive(Debug, Clone, Default)]
pub struct AllowList(Vec<AllowEntry>);

impl AllowList {
    pub fn new(entries: Vec<AllowEntry>) -> Self {
        Self(entries)
    }

    /// Whether `host` is exempt.
    fn host(&self, host: &UrlHost) -> bool {
        match host {
            UrlHost::Name(name) => {
                let name = name.trim_end_matches('.');
                self.0
                    .iter()
                    .any(|e| matches!(e, AllowEntry::Host(h) if h.eq_ignore_ascii_case(name)))
            }
            UrlHost::Ip(ip) => self.ip(*ip),
        }
    }

    fn ip(&self, ip: IpAddr) -> bool {
        self.0
            .iter()
            .any(|e| matches!(e, AllowEntry::Net(net) if net.contains(ip)))
    }
}

/// A URL's host: an IP literal, or a name as [`Url`] normalizes it (lowercase, IDNA; the
/// numeric spellings of IPv4 such as `2130706433` or `0x7f.1` already turned into addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
enum UrlHost {
    Ip(IpAddr),
    Name(String),
}

impl UrlHost {
    fn of(url: &Url) -> Option<Self> {
        let host = url.host_str().filter(|h| !h.is_empty())?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        Some(match bare.parse::<IpAddr>() {
            Ok(ip) => Self::Ip(ip),
            Err(_) => Self::Name(host.to_string()),
        })
    }
}

impl fmt::Display for UrlHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// An address range webhooks may not reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forbidden {
    /// `private`, `loopback`, `link-local`, ...
    pub range: &'static str,
    /// How an IPv4 address was carried in an IPv6 one (`IPv4-mapped`, `NAT64`, `6to4`).
    pub via: Option<&'static str>,
}

impl fmt::Display for Forbidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.via {
            Some(via) => write!(f, "{via} {}", self.range),
            None => f.write_str(self.range),
        }
    }
}

/// IPv4 ranges that are not the public internet (RFC 6890 and successors). Broadcast comes
/// before the reserved block that contains it, so it is named as such.
const V4: &[([u8; 4], u8, &str)] = &[
    ([0, 0, 0, 0], 32, "unspecified"),
    ([0, 0, 0, 0], 8, "\"this network\""),
    ([10, 0, 0, 0], 8, "private"),
    ([100, 64, 0, 0], 10, "shared (CGNAT)"),
    ([127, 0, 0, 0], 8, "loopback"),
    ([169, 254, 0, 0], 16, "link-local"),
    ([172, 16, 0, 0], 12, "private"),
    ([192, 0, 0, 0], 24, "IETF protocol assignment"),
    ([192, 0, 2, 0], 24, "documentation"),
    ([192, 168, 0, 0], 16, "private"),
    ([198, 18, 0, 0], 15, "benchmarking"),
    ([198, 51, 100, 0], 24, "documentation"),
    ([203, 0, 113, 0], 24, "documentation"),
    ([224, 0, 0, 0], 4, "multicast"),
    ([255, 255, 255, 255], 32, "broadcast"),
    ([240, 0, 0, 0], 4, "reserved"),
];

/// IPv6 ranges that are not the public internet; those that carry an IPv4 address are judged
/// by it instead ([`embedded_v4`]).
const V6: &[(u128, u8, &str)] = &[
    (0, 128, "unspecified"),
    (1, 128, "loopback"),
    (0, 96, "IPv4-compatible (deprecated)"),
    (0x0064_ff9b_0001 << 80, 48, "NAT64 local-use"),
    (0x0100 << 112, 64, "discard-only"),
    (0x2001_0db8 << 96, 32, "documentation"),
    (0xfc00 << 112, 7, "unique local (private)"),
    (0xfe80 << 112, 10, "link-local"),
    (0xfec0 << 112, 10, "site-local (deprecated)"),
    (0xff00 << 112, 8, "multicast"),
];

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from_be_bytes(net) & mask
}

fn in_v6(ip: Ipv6Addr, net: u128, prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    u128::from(ip) & mask == net & mask
}

/// The IPv4 address an IPv6 one carries, and how: IPv4-mapped (`::ffff:a.b.c.d`), NAT64
/// (`64:ff9b::a.b.c.d`) or 6to4 (`2002:aabb:ccdd::/48`).
fn embedded_v4(ip: Ipv6Addr) -> Option<(Ipv4Addr, &'static str)> {
    let bits = u128::from(ip);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some((v4, "IPv4-mapped"));
    }
    if in_v6(ip, 0x0064_ff9b << 96, 96) {
        return Some((Ipv4Addr::from(bits as u32), "NAT64"));
    }
    if in_v6(ip, 0x2002 << 112, 16) {
        return Some((Ipv4Addr::from((bits >> 80) as u32), "6to4"));
    }
    None
}

/// The forbidden range `ip` is in, if any.
pub fn forbidden(ip: IpAddr) -> Option<Forbidden> {
    let v4 = |ip: Ipv4Addr| {
        V4.iter()
            .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
            .map(|(_, _, range)| *range)
    };
    match ip {
        IpAddr::V4(ip) => v4(ip).map(|range| Forbidden { range, via: None }),
        IpAddr::V6(ip) => match embedded_v4(ip) {
            Some((inner, via)) => v4(inner).map(|range| Forbidden {
                range,
                via: Some(via),
            }),
            None => V6
                .iter()
                .find(|(net, prefix, _)| in_v6(ip, *net, *prefix))
                .map(|&(_, _, range)| Forbidden { range, via: None }),
        },
    }
}

/// Why a URL may not be called.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the URL is longer than {MAX_URL_CHARS} characters")]
    TooLong,
    #[error("not a valid URL: {0}")]
    Malformed(String),
    #[error(
        "the scheme must be https (http only for a host on the operator's allow list), not {0}"
    )]
    Scheme(String),
    #[error("the URL must start with https:// (or http://), in lowercase")]
    Spelling,
    #[error("the URL must not carry a user name or password")]
    Userinfo,
    #[error("the URL has no host")]
    NoHost,
    #[error("the host {host} is a {range} address")]
    Address { host: String, range: Forbidden },
    #[error("the host {host} resolves to {addr}, a {range} address")]
    Resolves {
        host: String,
        addr: IpAddr,
        range: Forbidden,
    },
}

/// A URL that passed the policy.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: Url,
    /// Whether the operator exempted the host: its addresses are not checked.
    exempt: bool,
}

/// Checks a URL against the policy without resolving its host (registration, and the first
/// step before every attempt, so a narrowed allow list applies to endpoints already stored).
pub fn check_url(raw: &str, allow: &AllowList) -> Result<Target, Refusal> {
    if raw.chars().count() > MAX_URL_CHARS {
        return Err(Refusal::TooLong);
    }
    let url = Url::parse(raw).map_err(|e| Refusal::Malformed(e.to_string()))?;
    let host = UrlHost::of(&url).ok_or(Refusal::NoHost)?;
    let exempt = allow.host(&host);
    match url.scheme() {
        "https" => {}
        "http" if exempt => {}
        other => return Err(Refusal::Scheme(other.to_string())),
    }
    // The parser also takes `HTTPS://`, `https:host` or leading blanks; the stored URL is the
    // one the admin wrote, so it is held to the documented form (`^https?://`).
    if !raw.starts_with(&format!("{}://", url.scheme())) {
        return Err(Refusal::Spelling);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refusal::Userinfo);
    }
    if !exempt {
        let literal = match &host {
            UrlHost::Ip(ip) => Some(*ip),
            // Names that mean this machine without asking DNS (RFC 6761).
            UrlHost::Name(name) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                (name == "localhost" || name.ends_with(".localhost"))
                    .then_some(IpAddr::V4(Ipv4Addr::LOCALHOST))
            }
        };
        if let Some(range) = literal.and_then(forbidden) {
            return Err(Refusal::Address {
                host: host.to_string(),
                range,
            });
        }
    }
    Ok(Target { url, exempt })
}

/// Why an attempt could not be sent to any address.
#[derive(Debug, thiserror::Error)]
pub enum Unreachable {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("cannot resolve {host}: {reason}")]
    Lookup { host: String, reason: String },
}

/// The addresses one attempt may connect to: the host resolved once, every address checked
/// (one forbidden address refuses the whole URL: which one a client would pick is not ours to
/// guess). An IP literal is its own address.
pub async fn resolve(target: &Target, allow: &AllowList) -> Result<Vec<SocketAddr>, Unreachable> {
    let url = &target.url;
    let port = url.port_or_known_default().unwrap_or(443);
    let host = match UrlHost::of(url) {
        Some(UrlHost::Ip(ip)) => return Ok(vec![SocketAddr::new(ip, port)]),
        Some(UrlHost::Name(name)) => name,
        None => return Err(Refusal::NoHost.into()),
    };
    let lookup_failed = |reason: String| Unreachable::Lookup {
        host: host.to_string(),
        reason,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| lookup_failed(e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(lookup_failed("no addresses".to_string()));
    }
    if !target.exempt {
        for addr in &addrs {
            let ip = addr.ip();
            if let Some(range) = forbidden(ip).filter(|_| !allow.ip(ip)) {
                return Err(Refusal::Resolves {
                    host: host.to_string(),
                    addr: ip,
                    range,
                }
                .into());
            }
        }
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests;
