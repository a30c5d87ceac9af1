//! The forwarding sysctls redirect mode needs, written through /proc/sys of the calling
//! thread's network namespace.
//!
//! - `net.ipv4.ip_forward=1` (which also sets `conf.all.forwarding` and every interface's
//!   `forwarding`). Required: `bpf_fib_lookup` answers "forwarding disabled" on an interface
//!   without it, and the kernel stack, which the dataplane falls back to for anything the FIB
//!   helper cannot resolve, would not forward either.
//! - `net.ipv4.conf.all.accept_local=1`. A translated packet that falls back to the kernel stack
//!   carries one of the router's own addresses as source (EGRESS_SOURCE arriving on eth0, the
//!   pod IP arriving on macvlan0); without accept_local the stack drops it as a martian.
//! - `rp_filter` loosened from strict (1) to loose (2) wherever it is strict (`all`, `default`
//!   and each interface; the effective value is the maximum of `all` and the interface's): the
//!   local source above is not reachable through the interface the packet arrives on, so the
//!   strict check drops it, while the loose check accepts it. Packets from unroutable sources
//!   are still dropped.
//!
//! A value that is already right is not written, so a read-only /proc/sys (an unprivileged
//! container) works when the pod sets these through `securityContext.sysctls`. Only
//! ip_forward is required; the other two only matter on the fallback path and a failure to set
//! them is logged.
use std::{fs, io, path::Path};

use anyhow::{Context as _, Result};
use tracing::{info, warn};

const CONF: &str = "/proc/sys/net/ipv4/conf";

/// Sets the sysctls above. Errors (ip_forward only) name the sysctl and the way out.
pub fn enable_forwarding() -> Result<()> {
    ensure("/proc/sys/net/ipv4/ip_forward", "1").with_context(|| {
        "setting net.ipv4.ip_forward=1 (a read-only /proc/sys needs a privileged container, or \
         the pod can set it in securityContext.sysctls)"
    })?;
    if let Err(e) = ensure(&format!("{CONF}/all/accept_local"), "1") {
        warn!(
            "setting net.ipv4.conf.all.accept_local=1: {e:#}; packets the dataplane hands to the kernel stack may be dropped as martians"
        );
    }
    for dir in conf_dirs() {
        let path = format!("{CONF}/{dir}/rp_filter");
        match fs::read_to_string(&path) {
            Ok(v) if v.trim() == "1" => match write(&path, "2") {
                Ok(()) => info!("net.ipv4.conf.{dir}.rp_filter: strict -> loose"),
                Err(e) => warn!("loosening net.ipv4.conf.{dir}.rp_filter: {e:#}"),
            },
            _ => {}
        }
    }
    Ok(())
}

/// `net.ipv4.ip_unprivileged_port_start=0` in this network namespace (a pod's own), so that
/// an unprivileged proxy container can listen on any port. Kubernetes counts this sysctl as
/// safe for the same reason: it reaches no further than the pod.
pub fn allow_unprivileged_ports() -> Result<()> {
    ensure("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0").with_context(|| {
        "setting net.ipv4.ip_unprivileged_port_start=0 (the pod can also set it in \
         securityContext.sysctls)"
    })
}

/// `all`, `default` and every interface.
fn conf_dirs() -> Vec<String> {
    let mut dirs: Vec<String> = fs::read_dir(CONF)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// Writes `value` unless the sysctl already holds it.
fn ensure(path: &str, value: &str) -> Result<()> {
    let current = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    if current.trim() == value {
        return Ok(());
    }
    write(path, value)?;
    info!("{} = {value}", sysctl_name(path));
    Ok(())
}

fn write(path: &str, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::ReadOnlyFilesystem => " (/proc/sys is mounted read-only)",
            io::ErrorKind::PermissionDenied => " (needs CAP_NET_ADMIN)",
            _ => "",
        };
        anyhow::anyhow!("writing {value} to {path}: {e}{hint}")
    })
}

/// `/proc/sys/net/ipv4/ip_forward` -> `net.ipv4.ip_forward`.
fn sysctl_name(path: &str) -> String {
    Path::new(path)
        .strip_prefix("/proc/sys")
        .map(|p| p.to_string_lossy().replace('/', "."))
        .unwrap_or_else(|_| path.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sysctl_names() {
        assert_eq!(
            super::sysctl_name("/proc/sys/net/ipv4/conf/all/rp_filter"),
            "net.ipv4.conf.all.rp_filter"
        );
    }
}
