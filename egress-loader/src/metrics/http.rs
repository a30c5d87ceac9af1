//! The HTTP proxy's metrics, counted where the proxy handles each request (`http_proxy::proxy`).
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::{ConnectError, Line, label_values};
use crate::config::HttpRule;

label_values! {
    /// Which kind of request.
    pub enum Kind {
        Forward => "forward",
        Connect => "connect",
    }
}

label_values! {
    /// What the rules said.
    pub enum Decision {
        Allowed => "allowed",
        Denied => "denied",
        /// Answered before the rules could decide (see request errors).
        Undecided => "undecided",
    }
}

label_values! {
    /// Why the proxy answered a request with an error of its own.
    pub enum RequestError {
        /// 400: not a request a forward proxy serves, or one hyper could not parse (400, 431).
        InvalidRequest => "invalid_request",
        /// 501: https:// without CONNECT.
        NotImplemented => "not_implemented",
        /// 508: the request already passed through an egress-router.
        Loop => "loop",
        /// 502, 504: the name did not resolve, or not in time.
        DnsFailure => "dns_failure",
        DnsTimeout => "dns_timeout",
        /// 502, 504: no admitted address accepted the connection (by reason: upstream connect
        /// errors).
        ConnectFailure => "connect_failure",
        ConnectTimeout => "connect_timeout",
        /// 502: the upstream connection broke before a response.
        UpstreamFailure => "upstream_failure",
        /// 504: no response headers within the idle timeout.
        UpstreamTimeout => "upstream_timeout",
    }
}

label_values! {
    /// Direction of proxied body and tunnel bytes.
    pub enum Direction {
        Upstream => "upstream",
        Downstream => "downstream",
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    kind: Kind,
    decision: Decision,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClassLabels {
    class: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LineLabels {
    line: Line,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    reason: RequestError,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConnectLabels {
    reason: ConnectError,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Latency buckets from 1 ms to about 16 s (doubling).
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every counter of the proxy; clones share them.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    responses: Family<ClassLabels, Counter>,
    denials: Family<LineLabels, Counter>,
    request_errors: Family<ErrorLabels, Counter>,
    connect_errors: Family<ConnectLabels, Counter>,
    pub active_connections: Gauge,
    pub active_tunnels: Gauge,
    /// Request bodies and tunnel bytes client to upstream; responses and tunnels back.
    pub bytes_upstream: Counter,
    pub bytes_downstream: Counter,
    bytes: Family<DirectionLabels, Counter>,
    connect_seconds: Histogram,
    response_seconds: Histogram,
}

impl HttpMetrics {
    /// The metrics for `rules`, every series created at zero (so that rates start at once),
    /// registered in `registry`.
    pub fn new(registry: &mut Registry, rules: &[HttpRule]) -> HttpMetrics {
        let bytes: Family<DirectionLabels, Counter> = Family::default();
        let m = HttpMetrics {
            requests: Family::default(),
            responses: Family::default(),
            denials: Family::default(),
            request_errors: Family::default(),
            connect_errors: Family::default(),
            active_connections: Gauge::default(),
            active_tunnels: Gauge::default(),
            bytes_upstream: bytes.get_or_create_owned(&DirectionLabels {
                direction: Direction::Upstream,
            }),
            bytes_downstream: bytes.get_or_create_owned(&DirectionLabels {
                direction: Direction::Downstream,
            }),
            bytes,
            connect_seconds: latency(),
            response_seconds: latency(),
        };
        for &kind in Kind::ALL {
            for &decision in Decision::ALL {
                m.requests
                    .get_or_create_owned(&RequestLabels { kind, decision });
            }
        }
        for class in CLASSES {
            m.responses.get_or_create_owned(&ClassLabels { class });
        }
        m.denials
            .get_or_create_owned(&LineLabels { line: Line(None) });
        for r in rules.iter().filter(|r| !r.allow) {
            m.denials.get_or_create_owned(&LineLabels {
                line: Line(Some(r.line)),
            });
        }
        for &reason in RequestError::ALL {
            m.request_errors
                .get_or_create_owned(&ErrorLabels { reason });
        }
        for &reason in ConnectError::ALL {
            m.connect_errors
                .get_or_create_owned(&ConnectLabels { reason });
        }
        m.register(registry, rules);
        m
    }

    fn register(&self, r: &mut Registry, rules: &[HttpRule]) {
        r.register(
            "http_requests",
            "Requests, by kind (forward: absolute-form HTTP, connect: CONNECT tunnels) and what \
             the rules decided",
            self.requests.clone(),
        );
        r.register(
            "http_responses",
            "Responses to clients (the upstream's or the proxy's own), by status class",
            self.responses.clone(),
        );
        r.register(
            "http_denials",
            "Requests denied (403), by the line of the rule that denied them (none: no rule \
             matched)",
            self.denials.clone(),
        );
        r.register(
            "http_request_errors",
            "Requests the proxy answered with an error of its own, by reason",
            self.request_errors.clone(),
        );
        r.register(
            "http_upstream_connect_errors",
            "Failed connection attempts to upstream addresses, by reason",
            self.connect_errors.clone(),
        );
        r.register(
            "http_active_connections",
            "Client connections open now",
            self.active_connections.clone(),
        );
        r.register(
            "http_active_tunnels",
            "CONNECT tunnels open now",
            self.active_tunnels.clone(),
        );
        r.register(
            "http_bytes",
            "Body and tunnel bytes proxied: upstream = client to server (tunnels counted when \
             they end)",
            self.bytes.clone(),
        );
        r.register(
            "http_upstream_connect_seconds",
            "Time to connect to an upstream address",
            self.connect_seconds.clone(),
        );
        r.register(
            "http_response_seconds",
            "Time from a request to its response headers (the tunnel's 200 for CONNECT)",
            self.response_seconds.clone(),
        );
        let allow = rules.iter().filter(|r| r.allow).count();
        super::register_rule_counts(
            r,
            &[("http_allow", allow), ("http_deny", rules.len() - allow)],
        );
    }

    /// One request answered: what the rules decided (`denied_by` for a 403: the line, None
    /// when no rule matched), its status, the error if the proxy made the answer, and the time
    /// it took.
    pub fn answered(
        &self,
        kind: Kind,
        decision: Decision,
        status: u16,
        error: Option<RequestError>,
        seconds: f64,
    ) {
        self.requests
            .get_or_create(&RequestLabels { kind, decision })
            .inc();
        if let Some(class) = CLASSES.get(usize::from(status / 100).wrapping_sub(1)) {
            self.responses.get_or_create(&ClassLabels { class }).inc();
        }
        if let Some(reason) = error {
            self.request_errors
                .get_or_create(&ErrorLabels { reason })
                .inc();
        }
        self.response_seconds.observe(seconds);
    }

    pub fn denied(&self, line: Option<usize>) {
        self.denials
            .get_or_create(&LineLabels { line: Line(line) })
            .inc();
    }

    /// A request hyper answered itself (400 or 431: it could not parse it).
    pub fn unparsable(&self) {
        self.responses
            .get_or_create(&ClassLabels { class: "4xx" })
            .inc();
        self.request_errors
            .get_or_create(&ErrorLabels {
                reason: RequestError::InvalidRequest,
            })
            .inc();
    }

    pub fn connected(&self, seconds: f64) {
        self.connect_seconds.observe(seconds);
    }

    pub fn connect_failed(&self, e: &std::io::Error) {
        self.connect_errors
            .get_or_create(&ConnectLabels {
                reason: super::connect_error_reason(e),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HttpMatch;

    fn rule(line: usize, allow: bool) -> HttpRule {
        HttpRule {
            allow,
            matcher: HttpMatch::Any,
            text: "*".into(),
            line,
        }
    }

    #[test]
    fn series_exist_from_the_start_and_count_what_happens() {
        let mut r = crate::metrics::registry(crate::metrics::Role::HttpProxy);
        let m = HttpMetrics::new(&mut r, &[rule(1, true), rule(3, false)]);
        let before = crate::metrics::encode(&r, "").0;
        for line in [
            "egress_router_http_requests_total{kind=\"connect\",decision=\"denied\"} 0",
            "egress_router_http_responses_total{class=\"5xx\"} 0",
            "egress_router_http_denials_total{line=\"3\"} 0",
            "egress_router_http_denials_total{line=\"none\"} 0",
            "egress_router_http_upstream_connect_errors_total{reason=\"unreachable\"} 0",
            "egress_router_http_request_errors_total{reason=\"loop\"} 0",
            "egress_router_http_bytes_total{direction=\"upstream\"} 0",
            "egress_router_http_active_tunnels 0",
            "egress_router_http_response_seconds_count 0",
            "egress_router_configured_rules{kind=\"http_allow\"} 1",
            "egress_router_configured_rules{kind=\"http_deny\"} 1",
        ] {
            assert!(
                before.lines().any(|l| l == line),
                "missing `{line}`:\n{before}"
            );
        }
        assert!(
            !before.contains("line=\"1\""),
            "an allow rule denies nothing"
        );

        m.answered(Kind::Forward, Decision::Allowed, 200, None, 0.003);
        m.answered(Kind::Forward, Decision::Denied, 403, None, 0.0001);
        m.denied(Some(3));
        m.answered(
            Kind::Connect,
            Decision::Allowed,
            502,
            Some(RequestError::ConnectFailure),
            0.01,
        );
        m.connect_failed(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        m.bytes_upstream.inc_by(5);
        let after = crate::metrics::encode(&r, "").0;
        for line in [
            "egress_router_http_requests_total{kind=\"forward\",decision=\"allowed\"} 1",
            "egress_router_http_requests_total{kind=\"forward\",decision=\"denied\"} 1",
            "egress_router_http_requests_total{kind=\"connect\",decision=\"allowed\"} 1",
            "egress_router_http_responses_total{class=\"2xx\"} 1",
            "egress_router_http_responses_total{class=\"4xx\"} 1",
            "egress_router_http_responses_total{class=\"5xx\"} 1",
            "egress_router_http_denials_total{line=\"3\"} 1",
            "egress_router_http_request_errors_total{reason=\"connect_failure\"} 1",
            "egress_router_http_upstream_connect_errors_total{reason=\"refused\"} 1",
            "egress_router_http_bytes_total{direction=\"upstream\"} 5",
            "egress_router_http_response_seconds_count 3",
            "egress_router_http_response_seconds_bucket{le=\"0.004\"} 2",
        ] {
            assert!(
                after.lines().any(|l| l == line),
                "missing `{line}`:\n{after}"
            );
        }
    }
}
