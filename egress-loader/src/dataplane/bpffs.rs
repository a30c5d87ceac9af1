//! The bpffs under the pin directory: mounted if the container lacks it, then created.
use std::path::Path;

use anyhow::{Context as _, Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure `dir` exists on a bpffs. Without one, a bpffs is mounted on the nearest existing
/// directory above `dir` when that is empty (a container's /sys/fs/bpf, in a sysfs where
/// nothing can be created), else on `dir`'s parent.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    let nearest = dir
        .ancestors()
        .find(|a| a.exists())
        .context("the bpffs directory has no existing ancestor")?;
    if !is_bpffs(nearest) {
        let empty = std::fs::read_dir(nearest).is_ok_and(|mut d| d.next().is_none());
        let parent = dir.parent().context("the bpffs directory has no parent")?;
        let at = if empty {
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
