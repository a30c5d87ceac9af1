//! DNS proxy mode (SPEC section 5).
use anyhow::Result;

use crate::{config::Config, resolver::ResolverOptions};

/// Settings of the DNS proxy beyond the OpenShift contract.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct DnsProxyOptions {}

pub async fn run(
    _cfg: &Config,
    _opts: &DnsProxyOptions,
    _resolver: &ResolverOptions,
) -> Result<()> {
    anyhow::bail!("dns-proxy mode is not implemented yet")
}
