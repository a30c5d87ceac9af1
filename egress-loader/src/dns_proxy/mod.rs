//! DNS proxy mode (SPEC section 5).
use anyhow::Result;

use crate::config::Config;

pub async fn run(_cfg: &Config) -> Result<()> {
    anyhow::bail!("dns-proxy mode is not implemented yet")
}
