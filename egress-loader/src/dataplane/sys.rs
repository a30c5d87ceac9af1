//! The few bpf(2) commands aya 0.14 does not expose, for finding and removing attachments that
//! an earlier run left behind: a tcx query that also returns the link ids, a link's fd from its
//! id, BPF_LINK_DETACH, a pinned object as a plain fd, and what a link fd's fdinfo says (the
//! interface of a tcx link, 0 once its device is gone). And BPF_MAP_LOOKUP_BATCH, which reads
//! a hash map's entries many at a time: aya reads them one system call (or two) per entry.
//!
//! Each command gets its own small `#[repr(C)]` attribute struct, the prefix of `union bpf_attr`
//! that command reads (include/uapi/linux/bpf.h); the kernel zero-fills the rest of its copy.
use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// What a kernel's BPF code returns for an operation a map type does not implement.
const ENOTSUPP: i32 = 524;
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

/// A bpf(2) result that is a new file descriptor.
fn owned_fd(r: libc::c_long) -> OwnedFd {
    // SAFETY: the command returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(r as libc::c_int) }
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

#[repr(C)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// A new fd for the link with this id (any network namespace: ids are global).
pub fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    bpf(BPF_LINK_GET_FD_BY_ID, &mut attr).map(owned_fd)
}

#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Detaches a link from its hook whoever holds it (pins elsewhere, other fds): they keep a
/// defunct link that runs nothing.
pub fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

#[repr(C)]
#[derive(Default)]
struct MapBatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries read per call: a few hundred KiB of buffers for the connection table's entries, and
/// 16 calls for a full table of the default 65,536.
const BATCH: usize = 4096;

/// Every entry of the hash map `fd` (an LRU one too), read with BPF_MAP_LOOKUP_BATCH: a whole
/// bucket at a time, so each entry once. `K` and `V` must be exactly the map's key and value
/// sizes (aya's map types check that). None when the kernel has no batch lookup for this map
/// (before Linux 5.6), for the caller to read the entries one by one instead.
pub fn hash_entries<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
) -> io::Result<Option<Vec<(K, V)>>> {
    let mut all = Vec::new();
    let mut room = BATCH;
    // The position to go on from: for hash maps, a bucket index (u32); None for the start.
    let mut token: Option<u64> = None;
    loop {
        let mut keys: Vec<std::mem::MaybeUninit<K>> = Vec::with_capacity(room);
        let mut values: Vec<std::mem::MaybeUninit<V>> = Vec::with_capacity(room);
        let mut next = 0u64;
        let mut attr = MapBatchAttr {
            in_batch: token.as_ref().map_or(0, |t| t as *const u64 as u64),
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: room as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let done = match r {
            Ok(_) => false,
            // The end: `count` still says how many this last call copied.
            Err(ref e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // One bucket holds more entries than `room`.
            Err(ref e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                room *= 2;
                continue;
            }
            Err(ref e)
                if token.is_none()
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
                    ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let n = (attr.count as usize).min(room);
        // SAFETY: the kernel wrote `n` keys and values of the map's sizes, which are those of
        // `K` and `V`; any bytes are valid for Pod types.
        unsafe {
            keys.set_len(n);
            values.set_len(n);
        }
        all.extend(
            keys.into_iter()
                .zip(values)
                // SAFETY: as above, each of the first `n` was written.
                .map(|(k, v)| unsafe { (k.assume_init(), v.assume_init()) }),
        );
        if done {
            return Ok(Some(all));
        }
        if n == 0 && token == Some(next) {
            return Err(io::Error::other("BPF_MAP_LOOKUP_BATCH made no progress"));
        }
        token = Some(next);
    }
}

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// Opens a pinned object (a link, a map, a program) as a plain fd.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    bpf(BPF_OBJ_GET, &mut attr).map(owned_fd)
}

/// What the kernel shows of a link in /proc/self/fdinfo.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkFdInfo {
    pub link_type: String,
    pub link_id: u32,
    pub prog_id: u32,
    /// The interface of a tcx link; 0 once the interface (or its network namespace) is gone.
    pub ifindex: Option<u32>,
}

pub fn link_fdinfo(fd: BorrowedFd<'_>) -> io::Result<LinkFdInfo> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    Ok(parse_fdinfo(&text))
}

fn parse_fdinfo(text: &str) -> LinkFdInfo {
    let mut info = LinkFdInfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let number = || value.split_whitespace().next()?.parse::<u32>().ok();
        match key {
            "link_type" => info.link_type = value.to_string(),
            "link_id" => info.link_id = number().unwrap_or(0),
            "prog_id" => info.prog_id = number().unwrap_or(0),
            "ifindex" => info.ifindex = number(),
            _ => {}
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_of_a_tcx_link() {
        let text = "pos:\t0\nflags:\t02000000\nmnt_id:\t16\nino:\t1055\nlink_type:\ttcx\n\
                    link_id:\t7\nprog_tag:\t8a6f2c4f0c41bde5\nprog_id:\t42\nifindex:\t0\n\
                    attach_type:\t46 (tcx_ingress)\n";
        assert_eq!(
            parse_fdinfo(text),
            LinkFdInfo {
                link_type: "tcx".into(),
                link_id: 7,
                prog_id: 42,
                ifindex: Some(0),
            }
        );
    }
}
