//! `cargo xtask vm-test [--kernel VERSION...]`: the eBPF packet tests and the namespace
//! integration tests on other kernels than the host's, each booted in qemu. Default: Debian's
//! 6.1 (bookworm; no tcx, so the loader must use clsact) and 6.12 (bookworm-backports; tcx).
//!
//! 1. apt, with a private state under `target/vm/apt/` (the host's sources are left alone),
//!    fetches the newest `linux-image-<VERSION>*-cloud-amd64` and busybox-static; they are
//!    unpacked under `target/vm/`, not installed.
//! 2. cargo builds the test executables (`cargo test --no-run`) and egress-router.
//! 3. An initramfs holds them with their glibc libraries, bpftool, iproute2 and the other host
//!    tools the tests run, the kernel's modules the tests need, and a busybox init script
//!    (`vm/init.sh`).
//! 4. qemu boots each kernel (KVM if it works, else TCG). The guest checks which tc attach
//!    path egress-router takes, runs every test executable with one test thread, reports on a
//!    second serial port and powers off. Each VM and each test executable has a time limit.
//!
//! Fails when a test fails, a check fails, or a VM does not finish. Logs of the last run of
//! each kernel are kept in `target/vm/runs/<VERSION>/`.
//!
//! Environment: `EGRESS_VM_TIMEOUT` (seconds per VM, default 2400), `EGRESS_VM_TEST_TIMEOUT`
//! (seconds per test executable, default 900), `EGRESS_VM_ACCEL` (`kvm` or `tcg` to skip the
//! KVM probe), `EGRESS_VM_TEST_ARGS` (extra arguments for every test executable, e.g. a test
//! name filter; executables where nothing matches report no tests).
mod apt;
mod artifacts;
mod cpio;
mod initramfs;
mod kernel;
mod qemu;
mod results;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use self::{
    apt::Apt,
    kernel::Kernel,
    qemu::{Accel, Outcome, Vm},
    results::Verdict,
};
use crate::util::{self, is_root};

/// The kernels tested when none is named.
pub const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12"];

/// qemu before 8 (bookworm has 7.2) crashes in TCG while booting the 6.12 kernels in a good
/// share of boots (more often with multi-threaded TCG); 10.0 from bookworm-backports does not.
const QEMU_MIN_MAJOR: u32 = 8;

/// Boots that die before init are retried (TCG of older qemu is flaky at boot).
const BOOT_ATTEMPTS: u32 = 3;

pub fn run(kernels: &[String]) -> Result<()> {
    let started = Instant::now();
    // The host builds the executables the guests run: the eBPF toolchain first.
    crate::setup::run()?;
    let root = util::root();
    let cache = util::target_dir()?.join("vm");
    let vm_timeout = env_secs("EGRESS_VM_TIMEOUT", 2400)?;
    let test_timeout = env_secs("EGRESS_VM_TEST_TIMEOUT", 900)?;

    let apt = Apt::new(cache.join("apt"))?;
    apt.update()?;
    let (qemu, qemu_major) = ensure_qemu(&apt)?;
    let busybox = busybox(&apt, &cache)?;
    let labels: Vec<String> = if kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|k| k.to_string()).collect()
    } else {
        kernels.to_vec()
    };
    // Kernels first: a version that does not exist fails before the long build.
    let mut ks = Vec::new();
    for label in &labels {
        let k = kernel::prepare(&apt, &cache, &busybox, label)
            .with_context(|| format!("preparing kernel {label}"))?;
        println!(
            "vm-test: {label}: {} {} (uname {}); modules {}{}{}",
            k.package,
            k.version,
            k.release,
            k.modules
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            if k.builtin.is_empty() {
                String::new()
            } else {
                format!("; built in: {}", k.builtin.join(" "))
            },
            if k.missing.is_empty() {
                String::new()
            } else {
                format!("; NOT AVAILABLE: {}", k.missing.join(" "))
            },
        );
        ks.push(k);
    }

    let art = artifacts::build(&root)?;
    println!(
        "vm-test: test executables: {}",
        art.tests
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let test_args = std::env::var("EGRESS_VM_TEST_ARGS").unwrap_or_default();
    let mut common = initramfs::common(
        &art,
        &busybox,
        &cache.join("stage"),
        test_timeout,
        &test_args,
    )?;
    if !common.missing_tools.is_empty() {
        println!(
            "vm-test: not on this host, so not in the VM (tests that run them will fail there): {}",
            common.missing_tools.join(" ")
        );
    }

    // A KVM that could not boot a guest before, on this host kernel, is not tried again.
    let kvm_verdict = cache.join("kvm-unusable");
    let host_key = format!(
        "host {} qemu {qemu_major}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
    );
    let mut accel = match std::env::var("EGRESS_VM_ACCEL").as_deref() {
        Ok("tcg") => Accel::Tcg,
        Ok("kvm") => Accel::Kvm,
        _ if std::fs::read_to_string(&kvm_verdict).is_ok_and(|k| k == host_key) => {
            println!(
                "vm-test: using TCG: KVM could not boot a guest on this host before (remove {} to try again)",
                kvm_verdict.display()
            );
            Accel::Tcg
        }
        _ if qemu::kvm_available() => Accel::Kvm,
        _ => Accel::Tcg,
    };
    let kvm_tried = accel == Accel::Kvm;
    let mut reports = Vec::new();
    for k in &ks {
        let dir = cache.join("runs").join(&k.label);
        std::fs::create_dir_all(&dir)?;
        let initrd = dir.join("initrd.cpio");
        let (len, c) = common.write_for(k, &initrd)?;
        common = c;
        println!(
            "vm-test: {}: initramfs {} MiB; booting with {accel:?}",
            k.label,
            len >> 20
        );
        let t0 = Instant::now();
        let (outcome, used) = boot(
            &qemu,
            k,
            &dir,
            &initrd,
            &mut accel,
            Duration::from_secs(vm_timeout),
        )?;
        let secs = t0.elapsed().as_secs();
        let r = results::parse(&qemu::read_results(&dir.join("results.log"))?);
        reports.push(report(k, &r, &outcome, used, secs, &dir));
    }
    if kvm_tried && accel == Accel::Tcg {
        std::fs::write(&kvm_verdict, &host_key)?;
    }

    println!(
        "vm-test: ---- summary ({}s in all)",
        started.elapsed().as_secs()
    );
    let mut failed = Vec::new();
    for (label, ok, line) in &reports {
        println!("{line}");
        if !ok {
            failed.push(label.as_str());
        }
    }
    if !failed.is_empty() {
        bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Boots a kernel, falling back from KVM to TCG (for the rest of the run) when KVM cannot boot
/// it, and retrying boots that die before init.
fn boot(
    qemu: &Path,
    k: &Kernel,
    dir: &Path,
    initrd: &Path,
    accel: &mut Accel,
    timeout: Duration,
) -> Result<(Outcome, Accel)> {
    let console = dir.join("console.log");
    let results = dir.join("results.log");
    let vm = Vm {
        qemu,
        vmlinuz: &k.vmlinuz,
        initrd,
        console_log: &console,
        results: &results,
    };
    let mut attempts = 0;
    loop {
        let boot_timeout = Duration::from_secs(if *accel == Accel::Kvm { 20 } else { 180 });
        let outcome = vm.run(*accel, boot_timeout, timeout)?;
        match outcome {
            Outcome::NoBoot(why) if *accel == Accel::Kvm => {
                println!(
                    "vm-test: {}: KVM cannot boot this kernel here ({why}); using TCG",
                    k.label
                );
                *accel = Accel::Tcg;
            }
            Outcome::NoBoot(why) if attempts + 1 < BOOT_ATTEMPTS => {
                attempts += 1;
                println!("vm-test: {}: boot failed ({why}); retrying", k.label);
            }
            o => return Ok((o, *accel)),
        }
    }
}

/// One summary block for a kernel: (label, passed, text).
fn report(
    k: &Kernel,
    r: &results::Results,
    outcome: &Outcome,
    accel: Accel,
    secs: u64,
    dir: &Path,
) -> (String, bool, String) {
    let mut problems = Vec::new();
    match outcome {
        Outcome::Exited if !r.done => {
            problems.push("the VM stopped before the tests finished (kernel panic?)".to_string())
        }
        Outcome::Exited => {}
        Outcome::TimedOut => problems.push("the VM was killed at the time limit".to_string()),
        Outcome::NoBoot(why) => problems.push(format!("the VM did not boot: {why}")),
    }
    for m in &r.modules_failed {
        problems.push(format!("module {m}"));
    }
    if r.items.is_empty() && matches!(outcome, Outcome::Exited) {
        problems.push("no results at all".into());
    }
    let failed = r.failed();
    let attach: Vec<String> = r
        .items
        .iter()
        .filter(|(n, v)| n.starts_with("check:") && *v == Verdict::Ok)
        .map(|(n, _)| n.trim_start_matches("check:").to_string())
        .collect();
    let ok = problems.is_empty() && failed.is_empty();
    let mut text = format!(
        "vm-test: {} {}: {} ({}, {}, {accel:?}, {secs}s): {} passed, {} failed, {} ignored; checks passed: {}",
        if ok { "PASS" } else { "FAIL" },
        k.label,
        r.kernel_release.as_deref().unwrap_or(&k.release),
        k.package,
        k.version,
        r.passed(),
        failed.len(),
        r.ignored(),
        if attach.is_empty() {
            "none".into()
        } else {
            attach.join(" ")
        },
    );
    for (name, secs) in &r.durations {
        text.push_str(&format!("\n    {name}: {secs}s"));
    }
    for p in &problems {
        text.push_str(&format!("\n    problem: {p}"));
    }
    for (name, v) in failed {
        if let Verdict::Failed(why) = v {
            text.push_str(&format!("\n    FAILED {name}: {why}"));
        }
    }
    if !ok {
        text.push_str(&format!(
            "\n    logs: {}/console.log, {}/results.log",
            dir.display(),
            dir.display()
        ));
    }
    (k.label.clone(), ok, text)
}

/// qemu-system-x86_64, at least version 8: installed from bookworm-backports if older or
/// missing (as root). Without root an old one is used, with boot retries.
fn ensure_qemu(apt: &Apt) -> Result<(PathBuf, u32)> {
    match qemu::find_qemu() {
        Some((q, v)) if v >= QEMU_MIN_MAJOR => return Ok((q, v)),
        Some((q, v)) if !is_root() => {
            eprintln!(
                "vm-test: qemu {v} is older than {QEMU_MIN_MAJOR} and may crash while booting the guest; run as root to install qemu-system-x86 from {}",
                apt::BACKPORTS
            );
            return Ok((q, v));
        }
        None if !is_root() => bail!(
            "qemu-system-x86_64 is not installed; run as root (it is installed from {}) or install qemu-system-x86",
            apt::BACKPORTS
        ),
        _ => {}
    }
    println!(
        "vm-test: installing qemu-system-x86 from {}",
        apt::BACKPORTS
    );
    apt.install_from(apt::BACKPORTS, &["qemu-system-x86"])?;
    match qemu::find_qemu() {
        Some((q, v)) if v >= QEMU_MIN_MAJOR => Ok((q, v)),
        other => bail!(
            "after installing qemu-system-x86 from {}: {other:?}",
            apt::BACKPORTS
        ),
    }
}

/// busybox-static from bookworm, unpacked in the cache: the guest's shell and tools, and the
/// depmod that makes the kernel packages' modules.dep.
fn busybox(apt: &Apt, cache: &Path) -> Result<PathBuf> {
    let pkg = "busybox-static".to_string();
    let version = apt
        .candidates(std::slice::from_ref(&pkg))?
        .into_iter()
        .find_map(|(_, v)| v)
        .context("no busybox-static package")?;
    let deb = apt.download(&pkg, &version)?;
    let dir = cache.join("busybox").join(version.replace(':', "%3a"));
    apt::extract(&deb, &dir)?;
    Ok(dir.join("bin/busybox"))
}

fn env_secs(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v}: expected a number of seconds")),
        Err(_) => Ok(default),
    }
}
