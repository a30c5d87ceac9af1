//! Our programs in an interface's tcx chain.
//!
//! "Ours" means: a program named like one of ours, attached through a link to the tcx ingress
//! of an interface of this network namespace. Interfaces (and their chains) belong to one
//! namespace, so nothing found this way is another router's.
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
