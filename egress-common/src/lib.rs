//! Types shared by the egress-router eBPF programs and user space.
//!
//! Everything here is `#[repr(C)]` with explicit padding so the kernel and user space agree on
//! the layout and hash keys never carry uninitialised bytes. Addresses are stored as the four
//! bytes seen on the wire (so bpftool prints `[192,168,12,99]`), ports in host order (so bpftool
//! prints `8080`, not its byte-swapped value).
#![no_std]

pub mod maps;
pub mod nat_model;
pub mod packet;
pub mod sctp;

pub use maps::*;
