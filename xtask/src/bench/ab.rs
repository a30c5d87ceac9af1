//! `cargo xtask bench-ab A B`: two builds of the proxies side by side in one topology, under the
//! same loads in short alternating bursts (A then B, B then A, ...). Between two runs of
//! `cargo xtask bench` this machine's own speed drifts by more than the differences a change of
//! the proxies makes (squid's CPU per request moved by a quarter between runs minutes apart);
//! alternating bursts put that drift on both builds alike. Each proxy runs as the proxy
//! container does, beside the other, on macvlan0 as OpenShift's init container sets it up.
//! Prints CPU (user + system of the proxy process) per unit of work and the rates, for each
//! build and B ÷ A; BENCHMARKS.md is left alone.
use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use egress_tests::{DEST_IP, POD_IP, Proc, Topology};

use super::{
    load,
    proxies::HTTP_RULES,
    report::{num, range},
    router_command,
    servers::{ECHO_PORT, HTTP_PORT, Servers},
    sys, tune, wait_listening,
};
use crate::{setup, util};

/// Alternating bursts per load (EGRESS_BENCH_ROUNDS), each of BURST (EGRESS_BENCH_SECONDS).
const BURSTS: usize = 8;
const BURST: Duration = Duration::from_secs(3);

/// The loads, each with its unit of work.
#[derive(Clone, Copy)]
enum Load {
    HttpKeepAlive,
    HttpClose,
    DnsConnections,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::HttpKeepAlive => "HTTP proxy, keep-alive (wrk, 32 connections): µs per request",
            Load::HttpClose => {
                "HTTP proxy, one connection per request (wrk, 32 connections): µs per request"
            }
            Load::DnsConnections => {
                "DNS proxy, new connections (4 loops, one byte echoed): µs per connection"
            }
        }
    }
}

/// One build's proxy: its process and the port its load goes to.
struct Proxy {
    proc: Proc,
    port: u16,
}

pub fn run(a: &Path, b: &Path) -> Result<()> {
    if !util::is_root() {
        bail!("cargo xtask bench-ab needs root: it creates network namespaces");
    }
    setup::run()?;
    if cfg!(debug_assertions) {
        // The load generators are this process's threads.
        return super::reexec_release();
    }
    let env = |k: &str| std::env::var(k).ok();
    let bursts: usize = env("EGRESS_BENCH_ROUNDS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(BURSTS);
    let burst = env("EGRESS_BENCH_SECONDS")
        .and_then(|v| v.parse().ok())
        .map_or(BURST, Duration::from_secs_f64);
    let builds = [a, b];
    for bin in builds {
        ensure!(bin.is_file(), "{}: no such build", bin.display());
    }
    sys::raise_fd_limit();
    let dir = std::env::temp_dir().join(format!("egress-bench-ab-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let topo = Topology::new().context("building the topology")?;
    tune(&topo)?;
    let servers = Servers::start(&topo.dest, &dir)?;
    topo.configure_macvlan()?;
    println!(
        "== cargo xtask bench-ab: {bursts} bursts of {burst:?} per load and build, alternating; load {}",
        sys::loadavg()
    );
    for (i, bin) in builds.iter().enumerate() {
        println!("   {}: {}", ["A", "B"][i], bin.display());
    }
    let mut lines = Vec::new();
    for (load, mode) in [
        (Load::HttpKeepAlive, "http"),
        (Load::HttpClose, "http"),
        (Load::DnsConnections, "dns"),
    ] {
        let proxies = builds
            .iter()
            .enumerate()
            .map(|(i, bin)| start(&topo, &dir, bin, mode, i))
            .collect::<Result<Vec<_>>>()?;
        // Per build: CPU and units over all bursts, and each burst's CPU per unit.
        let mut totals = [(0.0f64, 0.0f64); 2];
        let mut each: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for n in 0..bursts {
            let order = if n % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let (units, cpu) = sys::cpu_during(proxies[i].proc.pid(), || {
                    work(&topo, &dir, load, proxies[i].port, burst)
                })
                .with_context(|| format!("{}, build {}", load.name(), ["A", "B"][i]))?;
                ensure!(units > 0.0, "{}: no work done", load.name());
                let us = cpu.as_secs_f64() * 1e6;
                totals[i].0 += us;
                totals[i].1 += units;
                each[i].push(us / units);
            }
        }
        let secs = burst.as_secs_f64() * bursts as f64;
        let cost = |i: usize| totals[i].0 / totals[i].1;
        let line = format!(
            "| {} | {} ({}), {}/s | {} ({}), {}/s | {:.2}× |",
            load.name(),
            num(cost(0)),
            range(&each[0]),
            num(totals[0].1 / secs),
            num(cost(1)),
            range(&each[1]),
            num(totals[1].1 / secs),
            cost(1) / cost(0),
        );
        println!("{line}");
        lines.push(line);
        for p in proxies {
            p.proc.kill()?;
            p.proc.wait()?;
        }
    }
    drop(servers);
    println!("\n| load | A: CPU per unit (burst min–max), rate | B | B ÷ A, CPU per unit |");
    println!("|---|---|---|---|");
    for l in lines {
        println!("{l}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Build `bin` as the proxy container of `mode`, the `i`th of the run: its own proxy and
/// metrics ports, so that both builds run at once.
fn start(topo: &Topology, dir: &Path, bin: &Path, mode: &str, i: usize) -> Result<Proxy> {
    let log = format!("{mode}-{i}.log");
    // Without EGRESS_ROUTER_MODE, the proxy container (EGRESS_SOURCE is then checked against
    // macvlan0, which the topology set up as the init container would).
    let mut cmd = router_command(bin, dir, mode, &log)?;
    cmd.env_remove("EGRESS_ROUTER_MODE")
        .env("EGRESS_METRICS_ADDRESS", format!("0.0.0.0:{}", 9190 + i));
    let port = if mode == "http" {
        let port = 8080 + i as u16;
        cmd.env("EGRESS_HTTP_PROXY_DESTINATION", HTTP_RULES)
            .env("EGRESS_HTTP_LISTEN", format!("0.0.0.0:{port}"));
        port
    } else {
        let port = 7100 + i as u16;
        cmd.env(
            "EGRESS_DNS_PROXY_DESTINATION",
            format!("{port} {DEST_IP} {ECHO_PORT}"),
        );
        port
    };
    let proc = topo.router.spawn(cmd)?;
    wait_listening(&topo.client, SocketAddr::from((POD_IP, port)), &proc).with_context(|| {
        format!(
            "{} did not start: {}",
            bin.display(),
            std::fs::read_to_string(dir.join(&log)).unwrap_or_default()
        )
    })?;
    Ok(Proxy { proc, port })
}

/// One burst of `load` against the proxy on `port`: the units of work done.
fn work(topo: &Topology, dir: &Path, load: Load, port: u16, burst: Duration) -> Result<f64> {
    let proxy = SocketAddr::from((POD_IP, port));
    let (url, host) = (
        format!("http://{DEST_IP}:{HTTP_PORT}/"),
        DEST_IP.to_string(),
    );
    Ok(match load {
        Load::HttpKeepAlive | Load::HttpClose => {
            let keepalive = matches!(load, Load::HttpKeepAlive);
            let r = load::wrk(&topo.client, dir, proxy, &url, &host, keepalive, 32, burst)?;
            r.rps * burst.as_secs().max(1) as f64
        }
        Load::DnsConnections => load::tcp_crr(&topo.client, proxy, 4, burst)? * burst.as_secs_f64(),
    })
}
