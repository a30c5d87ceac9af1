//! Redirect mode (init and legacy): interface setup, then the eBPF dataplane; and the exporter,
//! which serves the metrics of a dataplane that init mode left behind.
use anyhow::{Context as _, Result};
use egress_common::{PROG_ETH0_INGRESS, PROG_MACVLAN_INGRESS, Stats};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    config::{Config, Mode},
    dataplane::{Dataplane, DataplaneOptions, DataplaneSettings, status::StatusMaps},
    metrics::{
        self, Health, MetricsOptions, Role,
        redirect::{GcMetrics, RedirectCollector},
    },
    netsetup, shutdown,
};

pub fn run(cfg: &Config, opts: &DataplaneOptions, metrics_opts: &MetricsOptions) -> Result<()> {
    let redirect = cfg
        .redirect
        .as_ref()
        .context("redirect mode without EGRESS_DESTINATION")?;
    let eth0 = ifindex(&opts.cluster_interface)?;
    let macvlan = ifindex(&opts.macvlan_interface)?;
    // The metrics listener: legacy mode's own, or in init mode the exporter's. Its port on the
    // pod IP stays the router's even with a fallback.
    let metrics_addr = metrics_opts.address(|port| metrics::port_taken(cfg, None, port))?;
    // Everything that can fail on bad input is checked before anything is applied.
    let mut settings = DataplaneSettings::new(redirect, cfg.source.addr, eth0, macvlan, opts)?;
    settings.config.local_tcp_port = metrics_addr.map_or(0, |a| a.port());
    let preflight = Dataplane::preflight(opts, cfg.mode)?;
    if cfg.mode != Mode::Legacy {
        // Init mode keeps the default action of SIGTERM: it is short-lived.
        let _dp = set_up(cfg, opts, &settings, preflight)?;
        // The second gratuitous ARP goes out ~2 s after setup; do not leave before it.
        netsetup::wait_for_announcements();
        return Ok(());
    }
    // Legacy mode listens for SIGTERM from the start: one arriving during setup is handled
    // once setup is done, instead of killing the process half-way. The metrics listener
    // answers during setup too (not ready yet), from the runtime's worker thread.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (shutdown, gc, health) = {
        let _in_runtime = rt.enter();
        let shutdown = shutdown::on_signal()?;
        let mut registry = metrics::registry(Role::Legacy);
        registry.register_collector(Box::new(RedirectCollector::new(opts.clone())));
        let gc = GcMetrics::default();
        gc.register(&mut registry);
        let health = Health::new("the dataplane is not attached yet");
        metrics::listen(metrics_addr, registry, health.clone(), &shutdown)?;
        (shutdown, gc, health)
    };
    let dp = set_up(cfg, opts, &settings, preflight)?;
    let ready_opts = opts.clone();
    health.ready_when(move || metrics::redirect::ready(&ready_opts));
    rt.block_on(wait_for_sigterm(shutdown, dp, opts, gc));
    Ok(())
}

/// Sets up macvlan0 and forwarding, loads and configures the dataplane and attaches it (also the
/// CNI plugin's ADD, inside the pod's network namespace).
pub fn set_up(
    cfg: &Config,
    opts: &DataplaneOptions,
    settings: &DataplaneSettings,
    preflight: crate::dataplane::Preflight,
) -> Result<Dataplane> {
    netsetup::apply(cfg, &opts.macvlan_interface).context("setting up the macvlan interface")?;
    netsetup::enable_forwarding().context("enabling IPv4 forwarding")?;
    let mut dp = Dataplane::load(opts, preflight)?;
    dp.configure(settings)?;
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
    let redirect = cfg.redirect.as_ref().expect("checked by run");
    info!(
        rules = redirect.rules.len(),
        fallback = ?redirect.fallback,
        "redirect dataplane running"
    );
    Ok(dp)
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

/// How often legacy mode removes expired flows, and how often it and the exporter check for
/// new flows dropped for want of room.
const GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Legacy mode: stay until SIGTERM or SIGINT, collecting expired flows meanwhile and saying
/// when new flows were dropped for want of room. Leaving does not detach anything; whether the
/// dataplane outlives us depends on the plan (tcx links on a private bpffs do not), and the
/// last line says which.
async fn wait_for_sigterm(
    shutdown: CancellationToken,
    mut dp: Dataplane,
    opts: &DataplaneOptions,
    gc: GcMetrics,
) {
    let mut tick = tokio::time::interval(GC_INTERVAL);
    let mut room = RoomWatch::new(opts);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {
                gc.runs.inc();
                match dp.collect_garbage() {
                    Ok(0) => {}
                    Ok(n) => {
                        gc.removed.inc_by(n as u64);
                        tracing::debug!(entries = n, "expired flows removed");
                    }
                    Err(e) => {
                        gc.failures.inc();
                        warn!("flow garbage collection failed: {e:#}");
                    }
                }
                room.check(opts);
            }
        }
    }
    info!("signal received, exiting; {}", dp.plan.on_exit());
}

/// New flows dropped since the last tick for want of room: (connection table full, source
/// ports exhausted).
pub fn room_drops(before: &Stats, now: &Stats) -> (u64, u64) {
    (
        now.drop_table_full.saturating_sub(before.drop_table_full),
        now.drop_port_exhausted
            .saturating_sub(before.drop_port_exhausted),
    )
}

/// Says in the log when the dataplane dropped new flows for want of room (the connection table
/// full, the source ports exhausted), at most once per check: legacy mode checks at each
/// garbage collection, the exporter on its own timer of the same interval. The first reading
/// that succeeds is where counting starts; a check that cannot read the maps keeps the last.
pub struct RoomWatch {
    last: Option<Stats>,
}

impl RoomWatch {
    pub fn new(opts: &DataplaneOptions) -> RoomWatch {
        RoomWatch {
            last: StatusMaps::find(opts).and_then(|m| m.stats()).ok(),
        }
    }

    /// Reads the counters and logs what grew since the last check.
    pub fn check(&mut self, opts: &DataplaneOptions) {
        let maps = StatusMaps::find(opts).ok();
        let now = maps.as_ref().and_then(|m| m.stats().ok());
        if let (Some(before), Some(now), Some(maps)) = (&self.last, &now, &maps) {
            report_drops(before, now, maps);
        }
        self.last = now.or(self.last.take());
    }
}

fn report_drops(before: &Stats, now: &Stats, maps: &StatusMaps) {
    let (table_full, ports) = room_drops(before, now);
    if table_full > 0 {
        let (entries, new_entries) = maps
            .flow_keys()
            .map_or((0, 0), |(answered, new)| (answered.len(), new.len()));
        warn!(
            dropped = table_full,
            entries,
            new_entries,
            capacity = maps.flows_max(),
            "flow table full: new flows were dropped since the last check (raise \
             EGRESS_CONNTRACK_SIZE)"
        );
    }
    if ports > 0 {
        warn!(
            dropped = ports,
            "source ports exhausted: new flows to a busy destination were dropped since the \
             last check (widen EGRESS_PORT_RANGE)"
        );
    }
}

/// `egress-router exporter`: serves the metrics of the dataplane that init mode left behind,
/// until SIGTERM: found as `status` finds it (the pins, or our program attached to the cluster
/// interface), so it needs only to be able to read those maps. It logs new flows dropped for
/// want of room as legacy mode does.
pub fn exporter(opts: &DataplaneOptions, metrics_opts: &MetricsOptions) -> Result<()> {
    let addr = metrics_opts.address(|_| None)?.context(
        "the exporter serves metrics and nothing else: EGRESS_METRICS_ADDRESS cannot be off",
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let shutdown = shutdown::on_signal()?;
        let mut registry = metrics::registry(Role::Exporter);
        registry.register_collector(Box::new(RedirectCollector::new(opts.clone())));
        let health = Health::new("starting");
        let ready_opts = opts.clone();
        health.ready_when(move || metrics::redirect::ready(&ready_opts));
        metrics::listen(Some(addr), registry, health.clone(), &shutdown)?;
        let dir = crate::dataplane::pindir::resolve(opts.bpffs_dir.as_deref())?;
        let bpffs = dir.display();
        match health.check() {
            Ok(()) => info!(%bpffs, "exporting the redirect dataplane's metrics"),
            Err(why) => warn!(
                %bpffs,
                "exporting the redirect dataplane's metrics; not ready yet: {why}"
            ),
        }
        // Init mode's dataplane has no process of its own to say when it runs out of room.
        let watch_opts = opts.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(GC_INTERVAL);
            let mut room = RoomWatch::new(&watch_opts);
            loop {
                tick.tick().await;
                room.check(&watch_opts);
            }
        });
        shutdown.cancelled().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_for_want_of_room_are_the_counters_growth() {
        let before = Stats {
            drop_table_full: 5,
            drop_port_exhausted: 1,
            drop_malformed: 9,
            ..Default::default()
        };
        let now = Stats {
            drop_table_full: 7,
            drop_port_exhausted: 1,
            drop_malformed: 20,
            ..Default::default()
        };
        assert_eq!(room_drops(&before, &now), (2, 0));
        assert_eq!(
            room_drops(&now, &before),
            (0, 0),
            "maps replaced meanwhile: counters restarted"
        );
    }
}
