//! `cargo xtask image`: one OCI image for every container of the pod specs (the router's init
//! and legacy containers, the HTTP and DNS proxy containers), built with podman from scratch:
//! a static egress-router and nothing else, so nothing is fetched at build time and no registry
//! is needed. A debug variant adds bpftool (with the libraries it links) for inspecting a running
//! dataplane. Both are written as OCI archives under `target/image/`, which `podman load` takes.
//!
//! The binary gets no file capability: the DNS proxy container binds ports below 1024 because
//! its init container lowers the pod's `net.ipv4.ip_unprivileged_port_start`, and a file
//! capability would make execve fail outright in a container that drops every capability.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use egress_tests::podman::{IMAGE, podman, podman_output};

use crate::{elf, setup, util};

/// The target the static binary is built for (crt-static links glibc in).
const TARGET: &str = "x86_64-unknown-linux-gnu";

pub fn run() -> Result<()> {
    if !util::is_root() {
        bail!("cargo xtask image needs root: it builds with rootful podman");
    }
    setup::run()?;
    build()
}

/// Builds both variants (setup done).
pub fn build() -> Result<()> {
    let root = util::root();
    let version = env!("CARGO_PKG_VERSION");
    let revision = revision(&root);
    let bin = static_binary(&root)?;
    let out = util::target_dir()?.join("image");
    fs::create_dir_all(&out)?;
    for debug in [false, true] {
        let (tag, archive) = if debug {
            (
                format!("{IMAGE}:{version}-debug"),
                "egress-router-debug.oci.tar",
            )
        } else {
            (format!("{IMAGE}:{version}"), "egress-router.oci.tar")
        };
        let ctx = out.join(if debug { "context-debug" } else { "context" });
        stage(&ctx, &bin, debug)?;
        podman_build(&ctx, &tag, version, &revision, debug)?;
        let archive = out.join(archive);
        let _ = fs::remove_file(&archive);
        podman_output(&[
            "save",
            "--format",
            "oci-archive",
            "-o",
            &archive.to_string_lossy(),
            &tag,
        ])?;
        let size = fs::metadata(&archive)?.len();
        println!(
            "image: {tag}: {} ({:.1} MiB; podman load -i {})",
            archive.display(),
            size as f64 / (1024.0 * 1024.0),
            archive.display()
        );
    }
    Ok(())
}

/// The source revision the image is labelled with: the commit, `-dirty` when the tree has
/// uncommitted changes, `unknown` outside git.
fn revision(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(rev) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty { format!("{rev}-dirty") } else { rev }
        }
        None => "unknown".to_string(),
    }
}

/// Builds egress-router statically linked (release) and checks that it is.
fn static_binary(root: &Path) -> Result<PathBuf> {
    println!("image: building a static egress-router (release, {TARGET}, crt-static)");
    // Per-target flags: the eBPF build that egress-loader's build script starts is for
    // another target and must not get them.
    util::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["build", "--quiet", "--release", "-p", "egress-loader"])
            .args(["--bin", "egress-router", "--target", TARGET])
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            ),
    )?;
    let bin = util::target_dir()?
        .join(TARGET)
        .join("release")
        .join("egress-router");
    let ldd = Command::new("ldd").arg(&bin).output()?;
    let text =
        String::from_utf8_lossy(&ldd.stdout).to_string() + &String::from_utf8_lossy(&ldd.stderr);
    ensure!(
        text.contains("not a dynamic executable") || text.contains("statically linked"),
        "{} is not static: {text}",
        bin.display()
    );
    Ok(bin)
}

/// The build context: the Containerfile and the root filesystem to copy in.
fn stage(ctx: &Path, bin: &Path, debug: bool) -> Result<()> {
    let _ = fs::remove_dir_all(ctx);
    let rootfs = ctx.join("rootfs");
    let put = |src: &Path, dest: &str, mode: u32| -> Result<()> {
        let to = rootfs.join(dest.trim_start_matches('/'));
        fs::create_dir_all(to.parent().context("no parent")?)?;
        fs::copy(src, &to).with_context(|| format!("copying {}", src.display()))?;
        fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        Ok(())
    };
    put(bin, "/usr/bin/egress-router", 0o755)?;
    // The proxies resolve with the runtime's resolv.conf; /tmp for whatever needs one.
    for dir in ["etc", "tmp", "sys/fs/bpf"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    fs::set_permissions(
        rootfs.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )?;
    if debug {
        let bpftool = Path::new("/usr/sbin/bpftool");
        ensure!(
            bpftool.exists(),
            "bpftool is not installed (cargo xtask setup installs it)"
        );
        let real = fs::canonicalize(bpftool)?;
        ensure!(
            fs::read(&real)?.starts_with(b"\x7fELF"),
            "{} is not an ELF executable",
            real.display()
        );
        put(&real, "/usr/sbin/bpftool", 0o755)?;
        // Debian's merged /usr: the ELF interpreter and the libraries are found through /lib
        // and /lib64, links into /usr as on the host.
        for d in ["lib", "lib64"] {
            if let Ok(target) = fs::read_link(Path::new("/").join(d)) {
                std::os::unix::fs::symlink(target, rootfs.join(d))?;
            }
        }
        for lib in elf::libraries(&[real])? {
            put(&lib.src, &lib.dest, 0o755)?;
        }
    }
    let labels = "LABEL org.opencontainers.image.title=\"egress-router\" \\\n      \
                  org.opencontainers.image.description=\"The OpenShift egress router, with redirect mode in eBPF: every container of its pod specs\" \\\n      \
                  org.opencontainers.image.licenses=\"Apache-2.0\"";
    fs::write(
        ctx.join("Containerfile"),
        format!(
            "FROM scratch\nCOPY rootfs/ /\n{labels}\nENTRYPOINT [\"/usr/bin/egress-router\"]\n"
        ),
    )?;
    Ok(())
}

fn podman_build(ctx: &Path, tag: &str, version: &str, revision: &str, debug: bool) -> Result<()> {
    let mut cmd = podman();
    cmd.args(["build", "--quiet", "--network", "none", "--pull=never"])
        .arg("--label")
        .arg(format!("org.opencontainers.image.version={version}"))
        .arg("--label")
        .arg(format!("org.opencontainers.image.revision={revision}"))
        .arg("--label")
        .arg(format!(
            "io.egress-router.variant={}",
            if debug {
                "debug (with bpftool)"
            } else {
                "default"
            }
        ))
        .args(["-t", tag])
        .arg(ctx);
    util::output(&mut cmd).with_context(|| format!("podman build of {tag}"))?;
    Ok(())
}
