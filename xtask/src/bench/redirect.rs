//! Redirect mode: the eBPF dataplane vs OpenShift's nftables NAT vs plain routing.
//!
//! Same topology, same servers, same generators for the three. The client talks to the pod IP
//! (egress-router, nftables) or straight to the destination (plain routing: the client's
//! default route is the router, which forwards out of macvlan0; lan routes the client subnet
//! back via EGRESS_SOURCE).
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use egress_tests::{
    CLIENT_IF, CLIENT_IP, DEST_IP, EGRESS_SOURCE, LAN_IF, NODE_IF, POD_IP, ROUTER_ETH0, Topology,
};

use super::{
    BpffsDir, Ctx, load,
    report::{Better, Section, Who},
    servers::{ECHO_PORT, IPERF_PORT, Servers, TESTRUN_PORT, UDP_PORT},
    sys, testrun, tune,
};

pub const UDP_PPS: &str = "UDP 64-byte packets/s forwarded";
pub const UDP_OFFERED: &str = "UDP packets/s offered by the generator";
pub const UDP_CPU: &str = "kernel CPU time per forwarded UDP packet, ns";
pub const UDP_BUSY: &str = "forwarding CPU busy during the UDP flood, %";
pub const UDP_PPS_SCRAPED: &str = "UDP 64-byte packets/s forwarded, /metrics scraped every 100 ms";
pub const UDP_CPU_SCRAPED: &str =
    "kernel CPU time per forwarded UDP packet, /metrics scraped every 100 ms, ns";
pub const SCRAPE_CPU: &str =
    "exporter CPU (user + system) per /metrics scrape during the UDP flood, ms";
pub const TCP_GBPS: &str = "TCP throughput (iperf3, 1 stream), Gbit/s";
pub const CRR: &str = "new TCP connections/s";
pub const RR_P50: &str = "TCP request/response latency p50, µs";
pub const RR_P99: &str = "TCP request/response latency p99, µs";
pub const PROG_NS_UDP: &str =
    "eBPF programs' own time per packet, UDP flood (kernel BPF stats), ns";
pub const PROG_NS_TCP: &str =
    "eBPF programs' own time per packet, TCP stream (kernel BPF stats), ns";
pub const PROG_NS_CRR: &str =
    "eBPF programs' own time per packet, new connections (kernel BPF stats), ns";
pub const PROG_NS_UDP_SCRAPED: &str = "eBPF programs' own time per packet, UDP flood, /metrics scraped every 100 ms (kernel BPF stats), ns";
pub const ROUTER_CPU_CRR: &str =
    "router kernel CPU per new TCP connection (router paths steered to one CPU), µs";
pub const ROUTER_CPU_GB: &str =
    "router kernel CPU per GB of TCP (iperf3, 1 stream; router paths steered to one CPU), ms";
pub const COST_EMPTY: &str = "BPF_PROG_TEST_RUN empty program (measuring floor), ns/packet";
pub const COST_EST: &str = "BPF_PROG_TEST_RUN established flow (eth0), ns/packet";
pub const COST_NEW: &str = "BPF_PROG_TEST_RUN new flow (eth0 SYN), ns/packet";
pub const COST_REPLY: &str = "BPF_PROG_TEST_RUN reply (macvlan0), ns/packet";

/// The rules all three contenders serve (plain routing ignores them).
pub fn destination() -> String {
    let d = DEST_IP;
    format!(
        "{IPERF_PORT} tcp {d}\n{ECHO_PORT} tcp {d}\n{UDP_PORT} udp {d}\n{TESTRUN_PORT} tcp {d}\n"
    )
}

struct Lab {
    // Drop order: servers, then the bpffs directory, then the namespaces.
    servers: Servers,
    bpffs: Option<BpffsDir>,
    topo: Topology,
    /// Where the client sends its traffic.
    target: Ipv4Addr,
}

pub fn contender(ctx: &mut Ctx, who: Who) -> Result<()> {
    let lab = setup(ctx, who)?;
    let s = Section::Redirect;
    if let Some(bpffs) = &lab.bpffs {
        let runs = ctx.p.testrun_runs;
        match testrun::measure(&lab.topo, &bpffs.0, runs) {
            Ok(c) => {
                ctx.measure(s, COST_EMPTY, Better::Neither, who, || Ok(c.empty));
                for (name, v) in [
                    (COST_EST, c.established),
                    (COST_NEW, c.new_flow),
                    (COST_REPLY, c.reply),
                ] {
                    ctx.measure(s, name, Better::Lower, who, || Ok(v));
                }
            }
            Err(e) => ctx.fail(s, who, &format!("BPF_PROG_TEST_RUN: {e:#}")),
        }
    }
    match udp(ctx, &lab, "udp") {
        Ok(u) => {
            ctx.measure(s, UDP_PPS, Better::Higher, who, || Ok(u.forwarded_pps));
            ctx.measure(s, UDP_OFFERED, Better::Neither, who, || Ok(u.offered_pps));
            if let Some((ns, busy)) = u.forwarding_cpu {
                ctx.measure(s, UDP_CPU, Better::Lower, who, || Ok(ns));
                ctx.measure(s, UDP_BUSY, Better::Neither, who, || Ok(busy));
            }
        }
        Err(e) => ctx.fail(s, who, &format!("{UDP_PPS}: {e:#}")),
    }
    if let Some(bpffs) = &lab.bpffs {
        // The same flood while the exporter serves the dataplane's metrics and is scraped ten
        // times as often as Prometheus usually does: the metrics are read from the maps at
        // scrape time, so the packet path should not notice.
        match scraped(ctx, &lab, &bpffs.0, || udp(ctx, &lab, "udp-scraped")) {
            Ok((u, scrapes)) => {
                println!("    {} scrapes of /metrics during the flood", scrapes.count);
                ctx.measure(s, UDP_PPS_SCRAPED, Better::Higher, who, || {
                    Ok(u.forwarded_pps)
                });
                if let Some((ns, _)) = u.forwarding_cpu {
                    ctx.measure(s, UDP_CPU_SCRAPED, Better::Lower, who, || Ok(ns));
                }
                ctx.measure(s, SCRAPE_CPU, Better::Lower, who, || {
                    Ok(scrapes.cpu.as_secs_f64() * 1e3 / scrapes.count as f64)
                });
            }
            Err(e) => ctx.fail(s, who, &format!("{UDP_PPS_SCRAPED}: {e:#}")),
        }
    }
    let p = ctx.p.clone();
    let target = lab.target;
    let secs = p.measure.as_secs().max(1) as u32;
    let omit = p.warmup.as_secs() as u32;
    ctx.measure(s, TCP_GBPS, Better::Higher, who, || {
        load::iperf3(
            &lab.topo.client,
            SocketAddr::from((target, IPERF_PORT)),
            secs,
            omit,
        )
    });
    ctx.measure(s, CRR, Better::Higher, who, || {
        // Connection loops wait on each other; with CPUs halting in between, each wake-up is a
        // VM exit and the figure measures those (the CPUs were half idle), not the path.
        let _poll = sys::PollIdle::hold("the connection loops");
        load::tcp_crr(
            &lab.topo.client,
            SocketAddr::from((target, ECHO_PORT)),
            p.crr_threads,
            p.measure,
        )
    });
    match load::tcp_rr(
        &lab.topo.client,
        SocketAddr::from((target, ECHO_PORT)),
        64,
        p.measure,
        true,
    ) {
        Ok((p50, p99)) => {
            ctx.measure(s, RR_P50, Better::Lower, who, || Ok(p50));
            ctx.measure(s, RR_P99, Better::Lower, who, || Ok(p99));
        }
        Err(e) => ctx.fail(s, who, &format!("request/response: {e:#}")),
    }
    if let Err(e) = router_cpu(ctx, &lab, who) {
        ctx.fail(s, who, &format!("router CPU: {e:#}"));
    }
    if let Some(bpffs) = &lab.bpffs {
        // Again with the kernel's BPF statistics on (they cost two clock reads per run, so
        // only here): what the programs themselves take per packet on real traffic.
        if let Err(e) = program_time(ctx, &lab, &bpffs.0) {
            ctx.fail(s, who, &format!("BPF statistics: {e:#}"));
        }
    }
    drop(lab);
    Ok(())
}

/// What the router itself spends in the kernel per new TCP connection and per GB of a TCP
/// stream, for every contender alike: the router namespace's receive paths (eth0 from the
/// client, ens0 under macvlan0 from the LAN) are steered to CPU 1 by RPS, the client's and the
/// LAN's to CPU 0, and every generator and server (this process's threads, the iperf3s) pinned
/// to CPU 0 with the kernel's movable background threads, so CPU 1's kernel time is the
/// forwarding (NAT, routing, the programs, and the interrupts that deliver its packets) and
/// nothing else. Needs two CPUs.
fn router_cpu(ctx: &mut Ctx, lab: &Lab, who: Who) -> Result<()> {
    if sys::online_cpus() < 2 {
        println!("    router CPU not measured: one CPU cannot keep the router apart");
        return Ok(());
    }
    let topo = &lab.topo;
    let _rps = sys::Rps::set(&[
        (&topo.router, ROUTER_ETH0, "2"),
        (&topo.node, NODE_IF, "2"),
        (&topo.lan, LAN_IF, "1"),
        (&topo.client, CLIENT_IF, "1"),
    ])?;
    let _pinned = sys::Pinned::to(&[0], &[lab.servers.iperf_pid()])?;
    let _kthreads = sys::Pinned::kernel_threads_to(&[0])?;
    let _poll = sys::PollIdle::hold("the router CPU runs");
    let p = ctx.p.clone();
    let kernel1 = || sys::CpuTimes::read(1).map(|c| c.kernel);
    let perf = profile_start(ctx, "crr-router-cpu", Some(1))?;
    let t0 = kernel1()?;
    let (conns, _) = load::tcp_crr_count(
        &topo.client,
        SocketAddr::from((lab.target, ECHO_PORT)),
        p.crr_threads,
        p.measure,
    )?;
    let t1 = kernel1()?;
    profile_finish(perf)?;
    ensure!(conns > 0, "no connection was made");
    let bytes = load::iperf3_bytes(
        &topo.client,
        SocketAddr::from((lab.target, IPERF_PORT)),
        p.measure.as_secs().max(1) as u32,
    )?;
    let t2 = kernel1()?;
    ensure!(bytes > 0, "iperf3 moved no bytes");
    let per_conn_us = (t1 - t0).as_secs_f64() * 1e6 / conns as f64;
    let per_gb_ms = (t2 - t1).as_secs_f64() * 1e3 / (bytes as f64 / 1e9);
    let s = Section::Redirect;
    ctx.measure(s, ROUTER_CPU_CRR, Better::Lower, who, || Ok(per_conn_us));
    ctx.measure(s, ROUTER_CPU_GB, Better::Lower, who, || Ok(per_gb_ms));
    Ok(())
}

/// Turns `kernel.bpf_stats_enabled` on while it lives (the previous value back after).
struct BpfStats(String);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Result<BpfStats> {
        let old = std::fs::read_to_string(Self::PATH)?;
        std::fs::write(Self::PATH, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(BpfStats(old.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

/// The ids of our programs attached in the router namespace, as `egress-router status` lists
/// them.
fn attached_programs(ctx: &Ctx, lab: &Lab, bpffs: &Path) -> Result<Vec<u32>> {
    let mut cmd = Command::new(&ctx.bin);
    cmd.args(["status", "--json", "--bpffs-dir"]).arg(bpffs);
    let out = sys::ns_output(&lab.topo.router, cmd, Duration::from_secs(30))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("status --json")?;
    let ids: Vec<u32> = v["attached"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["program_id"].as_u64().map(|i| i as u32))
        .collect();
    ensure!(!ids.is_empty(), "no program of ours attached: {out}");
    Ok(ids)
}

/// Total run time (ns) and run count of the programs `ids`, from `bpftool prog show`.
fn run_stats(ids: &[u32]) -> Result<(u64, u64)> {
    let mut total = (0, 0);
    for id in ids {
        let out = crate::util::output(Command::new("bpftool").args([
            "prog",
            "show",
            "id",
            &id.to_string(),
            "--json",
        ]))?;
        let v: serde_json::Value = serde_json::from_str(&out).context("bpftool prog show")?;
        total.0 += v["run_time_ns"].as_u64().unwrap_or(0);
        total.1 += v["run_cnt"].as_u64().unwrap_or(0);
    }
    Ok(total)
}

fn program_time(ctx: &mut Ctx, lab: &Lab, bpffs: &Path) -> Result<()> {
    let ids = attached_programs(ctx, lab, bpffs)?;
    let _stats = BpfStats::enable()?;
    let p = ctx.p.clone();
    let target = lab.target;
    let secs = p.measure.as_secs().max(1) as u32;
    let runs: [(&str, &dyn Fn() -> Result<()>); 4] = [
        (PROG_NS_UDP, &|| udp(ctx, lab, "udp-bpf-stats").map(drop)),
        // The scrape reads the maps from user space: the programs' own time, unlike the
        // packet rate, does not depend on how the generator shares the CPUs with it.
        (PROG_NS_UDP_SCRAPED, &|| {
            scraped(ctx, lab, bpffs, || udp(ctx, lab, "udp-scraped-bpf-stats")).map(drop)
        }),
        (PROG_NS_TCP, &|| {
            load::iperf3(
                &lab.topo.client,
                SocketAddr::from((target, IPERF_PORT)),
                secs,
                0,
            )
            .map(drop)
        }),
        (PROG_NS_CRR, &|| {
            let _poll = sys::PollIdle::hold("the connection loops");
            load::tcp_crr(
                &lab.topo.client,
                SocketAddr::from((target, ECHO_PORT)),
                p.crr_threads,
                p.measure,
            )
            .map(drop)
        }),
    ];
    let mut figures = Vec::new();
    for (name, run) in runs {
        let before = run_stats(&ids)?;
        run()?;
        let after = run_stats(&ids)?;
        let (ns, count) = (after.0 - before.0, after.1 - before.1);
        ensure!(count > 0, "{name}: the programs did not run");
        figures.push((name, ns as f64 / count as f64));
    }
    for (name, v) in figures {
        ctx.measure(Section::Redirect, name, Better::Lower, Who::Ours, || Ok(v));
    }
    Ok(())
}

/// Where the exporter listens in the router namespace for [`scraped`].
const EXPORTER: &str = "127.0.0.1:9190";

/// One HTTP GET of `path` on the exporter; the whole response.
fn http_get(path: &str) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut c =
        std::net::TcpStream::connect_timeout(&EXPORTER.parse().unwrap(), Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {EXPORTER}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out)
}

/// What the scrapes of [`scraped`] did.
struct Scrapes {
    /// Scrapes that succeeded (at least one).
    count: u64,
    /// The exporter's CPU time (user + system) during the measurement.
    cpu: Duration,
}

/// Runs `measure` while `egress-router exporter` serves the dataplane under `bpffs` in the
/// router namespace and a thread there scrapes its /metrics every 100 ms; the figures and the
/// scrapes. The exporter and the scraper run on the generator's CPUs, as every process but the
/// router's forwarding does, so that the forwarding CPU's time is the packets' alone; what the
/// scrapes cost is the exporter's own CPU time.
fn scraped<T: Send>(
    ctx: &Ctx,
    lab: &Lab,
    bpffs: &Path,
    measure: impl FnOnce() -> Result<T>,
) -> Result<(T, Scrapes)> {
    let log = format!("exporter-{}.log", ctx.round);
    let mut cmd = ctx.router_cmd("init", &log)?;
    cmd.arg("exporter")
        .arg("--bpffs-dir")
        .arg(bpffs)
        .env("EGRESS_METRICS_ADDRESS", EXPORTER);
    let exporter = lab.topo.router.spawn(cmd)?;
    let ns = &lab.topo.router;
    sys::wait_for(Duration::from_secs(20), "waiting for the exporter", || {
        if let Some(st) = exporter.try_wait()? {
            bail!("the exporter exited: {st}\n{}", ctx.log_tail(&log));
        }
        let r = ns.run(|| http_get("/readyz"))?;
        ensure!(r.starts_with("HTTP/1.1 200"), "not ready: {r}");
        Ok(())
    })?;
    // The scraper thread, spawned below, inherits this thread's affinity.
    let _pinned = sys::Pinned::to(&generator_cpus(sys::online_cpus()), &[exporter.pid()])?;
    let cpu_before = sys::tree_cpu(exporter.pid())?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let scrapes = std::sync::atomic::AtomicU64::new(0);
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            ns.run(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if http_get("/metrics").is_ok_and(|r| r.contains("redirect_packets_total")) {
                        scrapes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        });
        let r = measure();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    });
    let cpu = sys::tree_cpu(exporter.pid())?.saturating_sub(cpu_before);
    let _ = exporter.kill();
    let count = scrapes.into_inner();
    ensure!(
        count > 0,
        "no scrape of /metrics succeeded during the measurement"
    );
    Ok((result?, Scrapes { count, cpu }))
}

fn setup(ctx: &Ctx, who: Who) -> Result<Lab> {
    let topo = Topology::new().context("building the topology")?;
    tune(&topo)?;
    let servers = Servers::start(&topo.dest, &ctx.dir)?;
    let mut bpffs = None;
    let (target, expect_peer) = match who {
        Who::Ours => {
            let dir = BpffsDir::new(&topo);
            let log = format!("redirect-init-{}.log", ctx.round);
            let mut cmd = ctx.router_cmd("init", &log)?;
            cmd.env("EGRESS_DESTINATION", destination())
                .env("EGRESS_BPFFS_DIR", &dir.0);
            bpffs = Some(dir);
            let p = topo.router.spawn(cmd)?;
            match p.wait_timeout(Duration::from_secs(30))? {
                Some(st) if st.success() => {}
                st => bail!(
                    "egress-router init failed ({st:?}):\n{}",
                    ctx.log_tail(&log)
                ),
            }
            (POD_IP, EGRESS_SOURCE)
        }
        Who::Base => {
            topo.configure_macvlan()?;
            topo.router.set_sysctl("net.ipv4.ip_forward", "1")?;
            let script = openshift_nft_script(ctx)?;
            let file = ctx.dir.join("openshift-nat.nft");
            std::fs::write(&file, &script)?;
            let mut nft = Command::new("nft");
            nft.arg("-f").arg(&file);
            sys::ns_output(&topo.router, nft, Duration::from_secs(10))
                .context("applying OpenShift's nftables ruleset")?;
            (POD_IP, EGRESS_SOURCE)
        }
        Who::Ceiling => {
            topo.configure_macvlan()?;
            topo.router.set_sysctl("net.ipv4.ip_forward", "1")?;
            topo.lan
                .add_route("10.128.0.0/24".parse()?, Some(EGRESS_SOURCE), LAN_IF)?;
            (DEST_IP, CLIENT_IP)
        }
    };
    let lab = Lab {
        servers,
        bpffs,
        topo,
        target,
    };
    // The path works, and the destination sees the address it should.
    lab.servers.clear_peers();
    load::tcp_crr(
        &lab.topo.client,
        SocketAddr::from((target, ECHO_PORT)),
        1,
        Duration::from_millis(100),
    )
    .context("first connection through the router")?;
    let peers = lab.servers.peers();
    ensure!(
        peers == HashSet::from([IpAddr::V4(expect_peer)]),
        "the destination saw {peers:?}, expected only {expect_peer}"
    );
    Ok(lab)
}

/// The `nft -f` input OpenShift's egress-router.sh applies (setup_nft) for the bench's
/// EGRESS_DESTINATION: its table and chains, a flush, then the rules.
fn openshift_nft_script(ctx: &Ctx) -> Result<String> {
    let script = ctx.openshift_config("unit-test", &[("EGRESS_DESTINATION", destination())])?;
    ensure!(
        script.contains("dnat to") && script.contains("snat to"),
        "unexpected nftables script: {script}"
    );
    Ok(script)
}

/// Distinct UDP flows (source ports) of the flood.
const UDP_FLOWS: u16 = 64;

/// The flood's frames: 60 bytes (64 on the wire with the FCS), `UDP_FLOWS` flows from the client
/// to the target's UDP port.
fn flood_frames(lab: &Lab) -> Result<Vec<Vec<u8>>> {
    let router_mac = lab.topo.router.mac(ROUTER_ETH0)?;
    let client_mac = lab.topo.client.mac(CLIENT_IF)?;
    Ok((0..UDP_FLOWS)
        .map(|i| {
            testrun::udp_frame(
                router_mac,
                client_mac,
                CLIENT_IP,
                lab.target,
                10000 + i,
                UDP_PORT,
                &[0x41; 18],
            )
        })
        .collect())
}

/// The sink: right after the router namespace, on the macvlan's lower device, an nftables
/// netdev egress chain counts and drops the flood (IPv4 UDP to UDP_PORT only: ARP and everything
/// else pass), so that what is measured is the router namespace's work alone.
const SINK_TABLE: &str = "egress_bench_sink";

/// The installed sink; dropping it removes it (the probes of the next flood must get through).
struct Sink<'a>(&'a Topology);

impl Drop for Sink<'_> {
    fn drop(&mut self) {
        let mut nft = Command::new("nft");
        nft.args(["delete", "table", "netdev", SINK_TABLE]);
        let _ = sys::ns_output(&self.0.node, nft, Duration::from_secs(10));
    }
}

fn sink_install<'a>(topo: &'a Topology, file: &Path) -> Result<Sink<'a>> {
    std::fs::write(
        file,
        format!(
            "table netdev {SINK_TABLE} {{\n  chain sink {{\n    type filter hook egress device \"{NODE_IF}\" priority 0; policy accept;\n    ip protocol udp udp dport {UDP_PORT} counter drop\n  }}\n}}\n"
        ),
    )?;
    let mut nft = Command::new("nft");
    nft.arg("-f").arg(file);
    sys::ns_output(&topo.node, nft, Duration::from_secs(10)).context("installing the UDP sink")?;
    Ok(Sink(topo))
}

fn sink_count(topo: &Topology) -> Result<u64> {
    let mut nft = Command::new("nft");
    nft.args(["-j", "list", "table", "netdev", SINK_TABLE]);
    let out = sys::ns_output(&topo.node, nft, Duration::from_secs(10))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("nft JSON")?;
    fn walk(v: &serde_json::Value) -> Option<u64> {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(c) = m.get("counter").and_then(|c| c.get("packets")) {
                    return c.as_u64();
                }
                m.values().find_map(walk)
            }
            serde_json::Value::Array(a) => a.iter().find_map(walk),
            _ => None,
        }
    }
    walk(&v).with_context(|| format!("no counter in {out}"))
}

/// The CPUs the flood's generator threads run on: every CPU but the forwarding one (CPU 1),
/// at most three (one thread offers ~1.2 Mpps on the machine this was written on, where that
/// is at or above what the router forwards); CPU 0 alone with one or two CPUs.
fn generator_cpus(online: usize) -> Vec<usize> {
    std::iter::once(0)
        .chain(2..online)
        .take(GENERATOR_THREADS_MAX)
        .collect()
}

const GENERATOR_THREADS_MAX: usize = 3;

/// What the UDP flood measures.
struct UdpFigures {
    forwarded_pps: f64,
    offered_pps: f64,
    /// Kernel time of the forwarding CPU per forwarded packet, ns, and how busy that CPU was
    /// (with one CPU the generator shares it: neither is measured).
    forwarding_cpu: Option<(f64, f64)>,
}

/// UDP packets/s forwarded by the router namespace under a flood from the client. With two or
/// more CPUs RPS on the router's eth0 moves the router's work to CPU 1 and the generator runs
/// on the others. `profile_as` names the flood's profile (each flood of a run keeps its own).
fn udp(ctx: &Ctx, lab: &Lab, profile_as: &str) -> Result<UdpFigures> {
    // The rule works and translates before the flood: a few datagrams reach the destination's
    // socket from the expected address.
    let expect = if lab.target == DEST_IP {
        CLIENT_IP
    } else {
        EGRESS_SOURCE
    };
    let s = lab
        .topo
        .client
        .udp_bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
    // Only this call's probes count: the earlier calls' are still queued at the destination.
    lab.servers.udp_drain()?;
    for _ in 0..3 {
        s.send_to(b"probe", SocketAddr::from((lab.target, UDP_PORT)))?;
    }
    let peer = lab.servers.udp_peer(Duration::from_secs(2))?;
    ensure!(
        peer.ip() == IpAddr::V4(expect),
        "a UDP datagram reached the destination from {peer}, expected {expect}"
    );
    let _sink = sink_install(&lab.topo, &ctx.dir.join("sink.nft"))?;
    let rps = sys::online_cpus() >= 2;
    let _rps = if rps {
        Some(sys::Rps::set(&[(&lab.topo.router, ROUTER_ETH0, "2")])?)
    } else {
        None
    };
    // A forwarding CPU that keeps up with the generator drains its queue and halts; each packet
    // then costs the generator an inter-processor interrupt to wake it, which on a virtual
    // machine is an exit, and the generator falls below what the router could forward (this
    // made the figure bimodal: with CPU 1 partly idle, ~0.85 Mpps were offered instead of
    // ~1.2). Polling idle turns the wake-up into a memory write, for every contender alike.
    let _poll = sys::PollIdle::hold("the flood");
    let _kthreads = if rps {
        Some(sys::Pinned::kernel_threads_to(&generator_cpus(
            sys::online_cpus(),
        ))?)
    } else {
        None
    };
    let flood = load::Flood::start(
        &lab.topo.client,
        CLIENT_IF,
        flood_frames(lab)?,
        &generator_cpus(sys::online_cpus()),
    )?;
    let result = (|| {
        std::thread::sleep(ctx.p.warmup);
        let cpu = |c| rps.then(|| sys::CpuTimes::read(c)).transpose();
        let (f0, o0, c0, t0) = (
            sink_count(&lab.topo)?,
            flood.sent(),
            cpu(1)?,
            Instant::now(),
        );
        let perf = profile_start(ctx, profile_as, rps.then_some(1))?;
        std::thread::sleep(ctx.p.measure);
        profile_finish(perf)?;
        let (f1, o1, c1, t1) = (
            sink_count(&lab.topo)?,
            flood.sent(),
            cpu(1)?,
            Instant::now(),
        );
        let secs = (t1 - t0).as_secs_f64();
        ensure!(f1 > f0, "no flood packet was forwarded");
        let forwarding_cpu = c0.zip(c1).map(|(a, b)| {
            (
                (b.kernel - a.kernel).as_nanos() as f64 / (f1 - f0) as f64,
                a.busy_percent(&b),
            )
        });
        Ok(UdpFigures {
            forwarded_pps: (f1 - f0) as f64 / secs,
            offered_pps: (o1 - o0) as f64 / secs,
            forwarding_cpu,
        })
    })();
    flood.stop()?;
    result
}

/// With EGRESS_BENCH_PERF set: `perf record -g` on the forwarding CPU (or all) for the
/// measurement window, reported into `<dir>/perf-<what>-<contender>-<round>.txt`. Profiling
/// costs CPU: figures of such a run are not comparable with normal runs.
pub fn profile_start(
    ctx: &Ctx,
    what: &str,
    cpu: Option<usize>,
) -> Result<Option<(std::process::Child, std::path::PathBuf)>> {
    profile(ctx, what, cpu.map_or(Profiled::All, Profiled::Cpu))
}

/// What [`profile`] records.
pub enum Profiled {
    All,
    Cpu(usize),
    /// One process (a proxy), user and kernel stacks of its threads.
    Process(u32),
}

/// `perf record -g` of `target` for the measurement window, with EGRESS_BENCH_PERF set.
pub fn profile(
    ctx: &Ctx,
    what: &str,
    target: Profiled,
) -> Result<Option<(std::process::Child, std::path::PathBuf)>> {
    if std::env::var_os("EGRESS_BENCH_PERF").is_none() {
        return Ok(None);
    }
    let data = ctx.dir.join(format!("perf-{what}-{}.data", ctx.tag()));
    let mut cmd = Command::new("perf");
    cmd.args(["record", "-q", "-g", "-o"]).arg(&data);
    match target {
        Profiled::Cpu(c) => cmd.args(["-C", &c.to_string()]),
        Profiled::All => cmd.arg("-a"),
        Profiled::Process(pid) => cmd.args(["-p", &pid.to_string()]),
    };
    let log = std::fs::File::create(data.with_extension("log"))?;
    cmd.args(["--", "sleep", &format!("{}", ctx.p.measure.as_secs_f64())])
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(Some((cmd.spawn().context("starting perf record")?, data)))
}

pub fn profile_finish(p: Option<(std::process::Child, std::path::PathBuf)>) -> Result<()> {
    let Some((mut child, data)) = p else {
        return Ok(());
    };
    child.wait()?;
    let out = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--percent-limit",
            "0.7",
        ])
        .args(["--sort", "sym", "-g", "none", "-i"])
        .arg(&data)
        .output()
        .context("perf report")?;
    std::fs::write(data.with_extension("txt"), &out.stdout)?;
    println!("    profile: {}", data.with_extension("txt").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::generator_cpus;

    #[test]
    fn the_generator_never_runs_on_the_forwarding_cpu() {
        assert_eq!(generator_cpus(1), [0]);
        assert_eq!(generator_cpus(2), [0]);
        assert_eq!(generator_cpus(3), [0, 2]);
        assert_eq!(generator_cpus(64), [0, 2, 3]);
    }
}
