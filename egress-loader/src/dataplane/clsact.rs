//! Our clsact filter: one bpf filter at a fixed priority and handle on an interface's ingress,
//! so that a later run finds it (to replace it, to reach its program's maps, or to remove it
//! when switching to tcx). aya 0.14 can attach and detach such a filter but not read one back;
//! the filter dump (TCA_BPF_ID, the program's id) comes from rtnetlink.
use anyhow::{Context as _, Result};
use aya::programs::{
    TcAttachType,
    links::Link as _,
    tc::{SchedClassifierLink, TcHandle},
};
use futures::TryStreamExt as _;
use netlink_packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};

/// Where our clsact filters sit.
pub const PRIORITY: u16 = 0x4552; // "ER"
pub const HANDLE: u16 = 1;

pub fn handle() -> TcHandle {
    TcHandle::new(0, HANDLE)
}

/// Our filter as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub prog_id: u32,
    /// The name aya gave the filter: the program's.
    pub name: String,
}

/// Our filter on `ifindex`'s ingress, if there is one (none without a clsact qdisc).
pub fn find(ifindex: u32) -> Result<Option<Filter>> {
    std::thread::scope(|s| {
        // A thread of our own inherits this network namespace and may run its own runtime
        // whether or not the caller is inside one.
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the netlink runtime")?
                .block_on(dump(ifindex))
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
    .with_context(|| format!("reading the ingress filters of interface {ifindex}"))
}

async fn dump(ifindex: u32) -> Result<Option<Filter>> {
    let (conn, h, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    let conn = tokio::spawn(conn);
    let mut filters = h.traffic_filter(ifindex as i32).get().ingress().execute();
    let mut found = None;
    loop {
        let msg = match filters.try_next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            // No clsact (or ingress) qdisc: no filters at all.
            Err(rtnetlink::Error::NetlinkError(e))
                if matches!(e.raw_code().abs(), libc::EINVAL | libc::ENOENT) =>
            {
                break;
            }
            Err(e) => {
                conn.abort();
                return Err(e.into());
            }
        };
        let priority = (msg.header.info >> 16) as u16;
        if priority != PRIORITY || u32::from(msg.header.handle) != u32::from(handle()) {
            continue;
        }
        let mut filter = Filter {
            prog_id: 0,
            name: String::new(),
        };
        for attr in &msg.attributes {
            if let TcAttribute::Options(options) = attr {
                for o in options {
                    match o {
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => filter.prog_id = *id,
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => filter.name = n.clone(),
                        _ => {}
                    }
                }
            }
        }
        if filter.prog_id != 0 {
            found = Some(filter);
        }
    }
    conn.abort();
    Ok(found)
}

/// Removes our filter from `iface`'s ingress, if it is there; returns whether it was.
pub fn remove(iface: &str, ifindex: u32) -> Result<bool> {
    if find(ifindex)?.is_none() {
        return Ok(false);
    }
    SchedClassifierLink::attached(iface, TcAttachType::Ingress, PRIORITY, handle(), None)
        .and_then(|link| link.detach().map_err(std::io::Error::other))
        .with_context(|| format!("removing our clsact filter from {iface} ingress"))?;
    Ok(true)
}
