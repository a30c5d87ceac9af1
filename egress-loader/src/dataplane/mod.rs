//! The eBPF redirect dataplane: decide how it is attached and where it is pinned (`plan`,
//! `pindir`, `bpffs`), clear what a dead namespace left (`stale`), load the embedded object
//! reusing the maps of an earlier run (`pins`, or `recover` from the kernel when the pins went
//! with a container), fill them from the configuration (`fill`), attach the tc programs
//! (`attach`, `tcx`, `clsact`), and read them back for `status`.
mod attach;
mod bpffs;
mod clsact;
mod entries;
mod fill;
mod gc;
pub mod pindir;
mod pins;
pub mod plan;
pub mod probe;
mod recover;
mod stale;
pub mod status;
mod sys;
mod tcx;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use aya::{Ebpf, EbpfLoader, programs::SchedClassifier};
use egress_common::{
    DEFAULT_FLOWS_MAX, MAP_CONFIG, MAP_FLOWS, MAP_FRAGS, MAP_GENERATION, MAP_NEW_FLOWS, MAP_RULES,
    MAP_STATS, PROG_ETH0_INGRESS, PROG_MACVLAN_INGRESS,
};

pub use attach::{AttachMode, Attached};
pub use bpffs::{Lifetime, Place};
pub use plan::{Method, Plan};

use crate::config::Mode;

/// The compiled eBPF object (egress-ebpf), built by build.rs with the `ebpf` feature.
#[cfg(feature = "ebpf")]
static EBPF_OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/egress"
)));
/// Without the `ebpf` feature the library has no programs to load (the binary requires it).
#[cfg(not(feature = "ebpf"))]
static EBPF_OBJECT: Option<&[u8]> = None;

/// Every map of the object, pinned by these names under the bpffs directory.
pub const PINNED_MAPS: [&str; 7] = [
    MAP_STATS,
    MAP_CONFIG,
    MAP_GENERATION,
    MAP_RULES,
    MAP_FLOWS,
    MAP_NEW_FLOWS,
    MAP_FRAGS,
];

/// Dataplane settings that are not part of the OpenShift contract (all have defaults).
#[derive(clap::Args, Clone, Debug)]
pub struct DataplaneOptions {
    /// bpffs directory holding the pinned maps and links. Default:
    /// /sys/fs/bpf/egress-router/netns-<cookie>, one directory per network namespace
    /// (netns-ino-<inode> on kernels before 5.14); `egress-router status` prints it.
    #[arg(long, env = "EGRESS_BPFFS_DIR", global = true)]
    pub bpffs_dir: Option<PathBuf>,
    /// The pod's cluster interface (client traffic arrives here).
    #[arg(long, env = "EGRESS_CLUSTER_INTERFACE", default_value = "eth0")]
    pub cluster_interface: String,
    /// The macvlan interface carrying EGRESS_SOURCE.
    #[arg(long, env = "EGRESS_MACVLAN_INTERFACE", default_value = "macvlan0")]
    pub macvlan_interface: String,
    /// How to attach the tc programs: tcx (kernel >= 6.6; its links live as long as their pins),
    /// clsact (filters the kernel keeps without pins), or auto: tcx where the kernel has it and
    /// the bpffs directory outlives this process, clsact otherwise.
    #[arg(long, env = "EGRESS_TC_ATTACH", value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
    /// Connection-table capacity in entries (two per flow), and that of the table where new
    /// flows wait for their first reply. Applies when the tables are created; pinned tables
    /// from an earlier run keep their size.
    #[arg(long, env = "EGRESS_CONNTRACK_SIZE", default_value_t = DEFAULT_FLOWS_MAX)]
    pub conntrack_size: u32,
    /// Source ports used when a client's own port is taken, as MIN-MAX.
    #[arg(long, env = "EGRESS_PORT_RANGE", default_value = "1024-65535", value_parser = parse_port_range)]
    pub port_range: (u16, u16),
    /// Idle timeout of established TCP flows, seconds.
    #[arg(long, default_value_t = 7440)]
    pub tcp_timeout: u32,
    /// Idle timeout of TCP flows after FIN or RST, seconds.
    #[arg(long, default_value_t = 60)]
    pub tcp_closing_timeout: u32,
    /// Idle timeout of UDP (and SCTP) flows, seconds.
    #[arg(long, default_value_t = 120)]
    pub udp_timeout: u32,
    /// Idle timeout of ICMP echo flows, seconds.
    #[arg(long, default_value_t = 30)]
    pub icmp_timeout: u32,
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let err = || format!("'{s}' is not a port range MIN-MAX with 1 <= MIN <= MAX <= 65535");
    let (a, b) = s.split_once('-').ok_or_else(err)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| err())?,
        b.trim().parse().map_err(|_| err())?,
    );
    if a == 0 || a > b {
        return Err(err());
    }
    Ok((a, b))
}

impl Default for DataplaneOptions {
    fn default() -> Self {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            o: DataplaneOptions,
        }
        Only::parse_from(["x"]).o
    }
}

/// What [`Dataplane::preflight`] decided and found, for [`Dataplane::load`].
pub struct Preflight {
    pub plan: Plan,
    leftovers: stale::Leftovers,
}

/// A loaded dataplane: the object with its maps (pinned) and programs (attached).
pub struct Dataplane {
    pub ebpf: Ebpf,
    pub plan: Plan,
    /// Where the maps came from: "new", "reused the pins", "recovered from ...".
    pub state: String,
}

impl Dataplane {
    /// Checks, before anything is changed, that this kernel and these privileges can run the
    /// dataplane; resolves the pin directory, finds out whether it outlives this process and
    /// chooses the attach method (`mode` says whether the process stays); classifies the link
    /// pins an earlier run left there, and finds the default directories of namespaces that are
    /// gone. Fails if the result could not work.
    pub fn preflight(opts: &DataplaneOptions, mode: Mode) -> Result<Preflight> {
        let features = probe::probe();
        tracing::debug!(?features, "kernel features");
        features.require()?;
        let dir = pindir::resolve(opts.bpffs_dir.as_deref())?;
        let place = bpffs::probe(&dir)?;
        let method = plan::choose(
            opts.attach,
            place.lifetime,
            attach::tcx_supported(),
            mode,
            &dir,
        )?;
        let expected: Vec<stale::ExpectedLink> = [
            (PROG_MACVLAN_INGRESS, &opts.macvlan_interface),
            (PROG_ETH0_INGRESS, &opts.cluster_interface),
        ]
        .into_iter()
        .map(|(prog, iface)| {
            (
                attach::link_pin_name(prog, iface),
                nix::net::if_::if_nametoindex(iface.as_str()).ok(),
            )
        })
        .collect();
        let own_default = pindir::resolve(None)?;
        let whose = if dir == own_default {
            stale::Whose::OwnDefault
        } else {
            stale::Whose::Explicit
        };
        let root = std::path::Path::new(pindir::DEFAULT_ROOT);
        let leftovers = stale::survey(&dir, whose, &expected, root, &own_default)?;
        Ok(Preflight {
            plan: Plan {
                dir,
                place,
                method,
                cluster_interface: opts.cluster_interface.clone(),
                macvlan_interface: opts.macvlan_interface.clone(),
            },
            leftovers,
        })
    }

    /// Loads the programs, creating the maps or reusing those of an earlier run: pinned in the
    /// directory, else (no pins at all) those of our programs still attached here.
    pub fn load(opts: &DataplaneOptions, pre: Preflight) -> Result<Dataplane> {
        let object = EBPF_OBJECT.context(
            "this build of egress-router has no eBPF programs (built without the `ebpf` feature)",
        )?;
        let Preflight { plan, leftovers } = pre;
        let dir = plan.dir.as_path();
        bpffs::ensure_dir(dir, &plan.place)?;
        stale::clear(dir, &leftovers)?;
        let earlier_generation = pins::generation_of_hash_config(dir);
        pins::drop_incompatible(dir)?;
        let state = if PINNED_MAPS.iter().any(|m| dir.join(m).exists()) {
            "reused the pins".to_string()
        } else {
            match recover::pin_into(dir, &plan.cluster_interface, &plan.macvlan_interface)? {
                Some(from) => format!("recovered from {from}"),
                None => "new".to_string(),
            }
        };
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(MAP_FLOWS, opts.conntrack_size);
        loader.map_max_entries(MAP_NEW_FLOWS, opts.conntrack_size);
        let pins: Vec<(&str, PathBuf)> = PINNED_MAPS.iter().map(|m| (*m, dir.join(m))).collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(explain_load_error)?;
        for name in [PROG_ETH0_INGRESS, PROG_MACVLAN_INGRESS] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the eBPF object"))?
                .try_into()?;
            prog.load().map_err(|e| explain_program_error(name, e))?;
        }
        let mut dp = Dataplane { ebpf, plan, state };
        if let Some(g) = earlier_generation {
            dp.continue_from(g)?;
        }
        Ok(dp)
    }

    /// Makes GENERATION name `g`, the generation an earlier build's programs (attached until
    /// ours replace them) have in force, so that the first configuration goes under the other
    /// one and leaves their rules alone. Only while nothing is configured: both slots are
    /// empty, so no program sees the difference.
    fn continue_from(&mut self, g: u8) -> Result<()> {
        if self.in_force()?.config.is_some() {
            return Ok(());
        }
        fill::name_generation(self.map_mut(MAP_GENERATION)?, g)
    }

    /// Attaches `prog` to `iface` ingress as planned, replacing an earlier egress-router
    /// attachment in place, and leaves it attached after this process exits.
    pub fn attach(&mut self, prog: &str, iface: &str) -> Result<Attached> {
        let p: &mut SchedClassifier = self
            .ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog} missing"))?
            .try_into()?;
        attach::attach_ingress(p, prog, iface, self.plan.method, &self.plan.dir)
    }

    /// Writes the dataplane configuration and the redirect rules, replacing those in force in
    /// one step for the programs (see [`fill::write`]); on failure the old ones stay in force.
    pub fn configure(&mut self, cfg: &fill::DataplaneSettings) -> Result<()> {
        fill::write(self, cfg).map(drop)
    }

    /// The first half of [`Dataplane::configure`]: the configuration and rules written under
    /// the generation not in force, which the programs do not see until [`Dataplane::switch`].
    pub fn stage(&mut self, cfg: &fill::DataplaneSettings) -> Result<Staged> {
        let now = self.in_force()?;
        let [Some(config), Some(rules)] = self.ebpf.maps_disjoint_mut([MAP_CONFIG, MAP_RULES])
        else {
            anyhow::bail!("the eBPF object lacks its {MAP_CONFIG} or {MAP_RULES} map");
        };
        fill::stage(config, rules, now, cfg)
    }

    /// Puts what [`Dataplane::stage`] wrote in force.
    pub fn switch(&mut self, staged: &Staged) -> Result<()> {
        fill::switch(self.map_mut(MAP_GENERATION)?, staged)
    }

    /// The generation and configuration in force.
    pub fn in_force(&self) -> Result<fill::InForce> {
        fill::in_force(self.map(MAP_CONFIG)?, self.map(MAP_GENERATION)?)
    }

    fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .with_context(|| format!("the eBPF object lacks its {name} map"))
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("the eBPF object lacks its {name} map"))
    }
}

pub use fill::{DataplaneSettings, Staged};

fn explain_load_error(e: aya::EbpfError) -> anyhow::Error {
    let hint = match &e {
        aya::EbpfError::MapError(_) => {
            " (creating or pinning the BPF maps failed: is this process privileged (CAP_BPF, CAP_NET_ADMIN) and is bpffs writable?)"
        }
        _ => " (does this kernel support BTF and tc BPF programs, and is the process privileged?)",
    };
    anyhow::Error::new(e).context(format!("cannot load the eBPF dataplane{hint}"))
}

fn explain_program_error(name: &str, e: aya::programs::ProgramError) -> anyhow::Error {
    anyhow::Error::new(e).context(format!(
        "the kernel rejected eBPF program {name} (a missing privilege, or a kernel without a helper it uses)"
    ))
}

/// Our programs attached to `iface`'s ingress, each described ("the tcx program on eth0");
/// empty when there are none or there is no such interface.
pub fn attachments(iface: &str) -> Result<Vec<String>> {
    Ok(recover::attached(iface)?
        .iter()
        .map(recover::OnInterface::describe)
        .collect())
}

/// Undoes what attaching did, for the CNI plugin's DEL: our programs come off each of
/// `ifaces` that exists (tcx links detached by id, which stops them whatever still holds
/// them; our clsact filter removed), then the pin directory `dir` goes with the maps and link
/// pins in it. Returns what was removed; nothing there is not an error.
pub fn remove(ifaces: &[&str], dir: &std::path::Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for iface in ifaces {
        for on in recover::attached(iface)? {
            match on.link_id {
                Some(id) if id != 0 => tcx::detach(id)?,
                Some(_) => continue,
                None => {
                    let ifindex = nix::net::if_::if_nametoindex(*iface)
                        .with_context(|| format!("interface {iface} not found"))?;
                    clsact::remove(iface, ifindex)?;
                }
            }
            removed.push(on.describe());
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => removed.push(format!("the pins in {}", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
    }
    Ok(removed)
}
