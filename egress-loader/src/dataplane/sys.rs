//! The bpf(2) commands aya 0.14 does not expose, for finding attachments that an earlier run
//! left behind: a tcx query that also returns the link ids.
//!
//! Each command gets its own small `#[repr(C)]` attribute struct, the prefix of `union bpf_attr`
//! that command reads (include/uapi/linux/bpf.h); the kernel zero-fills the rest of its copy.
use std::{io, mem::size_of};

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;

/// Runs one bpf(2) command on `attr`.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` struct laid out as the prefix of
    // `union bpf_attr` that `cmd` uses, and its exact size is passed: the kernel reads and
    // writes only within it. Pointers inside it (paths, id arrays) are valid for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// One program attached with tcx, in chain order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcxEntry {
    pub prog_id: u32,
    /// 0 for a program attached without a link (BPF_PROG_ATTACH).
    pub link_id: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    count: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// The tcx ingress chain of `ifindex` (in this network namespace). Empty on a kernel without
/// tcx (before 6.6), which refuses the query.
pub fn tcx_ingress(ifindex: u32) -> io::Result<Vec<TcxEntry>> {
    let mut room = 64usize;
    loop {
        let mut progs = vec![0u32; room];
        let mut links = vec![0u32; room];
        let mut attr = ProgQueryAttr {
            target_ifindex: ifindex,
            attach_type: BPF_TCX_INGRESS,
            prog_ids: progs.as_mut_ptr() as u64,
            link_ids: links.as_mut_ptr() as u64,
            count: room as u32,
            ..Default::default()
        };
        match bpf(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {
                let n = (attr.count as usize).min(room);
                return Ok(progs[..n]
                    .iter()
                    .zip(&links[..n])
                    .map(|(&prog_id, &link_id)| TcxEntry { prog_id, link_id })
                    .collect());
            }
            // The chain grew beyond `room`: the kernel said how many there are.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && (attr.count as usize) > room => {
                room = attr.count as usize;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
    }
}
