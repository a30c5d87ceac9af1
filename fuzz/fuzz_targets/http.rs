//! EGRESS_HTTP_PROXY_DESTINATION: arbitrary text never panics the parser; what parses renders to
//! text that parses to the same rules; describing them never panics.
#![no_main]
use egress_router::config::{self, HttpRule};
use libfuzzer_sys::fuzz_target;

mod common;

/// Line numbers and the text as written differ between the input and its rendering.
fn canonical(rules: Vec<HttpRule>) -> Vec<HttpRule> {
    rules
        .into_iter()
        .map(|mut r| {
            r.line = 0;
            r.text = r.rule_text();
            r
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    common::round_trip(
        &text,
        |t| config::parse_http(Some(t)),
        |r| config::render_http(r),
        canonical,
    );
    common::environment(
        &[
            ("EGRESS_ROUTER_MODE", "http-proxy"),
            ("EGRESS_HTTP_PROXY_MODE", "unit-test"),
            ("EGRESS_HTTP_PROXY_DESTINATION", &text),
        ],
        |_| {},
    );
});
