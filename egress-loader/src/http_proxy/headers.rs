//! Header rewriting between client and upstream (RFC 9110 7.6): hop-by-hop fields removed, a Via
//! added.
use hyper::{
    HeaderMap, Version,
    header::{
        CONNECTION, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
        TRANSFER_ENCODING, UPGRADE, VIA,
    },
};

/// Fields that describe one connection and are never forwarded, whether or not `Connection`
/// names them.
static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Removes the hop-by-hop fields: those listed above and those that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // The common case (no Connection header, or only `close` / `keep-alive`) allocates nothing.
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',') {
            let token = token.trim();
            if token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || token.eq_ignore_ascii_case("keep-alive")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
    }
    for name in &named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends this proxy to Via: `1.1 egress-router` (the protocol version it received, and a
/// pseudonym as RFC 9110 7.6.3 allows).
pub fn add_via(headers: &mut HeaderMap, received: Version) {
    let value = match received {
        Version::HTTP_10 => HeaderValue::from_static("1.0 egress-router"),
        _ => HeaderValue::from_static("1.1 egress-router"),
    };
    headers.append(VIA, value);
}

/// Whether the request already passed through an egress-router (a Via element received by
/// `egress-router`): forwarding it again would be a loop.
pub fn passed_through_us(headers: &HeaderMap) -> bool {
    headers.get_all(VIA).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|element| element.split_whitespace().nth(1) == Some("egress-router"))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_listed_and_named_fields() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, X-Foo"),
            ("connection", "x-bar"),
            ("x-foo", "1"),
            ("x-bar", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic eDp5"),
            ("proxy-authenticate", "Basic"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-keep", "yes"),
            ("content-length", "3"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-length", "x-keep"]);
    }

    #[test]
    fn via_is_appended() {
        let mut h = HeaderMap::new();
        h.insert(VIA, HeaderValue::from_static("1.1 other"));
        add_via(&mut h, Version::HTTP_10);
        let v: Vec<_> = h.get_all(VIA).iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(v, ["1.1 other", "1.0 egress-router"]);
        assert!(passed_through_us(&h));
    }

    #[test]
    fn loop_detection_reads_received_by_only() {
        let mut h = HeaderMap::new();
        assert!(!passed_through_us(&h));
        h.insert(
            VIA,
            HeaderValue::from_static("1.1 a (egress-router), HTTP/1.1 b"),
        );
        assert!(!passed_through_us(&h));
        h.append(
            VIA,
            HeaderValue::from_static("1.0 x, 1.1 egress-router (y)"),
        );
        assert!(passed_through_us(&h));
    }
}
