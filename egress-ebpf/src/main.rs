//! egress-router tc programs: `eth0_ingress` (cluster -> outside: DNAT + SNAT) and
//! `macvlan_ingress` (replies: reverse NAT). See SPEC section 6.
#![no_std]
#![no_main]

mod maps;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

#[classifier]
pub fn eth0_ingress(ctx: TcContext) -> i32 {
    maps::with_stats(|s| {
        s.eth0_rx_packets += 1;
        s.eth0_rx_bytes += ctx.len() as u64;
    });
    TC_ACT_OK
}

#[classifier]
pub fn macvlan_ingress(ctx: TcContext) -> i32 {
    maps::with_stats(|s| {
        s.macvlan_rx_packets += 1;
        s.macvlan_rx_bytes += ctx.len() as u64;
    });
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
