//! `cargo xtask demo`: the reference topology in network namespaces, egress-router in redirect
//! mode with a default configuration, a client reaching a destination server that sees only
//! EGRESS_SOURCE, the router's status, then cleanup.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use egress_tests::{DEST_IP, EGRESS_SOURCE, Netns, POD_IP, Topology, tcp_roundtrip, udp_roundtrip};

use crate::{setup, util};

const DESTINATION: &str = "80 tcp 203.0.113.25\n8080 tcp 203.0.113.25 80\n53 udp 203.0.113.25";
const T: Duration = Duration::from_secs(5);

pub fn run() -> Result<()> {
    if !util::is_root() {
        bail!("cargo xtask demo needs root: it creates network namespaces and loads eBPF programs");
    }
    setup::run()?;
    let root = util::root();
    util::run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--quiet",
        "-p",
        "egress-loader",
    ]))?;
    let bin = root.join("target/debug/egress-router");

    let topo = Topology::new().context("building the demo topology")?;
    let bpffs = format!("/sys/fs/bpf/{}demo", topo.prefix());
    let result = demo(&topo, &bin, Path::new(&bpffs));
    let _ = std::fs::remove_dir_all(&bpffs);
    drop(topo);
    println!("\n== cleaned up: namespaces and pinned BPF state removed");
    result
}

fn demo(topo: &Topology, bin: &Path, bpffs: &Path) -> Result<()> {
    println!(
        "== topology (SPEC section 7), namespaces {}*",
        topo.prefix()
    );
    println!(
        "   client 10.128.0.10 -> router eth0 10.128.0.5 | macvlan0 192.168.12.99 -> gateway 192.168.12.1 -> server 203.0.113.25"
    );
    let web = topo.dest.tcp_echo(SocketAddr::from((DEST_IP, 80)))?;
    let dns = topo.dest.udp_echo(SocketAddr::from((DEST_IP, 53)))?;

    println!("\n== egress-router, EGRESS_ROUTER_MODE=init, EGRESS_DESTINATION:");
    for l in DESTINATION.lines() {
        println!("   {l}");
    }
    let mut cmd = router(bin, bpffs);
    cmd.env("EGRESS_SOURCE", "192.168.12.99/24")
        .env("EGRESS_GATEWAY", "192.168.12.1")
        .env("EGRESS_DESTINATION", DESTINATION)
        .env("EGRESS_ROUTER_MODE", "init");
    let out = topo.router.spawn(cmd)?.output(Duration::from_secs(30))?;
    print!("{}", String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "egress-router failed: {}", out.status);
    println!("   (the process has exited; the eBPF dataplane keeps working)");

    println!("\n== client connects to the router's pod IP");
    for port in [80, 8080] {
        let conn = topo
            .client
            .run(|| TcpStream::connect_timeout(&SocketAddr::from((POD_IP, port)), T))?;
        let reply = tcp_roundtrip(conn, b"hello", T)?;
        println!(
            "   tcp {POD_IP}:{port}: sent 'hello', got '{}' back",
            String::from_utf8_lossy(&reply)
        );
    }
    let udp: UdpSocket = topo
        .client
        .udp_bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
    let reply = udp_roundtrip(&udp, SocketAddr::from((POD_IP, 53)), b"query", T)?;
    println!(
        "   udp {POD_IP}:53: sent 'query', got '{}' back",
        String::from_utf8_lossy(&reply)
    );

    println!("\n== what the destination server saw");
    let peers: Vec<_> = web.peers().into_iter().chain(dns.peers()).collect();
    for p in &peers {
        println!("   connection from {p}");
    }
    ensure!(
        !peers.is_empty() && peers.iter().all(|p| p.ip() == EGRESS_SOURCE),
        "the server saw {peers:?}, not only {EGRESS_SOURCE}"
    );
    println!("   every one from EGRESS_SOURCE {EGRESS_SOURCE}");

    println!("\n== egress-router status");
    show(&topo.router, router(bin, bpffs).arg("status"))?;
    println!("\n== pinned under {}", bpffs.display());
    let mut names: Vec<String> = std::fs::read_dir(bpffs)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    println!("   {}", names.join("  "));
    // The maps as bpftool shows them: flows have one entry per direction, with a cached route.
    for map in ["GENERATION", "CONFIG", "FLOWS", "STATS"] {
        println!("\n== bpftool map dump pinned {}/{map}", bpffs.display());
        let mut bpftool = Command::new("bpftool");
        bpftool.args(["map", "dump", "pinned"]).arg(bpffs.join(map));
        show(&topo.router, &mut bpftool)?;
    }
    Ok(())
}

fn router(bin: &Path, bpffs: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("EGRESS_BPFFS_DIR", bpffs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn show(ns: &Netns, cmd: &mut Command) -> Result<()> {
    let cmd = std::mem::replace(cmd, Command::new("true"));
    let out = ns.spawn(cmd)?.output(T)?;
    print!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "failed: {}", out.status);
    Ok(())
}
