//! Developer tasks: `cargo xtask setup | test | demo | bench | bench-ab | soak | vm-test | image |
//! fuzz`.
mod bench;
mod demo;
mod elf;
mod fuzz;
mod image;
mod setup;
mod soak;
mod test;
mod util;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "egress-router developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks: rust-src (nightly), bpf-linker, Debian packages.
    Setup,
    /// Setup, then every test: host unit tests, eBPF test_run tests, namespace integration tests.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// The main job: a client reaching a server through egress-router, in namespaces.
    Demo,
    /// Run the eBPF and namespace integration tests inside VMs on other kernels (Debian's
    /// cloud kernels; without --kernel: 6.1, without tcx, and 6.12, with it).
    VmTest {
        /// Kernel version to test, e.g. 6.1 (repeatable).
        #[arg(long = "kernel")]
        kernels: Vec<String>,
    },
    /// Every mode side by side with what it replaces (nftables NAT, plain routing, squid,
    /// HAProxy), in one run; writes BENCHMARKS.md.
    Bench {
        /// A short run that only proves the harness works (CI).
        #[arg(long)]
        smoke: bool,
    },
    /// Two builds of the proxies side by side, in alternating bursts of the same loads (CPU per
    /// request and per connection, B / A); for a change too small for the drift between two
    /// `bench` runs. Leaves BENCHMARKS.md alone.
    BenchAb {
        /// The egress-router binary A (e.g. a copy of target/release/egress-router).
        a: std::path::PathBuf,
        /// The binary B.
        b: std::path::PathBuf,
    },
    /// The OCI image (every container of the pod specs; and a debug variant with bpftool),
    /// built with podman from scratch, written as OCI archives under target/image/.
    Image,
    /// The three modes under a steady mixed load for N minutes, sampling memory, descriptors
    /// and flow entries; fails on a leak or any lost connection. Writes target/soak/SOAK.md.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Run each fuzz target for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test { cargo_args } => test::run(&cargo_args),
        Task::Demo => demo::run(),
        Task::Bench { smoke } => bench::run(smoke),
        Task::BenchAb { a, b } => bench::ab::run(&a, &b),
        Task::VmTest { kernels } => vm::run(&kernels),
        Task::Image => image::run(),
        Task::Fuzz { seconds } => fuzz::run(seconds),
        Task::Soak { minutes } => soak::run(minutes),
    }
}
