//! Where the pins live: by default one directory per network namespace,
//! `/sys/fs/bpf/egress-router/<netns id>`. Routers of different pods on one node that mount the
//! host's /sys/fs/bpf then never share a directory (with one fixed directory the second router
//! took over the first one's links), and `status`, run in the same pod, finds the same one.
use std::{
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

/// The parent of the per-namespace default directories.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/egress-router";

/// The bpffs directory to use: `explicit` as given, else the default of this network namespace.
/// The one place the default is computed (for the dataplane and for `status`).
pub fn resolve(explicit: Option<&Path>) -> Result<PathBuf> {
    match explicit {
        Some(dir) => Ok(dir.to_path_buf()),
        None => Ok(Path::new(DEFAULT_ROOT).join(netns_id()?)),
    }
}

/// Names this process's network namespace: `netns-<cookie>` (SO_NETNS_COOKIE, Linux 5.14: a
/// number never reused while the machine runs), else `netns-ino-<inode of /proc/self/ns/net>`
/// (unique among live namespaces; a dead namespace's number can come back, which the stale-pin
/// checks handle).
pub fn netns_id() -> Result<String> {
    match netns_cookie() {
        Ok(cookie) => Ok(format!("netns-{cookie}")),
        Err(e) => {
            tracing::debug!("SO_NETNS_COOKIE unavailable ({e}); naming the namespace by inode");
            let ns = "/proc/self/ns/net";
            let ino = std::fs::metadata(ns)
                .with_context(|| format!("reading {ns} to name this network namespace"))?
                .ino();
            Ok(format!("netns-ino-{ino}"))
        }
    }
}

fn netns_cookie() -> io::Result<u64> {
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a live u64, and updates `len`.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_names_this_network_namespace() {
        let dir = resolve(None).unwrap();
        assert_eq!(dir.parent(), Some(Path::new(DEFAULT_ROOT)));
        let id = dir.file_name().unwrap().to_str().unwrap();
        assert!(id.starts_with("netns-"), "{id}");
        assert_eq!(resolve(None).unwrap(), dir, "stable within one namespace");
        assert_eq!(
            resolve(Some(Path::new("/x/y"))).unwrap(),
            Path::new("/x/y"),
            "an explicit directory is used as given"
        );
    }
}
