//! `cargo xtask fuzz`: every fuzz target of fuzz/ (one per rule language: redirect, http, dns)
//! for a bounded time each, with libFuzzer through cargo-fuzz and the nightly toolchain, then
//! the tc programs' mutation fuzzer (egress-loader/tests/program_fuzz.rs) for as long. A crash
//! (a panic or a failed assertion in a target) fails the task; libFuzzer leaves the input under
//! fuzz/artifacts/<target>/.
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{setup, util};

/// Installs cargo-fuzz if missing, then runs each target for `seconds_per_target` seconds.
pub fn run(seconds_per_target: u64) -> Result<()> {
    if seconds_per_target == 0 {
        bail!("--seconds must be at least 1");
    }
    let fuzz_dir = util::root().join("fuzz");
    if !has_cargo_fuzz() {
        eprintln!("cargo-fuzz is missing: installing it");
        util::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let list = util::output(
        Command::new("cargo")
            .env_remove("CARGO_TARGET_DIR")
            .args(["+nightly", "fuzz", "list"])
            .current_dir(&fuzz_dir),
    )
    .context("listing the fuzz targets")?;
    let targets: Vec<&str> = list.split_whitespace().collect();
    if targets.is_empty() {
        bail!("no fuzz targets in {}", fuzz_dir.display());
    }
    for target in &targets {
        eprintln!("fuzzing {target} for {seconds_per_target} s");
        // New inputs go to corpus/<target> (not committed); seeds/<target> holds committed
        // examples of the rule language to start from.
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let mut cmd = Command::new("cargo");
        // Sanitizer builds stay in fuzz/target: sharing the workspace's target dir would make
        // the normal and the instrumented builds rebuild each other.
        cmd.env_remove("CARGO_TARGET_DIR")
            .args(["+nightly", "fuzz", "run", target])
            .arg(&corpus)
            .current_dir(&fuzz_dir);
        let seeds = fuzz_dir.join("seeds").join(target);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds_per_target}"));
        util::run(&mut cmd).with_context(|| {
            format!(
                "fuzz target {target} failed; the input that crashed it is under {}",
                fuzz_dir.join("artifacts").join(target).display()
            )
        })?;
    }
    // The tc programs, through BPF_PROG_TEST_RUN (root): a mutation fuzzer with invariants
    // (egress-loader/tests/program_fuzz.rs), for the same time.
    if !util::is_root() {
        bail!("the program fuzzer loads the eBPF programs: run cargo xtask fuzz as root");
    }
    // Only this phase builds the eBPF programs: the rule fuzzers above need no eBPF toolchain.
    setup::ebpf_toolchain()?;
    eprintln!("fuzzing the tc programs for {seconds_per_target} s");
    util::run(
        Command::new("cargo")
            .current_dir(util::root())
            .env("EGRESS_FUZZ_SECONDS", seconds_per_target.to_string())
            .args([
                "test",
                "-p",
                "egress-loader",
                "--test",
                "program_fuzz",
                "--",
                "--nocapture",
            ]),
    )
    .context("the program fuzzer found a broken invariant (its output has the seed and frame)")?;
    eprintln!(
        "fuzzing done: {} targets and the tc programs, no crash",
        targets.len()
    );
    Ok(())
}

fn has_cargo_fuzz() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
