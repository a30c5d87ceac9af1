//! The two properties every rule language is fuzzed for, shared by the targets.
use std::{collections::BTreeMap, fmt::Debug};

use egress_router::config::{self, Config};

/// Text that parses renders to text that parses to the same rules (compared after `canonical`,
/// which clears what rendering does not keep, such as line numbers).
pub fn round_trip<R: PartialEq + Debug, E: Debug>(
    text: &str,
    parse: impl Fn(&str) -> Result<R, E>,
    render: impl Fn(&R) -> String,
    canonical: impl Fn(R) -> R,
) {
    if let Ok(rules) = parse(text) {
        let rendered = render(&rules);
        let again = parse(&rendered)
            .unwrap_or_else(|e| panic!("{rendered:?} from {text:?} does not parse: {e:?}"));
        assert_eq!(
            canonical(again),
            canonical(rules),
            "{text:?} -> {rendered:?}"
        );
    }
}

/// The whole environment parses to a configuration that `check` accepts without panicking, or
/// fails with at least one error.
pub fn environment(vars: &[(&str, &str)], check: impl Fn(&Config)) {
    let vars: BTreeMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match config::parse(&vars) {
        Ok(cfg) => {
            let _ = config::describe(&cfg);
            check(&cfg);
        }
        Err(e) => assert!(!e.0.is_empty()),
    }
}
