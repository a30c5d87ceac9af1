//! Configuration: the OpenShift environment contract (SPEC sections 2 to 5).
mod types;

pub use types::*;

use std::collections::BTreeMap;

// PLACEHOLDER until the parser lands: these three are the module's public API.
/// Parses and validates every variable; on error, every problem found.
pub fn parse(_vars: &BTreeMap<String, String>) -> Result<Config, ConfigErrors> {
    Err(ConfigErrors(vec![
        "configuration parser not written yet".into(),
    ]))
}

/// The configuration as parsed, one line per rule with its meaning.
pub fn describe(_cfg: &Config) -> String {
    String::new()
}

/// The nftables ruleset OpenShift would apply for this configuration (unit-test mode).
pub fn nft_ruleset(_cfg: &Config) -> String {
    String::new()
}

#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        Ok(())
    }
}
