//! Configuration: the OpenShift environment contract (SPEC sections 2 to 5).
//!
//! [`parse`] is pure (no environment, no IO): it reads the variables from a map, validates all of
//! them, and returns either the typed [`Config`] or every problem found, one message each, naming
//! the variable, the line, the offending text and the expected form.
mod describe;
mod dns;
mod http;
mod lines;
mod nft;
mod redirect;
mod render;
mod source;
mod types;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use dns::parse_dns;
pub use http::parse_http;
pub use nft::nft_script;
pub use redirect::parse_redirect;
pub use render::{render, render_dns, render_http, render_redirect};
pub use source::{parse_gateway, parse_source};
pub use types::*;

use std::collections::BTreeMap;

/// Parses and validates every variable; on error, every problem found.
pub fn parse(vars: &BTreeMap<String, String>) -> Result<Config, ConfigErrors> {
    source::parse_vars(vars)
}

/// The configuration as parsed, one line per rule with its meaning.
pub fn describe(cfg: &Config) -> String {
    describe::describe(cfg)
}

/// The nftables ruleset OpenShift would apply for this configuration (unit-test mode).
pub fn nft_ruleset(cfg: &Config) -> String {
    nft::nft_ruleset(cfg)
}

/// Every problem found in the environment, one message each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    /// One message a line (no newline after the last, so `eprintln!` ends it).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}
