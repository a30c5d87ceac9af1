//! Named network namespaces (`/run/netns/<name>`, like `ip netns add`), code that runs inside
//! them and processes started in them.
use std::{
    fs::{self, File},
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, Once},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use ipnet::Ipv4Net;
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
};

use crate::{
    capture::Capture,
    netlink,
    proc::{self, Isolation, Proc},
    servers::EchoServer,
};

/// Where named namespaces live (the `ip netns` convention).
pub const NETNS_DIR: &str = "/run/netns";
/// Every namespace this harness creates is named `er-<pid>-...`.
pub const NAME_PREFIX: &str = "er-";

/// A named network namespace. Dropping it kills every process started in it with
/// [`Netns::spawn`] and removes the name; the kernel frees the namespace (and its interfaces)
/// once nothing else holds it.
pub struct Netns {
    name: String,
    fd: OwnedFd,
    procs: Mutex<Vec<Proc>>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns").field("name", &self.name).finish()
    }
}

impl Netns {
    /// Creates `/run/netns/<name>`. Fails with a message naming the missing privilege if not root.
    pub fn create(name: &str) -> Result<Netns> {
        require_root()?;
        remove_stale_once();
        // A fresh thread unshares its network namespace, binds it to the name and exits; the
        // bind mount and the returned descriptor keep the namespace alive.
        std::thread::scope(|s| {
            s.spawn(|| -> Result<Netns> {
                unshare(CloneFlags::CLONE_NEWNET).context(
                    "unshare(CLONE_NEWNET) failed: creating network namespaces needs \
                     CAP_SYS_ADMIN and a kernel with CONFIG_NET_NS",
                )?;
                Netns::named(name, Path::new("/proc/thread-self/ns/net"))
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
        .with_context(|| format!("creating network namespace {name}"))
    }

    /// Names an existing network namespace (`source`, such as `/proc/<pid>/ns/net` of a
    /// container runtime's pod) `/run/netns/<name>`, to build a topology around it. Dropping the
    /// Netns removes the name, not the namespace, which its owner keeps.
    pub fn adopt(name: &str, source: &Path) -> Result<Netns> {
        require_root()?;
        Netns::named(name, source)
    }

    /// Bind-mounts the namespace `source` on `/run/netns/<name>` (as `ip netns` names one).
    fn named(name: &str, source: &Path) -> Result<Netns> {
        share_netns_dir()?;
        let path = Path::new(NETNS_DIR).join(name);
        File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let bound = mount(
            Some(source),
            &path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting {} on {}", source.display(), path.display()))
        .and_then(|()| Ok(OwnedFd::from(File::open(&path)?)));
        match bound {
            Ok(fd) => Ok(Netns {
                name: name.to_string(),
                fd,
                procs: Mutex::new(Vec::new()),
            }),
            Err(e) => {
                let _ = unmount_and_remove(&path);
                Err(e)
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: usable with `ip netns exec <name>` while debugging.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// The namespace file descriptor (for `setns` or `IFLA_NET_NS_FD`).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Runs `f` on a thread inside the namespace and returns its result. A panic in `f` is
    /// propagated to the caller. Threads `f` spawns start in the namespace too, and sockets it
    /// creates stay in it wherever they are used afterwards.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        std::thread::scope(|s| {
            let thread = s.spawn(|| {
                setns(&self.fd, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
                f()
            });
            thread
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Runs a future inside the namespace on a fresh current-thread tokio runtime.
    pub fn block_on<T, F, Fut>(&self, f: F) -> T
    where
        T: Send,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
    {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building a tokio runtime")
                .block_on(f())
        })
    }

    /// Runs `f` with an rtnetlink handle connected to this namespace.
    pub fn netlink<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce(rtnetlink::Handle) -> Fut + Send,
        Fut: Future<Output = Result<T>>,
    {
        self.block_on(|| async move {
            let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
            let conn = tokio::spawn(conn);
            let out = f(handle).await;
            conn.abort();
            out
        })
        .with_context(|| format!("in network namespace {}", self.name))
    }

    /// Starts `cmd` inside the namespace. The process is killed when this namespace is dropped
    /// (or when the test process dies).
    pub fn spawn(&self, cmd: Command) -> Result<Proc> {
        self.spawn_with(cmd, Isolation::NetOnly)
    }

    /// Starts `cmd` in the namespace as a container runtime starts a container's process (and
    /// as `ip netns exec` does): in its own mount namespace with a fresh /sys, so /sys/fs/bpf
    /// holds no bpffs and anything the process mounts or pins there goes with it.
    pub fn spawn_container(&self, cmd: Command) -> Result<Proc> {
        self.spawn_container_with(cmd, &[])
    }

    /// [`Netns::spawn_container`] with host paths bind-mounted into the container's mount
    /// namespace (`(host path, container path)`), as a runtime mounts volumes or resolv.conf.
    pub fn spawn_container_with(&self, cmd: Command, binds: &[(&Path, &Path)]) -> Result<Proc> {
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
                .with_context(|| format!("{} has a NUL byte", p.display()))
        };
        let binds = binds
            .iter()
            .map(|(s, t)| Ok((c(s)?, c(t)?)))
            .collect::<Result<Vec<_>>>()?;
        self.spawn_with(cmd, Isolation::Container { binds })
    }

    /// [`Netns::spawn_container`] with `bpffs`, a directory on the harness's bpffs (the
    /// "host's" /sys/fs/bpf itself, or a test's own directory under it, see
    /// [`NodeBpffs`](crate::NodeBpffs)), bind-mounted at /sys/fs/bpf with HostToContainer
    /// propagation: how a pod that mounts hostPath /sys/fs/bpf (deploy/redirect-legacy) runs
    /// its router. Its pins outlive it, and a container started the same way finds them.
    pub fn spawn_with_host_bpffs(&self, cmd: Command, bpffs: &Path) -> Result<Proc> {
        self.spawn_container_with(cmd, &[(bpffs, Path::new(crate::HOST_BPFFS))])
    }

    fn spawn_with(&self, cmd: Command, isolation: Isolation) -> Result<Proc> {
        let desc = format!("{cmd:?}");
        let p = proc::spawn_in(cmd, self.fd.as_raw_fd(), isolation)
            .with_context(|| format!("starting {desc} in {}", self.name))?;
        self.procs.lock().unwrap().push(p.clone());
        Ok(p)
    }

    /// Writes a sysctl of this namespace: `set_sysctl("net.ipv4.ip_forward", "1")`.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key);
        self.run(|| fs::write(&path, value))
            .with_context(|| format!("setting {key}={value} in {}", self.name))
    }

    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        self.run(|| fs::read_to_string(&path))
            .map(|s| s.trim().to_string())
            .with_context(|| format!("reading {key} in {}", self.name))
    }

    pub fn ifindex(&self, iface: &str) -> Result<u32> {
        let iface = iface.to_string();
        self.netlink(|h| async move { netlink::link_index(&h, &iface).await })
    }

    pub fn mac(&self, iface: &str) -> Result<[u8; 6]> {
        let iface = iface.to_string();
        self.netlink(|h| async move { netlink::link_mac(&h, &iface).await })
    }

    pub fn link_up(&self, iface: &str) -> Result<()> {
        let iface = iface.to_string();
        self.netlink(|h| async move {
            let idx = netlink::link_index(&h, &iface).await?;
            netlink::set_up(&h, idx).await
        })
    }

    /// Adds an IPv4 address (`"10.0.0.1/24".parse()`) to an interface.
    pub fn add_addr(&self, iface: &str, addr: Ipv4Net) -> Result<()> {
        let iface = iface.to_string();
        self.netlink(|h| async move {
            let idx = netlink::link_index(&h, &iface).await?;
            netlink::add_addr(&h, idx, addr).await
        })
    }

    /// Adds (or replaces) a route to `dst`, via `gateway` if given, out of `dev`.
    pub fn add_route(&self, dst: Ipv4Net, gateway: Option<Ipv4Addr>, dev: &str) -> Result<()> {
        let dev = dev.to_string();
        self.netlink(|h| async move {
            let idx = netlink::link_index(&h, &dev).await?;
            netlink::replace_route(&h, dst, gateway, idx).await
        })
    }

    /// Creates a veth pair: `name` here, `peer` in `other`; both are brought up.
    pub fn add_veth_to(&self, name: &str, other: &Netns, peer: &str) -> Result<()> {
        let (n, p) = (name.to_string(), peer.to_string());
        let other_fd = other.fd.as_raw_fd();
        self.netlink(|h| async move { netlink::add_veth(&h, &n, &p, other_fd).await })
            .with_context(|| {
                format!(
                    "creating veth {name} ({}) <-> {peer} ({})",
                    self.name, other.name
                )
            })?;
        self.link_up(name)?;
        other.link_up(peer)
    }

    /// A TCP listener bound inside the namespace.
    pub fn tcp_listen(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.run(|| TcpListener::bind(addr))
            .with_context(|| format!("listening on {addr} in {}", self.name))
    }

    /// A TCP connection opened from inside the namespace.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        self.run(|| TcpStream::connect_timeout(&addr, timeout))
            .with_context(|| format!("connecting to {addr} from {}", self.name))
    }

    /// A UDP socket bound inside the namespace.
    pub fn udp_bind(&self, addr: SocketAddr) -> Result<UdpSocket> {
        self.run(|| UdpSocket::bind(addr))
            .with_context(|| format!("binding UDP {addr} in {}", self.name))
    }

    /// A TCP echo server on `addr` that records the peer address of every connection.
    pub fn tcp_echo(&self, addr: SocketAddr) -> Result<EchoServer> {
        EchoServer::tcp(self.tcp_listen(addr)?)
    }

    /// A UDP echo server on `addr` that records the peer address of every datagram.
    pub fn udp_echo(&self, addr: SocketAddr) -> Result<EchoServer> {
        EchoServer::udp(self.udp_bind(addr)?)
    }

    /// Sends ICMP echo requests to `dst` until one is answered or `timeout` passes.
    pub fn ping(&self, dst: Ipv4Addr, timeout: Duration) -> Result<Duration> {
        self.run(|| crate::servers::ping(dst, timeout))
            .with_context(|| format!("pinging {dst} from {}", self.name))
    }

    /// Captures frames of one ethertype (e.g. `libc::ETH_P_ARP`) arriving on `iface`.
    pub fn capture(&self, iface: &str, ethertype: u16) -> Result<Capture> {
        let idx = self.ifindex(iface)?;
        self.run(|| Capture::open(idx, ethertype))
            .with_context(|| format!("capturing on {iface} in {}", self.name))
    }

    /// Kills the processes started here, then any other process still in the namespace (a
    /// child of one of them, something started with `ip netns exec`); returns how many it killed.
    pub fn kill_all(&self) -> usize {
        let procs = std::mem::take(&mut *self.procs.lock().unwrap());
        let tracked = procs.iter().filter(|p| p.kill_if_running()).count();
        let others = match nix::sys::stat::fstat(&self.fd) {
            Ok(st) => kill_processes_in(st.st_ino),
            Err(_) => 0,
        };
        tracked + others
    }
}

/// SIGKILLs every process (other than this one) whose network namespace has inode `ino`.
fn kill_processes_in(ino: u64) -> usize {
    let want = format!("net:[{ino}]");
    let me = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        if pid == me {
            continue;
        }
        let in_ns = fs::read_link(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|l| l.as_os_str() == want.as_str());
        if in_ns
            && nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        {
            killed += 1;
        }
    }
    killed
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        let path = self.path();
        if let Err(e) = unmount_and_remove(&path) {
            eprintln!("egress-tests: removing {}: {e}", path.display());
        }
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// The harness needs root: it creates namespaces and interfaces. Fail loudly, never skip.
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the network-namespace test harness must run as root (it creates network \
             namespaces, veth and macvlan interfaces): run `sudo -E cargo test -p egress-tests`"
        );
    }
    Ok(())
}

/// Makes `/run/netns` a shared mount point of its own, as `ip netns add` and podman do before
/// they name a namespace. Without it, the first of them to run later binds `/run/netns` over
/// itself, and the namespace files bound before then stay mounted beneath that bind, where no
/// unmount through the path reaches them and unlinking them fails with EBUSY.
fn share_netns_dir() -> Result<()> {
    // Two test threads both finding it no mount point would bind twice, the second over the
    // first one's namespace.
    static LOCK: Mutex<()> = Mutex::new(());
    let _held = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    fs::create_dir_all(NETNS_DIR).with_context(|| format!("creating {NETNS_DIR}"))?;
    let share = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match share() {
        // EINVAL: not a mount point yet.
        Err(nix::errno::Errno::EINVAL) => mount(
            Some(NETNS_DIR),
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| share()),
        other => other,
    }
    .with_context(|| format!("making {NETNS_DIR} a shared mount point"))
}

/// Names of existing harness namespaces (`/run/netns/er-*`).
pub fn list_harness_namespaces() -> Vec<String> {
    let Ok(dir) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(NAME_PREFIX))
        .collect();
    names.sort();
    names
}

/// Removes `er-<pid>-*` namespaces left behind by test processes that no longer run (a crash or
/// a SIGKILL skips Drop). Namespaces of live processes, including parallel test binaries, stay.
pub fn remove_stale() -> usize {
    let mut removed = 0;
    for name in list_harness_namespaces() {
        let Some(pid) = name[NAME_PREFIX.len()..]
            .split('-')
            .next()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = Path::new(NETNS_DIR).join(&name);
        // Only a mounted namespace file (on nsfs) names a namespace processes can be in.
        use std::os::unix::fs::MetadataExt as _;
        let nsfs = fs::metadata("/proc/self/ns/net").map(|m| m.dev());
        if let (Ok(st), Ok(nsfs)) = (fs::metadata(&path), nsfs)
            && st.dev() == nsfs
        {
            kill_processes_in(st.ino());
        }
        // One namespace that cannot go (its file is also a mount point beneath a later bind
        // of /run/netns, where no unmount of ours reaches it) must not keep the others.
        match unmount_and_remove(&path) {
            Ok(true) => removed += 1,
            Ok(false) => {}
            Err(e) => eprintln!("egress-tests: cannot remove stale namespace {name}: {e}"),
        }
    }
    removed
}

/// Unmounts a namespace file (every mount stacked on it) and removes it; false if another test
/// thread removed it first.
fn unmount_and_remove(path: &Path) -> io::Result<bool> {
    while umount2(path, MntFlags::MNT_DETACH).is_ok() {}
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn remove_stale_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| match remove_stale() {
        0 => {}
        n => eprintln!("egress-tests: removed {n} stale namespaces of earlier runs"),
    });
}
