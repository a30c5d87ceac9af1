//! macvlan0 setup (SPEC section 2).
use anyhow::Result;

use crate::config::Config;

pub fn apply(_cfg: &Config, _macvlan: &str) -> Result<()> {
    anyhow::bail!("interface setup is not implemented yet")
}

pub fn enable_forwarding() -> Result<()> {
    anyhow::bail!("not implemented yet")
}
