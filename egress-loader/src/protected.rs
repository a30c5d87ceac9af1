//! Destinations the proxies never reach unless a rule names them: the router pod's loopback,
//! link-local addresses (169.254.169.254 is the cloud metadata service), the unspecified
//! address (which connects to the pod itself) and the pod's own addresses.
//!
//! An allow-all rule (`*`) or a name rule is meant for the outside world: without this, `*` would
//! hand every client of the proxy whatever listens on the router pod's loopback, and a name that
//! resolves to 127.0.0.1 would do the same under any name rule. A rule names such an address
//! when it is an address rule no wider than the range the address is protected as: `127.0.0.1`
//! or `127.0.0.0/8` for loopback, `169.254.169.254` for the metadata service, the address itself
//! (`/32`, `/128`) for one of the pod's own. `0.0.0.0/0` does not.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

/// Why an address is protected, and the range that a rule must fit in to name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protection {
    pub what: &'static str,
    pub range: IpNet,
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what)
    }
}

/// The protected ranges and the pod's own addresses, found once at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Protected {
    own: Vec<IpAddr>,
    /// Nothing is protected: for in-process tests whose servers are on loopback.
    none: bool,
}

/// The ranges every router protects, most specific first. Built at compile time: `check` runs
/// for every request the HTTP proxy forwards.
const RANGES: [(&str, IpNet); 7] = [
    ("the cloud metadata service", v4(169, 254, 169, 254, 32)),
    ("the router pod's loopback", v4(127, 0, 0, 0, 8)),
    ("the router pod's loopback", v6(Ipv6Addr::LOCALHOST, 128)),
    ("a link-local address", v4(169, 254, 0, 0, 16)),
    (
        "a link-local address",
        v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    ),
    (
        "the unspecified address (the router pod itself)",
        v4(0, 0, 0, 0, 8),
    ),
    (
        "the unspecified address (the router pod itself)",
        v6(Ipv6Addr::UNSPECIFIED, 128),
    ),
];

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> IpNet {
    IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), prefix)
}

const fn v6(ip: Ipv6Addr, prefix: u8) -> IpNet {
    IpNet::new_assert(IpAddr::V6(ip), prefix)
}

impl Protected {
    /// With the addresses of every interface of this network namespace as the pod's own.
    pub fn of_this_namespace() -> std::io::Result<Protected> {
        let own = nix::ifaddrs::getifaddrs()?
            .filter_map(|a| {
                let a = a.address?;
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            })
            .collect();
        Ok(Protected::with_own(own))
    }

    pub fn with_own(own: Vec<IpAddr>) -> Protected {
        Protected {
            own: own.into_iter().map(canonical).collect(),
            none: false,
        }
    }

    /// Protects nothing. Only for tests that run the proxies in process with their servers on
    /// loopback; the command line cannot ask for it.
    pub fn nothing() -> Protected {
        Protected {
            own: Vec::new(),
            none: true,
        }
    }

    /// Why `ip` is protected, if it is.
    pub fn check(&self, ip: IpAddr) -> Option<Protection> {
        if self.none {
            return None;
        }
        let ip = canonical(ip);
        let range = RANGES
            .iter()
            .find_map(|&(what, range)| range.contains(&ip).then_some(Protection { what, range }));
        range.or_else(|| {
            self.own.contains(&ip).then(|| Protection {
                what: "one of the router pod's own addresses",
                range: IpNet::from(ip),
            })
        })
    }

    /// Whether `ip` may be reached when `rule` (an address rule's network, or None for a name
    /// rule or `*`) is what allowed it: Err says why not.
    pub fn admits(&self, ip: IpAddr, rule: Option<&IpNet>) -> Result<(), Protection> {
        match self.check(ip) {
            None => Ok(()),
            Some(p) if rule.is_some_and(|n| names(n, &p.range)) => Ok(()),
            Some(p) => Err(p),
        }
    }
}

/// Whether an address rule `net` is no wider than `range` (so it names what is in it).
fn names(net: &IpNet, range: &IpNet) -> bool {
    match (canonical_net(net), range) {
        (IpNet::V4(n), IpNet::V4(r)) => n.prefix_len() >= r.prefix_len() && r.contains(&n),
        (IpNet::V6(n), IpNet::V6(r)) => n.prefix_len() >= r.prefix_len() && r.contains(&n),
        _ => false,
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is the IPv4 address it maps: connecting
/// to one reaches the other.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn canonical_net(net: &IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.network().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), n.prefix_len() - 96).unwrap_or(*net),
            None => *net,
        },
        _ => *net,
    }
}

/// The 403 text for a protected address that a rule allowed without naming it.
pub fn refusal(host: &str, ip: IpAddr, p: &Protection, allowed_by: &dyn fmt::Display) -> String {
    let dest = if host == ip.to_string() {
        format!("{ip} is {p}")
    } else {
        format!("{host} resolves to {ip}, {p}")
    };
    format!(
        "{dest}: the proxy reaches it only through an address rule that names it (such as {}), \
         not through {allowed_by}",
        p.range
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_link_local_unspecified_and_own_addresses_are_protected() {
        let p = Protected::with_own(vec![ip("192.168.12.99"), ip("10.128.0.5")]);
        for a in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "::ffff:127.0.0.1",
            "169.254.169.254",
            "169.254.1.1",
            "fe80::1",
            "0.0.0.0",
            "::",
            "192.168.12.99",
            "::ffff:10.128.0.5",
        ] {
            assert!(p.check(ip(a)).is_some(), "{a}");
        }
        for a in ["192.168.12.98", "203.0.113.25", "2001:db8::1", "10.128.0.6"] {
            assert!(p.check(ip(a)).is_none(), "{a}");
        }
        assert_eq!(
            p.check(ip("169.254.169.254")).unwrap().what,
            "the cloud metadata service"
        );
    }

    #[test]
    fn only_an_address_rule_inside_the_range_names_it() {
        let p = Protected::with_own(vec![ip("192.168.12.99")]);
        let lo = ip("127.0.0.1");
        assert!(p.admits(lo, None).is_err(), "* or a name rule");
        assert!(p.admits(lo, Some(&net("0.0.0.0/0"))).is_err());
        assert!(p.admits(lo, Some(&net("126.0.0.0/7"))).is_err());
        assert!(p.admits(lo, Some(&net("127.0.0.0/8"))).is_ok());
        assert!(p.admits(lo, Some(&net("127.0.0.1/32"))).is_ok());
        assert!(p.admits(lo, Some(&net("::ffff:127.0.0.1/128"))).is_ok());
        let md = ip("169.254.169.254");
        assert!(p.admits(md, Some(&net("169.254.0.0/16"))).is_err());
        assert!(p.admits(md, Some(&net("169.254.169.254/32"))).is_ok());
        let own = ip("192.168.12.99");
        assert!(p.admits(own, Some(&net("192.168.12.0/24"))).is_err());
        assert!(p.admits(own, Some(&net("192.168.12.99/32"))).is_ok());
        assert!(p.admits(ip("203.0.113.25"), None).is_ok());
    }

    #[test]
    fn the_refusal_says_what_and_how_to_allow_it() {
        let p = Protected::default();
        let lo = ip("127.0.0.1");
        let why = p.admits(lo, None).unwrap_err();
        assert_eq!(
            refusal("127.0.0.1", lo, &why, &"rule 1 (line 1): *"),
            "127.0.0.1 is the router pod's loopback: the proxy reaches it only through an address \
             rule that names it (such as 127.0.0.0/8), not through rule 1 (line 1): *"
        );
        assert!(
            refusal("web.test", lo, &why, &"x").starts_with("web.test resolves to 127.0.0.1, ")
        );
    }
}
