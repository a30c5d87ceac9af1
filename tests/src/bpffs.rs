//! The harness's bpffs.
//!
//! A node mounts a bpffs on /sys/fs/bpf at boot (systemd does), and pods that mount the host's
//! /sys/fs/bpf share it. The harness does the same for itself, once: a router started with
//! [`Netns::spawn`](crate::Netns::spawn) shares the harness's mounts and so pins on a bpffs that
//! outlives it, as in such a pod; one started with
//! [`Netns::spawn_container`](crate::Netns::spawn_container) does not see it.
use std::{path::Path, sync::Once};

/// Where the harness's (the "host's") bpffs is.
pub const HOST_BPFFS: &str = "/sys/fs/bpf";

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
