//! What each EGRESS_ROUTER_MODE does with a validated configuration.
use anyhow::{Context as _, Result};

use crate::{
    cli::Cli,
    config::{self, Config, Mode},
    dns_proxy, http_proxy, netsetup, redirect,
};

pub fn run(cfg: &Config, cli: &Cli) -> Result<()> {
    let opts = &cli.dataplane;
    match cfg.mode {
        Mode::UnitTest => {
            print!("{}", config::nft_ruleset(cfg));
            Ok(())
        }
        Mode::HttpProxy | Mode::DnsProxy if cfg.proxy_unit_test => {
            print!("{}", config::describe(cfg));
            Ok(())
        }
        Mode::HttpProxy => {
            netsetup::apply(cfg, &opts.macvlan_interface)
                .context("setting up the macvlan interface")?;
            runtime()?.block_on(http_proxy::run(cfg, &cli.http, &cli.resolver))
        }
        Mode::DnsProxy => {
            netsetup::apply(cfg, &opts.macvlan_interface)
                .context("setting up the macvlan interface")?;
            runtime()?.block_on(dns_proxy::run(cfg, &cli.dns, &cli.resolver))
        }
        Mode::Init | Mode::Legacy => redirect::run(cfg, opts),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
