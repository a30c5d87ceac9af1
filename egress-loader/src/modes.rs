//! What each role and EGRESS_ROUTER_MODE does with a validated configuration (SPEC section 9:
//! the binary is each container of OpenShift's pod specs, by the environment it is given).
use anyhow::{Context as _, Result, bail};
use tracing::info;

use crate::{
    cli::Cli,
    config::{self, Config, EgressSource, Mode, Role},
    dns_proxy, http_proxy, netsetup, redirect,
    resolver::ResolverOptions,
    workers::Workers,
};

pub fn run(cfg: &Config, cli: &Cli) -> Result<()> {
    let opts = &cli.dataplane;
    if cfg.mode == Mode::UnitTest || cfg.proxy_unit_test {
        print!(
            "{}",
            config::unit_test_output(cfg, &pod_nameservers(&cli.resolver))
        );
        return Ok(());
    }
    // The startup summary: what this process is and every rule it applies, in one line: the
    // lines of `egress-router check` joined by "; " (one string field, in JSON too).
    let summary = config::describe(cfg).lines().collect::<Vec<_>>().join("; ");
    info!(
        version = env!("CARGO_PKG_VERSION"),
        role = ?cfg.role,
        mode = %cfg.mode,
        config = %summary,
        "egress-router starting"
    );
    match (cfg.role, cfg.mode) {
        (_, Mode::Init | Mode::Legacy) => redirect::run(cfg, opts, &cli.metrics),
        (Role::Router, proxy) => proxy_init_container(cfg, proxy, &opts.macvlan_interface),
        (Role::Proxy, _) => {
            let cfg = with_upstream_source(cfg, &opts.macvlan_interface)?;
            serve(&cfg, cli)
        }
        (Role::RouterAndProxy, _) => {
            netsetup::apply(cfg, &opts.macvlan_interface)
                .context("setting up the macvlan interface")?;
            serve(cfg, cli)
        }
    }
}

/// The nameservers of the pod's resolv.conf (the one the proxies resolve with, /etc/resolv.conf
/// unless EGRESS_RESOLV_CONF says otherwise), as OpenShift's DNS image lists them in its
/// haproxy.cfg (none when it cannot be read, as there).
pub fn pod_nameservers(opts: &ResolverOptions) -> Vec<String> {
    std::fs::read_to_string(&opts.resolv_conf)
        .map(|t| config::resolv_conf_nameservers(&t))
        .unwrap_or_default()
}

/// The init container of the proxy pods (EGRESS_ROUTER_MODE http-proxy or dns-proxy): set up
/// macvlan0 and exit 0, as OpenShift's router image does; the proxy container serves.
fn proxy_init_container(cfg: &Config, proxy: Mode, macvlan: &str) -> Result<()> {
    netsetup::apply(cfg, macvlan).context("setting up the macvlan interface")?;
    if proxy == Mode::DnsProxy {
        // The DNS proxy container listens on the rules' ports, 80 or 53 among them, as a
        // non-root user without capabilities (HAProxy's image had cap_net_bind_service). This
        // is the pod's own network namespace: only its containers bind here.
        netsetup::allow_unprivileged_ports()
            .context("letting the unprivileged DNS proxy container listen below port 1024")?;
    }
    let rules = match proxy {
        Mode::HttpProxy => "EGRESS_HTTP_PROXY_DESTINATION",
        _ => "EGRESS_DNS_PROXY_DESTINATION",
    };
    if cfg.http.is_some() || cfg.dns.is_some() {
        info!(
            "{rules} is set here, in the router's init container (EGRESS_ROUTER_MODE={proxy}): \
             the rules are valid, and the proxy container serves them; to serve them in this \
             process too, set EGRESS_ONE_PROCESS=true"
        );
    }
    info!(
        source = %cfg.source.addr,
        gateway = %cfg.gateway,
        interface = macvlan,
        "{macvlan} set up for the {proxy} container; exiting (this is the pod's init container)"
    );
    netsetup::wait_for_announcements();
    Ok(())
}

/// A proxy container without EGRESS_SOURCE leaves through the route its init container set,
/// from the address that container put on macvlan0: the proxy binds its upstream connections to
/// that address, so that they can never leave from any other.
fn with_upstream_source(cfg: &Config, macvlan: &str) -> Result<Config> {
    let found = netsetup::interface_ipv4(macvlan)?;
    let mut cfg = cfg.clone();
    match (cfg.source.is_set(), found) {
        (true, _) if !netsetup::has_address(cfg.source.addr)? => bail!(
            "EGRESS_SOURCE {} is not an address of this pod, so upstream connections cannot \
             leave from it: the pod's init container (EGRESS_ROUTER_MODE={}) adds it to \
             {macvlan}; is it in this pod?",
            cfg.source.addr,
            cfg.mode
        ),
        (true, _) => {}
        (false, Some(addr)) => {
            cfg.source = EgressSource {
                addr,
                net: ipnet::Ipv4Net::from(addr),
            }
        }
        (false, None) => bail!(
            "{macvlan} has no IPv4 address: the proxy's upstream connections must leave from \
             EGRESS_SOURCE, which the pod's init container (EGRESS_ROUTER_MODE={}) puts on \
             {macvlan}; is it in this pod? (or set EGRESS_SOURCE here, or --macvlan-interface)",
            cfg.mode
        ),
    }
    info!(
        source = %cfg.source.addr,
        "the {} container: upstream connections leave from {} (on {macvlan}: {})",
        cfg.mode,
        cfg.source.addr,
        if found == Some(cfg.source.addr) {
            "yes"
        } else {
            "no: EGRESS_SOURCE names it"
        }
    );
    Ok(cfg)
}

/// Serves the proxy on one thread per CPU (`workers`), this one included.
fn serve(cfg: &Config, cli: &Cli) -> Result<()> {
    let workers = Workers::start(cli.workers.count())?;
    let threads = workers.handles();
    match cfg.mode {
        Mode::HttpProxy => workers.block_on(http_proxy::run(
            cfg,
            &cli.http,
            &cli.resolver,
            &cli.metrics,
            threads,
        )),
        Mode::DnsProxy => workers.block_on(dns_proxy::run(
            cfg,
            &cli.dns,
            &cli.resolver,
            &cli.metrics,
            threads,
        )),
        m => bail!("{m} mode has no proxy to serve"),
    }
}
