//! `cargo xtask test`: setup, then every test. Needs root (network namespaces, BPF); without
//! it, says so and fails: no test is skipped.
use std::process::Command;

use anyhow::{Result, bail};

use crate::{image, setup, util};

pub fn run(cargo_args: &[String]) -> Result<()> {
    if !util::is_root() {
        bail!(
            "cargo xtask test needs root: the integration tests create network namespaces and load eBPF programs (run it as root, e.g. with sudo -E)"
        );
    }
    setup::run()?;
    let root = util::root();
    // Default members: everything but the eBPF crate, which build.rs builds for the BPF target.
    util::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--all-targets"]),
    )?;
    // The tests in real containers run the image.
    image::build()?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["test", "--no-fail-fast", "--"])
        .args(cargo_args);
    let no_sctp = !kernel_has_sctp();
    if no_sctp {
        cmd.args(["--skip", SCTP_TESTS]);
    }
    let suite = util::run(&mut cmd);
    // The library without its eBPF programs (configuration, rules, proxies: what the fuzzers
    // and a machine without the eBPF toolchain build) must build and pass its unit tests too;
    // fresh_machine.rs checks it needs no eBPF build, this that it compiles and works.
    let featureless = util::run(
        Command::new("cargo")
            .current_dir(&root)
            .args([
                "test",
                "-p",
                "egress-loader",
                "--no-default-features",
                "--lib",
                "--",
            ])
            .args(cargo_args),
    );
    suite?;
    featureless?;
    if no_sctp {
        println!(
            "NOT RUN on this host: the tests named {SCTP_TESTS}*: this kernel ({}) has no SCTP. \
             `cargo xtask vm-test` runs them on Debian's kernels, which have it (CI does, on 6.1).",
            util::output(Command::new("uname").arg("-r"))
                .unwrap_or_default()
                .trim()
        );
    }
    Ok(())
}

/// The tests that need the kernel's own SCTP (real associations through the router), by the
/// start of their names (`--skip` matches any part of a name: this must match nothing else);
/// the packet tests of SCTP rewriting need only BPF and run everywhere.
const SCTP_TESTS: &str = "sctp_association_through_a_remote_port_rule";

fn kernel_has_sctp() -> bool {
    // SAFETY: socket(2) with constant arguments; the descriptor is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd >= 0 {
        // SAFETY: fd is ours and open.
        unsafe { libc::close(fd) };
    }
    fd >= 0
}
