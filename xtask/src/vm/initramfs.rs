//! The guest's initramfs: busybox-static and the init script, the test executables and
//! egress-router under a fixed guest directory ([`GUEST_DIR`]), host tools the tests run, the
//! glibc libraries all of these link (found with ldd), and one kernel's modules.
//!
//! Not at their host paths: a checkout under /tmp would put them where the guest's init mounts
//! a tmpfs, hiding them. The tests find the router through EGRESS_ROUTER_BIN, which init sets.
//!
//! The executables stay dynamically linked, as cargo built them for the host's glibc: the
//! guest gets the same libraries, so nothing is rebuilt for the VM (a static build would need
//! the musl target, which is not installed here, or a second full build with crt-static).
//! Debug info is stripped from the copies to keep the archive small.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{artifacts::Artifacts, cpio::Archive, kernel::Kernel, kernel::module_bytes};
use crate::{
    elf::{canonical, libraries},
    util,
};

const INIT: &str = include_str!("init.sh");

/// Where the guest finds egress-router (`bin/`) and the test executables (`tests/`): a path
/// on the initramfs itself, which init mounts nothing over.
const GUEST_DIR: &str = "opt/vm-test";

/// Host programs the tests and the init script run, copied when the host has them: bpftool
/// (a packet test dumps pinned maps with it), iproute2 for the attach check, and what the
/// integration tests spawn. busybox provides the rest (sh, sleep, cat, ...).
const HOST_TOOLS: &[&str] = &[
    "bpftool",
    "ip",
    "tc",
    "ethtool",
    "nft",
    "dnsmasq",
    "curl",
    "openssl",
    "sleep",
    "cat",
    "setpriv",
    "iperf3",
    "prometheus",
    "promtool",
];
/// The reference CNI plugins the CNI tests give the pods their eth0 with (package
/// containernetworking-plugins), at the path the tests run them from.
const CNI_PLUGINS: &[&str] = &["/usr/lib/cni/bridge", "/usr/lib/cni/host-local"];
/// Of those, the ones the VM run cannot do without.
const REQUIRED_TOOLS: &[&str] = &["bpftool", "ip", "tc"];

/// Everything but the kernel modules: built once per run, shared by every kernel.
pub struct Common {
    archive: Archive,
    pub missing_tools: Vec<String>,
}

pub fn common(
    art: &Artifacts,
    busybox: &Path,
    stage: &Path,
    test_timeout: u64,
    test_args: &str,
) -> Result<Common> {
    fs::create_dir_all(stage)?;
    let mut a = Archive::default();
    for d in [
        "proc", "sys", "dev", "tmp", "run", "root", "etc", "usr/bin", "usr/sbin", "sbin",
    ] {
        a.dir(d);
    }
    // Debian's merged /usr: the libraries and the ELF interpreter are found via /lib and
    // /lib64, links into /usr as on the host.
    for d in ["lib", "lib64"] {
        if let Ok(target) = fs::read_link(Path::new("/").join(d)) {
            a.symlink(d, &target.to_string_lossy());
        }
    }
    a.file("bin/busybox", busybox, 0o755);
    a.bytes("init", INIT, 0o755);
    a.bytes("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\ndnsmasq:x:100:65534:dnsmasq:/nonexistent:/bin/false\n", 0o644);
    a.bytes("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644);
    a.bytes("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n", 0o644);
    a.bytes("etc/resolv.conf", "nameserver 127.0.0.1\n", 0o644);
    a.bytes(
        "etc/nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files dns\n",
        0o644,
    );

    let mut elves: Vec<PathBuf> = Vec::new();
    let mut add_elf = |a: &mut Archive, src: &Path, dest: &str| -> Result<()> {
        let staged = strip_debug(src, stage)?;
        a.file(dest, &staged, 0o755);
        elves.push(src.to_path_buf());
        Ok(())
    };
    let router = format!("/{GUEST_DIR}/bin/egress-router");
    add_elf(&mut a, &art.router, &router)?;
    a.symlink("usr/local/bin/egress-router", &router);
    let mut tests = String::new();
    for t in &art.tests {
        let file = t
            .path
            .file_name()
            .context("test executable without a name")?;
        let p = format!("/{GUEST_DIR}/tests/{}", file.to_string_lossy());
        add_elf(&mut a, &t.path, &p)?;
        tests.push_str(&format!("{} {p}\n", t.name));
    }
    let mut missing_tools = Vec::new();
    for tool in HOST_TOOLS {
        match which(tool) {
            // PATH puts /usr/{s,}bin before busybox's /bin.
            Some(p) => add_elf(&mut a, &p, &canonical(&p)?)?,
            None if REQUIRED_TOOLS.contains(tool) => {
                bail!(
                    "{tool} is not installed on the host; the VM needs it (apt-get install bpftool iproute2)"
                )
            }
            None => missing_tools.push(tool.to_string()),
        }
    }
    for plugin in CNI_PLUGINS {
        let p = Path::new(plugin);
        if p.is_file() {
            add_elf(&mut a, p, plugin)?;
        } else {
            missing_tools.push(plugin.to_string());
        }
    }
    for lib in libraries(&elves)? {
        a.file(&lib.dest, &lib.src, 0o755);
    }
    prune_stage(stage, &elves)?;
    a.bytes("etc/vm-test/tests", tests, 0o644);
    a.bytes(
        "etc/vm-test/common-env",
        format!(
            "ROUTER={router}\nTEST_TIMEOUT={test_timeout}\nTEST_ARGS='{}'\n",
            test_args.replace('\'', "'\\''")
        ),
        0o644,
    );
    Ok(Common {
        archive: a,
        missing_tools,
    })
}

impl Common {
    /// Writes the initramfs for one kernel: the common part plus its modules and settings.
    pub fn write_for(mut self, kernel: &Kernel, out: &Path) -> Result<(u64, Common)> {
        let mut names = String::new();
        for (name, path) in &kernel.modules {
            self.archive.bytes(
                &format!("usr/lib/modules/vm-test/{name}.ko"),
                module_bytes(path)?,
                0o644,
            );
            names.push_str(name);
            names.push('\n');
        }
        self.archive.bytes("etc/vm-test/modules", names, 0o644);
        let expect = if kernel.has_tcx() { "tcx" } else { "clsact" };
        let label = kernel.label.replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '.' && c != '-',
            "_",
        );
        self.archive.bytes(
            "etc/vm-test/env",
            format!(". /etc/vm-test/common-env\nKERNEL_LABEL={label}\nEXPECT_ATTACH={expect}\n"),
            0o644,
        );
        let len = self.archive.write(out)?;
        // The next kernel's modules replace these.
        for (name, _) in &kernel.modules {
            self.archive
                .remove(&format!("usr/lib/modules/vm-test/{name}.ko"));
        }
        Ok((len, self))
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Removes stripped copies from earlier runs that this run does not use.
fn prune_stage(stage: &Path, used: &[PathBuf]) -> Result<()> {
    let keep: BTreeSet<PathBuf> = used
        .iter()
        .filter_map(|u| staged_name(u, stage).ok())
        .collect();
    for e in fs::read_dir(stage)? {
        let p = e?.path();
        if !keep.contains(&p) {
            let _ = fs::remove_file(&p);
        }
    }
    Ok(())
}

fn staged_name(src: &Path, stage: &Path) -> Result<PathBuf> {
    let meta = fs::metadata(src).with_context(|| format!("reading {}", src.display()))?;
    let name = src
        .file_name()
        .context("file without a name")?
        .to_string_lossy();
    let mtime = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    Ok(stage.join(format!("{name}-{}-{mtime}", meta.len())))
}

/// A copy of `src` without debug info (symbols stay, so backtraces still name functions),
/// redone only when the source changed.
fn strip_debug(src: &Path, stage: &Path) -> Result<PathBuf> {
    let out = staged_name(src, stage)?;
    if !out.exists() {
        let tmp = out.with_extension("tmp");
        util::output(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(src)
                .arg(&tmp),
        )
        .with_context(|| format!("objcopy --strip-debug {}", src.display()))?;
        fs::rename(&tmp, &out)?;
    }
    Ok(out)
}
