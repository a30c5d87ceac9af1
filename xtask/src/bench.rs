//! `cargo xtask bench [--smoke]`: egress-router against what OpenShift runs, on the reference
//! topology (SPEC section 7), in one run with alternating rounds.
//!
//! - redirect: the eBPF dataplane (egress-router `init`) vs OpenShift's nftables NAT ruleset
//!   (egress-router `unit-test` prints it) vs plain routing without NAT (the ceiling).
//! - HTTP proxy: egress-router `http-proxy` vs squid with the configuration OpenShift's
//!   egress-http-proxy script generates.
//! - DNS proxy: egress-router `dns-proxy` vs HAProxy with the configuration OpenShift's
//!   egress-dns-proxy script generates.
//!
//! Every round builds a fresh topology per contender and measures them one after the other, in
//! an order that rotates from round to round; each figure is reported as the median over the
//! rounds with min and max, with ratios of medians and the targets of issue 7. A benchmark is
//! not a test: missed targets are reported, never failed. `--smoke` runs one short round to
//! prove the harness works end to end (CI) and does not touch BENCHMARKS.md. `ab`: two builds
//! of the proxies side by side (`cargo xtask bench-ab`).
pub(crate) mod ab;
pub(crate) mod load;
pub(crate) mod proxies;
pub(crate) mod redirect;
mod report;
pub(crate) mod servers;
pub(crate) mod sys;
mod testrun;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use egress_tests::{Netns, Topology};
use report::{Better, Report, Section, Who};

use crate::{setup, util};

/// How long and how much: the full run and the smoke run.
#[derive(Clone, Debug)]
pub struct Params {
    pub rounds: usize,
    /// Measured time of each throughput-like figure.
    pub measure: Duration,
    /// Load applied before measuring starts.
    pub warmup: Duration,
    /// Concurrent loops of the connections/s figure.
    pub crr_threads: usize,
    /// wrk connections.
    pub http_conns: usize,
    /// Idle connections held for the memory figure.
    pub idle_conns: usize,
    /// BPF_PROG_TEST_RUN calls per program path.
    pub testrun_runs: usize,
    /// Sections to run (empty: all).
    pub only: Vec<String>,
    /// Set by an EGRESS_BENCH_* override: such a run does not replace BENCHMARKS.md.
    pub overridden: bool,
}

impl Params {
    /// The defaults of each kind of run, then the environment's overrides (for exploring):
    /// EGRESS_BENCH_ROUNDS, EGRESS_BENCH_SECONDS (measured seconds per figure),
    /// EGRESS_BENCH_ONLY (comma-separated: redirect, http, dns). A run with any of them, or with
    /// EGRESS_BENCH_PERF or EGRESS_ROUTER_BIN, leaves BENCHMARKS.md alone.
    pub fn new(smoke: bool) -> Params {
        let mut p = Params::defaults(smoke);
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(n) = env("EGRESS_BENCH_ROUNDS").and_then(|v| v.parse().ok()) {
            p.rounds = n;
            p.overridden = true;
        }
        if let Some(s) = env("EGRESS_BENCH_SECONDS").and_then(|v| v.parse::<f64>().ok()) {
            p.measure = Duration::from_secs_f64(s);
            p.overridden = true;
        }
        if let Some(only) = env("EGRESS_BENCH_ONLY") {
            p.only = only.split(',').map(|s| s.trim().to_string()).collect();
            p.overridden = true;
        }
        if env("EGRESS_BENCH_PERF").is_some() || env("EGRESS_ROUTER_BIN").is_some() {
            p.overridden = true;
        }
        p
    }

    pub fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }

    fn defaults(smoke: bool) -> Params {
        if smoke {
            Params {
                rounds: 1,
                measure: Duration::from_secs(1),
                warmup: Duration::from_millis(300),
                crr_threads: 4,
                http_conns: 16,
                idle_conns: 100,
                testrun_runs: 1000,
                only: Vec::new(),
                overridden: false,
            }
        } else {
            Params {
                rounds: 3,
                measure: Duration::from_secs(8),
                warmup: Duration::from_secs(1),
                crr_threads: 4,
                http_conns: 32,
                idle_conns: 1000,
                testrun_runs: 20_000,
                only: Vec::new(),
                overridden: false,
            }
        }
    }
}

/// What the measuring code shares: settings, the binary, a scratch directory, the results.
pub struct Ctx {
    pub p: Params,
    pub bin: PathBuf,
    /// Logs and generated configuration files of this run.
    pub dir: PathBuf,
    pub report: Report,
    pub round: usize,
    /// The contender being measured (for file names).
    pub who: String,
}

impl Ctx {
    /// Runs one measurement and records it; a failure is recorded and the run goes on.
    pub fn measure(
        &mut self,
        section: Section,
        name: &str,
        better: Better,
        who: Who,
        f: impl FnOnce() -> Result<f64>,
    ) {
        let t = Instant::now();
        match f() {
            Ok(v) => {
                println!(
                    "    {:<14} {name}: {} ({:.1}s)",
                    who.label(section),
                    report::num(v),
                    t.elapsed().as_secs_f64()
                );
                self.report.record(section, name, better, who, v);
            }
            Err(e) => self.fail(section, who, &format!("{name}: {e:#}")),
        }
    }

    /// Runs `contender` for each of `order` in `section`; a contender that fails is reported
    /// and the next one runs.
    pub fn contenders(
        &mut self,
        section: Section,
        order: &[Who],
        contender: fn(&mut Ctx, Who) -> Result<()>,
    ) {
        for &who in order {
            println!("  {}, {}", section.name(), who.label(section));
            self.who = who.label(section).to_string();
            if let Err(e) = contender(self, who) {
                self.fail(section, who, &format!("{e:#}"));
            }
        }
    }

    pub fn fail(&mut self, section: Section, who: Who, msg: &str) {
        let msg = format!(
            "round {}, {} {}: {msg}",
            self.round + 1,
            section.name(),
            who.label(section)
        );
        eprintln!("    FAILED {msg}");
        self.report.errors.push(msg);
    }

    /// An egress-router command with the OpenShift environment every mode needs; output goes
    /// to `<dir>/<log>`.
    pub fn router_cmd(&self, mode: &str, log: &str) -> Result<Command> {
        router_command(&self.bin, &self.dir, mode, log)
    }

    /// The file OpenShift's image writes for this mode and these variables (nft script,
    /// squid.conf or haproxy.cfg), as `egress-router check --openshift` renders it: the
    /// baselines run exactly what OpenShift would.
    pub fn openshift_config(&self, mode: &str, vars: &[(&str, String)]) -> Result<String> {
        let log = format!("openshift-config-{mode}.log");
        let mut cmd = self.router_cmd(mode, &log)?;
        cmd.envs(vars.iter().map(|(k, v)| (k, v)))
            .args(["check", "--openshift"])
            .stdout(std::process::Stdio::piped());
        let out = cmd
            .output()
            .context("running egress-router check --openshift")?;
        if !out.status.success() {
            bail!(
                "egress-router check --openshift failed ({}):\n{}",
                out.status,
                self.log_tail(&log)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `<contender>-<round>` for file names; set while a contender runs.
    pub fn tag(&self) -> String {
        format!("{}-{}", self.who.replace(' ', "-"), self.round)
    }

    pub fn log_tail(&self, log: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(log)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// `bin` with the OpenShift environment every mode needs (EGRESS_SOURCE, EGRESS_GATEWAY,
/// EGRESS_ROUTER_MODE=`mode`: the tests' [`egress_tests::router_command_of`]) and nothing else;
/// output goes to `<dir>/<log>`.
pub fn router_command(bin: &Path, dir: &Path, mode: &str, log: &str) -> Result<Command> {
    let mut cmd = egress_tests::router_command_of(bin, mode);
    let out = std::fs::File::create(dir.join(log))?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    Ok(cmd)
}

/// Per-namespace settings every contender gets: a wide local port range and TIME_WAIT reuse
/// where connections are opened at a high rate (client; router for the proxies' upstream
/// connections), and a deep accept queue where servers listen.
pub fn tune(topo: &Topology) -> Result<()> {
    for ns in [&topo.client, &topo.router] {
        ns.set_sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        ns.set_sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    }
    for ns in [&topo.router, &topo.dest] {
        ns.set_sysctl("net.core.somaxconn", "4096")?;
        ns.set_sysctl("net.ipv4.tcp_max_syn_backlog", "4096")?;
    }
    Ok(())
}

/// Waits for a TCP listener to accept from `from`.
pub fn wait_listening(
    from: &Netns,
    addr: std::net::SocketAddr,
    proc: &egress_tests::Proc,
) -> Result<()> {
    sys::wait_for(
        Duration::from_secs(20),
        &format!("waiting for {addr}"),
        || {
            if let Some(st) = proc.try_wait()? {
                bail!("the server process exited: {st}");
            }
            from.tcp_connect(addr, Duration::from_secs(1)).map(drop)
        },
    )
}

pub fn run(smoke: bool) -> Result<()> {
    if !util::is_root() {
        bail!(
            "cargo xtask bench needs root: it creates network namespaces, loads eBPF programs and runs squid and HAProxy"
        );
    }
    let started = Instant::now();
    setup::run()?;
    if !smoke && cfg!(debug_assertions) {
        return reexec_release();
    }
    let p = Params::new(smoke);
    let bin = router_bin(smoke)?;
    sys::raise_fd_limit();
    let dir = std::env::temp_dir().join(format!("egress-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    remove_stale_bpffs();
    let load_before = sys::loadavg();
    let (kernel, cpu, ncpu) = sys::machine();
    println!(
        "== cargo xtask bench{}: {} round(s), {:?} per figure; {kernel}, {cpu} x{ncpu}, load {load_before}",
        if smoke { " --smoke" } else { "" },
        p.rounds,
        p.measure
    );
    println!(
        "   egress-router: {}; logs and configs: {}",
        bin.display(),
        dir.display()
    );
    let mut ctx = Ctx {
        p,
        bin,
        dir,
        report: Report::default(),
        round: 0,
        who: String::new(),
    };
    targets(&mut ctx.report);
    let rotations = [
        [Who::Ours, Who::Base, Who::Ceiling],
        [Who::Base, Who::Ceiling, Who::Ours],
        [Who::Ceiling, Who::Ours, Who::Base],
    ];
    for round in 0..ctx.p.rounds {
        ctx.round = round;
        let order = rotations[round % 3];
        println!("\n== round {}/{}", round + 1, ctx.p.rounds);
        let two: Vec<Who> = order.into_iter().filter(|w| *w != Who::Ceiling).collect();
        if ctx.p.runs("redirect") {
            ctx.contenders(Section::Redirect, &order, redirect::contender);
        }
        if ctx.p.runs("http") {
            ctx.contenders(Section::Http, &two, proxies::http);
        }
        if ctx.p.runs("dns") {
            ctx.contenders(Section::Dns, &two, proxies::dns);
        }
    }
    let elapsed = started.elapsed();
    let table = ctx.report.table();
    let summary = ctx.report.target_summary();
    println!("\n{table}\n{summary}");
    if !ctx.report.errors.is_empty() {
        println!("failures:");
        for e in &ctx.report.errors {
            println!("- {e}");
        }
    }
    println!(
        "bench finished in {:.0}s (load average {load_before} before, {} after)",
        elapsed.as_secs_f64(),
        sys::loadavg()
    );
    if ctx.p.overridden {
        println!("EGRESS_BENCH_* or EGRESS_ROUTER_BIN set: BENCHMARKS.md left as it is");
    } else if !smoke {
        let md = generated_md(
            &ctx,
            &kernel,
            &cpu,
            ncpu,
            &load_before,
            elapsed,
            &table,
            &summary,
        );
        let path = util::root().join("BENCHMARKS.md");
        report::write_benchmarks_md(&path, &md)?;
        println!("wrote {}", path.display());
    }
    if ctx.report.errors.is_empty() {
        if std::env::var_os("EGRESS_BENCH_PERF").is_none() {
            let _ = std::fs::remove_dir_all(&ctx.dir);
        }
        Ok(())
    } else {
        bail!(
            "{} measurement(s) failed (logs in {}); see above",
            ctx.report.errors.len(),
            ctx.dir.display()
        )
    }
}

/// Issue 7's targets (ratios of medians in the same run).
fn targets(r: &mut Report) {
    use Section::*;
    r.target(Redirect, redirect::UDP_PPS, Who::Base, true, 1.5);
    r.target(Redirect, redirect::UDP_PPS, Who::Ceiling, true, 1.0);
    r.target(Redirect, redirect::TCP_GBPS, Who::Base, true, 1.0);
    r.target(Redirect, redirect::CRR, Who::Base, true, 1.3);
    r.target(Http, proxies::HTTP_KA_RPS, Who::Base, true, 2.0);
    r.target(Http, proxies::HTTP_KA_P99, Who::Base, false, 1.0);
    r.target(Http, proxies::HTTP_CLOSE_RPS, Who::Base, true, 2.0);
    r.target(Http, proxies::HTTP_CLOSE_P99, Who::Base, false, 1.0);
    r.target(Http, proxies::RSS_IDLE_CONNS, Who::Base, false, 0.5);
    r.target(Dns, proxies::DNS_CRR, Who::Base, true, 1.0);
    r.target(Dns, proxies::DNS_GBPS, Who::Base, true, 1.0);
    // Issue 19: cost per unit of work, which a bigger machine does not change.
    r.target(Http, proxies::HTTP_KA_CPU, Who::Base, false, 0.25);
    r.target(Http, proxies::HTTP_CLOSE_CPU, Who::Base, false, 0.25);
    r.target(Http, proxies::HTTP_CONNECT, Who::Base, true, 2.0);
    r.target(Http, proxies::HTTP_CONNECT_CPU, Who::Base, false, 0.5);
    r.target(Dns, proxies::DNS_CRR_CPU, Who::Base, false, 0.8);
    r.target(Redirect, redirect::UDP_CPU, Who::Ceiling, false, 0.95);
    r.target(Redirect, redirect::UDP_CPU, Who::Base, false, 0.5);
    r.target(Redirect, redirect::ROUTER_CPU_CRR, Who::Base, false, 0.5);
}

/// The full run measures with the generators and servers in this process: `cargo xtask` builds
/// it unoptimised, so build it with optimisations and run that build with the same arguments.
fn reexec_release() -> Result<()> {
    let exe = std::env::current_exe()?;
    let name = exe
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .context("the xtask binary has no name")?;
    let root = util::root();
    println!("== building xtask with optimisations for the measurements");
    util::run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "xtask",
        "--bin",
        &name,
    ]))?;
    // target/debug/xtask -> target/release/xtask (the same target directory).
    let release = exe
        .parent()
        .and_then(Path::parent)
        .context("odd xtask path")?
        .join("release")
        .join(&name);
    let status = Command::new(&release)
        .args(std::env::args_os().skip(1))
        .status()
        .with_context(|| format!("running {}", release.display()))?;
    if !status.success() {
        bail!("the optimised bench run failed: {status}");
    }
    Ok(())
}

/// The egress-router binary: EGRESS_ROUTER_BIN if set, else built here (release for the full
/// run; the smoke run uses the debug build `cargo xtask test` already made).
pub(crate) fn router_bin(smoke: bool) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("EGRESS_ROUTER_BIN") {
        return Ok(p.into());
    }
    let root = util::root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["build", "--quiet", "-p", "egress-loader"]);
    if !smoke {
        cmd.arg("--release");
    }
    util::run(&mut cmd)?;
    let bin = util::target_dir()?
        .join(if smoke { "debug" } else { "release" })
        .join("egress-router");
    if !bin.exists() {
        bail!("{} missing after cargo build", bin.display());
    }
    Ok(bin)
}

/// The bpffs directory of one contender: `/sys/fs/bpf/<topology prefix>bench`, removed after.
pub struct BpffsDir(pub PathBuf);

impl BpffsDir {
    pub fn new(topo: &Topology) -> BpffsDir {
        BpffsDir(PathBuf::from(format!("/sys/fs/bpf/{}bench", topo.prefix())))
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// bpffs directories of earlier bench runs that died before cleaning up.
fn remove_stale_bpffs() {
    let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(egress_tests::NAME_PREFIX) else {
            continue;
        };
        if !name.ends_with("bench") {
            continue;
        }
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "the header's facts, each gathered by the caller at a different moment of the run"
)]
fn generated_md(
    ctx: &Ctx,
    kernel: &str,
    cpu: &str,
    ncpu: usize,
    load_before: &str,
    elapsed: Duration,
    table: &str,
    summary: &str,
) -> String {
    let date = util::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let p = &ctx.p;
    let mut s = format!(
        "Generated by `cargo xtask bench` on {date}, in {:.0} s.\n\n\
         - kernel {kernel}; CPU {cpu} × {ncpu}; load average {load_before} before the run, {} after\n\
         - {} rounds; in each round every contender gets a fresh topology and the same load, in an \
         order that rotates from round to round; cells are median (min–max) over the rounds, ratios \
         are ratios of medians; ↑ higher is better, ↓ lower is better\n\
         - {} s of measurement per figure after {} s of warm-up; {} connection loops; wrk with {} \
         connections; {} idle connections; {} BPF_PROG_TEST_RUN calls per path\n\
         - baseline: nftables NAT as OpenShift applies it (redirect), squid (HTTP proxy), HAProxy \
         (DNS proxy), each configured as OpenShift's scripts configure them; ceiling: plain routing \
         without NAT\n\n",
        elapsed.as_secs_f64(),
        sys::loadavg(),
        p.rounds,
        p.measure.as_secs_f64(),
        p.warmup.as_secs_f64(),
        p.crr_threads,
        p.http_conns,
        p.idle_conns,
        p.testrun_runs,
    );
    s.push_str(table);
    s.push_str("\nTargets (issue 7):\n\n");
    s.push_str(summary);
    if !ctx.report.errors.is_empty() {
        s.push_str("\nFailed measurements:\n\n");
        for e in &ctx.report.errors {
            s.push_str(&format!("- {e}\n"));
        }
    }
    s
}
