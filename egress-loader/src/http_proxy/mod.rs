//! HTTP proxy mode (SPEC section 4).
use anyhow::Result;

use crate::{config::Config, resolver::ResolverOptions};

/// Settings of the HTTP proxy beyond the OpenShift contract.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct HttpProxyOptions {}

pub async fn run(
    _cfg: &Config,
    _opts: &HttpProxyOptions,
    _resolver: &ResolverOptions,
) -> Result<()> {
    anyhow::bail!("http-proxy mode is not implemented yet")
}
