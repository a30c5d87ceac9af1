//! Announcing EGRESS_SOURCE with gratuitous ARP, as OpenShift did with
//! `arping -A` (an unsolicited ARP reply, at once) and `arping -U` (a gratuitous ARP request,
//! about 2 s later, in the background). Sent on an AF_PACKET socket, no arping needed.
use std::{
    io,
    mem::{size_of, zeroed},
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::Mutex,
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use tracing::{debug, warn};

/// How long after the ARP reply the ARP request follows.
pub const ANNOUNCE_DELAY: Duration = Duration::from_secs(2);

const ETH_P_ARP: u16 = 0x0806;
const ARPOP_REQUEST: u16 = 1;
const ARPOP_REPLY: u16 = 2;
const BROADCAST: [u8; 6] = [0xff; 6];

/// The delayed announcements still to be sent.
static PENDING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

/// A packet socket bound to the interface, ready to announce one address.
pub(super) struct Announcer {
    fd: OwnedFd,
    iface: String,
    ifindex: u32,
    mac: [u8; 6],
    ip: Ipv4Addr,
}

impl Announcer {
    /// Opens the socket (in the calling thread's network namespace). Fails without CAP_NET_RAW.
    pub(super) fn open(iface: &str, ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> Result<Self> {
        // Protocol 0: send only, nothing is queued for reception.
        // SAFETY: a plain system call; the descriptor is owned right away.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            let hint = if e.raw_os_error() == Some(libc::EPERM) {
                " (needs CAP_NET_RAW)"
            } else {
                ""
            };
            return Err(e).with_context(|| {
                format!("opening a packet socket to announce {ip} on {iface}{hint}")
            });
        }
        Ok(Announcer {
            // SAFETY: raw is a fresh descriptor nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
            iface: iface.to_string(),
            ifindex,
            mac,
            ip,
        })
    }

    fn send(&self, op: u16) -> io::Result<()> {
        let frame = arp_frame(op, self.mac, self.ip);
        // SAFETY: plain data.
        let mut to: libc::sockaddr_ll = unsafe { zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ETH_P_ARP.to_be();
        to.sll_ifindex = self.ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&BROADCAST);
        // SAFETY: the frame and the address are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn send_logged(&self, op: u16) {
        let what = if op == ARPOP_REPLY {
            "unsolicited ARP reply"
        } else {
            "gratuitous ARP request"
        };
        match self.send(op) {
            Ok(()) => debug!(interface = %self.iface, address = %self.ip, "sent {what}"),
            // The address works without it; neighbours learn it at their next ARP request.
            Err(e) => warn!(interface = %self.iface, address = %self.ip, "sending {what}: {e}"),
        }
    }
}

/// Sends the ARP reply now and the ARP request [`ANNOUNCE_DELAY`] later, from a thread: startup
/// does not wait for it.
pub(super) fn announce(a: Announcer) {
    a.send_logged(ARPOP_REPLY);
    let spawned = std::thread::Builder::new()
        .name("garp".into())
        .spawn(move || {
            std::thread::sleep(ANNOUNCE_DELAY);
            a.send_logged(ARPOP_REQUEST);
        });
    match spawned {
        Ok(t) => {
            let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
            pending.retain(|t| !t.is_finished());
            pending.push(t);
        }
        Err(e) => warn!("starting the thread for the delayed gratuitous ARP: {e}"),
    }
}

/// Waits until the delayed announcements have been sent (at most [`ANNOUNCE_DELAY`]). For a
/// process about to exit (init mode), which would otherwise leave without sending them.
pub fn wait_for_announcements() {
    let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(|p| p.into_inner()));
    for t in pending {
        let _ = t.join();
    }
}

/// The Ethernet frame announcing `ip` at `mac`, broadcast. A reply (`op` 2) names the sender as
/// the target too, as `arping -A` does; a request (`op` 1) has a zero target MAC (RFC 5227).
pub fn arp_frame(op: u16, mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let target_mac = if op == ARPOP_REPLY { mac } else { [0; 6] };
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // Ethernet, IPv4, 6-byte MACs, 4-byte addresses.
    f[14..20].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    f[20..22].copy_from_slice(&op.to_be_bytes());
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    f[32..38].copy_from_slice(&target_mac);
    f[38..42].copy_from_slice(&ip.octets());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
    const IP: Ipv4Addr = Ipv4Addr::new(192, 168, 12, 99);

    #[test]
    fn reply_frame() {
        let f = arp_frame(ARPOP_REPLY, MAC, IP);
        assert_eq!(
            f.to_vec(),
            [
                &[0xff; 6][..],
                &MAC,
                &[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2],
                &MAC,
                &[192, 168, 12, 99],
                &MAC,
                &[192, 168, 12, 99],
            ]
            .concat()
        );
    }

    #[test]
    fn request_frame() {
        let f = arp_frame(ARPOP_REQUEST, MAC, IP);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[22..28], &MAC);
        assert_eq!(&f[28..32], &IP.octets());
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &IP.octets());
    }
}
