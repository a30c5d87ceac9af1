//! Reading the system: per-namespace counters, per-CPU time, process memory; writing
//! per-namespace settings.
use std::{
    collections::HashMap,
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use egress_tests::Netns;

/// Time one CPU spent in the kernel (system, irq and softirq: where packet forwarding runs;
/// user time of unrelated processes sharing the CPU is left out) and in all, idle included,
/// from /proc/stat.
#[derive(Clone, Copy)]
pub struct CpuTimes {
    pub kernel: Duration,
    pub total: Duration,
    pub idle: Duration,
}

impl CpuTimes {
    pub fn read(cpu: usize) -> Result<CpuTimes> {
        let text = fs::read_to_string("/proc/stat")?;
        let tag = format!("cpu{cpu} ");
        let line = text
            .lines()
            .find(|l| l.starts_with(&tag))
            .with_context(|| format!("no {tag}in /proc/stat"))?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user)
        let sum = |idx: &[usize]| {
            let ticks: u64 = idx.iter().map(|&i| f.get(i).copied().unwrap_or(0)).sum();
            let hz = 100; // USER_HZ on every Linux architecture this runs on
            Duration::from_nanos(ticks * 1_000_000_000 / hz)
        };
        Ok(CpuTimes {
            kernel: sum(&[2, 5, 6]),
            total: sum(&[0, 1, 2, 3, 4, 5, 6, 7]),
            idle: sum(&[3, 4]),
        })
    }

    /// Share of the time from `self` to `later` the CPU was not idle, in percent.
    pub fn busy_percent(&self, later: &CpuTimes) -> f64 {
        let total = (later.total - self.total).as_secs_f64();
        let idle = (later.idle - self.idle).as_secs_f64();
        if total > 0.0 {
            100.0 * (total - idle) / total
        } else {
            0.0
        }
    }
}

/// Keeps every CPU out of idle states with an exit latency (the cpuidle governor picks its
/// polling state) for as long as it lives: a PM QoS request through /dev/cpu_dma_latency, as
/// tuned's latency-performance profile makes. A polling CPU takes remote wake-ups (RPS's
/// inter-processor interrupts) as a memory write instead of a halt exit.
pub struct PollIdle(
    #[expect(
        dead_code,
        reason = "held open for its lifetime: closing it ends the request"
    )]
    fs::File,
);

impl PollIdle {
    /// Holds the request, or says (once per call) why it cannot and goes on without it: the
    /// figure is still measured, only noisier, for every contender alike.
    pub fn hold(during: &str) -> Option<PollIdle> {
        use std::io::Write as _;
        let r = fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")
            .context("opening /dev/cpu_dma_latency")
            .and_then(|mut f| {
                f.write_all(&0i32.to_ne_bytes())
                    .context("writing 0 to /dev/cpu_dma_latency")?;
                Ok(PollIdle(f))
            });
        r.map_err(|e| println!("    note: CPUs may halt when idle during {during}: {e:#}"))
            .ok()
    }
}

pub fn online_cpus() -> usize {
    // The machine's, not this thread's affinity (which [`Pinned`] narrows for a while).
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(1)
}

/// `pid` and all its descendants (squid and HAProxy may fork helpers).
fn tree(pid: u32) -> Result<Vec<u32>> {
    let mut parents: HashMap<u32, Vec<u32>> = HashMap::new();
    for e in fs::read_dir("/proc")?.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(ppid) = ppid(p) {
            parents.entry(ppid).or_default().push(p);
        }
    }
    let mut all = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        all.push(p);
        todo.extend(parents.get(&p).into_iter().flatten().copied());
    }
    Ok(all)
}

/// VmRSS of `pid` and of all its descendants, in KiB.
pub fn tree_rss_kib(pid: u32) -> Result<u64> {
    let mut total = 0;
    for p in tree(pid)? {
        total += vm_rss_kib(p)
            .with_context(|| format!("reading the memory of process {p} (is it still running?)"))?;
    }
    Ok(total)
}

/// User plus system CPU time of `pid` and its descendants, all their threads included.
pub fn tree_cpu(pid: u32) -> Result<Duration> {
    let mut ticks = 0u64;
    for p in tree(pid)? {
        let stat = fs::read_to_string(format!("/proc/{p}/stat"))
            .with_context(|| format!("reading the CPU time of process {p}"))?;
        // After "pid (comm) ": state is field 3; utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')').context("odd /proc stat")? + 1..];
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        ticks += f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    }
    // USER_HZ is 100 on every Linux architecture this runs on.
    Ok(Duration::from_millis(ticks * 10))
}

/// Runs `f` and returns its result with the CPU time `pid`'s process tree used meanwhile.
pub fn cpu_during<T>(pid: u32, f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let before = tree_cpu(pid)?;
    let r = f()?;
    Ok((r, tree_cpu(pid)?.saturating_sub(before)))
}

fn ppid(pid: u32) -> Option<u32> {
    parent_in_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The parent pid in a `/proc/<pid>/stat` line: `pid (comm) state ppid ...`, where comm may
/// hold spaces and parentheses, so the fields are counted from its last ')'.
fn parent_in_stat(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS (a kernel thread or a zombie)")?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("unparsable VmRSS")
}

/// Writes a sysfs file of `ns` (sysfs shows a namespace's devices only when mounted from inside
/// it, so this goes through `ip netns exec`, which does that mount).
pub fn ns_sysfs_write(ns: &Netns, path: &Path, value: &str) -> Result<()> {
    sysfs_write_in(ns.name(), path, value)
}

fn sysfs_write_in(ns: &str, path: &Path, value: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c"])
        .arg(format!("echo {value} > {}", path.display()))
        .output()
        .context("running ip netns exec")?;
    if !out.status.success() {
        bail!(
            "writing {value} to {} in {}: {}",
            path.display(),
            ns,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a command inside `ns` and returns its stdout, failing with its stderr.
pub fn ns_output(ns: &Netns, cmd: Command, timeout: Duration) -> Result<String> {
    let desc = format!("{cmd:?}");
    let mut cmd = cmd;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = ns.spawn(cmd)?.output(timeout)?;
    if !out.status.success() {
        bail!(
            "{desc} in {} failed ({}): {}{}",
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until `f` succeeds or `timeout` passes; returns the last error on timeout.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: still failing after {timeout:?}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Lifts this process's open-files limit to the hard limit (1,000 idle connections and more).
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Kernel release, CPU model and count, for the report.
pub fn machine() -> (String, String, usize) {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    (kernel, cpu, online_cpus())
}

/// The 1-minute load average, to tell a quiet machine from a busy one in the report.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

/// Pins every thread of this process, and every thread of the processes `pids`, to `cpus`
/// while it lives (each gets its own affinity back after). Threads and children spawned
/// meanwhile inherit it.
pub struct Pinned(Vec<(i32, libc::cpu_set_t)>);

/// The threads of process `pid` ("self" for this one).
fn threads(pid: &str) -> Result<Vec<i32>> {
    Ok(fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

impl Pinned {
    pub fn to(cpus: &[usize], pids: &[u32]) -> Result<Pinned> {
        let mut tids = threads("self")?;
        for p in pids {
            tids.extend(threads(&p.to_string())?);
        }
        let set = cpu_set(cpus);
        let mut pinned = Pinned(Vec::new());
        for tid in tids {
            // A thread that ended since the listing is fine.
            if let Some(old) = affinity(tid)? {
                set_affinity(tid, &set)
                    .with_context(|| format!("setting thread {tid}'s CPU affinity"))?;
                pinned.0.push((tid, old));
            }
        }
        Ok(pinned)
    }

    /// The kernel's background threads that may run on any CPU (DAMON's kdamond, kswapd,
    /// khugepaged, ...), moved to `cpus`: their time on a measured CPU would count as its
    /// kernel time (kdamond alone took 7.6 % of the router CPU's samples during the connection
    /// run). The per-CPU ones (ksoftirqd, bound kworkers) and those the kernel keeps where they
    /// are (PF_NO_SETAFFINITY: unbound kworkers) stay.
    pub fn kernel_threads_to(cpus: &[usize]) -> Result<Pinned> {
        let set = cpu_set(cpus);
        let all = cpu_set(&(0..online_cpus()).collect::<Vec<_>>());
        let mut pinned = Pinned(Vec::new());
        for tid in kernel_threads()? {
            let Some(old) = affinity(tid)? else { continue };
            // SAFETY: two initialised sets compared by value.
            if !unsafe { libc::CPU_EQUAL(&old, &all) } {
                continue; // bound to some CPUs on purpose
            }
            match set_affinity(tid, &set) {
                Ok(()) => pinned.0.push((tid, old)),
                // A thread the kernel keeps where it is.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => bail!("moving kernel thread {tid}: {e}"),
            }
        }
        Ok(pinned)
    }
}

/// The children of kthreadd (pid 2): every kernel thread but kthreadd itself.
fn kernel_threads() -> Result<Vec<i32>> {
    let mut tids = Vec::new();
    for e in fs::read_dir("/proc")? {
        let Some(pid) = e?.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // A process that ended since the listing has no parent to read.
        if ppid(pid) == Some(2) {
            tids.push(pid as i32);
        }
    }
    Ok(tids)
}

fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: c < online CPUs < CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for (tid, old) in &self.0 {
            let _ = set_affinity(*tid, old);
        }
    }
}

/// A thread's CPU affinity; None if it has ended.
fn affinity(tid: i32) -> Result<Option<libc::cpu_set_t>> {
    // SAFETY: set is written by the kernel, its size passed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::sched_getaffinity(tid, std::mem::size_of_val(&set), &mut set) };
    match r {
        0 => Ok(Some(set)),
        _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) => Ok(None),
        _ => bail!(
            "reading thread {tid}'s CPU affinity: {}",
            std::io::Error::last_os_error()
        ),
    }
}

/// Sets a thread's CPU affinity; a thread that has ended is fine.
fn set_affinity(tid: i32, set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: set is initialised and its size passed.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(set), set) };
    let e = std::io::Error::last_os_error();
    if r != 0 && e.raw_os_error() != Some(libc::ESRCH) {
        return Err(e);
    }
    Ok(())
}

/// RPS masks of receive queues (`rx-0/rps_cpus` of a device in a namespace) set while it lives,
/// cleared after.
pub struct Rps(Vec<(String, std::path::PathBuf)>);

impl Rps {
    pub fn set(queues: &[(&Netns, &str, &str)]) -> Result<Rps> {
        let mut set = Rps(Vec::new());
        for &(ns, dev, mask) in queues {
            let file = Path::new("/sys/class/net")
                .join(dev)
                .join("queues/rx-0/rps_cpus");
            ns_sysfs_write(ns, &file, mask)?;
            set.0.push((ns.name().to_string(), file));
        }
        Ok(set)
    }
}

impl Drop for Rps {
    fn drop(&mut self) {
        for (ns, file) in &self.0 {
            let _ = sysfs_write_in(ns, file, "0");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parent_in_stat;

    #[test]
    fn the_parent_pid_is_read_after_the_whole_command_name() {
        assert_eq!(
            parent_in_stat("79 (kdamond.0) S 2 0 0 0 -1 2129984"),
            Some(2)
        );
        // A name with spaces and a ')' of its own.
        assert_eq!(parent_in_stat("4242 (a b) c) R 917 4242 917"), Some(917));
        assert_eq!(parent_in_stat("truncated"), None);
    }
}
