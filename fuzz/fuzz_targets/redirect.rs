//! EGRESS_DESTINATION: arbitrary text never panics the parser; what parses renders to text that
//! parses to the same rules; the whole environment with it parses, describes and renders to
//! nftables without panicking.
#![no_main]
use std::collections::BTreeMap;

use egress_router::config::{self, RedirectConfig};
use libfuzzer_sys::fuzz_target;

fn without_lines(mut r: RedirectConfig) -> RedirectConfig {
    r.rules.iter_mut().for_each(|r| r.line = 0);
    r
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(r) = config::parse_redirect(Some(&text)) {
        let rendered = config::render_redirect(&r);
        let again = config::parse_redirect(Some(&rendered))
            .unwrap_or_else(|e| panic!("{rendered:?} from {text:?} does not parse: {e:?}"));
        assert_eq!(
            without_lines(again),
            without_lines(r),
            "{text:?} -> {rendered:?}"
        );
    }
    let vars: BTreeMap<String, String> = [
        ("EGRESS_ROUTER_MODE", "unit-test"),
        ("EGRESS_SOURCE", "192.168.12.99/24"),
        ("EGRESS_GATEWAY", "192.168.12.1"),
        ("EGRESS_DESTINATION", &*text),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    match config::parse(&vars) {
        Ok(cfg) => {
            let _ = config::describe(&cfg);
            let _ = config::nft_ruleset(&cfg);
            assert_eq!(
                config::parse(&config::render(&cfg)).map(|c| c.mode),
                Ok(cfg.mode)
            );
        }
        Err(e) => assert!(!e.0.is_empty()),
    }
});
