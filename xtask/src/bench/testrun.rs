//! Per-packet cost of the attached tc programs with BPF_PROG_TEST_RUN.
//!
//! The programs measured are the ones egress-router attached in the router namespace (found
//! through the links it pinned, or `bpftool net` for clsact filters), with the maps it filled.
//! The runs happen inside that namespace, so the programs' FIB lookups see its real routes
//! and neighbours and each path ends the way live traffic does (TC_ACT_REDIRECT).
//!
//! A translated packet is rewritten in place, so BPF_PROG_TEST_RUN's `repeat` would feed the
//! program its own output: every run here is a separate call with `repeat = 1`, and the figure
//! is the median of the kernel-measured `duration` of those calls.
use std::{
    ffi::CString,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use egress_tests::{
    DEST_IP, EGRESS_SOURCE, GATEWAY_IP, LAN_IF, MACVLAN, POD_IP, ROUTER_ETH0, Topology,
};
use etherparse::PacketBuilder;

use super::{servers::TESTRUN_PORT, sys};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub const TC_ACT_REDIRECT: u32 = 7;

/// The programs' names (egress-common's PROG_ETH0_INGRESS / PROG_MACVLAN_INGRESS).
const PROG_ETH0: &str = "eth0_ingress";
const PROG_MACVLAN: &str = "macvlan_ingress";

/// A client address no live benchmark traffic uses, on the cluster subnet.
const TEST_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 200);
const TEST_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 200];

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a properly laid out bpf_attr prefix for cmd, alive during the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
#[derive(Default)]
struct GetFdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// A tc program that only returns TC_ACT_OK: its test-run duration is the floor every
/// measurement includes (the timer reads around the run).
fn empty_prog() -> Result<OwnedFd> {
    // r0 = 0; exit
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..10].copy_from_slice(b"bench_noop");
    let mut a = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_LOAD, &mut a).context("loading an empty tc program")?;
    // SAFETY: a fresh descriptor returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The program id behind a pinned bpf_link.
fn link_prog_id(pin: &Path) -> Result<u32> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes())?;
    let mut a = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut a).with_context(|| format!("opening {}", pin.display()))?;
    // SAFETY: a fresh descriptor returned by the kernel.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info starts with type, id, prog_id.
    let mut info = [0u32; 64];
    let mut a = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).context("BPF_OBJ_GET_INFO_BY_FD")?;
    Ok(info[2])
}

/// The program id of `prog` attached on `dev` in `topo.router`, from `bpftool net` (tcx and
/// clsact alike).
fn bpftool_prog_id(topo: &Topology, dev: &str, prog: &str) -> Result<u32> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["-j", "net", "show", "dev", dev]);
    let out = sys::ns_output(&topo.router, cmd, Duration::from_secs(10))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("bpftool JSON")?;
    fn walk(v: &serde_json::Value, prog: &str) -> Option<u32> {
        match v {
            serde_json::Value::Object(m) => {
                if m.get("name").and_then(|n| n.as_str()) == Some(prog)
                    && let Some(id) = m.get("prog_id").or_else(|| m.get("id"))
                {
                    return id.as_u64().map(|i| i as u32);
                }
                m.values().find_map(|x| walk(x, prog))
            }
            serde_json::Value::Array(a) => a.iter().find_map(|x| walk(x, prog)),
            _ => None,
        }
    }
    walk(&v, prog).with_context(|| format!("no program {prog} on {dev}: {out}"))
}

fn prog_fd(id: u32) -> Result<OwnedFd> {
    let mut a = GetFdAttr {
        id,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut a).with_context(|| format!("opening program {id}"))?;
    // SAFETY: a fresh descriptor returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One BPF_PROG_TEST_RUN with repeat 1: (return value, duration in ns).
fn test_run(fd: &OwnedFd, frame: &[u8]) -> Result<(u32, u32)> {
    let mut out = vec![0u8; frame.len() + 512];
    let mut a = TestRunAttr {
        prog_fd: fd.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut a).context("BPF_PROG_TEST_RUN")?;
    Ok((a.retval, a.duration))
}

/// Median cost in ns of one run of each path.
pub struct Costs {
    /// An empty program: the measuring floor included in the others.
    pub empty: f64,
    pub established: f64,
    pub new_flow: f64,
    pub reply: f64,
}

/// Measures the three paths with `runs` calls each (new flows: at most 30,000, each with its
/// own source port, so the port kept is always free).
pub fn measure(topo: &Topology, bpffs: &Path, runs: usize) -> Result<Costs> {
    let id = |prog: &str, dev: &str| -> Result<u32> {
        let pin = bpffs.join(format!("link_{prog}_{dev}"));
        if pin.exists() {
            link_prog_id(&pin)
        } else {
            bpftool_prog_id(topo, dev, prog)
        }
    };
    let (eth0_id, macvlan_id) = (id(PROG_ETH0, ROUTER_ETH0)?, id(PROG_MACVLAN, MACVLAN)?);
    // Static neighbours, so every FIB lookup completes as on a warm router.
    let gw_mac = topo.lan.mac(LAN_IF)?;
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    for (ip, m, dev) in [
        (GATEWAY_IP, gw_mac, MACVLAN),
        (TEST_CLIENT, TEST_CLIENT_MAC, ROUTER_ETH0),
    ] {
        let mut cmd = Command::new("ip");
        cmd.args(["neigh", "replace", &ip.to_string(), "lladdr", &mac(m)])
            .args(["dev", dev, "nud", "permanent"]);
        sys::ns_output(&topo.router, cmd, Duration::from_secs(10))?;
    }
    let router_mac = topo.router.mac(ROUTER_ETH0)?;
    let macvlan_mac = topo.router.mac(MACVLAN)?;

    topo.router.run(|| -> Result<Costs> {
        let eth0 = prog_fd(eth0_id)?;
        let macvlan = prog_fd(macvlan_id)?;
        // The median of single runs: a run the scheduler preempted would weigh on a mean.
        let typical = |fd: &OwnedFd,
                       frames: &mut dyn Iterator<Item = Vec<u8>>,
                       what: &str,
                       check: bool|
         -> Result<f64> {
            let mut ns = Vec::new();
            for f in frames {
                let (ret, d) = test_run(fd, &f)?;
                ensure!(
                    !check || ret == TC_ACT_REDIRECT,
                    "{what}: the program returned {ret}, not TC_ACT_REDIRECT (7): the packet did not take the forwarding path"
                );
                ns.push(d);
            }
            ensure!(!ns.is_empty(), "{what}: no runs");
            ns.sort_unstable();
            Ok(ns[ns.len() / 2] as f64)
        };
        let sport = 40000;
        let out_frame = |flags: u8, sp: u16| {
            tcp_frame(
                router_mac,
                TEST_CLIENT_MAC,
                TEST_CLIENT,
                POD_IP,
                sp,
                TESTRUN_PORT,
                flags,
                b"",
            )
        };
        // Open the flow, then measure packets on it.
        let (ret, _) = test_run(&eth0, &out_frame(TCP_SYN, sport))?;
        if ret != TC_ACT_REDIRECT {
            bail!("the SYN opening the test flow got verdict {ret}, not TC_ACT_REDIRECT (7)");
        }
        let established = typical(
            &eth0,
            &mut (0..runs).map(|_| out_frame(TCP_ACK, sport)),
            "established flow",
            true,
        )?;
        let reply_frame = tcp_frame(
            macvlan_mac,
            gw_mac,
            DEST_IP,
            EGRESS_SOURCE,
            TESTRUN_PORT,
            sport,
            TCP_ACK,
            b"",
        );
        let reply = typical(
            &macvlan,
            &mut (0..runs).map(|_| reply_frame.clone()),
            "reply",
            true,
        )?;
        let empty = typical(
            &empty_prog()?,
            &mut (0..runs).map(|_| out_frame(TCP_ACK, sport)),
            "empty program",
            false,
        )?;
        let new_runs = runs.min(30_000);
        let new_flow = typical(
            &eth0,
            &mut (0..new_runs).map(|i| out_frame(TCP_SYN, 2000 + i as u16)),
            "new flow",
            true,
        )?;
        Ok(Costs {
            empty,
            established,
            new_flow,
            reply,
        })
    })
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// An Ethernet + IPv4 + TCP frame with valid checksums.
#[expect(clippy::too_many_arguments, reason = "each is one header field")]
fn tcp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1, 0xffff);
    if flags & TCP_SYN != 0 {
        b = b.syn();
    }
    if flags & TCP_ACK != 0 {
        b = b.ack(1);
    }
    let mut f = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut f, payload).expect("writing to a Vec");
    f
}

/// An Ethernet + IPv4 + UDP frame with valid checksums (the UDP flood's packets).
pub fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport);
    let mut f = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut f, payload).expect("writing to a Vec");
    f
}
