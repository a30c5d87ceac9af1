//! HTTP proxy (egress-router vs squid) and DNS proxy (egress-router vs HAProxy), each baseline
//! configured the way OpenShift's egress-http-proxy.sh / egress-dns-proxy.sh configure it
//! (openshift/images, egress/http-proxy and egress/dns-proxy), for the same rules.
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use egress_tests::{DEST_IP, EGRESS_SOURCE, POD_IP, Proc, Topology};

use super::{
    Ctx, load, redirect,
    report::{Better, Section, Who},
    servers::{ECHO_PORT, HTTP_PORT, IPERF_PORT, SINK_PORT, Servers},
    sys, tune, wait_listening,
};

pub const HTTP_KA_RPS: &str = "requests/s, keep-alive";
pub const HTTP_KA_P50: &str = "latency p50, keep-alive, µs";
pub const HTTP_KA_P99: &str = "latency p99, keep-alive, µs";
pub const HTTP_CLOSE_RPS: &str = "requests/s, one connection per request";
pub const HTTP_CLOSE_P50: &str = "latency p50, one connection per request, µs";
pub const HTTP_CLOSE_P99: &str = "latency p99, one connection per request, µs";
pub const HTTP_CONNECT: &str = "CONNECT tunnel throughput (1 stream), Gbit/s";
pub const HTTP_KA_CPU: &str = "proxy CPU (user + system) per request, keep-alive, µs";
pub const HTTP_CLOSE_CPU: &str =
    "proxy CPU (user + system) per request, one connection per request, µs";
pub const HTTP_CONNECT_CPU: &str = "proxy CPU (user + system) per GB through CONNECT, ms";
pub const RSS_IDLE: &str = "resident memory, idle, MiB";
pub const RSS_IDLE_CONNS: &str = "resident memory with the idle client connections, MiB";
pub const DNS_CRR: &str = "new connections/s";
pub const DNS_GBPS: &str = "throughput (iperf3, 1 stream), Gbit/s";
pub const DNS_CRR_CPU: &str = "proxy CPU (user + system) per new connection, µs";
pub const DNS_GB_CPU: &str = "proxy CPU (user + system) per GB, ms";
pub const DNS_P50: &str = "request/response latency p50, µs";
pub const DNS_P99: &str = "request/response latency p99, µs";

/// The HTTP proxy's port (OpenShift's squid `http_port 8080`; egress-router's default).
const PROXY_PORT: u16 = 8080;

/// EGRESS_HTTP_PROXY_DESTINATION for both proxies: a deny, the destination network, a domain.
/// The requests go to an IP literal in the allowed network, so neither proxy needs DNS.
pub const HTTP_RULES: &str = "!198.51.100.0/24\n203.0.113.0/24\n*.example.com\n";

/// EGRESS_DNS_PROXY_DESTINATION for both proxies.
pub fn dns_rules() -> String {
    format!("{ECHO_PORT} {DEST_IP}\n{IPERF_PORT} {DEST_IP}\n")
}

struct Lab {
    servers: Servers,
    proxy: Proc,
    topo: Topology,
}

fn start(ctx: &Ctx, who: Who, section: Section) -> Result<Lab> {
    let topo = Topology::new().context("building the topology")?;
    tune(&topo)?;
    let servers = Servers::start(&topo.dest, &ctx.dir)?;
    let r = ctx.round;
    let (proxy, port, log) = match (section, who) {
        (Section::Http, Who::Ours) => {
            let log = format!("http-ours-{r}.log");
            // The pod's two containers in one process (EGRESS_ONE_PROCESS): the same setup of
            // macvlan0 and the same proxy.
            let mut cmd = ctx.router_cmd("http-proxy", &log)?;
            cmd.env("EGRESS_HTTP_PROXY_DESTINATION", HTTP_RULES)
                .env("EGRESS_ONE_PROCESS", "true");
            (topo.router.spawn(cmd)?, PROXY_PORT, log)
        }
        (Section::Http, _) => {
            // What OpenShift's setup_network does in http-proxy mode, then its squid.
            topo.configure_macvlan()?;
            let conf = ctx.dir.join("squid.conf");
            std::fs::write(&conf, squid_conf(ctx)?)?;
            let log = format!("squid-{r}.log");
            let out = std::fs::File::create(ctx.dir.join(&log))?;
            let mut cmd = Command::new("squid");
            cmd.arg("-N")
                .arg("-f")
                .arg(&conf)
                .stdin(std::process::Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out);
            (topo.router.spawn(cmd)?, PROXY_PORT, log)
        }
        (_, Who::Ours) => {
            let log = format!("dns-ours-{r}.log");
            let mut cmd = ctx.router_cmd("dns-proxy", &log)?;
            cmd.env("EGRESS_DNS_PROXY_DESTINATION", dns_rules())
                .env("EGRESS_ONE_PROCESS", "true");
            (topo.router.spawn(cmd)?, ECHO_PORT, log)
        }
        (_, _) => {
            topo.configure_macvlan()?;
            let conf = ctx.dir.join("haproxy.cfg");
            std::fs::write(&conf, haproxy_cfg(ctx)?)?;
            let log = format!("haproxy-{r}.log");
            let out = std::fs::File::create(ctx.dir.join(&log))?;
            let mut cmd = Command::new("haproxy");
            cmd.arg("-f")
                .arg(&conf)
                .stdin(std::process::Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out);
            (topo.router.spawn(cmd)?, ECHO_PORT, log)
        }
    };
    wait_listening(&topo.client, SocketAddr::from((POD_IP, port)), &proxy)
        .with_context(|| format!("the proxy did not start:\n{}", ctx.log_tail(&log)))?;
    Ok(Lab {
        servers,
        proxy,
        topo,
    })
}

fn check_peers(servers: &Servers) -> Result<()> {
    let peers = servers.peers();
    ensure!(
        peers == HashSet::from([IpAddr::V4(EGRESS_SOURCE)]),
        "the destination saw {peers:?}, expected only {EGRESS_SOURCE}"
    );
    Ok(())
}

/// `cost` per `units`, refusing a run that did no work.
fn per(cost: f64, units: f64) -> Result<f64> {
    ensure!(units > 0.0, "no work was done to divide the CPU time by");
    Ok(cost / units)
}

fn rss_mib(p: &Proc) -> Result<f64> {
    Ok(sys::tree_rss_kib(p.pid())? as f64 / 1024.0)
}

pub fn http(ctx: &mut Ctx, who: Who) -> Result<()> {
    let s = Section::Http;
    let lab = start(ctx, who, s)?;
    let proxy = SocketAddr::from((POD_IP, PROXY_PORT));
    let host = DEST_IP.to_string();
    let url = format!("http://{DEST_IP}:{HTTP_PORT}/");
    let warm = load::Warm::Http {
        url: &url,
        host: &host,
    };
    lab.servers.clear_peers();
    drop(load::idle_connections(&lab.topo.client, proxy, 1, &warm).context("first request")?);
    check_peers(&lab.servers)?;
    let p = ctx.p.clone();
    // Memory first, before load has grown any pool or arena.
    std::thread::sleep(Duration::from_millis(500));
    ctx.measure(s, RSS_IDLE, Better::Lower, who, || rss_mib(&lab.proxy));
    let conns = load::idle_connections(&lab.topo.client, proxy, p.idle_conns, &warm);
    match conns {
        Ok(c) => {
            std::thread::sleep(Duration::from_millis(500));
            ctx.measure(s, RSS_IDLE_CONNS, Better::Lower, who, || {
                rss_mib(&lab.proxy)
            });
            drop(c);
        }
        Err(e) => ctx.fail(s, who, &format!("{RSS_IDLE_CONNS}: {e:#}")),
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = lab.proxy.pid();
    for keepalive in [true, false] {
        let (rps, p50, p99, cpu_name) = if keepalive {
            (HTTP_KA_RPS, HTTP_KA_P50, HTTP_KA_P99, HTTP_KA_CPU)
        } else {
            (
                HTTP_CLOSE_RPS,
                HTTP_CLOSE_P50,
                HTTP_CLOSE_P99,
                HTTP_CLOSE_CPU,
            )
        };
        let run = sys::cpu_during(pid, || {
            let what = if keepalive { "http-ka" } else { "http-close" };
            let perf = redirect::profile(ctx, what, redirect::Profiled::Process(pid))?;
            let r = load::wrk(
                &lab.topo.client,
                &ctx.dir,
                proxy,
                &url,
                &host,
                keepalive,
                p.http_conns,
                p.measure,
            );
            redirect::profile_finish(perf)?;
            r
        });
        match run {
            Ok((r, cpu)) => {
                ctx.measure(s, rps, Better::Higher, who, || Ok(r.rps));
                ctx.measure(s, p50, Better::Lower, who, || Ok(r.p50_us));
                ctx.measure(s, p99, Better::Lower, who, || Ok(r.p99_us));
                let requests = r.rps * p.measure.as_secs_f64();
                ctx.measure(s, cpu_name, Better::Lower, who, || {
                    per(cpu.as_secs_f64() * 1e6, requests)
                });
            }
            Err(e) => ctx.fail(s, who, &format!("{rps}: {e:#}")),
        }
    }
    let run = sys::cpu_during(pid, || {
        load::connect_stream(
            &lab.topo.client,
            proxy,
            SocketAddr::from((DEST_IP, SINK_PORT)),
            p.warmup,
            p.measure,
            || lab.servers.sink_bytes(),
        )
    });
    match run {
        Ok((gbps, cpu)) => {
            ctx.measure(s, HTTP_CONNECT, Better::Higher, who, || Ok(gbps));
            // The CPU time covers the warm-up too, at about the same rate.
            let gb = gbps / 8.0 * (p.warmup + p.measure).as_secs_f64();
            ctx.measure(s, HTTP_CONNECT_CPU, Better::Lower, who, || {
                per(cpu.as_secs_f64() * 1e3, gb)
            });
        }
        Err(e) => ctx.fail(s, who, &format!("{HTTP_CONNECT}: {e:#}")),
    }
    Ok(())
}

pub fn dns(ctx: &mut Ctx, who: Who) -> Result<()> {
    let s = Section::Dns;
    let lab = start(ctx, who, s)?;
    let echo = SocketAddr::from((POD_IP, ECHO_PORT));
    lab.servers.clear_peers();
    drop(
        load::idle_connections(&lab.topo.client, echo, 1, &load::Warm::Echo)
            .context("first connection")?,
    );
    check_peers(&lab.servers)?;
    let p = ctx.p.clone();
    std::thread::sleep(Duration::from_millis(500));
    ctx.measure(s, RSS_IDLE, Better::Lower, who, || rss_mib(&lab.proxy));
    match load::idle_connections(&lab.topo.client, echo, p.idle_conns, &load::Warm::Echo) {
        Ok(c) => {
            std::thread::sleep(Duration::from_millis(500));
            ctx.measure(s, RSS_IDLE_CONNS, Better::Lower, who, || {
                rss_mib(&lab.proxy)
            });
            drop(c);
        }
        Err(e) => ctx.fail(s, who, &format!("{RSS_IDLE_CONNS}: {e:#}")),
    }
    std::thread::sleep(Duration::from_millis(500));
    let pid = lab.proxy.pid();
    match sys::cpu_during(pid, || {
        let perf = redirect::profile(ctx, "dns-crr", redirect::Profiled::Process(pid))?;
        let r = load::tcp_crr(&lab.topo.client, echo, p.crr_threads, p.measure);
        redirect::profile_finish(perf)?;
        r
    }) {
        Ok((rate, cpu)) => {
            ctx.measure(s, DNS_CRR, Better::Higher, who, || Ok(rate));
            let conns = rate * p.measure.as_secs_f64();
            ctx.measure(s, DNS_CRR_CPU, Better::Lower, who, || {
                per(cpu.as_secs_f64() * 1e6, conns)
            });
        }
        Err(e) => ctx.fail(s, who, &format!("{DNS_CRR}: {e:#}")),
    }
    let secs = p.measure.as_secs().max(1) as u32;
    let omit = p.warmup.as_secs() as u32;
    match sys::cpu_during(pid, || {
        load::iperf3(
            &lab.topo.client,
            SocketAddr::from((POD_IP, IPERF_PORT)),
            secs,
            omit,
        )
    }) {
        Ok((gbps, cpu)) => {
            ctx.measure(s, DNS_GBPS, Better::Higher, who, || Ok(gbps));
            // iperf3 runs the omitted seconds first, at about the same rate.
            let gb = gbps / 8.0 * f64::from(secs + omit);
            ctx.measure(s, DNS_GB_CPU, Better::Lower, who, || {
                per(cpu.as_secs_f64() * 1e3, gb)
            });
        }
        Err(e) => ctx.fail(s, who, &format!("{DNS_GBPS}: {e:#}")),
    }
    match load::tcp_rr(&lab.topo.client, echo, 64, p.measure, false) {
        Ok((p50, p99)) => {
            ctx.measure(s, DNS_P50, Better::Lower, who, || Ok(p50));
            ctx.measure(s, DNS_P99, Better::Lower, who, || Ok(p99));
        }
        Err(e) => ctx.fail(s, who, &format!("request/response: {e:#}")),
    }
    Ok(())
}

/// squid.conf as OpenShift's egress-http-proxy.sh writes it for HTTP_RULES, with no pid file
/// (the bench runs several squids, not as a service).
fn squid_conf(ctx: &Ctx) -> Result<String> {
    let conf = ctx.openshift_config(
        "http-proxy",
        &[("EGRESS_HTTP_PROXY_DESTINATION", HTTP_RULES.to_string())],
    )?;
    let head = "shutdown_lifetime 0\n";
    ensure!(conf.contains(head), "unexpected squid.conf: {conf}");
    Ok(conf.replacen(head, "shutdown_lifetime 0\npid_filename none\n", 1))
}

/// haproxy.cfg as OpenShift's egress-dns-proxy.sh writes it for the DNS rules, with the pid file
/// in the run's directory and maxconn raised from 4000 to 8000, as the bench always ran it (our
/// proxy has no such cap, so HAProxy's must not be what limits it); everything else verbatim,
/// including the syslog target and `option tcplog` (one log datagram per connection).
fn haproxy_cfg(ctx: &Ctx) -> Result<String> {
    let conf = ctx.openshift_config(
        "dns-proxy",
        &[("EGRESS_DNS_PROXY_DESTINATION", dns_rules())],
    )?;
    let pid = "pidfile     /var/lib/haproxy/run/haproxy.pid\n";
    let maxconn = "maxconn     4000\n";
    ensure!(
        conf.contains(pid) && conf.contains(maxconn),
        "unexpected haproxy.cfg: {conf}"
    );
    Ok(conf
        .replacen(
            pid,
            &format!("pidfile     {}\n", ctx.dir.join("haproxy.pid").display()),
            1,
        )
        .replacen(maxconn, "maxconn     8000\n", 1))
}
