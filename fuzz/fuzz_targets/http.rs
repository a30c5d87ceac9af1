//! EGRESS_HTTP_PROXY_DESTINATION: arbitrary text never panics the parser; what parses renders to
//! text that parses to the same rules; describing them never panics.
#![no_main]
use std::collections::BTreeMap;

use egress_router::config::{self, HttpRule};
use libfuzzer_sys::fuzz_target;

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
    if let Ok(rules) = config::parse_http(Some(&text)) {
        let rendered = config::render_http(&rules);
        let again = config::parse_http(Some(&rendered))
            .unwrap_or_else(|e| panic!("{rendered:?} from {text:?} does not parse: {e:?}"));
        assert_eq!(
            canonical(again),
            canonical(rules),
            "{text:?} -> {rendered:?}"
        );
    }
    let vars: BTreeMap<String, String> = [
        ("EGRESS_ROUTER_MODE", "http-proxy"),
        ("EGRESS_HTTP_PROXY_MODE", "unit-test"),
        ("EGRESS_HTTP_PROXY_DESTINATION", &*text),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    match config::parse(&vars) {
        Ok(cfg) => {
            let _ = config::describe(&cfg);
        }
        Err(e) => assert!(!e.0.is_empty()),
    }
});
