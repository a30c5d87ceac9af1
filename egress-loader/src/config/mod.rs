//! Configuration: the OpenShift environment contract (SPEC sections 2 to 5).
//!
//! [`parse`] is pure (no environment, no IO): it reads the variables from a map, validates all of
//! them, and returns either the typed [`Config`] or every problem found, one message each, naming
//! the variable, the line, the offending text and the expected form.
pub mod cni;
mod describe;
mod dns;
pub mod egressrouter;
mod http;
mod lines;
mod openshift;
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
pub use openshift::{
    haproxy_cfg, nft_script, openshift_config, resolv_conf_nameservers, squid_acls, squid_conf,
    unit_test_output,
};
pub use redirect::{parse_redirect, parse_redirect_at};
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
    openshift::nft_ruleset(cfg)
}

/// One problem in the environment: our message (the variable, the line, the offending text
/// and what was expected) and, where OpenShift's images had a message for it, that message
/// word for word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub message: String,
    pub openshift: Option<String>,
}

impl ConfigError {
    pub fn new(message: impl Into<String>, openshift: impl Into<String>) -> ConfigError {
        ConfigError {
            message: message.into(),
            openshift: Some(openshift.into()),
        }
    }

    /// A problem OpenShift's images did not check for (they accepted the input).
    pub fn ours(message: impl Into<String>) -> ConfigError {
        ConfigError {
            message: message.into(),
            openshift: None,
        }
    }
}

impl From<&str> for ConfigError {
    fn from(message: &str) -> ConfigError {
        ConfigError::ours(message)
    }
}

/// The message, so that a ConfigError reads as the text it says.
impl std::ops::Deref for ConfigError {
    type Target = str;
    fn deref(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Every problem found in the environment, one message each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    /// One message a line, then OpenShift's own message for the first problem, where it had
    /// one, as the last line: runbooks and OpenShift's tests match the last line exactly. No
    /// newline after the last line, so `eprintln!` ends it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let messages: Vec<&str> = self.0.iter().map(|e| e.message.as_str()).collect();
        f.write_str(&messages.join("\n"))?;
        match self.0.first().and_then(|e| e.openshift.as_deref()) {
            Some(line) if messages.last() != Some(&line) => write!(f, "\n{line}"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for ConfigErrors {}
