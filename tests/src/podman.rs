//! Rootful podman for the tests in real containers, and the image `cargo xtask image` built.
//!
//! Podman reads its settings from the file CONTAINERS_CONF names, written here (the machine's
//! /etc is left alone): file limits the sandbox can grant (it lacks CAP_SYS_RESOURCE, so
//! podman's default nofile limit fails), and runc (crun fails on this machine's hybrid cgroup
//! layout). Containers only ever join network namespaces the tests made
//! (`--network ns:/run/netns/<name>`) or none: no podman network, which would route to the
//! machine's uplink.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::OnceLock,
};

use anyhow::{Context as _, Result, bail};

/// The containers.conf every podman command here uses. Containers resolve names with the
/// test destination's DNS server (the pods' dnsmasq), never with the machine's.
pub const CONTAINERS_CONF: &str = "\
[containers]
default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]
dns_servers = [\"203.0.113.25\"]

[engine]
runtime = \"runc\"
";

/// The image's name in local storage (`cargo xtask image` tags it so; its archive names it).
pub const IMAGE: &str = "localhost/egress-router";

/// A podman command with this harness's containers.conf.
pub fn podman() -> Command {
    static CONF: OnceLock<PathBuf> = OnceLock::new();
    let conf = CONF.get_or_init(|| {
        let path = std::env::temp_dir().join("egress-router-containers.conf");
        std::fs::write(&path, CONTAINERS_CONF).expect("writing containers.conf");
        path
    });
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf).stdin(Stdio::null());
    cmd
}

/// Runs a podman command to completion; its stdout, or an error with everything it printed.
pub fn podman_output(args: &[&str]) -> Result<String> {
    let out = podman()
        .args(args)
        .output()
        .context("running podman (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "podman {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where `cargo xtask image` writes the OCI archives: EGRESS_IMAGE_DIR, else `target/image` of
/// the target directory this test executable was built into.
pub fn image_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("EGRESS_IMAGE_DIR") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/image
    exe.parent()
        .and_then(|d| d.parent())
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("image")
}

/// Loads the image (`debug`: the variant with bpftool) from its archive into podman's storage,
/// once per test process, and returns its reference.
pub fn load_image(debug: bool) -> Result<String> {
    static LOADED: [OnceLock<Result<String, String>>; 2] = [OnceLock::new(), OnceLock::new()];
    LOADED[debug as usize]
        .get_or_init(|| {
            let name = if debug {
                "egress-router-debug.oci.tar"
            } else {
                "egress-router.oci.tar"
            };
            let archive = image_dir().join(name);
            if !archive.exists() {
                return Err(format!(
                    "{} missing: build it with `cargo xtask image` (cargo xtask test does)",
                    archive.display()
                ));
            }
            let out = podman_output(&["load", "-q", "-i", &archive.to_string_lossy()])
                .map_err(|e| format!("{e:#}"))?;
            // "Loaded image: localhost/egress-router:0.1.0"
            out.lines()
                .find_map(|l| l.strip_prefix("Loaded image: "))
                .or_else(|| {
                    out.lines()
                        .find_map(|l| l.strip_prefix("Loaded image(s): "))
                })
                .map(|s| s.trim().to_string())
                .ok_or_else(|| format!("podman load printed no image name: {out}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Everything a container printed (stdout, then stderr).
pub fn podman_logs(name: &str) -> String {
    podman()
        .args(["logs", name])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default()
}
