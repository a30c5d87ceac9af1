//! `cargo xtask setup`: installs, idempotently, what a fresh machine of this kind lacks. One
//! line per step; a step that cannot be done stops everything with the reason.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::util::{is_root, output};

/// bpf-linker release built against the nightly's own LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests and benchmarks use. dnsmasq-base is the binary without the
/// system service (a service would take port 53 on every address).
pub const DEBIAN_PACKAGES: &[&str] = &[
    "bpftool",      // `bpftool map dump` tests and README examples
    "iproute2",     // `ip`/`tc` for humans debugging a test topology
    "nftables",     // the OpenShift baseline in benchmarks
    "iperf3",       // throughput benchmarks
    "netsniff-ng",  // trafgen: the packet generator of the UDP benchmark
    "dnsmasq-base", // the DNS server of the proxy tests
    "squid",        // HTTP proxy baseline
    "haproxy",      // DNS proxy baseline
    "openssl",      // TLS server behind CONNECT tests
    "curl",
    "ethtool",      // checksum offload switches in the partial-checksum test
    "wrk",          // HTTP load generator of the proxy benchmark
    "slowhttptest", // slowloris, slow POST and slow read against the proxies (fault tests)
    "podman",       // the image (cargo xtask image) and the tests in real containers
    "runc",         // podman's runtime here (crun fails on this machine's cgroup layout)
    "catatonit",    // the pause process of the pods `podman kube play` makes
    // A real Prometheus scraping the metrics listener, and promtool checking its output.
    // Installed with the service kept from starting (debian_packages' policy-rc.d).
    "prometheus",
    // The reference CNI plugins (/usr/lib/cni: bridge, host-local): the primary network that
    // makes the pod's eth0 before the egress-router CNI plugin runs, in the CNI tests.
    "containernetworking-plugins",
];

pub fn run() -> Result<()> {
    ebpf_toolchain()?;
    step("Debian packages", debian_packages)?;
    step("manifest validators", validators)?;
    Ok(())
}

/// What building the eBPF programs needs: the nightly's rust-src and bpf-linker. Also the only
/// installs `cargo xtask fuzz` needs, and only for its last phase (the tc programs).
pub fn ebpf_toolchain() -> Result<()> {
    step("nightly toolchain", nightly)?;
    step("rust-src for nightly", rust_src)?;
    step("bpf-linker", bpf_linker)
}

/// The pinned offline validators of deploy/'s manifests (PyPI), in a virtualenv under the target
/// directory: kubernetes-validate carries the Kubernetes schemas, check-jsonschema checks the
/// NetworkAttachmentDefinitions against deploy/schemas/.
const VALIDATORS: &[&str] = &["kubernetes-validate==1.37.0", "check-jsonschema==0.39.0"];

fn validators() -> Result<String> {
    let venv = crate::util::target_dir()?.join("validators");
    let bin = venv.join("bin");
    let have = |tool: &str, version: &str| {
        output(Command::new(bin.join(tool)).arg("--version")).is_ok_and(|v| v.contains(version))
    };
    if have("kubernetes-validate", "1.37.0") && have("check-jsonschema", "0.39.0") {
        return Ok(format!("already in {}", venv.display()));
    }
    output(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("creating the validators' virtualenv")?;
    output(
        Command::new(bin.join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(VALIDATORS),
    )
    .context("installing the manifest validators from PyPI")?;
    Ok(format!(
        "installed {} in {}",
        VALIDATORS.join(" "),
        venv.display()
    ))
}

fn step(name: &str, f: impl FnOnce() -> Result<String>) -> Result<()> {
    match f() {
        Ok(what) => {
            println!("setup: {name}: {what}");
            Ok(())
        }
        Err(e) => Err(e.context(format!("setup step '{name}' failed"))),
    }
}

fn nightly() -> Result<String> {
    let v = output(Command::new("rustc").args(["+nightly", "-vV"])).context(
        "no nightly toolchain: the eBPF programs need it (build-std); this machine kind ships one preinstalled",
    )?;
    Ok(v.lines().next().unwrap_or_default().to_string())
}

fn rust_src() -> Result<String> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok("already installed".into());
    }
    output(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    Ok("installed".into())
}

/// The LLVM major version of the nightly compiler, e.g. 22.
fn nightly_llvm_major() -> Result<u32> {
    let v = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm = v
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` prints no LLVM version")?;
    llvm.split('.')
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("odd LLVM version {llvm}"))
}

/// A stable directory whose lib/ holds libLLVM.so (and its versioned name) linked to the
/// nightly's own libLLVM, which is what bpf-linker's llvm-sys looks for under LLVM_PREFIX.
fn llvm_prefix(major: u32) -> Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let so = fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .context("neither XDG_DATA_HOME nor HOME is set")?;
    let prefix = data.join(format!("egress-router/llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in [
        PathBuf::from("libLLVM.so"),
        PathBuf::from(so.file_name().unwrap()),
    ] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&so, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(prefix)
}

fn bpf_linker() -> Result<String> {
    if let Ok(v) = output(Command::new("bpf-linker").arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        return Ok(format!("already installed ({})", v.trim()));
    }
    let major = nightly_llvm_major()?;
    let prefix = llvm_prefix(major)?;
    output(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )
    .context("building bpf-linker against the nightly's LLVM")?;
    Ok(format!(
        "built {BPF_LINKER_VERSION} against LLVM {major} (LLVM_PREFIX={})",
        prefix.display()
    ))
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn debian_packages() -> Result<String> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(format!("all {} present", DEBIAN_PACKAGES.len()));
    }
    if !is_root() {
        bail!(
            "missing {} and not root, so apt-get cannot install them",
            missing.join(" ")
        );
    }
    // Packages with services (squid, haproxy) must not start them here: a policy-rc.d that
    // denies every start, removed afterwards.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let had_policy = policy.exists();
    if !had_policy {
        fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let result = (|| {
        output(Command::new("apt-get").args(["update", "-q"]))?;
        output(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    })();
    if !had_policy {
        let _ = fs::remove_file(policy);
    }
    result.context("apt-get install")?;
    Ok(format!("installed {}", missing.join(" ")))
}
