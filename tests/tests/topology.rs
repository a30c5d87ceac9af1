//! The harness itself: the SPEC section 7 topology works, is isolated per test and cleans up.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use egress_tests::{
    CLIENT_IP, DEST_IP, EGRESS_SOURCE, GATEWAY_IP, LAN_DEST_GW, MACVLAN, NETNS_DIR, NodeBpffs,
    POD_IP, Topology, netlink, remove_stale, tcp_roundtrip, udp_roundtrip,
};

const T: Duration = Duration::from_secs(5);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddrV4::new(ip, port).into()
}

fn ns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// Running (not gone, not a zombie waiting to be reaped).
fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn client_reaches_router_eth0() {
    let topo = Topology::new().unwrap();
    topo.client.ping(POD_IP, T).unwrap();
    let server = topo.router.tcp_echo(sa(POD_IP, 7000)).unwrap();
    let conn = topo.client.tcp_connect(server.addr(), T).unwrap();
    assert_eq!(tcp_roundtrip(conn, b"hello", T).unwrap(), b"hello");
    let peers = server.wait_for_peers(1, T).unwrap();
    assert_eq!(peers[0].ip(), CLIENT_IP);
}

#[test]
fn lan_reaches_dest() {
    let topo = Topology::new().unwrap();
    topo.lan.ping(DEST_IP, T).unwrap();
    topo.dest.ping(GATEWAY_IP, T).unwrap();
    let server = topo.dest.tcp_echo(sa(DEST_IP, 80)).unwrap();
    let conn = topo.lan.tcp_connect(server.addr(), T).unwrap();
    assert_eq!(tcp_roundtrip(conn, b"x", T).unwrap(), b"x");
    assert_eq!(server.wait_for_peers(1, T).unwrap()[0].ip(), LAN_DEST_GW);
    assert_eq!(topo.lan.sysctl("net.ipv4.ip_forward").unwrap(), "1");
}

#[test]
fn macvlan_starts_unconfigured_in_the_router() {
    let topo = Topology::new().unwrap();
    let (addrs, up, routes) = topo
        .router
        .netlink(|h| async move {
            let idx = netlink::link_index(&h, MACVLAN).await?;
            Ok((
                netlink::addresses(&h, idx).await?,
                netlink::link_is_up(&h, MACVLAN).await?,
                netlink::routes(&h).await?,
            ))
        })
        .unwrap();
    assert!(addrs.is_empty(), "{addrs:?}");
    assert!(!up);
    // The pod-like default route on eth0 that egress-router has to replace.
    let eth0 = topo.router.ifindex("eth0").unwrap();
    let default: Vec<_> = routes.iter().filter(|r| r.dst.prefix_len() == 0).collect();
    assert_eq!(default.len(), 1, "{routes:?}");
    assert_eq!(default[0].oif, Some(eth0));
    // The macvlan's lower device stays in the node namespace.
    assert!(topo.node.ifindex("ens0").is_ok());
    assert!(topo.node.ifindex(MACVLAN).is_err());
}

#[test]
fn configured_macvlan_reaches_dest_from_egress_source() {
    let topo = Topology::new().unwrap();
    topo.configure_macvlan().unwrap();
    topo.configure_macvlan().unwrap(); // idempotent
    topo.router.ping(GATEWAY_IP, T).unwrap();
    topo.router.ping(DEST_IP, T).unwrap();

    let tcp = topo.dest.tcp_echo(sa(DEST_IP, 443)).unwrap();
    let conn = topo.router.tcp_connect(tcp.addr(), T).unwrap();
    assert_eq!(tcp_roundtrip(conn, b"tcp", T).unwrap(), b"tcp");
    assert_eq!(tcp.wait_for_peers(1, T).unwrap()[0].ip(), EGRESS_SOURCE);

    let udp = topo.dest.udp_echo(sa(DEST_IP, 53)).unwrap();
    let sock = topo.router.udp_bind(sa(Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    assert_eq!(udp_roundtrip(&sock, udp.addr(), b"udp", T).unwrap(), b"udp");
    assert_eq!(udp.wait_for_peers(1, T).unwrap()[0].ip(), EGRESS_SOURCE);
}

#[test]
fn extra_client_reaches_router() {
    let mut topo = Topology::new().unwrap();
    let ip = Ipv4Addr::new(10, 128, 0, 11);
    let server = topo.router.tcp_echo(sa(POD_IP, 7001)).unwrap();
    let client2 = topo.add_client("client2", ip, "eth1").unwrap();
    let conn = client2.tcp_connect(server.addr(), T).unwrap();
    assert_eq!(tcp_roundtrip(conn, b"2", T).unwrap(), b"2");
    assert_eq!(server.wait_for_peers(1, T).unwrap()[0].ip(), ip);
    // The first client still works.
    topo.client.ping(POD_IP, T).unwrap();
}

#[test]
fn parallel_topologies_do_not_collide() {
    let build = |tag: &'static [u8]| {
        std::thread::spawn(move || {
            let topo = Topology::new().unwrap();
            let server = topo.dest.tcp_echo(sa(DEST_IP, 80)).unwrap();
            for _ in 0..5 {
                let conn = topo.lan.tcp_connect(server.addr(), T).unwrap();
                assert_eq!(tcp_roundtrip(conn, tag, T).unwrap(), tag);
            }
            assert_eq!(server.peers().len(), 5);
            topo.names()
        })
    };
    let (a, b) = (build(b"a"), build(b"b"));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert!(a.iter().all(|n| !b.contains(n)), "{a:?} {b:?}");
    assert!(a.iter().chain(&b).all(|n| !ns_exists(n)));
}

#[test]
fn namespaces_are_removed_on_drop() {
    let topo = Topology::new().unwrap();
    let names = topo.names();
    assert_eq!(names.len(), 5);
    assert!(names.iter().all(|n| ns_exists(n)), "{names:?}");
    drop(topo);
    assert!(names.iter().all(|n| !ns_exists(n)), "{names:?}");
}

#[test]
fn namespaces_and_processes_are_cleaned_up_after_a_panic() {
    let mut names = Vec::new();
    let mut pid = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut topo = Topology::new().unwrap();
        topo.add_netns("extra").unwrap();
        names = topo.names();
        let mut sleep = Command::new("sleep");
        sleep.arg("1000");
        pid = topo.dest.spawn(sleep).unwrap().pid();
        panic!("a failing test");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 6);
    assert!(names.iter().all(|n| !ns_exists(n)), "{names:?}");
    assert!(!pid_alive(pid), "process {pid} survived");
}

#[test]
fn spawned_processes_run_in_the_namespace_and_are_killed() {
    let topo = Topology::new().unwrap();
    let mut cat = Command::new("cat");
    cat.arg("/proc/self/net/dev").stdout(Stdio::piped());
    let out = topo.router.spawn(cat).unwrap().output(T).unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(
        text.contains("eth0:") && text.contains("macvlan0:"),
        "{text}"
    );
    assert!(!text.contains("c0:") && !text.contains("ens0:"), "{text}");

    let mut sleep = Command::new("sleep");
    sleep.arg("1000");
    let p = topo.client.spawn(sleep).unwrap();
    let ns_inode = std::fs::metadata(topo.client.path()).unwrap().ino();
    let link = std::fs::read_link(format!("/proc/{}/ns/net", p.pid())).unwrap();
    assert_eq!(link.to_str().unwrap(), format!("net:[{ns_inode}]"));
    assert!(p.is_running());
    let pid = p.pid();
    drop(topo);
    assert!(!p.is_running());
    assert!(!pid_alive(pid), "process {pid} survived");
}

#[test]
fn processes_they_start_are_killed_too() {
    let topo = Topology::new().unwrap();
    let mut sh = Command::new("sh");
    sh.args(["-c", "sleep 1000 & echo $!; wait"])
        .stdout(Stdio::piped());
    let p = topo.lan.spawn(sh).unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(p.take_stdout().unwrap()),
        &mut line,
    )
    .unwrap();
    let grandchild: u32 = line.trim().parse().unwrap();
    assert!(pid_alive(grandchild));
    drop(topo);
    // SIGKILL is delivered asynchronously.
    let deadline = std::time::Instant::now() + T;
    while pid_alive(grandchild) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!pid_alive(grandchild), "process {grandchild} survived");
}

#[test]
fn run_propagates_panics_and_results() {
    let topo = Topology::new().unwrap();
    let idx = topo
        .router
        .run(|| nix::net::if_::if_nametoindex("macvlan0").unwrap());
    assert_eq!(idx, topo.router.ifindex("macvlan0").unwrap());
    let caught = std::panic::catch_unwind(|| topo.router.run(|| panic!("inside the namespace")));
    let msg = caught.unwrap_err();
    assert_eq!(msg.downcast_ref::<&str>(), Some(&"inside the namespace"));
    // Still usable afterwards.
    topo.router.run(|| ());
}

#[test]
fn stale_namespaces_of_dead_processes_are_removed() {
    // pid_max is at most 2^22: this pid cannot be running.
    let name = format!("er-99999999-stale-{}", std::process::id());
    let ns = egress_tests::Netns::create(&name).unwrap();
    std::mem::forget(ns); // as if the test process had been killed
    assert!(ns_exists(&name));
    remove_stale();
    assert!(!ns_exists(&name));
}

/// `ip netns add` (podman does the same) binds /run/netns over itself unless it is already a
/// shared mount point: a namespace the harness named before then must still go when dropped,
/// not stay mounted beneath that bind (CI: the CNI tests' namespaces did).
#[test]
fn a_later_ip_netns_add_does_not_hide_the_harness_namespaces() {
    let pid = std::process::id();
    let ours = format!("er-{pid}-before-ip-netns");
    let theirs = format!("er-{pid}-by-ip-netns");
    let ns = egress_tests::Netns::create(&ours).unwrap();
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ip(&["netns", "add", &theirs]);
    drop(ns);
    let left = ns_exists(&ours);
    ip(&["netns", "del", &theirs]);
    assert!(
        !left,
        "{ours} is still in {NETNS_DIR} after its Netns was dropped"
    );
}

/// Without root the harness refuses to build anything, with a message that says why. Runs this
/// test binary again as `nobody`.
#[test]
fn fails_loudly_without_root() {
    if std::env::var_os("EGRESS_TESTS_AS_NOBODY").is_some() {
        let err = Topology::new().unwrap_err();
        println!("harness error: {err:#}");
        return;
    }
    // A copy outside /work/targets, which nobody may not be able to traverse.
    let exe = std::env::temp_dir().join(format!("egress-tests-nobody-{}", std::process::id()));
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    let out = Command::new(&exe)
        .args(["--exact", "fails_loudly_without_root", "--nocapture"])
        .env("EGRESS_TESTS_AS_NOBODY", "1")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("must run as root"), "{stdout}");
}

/// `spawn_container` gives a process what a container runtime gives it: the namespace's
/// network, its own mounts, and a /sys whose fs/bpf is not the host's bpffs; `unprivileged_command`
/// drops the user, the groups and every capability.
#[test]
fn container_processes_get_their_own_mounts_and_no_privileges() {
    let topo = Topology::new().unwrap();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "stat -f -c %T /sys/fs/bpf; ls -A /sys/fs/bpf | wc -l; ip -o addr show eth0",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let out = topo.router.spawn_container(cmd).unwrap().output(T).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(lines[0], "sysfs", "/sys/fs/bpf must not be a bpffs: {text}");
    assert_eq!(lines[1], "0", "/sys/fs/bpf must be empty: {text}");
    assert!(
        lines[2].contains(&POD_IP.to_string()),
        "not in the router namespace: {text}"
    );

    let mut cmd = egress_tests::unprivileged_command("sh", 1000);
    cmd.args([
        "-c",
        "id -u; id -g; grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let out = topo.router.spawn_container(cmd).unwrap().output(T).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(&lines[..2], ["1000", "1000"], "{text}");
    for cap in &lines[2..] {
        assert!(
            cap.ends_with("0000000000000000"),
            "a capability is left: {text}"
        );
    }
}

/// A pod that mounts hostPath /sys/fs/bpf: its own mount namespace and a fresh /sys, with the
/// harness's bpffs (here a node's directory on it) at /sys/fs/bpf: what it makes there is on
/// the harness's side, and what it mounts stays in the container.
#[test]
fn a_container_with_the_hosts_bpffs_has_its_own_mounts_and_the_hosts_bpffs() {
    let topo = Topology::new().unwrap();
    let node = NodeBpffs::new(&format!("{}node", topo.prefix())).unwrap();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "stat -f -c %t /sys/fs/bpf; readlink /proc/self/ns/mnt; mkdir /sys/fs/bpf/made-inside; \
         mkdir -p /tmp/er-inside && mount -t tmpfs none /tmp/er-inside && echo mounted",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let out = topo
        .router
        .spawn_with_host_bpffs(cmd, node.path())
        .unwrap()
        .output(T)
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = text.lines().collect();
    // The filesystem's magic number in hex (BPF_FS_MAGIC): busybox's stat, in the VM tests,
    // has no name for it.
    assert_eq!(
        lines[0], "cafe4a11",
        "/sys/fs/bpf must be the bpffs: {text}"
    );
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    assert_ne!(
        Path::new(lines[1]),
        ours,
        "a mount namespace of its own: {text}"
    );
    assert!(
        node.path().join("made-inside").is_dir(),
        "not the node's bpffs"
    );
    assert_eq!(lines[2], "mounted", "{text}");
    // Not by the filesystem's type: /tmp itself may be a tmpfs (it is in the VM tests).
    let tmp = Path::new("/tmp/er-inside");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let back = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some("/tmp/er-inside"));
    let _ = std::fs::remove_dir(tmp);
    assert!(
        !back,
        "a mount made in the container reached the harness: {mounts}"
    );
}
