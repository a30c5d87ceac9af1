//! Debian cloud kernels: which package a requested version means, its vmlinuz, and the
//! modules the tests need in load order (from a modules.dep made by busybox's depmod, since
//! the package ships none and the host may have no kmod).
use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::apt::{self, Apt};
use crate::util;

/// Modules the tests use; those built into a kernel are skipped, missing ones reported.
/// veth and macvlan make the topology, sch_ingress gives clsact (the pre-tcx hook), cls_bpf
/// and act_bpf the tc BPF classifier, bridge and dummy are there for tests that add more
/// interfaces, sctp for SCTP sockets.
pub const MODULES: &[&str] = &[
    "veth",
    "macvlan",
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
    "bridge",
    "dummy",
    "sctp",
];

pub struct Kernel {
    /// What was asked for, e.g. "6.1".
    pub label: String,
    pub package: String,
    pub version: String,
    /// `uname -r` of this kernel (its /lib/modules directory name).
    pub release: String,
    pub vmlinuz: PathBuf,
    /// Modules to load, in order: (module name, file in the extracted package).
    pub modules: Vec<(String, PathBuf)>,
    /// Wanted modules this kernel has built in.
    pub builtin: Vec<String>,
    /// Wanted modules this kernel has neither built in nor as a module.
    pub missing: Vec<String>,
}

impl Kernel {
    /// (major, minor) of the release, e.g. (6, 1).
    pub fn major_minor(&self) -> (u32, u32) {
        let mut it = self
            .release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    }

    /// Whether the loader should pick tcx here (it needs Linux 6.6).
    pub fn has_tcx(&self) -> bool {
        self.major_minor() >= (6, 6)
    }
}

/// The newest `linux-image-<version>...-cloud-amd64` package. `version` is "6.1", "6.12", or
/// more precise ("6.1.0-47", "6.12.43+deb12").
pub fn resolve(apt: &Apt, version: &str) -> Result<(String, String)> {
    let prefix = format!("linux-image-{version}");
    let names: Vec<String> = apt
        .names(&prefix)?
        .into_iter()
        .filter(|n| is_kernel_image(version, n))
        .collect();
    if names.is_empty() {
        bail!(
            "no Debian package linux-image-{version}*-cloud-amd64 in bookworm, bookworm-updates, bookworm-security or bookworm-backports"
        );
    }
    let mut best: Option<(String, String)> = None;
    for (pkg, cand) in apt.candidates(&names)? {
        let Some(v) = cand else { continue };
        if best.as_ref().is_none_or(|(_, bv)| apt::version_gt(&v, bv)) {
            best = Some((pkg, v));
        }
    }
    best.with_context(|| format!("no installable candidate among {}", names.join(", ")))
}

/// Whether `name` is a cloud kernel image package of `version`: "6.1" matches
/// linux-image-6.1.0-47-cloud-amd64 but not linux-image-6.12.95+deb12-cloud-amd64, nor the
/// metapackages (linux-image-6.12-cloud-amd64: two numbers, no kernel), nor -dbg/-unsigned.
fn is_kernel_image(version: &str, name: &str) -> bool {
    let Some(abi) = name
        .strip_prefix("linux-image-")
        .and_then(|a| a.strip_suffix("-cloud-amd64"))
    else {
        return false;
    };
    let Some(rest) = abi.strip_prefix(version) else {
        return false;
    };
    (rest.is_empty() || rest.starts_with(['.', '-', '+']))
        && abi
            .split(['.', '-', '+'])
            .take(3)
            .filter(|p| p.parse::<u32>().is_ok())
            .count()
            == 3
}

/// Downloads and unpacks a kernel package and works out its modules.
pub fn prepare(apt: &Apt, cache: &Path, busybox: &Path, label: &str) -> Result<Kernel> {
    let (package, version) = resolve(apt, label)?;
    let deb = apt.download(&package, &version)?;
    let root = cache
        .join("kernels")
        .join(format!("{package}_{version}").replace(':', "%3a"));
    apt::extract(&deb, &root)?;
    let release = only_entry(&root.join("lib/modules"))?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!("{} has no {}", deb.display(), vmlinuz.display());
    }
    let moddir = root.join("lib/modules").join(&release);
    if !moddir.join("modules.dep").exists() {
        util::output(
            Command::new(busybox)
                .arg("depmod")
                .arg("-b")
                .arg(&root)
                .arg(&release),
        )
        .context("busybox depmod on the extracted kernel")?;
    }
    let (modules, builtin, missing) = load_order(&moddir, MODULES)?;
    Ok(Kernel {
        label: label.to_string(),
        package,
        version,
        release,
        vmlinuz,
        modules,
        builtin,
        missing,
    })
}

fn only_entry(dir: &Path) -> Result<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.len() != 1 {
        bail!(
            "expected one kernel release in {}, found {names:?}",
            dir.display()
        );
    }
    Ok(names.remove(0))
}

/// The module name of a file path: "kernel/net/sched/sch_ingress.ko.xz" -> "sch_ingress".
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

type Order = (Vec<(String, PathBuf)>, Vec<String>, Vec<String>);

fn load_order(moddir: &Path, wanted: &[&str]) -> Result<Order> {
    let dep = fs::read_to_string(moddir.join("modules.dep"))?;
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let d = rest.split_whitespace().map(module_name).collect();
        deps.insert(module_name(path), (path.to_string(), d));
    }
    let builtin_list = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let builtins: HashSet<String> = builtin_list.lines().map(module_name).collect();

    let (mut order, mut builtin, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    let mut seen = HashSet::new();
    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        moddir: &Path,
        seen: &mut HashSet<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) {
        if !seen.insert(name.to_string()) {
            return;
        }
        let Some((path, d)) = deps.get(name) else {
            return;
        };
        for dep in d {
            visit(dep, deps, moddir, seen, order);
        }
        order.push((name.to_string(), moddir.join(path)));
    }
    for w in wanted {
        if deps.contains_key(*w) {
            visit(w, &deps, moddir, &mut seen, &mut order);
        } else if builtins.contains(*w) {
            builtin.push(w.to_string());
        } else {
            missing.push(w.to_string());
        }
    }
    Ok((order, builtin, missing))
}

/// A module file's contents, decompressed (busybox insmod takes plain .ko files).
pub fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => Ok(fs::read(path)?),
        Some(t) => {
            let out = Command::new(t)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {t} to decompress {name}"))?;
            if !out.status.success() {
                bail!(
                    "{t} -dc {name} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(out.stdout)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_package_names() {
        assert!(is_kernel_image("6.1", "linux-image-6.1.0-47-cloud-amd64"));
        assert!(is_kernel_image(
            "6.1.0-47",
            "linux-image-6.1.0-47-cloud-amd64"
        ));
        assert!(is_kernel_image(
            "6.12",
            "linux-image-6.12.95+deb12-cloud-amd64"
        ));
        assert!(!is_kernel_image(
            "6.1",
            "linux-image-6.12.95+deb12-cloud-amd64"
        ));
        assert!(!is_kernel_image("6.12", "linux-image-6.12-cloud-amd64"));
        assert!(!is_kernel_image(
            "6.12",
            "linux-image-6.12.95+deb12-cloud-amd64-unsigned"
        ));
        assert!(!is_kernel_image(
            "6.1",
            "linux-image-6.1.0-47-cloud-amd64-dbg"
        ));
        assert!(!is_kernel_image("6.1", "linux-image-6.1.0-47-amd64"));
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("kernel/net/sched/sch_ingress.ko.xz"),
            "sch_ingress"
        );
        assert_eq!(module_name("kernel/drivers/net/veth.ko"), "veth");
        assert_eq!(
            module_name("kernel/net/ipv6/ip6_udp_tunnel.ko"),
            "ip6_udp_tunnel"
        );
    }
}
