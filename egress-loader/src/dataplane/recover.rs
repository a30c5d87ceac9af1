//! Recovery from the kernel: the maps of a dataplane that is attached here but whose pins are
//! not in the pin directory.
//!
//! Why: a router in a container without the host's /sys/fs/bpf pins into a bpffs that goes with
//! the container, while its clsact filters stay on the interfaces and keep the programs, and
//! through them the maps, alive. The next router (or `status` in another container of the pod)
//! finds our program on the cluster interface and, from the program's info, the maps it uses.
//! Pinned again under the expected names, the loader reuses them, so established connections
//! (FLOWS) carry on. The same finds the maps of a tcx link pinned elsewhere (another
//! --bpffs-dir, or the single directory of earlier versions) or whose pins are out of sight
//! (`status` in a container next to a tcx dataplane).
use std::path::Path;

use anyhow::{Context as _, Result};
use aya::{
    maps::MapData,
    programs::{ProgramInfo, loaded_programs},
};
use tracing::{debug, warn};

use super::{Method, PINNED_MAPS, clsact, pins, tcx};

/// The maps of a running dataplane, found through one of its programs.
pub struct Found {
    /// Where they were found, for messages: "the tcx program on eth0".
    pub from: String,
    pub maps: Vec<(&'static str, MapData)>,
}

impl Found {
    pub fn take(&mut self, name: &str) -> Option<MapData> {
        let i = self.maps.iter().position(|(n, _)| *n == name)?;
        Some(self.maps.swap_remove(i).1)
    }
}

/// One of our programs attached to an interface's ingress.
pub struct OnInterface {
    pub interface: String,
    pub method: Method,
    pub prog: ProgramInfo,
    /// The tcx link (none for a clsact filter).
    pub link_id: Option<u32>,
}

impl OnInterface {
    /// "the tcx program on eth0", "the clsact filter on eth0".
    pub fn describe(&self) -> String {
        match self.method {
            Method::Tcx => format!("the tcx program on {}", self.interface),
            Method::Clsact => format!("the clsact filter on {}", self.interface),
        }
    }
}

/// Our programs attached to `iface`'s ingress, the one that runs first first (tcx links run
/// before clsact filters). Empty if there is no such interface.
pub fn attached(iface: &str) -> Result<Vec<OnInterface>> {
    let Ok(ifindex) = nix::net::if_::if_nametoindex(iface) else {
        debug!(
            interface = iface,
            "no such interface: nothing attached to it"
        );
        return Ok(Vec::new());
    };
    let mut found: Vec<OnInterface> = tcx::ours(iface, ifindex)?
        .into_iter()
        .map(|a| OnInterface {
            interface: iface.to_string(),
            method: Method::Tcx,
            prog: a.prog,
            link_id: Some(a.link_id),
        })
        .collect();
    if let Some(filter) = clsact::find(ifindex)? {
        match program_by_id(filter.prog_id)? {
            Some(prog) if tcx::is_our_program(prog.name_as_str()) => found.push(OnInterface {
                interface: iface.to_string(),
                method: Method::Clsact,
                prog,
                link_id: None,
            }),
            _ => debug!(
                interface = iface,
                ?filter,
                "the filter at our priority runs no program of ours"
            ),
        }
    }
    Ok(found)
}

fn program_by_id(id: u32) -> Result<Option<ProgramInfo>> {
    for p in loaded_programs() {
        let p = p.context("listing the loaded BPF programs")?;
        if p.id() == id {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Finds the maps of the dataplane attached to `cluster` (and, for any it does not use,
/// `macvlan`), checking each one's layout the way pinned maps are checked. None if no program
/// of ours is attached. Changes nothing.
pub fn find(cluster: &str, macvlan: &str) -> Result<Option<Found>> {
    let mut programs = attached(cluster)?;
    if programs.is_empty() {
        return Ok(None);
    }
    programs.extend(attached(macvlan)?);
    let from = programs[0].describe();
    let mut maps: Vec<(&'static str, MapData)> = Vec::new();
    for OnInterface { prog, .. } in &programs {
        let ids = prog
            .map_ids()
            .with_context(|| format!("reading the maps of program {}", prog.id()))?
            .unwrap_or_default();
        for id in ids {
            let map = MapData::from_id(id).with_context(|| format!("opening map {id}"))?;
            let info = map.info().with_context(|| format!("reading map {id}"))?;
            let Some(name) = PINNED_MAPS
                .into_iter()
                .find(|n| Some(*n) == info.name_as_str())
            else {
                continue;
            };
            if maps.iter().any(|(n, _)| *n == name) {
                continue;
            }
            if let Some(why) = pins::layout_mismatch(name, &info) {
                warn!(
                    map = name,
                    "map of the attached dataplane is from an incompatible egress-router version ({why}); not reusing it"
                );
                continue;
            }
            maps.push((name, map));
        }
    }
    Ok(Some(Found { from, maps }))
}

/// Pins the maps found under their names in `dir`, for the loader to reuse; returns where they
/// were found, or None if there was nothing to recover.
pub fn pin_into(dir: &Path, cluster: &str, macvlan: &str) -> Result<Option<String>> {
    let Some(found) = find(cluster, macvlan)? else {
        return Ok(None);
    };
    for (name, map) in &found.maps {
        let pin = dir.join(name);
        map.pin(&pin)
            .with_context(|| format!("pinning the recovered map {name} at {}", pin.display()))?;
    }
    debug!(
        from = %found.from,
        maps = ?found.maps.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        "no pinned maps in {}: reusing those of the dataplane attached here",
        dir.display()
    );
    Ok(Some(found.from))
}
