//! Redirect mode (init and legacy): interface setup, then the eBPF dataplane.
use anyhow::{Context as _, Result};
use egress_common::{PROG_ETH0_INGRESS, PROG_MACVLAN_INGRESS};
use tracing::info;

use crate::{
    config::{Config, Mode},
    dataplane::{Dataplane, DataplaneOptions, DataplaneSettings},
    netsetup,
};

pub fn run(cfg: &Config, opts: &DataplaneOptions) -> Result<()> {
    let redirect = cfg
        .redirect
        .as_ref()
        .context("redirect mode without EGRESS_DESTINATION")?;
    let eth0 = ifindex(&opts.cluster_interface)?;
    let macvlan = ifindex(&opts.macvlan_interface)?;
    // Everything that can fail on bad input is checked before anything is applied.
    let settings = DataplaneSettings::new(redirect, cfg.source.addr, eth0, macvlan, opts)?;
    Dataplane::preflight(opts)?;
    // Legacy mode listens for SIGTERM from the start: one arriving during setup is handled
    // once setup is done, instead of killing the process half-way.
    // (Init mode keeps the default action: it is short-lived.)
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let term = if cfg.mode == Mode::Legacy {
        let _in_runtime = rt.enter();
        Some(tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        )?)
    } else {
        None
    };
    netsetup::apply(cfg, &opts.macvlan_interface).context("setting up the macvlan interface")?;
    netsetup::enable_forwarding().context("enabling IPv4 forwarding")?;
    let mut dp = Dataplane::load(opts)?;
    dp.configure(&settings)?;
    for (prog, iface) in [
        (PROG_MACVLAN_INGRESS, opts.macvlan_interface.as_str()),
        (PROG_ETH0_INGRESS, opts.cluster_interface.as_str()),
    ] {
        let how = dp.attach(prog, iface, opts)?;
        info!(program = prog, interface = iface, attach = ?how, "attached");
    }
    info!(
        rules = redirect.rules.len(),
        fallback = ?redirect.fallback,
        bpffs = %dp.dir.display(),
        "redirect dataplane running"
    );
    match term {
        Some(term) => wait_for_sigterm(rt, term, dp),
        None => {
            // The second gratuitous ARP goes out ~2 s after setup; do not leave before it.
            netsetup::wait_for_announcements();
            Ok(())
        }
    }
}

fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).with_context(|| format!("interface {name} not found"))
}

/// How often legacy mode removes expired flows.
const GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Legacy mode: stay until SIGTERM or SIGINT, collecting expired flows meanwhile. Leaving does
/// not detach anything: live connections keep flowing.
fn wait_for_sigterm(
    rt: tokio::runtime::Runtime,
    mut term: tokio::signal::unix::Signal,
    mut dp: Dataplane,
) -> Result<()> {
    rt.block_on(async {
        let mut gc = tokio::time::interval(GC_INTERVAL);
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = gc.tick() => match dp.collect_garbage() {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(entries = n, "expired flows removed"),
                    Err(e) => tracing::warn!("flow garbage collection failed: {e:#}"),
                },
            }
        }
        info!("signal received, exiting; the dataplane stays attached");
        Ok(())
    })
}
