//! EGRESS_DNS_PROXY_DESTINATION: arbitrary text never panics the parser; what parses renders to
//! text that parses to the same listeners; describing them never panics.
#![no_main]
use egress_router::config::{self, DnsRule};
use libfuzzer_sys::fuzz_target;

mod common;

fn without_lines(rules: Vec<DnsRule>) -> Vec<DnsRule> {
    rules
        .into_iter()
        .map(|mut r| {
            r.line = 0;
            r
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    common::round_trip(
        &text,
        |t| config::parse_dns(Some(t)),
        |r| config::render_dns(r),
        without_lines,
    );
    common::environment(
        &[
            ("EGRESS_ROUTER_MODE", "dns-proxy"),
            ("EGRESS_DNS_PROXY_MODE", "unit-test"),
            ("EGRESS_DNS_PROXY_DESTINATION", &text),
        ],
        |_| {},
    );
});
