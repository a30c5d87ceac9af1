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
mod cni_lab;

use cni_lab::*;

#[test]
fn add_then_traffic_leaves_from_the_configured_address_check_then_del_leaves_nothing() {
    let lab = Lab::new();
    let (router_ip, _client_ip) = lab.pods();
    let tcp = lab.dest.tcp_echo(sock(DEST, 8000)).unwrap();
    let udp = lab.dest.udp_echo(sock(DEST, 53)).unwrap();
    let fallback = lab.dest.tcp_echo(sock(FALLBACK_DEST, 9000)).unwrap();
    let log = std::env::temp_dir().join(format!("{}plugin.log", lab.prefix));
    let mut config: Value = serde_json::from_str(&rendered(
        "0.4.0",
        &["80 TCP 203.0.113.25 8000", "53 udp 203.0.113.25"],
        Some("203.0.113.26"),
    ))
    .unwrap();
    config["log_file"] = json!(log);
    let config = config.to_string();

    let add = lab.egress("ADD", &config).expect_ok("egress-router ADD");
    // The result, in the 0.4.0 layout: the interface, the address with its gateway.
    assert_eq!(add.json["cniVersion"], "0.4.0", "{}", add.stdout);
    assert_eq!(add.json["interfaces"][0]["name"], IFNAME, "{}", add.stdout);
    assert_eq!(
        add.json["interfaces"][0]["sandbox"],
        lab.router().path().display().to_string()
    );
    assert_eq!(add.json["ips"][0]["address"], format!("{SOURCE}/24"));
    assert_eq!(add.json["ips"][0]["gateway"], GATEWAY.to_string());
    assert_eq!(add.json["ips"][0]["version"], "4");

    // Real traffic from the client pod to the router pod's IP, leaving from ip.addresses.
    let conn = lab.client.tcp_connect(sock(router_ip, 80), T).unwrap();
    assert_eq!(
        tcp_roundtrip(conn, b"through the plugin", T).unwrap(),
        b"through the plugin"
    );
    assert_leaves_from_source(&tcp);
    let s = lab.client.udp_bind(sock(Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    assert_eq!(
        udp_roundtrip(&s, sock(router_ip, 53), b"dns?", T).unwrap(),
        b"dns?"
    );
    assert_leaves_from_source(&udp);
    // ip.fallbackIP: a port no rule names goes to the fallback, port kept.
    let conn = lab.client.tcp_connect(sock(router_ip, 9000), T).unwrap();
    assert_eq!(tcp_roundtrip(conn, b"fallback", T).unwrap(), b"fallback");
    assert_leaves_from_source(&fallback);

    lab.egress("CHECK", &config)
        .expect_ok("egress-router CHECK after ADD");
    // log_file and log_level (debug) are honoured.
    let logged = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(
        logged.contains("CNI ADD") && logged.contains("DEBUG") && logged.contains("CNI CHECK"),
        "{}: {logged}",
        log.display()
    );

    // What ADD made, as bpftool sees it: the maps, and on each interface a program, through a
    // pinned tcx link (kernel >= 6.6: the pins are on the host's bpffs) or a clsact filter.
    let pins = lab.pin_dir();
    let mut objects = pinned_objects(&pins);
    let tcx = kernel_has_tcx();
    if !tcx {
        for iface in ["eth0", IFNAME] {
            objects.extend(clsact_programs(lab.router(), iface));
        }
    }
    let count = |k: &str| objects.iter().filter(|o| o.0 == k).count();
    assert_eq!(
        (count("link"), count("prog"), count("map")),
        (
            if tcx { 2 } else { 0 },
            2,
            egress_router::dataplane::PINNED_MAPS.len()
        ),
        "links, programs, maps: {objects:?}"
    );

    lab.egress("DEL", &config).expect_ok("egress-router DEL");
    assert!(
        lab.router().ifindex(IFNAME).is_err(),
        "{IFNAME} still in the pod after DEL"
    );
    assert!(!pins.exists(), "{} still there after DEL", pins.display());
    let left = clsact_programs(lab.router(), "eth0");
    assert!(left.is_empty(), "a filter is left on eth0: {left:?}");
    for (kind, id, what) in &objects {
        assert!(
            !bpf_object_lingers(kind, *id),
            "{kind} {id} ({what}) left after DEL"
        );
    }
    // CHECK now says what is missing.
    let (code, msg) = lab.egress("CHECK", &config).error();
    assert_eq!(code, 101, "{msg}");
    assert!(msg.contains("no egress router attachment"), "{msg}");
}

#[test]
fn add_twice_del_twice_and_del_after_the_namespace_is_gone() {
    let mut lab = Lab::new();
    let (router_ip, _) = lab.pods();
    let tcp = lab.dest.tcp_echo(sock(DEST, 8080)).unwrap();
    let config = rendered("1.0.0", &["8080 tcp 203.0.113.25"], None);
    let first = lab.egress("ADD", &config).expect_ok("the first ADD");
    let second = lab.egress("ADD", &config).expect_ok("the second ADD");
    assert_eq!(first.json["cniVersion"], "1.0.0");
    assert_eq!(
        first.json["interfaces"], second.json["interfaces"],
        "the same interface both times"
    );
    lab.egress("CHECK", &config)
        .expect_ok("CHECK after two ADDs");
    let conn = lab.client.tcp_connect(sock(router_ip, 8080), T).unwrap();
    assert_eq!(tcp_roundtrip(conn, b"twice", T).unwrap(), b"twice");
    assert_leaves_from_source(&tcp);

    // CHECK notices what is no longer as ADD left it: here the default route via net1.
    let idx = lab.router().ifindex(IFNAME).unwrap();
    lab.router()
        .netlink(|h| async move {
            let mut del = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(GATEWAY)
                .output_interface(idx)
                .build();
            del.header.scope = netlink_packet_route::route::RouteScope::Universe;
            h.route().del(del).execute().await?;
            Ok(())
        })
        .unwrap();
    let (code, msg) = lab.egress("CHECK", &config).error();
    assert_eq!(code, 101, "{msg}");
    assert!(
        msg.starts_with("the default route is not via 192.168.12.1 on net1 (ip.gateway)"),
        "{msg}"
    );
    // ADD again repairs it in place.
    lab.egress("ADD", &config)
        .expect_ok("ADD over a changed attachment");
    lab.egress("CHECK", &config)
        .expect_ok("CHECK after the repair");

    lab.egress("DEL", &config).expect_ok("the first DEL");
    lab.egress("DEL", &config).expect_ok("the second DEL");
    assert!(lab.router().ifindex(IFNAME).is_err());

    // ADD again, then the namespace goes before DEL (the runtime's order on a crash).
    lab.egress("ADD", &config).expect_ok("ADD after DEL");
    let pins = lab.pin_dir();
    assert!(pins.exists());
    drop(lab.router_ns.take());
    assert!(
        !lab.router_path.exists(),
        "the router namespace is still named"
    );
    lab.egress("DEL", &config)
        .expect_ok("DEL after the namespace is gone");
    assert!(!pins.exists(), "{} left after DEL", pins.display());
    // And without CNI_NETNS at all, as the spec allows for DEL.
    lab.invoke(
        &router_bin(),
        "DEL",
        (&lab.container("router"), None, IFNAME),
        &config,
        &[],
    )
    .expect_ok("DEL without CNI_NETNS");
}

#[test]
fn the_qe_resource_as_the_operator_renders_it_is_accepted() {
    // OpenShift QE's EgressRouter: 192.168.3.10/24 via 192.168.3.1 with these three rules,
    // rendered by the cluster network operator into this NetworkAttachmentDefinition config.
    let lab = Lab::new();
    lab.pods();
    let config = r#"{
        "cniVersion": "0.4.0",
        "type": "egress-router",
        "name": "egress-router-cni-nad",
        "ip": {
          "addresses": [
            "192.168.3.10/24"
            ],
          "destinations": ["80 UDP 10.100.3.0","8080 SCTP 203.0.113.26 80","8443 TCP 203.0.113.27 443"],
           
          "gateway": "192.168.3.1"
            },
          "log_file": "/tmp/egress-router-log",
          "log_level": "debug"
        }"#;
    let add = lab
        .egress("ADD", config)
        .expect_ok("ADD of the QE resource's config");
    assert_eq!(add.json["ips"][0]["address"], "192.168.3.10/24");
    lab.egress("CHECK", config)
        .expect_ok("CHECK of the QE resource");
    lab.egress("DEL", config)
        .expect_ok("DEL of the QE resource");
}

#[test]
fn every_bad_field_gives_its_code_and_a_message_naming_it_and_nothing_is_applied() {
    let lab = Lab::new();
    lab.pods();
    let good = |f: &dyn Fn(&mut Value)| {
        let mut v: Value =
            serde_json::from_str(&rendered("1.0.0", &["80 tcp 203.0.113.25"], None)).unwrap();
        f(&mut v);
        v.to_string()
    };
    let cases: Vec<(String, u64, &str)> = vec![
        (
            good(&|v| v["ip"]["addresses"] = json!(["192.168.12.300/24"])),
            7,
            "ip.addresses[0] '192.168.12.300/24' is invalid",
        ),
        (
            good(&|v| v["ip"]["addresses"] = json!([])),
            7,
            "ip.addresses is empty",
        ),
        (
            good(&|v| v["ip"]["gateway"] = json!("nope")),
            7,
            "ip.gateway 'nope' is invalid",
        ),
        (
            good(&|v| {
                v["ip"].as_object_mut().unwrap().remove("gateway");
            }),
            7,
            "ip.gateway is missing",
        ),
        (
            good(&|v| {
                v["ip"]["destinations"] = json!(["80 tcp 203.0.113.25", "70000 udp 203.0.113.25"])
            }),
            7,
            "ip.destinations[1]: '70000 udp 203.0.113.25': Invalid port: 70000, must be in the range 1 to 65535",
        ),
        (
            good(&|v| v["ip"]["destinations"] = json!(["80 icmp 203.0.113.25"])),
            7,
            "ip.destinations[0]: '80 icmp 203.0.113.25': EGRESS_DESTINATION value '80 icmp 203.0.113.25' is invalid",
        ),
        (
            good(&|v| v["ip"]["destinations"] = json!(["203.0.113.9", "80 tcp 203.0.113.25"])),
            7,
            "ip.destinations[1]: '80 tcp 203.0.113.25': EGRESS_DESTINATION fallback IP must be the last line",
        ),
        (
            good(&|v| v["ip"]["fallbackIP"] = json!("203.0.113.999")),
            7,
            "ip.fallbackIP '203.0.113.999' is invalid",
        ),
        (
            good(&|v| v["ip"]["fallbackIp"] = json!("203.0.113.9")),
            2,
            "ip.fallbackIp is not a field of ip",
        ),
        (
            good(&|v| v["interfaceType"] = json!("ipvlan")),
            2,
            "interfaceType 'ipvlan' is not supported",
        ),
        (
            good(&|v| v["interfaceArgs"] = json!({"mode": "bridged"})),
            7,
            "interfaceArgs.mode 'bridged' is not a macvlan mode",
        ),
        (
            good(&|v| v["interfaceArgs"] = json!({"mtu": "big"})),
            7,
            "interfaceArgs.mtu 'big' is invalid",
        ),
        (
            good(&|v| v["interfaceArgs"] = json!({"mtu": "9000"})),
            7,
            "interfaceArgs.mtu '9000' is greater than the MTU of the master ens0",
        ),
        (
            good(&|v| v["interfaceArgs"] = json!({"master": "eth9"})),
            7,
            "interfaceArgs.master 'eth9': there is no such interface in the host's network namespace",
        ),
        (
            good(&|v| v["interfaceArgs"] = json!({"parent": "ens0"})),
            2,
            "interfaceArgs.parent is not supported",
        ),
        (
            good(&|v| v["log_level"] = json!("chatty")),
            7,
            "log_level 'chatty' is invalid",
        ),
        (
            good(&|v| v["log_file"] = json!("relative.log")),
            7,
            "log_file 'relative.log' is not an absolute path",
        ),
        (
            good(&|v| v["podIP"] = json!({})),
            2,
            "podIP is not supported",
        ),
        (good(&|v| v["cniVersion"] = json!("0.2.0")), 1, ""),
        ("{ not json".to_string(), 6, ""),
    ];
    for (config, code, msg) in &cases {
        let r = lab.egress("ADD", config);
        let (got, got_msg) = r.error();
        assert_eq!(got, *code, "{config}: {got_msg}\n{}", r.stderr);
        assert!(
            got_msg.starts_with(msg),
            "{config}: expected a message starting with {msg:?}, got {got_msg:?}"
        );
        assert!(
            lab.router().ifindex(IFNAME).is_err(),
            "{config}: the failed ADD left {IFNAME}"
        );
        assert!(
            !lab.pin_dir().exists(),
            "{config}: the failed ADD left {}",
            lab.pin_dir().display()
        );
    }
    // A failure once the macvlan exists (here the connection table cannot be created: the
    // runtime's environment asks for 0 entries): everything made is taken down again, and the
    // pod has its default route back.
    let r = lab.egress_with(
        "ADD",
        &rendered("1.0.0", &["80 tcp 203.0.113.25"], None),
        &[("EGRESS_CONNTRACK_SIZE", "0")],
    );
    let (code, msg) = r.error();
    assert_eq!(code, 100, "{msg}\n{}", r.stderr);
    assert!(msg.contains("nothing is left behind"), "{msg}");
    assert!(
        lab.router().ifindex(IFNAME).is_err(),
        "the failed ADD left {IFNAME}"
    );
    assert!(!lab.pin_dir().exists(), "the failed ADD left its pins");
    let routes = lab
        .router()
        .netlink(|h| async move { egress_tests::netlink::routes(&h).await })
        .unwrap();
    let eth0 = lab.router().ifindex("eth0").unwrap();
    assert!(
        routes.iter().any(|r| r.dst == Ipv4Net::default()
            && r.gateway == Some(Ipv4Addr::new(10, 128, 0, 1))
            && r.oif == Some(eth0)),
        "the pod's default route via eth0 is not back: {routes:?}"
    );

    // A pod without eth0: refused before anything is made.
    let bare = Netns::create(&format!("{}bare", lab.prefix)).unwrap();
    let r = lab.invoke(
        &router_bin(),
        "ADD",
        (&lab.container("bare"), Some(&bare.path()), IFNAME),
        &rendered("1.0.0", &["80 tcp 203.0.113.25"], None),
        &[],
    );
    let (code, msg) = r.error();
    assert_eq!(code, 100, "{msg}");
    assert!(msg.starts_with("the pod has no eth0"), "{msg}");
    assert!(bare.ifindex(IFNAME).is_err());
    // A namespace that does not exist.
    let r = lab.invoke(
        &router_bin(),
        "ADD",
        (
            &lab.container("ghost"),
            Some(Path::new("/run/netns/er-no-such-namespace")),
            IFNAME,
        ),
        &rendered("1.0.0", &["80 tcp 203.0.113.25"], None),
        &[],
    );
    assert_eq!(r.error().0, 3);
    // An invalid dataplane setting in the runtime's environment: code 4 too, with JSON.
    let r = lab.egress_with(
        "ADD",
        &rendered("1.0.0", &["80 tcp 203.0.113.25"], None),
        &[("EGRESS_PORT_RANGE", "9-1")],
    );
    let (code, msg) = r.error();
    assert_eq!(code, 4, "{msg}");
    assert!(msg.contains("9-1"), "{msg}");
    assert!(lab.router().ifindex(IFNAME).is_err());
    // The error result speaks the configuration's version, as the spec asks.
    assert_eq!(r.json["cniVersion"], "1.0.0", "{}", r.stdout);
    let r = lab.egress_with(
        "ADD",
        &rendered("0.4.0", &["80 tcp 203.0.113.25"], None),
        &[("EGRESS_PORT_RANGE", "9-1")],
    );
    assert_eq!(r.error().0, 4);
    assert_eq!(r.json["cniVersion"], "0.4.0", "{}", r.stdout);
    // Missing CNI variables: the spec's code 4.
    let r = lab.invoke(
        &router_bin(),
        "ADD",
        (&lab.container("router"), None, IFNAME),
        "{}",
        &[],
    );
    assert_eq!(r.error().0, 4, "{:?}", r);
}

#[test]
fn version_status_and_gc() {
    let lab = Lab::new();
    let v = lab.egress("VERSION", "{}").expect_ok("VERSION");
    let versions: Vec<&str> = v.json["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(versions.contains(&want), "{want} not in {versions:?}");
    }
    let status =
        json!({"cniVersion": "1.1.0", "name": "egress-router-cni-nad", "type": "egress-router"});
    lab.egress("STATUS", &status.to_string())
        .expect_ok("STATUS");

    // GC removes an attachment the runtime no longer lists. GC covers every attachment of
    // its network, so this test's network has a name of its own (the other tests run beside
    // it with the operator's name), and a second attachment that the runtime lists stays.
    let (router_ip, _) = lab.pods();
    let mut config: Value =
        serde_json::from_str(&rendered("1.1.0", &["80 tcp 203.0.113.25 8000"], None)).unwrap();
    config["name"] = json!(format!("{}gc", lab.prefix));
    let config = config.to_string();
    lab.egress("ADD", &config).expect_ok("ADD (1.1.0)");
    let kept = Netns::create(&format!("{}kept", lab.prefix)).unwrap();
    lab.primary(&kept, "kept");
    let kept_id = lab.container("kept");
    lab.invoke(
        &router_bin(),
        "ADD",
        (&kept_id, Some(&kept.path()), IFNAME),
        &config,
        &[],
    )
    .expect_ok("ADD of the attachment GC keeps");
    let pins = lab.pin_dir();
    let mut gc: Value = serde_json::from_str(&config).unwrap();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": kept_id, "ifname": IFNAME}]);
    lab.egress("GC", &gc.to_string()).expect_ok("GC");
    assert!(lab.router().ifindex(IFNAME).is_err(), "GC left {IFNAME}");
    assert!(
        kept.ifindex(IFNAME).is_ok(),
        "GC removed the listed attachment"
    );
    lab.invoke(
        &router_bin(),
        "DEL",
        (&kept_id, Some(&kept.path()), IFNAME),
        &config,
        &[],
    )
    .expect_ok("DEL of the kept attachment");
    assert!(!pins.exists(), "GC left {}", pins.display());
    let conn = lab
        .client
        .tcp_connect(sock(router_ip, 80), Duration::from_millis(500));
    assert!(conn.is_err(), "the router still forwards port 80 after GC");
}
