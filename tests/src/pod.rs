//! A pod of OpenShift's documented specs around the reference topology: the router namespace is
//! the pod's network namespace, its containers are egress-router run with no arguments and
//! exactly their environment, one after the other as a kubelet starts them. Two runtimes run
//! the same pods: processes each in their own mount namespace (as `ip netns exec` or a container
//! runtime gives them) and real rootful podman containers of the image `cargo xtask image`
//! built (`--network ns:` the router namespace: no podman network). The proxy containers run as
//! a non-root UID without any capability or privilege escalation.
//!
//! Around the pod: dnsmasq on the destination server answering `*.web.test` with its address,
//! and an HTTP origin on port 80 that answers with the client address it saw.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;

use crate::{
    DEST_IP, POD_IP, Proc, Topology,
    podman::{load_image, podman, podman_logs, podman_output},
    router_bin, unprivileged_command,
};

const T: Duration = Duration::from_secs(5);
/// The proxy containers' user: any non-root UID (OpenShift assigns an arbitrary one).
pub const PROXY_UID: u32 = 1000680000;
/// EGRESS_SOURCE as the pod specs give it.
pub const SOURCE: &str = "192.168.12.99/24";
/// The PATH every image sets.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How the pod's containers are run.
#[derive(Clone, Debug)]
pub enum Runtime {
    /// Processes in their own mount namespaces, the binary copied where any user can run it.
    Processes,
    /// Rootful podman containers of this image.
    Podman { image: String },
}

impl Runtime {
    /// Podman with the image `cargo xtask image` built (loaded from its archive).
    pub fn podman() -> Runtime {
        Runtime::Podman {
            image: load_image(false).expect("loading the image"),
        }
    }
}

pub struct PodLab {
    pub topo: Topology,
    pub dir: PathBuf,
    pub runtime: Runtime,
    /// Processes: the binary as the image holds it.
    image: PathBuf,
    /// The pod `podman kube play` made, removed first.
    kube_pod: Option<String>,
    _dns: Proc,
}

impl Drop for PodLab {
    fn drop(&mut self) {
        if let Some(pod) = &self.kube_pod {
            if std::thread::panicking() {
                for name in self.kube_containers() {
                    eprintln!("== {name}:\n{}", podman_logs(&name));
                }
            }
            let _ = podman().args(["pod", "rm", "-f", "-t", "0", pod]).output();
        }
        if std::thread::panicking() {
            for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    eprintln!("== {}:\n{text}", p.display());
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running (or finished) container of the pod.
pub enum Container {
    Process { proc: Proc, log: PathBuf },
    Podman { name: String },
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Container::Podman { name } = self {
            let _ = podman().args(["rm", "-f", "-t", "0", name]).output();
        }
    }
}

impl Container {
    pub fn is_running(&self) -> bool {
        match self {
            Container::Process { proc, .. } => proc.is_running(),
            Container::Podman { name } => {
                podman_output(&["inspect", "-f", "{{.State.Running}}", name])
                    .is_ok_and(|s| s.trim() == "true")
            }
        }
    }

    /// Waits up to `timeout` for the container to exit; its exit code.
    pub fn wait(&self, timeout: Duration) -> Result<Option<i32>> {
        match self {
            Container::Process { proc, .. } => {
                Ok(proc.wait_timeout(timeout)?.map(|s| s.code().unwrap_or(128)))
            }
            Container::Podman { name } => {
                let deadline = Instant::now() + timeout;
                while self.is_running() {
                    if Instant::now() > deadline {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let code = podman_output(&["inspect", "-f", "{{.State.ExitCode}}", name])?;
                Ok(Some(code.trim().parse()?))
            }
        }
    }

    /// Everything the container printed.
    pub fn log(&self) -> String {
        match self {
            Container::Process { log, .. } => std::fs::read_to_string(log).unwrap_or_default(),
            Container::Podman { name } => podman_logs(name),
        }
    }

    /// The host pid of the container's process.
    pub fn pid(&self) -> Result<u32> {
        match self {
            Container::Process { proc, .. } => Ok(proc.pid()),
            Container::Podman { name } => {
                Ok(podman_output(&["inspect", "-f", "{{.State.Pid}}", name])?
                    .trim()
                    .parse()?)
            }
        }
    }

    /// The real user and the effective capabilities of the container's process.
    pub fn uid_and_caps(&self) -> Result<(u32, String)> {
        uid_and_caps(self.pid()?)
    }

    /// Stops the container as a kubelet deleting it does: SIGTERM (`podman stop`, which waits
    /// up to `grace` before SIGKILL); its exit code. The container stays to be read
    /// ([`Container::log`]) until [`Container::remove`] or drop.
    pub fn stop(&self, grace: Duration) -> Result<i32> {
        match self {
            Container::Process { proc, .. } => {
                proc.signal(Signal::SIGTERM)?;
                if proc.wait_timeout(grace)?.is_none() {
                    proc.kill()?;
                }
                Ok(proc.wait()?.code().unwrap_or(128))
            }
            Container::Podman { name } => {
                podman_output(&["stop", "-t", &grace.as_secs().to_string(), name])?;
                Ok(
                    podman_output(&["inspect", "-f", "{{.State.ExitCode}}", name])?
                        .trim()
                        .parse()?,
                )
            }
        }
    }

    /// Removes a stopped container (`podman rm`): what it had mounted goes with it.
    pub fn remove(self) -> Result<()> {
        // (Drop's `rm -f` then finds nothing.)
        if let Container::Podman { name } = &self {
            podman_output(&["rm", name])?;
        }
        Ok(())
    }

    /// SIGTERM, as the kubelet stops a container.
    pub fn terminate(&self) -> Result<()> {
        match self {
            Container::Process { proc, .. } => {
                proc.signal(Signal::SIGTERM)?;
            }
            Container::Podman { name } => {
                podman_output(&["kill", "--signal", "TERM", name])?;
            }
        }
        Ok(())
    }
}

/// The real user and the effective capabilities of process `pid`.
pub fn uid_and_caps(pid: u32) -> Result<(u32, String)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let uid = field("Uid:")
        .split_whitespace()
        .next()
        .context("no Uid")?
        .parse()?;
    Ok((uid, field("CapEff:")))
}

impl PodLab {
    pub fn new(runtime: Runtime) -> PodLab {
        PodLab::around(runtime, Topology::new().expect("topology"), None)
    }

    /// `podman kube play` of a Pod manifest, unchanged, with the topology built around the pod:
    /// podman's pods cannot join a given network namespace, so the pod is created with
    /// `--network none`, its infra container started, the reference topology's router
    /// interfaces built into its namespace, and then the pod started (init containers first).
    pub fn kube_play(manifest: &Path) -> PodLab {
        let image = load_image(false).expect("loading the image");
        // A pod of this manifest left by an interrupted run would make the play fail.
        let _ = podman().args(["kube", "down"]).arg(manifest).output();
        let out = podman_output(&[
            "kube",
            "play",
            "--start=false",
            "--network",
            "none",
            &manifest.to_string_lossy(),
        ])
        .expect("podman kube play");
        let pod_id = out
            .lines()
            .skip_while(|l| !l.starts_with("Pod:"))
            .nth(1)
            .expect("podman kube play names the pod")
            .trim()
            .to_string();
        let pod = podman_output(&["pod", "inspect", "-f", "{{.Name}}", &pod_id])
            .expect("the pod's name")
            .trim()
            .to_string();
        let infra = podman_output(&["pod", "inspect", "-f", "{{.InfraContainerID}}", &pod])
            .expect("the pod's infra container");
        podman_output(&["start", infra.trim()]).expect("starting the infra container");
        let pid = podman_output(&["inspect", "-f", "{{.State.Pid}}", infra.trim()]).unwrap();
        let ns = PathBuf::from(format!("/proc/{}/ns/net", pid.trim()));
        let topo = Topology::with_router(&ns).expect("the topology around the pod");
        let lab = PodLab::around(Runtime::Podman { image }, topo, Some(pod.clone()));
        podman_output(&["pod", "start", &pod]).expect("starting the pod");
        lab
    }

    /// The names of the kube-played pod's containers other than its infra container.
    pub fn kube_containers(&self) -> Vec<String> {
        let pod = self.kube_pod.as_deref().expect("a kube-played pod");
        podman_output(&[
            "ps",
            "-a",
            "--pod",
            "--format",
            "{{.Names}} {{.PodName}} {{.IsInfra}}",
        ])
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&pod) && f.get(2) == Some(&"false")).then(|| f[0].to_string())
        })
        .collect()
    }

    fn around(runtime: Runtime, topo: Topology, kube_pod: Option<String>) -> PodLab {
        let dir = std::env::temp_dir().join(format!("{}pod", topo.prefix()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("egress-router");
        if matches!(runtime, Runtime::Processes) {
            std::fs::copy(router_bin(), &image).unwrap();
        }
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {DEST_IP}\n")).unwrap();
        let dns = start_dnsmasq(&topo, &dir);
        let listener = topo
            .dest
            .tcp_listen(SocketAddr::from((DEST_IP, 80)))
            .unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || who_am_i(conn));
            }
        });
        PodLab {
            topo,
            dir,
            runtime,
            image,
            kube_pod,
            _dns: dns,
        }
    }

    /// The router image's environment in a pod spec: EGRESS_SOURCE, EGRESS_GATEWAY and `more`.
    pub fn router_env<'a>(&self, more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut env = vec![
            ("EGRESS_SOURCE", SOURCE),
            ("EGRESS_GATEWAY", "192.168.12.1"),
        ];
        env.extend_from_slice(more);
        env
    }

    /// A privileged container of the router image with `env` (and `args`), started.
    pub fn router_container(&self, env: &[(&str, &str)], args: &[&str]) -> Container {
        self.start(env, args, true)
    }

    /// A privileged container of the router image with `env`, and `bpffs` (a directory on the
    /// harness's bpffs: its /sys/fs/bpf, or a test's [`NodeBpffs`](crate::NodeBpffs)) mounted
    /// at /sys/fs/bpf as deploy/redirect-legacy mounts the host's (hostPath, HostToContainer:
    /// podman's `rslave`), started.
    pub fn router_container_with_bpffs(&self, env: &[(&str, &str)], bpffs: &Path) -> Container {
        self.start_with_bpffs(env, &[], true, None, Some(bpffs))
    }

    /// The pod's init container: runs to completion and must exit 0.
    pub fn init_container(&self, env: &[(&str, &str)]) -> Container {
        let c = self.router_container(env, &[]);
        let code = c.wait(Duration::from_secs(30)).unwrap();
        assert_eq!(code, Some(0), "the init container failed:\n{}", c.log());
        c
    }

    /// The proxy container: the image as a non-root user without capabilities, with only
    /// `env` and the pod's resolv.conf; waits until `port` accepts.
    pub fn proxy_container(&self, env: &[(&str, &str)], port: u16) -> Container {
        let c = self.start(env, &[], false);
        self.wait_listening(&c, port);
        c
    }

    /// The proxy container with its open-files limit (soft and hard) at `nofile`, as a
    /// runtime's `ulimits` set it; waits until `port` accepts.
    pub fn proxy_container_with_nofile(
        &self,
        env: &[(&str, &str)],
        port: u16,
        nofile: u64,
    ) -> Container {
        let c = self.start_with(env, &[], false, Some(nofile));
        self.wait_listening(&c, port);
        c
    }

    /// A proxy container started without waiting for it.
    pub fn start_proxy_container(&self, env: &[(&str, &str)]) -> Container {
        self.start(env, &[], false)
    }

    fn start(&self, env: &[(&str, &str)], args: &[&str], privileged: bool) -> Container {
        self.start_with(env, args, privileged, None)
    }

    fn start_with(
        &self,
        env: &[(&str, &str)],
        args: &[&str],
        privileged: bool,
        nofile: Option<u64>,
    ) -> Container {
        self.start_with_bpffs(env, args, privileged, nofile, None)
    }

    fn start_with_bpffs(
        &self,
        env: &[(&str, &str)],
        args: &[&str],
        privileged: bool,
        nofile: Option<u64>,
        bpffs: Option<&Path>,
    ) -> Container {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let resolv = self.dir.join("resolv.conf");
        match &self.runtime {
            Runtime::Processes => {
                let mut cmd = if privileged {
                    Command::new(&self.image)
                } else {
                    unprivileged_command(&self.image, PROXY_UID)
                };
                let log = self.dir.join(format!("container-{n}.log"));
                let out = std::fs::File::create(&log).unwrap();
                cmd.args(args)
                    .env_clear()
                    .env("PATH", PATH)
                    .envs(env.iter().copied())
                    .stdin(Stdio::null())
                    .stdout(out.try_clone().unwrap())
                    .stderr(out);
                if let Some(n) = nofile {
                    use nix::sys::resource::{Resource, setrlimit};
                    // SAFETY: setrlimit is async-signal-safe; it runs between fork and exec.
                    unsafe {
                        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                            setrlimit(Resource::RLIMIT_NOFILE, n, n).map_err(std::io::Error::from)
                        });
                    }
                }
                let mut binds: Vec<(&Path, &Path)> = Vec::new();
                if !privileged {
                    binds.push((&resolv, Path::new("/etc/resolv.conf")));
                }
                if let Some(b) = bpffs {
                    binds.push((b, Path::new(crate::HOST_BPFFS)));
                }
                let proc = self.topo.router.spawn_container_with(cmd, &binds).unwrap();
                Container::Process { proc, log }
            }
            Runtime::Podman { image } => {
                let name = format!("{}c{n}", self.topo.prefix());
                let mut cmd = podman();
                cmd.args(["run", "-d", "--name", &name]).arg(format!(
                    "--network=ns:{}",
                    self.topo.router.path().display()
                ));
                if privileged {
                    cmd.arg("--privileged");
                } else {
                    cmd.arg(format!("--user={PROXY_UID}:{PROXY_UID}"))
                        .args(["--cap-drop=ALL", "--security-opt=no-new-privileges"])
                        .arg(format!("--volume={}:/etc/resolv.conf:ro", resolv.display()));
                }
                if let Some(n) = nofile {
                    cmd.arg(format!("--ulimit=nofile={n}:{n}"));
                }
                if let Some(b) = bpffs {
                    cmd.arg(format!(
                        "--volume={}:{}:rslave",
                        b.display(),
                        crate::HOST_BPFFS
                    ));
                }
                for (k, v) in env {
                    cmd.arg(format!("--env={k}={v}"));
                }
                cmd.arg(image).args(args);
                let out = cmd.output().expect("podman run");
                assert!(
                    out.status.success(),
                    "podman run failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                Container::Podman { name }
            }
        }
    }

    /// Runs a tool in its own privileged container of the pod (a debugging session next to the
    /// running router): egress-router with `args` (`status`), or with `bpftool`, bpftool from
    /// the image's debug variant. Its exit code and everything it printed.
    pub fn debug_container(&self, bpftool: bool, args: &[&str]) -> (i32, String) {
        let out = match &self.runtime {
            Runtime::Processes => {
                let mut cmd = if bpftool {
                    Command::new("bpftool")
                } else {
                    Command::new(&self.image)
                };
                cmd.args(args)
                    .env_clear()
                    .env("PATH", PATH)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                self.topo
                    .router
                    .spawn_container(cmd)
                    .unwrap()
                    .output(Duration::from_secs(30))
                    .unwrap()
            }
            Runtime::Podman { image } => {
                let mut cmd = podman();
                cmd.args(["run", "--rm", "--privileged"]).arg(format!(
                    "--network=ns:{}",
                    self.topo.router.path().display()
                ));
                if bpftool {
                    let debug = load_image(true).expect("loading the debug image");
                    cmd.args(["--entrypoint", "/usr/sbin/bpftool", &debug]);
                } else {
                    cmd.arg(image);
                }
                cmd.args(args).output().expect("podman run")
            }
        };
        (
            out.status.code().unwrap_or(128),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    pub fn wait_listening(&self, c: &Container, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.connect(port).is_err() {
            assert!(
                c.is_running(),
                "the container exited before listening on {port}:\n{}",
                c.log()
            );
            assert!(
                Instant::now() < deadline,
                "nothing listened on {port}:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A TCP connection from the client pod to the router pod's `port`.
    pub fn connect(&self, port: u16) -> std::io::Result<TcpStream> {
        self.topo
            .client
            .run(|| TcpStream::connect_timeout(&SocketAddr::from((POD_IP, port)), T))
    }

    /// Connects, retrying until `deadline` passes (a dataplane or listener coming up).
    pub fn connect_within(&self, port: u16, timeout: Duration) -> Result<TcpStream> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.connect(port) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => bail!("connecting to {port}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// dnsmasq on the destination server, answering `*.web.test` with its address, and the names
/// [`set_dns_hosts`] writes into `dir` (a hosts directory dnsmasq watches, as the DNS proxy's
/// own tests do: a name can move while a proxy runs); returns once it accepts on port 53.
pub fn start_dnsmasq(topo: &Topology, dir: &Path) -> Proc {
    std::fs::create_dir_all(dir.join("hosts")).unwrap();
    let mut dnsmasq = Command::new("dnsmasq");
    dnsmasq
        .args([
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--port=53",
        ])
        .arg(format!("--listen-address={DEST_IP}"))
        .arg(format!("--address=/web.test/{DEST_IP}"))
        .arg(format!("--hostsdir={}", dir.join("hosts").display()))
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let dns = topo
        .dest
        .spawn(dnsmasq)
        .expect("dnsmasq must be installed (cargo xtask setup)");
    // dnsmasq serves TCP too: once port 53 accepts, it answers.
    let deadline = Instant::now() + T;
    while topo
        .dest
        .run(|| TcpStream::connect_timeout(&SocketAddr::from((DEST_IP, 53)), T))
        .is_err()
    {
        assert!(
            dns.is_running() && Instant::now() < deadline,
            "dnsmasq did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    dns
}

/// Replaces the names the dnsmasq of [`start_dnsmasq`] (given the same `dir`) serves from its
/// hosts directory, atomically (dnsmasq sees one IN_MOVED_TO and re-reads the file); they are
/// served with TTL 0 within a moment.
pub fn set_dns_hosts(dir: &Path, records: &[(&str, std::net::Ipv4Addr)]) {
    let text: String = records.iter().map(|(n, a)| format!("{a} {n}\n")).collect();
    let tmp = dir.join("hosts.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("hosts").join("hosts")).unwrap();
}

/// A minimal HTTP/1.1 origin: one request per connection, the body is the client's address.
fn who_am_i(mut c: TcpStream) {
    let peer = c
        .peer_addr()
        .map(|p| p.ip().to_string())
        .unwrap_or_default();
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let _ = write!(
        c,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{peer}",
        peer.len()
    );
}

/// Sends `request` on `c` and returns the whole response (the server closes).
pub fn exchange(mut c: TcpStream, request: &str) -> String {
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

/// An absolute-form HTTP/1.1 GET through a proxy.
pub fn get(url: &str, host: &str) -> String {
    format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}
