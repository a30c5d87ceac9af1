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
    util::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["test", "--no-fail-fast", "--"])
            .args(cargo_args),
    )
}
