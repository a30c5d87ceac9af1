//! EGRESS_DNS_PROXY_DESTINATION: arbitrary text never panics the parser; what parses renders to
//! text that parses to the same listeners; describing them never panics.
#![no_main]
use std::collections::BTreeMap;

use egress_router::config::{self, DnsRule};
use libfuzzer_sys::fuzz_target;

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
    if let Ok(rules) = config::parse_dns(Some(&text)) {
        let rendered = config::render_dns(&rules);
        let again = config::parse_dns(Some(&rendered))
            .unwrap_or_else(|e| panic!("{rendered:?} from {text:?} does not parse: {e:?}"));
        assert_eq!(
            without_lines(again),
            without_lines(rules),
            "{text:?} -> {rendered:?}"
        );
    }
    let vars: BTreeMap<String, String> = [
        ("EGRESS_ROUTER_MODE", "dns-proxy"),
        ("EGRESS_DNS_PROXY_MODE", "unit-test"),
        ("EGRESS_DNS_PROXY_DESTINATION", &*text),
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
