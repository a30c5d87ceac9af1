//! egress-router: the OpenShift egress router pod, with redirect mode done in the kernel by eBPF
//! and HTTP and DNS proxy modes served in user space.

pub mod cli;
pub mod cni;
pub mod config;
pub mod dataplane;
pub mod dns_proxy;
pub mod duration;
pub mod http_proxy;
pub mod listener;
pub mod metrics;
pub mod modes;
pub mod netsetup;
pub mod protected;
pub mod ratelimit;
pub mod redirect;
pub mod relay;
pub mod resolver;
pub mod shutdown;
pub mod upstream;
pub mod workers;
