//! The harness's bpffs and egress-router's pin directories on it.
//!
//! A node mounts a bpffs on /sys/fs/bpf at boot (systemd does), and pods that mount the host's
//! /sys/fs/bpf share it. The harness does the same for itself, once: a router started with
//! [`Netns::spawn`](crate::Netns::spawn) shares the harness's mounts and so pins on a bpffs that
//! outlives it, as in such a pod; one started with
//! [`Netns::spawn_container`](crate::Netns::spawn_container) does not see it.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Once,
};

use anyhow::{Context as _, Result};

use crate::Netns;

/// Where the harness's (the "host's") bpffs is.
pub const HOST_BPFFS: &str = "/sys/fs/bpf";
/// egress-router's default pin directories are `<this>/netns-<cookie>`.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/egress-router";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Mounts a bpffs on /sys/fs/bpf in the harness's mount namespace unless one is there.
pub fn ensure_host_bpffs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if !is_bpffs(Path::new(HOST_BPFFS)) {
            nix::mount::mount(
                Some("bpf"),
                HOST_BPFFS,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .unwrap_or_else(|e| panic!("mounting a bpffs on {HOST_BPFFS}: {e}"));
        }
    });
}

impl Netns {
    /// The namespace's cookie (SO_NETNS_COOKIE), which names egress-router's default pin
    /// directory.
    pub fn cookie(&self) -> Result<u64> {
        self.run(|| {
            let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
            let mut cookie = 0u64;
            let mut len = size_of::<u64>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a live u64.
            let r = unsafe {
                libc::getsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_NETNS_COOKIE,
                    (&mut cookie as *mut u64).cast(),
                    &mut len,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(cookie)
        })
        .with_context(|| format!("SO_NETNS_COOKIE in {}", self.name()))
    }

    /// egress-router's default pin directory for a router in this namespace.
    pub fn default_pin_dir(&self) -> Result<PathBuf> {
        Ok(Path::new(DEFAULT_PIN_ROOT).join(format!("netns-{}", self.cookie()?)))
    }
}

/// Whether the running kernel has tcx (Linux 6.6): where egress-router attaches with tcx.
pub fn kernel_has_tcx() -> bool {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 6)
}

/// Removes a pin directory (and what is pinned in it) when dropped, also while unwinding.
pub struct PinDir(pub PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("egress-tests: removing {}: {e}", self.0.display()),
        }
    }
}

/// A test's own directory on the harness's bpffs, standing for a node's /sys/fs/bpf: bound at
/// /sys/fs/bpf in the containers of the pods "on" that node
/// ([`Netns::spawn_with_host_bpffs`]), so what their routers pin and clear (the default pin
/// directories under `egress-router/`) is seen by those pods only, not by the routers of other
/// tests. Removed, with everything pinned in it, when dropped.
pub struct NodeBpffs(PinDir);

impl NodeBpffs {
    /// `/sys/fs/bpf/<name>`, created (the harness's bpffs mounted first if need be).
    pub fn new(name: &str) -> Result<NodeBpffs> {
        ensure_host_bpffs();
        let dir = Path::new(HOST_BPFFS).join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(NodeBpffs(PinDir(dir)))
    }

    /// The directory on the harness's side.
    pub fn path(&self) -> &Path {
        &self.0.0
    }

    /// Where the default pin directory of a router in `ns` lands: the container's
    /// `/sys/fs/bpf/egress-router/netns-<cookie>` seen from the harness.
    pub fn default_pin_dir(&self, ns: &Netns) -> Result<PathBuf> {
        let inside = ns.default_pin_dir()?;
        let rel = inside.strip_prefix(HOST_BPFFS).expect("under /sys/fs/bpf");
        Ok(self.path().join(rel))
    }
}

/// The interface a pinned tcx link is attached to, as the kernel shows it in the link's fdinfo:
/// 0 once the interface (or its network namespace) is gone.
pub fn pinned_link_ifindex(pin: &Path) -> Result<u32> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let c = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())?;
    let mut attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    // SAFETY: `attr` is the BPF_OBJ_GET prefix of `union bpf_attr`, its size passed exactly;
    // the path it points to lives until the call returns.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut attr as *mut ObjGet,
            size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("opening {}", pin.display()));
    }
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("ifindex:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no ifindex in the fdinfo of {}: {info}", pin.display()))
}
