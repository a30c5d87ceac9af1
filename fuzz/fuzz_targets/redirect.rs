//! EGRESS_DESTINATION: arbitrary text never panics the parser; what parses renders to text that
//! parses to the same rules; the whole environment with it parses, describes and renders to
//! nftables without panicking.
#![no_main]
use egress_router::config::{self, RedirectConfig};
use libfuzzer_sys::fuzz_target;

mod common;

fn without_lines(mut r: RedirectConfig) -> RedirectConfig {
    r.rules.iter_mut().for_each(|r| r.line = 0);
    r
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    common::round_trip(
        &text,
        |t| config::parse_redirect(Some(t)),
        |r| config::render_redirect(r),
        without_lines,
    );
    common::environment(
        &[
            ("EGRESS_ROUTER_MODE", "unit-test"),
            ("EGRESS_SOURCE", "192.168.12.99/24"),
            ("EGRESS_GATEWAY", "192.168.12.1"),
            ("EGRESS_DESTINATION", &text),
        ],
        |cfg| {
            let _ = config::nft_ruleset(cfg);
            assert_eq!(
                config::parse(&config::render(cfg)).map(|c| c.mode),
                Ok(cfg.mode)
            );
        },
    );
});
