//! The bpffs directory for pins: mounted if the container lacks it, then created.
use std::path::Path;

use anyhow::{Context as _, Result, bail};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure `dir` exists on a bpffs, mounting bpffs on its parent if that is an empty
/// non-bpffs directory (a container without /sys/fs/bpf mounted).
pub fn ensure_dir(dir: &Path) -> Result<()> {
    let parent = dir.parent().context("bpffs directory has no parent")?;
    if !is_bpffs(parent) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        nix::mount::mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "{} is not a bpffs and mounting one there failed (is the container privileged?)",
                parent.display()
            )
        })?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if !is_bpffs(dir) {
        bail!("{} is not on a bpffs", dir.display());
    }
    Ok(())
}
