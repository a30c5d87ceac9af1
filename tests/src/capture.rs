//! Capturing frames on an interface (AF_PACKET), and ARP decoding.
use std::{
    io,
    mem::{size_of, zeroed},
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// Frames of one ethertype arriving on one interface (outgoing frames are skipped). Open it
/// before triggering the traffic: only frames received afterwards are seen.
pub struct Capture {
    fd: OwnedFd,
}

impl Capture {
    /// Opens the capture in the calling thread's namespace (see [`Netns::capture`]).
    ///
    /// [`Netns::capture`]: crate::Netns::capture
    pub fn open(ifindex: u32, ethertype: u16) -> Result<Capture> {
        let proto = ethertype.to_be() as i32;
        // SAFETY: plain system calls on a descriptor this function owns.
        unsafe {
            let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto);
            if raw < 0 {
                return Err(io::Error::last_os_error())
                    .context("opening an AF_PACKET socket (needs CAP_NET_RAW)");
            }
            let fd = OwnedFd::from_raw_fd(raw);
            let mut sll: libc::sockaddr_ll = zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ethertype.to_be();
            sll.sll_ifindex = ifindex as i32;
            if libc::bind(
                raw,
                &sll as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_ll>() as u32,
            ) != 0
            {
                return Err(io::Error::last_os_error()).context("binding the AF_PACKET socket");
            }
            Ok(Capture { fd })
        }
    }

    /// The next incoming frame (with its Ethernet header), or `None` after `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if n <= 0 {
                continue;
            }
            let mut buf = vec![0u8; 65536];
            // SAFETY: plain data, filled in by the kernel.
            let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buffers valid for the given lengths.
            let got = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if got < 0 || sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            buf.truncate(got as usize);
            return Some(buf);
        }
    }

    /// Collects incoming ARP packets until `until` returns true for one (which is included) or
    /// `timeout` passes.
    pub fn arp_until(&self, timeout: Duration, mut until: impl FnMut(&Arp) -> bool) -> Vec<Arp> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(frame) = self.next(deadline.saturating_duration_since(Instant::now())) {
            if let Some(arp) = Arp::parse(&frame) {
                let done = until(&arp);
                seen.push(arp);
                if done {
                    break;
                }
            }
        }
        seen
    }
}

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

/// An Ethernet/IPv4 ARP packet, with when it was captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arp {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub op: u16,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_mac: [u8; 6],
    pub target_ip: Ipv4Addr,
    pub at: Instant,
}

impl Arp {
    /// Decodes an Ethernet frame carrying an Ethernet/IPv4 ARP packet.
    pub fn parse(f: &[u8]) -> Option<Arp> {
        let mac = |o: usize| -> [u8; 6] { f[o..o + 6].try_into().unwrap() };
        let ip = |o: usize| Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]);
        if f.len() < 42 || f[12..14] != [0x08, 0x06] || f[14..20] != [0, 1, 8, 0, 6, 4] {
            return None;
        }
        Some(Arp {
            eth_dst: mac(0),
            eth_src: mac(6),
            op: u16::from_be_bytes([f[20], f[21]]),
            sender_mac: mac(22),
            sender_ip: ip(28),
            target_mac: mac(32),
            target_ip: ip(38),
            at: Instant::now(),
        })
    }

    /// Sender and target IP equal: an announcement, not a question.
    pub fn is_gratuitous(&self) -> bool {
        self.sender_ip == self.target_ip
    }
}
