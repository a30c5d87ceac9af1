//! Matching requests against EGRESS_HTTP_PROXY_DESTINATION: pure, no I/O.
//!
//! # Semantics
//!
//! Rules are checked in order and the first rule that matches decides. What "matches" depends on
//! the kind of rule and on the destination:
//!
//! - A **name rule** (`example.com`, `*.example.com`) matches a destination given as a host name,
//!   compared without regard to ASCII case and without a trailing dot. `*.example.com` matches
//!   `example.com` itself and every name that ends in `.example.com`. Name rules never match an
//!   IP literal.
//! - An **address rule** (`192.168.1.1`, `192.168.1.0/24`, `fe80::/10`) matches an IP literal in
//!   the request, or, for a host name, each address the name resolves to.
//! - `*` matches everything (names and addresses) without resolving anything.
//!
//! A destination that no rule matches is denied.
//!
//! For a host name the decision is made per resolved address: an address passes when the first
//! rule that matches *the name or that address* allows it. Consequences:
//!
//! - If a name rule (or `*`) matching the name comes before every address rule, it decides alone,
//!   before any DNS lookup: a deny is answered without resolving, an allow lets every resolved
//!   address pass.
//! - Address rules placed before the first matching name rule are checked against each resolved
//!   address; an address that none of them matches gets the verdict of that name rule (or, if
//!   no name rule matches, is denied).
//! - When a name resolves to several addresses and only some pass, the proxy connects only to
//!   the ones that pass; when none passes, the request is denied, and the reason given is the
//!   verdict for the first address.
//!
//! So `!10.0.0.0/8` followed by `*.example.com` admits `www.example.com` unless it resolves
//! into 10/8, while `*.example.com` followed by `!10.0.0.0/8` admits it wherever it resolves.
use std::{fmt, net::IpAddr};

use ipnet::IpNet;

use crate::config::{HttpMatch, HttpRule};

/// The rules, compiled once at start.
#[derive(Clone, Debug)]
pub struct RuleSet {
    rules: Box<[Rule]>,
}

/// One compiled rule.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Position in the rule list, 1-based.
    pub number: usize,
    /// Line in EGRESS_HTTP_PROXY_DESTINATION.
    pub line: usize,
    pub allow: bool,
    /// The line as written.
    pub text: Box<str>,
    matcher: Matcher,
}

#[derive(Clone, Debug)]
enum Matcher {
    /// Lowercase, no trailing dot.
    Host(Box<str>),
    /// The apex, lowercase, no trailing dot.
    Domain(Box<str>),
    Net(IpNet),
    Any,
}

/// What the rules say about a destination.
#[derive(Clone, Copy, Debug)]
pub enum Verdict<'r> {
    Allow(&'r Rule),
    Deny(&'r Rule),
    /// No rule matched: denied.
    NoRule,
}

impl<'r> Verdict<'r> {
    fn of(rule: &'r Rule) -> Self {
        if rule.allow {
            Verdict::Allow(rule)
        } else {
            Verdict::Deny(rule)
        }
    }

    pub fn allowed(&self) -> bool {
        matches!(self, Verdict::Allow(_))
    }

    /// The rule that decided, if any.
    pub fn rule(&self) -> Option<&'r Rule> {
        match *self {
            Verdict::Allow(r) | Verdict::Deny(r) => Some(r),
            Verdict::NoRule => None,
        }
    }
}

impl Rule {
    /// The network of an address rule; None for a name rule or `*`.
    pub fn net(&self) -> Option<&IpNet> {
        match &self.matcher {
            Matcher::Net(n) => Some(n),
            _ => None,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rule {} (line {}): {}",
            self.number, self.line, self.text
        )
    }
}

/// The result of checking a host name.
#[derive(Clone, Copy, Debug)]
pub enum NameCheck<'r> {
    /// Decided by the name alone; no address rule comes first.
    Decided(Verdict<'r>),
    /// Address rules come first: resolve the name and check each address.
    ByAddress(AddressCheck<'r>),
}

/// The per-address part of a name check.
#[derive(Clone, Copy, Debug)]
pub struct AddressCheck<'r> {
    /// The rules before the first one that matches the name (only their address rules apply).
    before: &'r [Rule],
    /// The verdict of the first rule that matches the name, for addresses `before` misses.
    otherwise: Verdict<'r>,
}

impl<'r> AddressCheck<'r> {
    /// The verdict for the name resolving to `ip`.
    pub fn check(&self, ip: IpAddr) -> Verdict<'r> {
        first_net_match(self.before, ip).unwrap_or(self.otherwise)
    }
}

fn first_net_match(rules: &[Rule], ip: IpAddr) -> Option<Verdict<'_>> {
    rules.iter().find_map(|r| match &r.matcher {
        Matcher::Net(net) if net_contains(net, ip) => Some(Verdict::of(r)),
        Matcher::Any => Some(Verdict::of(r)),
        _ => None,
    })
}

/// `IpNet::contains`, also matching IPv4-mapped IPv6 addresses against IPv4 rules.
fn net_contains(net: &IpNet, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpNet::V4(n), IpAddr::V6(v6)) => v6.to_ipv4_mapped().is_some_and(|v4| n.contains(&v4)),
        _ => net.contains(&ip),
    }
}

/// `name` without one trailing dot (`example.com.` is the absolute form of `example.com`).
pub fn strip_root(name: &str) -> &str {
    name.strip_suffix('.').unwrap_or(name)
}

fn name_matches(matcher: &Matcher, name: &str) -> bool {
    match matcher {
        Matcher::Host(h) => name.eq_ignore_ascii_case(h),
        Matcher::Domain(d) => {
            let (n, d) = (name.as_bytes(), d.as_bytes());
            if n.len() == d.len() {
                n.eq_ignore_ascii_case(d)
            } else {
                n.len() > d.len()
                    && n[n.len() - d.len() - 1] == b'.'
                    && n[n.len() - d.len()..].eq_ignore_ascii_case(d)
            }
        }
        Matcher::Any => true,
        Matcher::Net(_) => false,
    }
}

impl RuleSet {
    pub fn new(rules: &[HttpRule]) -> Self {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, r)| Rule {
                number: i + 1,
                line: r.line,
                allow: r.allow,
                text: r.text.as_str().into(),
                matcher: match &r.matcher {
                    HttpMatch::Host(h) => Matcher::Host(normalize(h)),
                    HttpMatch::Domain(d) => {
                        let d = d.strip_prefix("*.").unwrap_or(d);
                        Matcher::Domain(normalize(d))
                    }
                    HttpMatch::Net(n) => Matcher::Net(n.trunc()),
                    HttpMatch::Any => Matcher::Any,
                },
            })
            .collect();
        RuleSet { rules }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The verdict for an IP literal destination.
    pub fn check_ip(&self, ip: IpAddr) -> Verdict<'_> {
        first_net_match(&self.rules, ip).unwrap_or(Verdict::NoRule)
    }

    /// Checks a host name (any case, with or without a trailing dot).
    pub fn check_name(&self, name: &str) -> NameCheck<'_> {
        let name = strip_root(name);
        let first = self
            .rules
            .iter()
            .position(|r| name_matches(&r.matcher, name));
        let (before, otherwise) = match first {
            Some(i) => (&self.rules[..i], Verdict::of(&self.rules[i])),
            None => (&self.rules[..], Verdict::NoRule),
        };
        if before.iter().any(|r| matches!(r.matcher, Matcher::Net(_))) {
            NameCheck::ByAddress(AddressCheck { before, otherwise })
        } else {
            NameCheck::Decided(otherwise)
        }
    }
}

fn normalize(name: &str) -> Box<str> {
    strip_root(name.trim()).to_ascii_lowercase().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(line: usize, text: &str) -> HttpRule {
        let (allow, m) = match text.strip_prefix('!') {
            Some(rest) => (false, rest),
            None => (true, text),
        };
        let matcher = if m == "*" {
            HttpMatch::Any
        } else if let Some(d) = m.strip_prefix("*.") {
            HttpMatch::Domain(d.to_string())
        } else if let Ok(n) = m.parse::<IpNet>() {
            HttpMatch::Net(n)
        } else if let Ok(ip) = m.parse::<IpAddr>() {
            HttpMatch::Net(IpNet::from(ip))
        } else {
            HttpMatch::Host(m.to_string())
        };
        HttpRule {
            allow,
            matcher,
            text: text.to_string(),
            line,
        }
    }

    fn set(lines: &[&str]) -> RuleSet {
        let rules: Vec<_> = lines
            .iter()
            .enumerate()
            .map(|(i, t)| rule(i + 1, t))
            .collect();
        RuleSet::new(&rules)
    }

    fn decided(s: &RuleSet, name: &str) -> (bool, Option<usize>) {
        match s.check_name(name) {
            NameCheck::Decided(v) => (v.allowed(), v.rule().map(|r| r.number)),
            NameCheck::ByAddress(_) => panic!("{name}: expected a decision without resolving"),
        }
    }

    fn by_addr(s: &RuleSet, name: &str, ip: &str) -> (bool, Option<usize>) {
        match s.check_name(name) {
            NameCheck::ByAddress(a) => {
                let v = a.check(ip.parse().unwrap());
                (v.allowed(), v.rule().map(|r| r.number))
            }
            NameCheck::Decided(_) => panic!("{name}: expected a per-address check"),
        }
    }

    #[test]
    fn exact_host_any_case_and_trailing_dot() {
        let s = set(&["www.example.com"]);
        assert_eq!(decided(&s, "www.example.com"), (true, Some(1)));
        assert_eq!(decided(&s, "WWW.Example.COM."), (true, Some(1)));
        assert_eq!(decided(&s, "example.com"), (false, None));
        assert_eq!(decided(&s, "a.www.example.com"), (false, None));
        assert_eq!(decided(&s, "www.example.com.evil"), (false, None));
    }

    #[test]
    fn wildcard_matches_apex_and_subdomains_only() {
        let s = set(&["*.example.com"]);
        assert_eq!(decided(&s, "example.com"), (true, Some(1)));
        assert_eq!(decided(&s, "a.example.com"), (true, Some(1)));
        assert_eq!(decided(&s, "a.b.EXAMPLE.com."), (true, Some(1)));
        assert_eq!(decided(&s, "badexample.com"), (false, None));
        assert_eq!(decided(&s, "example.com.evil"), (false, None));
        assert_eq!(decided(&s, "com"), (false, None));
    }

    #[test]
    fn first_match_wins() {
        let s = set(&["!bad.example.com", "*.example.com"]);
        assert_eq!(decided(&s, "bad.example.com"), (false, Some(1)));
        assert_eq!(decided(&s, "good.example.com"), (true, Some(2)));
        let s = set(&["*.example.com", "!bad.example.com"]);
        assert_eq!(decided(&s, "bad.example.com"), (true, Some(1)));
    }

    #[test]
    fn any_and_negated_any() {
        let s = set(&["!*.internal", "*"]);
        assert_eq!(decided(&s, "x.internal"), (false, Some(1)));
        assert_eq!(decided(&s, "example.org"), (true, Some(2)));
        assert!(s.check_ip("10.1.2.3".parse().unwrap()).allowed());
        let s = set(&["example.org", "!*"]);
        assert_eq!(decided(&s, "example.net"), (false, Some(2)));
    }

    #[test]
    fn ip_literals_match_only_address_rules() {
        let s = set(&[
            "10.0.0.0/8",
            "!192.168.1.1",
            "192.168.0.0/16",
            "*.example.com",
        ]);
        let v = |ip: &str| {
            let v = s.check_ip(ip.parse().unwrap());
            (v.allowed(), v.rule().map(|r| r.number))
        };
        assert_eq!(v("10.9.8.7"), (true, Some(1)));
        assert_eq!(v("192.168.1.1"), (false, Some(2)));
        assert_eq!(v("192.168.1.2"), (true, Some(3)));
        assert_eq!(v("172.16.0.1"), (false, None));
        assert_eq!(v("::ffff:10.1.1.1"), (true, Some(1)));
    }

    #[test]
    fn ipv6_rules() {
        let s = set(&["fe80::/10", "!2001:db8::1", "2001:db8::/32"]);
        assert!(s.check_ip("fe80::1".parse().unwrap()).allowed());
        assert!(!s.check_ip("2001:db8::1".parse().unwrap()).allowed());
        assert!(s.check_ip("2001:db8::2".parse().unwrap()).allowed());
        assert!(!s.check_ip("10.0.0.1".parse().unwrap()).allowed());
    }

    #[test]
    fn name_rule_before_address_rules_decides_without_resolving() {
        let s = set(&["*.example.com", "!10.0.0.0/8"]);
        assert_eq!(decided(&s, "a.example.com"), (true, Some(1)));
        // An unmatched name must still be checked against the address rules.
        assert_eq!(by_addr(&s, "other.org", "10.1.1.1"), (false, Some(2)));
        assert_eq!(by_addr(&s, "other.org", "192.0.2.1"), (false, None));
    }

    #[test]
    fn address_rule_before_name_rule_checks_each_address() {
        let s = set(&["!10.0.0.0/8", "*.example.com", "192.0.2.0/24"]);
        assert_eq!(by_addr(&s, "a.example.com", "10.1.1.1"), (false, Some(1)));
        assert_eq!(by_addr(&s, "a.example.com", "203.0.113.9"), (true, Some(2)));
        // Rule 3 comes after the name rule, so it never applies to a.example.com.
        assert_eq!(by_addr(&s, "a.example.com", "192.0.2.1"), (true, Some(2)));
        // A name no name rule matches: all address rules apply.
        assert_eq!(by_addr(&s, "other.org", "192.0.2.1"), (true, Some(3)));
        assert_eq!(by_addr(&s, "other.org", "10.0.0.1"), (false, Some(1)));
        assert_eq!(by_addr(&s, "other.org", "198.51.100.1"), (false, None));
    }

    #[test]
    fn no_rules_denies() {
        let s = set(&[]);
        assert_eq!(decided(&s, "example.com"), (false, None));
        assert!(!s.check_ip("127.0.0.1".parse().unwrap()).allowed());
    }

    #[test]
    fn rule_display_names_number_line_and_text() {
        let s = set(&["a.example", "b.example", "!*.example.com"]);
        assert_eq!(s.rules()[2].to_string(), "rule 3 (line 3): !*.example.com");
    }
}
