//! ADD, DEL, CHECK, STATUS and GC.
use std::{
    collections::BTreeMap,
    fs::File,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use ipnet::{IpNet, Ipv4Net};
use nix::sched::{CloneFlags, setns};
use rscni_plugin::{
    error::Error,
    types::{Args, CNIResult, Interface, IpConfig, Route},
};
use tracing::{info, warn};

use super::{code, netlink, state::Record};
use crate::{
    config::{
        Config, Mode, Role,
        cni::{CniConfig, parse_cni},
    },
    dataplane::{self, Dataplane, DataplaneOptions, DataplaneSettings, PINNED_MAPS, pindir},
    netsetup, redirect,
};

/// The pod's cluster interface: the primary network's, which Multus always names eth0.
const CLUSTER_IF: &str = "eth0";

fn err(code: u32, msg: impl Into<String>, e: Option<&anyhow::Error>) -> Error {
    Error::Custom(
        code,
        msg.into(),
        e.map(|e| format!("{e:#}")).unwrap_or_default(),
    )
}

/// The plugin's configuration, or the error naming the first problem (all of them in details).
fn config(args: &Args) -> Result<CniConfig, Error> {
    parse_cni(&args.config().custom).map_err(|problems| {
        let first = &problems[0];
        let all: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        Error::Custom(first.code, first.message.clone(), all.join("\n"))
    })
}

/// Logs to `log_file` (appended) or stderr, at `log_level`.
fn init_logging(file: Option<&Path>, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EGRESS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let opened = file.map(|p| File::options().create(true).append(true).open(p));
    let _ = match opened {
        Some(Ok(f)) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        Some(Err(e)) => {
            let r = builder.with_writer(std::io::stderr).try_init();
            warn!(
                "log_file {}: {e}; logging to stderr",
                file.unwrap().display()
            );
            r
        }
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

struct Ids {
    network: String,
    container_id: String,
    ifname: String,
}

fn ids(args: &Args) -> Ids {
    Ids {
        network: args.config().name.clone(),
        container_id: args
            .container_id()
            .map(|c| c.to_string())
            .unwrap_or_default(),
        ifname: args.ifname().map(|i| i.to_string()).unwrap_or_default(),
    }
}

/// The dataplane settings: the defaults, or what the runtime's environment sets
/// (EGRESS_CONNTRACK_SIZE, EGRESS_PORT_RANGE, EGRESS_TC_ATTACH, ...); an invalid one is the
/// spec's code 4 (invalid environment), not a usage message without JSON.
fn options(ifname: &str) -> Result<DataplaneOptions, Error> {
    #[derive(clap::Parser)]
    struct FromEnv {
        #[command(flatten)]
        o: DataplaneOptions,
    }
    let o = <FromEnv as clap::Parser>::try_parse_from(["egress-router"])
        .map_err(|e| {
            let first = e.to_string();
            let first = first
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ");
            err(
                code::INVALID_ENV,
                format!("the environment's dataplane settings: {first}"),
                None,
            )
        })?
        .o;
    Ok(DataplaneOptions {
        cluster_interface: CLUSTER_IF.to_string(),
        macvlan_interface: ifname.to_string(),
        ..o
    })
}

/// The configuration redirect mode's setup reads, from the plugin's.
fn router_config(cfg: &CniConfig) -> Config {
    Config {
        role: Role::Router,
        mode: Mode::Init,
        source: cfg.source,
        gateway: cfg.gateway,
        debug: false,
        redirect: Some(cfg.redirect.clone()),
        http: None,
        dns: None,
        dns_server_counts: BTreeMap::new(),
        proxy_unit_test: false,
        dns_debug: false,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the netlink runtime")
}

/// An rtnetlink handle in the calling thread's current network namespace.
fn handle(rt: &tokio::runtime::Runtime) -> Result<rtnetlink::Handle> {
    let _in = rt.enter();
    let (conn, h, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    rt.spawn(conn);
    Ok(h)
}

/// Moves this (single-threaded) process into the network namespace `ns`. Everything after
/// (netlink sockets, /proc/sys/net, threads spawned) is in the pod's namespace; sockets opened
/// before stay in the host's.
fn enter(ns: &File, path: &Path) -> Result<()> {
    setns(ns, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering the network namespace {}", path.display()))
}

fn open_netns(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|e| {
        err(
            code::NO_CONTAINER,
            format!(
                "CNI_NETNS {}: cannot open the pod's network namespace: {e}",
                path.display()
            ),
            None,
        )
    })
}

/// The master: `interfaceArgs.master`, else the interface of the host's IPv4 default route;
/// (index, name, MTU).
async fn find_master(h: &rtnetlink::Handle, cfg: &CniConfig) -> Result<(u32, String, u32), Error> {
    let setup = |e: anyhow::Error| {
        err(
            code::SETUP_FAILED,
            "reading the host's interfaces",
            Some(&e),
        )
    };
    let link = match &cfg.master {
        Some(name) => netlink::link(h, name)
            .await
            .map_err(setup)?
            .ok_or_else(|| {
                err(
                    code::INVALID_CONFIG,
                    format!(
                        "interfaceArgs.master '{name}': there is no such interface in the host's \
                     network namespace"
                    ),
                    None,
                )
            })?,
        None => {
            let routes = netlink::default_routes(h).await.map_err(setup)?;
            let oif = routes.iter().find_map(|(_, oif)| *oif).ok_or_else(|| {
                err(
                    code::INVALID_CONFIG,
                    "interfaceArgs.master is not given and the host has no IPv4 default route \
                     to take the master from: name the interface in interfaceArgs.master",
                    None,
                )
            })?;
            netlink::link_by_index(h, oif)
                .await
                .map_err(setup)?
                .ok_or_else(|| setup(anyhow!("the default route's interface {oif} vanished")))?
        }
    };
    let name = netlink::name_of(&link).unwrap_or_default();
    let master_mtu = netlink::mtu_of(&link).unwrap_or(1500);
    let mtu = cfg.mtu.unwrap_or(master_mtu);
    if mtu > master_mtu {
        return Err(err(
            code::INVALID_CONFIG,
            format!(
                "interfaceArgs.mtu '{mtu}' is greater than the MTU of the master {name} \
                 ({master_mtu}): a macvlan's MTU is at most its master's"
            ),
            None,
        ));
    }
    Ok((link.header.index, name, mtu))
}

pub fn add(args: &Args) -> Result<CNIResult, Error> {
    let cfg = config(args)?;
    init_logging(cfg.log_file.as_deref(), cfg.log_filter);
    let ids = ids(args);
    let netns_path = args.netns().cloned().unwrap_or_default();
    info!(
        container = %ids.container_id, ifname = %ids.ifname, netns = %netns_path.display(),
        source = %cfg.source.net, gateway = %cfg.gateway,
        rules = ?crate::config::describe(&router_config(&cfg)).lines().collect::<Vec<_>>(),
        "CNI ADD"
    );
    let pod_ns = open_netns(&netns_path)?;
    let rt = runtime().map_err(|e| err(code::SETUP_FAILED, "starting", Some(&e)))?;
    let host = handle(&rt).map_err(|e| err(code::SETUP_FAILED, "netlink", Some(&e)))?;
    let (master, master_name, mtu) = rt.block_on(find_master(&host, &cfg))?;
    enter(&pod_ns, &netns_path).map_err(|e| err(code::NO_CONTAINER, format!("{e}"), None))?;
    let pod = handle(&rt).map_err(|e| err(code::SETUP_FAILED, "netlink", Some(&e)))?;
    let setup = |what: &str, e: anyhow::Error| err(code::SETUP_FAILED, what.to_string(), Some(&e));

    // Checks before anything is made.
    if nix::net::if_::if_nametoindex(CLUSTER_IF).is_err() {
        return Err(err(
            code::SETUP_FAILED,
            format!(
                "the pod has no {CLUSTER_IF}: the egress router forwards what clients send to \
                 its primary network's interface, {CLUSTER_IF}, which the primary network's \
                 plugin makes before this one runs"
            ),
            None,
        ));
    }
    let earlier = Record::load(&ids.network, &ids.container_id, &ids.ifname)
        .map_err(|e| setup("reading this attachment's record", e))?;
    let existing = rt
        .block_on(netlink::link(&pod, &ids.ifname))
        .map_err(|e| setup("reading the pod's interfaces", e))?;
    let again = match (&existing, &earlier) {
        (None, _) => false,
        (Some(l), Some(_)) if netlink::is_macvlan(l) => true,
        (Some(_), _) => {
            return Err(err(
                code::SETUP_FAILED,
                format!(
                    "CNI_IFNAME '{}': the pod already has an interface of that name, which this \
                     plugin did not make",
                    ids.ifname
                ),
                None,
            ));
        }
    };
    // The default route the primary network gave the pod, which ours replaces: put back when
    // the attachment goes (a failed ADD, DEL).
    let previous_default = match &earlier {
        Some(r) => r.previous_default.clone(),
        None => {
            previous_default(&rt, &pod).map_err(|e| setup("reading the pod's default route", e))?
        }
    };
    let opts = options(&ids.ifname)?;
    let preflight = Dataplane::preflight(&opts, Mode::Init)
        .map_err(|e| setup("the redirect dataplane cannot run here", e))?;

    if !again {
        rt.block_on(netlink::create_macvlan(
            &host,
            &ids.ifname,
            master,
            cfg.mode,
            mtu,
            pod_ns.as_raw_fd(),
        ))
        .map_err(|e| setup(&format!("creating the macvlan on {master_name}"), e))?;
    }
    let record = Record {
        network: ids.network.clone(),
        container_id: ids.container_id.clone(),
        ifname: ids.ifname.clone(),
        netns: netns_path.clone(),
        pin_dir: preflight.plan.dir.clone(),
        previous_default: previous_default.clone(),
    };
    let made = set_up(&cfg, &opts, &rt, &pod, record, preflight);
    match made {
        Ok(result) => {
            info!(
                master = %master_name, mode = cfg.mode.as_str(), mtu, again,
                "CNI ADD done: {} set up, the redirect dataplane attached to {CLUSTER_IF} and {}",
                ids.ifname, ids.ifname
            );
            Ok(result)
        }
        Err(e) => {
            warn!("CNI ADD failed, removing what it made: {e:#}");
            if let Err(t) = tear_down_here(&rt, &pod, &ids.ifname, None, previous_default.as_ref())
            {
                warn!("removing what the failed ADD made: {t:#}");
            }
            let _ = Record::load(&ids.network, &ids.container_id, &ids.ifname)
                .ok()
                .flatten()
                .map(|r| r.remove());
            Err(setup(
                "setting up the egress router (nothing is left behind)",
                e,
            ))
        }
    }
}

/// Inside the pod's namespace, with the macvlan there: addresses, routes, forwarding, the
/// dataplane, then the record saved and the result.
fn set_up(
    cfg: &CniConfig,
    opts: &DataplaneOptions,
    rt: &tokio::runtime::Runtime,
    pod: &rtnetlink::Handle,
    record: Record,
    preflight: dataplane::Preflight,
) -> Result<CNIResult> {
    let ifname = record.ifname.as_str();
    let eth0 = nix::net::if_::if_nametoindex(CLUSTER_IF).context("eth0")?;
    let macvlan = nix::net::if_::if_nametoindex(ifname)
        .with_context(|| format!("the new interface {ifname} is not in the pod"))?;
    let settings = DataplaneSettings::new(&cfg.redirect, cfg.source.addr, eth0, macvlan, opts)?;
    let _dp = redirect::set_up(&router_config(cfg), opts, &settings, preflight)?;
    netsetup::wait_for_announcements();
    record.save()?;
    let link = rt
        .block_on(netlink::link(pod, ifname))?
        .context("the interface vanished")?;
    let gw = IpAddr::V4(cfg.gateway);
    Ok(CNIResult {
        interfaces: vec![Interface {
            name: ifname.to_string(),
            mac: netlink::mac_of(&link).unwrap_or_default(),
            mtu: netlink::mtu_of(&link),
            sandbox: Some(record.netns.display().to_string()),
            socket_path: None,
            pci_id: None,
        }],
        ips: vec![IpConfig {
            interface: Some(0),
            address: IpNet::V4(
                Ipv4Net::new(cfg.source.addr, cfg.source.net.prefix_len()).expect("a valid prefix"),
            ),
            gateway: Some(gw),
        }],
        routes: vec![Route {
            dst: IpNet::V4(Ipv4Net::default()),
            gw: Some(gw),
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }],
        dns: None,
    })
}

/// The pod's IPv4 default route (gateway, interface), if it has one via a gateway.
fn previous_default(
    rt: &tokio::runtime::Runtime,
    pod: &rtnetlink::Handle,
) -> Result<Option<(std::net::Ipv4Addr, String)>> {
    for (gw, oif) in rt.block_on(netlink::default_routes(pod))? {
        if let (Some(gw), Some(oif)) = (gw, oif)
            && let Some(l) = rt.block_on(netlink::link_by_index(pod, oif))?
            && let Some(name) = netlink::name_of(&l)
        {
            return Ok(Some((gw, name)));
        }
    }
    Ok(None)
}

/// In the pod's namespace: our programs off eth0 and the macvlan, the macvlan deleted (if it
/// is one), the pin directory (`pin_dir`, else this namespace's default) removed, and the
/// default route the pod had before put back if it is left without one.
fn tear_down_here(
    rt: &tokio::runtime::Runtime,
    pod: &rtnetlink::Handle,
    ifname: &str,
    pin_dir: Option<&Path>,
    previous_default: Option<&(std::net::Ipv4Addr, String)>,
) -> Result<Vec<String>> {
    let dir = match pin_dir {
        Some(d) => d.to_path_buf(),
        None => pindir::resolve(None)?,
    };
    let mut removed = dataplane::remove(&[CLUSTER_IF, ifname], &dir)?;
    if let Some(l) = rt.block_on(netlink::link(pod, ifname))?
        && netlink::is_macvlan(&l)
    {
        rt.block_on(netlink::delete(pod, l.header.index))?;
        removed.push(format!("the interface {ifname}"));
    }
    if let Some((gw, dev)) = previous_default
        && let Some(l) = rt.block_on(netlink::link(pod, dev))?
        && rt.block_on(netlink::restore_default(pod, *gw, l.header.index))?
    {
        removed.push(format!("(the default route via {gw} dev {dev} put back)"));
    }
    Ok(removed)
}

/// Removes one attachment: in its namespace if that still exists, else what is left on the
/// host (the pin directory the record names); then the record.
fn remove_attachment(
    ids: &Ids,
    netns: Option<&Path>,
    record: Option<&Record>,
) -> Result<Vec<String>> {
    let pin_dir = record.map(|r| r.pin_dir.as_path());
    let ns = netns
        .or(record.map(|r| r.netns.as_path()))
        .and_then(|p| File::open(p).ok().map(|f| (f, p)));
    let removed = match ns {
        Some((f, p)) => {
            let rt = runtime()?;
            // A thread of its own: GC removes several attachments from one process.
            std::thread::scope(|s| {
                s.spawn(|| -> Result<Vec<String>> {
                    enter(&f, p)?;
                    let pod = handle(&rt)?;
                    tear_down_here(
                        &rt,
                        &pod,
                        &ids.ifname,
                        pin_dir,
                        record.and_then(|r| r.previous_default.as_ref()),
                    )
                })
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
            })?
        }
        None => match pin_dir {
            // The namespace is gone, and with it the interfaces and the programs' hooks: the
            // pins (maps, defunct links) are what is left.
            Some(d) => dataplane::remove(&[], d)?,
            None => Vec::new(),
        },
    };
    if let Some(r) = record {
        r.remove()?;
    }
    Ok(removed)
}

pub fn del(args: &Args) -> Result<(), Error> {
    // DEL cleans up even if the configuration has become invalid.
    let cfg = config(args);
    match &cfg {
        Ok(c) => init_logging(c.log_file.as_deref(), c.log_filter),
        Err(e) => {
            init_logging(None, "info");
            warn!(
                "the network configuration is invalid ({}); removing the attachment anyway",
                e.msg()
            );
        }
    }
    let ids = ids(args);
    let record = Record::load(&ids.network, &ids.container_id, &ids.ifname).map_err(|e| {
        err(
            code::TEARDOWN_FAILED,
            "reading the attachment's record",
            Some(&e),
        )
    })?;
    let removed = remove_attachment(&ids, args.netns().map(PathBuf::as_path), record.as_ref())
        .map_err(|e| {
            err(
                code::TEARDOWN_FAILED,
                format!(
                    "removing the egress router {} of {}",
                    ids.ifname, ids.container_id
                ),
                Some(&e),
            )
        })?;
    info!(container = %ids.container_id, ifname = %ids.ifname, ?removed, "CNI DEL done");
    Ok(())
}

pub fn check(args: &Args) -> Result<(), Error> {
    let cfg = config(args)?;
    init_logging(cfg.log_file.as_deref(), cfg.log_filter);
    let ids = ids(args);
    let netns_path = args.netns().cloned().unwrap_or_default();
    let fail = |what: String| err(code::CHECK_FAILED, what, None);
    let record = Record::load(&ids.network, &ids.container_id, &ids.ifname)
        .map_err(|e| {
            err(
                code::CHECK_FAILED,
                "reading the attachment's record",
                Some(&e),
            )
        })?
        .ok_or_else(|| {
            fail(format!(
                "no egress router attachment {} of container {} in network {} (no ADD \
                 succeeded, or DEL ran)",
                ids.ifname, ids.container_id, ids.network
            ))
        })?;
    let pod_ns = open_netns(&netns_path)?;
    enter(&pod_ns, &netns_path).map_err(|e| err(code::NO_CONTAINER, format!("{e}"), None))?;
    let rt = runtime().map_err(|e| err(code::CHECK_FAILED, "starting", Some(&e)))?;
    let pod = handle(&rt).map_err(|e| err(code::CHECK_FAILED, "netlink", Some(&e)))?;
    let problems = rt
        .block_on(inspect(&pod, &cfg, &ids.ifname, &record.pin_dir))
        .map_err(|e| {
            err(
                code::CHECK_FAILED,
                "inspecting the pod's network namespace",
                Some(&e),
            )
        })?;
    if let Some(first) = problems.first() {
        return Err(Error::Custom(
            code::CHECK_FAILED,
            first.clone(),
            problems.join("\n"),
        ));
    }
    info!(container = %ids.container_id, ifname = %ids.ifname, "CNI CHECK: all in place");
    Ok(())
}

/// What is missing or different from what ADD made, one message each.
async fn inspect(
    pod: &rtnetlink::Handle,
    cfg: &CniConfig,
    ifname: &str,
    pin_dir: &Path,
) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let Some(link) = netlink::link(pod, ifname).await? else {
        return Ok(vec![format!("the pod has no interface {ifname}")]);
    };
    if !netlink::is_macvlan(&link) {
        problems.push(format!("{ifname} is not a macvlan interface"));
    }
    let index = link.header.index;
    let want = cfg.source.net;
    let has_addr = nix::ifaddrs::getifaddrs()?.any(|a| {
        a.interface_name == ifname
            && a.address
                .and_then(|s| s.as_sockaddr_in().map(|s| s.ip()))
                .is_some_and(|ip| ip == want.addr())
            && a.netmask
                .and_then(|s| s.as_sockaddr_in().map(|s| s.ip()))
                .is_some_and(|m| u32::from(m).count_ones() == u32::from(want.prefix_len()))
    });
    if !has_addr {
        problems.push(format!(
            "{ifname} does not have the address {want} (ip.addresses[0])"
        ));
    }
    let defaults = netlink::default_routes(pod).await?;
    if !defaults
        .iter()
        .any(|(gw, oif)| *gw == Some(cfg.gateway) && *oif == Some(index))
    {
        problems.push(format!(
            "the default route is not via {} on {ifname} (ip.gateway); default routes: {defaults:?}",
            cfg.gateway
        ));
    }
    if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?.trim() != "1" {
        problems.push("net.ipv4.ip_forward is off in the pod".to_string());
    }
    for iface in [CLUSTER_IF, ifname] {
        if dataplane::attachments(iface)?.is_empty() {
            problems.push(format!("no egress-router program is attached to {iface}"));
        }
    }
    let missing: Vec<&str> = PINNED_MAPS
        .iter()
        .copied()
        .filter(|m| !pin_dir.join(m).exists())
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "maps missing from {}: {}",
            pin_dir.display(),
            missing.join(", ")
        ));
    } else {
        let maps = dataplane::status::StatusMaps::pinned(pin_dir)?;
        let rules = maps.rule_count()?;
        let want = cfg.redirect.rules.len();
        if rules != want {
            problems.push(format!(
                "the dataplane has {rules} rules, the configuration {want} (ip.destinations)"
            ));
        }
        let dp = maps.config()?;
        let fallback = match cfg.redirect.fallback {
            Some(IpAddr::V4(a)) => Some(a.octets()),
            _ => None,
        };
        if dp.egress_source != cfg.source.addr.octets()
            || (dp.has_fallback != 0).then_some(dp.fallback) != fallback
        {
            problems.push(format!(
                "the dataplane translates to {} with fallback {:?}, not as configured \
                 ({} with ip.fallbackIP {:?})",
                std::net::Ipv4Addr::from(dp.egress_source),
                (dp.has_fallback != 0).then(|| std::net::Ipv4Addr::from(dp.fallback)),
                cfg.source.addr,
                cfg.redirect.fallback
            ));
        }
    }
    Ok(problems)
}

/// STATUS: whether ADD can work on this host (kernel features, a bpffs for the pins).
pub fn status() -> Result<(), Error> {
    init_logging(None, "info");
    dataplane::probe::probe().require().map_err(|e| {
        err(
            code::NOT_AVAILABLE,
            "this kernel cannot run the egress-router dataplane",
            Some(&e),
        )
    })?;
    Ok(())
}

/// GC: removes the attachments of this network that the runtime no longer lists.
pub fn gc(args: &Args) -> Result<(), Error> {
    init_logging(None, "info");
    let network = args.config().name.clone();
    let valid: Vec<(String, String)> = args
        .config()
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let records = super::state::all(&network)
        .map_err(|e| err(code::TEARDOWN_FAILED, "listing the attachments", Some(&e)))?;
    let mut failures = Vec::new();
    for r in records {
        if valid.contains(&(r.container_id.clone(), r.ifname.clone())) {
            continue;
        }
        let ids = Ids {
            network: r.network.clone(),
            container_id: r.container_id.clone(),
            ifname: r.ifname.clone(),
        };
        match remove_attachment(&ids, None, Some(&r)) {
            Ok(removed) => {
                info!(container = %r.container_id, ifname = %r.ifname, ?removed, "GC: removed")
            }
            Err(e) => failures.push(format!("{} {}: {e:#}", r.container_id, r.ifname)),
        }
    }
    if let Some(first) = failures.first() {
        return Err(Error::Custom(
            code::TEARDOWN_FAILED,
            format!("GC could not remove an attachment: {first}"),
            failures.join("\n"),
        ));
    }
    Ok(())
}
