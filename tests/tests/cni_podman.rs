//! egress-router as a CNI plugin driven by podman's CNI network backend (host only: podman and
//! the image). The lab is the `cni` tests' own.
mod cni_lab;

use cni_lab::*;

/// A containers.conf for podman's CNI backend with this lab's network configurations (written
/// by the test) and plugin directories: the egress-router binary as `egress-router`, then
/// Debian's reference plugins. Nothing of the machine's /etc is read or changed.
fn podman_cni_conf(lab: &Lab, networks: &Path, plugins: &Path) -> PathBuf {
    let conf = std::env::temp_dir().join(format!("{}containers.conf", lab.prefix));
    let base = egress_tests::podman::CONTAINERS_CONF;
    std::fs::write(
        &conf,
        format!(
            "{base}\n[network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\n\
             cni_plugin_dirs = [\"{}\", \"{CNI_BIN}\"]\n",
            networks.display(),
            plugins.display()
        ),
    )
    .unwrap();
    conf
}

/// Podman, in the node namespace (so the plugins it runs see the node's interfaces, as on a
/// node), with `conf`: its stdout, or a panic with everything it printed.
fn podman_on_node(lab: &Lab, conf: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = lab
        .node
        .spawn(cmd)
        .expect("podman (cargo xtask setup installs it)")
        .output(Duration::from_secs(120))
        .unwrap();
    assert!(
        out.status.success(),
        "podman {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Podman's CNI backend drives the plugin as a runtime would: a container started on a
/// bridge network (its eth0), then `podman network connect` to the egress-router network runs
/// the plugin's ADD (eth1, the macvlan on the node's ens0); clients reach the container's IP and
/// leave from ip.addresses; `podman network disconnect` runs DEL, which leaves no program, link
/// or pin. (The egress network is connected after the start, not given to `podman run` with the
/// bridge one: podman sets up a container's networks in no fixed order (containers/common
/// libnetwork/cni ranges over a map), and the plugin needs the pod's eth0 first, which Multus
/// guarantees by calling the cluster network first.)
#[test]
fn podman_cni_backend_runs_the_plugin() {
    let lab = Lab::new();
    let image = egress_tests::podman::load_image(false).unwrap();
    let tcp = lab.dest.tcp_echo(sock(DEST, 8000)).unwrap();
    let dir = std::env::temp_dir().join(format!("{}podman", lab.prefix));
    let (networks, plugins) = (dir.join("net.d"), dir.join("bin"));
    std::fs::create_dir_all(&networks).unwrap();
    std::fs::create_dir_all(&plugins).unwrap();
    std::os::unix::fs::symlink(router_bin(), plugins.join("egress-router")).unwrap();
    let name = |role: &str| format!("{}{role}", lab.prefix.replace('_', "-"));
    let (primary, egress, ctr) = (name("primary"), name("egress"), name("router"));
    // The primary network: the bridge plugin, as podman's own networks are (minus the firewall
    // and port-mapping plugins, which would change the node's nftables).
    let bridge = format!("erb{}", std::process::id() % 100_000);
    let conflist = |name: &str, plugin: Value| {
        json!({"cniVersion": "0.4.0", "name": name, "plugins": [plugin]}).to_string()
    };
    std::fs::write(
        networks.join(format!("{primary}.conflist")),
        conflist(
            &primary,
            json!({
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipam": {
                    "type": "host-local",
                    "subnet": "10.128.0.0/24",
                    "dataDir": lab.ipam_dir,
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            }),
        ),
    )
    .unwrap();
    let plugin: Value =
        serde_json::from_str(&rendered("0.4.0", &["80 TCP 203.0.113.25 8000"], None)).unwrap();
    std::fs::write(
        networks.join(format!("{egress}.conflist")),
        conflist(&egress, plugin),
    )
    .unwrap();
    let conf = podman_cni_conf(&lab, &networks, &plugins);
    let podman = |args: &[&str]| podman_on_node(&lab, &conf, args);
    let listed = podman(&["network", "ls", "--format", "{{.Name}}"]);
    assert!(
        listed.contains(&primary) && listed.contains(&egress),
        "{listed}"
    );
    // The container: the image's exporter, which serves the metrics of whatever dataplane is
    // attached to its eth0 (privileged, to open the maps by id: no pins are in its sight).
    podman(&[
        "run",
        "-d",
        "--privileged",
        "--name",
        &ctr,
        "--network",
        &primary,
        &image,
        "exporter",
    ]);
    // The container, then the configuration (podman rm needs it), also when the test fails.
    let _remove = Cleanup(Box::new({
        let (conf, ctr, dir) = (conf.clone(), ctr.clone(), dir.clone());
        let node = lab.node.name().to_string();
        move || {
            let _ = Command::new("ip")
                .args([
                    "netns", "exec", &node, "podman", "rm", "-f", "-t", "0", &ctr,
                ])
                .env("CONTAINERS_CONF", &conf)
                .output();
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(&conf);
        }
    }));
    let pid = podman(&["inspect", "-f", "{{.State.Pid}}", &ctr]);
    let pod = Netns::adopt(
        &format!("{}podman-pod", lab.prefix),
        Path::new(&format!("/proc/{pid}/ns/net")),
    )
    .unwrap();
    let ip: Ipv4Addr = podman(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{primary}\").IPAddress}}}}"),
        &ctr,
    ])
    .parse()
    .unwrap();

    podman(&["network", "connect", &egress, &ctr]);
    let conn = lab.node.tcp_connect(sock(ip, 80), T).unwrap();
    assert_eq!(
        tcp_roundtrip(conn, b"through podman's CNI", T).unwrap(),
        b"through podman's CNI"
    );
    assert_leaves_from_source(&tcp);
    // The exporter in the container reads the dataplane the plugin attached.
    let metrics = || {
        let c = lab.node.tcp_connect(sock(ip, 9190), T).unwrap();
        egress_tests::pod::exchange(
            c,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
    };
    let mut text = metrics();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !text.contains("egress_router_redirect_new_flows_total 1")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(500));
        text = metrics();
    }
    assert!(
        text.contains("egress_router_redirect_new_flows_total 1")
            && text.contains("egress_router_configured_rules{kind=\"redirect\"} 1"),
        "{text}"
    );
    let pins = pod.default_pin_dir().unwrap();
    let mut objects = pinned_objects(&pins);
    if !kernel_has_tcx() {
        for iface in ["eth0", "eth1"] {
            objects.extend(clsact_programs(&pod, iface));
        }
    }
    assert_eq!(
        objects.iter().filter(|o| o.0 == "prog").count(),
        2,
        "a program on eth0 and on eth1: {objects:?}"
    );

    podman(&["network", "disconnect", &egress, &ctr]);
    assert!(!pins.exists(), "DEL removed the pins: {}", pins.display());
    assert!(
        clsact_programs(&pod, "eth0").is_empty(),
        "DEL detached the programs"
    );
    for (kind, id, what) in &objects {
        assert!(
            !bpf_object_lingers(kind, *id),
            "{what} ({kind} {id}) is left"
        );
    }
    let gone = pod
        .netlink(|h| async move { Ok(egress_tests::netlink::link(&h, "eth1").await.is_err()) })
        .unwrap();
    assert!(gone, "DEL removed the macvlan eth1");
}

/// Runs its closure when dropped, also while a failed test unwinds.
struct Cleanup(Box<dyn Fn()>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        (self.0)()
    }
}
