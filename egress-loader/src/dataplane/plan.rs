//! How the programs are attached, decided before anything is applied, from what outlives this
//! process.
//!
//! A tcx link lives as long as something holds it: we pin it. On a bpffs that outlives us that
//! is enough, and a restarted router reopens the pins. On a bpffs we had to mount (a container,
//! `ip netns exec`) the pins go with the process, and the links with them. A clsact filter
//! needs no pin: the kernel keeps it on the interface, and it keeps its program and the maps
//! alive; a restarted router finds them through the filter (see `recover`). Hence auto means
//! tcx where it persists, clsact otherwise.
use std::path::PathBuf;

use anyhow::{Result, bail};

use super::{
    AttachMode,
    bpffs::{Lifetime, Place},
};
use crate::config::Mode;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Tcx,
    Clsact,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Tcx => "tcx",
            Method::Clsact => "clsact",
        }
    }
}

/// Everything decided before the dataplane is loaded.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The pin directory.
    pub dir: PathBuf,
    pub place: Place,
    pub method: Method,
    pub cluster_interface: String,
    pub macvlan_interface: String,
}

/// The attach method for `requested` in `mode`. Fails, before anything is applied, where the
/// result could not keep working after init exits.
pub fn choose(
    requested: AttachMode,
    lifetime: Lifetime,
    tcx: bool,
    mode: Mode,
    dir: &std::path::Path,
) -> Result<Method> {
    Ok(match (requested, lifetime) {
        (AttachMode::Clsact, _) => Method::Clsact,
        (AttachMode::Auto, Lifetime::Outlives) if tcx => Method::Tcx,
        (AttachMode::Auto, _) => Method::Clsact,
        (AttachMode::Tcx, _) if !tcx => bail!(
            "--attach tcx: this kernel has no tcx (it needs Linux 6.6 or later); use --attach clsact or auto"
        ),
        (AttachMode::Tcx, Lifetime::Outlives) => Method::Tcx,
        (AttachMode::Tcx, Lifetime::Private) if mode == Mode::Init => bail!(
            "--attach tcx: {} is not on a bpffs that outlives this process (there was none, so \
             it would be mounted privately in this container and vanish when init exits, \
             detaching the tcx links held only by their pins). Mount the host's /sys/fs/bpf \
             into the container, or use --attach auto or clsact (the kernel keeps clsact filters \
             without any pin)",
            dir.display()
        ),
        (AttachMode::Tcx, Lifetime::Private) => Method::Tcx,
    })
}

impl Plan {
    /// The one line saying what was chosen and what it means for a restart.
    pub fn restart_note(&self) -> String {
        let dir = self.dir.display();
        let (eth0, macvlan) = (&self.cluster_interface, &self.macvlan_interface);
        match (self.method, self.place.lifetime) {
            (Method::Tcx, Lifetime::Outlives) => format!(
                "tcx links pinned in {dir}, a bpffs that outlives this process: a restarted \
                 router reopens them and keeps established connections"
            ),
            (Method::Tcx, Lifetime::Private) => format!(
                "tcx links pinned in {dir}, a bpffs private to this container that goes with \
                 it: the dataplane stops when this process exits, and a restarted router starts \
                 with an empty connection table (mount the host's /sys/fs/bpf, or use --attach \
                 auto or clsact, to keep it)"
            ),
            (Method::Clsact, Lifetime::Outlives) => format!(
                "clsact filters on {eth0} and {macvlan}, maps pinned in {dir}, a bpffs that \
                 outlives this process: a restarted router reopens the maps and keeps \
                 established connections"
            ),
            (Method::Clsact, Lifetime::Private) => format!(
                "clsact filters: {dir} is private to this container and goes with it; the \
                 kernel keeps the filters, and a restarted router finds the programs and maps \
                 through them on {eth0} and keeps established connections"
            ),
        }
    }

    /// Whether the dataplane keeps working once this process has exited.
    pub fn outlives_process(&self) -> bool {
        (self.method, self.place.lifetime) != (Method::Tcx, Lifetime::Private)
    }

    /// What stays when a legacy-mode router leaves.
    pub fn on_exit(&self) -> String {
        let (eth0, macvlan) = (&self.cluster_interface, &self.macvlan_interface);
        match (self.method, self.place.lifetime) {
            (Method::Tcx, Lifetime::Outlives) => format!(
                "the tcx links pinned in {} stay: the dataplane keeps working",
                self.dir.display()
            ),
            (Method::Tcx, Lifetime::Private) => "the tcx links go with this container's private \
                 bpffs: the dataplane stops and its connection table is lost"
                .to_string(),
            (Method::Clsact, _) => format!(
                "the clsact filters stay on {eth0} and {macvlan}, and with them the programs and \
                 maps: the dataplane keeps working"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn pick(req: AttachMode, life: Lifetime, tcx: bool, mode: Mode) -> Result<Method> {
        choose(req, life, tcx, mode, Path::new("/d"))
    }

    #[test]
    fn auto_uses_tcx_only_where_its_pins_persist() {
        use Lifetime::*;
        assert_eq!(
            pick(AttachMode::Auto, Outlives, true, Mode::Init).unwrap(),
            Method::Tcx
        );
        assert_eq!(
            pick(AttachMode::Auto, Private, true, Mode::Init).unwrap(),
            Method::Clsact
        );
        assert_eq!(
            pick(AttachMode::Auto, Outlives, false, Mode::Init).unwrap(),
            Method::Clsact
        );
    }

    #[test]
    fn tcx_on_a_private_bpffs_is_refused_in_init_mode_only() {
        let err = pick(AttachMode::Tcx, Lifetime::Private, true, Mode::Init).unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("/sys/fs/bpf") && err.contains("clsact") && err.contains("init exits"),
            "{err}"
        );
        assert_eq!(
            pick(AttachMode::Tcx, Lifetime::Private, true, Mode::Legacy).unwrap(),
            Method::Tcx
        );
        let err = pick(AttachMode::Tcx, Lifetime::Outlives, false, Mode::Legacy).unwrap_err();
        assert!(err.to_string().contains("no tcx"), "{err}");
    }
}
