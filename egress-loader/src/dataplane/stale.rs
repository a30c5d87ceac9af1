//! Link pins an earlier run left in the pin directory that no longer drive a dataplane here.
//!
//! A tcx link whose interface went away (its network namespace was deleted: a recreated pod on
//! a node whose /sys/fs/bpf outlives pods) stays pinned but attached to nothing, and updating
//! it fails with ENOLINK. Such a pin is removed and a fresh link made; when every link pin of
//! the directory is severed, the maps pinned beside them were that dead namespace's too and go
//! as well (fresh state). A link pin attached in another, live namespace is another router's:
//! it is never touched, and the run stops before changing anything.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use tracing::warn;

use super::{PINNED_MAPS, tcx};

/// A link pin the attach step will look for: (pin file name, interface index here).
pub type ExpectedLink = (String, Option<u32>);

/// What [`survey`] found; [`clear`] removes it.
#[derive(Debug, Default)]
pub struct Leftovers {
    severed: Vec<PathBuf>,
    /// Our links attached in this namespace to another interface than the one named in the
    /// pin: (pin, link id).
    misplaced: Vec<(PathBuf, u32)>,
    /// Every link pin of the directory is severed: the map pins are a dead namespace's.
    dead_namespace: bool,
}

/// Classifies every `link_*` pin in `dir`, changing nothing. Fails, naming the pin, if one is
/// attached in another network namespace.
pub fn survey(dir: &Path, expected: &[ExpectedLink]) -> Result<Leftovers> {
    let mut found = Leftovers::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(found);
    };
    let mut live = 0;
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
            tcx::PinnedLink::Elsewhere { ifindex } => bail!(
                "{} is a tcx link attached to interface {ifindex} of another network \
                 namespace: another egress-router uses this --bpffs-dir. Give each router its \
                 own directory (the default, {}/<netns id>, is one per network namespace)",
                pin.display(),
                super::pindir::DEFAULT_ROOT
            ),
        }
    }
    found.dead_namespace = !found.severed.is_empty() && live == 0 && found.misplaced.is_empty();
    Ok(found)
}

/// Removes what [`survey`] found, saying so.
pub fn clear(dir: &Path, found: &Leftovers) -> Result<()> {
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
