//! Where a request goes: the host and port of an absolute-form or CONNECT request target. Pure.
use std::net::IpAddr;

use hyper::{Uri, http::uri::Scheme};

use super::rules::strip_root;

/// A destination host: an IP literal or a host name (as written, trailing dot removed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

/// A request's destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub host: Host<'a>,
    pub port: u16,
    /// `host[:port]` as in the request, without user info: the Host header to send upstream.
    pub authority: &'a str,
}

/// Why a request target cannot be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetError {
    /// 400: not something a forward proxy can serve.
    Bad(&'static str),
    /// 501: well-formed, but not supported.
    Unsupported(&'static str),
}

/// The destination of a non-CONNECT request, which must be in absolute form `http://host[:port]/...`.
pub fn http_target(uri: &Uri) -> Result<Target<'_>, TargetError> {
    let Some(authority) = uri.authority() else {
        return Err(TargetError::Bad(
            "this is a forward proxy: the request target must be an absolute URI \
             (http://host/path), not a path",
        ));
    };
    match uri.scheme() {
        Some(s) if *s == Scheme::HTTP => {}
        Some(s) if *s == Scheme::HTTPS => {
            return Err(TargetError::Unsupported(
                "https:// URIs are not proxied; use CONNECT host:443",
            ));
        }
        _ => return Err(TargetError::Bad("only http:// URIs are proxied")),
    }
    let port = authority.port_u16().unwrap_or(80);
    target(authority.as_str(), authority.host(), port)
}

/// The destination of a CONNECT request: `host:port`.
pub fn connect_target(uri: &Uri) -> Result<Target<'_>, TargetError> {
    let Some(authority) = uri.authority() else {
        return Err(TargetError::Bad("CONNECT needs a host:port target"));
    };
    let Some(port) = authority.port_u16() else {
        return Err(TargetError::Bad("CONNECT needs a host:port target"));
    };
    target(authority.as_str(), authority.host(), port)
}

fn target<'a>(authority: &'a str, host: &'a str, port: u16) -> Result<Target<'a>, TargetError> {
    if port == 0 {
        return Err(TargetError::Bad("port 0 is not a destination"));
    }
    // Strip user info: `user:pass@host:port`.
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = parse_host(host).ok_or(TargetError::Bad("invalid host in the request target"))?;
    Ok(Target {
        host,
        port,
        authority,
    })
}

/// An IP literal (IPv6 in brackets) or a DNS name of letters, digits, `-`, `_` and dots.
pub fn parse_host(host: &str) -> Option<Host<'_>> {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse().ok().map(Host::Ip);
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(Host::Ip(ip));
    }
    let name = strip_root(host);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then_some(Host::Name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(s: &str) -> Result<Target<'static>, TargetError> {
        let uri: &'static Uri = Box::leak(Box::new(s.parse().unwrap()));
        http_target(uri)
    }

    fn connect(s: &str) -> Result<Target<'static>, TargetError> {
        let uri: &'static Uri = Box::leak(Box::new(s.parse().unwrap()));
        connect_target(uri)
    }

    #[test]
    fn absolute_form() {
        let t = http("http://Example.COM./a?b").unwrap();
        assert_eq!(t.host, Host::Name("Example.COM"));
        assert_eq!((t.port, t.authority), (80, "Example.COM."));
        let t = http("http://user:pw@192.0.2.1:8080/").unwrap();
        assert_eq!(t.host, Host::Ip("192.0.2.1".parse().unwrap()));
        assert_eq!((t.port, t.authority), (8080, "192.0.2.1:8080"));
        let t = http("http://[2001:db8::1]:81/").unwrap();
        assert_eq!(t.host, Host::Ip("2001:db8::1".parse().unwrap()));
        assert_eq!(t.authority, "[2001:db8::1]:81");
    }

    #[test]
    fn rejected_targets() {
        assert!(matches!(http("/index.html"), Err(TargetError::Bad(_))));
        assert!(matches!(
            http("https://example.com/"),
            Err(TargetError::Unsupported(_))
        ));
        assert!(matches!(
            http("ftp://example.com/"),
            Err(TargetError::Bad(_))
        ));
        assert!(matches!(
            http("http://example.com:0/"),
            Err(TargetError::Bad(_))
        ));
        assert!(matches!(http("http://a..b/"), Err(TargetError::Bad(_))));
        assert!(matches!(http("http://a!b/"), Err(TargetError::Bad(_))));
    }

    #[test]
    fn connect_form() {
        let t = connect("example.com:443").unwrap();
        assert_eq!((t.host, t.port), (Host::Name("example.com"), 443));
        let t = connect("[::1]:8443").unwrap();
        assert_eq!(t.host, Host::Ip("::1".parse().unwrap()));
        assert!(matches!(connect("example.com"), Err(TargetError::Bad(_))));
    }
}
