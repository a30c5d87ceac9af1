//! What the three rule languages share: splitting a variable into rule lines, and the strict
//! parsers for ports, addresses and host names with messages that say what is wrong.
use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// The OpenShift range message, kept word for word.
pub fn invalid_port_message(text: &str) -> String {
    format!(
        "Invalid port: {}, must be in the range 1 to 65535",
        show(text)
    )
}

/// One rule line of a multi-line variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleLine<'a> {
    /// 1-based line number in the variable (blank and comment lines count).
    pub number: usize,
    /// The rule: surrounding whitespace, a trailing `\r` and a trailing `# comment` removed.
    pub text: &'a str,
}

impl RuleLine<'_> {
    /// The fields of the rule, separated by spaces or tabs.
    pub fn fields(&self) -> Vec<&str> {
        self.text.split_ascii_whitespace().collect()
    }
}

/// The rule lines of a variable: lines are split on `\n` (a `\r` before it is dropped), blank
/// lines and lines whose first non-blank character is `#` are skipped, and a `#` that starts a
/// field (at the start or after a space or tab) starts a trailing comment.
pub fn rule_lines(value: &str) -> impl Iterator<Item = RuleLine<'_>> {
    value.split('\n').enumerate().filter_map(|(i, line)| {
        let text = strip_comment(line).trim_matches(|c: char| c.is_ascii_whitespace());
        (!text.is_empty()).then_some(RuleLine {
            number: i + 1,
            text,
        })
    })
}

fn strip_comment(line: &str) -> &str {
    let mut prev_blank = true;
    for (i, c) in line.char_indices() {
        if c == '#' && prev_blank {
            return &line[..i];
        }
        prev_blank = c.is_ascii_whitespace();
    }
    line
}

/// Text quoted in a message: control characters escaped so a message stays on one line.
pub fn show(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Why a port field was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortError {
    /// Digits, but 0 or above 65535: the OpenShift `Invalid port` message applies.
    Range,
    /// Anything else; the text says what.
    Syntax(String),
}

/// A decimal port 1..=65535. Leading zeros are refused: the shells and tools OpenShift handed
/// ports to read `010` as octal 8, so its meaning there was not the decimal one.
pub fn parse_port(text: &str) -> Result<u16, PortError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortError::Syntax(format!(
            "'{}' is not a port number",
            show(text)
        )));
    }
    if text.len() > 1 && text.starts_with('0') {
        return Err(PortError::Syntax(format!(
            "port '{}' has a leading zero, which is ambiguous (octal or decimal); write it without",
            show(text)
        )));
    }
    match text.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(PortError::Range),
    }
}

/// A prefix length `0..=max`, decimal without leading zeros.
pub fn parse_prefix_len(text: &str, max: u8) -> Result<u8, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("'/{}' is not a prefix length", show(text)));
    }
    if text.len() > 1 && text.starts_with('0') {
        return Err(format!(
            "prefix length '/{}' has a leading zero, which is ambiguous (octal or decimal)",
            show(text)
        ));
    }
    match text.parse::<u32>() {
        Ok(n) if n <= u32::from(max) => Ok(n as u8),
        _ => Err(format!(
            "prefix length /{} is greater than {max}",
            show(text)
        )),
    }
}

/// True when `text` is made of digits and dots only: it can only be meant as an IPv4 address.
pub fn looks_like_ipv4(text: &str) -> bool {
    !text.is_empty() && text.contains('.') && text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// A dotted-quad IPv4 address, strictly: four decimal octets 0..=255, no leading zeros (which
/// tools disagree on: `010` is 10 for some and 8 for others).
pub fn parse_ipv4(text: &str) -> Result<Ipv4Addr, String> {
    if let Ok(a) = text.parse::<Ipv4Addr>() {
        return Ok(a);
    }
    let parts: Vec<&str> = text.split('.').collect();
    let leading_zero = parts.len() == 4
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        && parts
            .iter()
            .all(|p| p.parse::<u16>().is_ok_and(|n| n <= 255))
        && parts.iter().any(|p| p.len() > 1 && p.starts_with('0'));
    if leading_zero {
        Err(format!(
            "{} is not an IPv4 address: leading zeros are ambiguous (octal or decimal)",
            show(text)
        ))
    } else {
        Err(format!("{} is not an IPv4 address", show(text)))
    }
}

/// An IPv4 or IPv6 address; IPv4 as strict as [`parse_ipv4`].
pub fn parse_ip(text: &str) -> Result<IpAddr, String> {
    if text.contains(':') {
        return text
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| format!("{} is not an IPv6 address", show(text)));
    }
    parse_ipv4(text).map(IpAddr::V4)
}

/// Why an address cannot be somewhere traffic is sent to (None when it can).
pub fn unusable_target(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V6(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(a) if a.is_multicast() => Some("a multicast address"),
        _ => None,
    }
}

/// A host name: letters, digits, `-` and `_` in dot-separated labels of 1 to 63 characters, 253
/// characters at most. Returned lowercase, without a trailing dot. A name whose last label is all
/// digits is no host name (top-level domains are not numeric): it was meant as an IPv4 address.
pub fn parse_host_name(text: &str) -> Result<String, String> {
    let name = text.strip_suffix('.').unwrap_or(text);
    if name.is_empty() {
        return Err(format!("'{}' is not a host name", show(text)));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.'))
    {
        let why = if c.is_ascii() {
            format!("the character '{}' is not allowed", c.escape_default())
        } else {
            "non-ASCII characters are not allowed: write an internationalized name in its \
             ASCII form (xn--...)"
                .to_string()
        };
        return Err(format!("'{}' is not a host name: {why}", show(text)));
    }
    if name.split('.').any(str::is_empty) {
        return Err(format!(
            "'{}' is not a host name: it has an empty label",
            show(text)
        ));
    }
    if let Some(l) = name.split('.').find(|l| l.len() > 63) {
        return Err(format!(
            "'{}' is not a host name: the label '{l}' is longer than 63 characters",
            show(text)
        ));
    }
    if name.len() > 253 {
        return Err(format!(
            "'{}...' is not a host name: longer than 253 characters",
            show(&name[..40])
        ));
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        if looks_like_ipv4(name) {
            return Err(parse_ipv4(name).err().unwrap_or_else(|| {
                // A valid address written with a trailing dot.
                format!("{} is not an IPv4 address", show(text))
            }));
        }
        return Err(format!(
            "'{}' is not a host name: its last label '{last}' is all digits",
            show(text)
        ));
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_skip_blank_and_comments_and_number_from_one() {
        let v = "\r\n# c\n  80 tcp 1.2.3.4  # web\r\n\t\n\t 1.2.3.5\t\n";
        let got: Vec<_> = rule_lines(v).map(|l| (l.number, l.text)).collect();
        assert_eq!(got, vec![(3, "80 tcp 1.2.3.4"), (5, "1.2.3.5")]);
    }

    #[test]
    fn hash_inside_a_field_is_not_a_comment() {
        let got: Vec<_> = rule_lines("a#b # c").map(|l| l.text).collect();
        assert_eq!(got, vec!["a#b"]);
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("1"), Ok(1));
        assert_eq!(parse_port("65535"), Ok(65535));
        assert_eq!(parse_port("0"), Err(PortError::Range));
        assert_eq!(parse_port("65536"), Err(PortError::Range));
        assert_eq!(parse_port("99999999999999999999"), Err(PortError::Range));
        assert!(
            matches!(parse_port("080"), Err(PortError::Syntax(m)) if m.contains("leading zero"))
        );
        assert!(matches!(parse_port("+80"), Err(PortError::Syntax(_))));
        assert!(matches!(parse_port("８０"), Err(PortError::Syntax(_))));
    }

    #[test]
    fn ipv4() {
        assert_eq!(parse_ipv4("10.0.0.1"), Ok(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            parse_ipv4("10.0.0.300").unwrap_err(),
            "10.0.0.300 is not an IPv4 address"
        );
        assert!(
            parse_ipv4("010.0.0.1")
                .unwrap_err()
                .contains("leading zeros")
        );
        assert!(parse_ipv4("1.2.3").is_err());
        assert!(parse_ipv4("1.2.3.4.5").is_err());
    }

    #[test]
    fn host_names() {
        assert_eq!(
            parse_host_name("WWW.Example.COM."),
            Ok("www.example.com".into())
        );
        assert_eq!(parse_host_name("a_b-c"), Ok("a_b-c".into()));
        assert!(parse_host_name("a..b").unwrap_err().contains("empty label"));
        assert!(
            parse_host_name("1.2.3.300")
                .unwrap_err()
                .contains("not an IPv4")
        );
        assert!(
            parse_host_name("foo.123")
                .unwrap_err()
                .contains("all digits")
        );
        assert!(parse_host_name("exämple.com").unwrap_err().contains("xn--"));
        assert!(parse_host_name(&"a".repeat(64)).unwrap_err().contains("63"));
        let long = vec!["abcdefghi"; 30].join(".");
        assert!(parse_host_name(&long).unwrap_err().contains("253"));
    }
}
