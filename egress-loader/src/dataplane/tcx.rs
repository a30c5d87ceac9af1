//! Our programs in an interface's tcx chain, and what a pinned tcx link left by an earlier run
//! still points at.
//!
//! "Ours" means: a program named like one of ours, attached through a link to the tcx ingress
//! of an interface of this network namespace. Interfaces (and their chains) belong to one
//! namespace, so nothing found this way is another router's.
use std::{os::fd::AsFd as _, path::Path};

use anyhow::{Context as _, Result};
use aya::programs::{ProgramInfo, SchedClassifier, TcAttachType};
use egress_common::{PROG_ETH0_INGRESS, PROG_MACVLAN_INGRESS};

use super::{attach::tcx_supported, sys};

pub fn is_our_program(name: Option<&str>) -> bool {
    matches!(name, Some(PROG_ETH0_INGRESS | PROG_MACVLAN_INGRESS))
}

/// One of our programs attached with tcx.
pub struct Attachment {
    pub prog: ProgramInfo,
    /// 0 if attached without a link (not something egress-router does).
    pub link_id: u32,
}

/// Our programs in `iface`'s tcx ingress chain, first to run first. Empty without tcx.
pub fn ours(iface: &str, ifindex: u32) -> Result<Vec<Attachment>> {
    if !tcx_supported() {
        return Ok(Vec::new());
    }
    let (_, progs) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress)
        .with_context(|| format!("querying the tcx programs on {iface} ingress"))?;
    // aya's query gives the programs, ours the links: matched by program id.
    let links = sys::tcx_ingress(ifindex)
        .with_context(|| format!("querying the tcx links on {iface} ingress"))?;
    Ok(progs
        .into_iter()
        .filter(|p| is_our_program(p.name_as_str()))
        .map(|prog| {
            let link_id = links
                .iter()
                .find(|e| e.prog_id == prog.id())
                .map_or(0, |e| e.link_id);
            Attachment { prog, link_id }
        })
        .collect())
}

/// Detaches the link with this id (BPF_LINK_DETACH): it stops running at once, whatever
/// still holds it (a pin in another directory, such as the one-directory layout of earlier
/// versions, keeps only a defunct link).
pub fn detach(link_id: u32) -> Result<()> {
    let fd = sys::link_fd_by_id(link_id).with_context(|| format!("opening tcx link {link_id}"))?;
    sys::link_detach(fd.as_fd()).with_context(|| format!("detaching tcx link {link_id}"))
}

/// What a pinned tcx link still points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinnedLink {
    /// Attached to `ifindex` in this network namespace.
    Here { ifindex: u32, link_id: u32 },
    /// Attached to nothing any more: its interface, or the namespace holding it, is gone
    /// (a recreated pod). Updating it would fail with ENOLINK.
    Severed,
    /// Attached to an interface that is not in this network namespace: another router's, or
    /// one of a namespace the kernel is still tearing down (see `stale`).
    Elsewhere { ifindex: u32, link_id: u32 },
}

pub fn inspect(pin: &Path) -> Result<PinnedLink> {
    let fd = sys::obj_get(pin).with_context(|| format!("opening pinned link {}", pin.display()))?;
    let info = sys::link_fdinfo(fd.as_fd())
        .with_context(|| format!("reading what pinned link {} points at", pin.display()))?;
    let ifindex = match info.ifindex {
        Some(i) if info.link_type == "tcx" && i != 0 => i,
        _ => return Ok(PinnedLink::Severed),
    };
    // The chain of the interface with that index in this namespace holds the link only if
    // the link is attached here; an unknown index (ENODEV) is another namespace's.
    let here = sys::tcx_ingress(ifindex)
        .is_ok_and(|chain| chain.iter().any(|e| e.link_id == info.link_id));
    Ok(if here {
        PinnedLink::Here {
            ifindex,
            link_id: info.link_id,
        }
    } else {
        PinnedLink::Elsewhere {
            ifindex,
            link_id: info.link_id,
        }
    })
}
