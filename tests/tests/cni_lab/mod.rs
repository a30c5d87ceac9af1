//! The CNI tests' lab (shared by `cni`, which the VM kernels run too, and `cni_podman`, host
//! only: it needs podman and the image).
//!
//! egress-router as the OpenShift 4.x `egress-router` CNI plugin, invoked exactly as a runtime
//! invokes it: the binary run in the node's (host's) network namespace with CNI_COMMAND,
//! CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME and CNI_PATH set and the network configuration on
//! stdin, after the pod's eth0 was made by Debian's reference plugins (bridge + host-local), as
//! the primary network would.
//!
//! ```text
//! client pod  eth0 10.128.0.x ─┐
//!                              cni0 10.128.0.1 (node ns; the bridge plugin's)
//! router pod  eth0 10.128.0.y ─┘
//! router pod  net1: the plugin's macvlan on ens0, 192.168.12.99/24, default via 192.168.12.1
//! node ns     ens0 192.168.12.2/24, default via 192.168.12.1 (the master the plugin finds)
//!      ── veth ── lan ns lan0 192.168.12.1/24, d0 203.0.113.1/24 ── veth ── dest ns d1 203.0.113.25/24
//! ```
#![allow(
    dead_code,
    unused_imports,
    reason = "each test target that includes this module uses a part of it"
)]

// Re-exported: the tests use the same names.
pub use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

pub use egress_tests::{
    NAME_PREFIX, Netns, kernel_has_tcx, require_root, router_bin, tcp_roundtrip, udp_roundtrip,
};
pub use ipnet::Ipv4Net;
pub use serde_json::{Value, json};

pub const T: Duration = Duration::from_secs(5);
pub const CNI_BIN: &str = "/usr/lib/cni";
pub const IFNAME: &str = "net1";
pub const SOURCE: Ipv4Addr = Ipv4Addr::new(192, 168, 12, 99);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 12, 1);
pub const DEST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 25);
pub const FALLBACK_DEST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 26);

pub fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

pub fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// The reference plugins the primary network is made with; missing: fail, saying how to get
/// them.
pub fn reference_plugin(name: &str) -> PathBuf {
    let p = Path::new(CNI_BIN).join(name);
    assert!(
        p.exists(),
        "{} missing: the CNI tests make the pod's eth0 with Debian's reference plugins \
         (package containernetworking-plugins; `cargo xtask setup` installs it)",
        p.display()
    );
    p
}

/// The namespaces of one test, and the host-local data of its cluster network.
pub struct Lab {
    pub node: Netns,
    pub lan: Netns,
    pub dest: Netns,
    /// The router pod; taken (and so deleted) by the test of DEL after the namespace is gone.
    pub router_ns: Option<Netns>,
    /// CNI_NETNS of the router pod (which stays the same once the namespace is gone).
    pub router_path: PathBuf,
    pub client: Netns,
    pub ipam_dir: PathBuf,
    pub prefix: String,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.ipam_dir);
    }
}

/// A plugin run's outcome: exit status, stdout parsed as JSON (when it is), stderr.
#[derive(Debug)]
pub struct Run {
    pub ok: bool,
    pub json: Value,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn of(out: Output) -> Run {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        Run {
            ok: out.status.success(),
            json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn expect_ok(self, what: &str) -> Run {
        assert!(
            self.ok,
            "{what} failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// The CNI error (code, msg), asserting the run failed with one.
    #[track_caller]
    pub fn error(&self) -> (u64, String) {
        assert!(
            !self.ok,
            "expected a failure, got success:\n{}\n{}",
            self.stdout, self.stderr
        );
        let code = self.json["code"].as_u64().unwrap_or_else(|| {
            panic!(
                "no CNI error JSON on stdout: {:?}\nstderr: {}",
                self.stdout, self.stderr
            )
        });
        (code, self.json["msg"].as_str().unwrap_or("").to_string())
    }
}

impl Lab {
    pub fn router(&self) -> &Netns {
        self.router_ns
            .as_ref()
            .expect("the router namespace was deleted")
    }

    pub fn new() -> Lab {
        require_root().unwrap();
        reference_plugin("bridge");
        reference_plugin("host-local");
        static N: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "{NAME_PREFIX}{}-cni{}-",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let ns = |role: &str| Netns::create(&format!("{prefix}{role}")).unwrap();
        let router = ns("router");
        let lab = Lab {
            node: ns("node"),
            lan: ns("lan"),
            dest: ns("dest"),
            router_path: router.path(),
            router_ns: Some(router),
            client: ns("client"),
            ipam_dir: std::env::temp_dir().join(format!("{prefix}ipam")),
            prefix,
        };
        for n in [&lab.node, &lab.lan, &lab.dest, lab.router(), &lab.client] {
            n.link_up("lo").unwrap();
        }
        lab.node.add_veth_to("ens0", &lab.lan, "lan0").unwrap();
        lab.node.add_addr("ens0", net("192.168.12.2/24")).unwrap();
        lab.node
            .add_route(Ipv4Net::default(), Some(GATEWAY), "ens0")
            .unwrap();
        lab.lan.add_addr("lan0", net("192.168.12.1/24")).unwrap();
        lab.lan.add_veth_to("d0", &lab.dest, "d1").unwrap();
        lab.lan.add_addr("d0", net("203.0.113.1/24")).unwrap();
        lab.dest.add_addr("d1", net("203.0.113.25/24")).unwrap();
        lab.dest.add_addr("d1", net("203.0.113.26/24")).unwrap();
        lab.dest
            .add_route(
                Ipv4Net::default(),
                Some(Ipv4Addr::new(203, 0, 113, 1)),
                "d1",
            )
            .unwrap();
        lab.lan.set_sysctl("net.ipv4.ip_forward", "1").unwrap();
        lab
    }

    /// The primary network's configuration: the reference bridge plugin with host-local.
    pub fn cluster_network(&self) -> String {
        json!({
            "cniVersion": "1.0.0",
            "name": "cluster",
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipam": {
                "type": "host-local",
                "subnet": "10.128.0.0/24",
                "dataDir": self.ipam_dir,
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        })
        .to_string()
    }

    /// Runs `plugin` as a runtime does, in the node namespace, for the attachment
    /// (CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME) `to`, with `env` added to the environment.
    pub fn invoke(
        &self,
        plugin: &Path,
        command: &str,
        to: (&str, Option<&Path>, &str),
        config: &str,
        env: &[(&str, &str)],
    ) -> Run {
        let (container, netns, ifname) = to;
        let stdin = std::env::temp_dir().join(format!(
            "{}{container}-{command}-{}.json",
            self.prefix,
            std::process::id()
        ));
        std::fs::File::create(&stdin)
            .and_then(|mut f| f.write_all(config.as_bytes()))
            .unwrap();
        let mut cmd = Command::new(plugin);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", CNI_BIN)
            .stdin(std::fs::File::open(&stdin).unwrap())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(n) = netns {
            cmd.env("CNI_NETNS", n);
        }
        cmd.envs(env.iter().copied());
        let out = self
            .node
            .spawn(cmd)
            .unwrap()
            .output(Duration::from_secs(60))
            .unwrap();
        let _ = std::fs::remove_file(&stdin);
        Run::of(out)
    }

    pub fn container(&self, role: &str) -> String {
        format!("{}{role}", self.prefix.replace('-', "_"))
    }

    /// Gives `pod` its eth0 on the cluster network (bridge + host-local) and returns its IP.
    pub fn primary(&self, pod: &Netns, role: &str) -> Ipv4Addr {
        let r = self
            .invoke(
                &reference_plugin("bridge"),
                "ADD",
                (&self.container(role), Some(&pod.path()), "eth0"),
                &self.cluster_network(),
                &[],
            )
            .expect_ok("the bridge plugin's ADD (the primary network)");
        let ip = r.json["ips"][0]["address"].as_str().unwrap();
        ip.split('/').next().unwrap().parse().unwrap()
    }

    /// The router pod with its eth0, and the client pod with its eth0: (router IP, client IP).
    pub fn pods(&self) -> (Ipv4Addr, Ipv4Addr) {
        (
            self.primary(self.router(), "router"),
            self.primary(&self.client, "client"),
        )
    }

    /// The egress-router plugin, invoked for the router pod.
    pub fn egress(&self, command: &str, config: &str) -> Run {
        self.egress_with(command, config, &[])
    }

    pub fn egress_with(&self, command: &str, config: &str, env: &[(&str, &str)]) -> Run {
        self.invoke(
            &router_bin(),
            command,
            (&self.container("router"), Some(&self.router_path), IFNAME),
            config,
            env,
        )
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.router().default_pin_dir().unwrap()
    }
}

/// The configuration as the cluster network operator renders it (bindata/egress-router).
pub fn rendered(cni_version: &str, destinations: &[&str], fallback: Option<&str>) -> String {
    let mut ip = json!({
        "addresses": [format!("{SOURCE}/24")],
        "destinations": destinations,
        "gateway": GATEWAY.to_string(),
    });
    if let Some(f) = fallback {
        ip["fallbackIP"] = json!(f);
    }
    json!({
        "cniVersion": cni_version,
        "type": "egress-router",
        "name": "egress-router-cni-nad",
        "ip": ip,
        "log_level": "debug",
    })
    .to_string()
}

pub fn bpftool() -> Command {
    assert!(
        Path::new("/usr/sbin/bpftool").exists() || which("bpftool"),
        "bpftool missing (package bpftool; `cargo xtask setup` installs it)"
    );
    Command::new("bpftool")
}

/// The kernel objects behind a pin directory, as bpftool shows them: ("link" | "prog" | "map",
/// id, what), for every link pin (and the program it runs) and every map pin.
pub fn pinned_objects(dir: &Path) -> Vec<(&'static str, u64, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let kind = if name.starts_with("link_") {
            "link"
        } else {
            "map"
        };
        let out = bpftool()
            .args(["-j", kind, "show", "pinned"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bpftool {kind} show pinned {}: {out:?}",
            p.display()
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        found.push((kind, v["id"].as_u64().unwrap(), name.clone()));
        if kind == "link" {
            found.push((
                "prog",
                v["prog_id"].as_u64().unwrap(),
                format!("the program of {name}"),
            ));
        }
    }
    found
}

/// The programs of the tc filters (clsact) on `iface` of `ns`, as `bpftool net show` lists
/// them: ("prog", id, name).
pub fn clsact_programs(ns: &Netns, iface: &str) -> Vec<(&'static str, u64, String)> {
    let mut cmd = bpftool();
    cmd.args(["-j", "net", "show", "dev", iface])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = ns.spawn(cmd).unwrap().output(T).unwrap();
    assert!(
        out.status.success(),
        "bpftool net show dev {iface}: {out:?}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["tc"].as_array().cloned().unwrap_or_default())
        .map(|tc| {
            (
                "prog",
                tc["prog_id"].as_u64().unwrap_or(0),
                format!("{} on {iface}", tc["name"].as_str().unwrap_or("?")),
            )
        })
        .collect()
}

/// Whether the kernel still has the object (`prog`, `link`, `map`) with this id, waiting up
/// to 5 s for it to go (programs and maps are freed after an RCU grace period).
pub fn bpf_object_lingers(kind: &str, id: u64) -> bool {
    let deadline = std::time::Instant::now() + T;
    loop {
        let exists = bpftool()
            .args([kind, "show", "id", &id.to_string()])
            .output()
            .is_ok_and(|o| o.status.success());
        if !exists {
            return false;
        }
        if std::time::Instant::now() > deadline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn which(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).exists()))
}

#[track_caller]
pub fn assert_leaves_from_source(server: &egress_tests::EchoServer) {
    let peers = server.wait_for_peers(1, T).unwrap();
    assert!(
        peers.iter().all(|p| p.ip() == std::net::IpAddr::V4(SOURCE)),
        "the destination must see only {SOURCE}, saw {peers:?}"
    );
}
