//! Link pins an earlier run left in the pin directory that no longer drive a dataplane here,
//! and the default pin directories of network namespaces that are gone.
//!
//! A tcx link whose interface went away (its network namespace was deleted: a recreated pod on
//! a node whose /sys/fs/bpf outlives pods) stays pinned but attached to nothing, and updating
//! it fails with ENOLINK. Such a pin is removed and a fresh link made; when every link pin of
//! the directory is severed, the maps pinned beside them were that dead namespace's too and go
//! as well (fresh state).
//!
//! A link pin attached to an interface that is not in this namespace is one of two things. In
//! this namespace's own default directory (named by its cookie, which no other namespace ever
//! has) only routers of this namespace pinned anything: the link is a leftover of ours (its
//! interface moved away, or, with the inode-named fallback, a dead namespace of the same
//! number whose teardown has not reached that interface yet), and it is detached and replaced.
//! In any other directory (an explicit --bpffs-dir) it may be another live router's, or that
//! of a namespace the kernel is still tearing down: which one can only be known by waiting, so
//! the survey waits up to [`TEARDOWN_GRACE`] for the kernel to sever it. Severed, it is stale
//! as above; still attached, it is another router's: never touched, and the run stops before
//! changing anything.
//!
//! The default directories of other namespaces (`netns-*` beside ours) whose link pins are all
//! severed belong to pods that are gone: nothing but those pins keeps their programs and maps
//! (two connection tables of 65,536 entries by default) alive, so they are removed. A
//! directory with a live link, or without any link pin (clsact, where nothing tells a dead
//! namespace from a live one), or one that cannot be read, is left alone, and ours never goes.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tracing::{debug, info, warn};

use super::{PINNED_MAPS, tcx};

/// A link pin the attach step will look for: (pin file name, interface index here).
pub type ExpectedLink = (String, Option<u32>);

/// How long a link attached in another network namespace is given to be severed (its namespace
/// being deleted) before it is taken for another router's.
pub const TEARDOWN_GRACE: Duration = Duration::from_secs(10);

/// What [`survey`] found; [`clear`] removes it.
#[derive(Debug, Default)]
pub struct Leftovers {
    severed: Vec<PathBuf>,
    /// Our links attached in this namespace to another interface than the one named in the
    /// pin: (pin, link id).
    misplaced: Vec<(PathBuf, u32)>,
    /// Links in this namespace's own default directory attached to an interface that is not
    /// here: (pin, link id).
    strays: Vec<(PathBuf, u32)>,
    /// Every link pin of the directory is severed (or a stray): the map pins are a dead
    /// namespace's.
    dead_namespace: bool,
    /// Default directories of other namespaces whose link pins are all severed:
    /// (directory, number of link pins).
    dead_dirs: Vec<(PathBuf, usize)>,
}

/// Where the pin directory is, for [`survey`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Whose {
    /// The default directory of this network namespace.
    OwnDefault,
    /// A directory given with --bpffs-dir.
    Explicit,
}

/// Classifies every `link_*` pin in `dir`, and the default directories of other namespaces
/// under `default_root` (`own_default`, this namespace's, is never one), changing nothing.
/// Fails, naming the pin, if one is attached in another live network namespace.
pub fn survey(
    dir: &Path,
    whose: Whose,
    expected: &[ExpectedLink],
    default_root: &Path,
    own_default: &Path,
) -> Result<Leftovers> {
    let mut found = Leftovers {
        dead_dirs: dead_dirs(default_root, &[dir, own_default]),
        ..Leftovers::default()
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(found);
    };
    let mut live = 0;
    let mut elsewhere = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("link_") {
            continue;
        }
        let pin = entry.path();
        match tcx::inspect(&pin)? {
            tcx::PinnedLink::Severed => found.severed.push(pin),
            tcx::PinnedLink::Here { ifindex, link_id } => {
                let wanted = expected.iter().find(|(n, _)| *n == name);
                match wanted {
                    Some((_, Some(want))) if *want != ifindex => {
                        found.misplaced.push((pin, link_id))
                    }
                    _ => live += 1,
                }
            }
            tcx::PinnedLink::Elsewhere { ifindex, link_id } => match whose {
                Whose::OwnDefault => found.strays.push((pin, link_id)),
                Whose::Explicit => elsewhere.push((pin, ifindex)),
            },
        }
    }
    for (pin, ifindex) in wait_for_teardown(elsewhere, TEARDOWN_GRACE)? {
        match tcx::inspect(&pin)? {
            tcx::PinnedLink::Severed => found.severed.push(pin),
            _ => bail!(
                "{} is a tcx link attached to interface {ifindex} of another network \
                 namespace, still after {}s (a namespace being deleted would have let go of it \
                 by then): another egress-router uses this --bpffs-dir. Give each router its \
                 own directory (the default, {}/<netns id>, is one per network namespace)",
                pin.display(),
                TEARDOWN_GRACE.as_secs(),
                super::pindir::DEFAULT_ROOT
            ),
        }
    }
    found.dead_namespace = !(found.severed.is_empty() && found.strays.is_empty())
        && live == 0
        && found.misplaced.is_empty();
    Ok(found)
}

/// Waits up to `grace` for the kernel to sever the links in `pins` (pin, interface index),
/// which are attached in another network namespace; returns them all once they are severed or
/// the time is up (the caller looks again).
fn wait_for_teardown(pins: Vec<(PathBuf, u32)>, grace: Duration) -> Result<Vec<(PathBuf, u32)>> {
    if pins.is_empty() {
        return Ok(pins);
    }
    for (pin, ifindex) in &pins {
        info!(
            pin = %pin.display(),
            "pinned tcx link is attached to interface {ifindex} of another network namespace: \
             waiting up to {}s for it to be severed (its namespace being deleted) before taking \
             it for another router's",
            grace.as_secs()
        );
    }
    let deadline = Instant::now() + grace;
    loop {
        let mut attached = false;
        for (pin, _) in &pins {
            attached |= !matches!(tcx::inspect(pin)?, tcx::PinnedLink::Severed);
        }
        if !attached || Instant::now() >= deadline {
            return Ok(pins);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The default directories under `root`, other than those in `keep`, whose link pins are all
/// severed, with how many link pins each has.
fn dead_dirs(root: &Path, keep: &[&Path]) -> Vec<(PathBuf, usize)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut dead = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let is_netns_dir = entry.file_name().to_string_lossy().starts_with("netns-")
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_netns_dir || keep.contains(&dir.as_path()) {
            continue;
        }
        match all_links_severed(&dir) {
            Ok(Some(links)) => dead.push((dir, links)),
            Ok(None) => {}
            Err(e) => {
                debug!(dir = %dir.display(), "leaving alone a pin directory that cannot be read: {e:#}")
            }
        }
    }
    dead.sort();
    dead
}

/// The number of link pins in `dir` if there is at least one and all are severed.
fn all_links_severed(dir: &Path) -> Result<Option<usize>> {
    let mut links = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if !entry.file_name().to_string_lossy().starts_with("link_") {
            continue;
        }
        if tcx::inspect(&entry.path())? != tcx::PinnedLink::Severed {
            return Ok(None);
        }
        links += 1;
    }
    Ok((links > 0).then_some(links))
}

/// Removes what [`survey`] found, saying so.
pub fn clear(dir: &Path, found: &Leftovers) -> Result<()> {
    for (gone, links) in &found.dead_dirs {
        warn!(
            dir = %gone.display(),
            "pin directory of a network namespace that is gone (its {links} tcx links are all severed): removing it, and with it the programs and maps only its pins kept alive"
        );
        match std::fs::remove_dir_all(gone) {
            Ok(()) => {}
            // Another router starting on this node got there first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", gone.display())),
        }
    }
    for pin in &found.severed {
        warn!(
            pin = %pin.display(),
            "pinned tcx link is severed (its interface or network namespace is gone): removing it; a fresh link is made"
        );
        remove(pin)?;
    }
    for (pin, link_id) in &found.misplaced {
        warn!(
            pin = %pin.display(),
            "pinned tcx link is attached to another interface than the one it is named for: detaching and removing it; a fresh link is made"
        );
        tcx::detach(*link_id)?;
        remove(pin)?;
    }
    for (pin, link_id) in &found.strays {
        warn!(
            pin = %pin.display(),
            "pinned tcx link of this network namespace's directory is attached to an interface that is not here (moved away, or of a namespace being deleted): detaching and removing it; a fresh link is made"
        );
        tcx::detach(*link_id)?;
        remove(pin)?;
    }
    if found.dead_namespace {
        let maps: Vec<PathBuf> = PINNED_MAPS
            .iter()
            .map(|m| dir.join(m))
            .filter(|p| p.exists())
            .collect();
        if !maps.is_empty() {
            warn!(
                dir = %dir.display(),
                "the maps pinned here belong to a dataplane whose links are all severed (a network namespace that is gone): removing them; the connection table starts empty"
            );
        }
        for m in &maps {
            remove(m)?;
        }
    }
    Ok(())
}

fn remove(pin: &Path) -> Result<()> {
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", pin.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_directories_whose_link_pins_are_all_severed_are_dead() {
        // Off a bpffs nothing is a pin: a directory whose "link pins" cannot be opened is left
        // alone, and so is one without any, and anything not named like a namespace's.
        let root = std::env::temp_dir().join(format!("stale-test-{}", std::process::id()));
        for d in ["netns-1", "netns-2", "other"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("netns-1/link_eth0_ingress_eth0"), "").unwrap();
        std::fs::write(root.join("netns-2/FLOWS"), "").unwrap();
        std::fs::write(root.join("other/link_eth0_ingress_eth0"), "").unwrap();
        let dead = dead_dirs(&root, &[]);
        std::fs::remove_dir_all(&root).unwrap();
        assert!(dead.is_empty(), "{dead:?}");
        assert!(dead_dirs(Path::new("/nonexistent/root"), &[]).is_empty());
    }
}
