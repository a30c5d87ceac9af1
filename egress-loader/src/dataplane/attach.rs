//! Attaching the tc programs so that they outlive this process and a restart replaces them in
//! place (no moment without a program, which would hand live flows to the local stack).
//!
//! tcx (kernel >= 6.6): the link is pinned in the pin directory; a restart opens the pin and
//! swaps the program with `bpf_link_update`. clsact: a filter at a fixed priority and handle
//! (`clsact`); a restart replaces that filter.
//!
//! Switching between the two (the bpffs changed, or `--attach`) leaves one of our programs on
//! each interface: the new attachment is made first, then the other method's is removed. tcx
//! runs before clsact and our programs always return a verdict, so whichever is in front
//! handles every packet until it goes: there is no gap.
use std::{io, path::Path};

use anyhow::{Context as _, Result};
use aya::{
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
    },
    sys::SyscallError,
    util::KernelVersion,
};
use tracing::{debug, warn};

use super::{clsact, plan::Method, tcx};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx when the kernel has it (>= 6.6) and the pin directory is on a bpffs that outlives
    /// this process; clsact otherwise.
    Auto,
    Tcx,
    Clsact,
}

/// How a program ended up attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub method: Method,
    /// An attachment of an earlier run was replaced in place.
    pub replaced: bool,
    /// Other attachments of ours on the interface that were removed after this one was made
    /// (the other method's, or a tcx link pinned elsewhere).
    pub removed: Vec<String>,
}

pub fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Where the tcx link of `prog` on `iface` is pinned.
pub fn link_pin_name(prog: &str, iface: &str) -> String {
    format!("link_{prog}_{iface}")
}

pub fn attach_ingress(
    prog: &mut SchedClassifier,
    name: &str,
    iface: &str,
    method: Method,
    dir: &Path,
) -> Result<Attached> {
    let ifindex = nix::net::if_::if_nametoindex(iface)
        .with_context(|| format!("interface {iface} not found"))?;
    match method {
        Method::Tcx => attach_tcx(prog, name, iface, ifindex, dir),
        Method::Clsact => attach_clsact(prog, name, iface, ifindex, dir),
    }
    .with_context(|| format!("cannot attach {name} to {iface} ingress"))
}

fn is_enolink(e: &ProgramError) -> bool {
    matches!(e, ProgramError::SyscallError(SyscallError { io_error, .. })
        if io_error.raw_os_error() == Some(libc::ENOLINK))
}

fn attach_tcx(
    prog: &mut SchedClassifier,
    name: &str,
    iface: &str,
    ifindex: u32,
    dir: &Path,
) -> Result<Attached> {
    let pin = dir.join(link_pin_name(name, iface));
    let mut replaced = false;
    let mut id = None;
    match PinnedLink::from_pin(&pin) {
        Ok(old) => {
            let link = FdLink::from(old).try_into()?;
            match prog.attach_to_link(link) {
                Ok(i) => {
                    (id, replaced) = (Some(i), true);
                }
                // Severed since the pins were surveyed (its interface went away meanwhile).
                Err(e) if is_enolink(&e) => {
                    warn!(pin = %pin.display(), "pinned tcx link is severed (ENOLINK): removing it and making a fresh one");
                    std::fs::remove_file(&pin)
                        .with_context(|| format!("removing {}", pin.display()))?;
                }
                Err(e) => return Err(e).context("updating the pinned tcx link"),
            }
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading pinned link {}", pin.display())),
    }
    let id = match id {
        Some(id) => id,
        None => prog.attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )?,
    };
    let fd: FdLink = prog.take_link(id)?.try_into()?;
    let own = fd.info().context("reading the new tcx link")?.id();
    if !replaced {
        fd.pin(&pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
    }
    // Our link is in place (pinned: dropping our fd leaves it attached); now the others go.
    let mut removed = Vec::new();
    for other in tcx::ours(iface, ifindex)? {
        if other.link_id != 0 && other.link_id != own {
            tcx::detach(other.link_id)?;
            removed.push(format!("tcx link {}", other.link_id));
        }
    }
    if clsact::remove(iface, ifindex)? {
        removed.push("clsact filter".to_string());
    }
    Ok(Attached {
        method: Method::Tcx,
        replaced,
        removed,
    })
}

fn attach_clsact(
    prog: &mut SchedClassifier,
    name: &str,
    iface: &str,
    ifindex: u32,
    dir: &Path,
) -> Result<Attached> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => {}
        Err(e) if matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST)) =>
            {}
        Err(tc::TcError::AlreadyAttached) => {}
        Err(e) => return Err(e).context("adding the clsact qdisc"),
    }
    let options = NlOptions {
        priority: clsact::PRIORITY,
        handle: clsact::handle(),
        classid: None,
    };
    let (id, replaced) = match prog.attach_with_options(
        iface,
        TcAttachType::Ingress,
        TcAttachOptions::Netlink(options),
    ) {
        Ok(id) => (id, false),
        Err(first) => {
            // Our filter is there from an earlier run: replace it in place.
            let old = SchedClassifierLink::attached(
                iface,
                TcAttachType::Ingress,
                clsact::PRIORITY,
                clsact::handle(),
                None,
            )?;
            let id = prog.attach_to_link(old).map_err(|e| {
                anyhow::anyhow!("{first}; replacing an earlier filter also failed: {e}")
            })?;
            (id, true)
        }
    };
    // The filter must outlive this process: forget the link instead of dropping (detaching) it.
    std::mem::forget(prog.take_link(id)?);
    // Our filter is in place; now any tcx link of ours on the interface goes. BPF_LINK_DETACH
    // on its id rather than unpinning: it stops at once even if it is pinned elsewhere too (an
    // earlier --bpffs-dir or version), and needs no pin in sight (a container). Our own pin
    // of it, now defunct, is removed so that no later run takes it for a severed namespace.
    let mut removed = Vec::new();
    for other in tcx::ours(iface, ifindex)? {
        if other.link_id != 0 {
            tcx::detach(other.link_id)?;
            removed.push(format!("tcx link {}", other.link_id));
        }
    }
    let pin = dir.join(link_pin_name(name, iface));
    match std::fs::remove_file(&pin) {
        Ok(()) => debug!(pin = %pin.display(), "removed the pin of a detached tcx link"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", pin.display())),
    }
    Ok(Attached {
        method: Method::Clsact,
        replaced,
        removed,
    })
}
