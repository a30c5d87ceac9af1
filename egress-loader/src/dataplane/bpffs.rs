//! The bpffs under the pin directory, and whether it outlives this process.
//!
//! A bpffs that was there before we started (a node's /sys/fs/bpf, the host's mounted into the
//! pod) keeps its pins after we exit. One we have to mount ourselves lives in this process's
//! mount namespace: in a container, or under `ip netns exec`, that namespace and the pins in it
//! go when the process does, and with them whatever only a pin held (tcx links).
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Whether pins under the directory outlive this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// The directory is on a bpffs that was there before we started.
    Outlives,
    /// No bpffs there: we mount one, and it goes with this process's mount namespace.
    Private,
}

/// What [`ensure_dir`] will do for a directory: found by [`probe`], which changes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub lifetime: Lifetime,
    /// Where a bpffs must be mounted first (created if missing), for [`Lifetime::Private`].
    mount_at: Option<PathBuf>,
}

/// Finds out, without changing anything, whether `dir` is on a bpffs and where one would be
/// mounted if not: on the nearest existing directory above it when that is empty (a container's
/// /sys/fs/bpf, in a sysfs where nothing can be created), else on `dir`'s parent.
pub fn probe(dir: &Path) -> Result<Place> {
    let nearest = dir
        .ancestors()
        .find(|a| a.exists())
        .context("the bpffs directory has no existing ancestor")?;
    if is_bpffs(nearest) {
        return Ok(Place {
            lifetime: Lifetime::Outlives,
            mount_at: None,
        });
    }
    let empty = std::fs::read_dir(nearest).is_ok_and(|mut d| d.next().is_none());
    let parent = dir.parent().context("the bpffs directory has no parent")?;
    let mount_at = if empty {
        nearest
    } else if parent != nearest && parent.starts_with(nearest) {
        parent
    } else {
        bail!(
            "{} is not on a bpffs, and {} is not an empty directory to mount one on: \
             mount a bpffs (mount -t bpf bpf /sys/fs/bpf) or choose a --bpffs-dir on one",
            dir.display(),
            nearest.display()
        );
    };
    Ok(Place {
        lifetime: Lifetime::Private,
        mount_at: Some(mount_at.to_path_buf()),
    })
}

/// Makes sure `dir` exists on a bpffs, mounting one where [`probe`] said.
pub fn ensure_dir(dir: &Path, place: &Place) -> Result<()> {
    if let Some(at) = &place.mount_at
        && !is_bpffs(at)
    {
        std::fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
        nix::mount::mount(
            Some("bpf"),
            at,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "{} is not a bpffs and mounting one there failed (is the container privileged?)",
                at.display()
            )
        })?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if !is_bpffs(dir) {
        bail!("{} is not on a bpffs", dir.display());
    }
    Ok(())
}
