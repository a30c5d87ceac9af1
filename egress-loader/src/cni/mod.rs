//! The OpenShift 4.x `egress-router` CNI plugin: the same binary, invoked by a container runtime
//! (Multus) with `CNI_COMMAND` set, the network configuration on stdin and the result on stdout.
//!
//! ADD creates a macvlan on the master (the host's default-route interface unless
//! `interfaceArgs.master` names one) straight into the pod's network namespace as CNI_IFNAME, sets
//! it up as EGRESS_SOURCE/EGRESS_GATEWAY are set up (address, /32 route to the gateway, default
//! route replaced, forwarding, gratuitous ARP) and attaches the redirect dataplane to the pod's
//! eth0 and the macvlan, pinned in the namespace's directory on the host's bpffs. A failed ADD
//! takes all of that down again. DEL undoes it, also when the namespace is already gone (the
//! pin directory is found in the attachment's record, see `state`). CHECK verifies it. STATUS
//! and GC (CNI 1.1) answer for the kernel and remove attachments the runtime no longer has.
//!
//! The CNI protocol (commands, environment, version negotiation, the result in the layout of the
//! configuration's cniVersion, error JSON) is rscni-plugin's.
mod commands;
mod netlink;
mod state;

use std::process::ExitCode;

use rscni_plugin::{
    cni::{Cni, Plugin},
    error::Error,
    types::{Args, CNIResult},
    version::SpecVersion,
};

/// Our error codes (the spec reserves 0-99; its own are used where they apply).
pub mod code {
    /// CNI: unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// CNI: the container (its network namespace) does not exist.
    pub const NO_CONTAINER: u32 = 3;
    /// CNI: invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// CNI: invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// CNI STATUS: the plugin cannot serve ADD.
    pub const NOT_AVAILABLE: u32 = 50;
    /// Setting up the interface or the dataplane failed (what was made is removed again).
    pub const SETUP_FAILED: u32 = 100;
    /// CHECK found part of the attachment missing or changed.
    pub const CHECK_FAILED: u32 = 101;
    /// DEL or GC could not remove part of an attachment.
    pub const TEARDOWN_FAILED: u32 = 102;
}

/// Whether this process was invoked as a CNI plugin.
pub fn invoked() -> bool {
    std::env::var_os("CNI_COMMAND").is_some()
}

struct EgressRouterPlugin;

impl Cni for EgressRouterPlugin {
    fn add(&self, args: Args) -> Result<CNIResult, Error> {
        commands::add(&args)
    }

    fn del(&self, args: Args) -> Result<(), Error> {
        commands::del(&args)
    }

    fn check(&self, args: Args) -> Result<(), Error> {
        commands::check(&args)
    }

    fn status(&self, _args: Args) -> Result<(), Error> {
        commands::status()
    }

    fn gc(&self, args: Args) -> Result<(), Error> {
        commands::gc(&args)
    }
}

pub fn main() -> ExitCode {
    let v = SpecVersion::new;
    let supported = vec![v(0, 3, 0), v(0, 3, 1), v(0, 4, 0), v(1, 0, 0), v(1, 1, 0)];
    // An error result carries the plugin's version; the spec wants the configuration's.
    let version = config_version()
        .filter(|c| supported.contains(c))
        .unwrap_or(v(1, 1, 0));
    let plugin = Plugin::new(version, supported).msg(concat!(
        "egress-router ",
        env!("CARGO_PKG_VERSION"),
        ": the OpenShift egress-router CNI plugin"
    ));
    match plugin.run(&EgressRouterPlugin) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(
                code = u32::from(&e),
                msg = e.msg(),
                details = e.details(),
                "failed"
            );
            ExitCode::from(1)
        }
    }
}

/// The cniVersion of the network configuration on stdin, for the commands that have one
/// (VERSION answers with the plugin's own). The configuration is read here, ahead of
/// rscni-plugin, and put back as the process's stdin (a memfd holding the same bytes).
fn config_version() -> Option<SpecVersion> {
    use std::io::{Read as _, Seek as _, Write as _};
    if std::env::var("CNI_COMMAND")
        .ok()?
        .eq_ignore_ascii_case("VERSION")
    {
        return None;
    }
    let mut config = Vec::new();
    std::io::stdin().lock().read_to_end(&mut config).ok()?;
    let fd =
        nix::sys::memfd::memfd_create(c"cni-config", nix::sys::memfd::MFdFlags::empty()).ok()?;
    let mut copy = std::fs::File::from(fd);
    copy.write_all(&config).ok()?;
    copy.rewind().ok()?;
    nix::unistd::dup2_stdin(&copy).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&config).ok()?;
    v["cniVersion"].as_str()?.parse().ok()
}
