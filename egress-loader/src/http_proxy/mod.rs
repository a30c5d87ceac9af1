//! HTTP proxy mode (SPEC section 4).
use anyhow::Result;

use crate::config::Config;

pub async fn run(_cfg: &Config) -> Result<()> {
    anyhow::bail!("http-proxy mode is not implemented yet")
}
