//! Redirect mode (init and legacy): interface setup, then the eBPF dataplane.
use anyhow::{Context as _, Result};
use egress_common::{PROG_ETH0_INGRESS, PROG_MACVLAN_INGRESS};
use tracing::{debug, info, warn};

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
    let preflight = Dataplane::preflight(opts, cfg.mode)?;
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
    let mut dp = Dataplane::load(opts, preflight)?;
    dp.configure(&settings)?;
    let mut replaced = false;
    for (prog, iface) in [
        (PROG_MACVLAN_INGRESS, opts.macvlan_interface.as_str()),
        (PROG_ETH0_INGRESS, opts.cluster_interface.as_str()),
    ] {
        let how = dp.attach(prog, iface)?;
        debug!(program = prog, interface = iface, attach = ?how, "attached");
        replaced |= how.replaced;
    }
    announce(&dp, replaced);
    info!(
        rules = redirect.rules.len(),
        fallback = ?redirect.fallback,
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

/// The one line saying how the dataplane is attached and what survives a restart.
fn announce(dp: &Dataplane, replaced: bool) {
    let plan = &dp.plan;
    let note = plan.restart_note();
    let (attach, bpffs, maps) = (plan.method.name(), plan.dir.display(), dp.state.as_str());
    if plan.outlives_process() {
        info!(attach, %bpffs, maps, replaced, "{note}");
    } else {
        warn!(attach, %bpffs, maps, replaced, "{note}");
    }
}

fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).with_context(|| format!("interface {name} not found"))
}

/// How often legacy mode removes expired flows.
const GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Legacy mode: stay until SIGTERM or SIGINT, collecting expired flows meanwhile. Leaving does
/// not detach anything; whether the dataplane outlives us depends on the plan (tcx links on a
/// private bpffs do not), and the last line says which.
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
        info!("signal received, exiting; {}", dp.plan.on_exit());
        Ok(())
    })
}
