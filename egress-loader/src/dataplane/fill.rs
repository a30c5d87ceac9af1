//! Writing the configuration into the maps.
use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, Map, MapData, MapError};
use egress_common::{
    DataplaneConfig, PROTO_SCTP, PROTO_TCP, PROTO_UDP, RULES_MAX, RuleKey, RuleTarget,
};

use super::DataplaneOptions;
use crate::config::{Protocol, RedirectConfig};

/// Everything the programs read from their maps. The generation in `config` and in the rules'
/// keys is the writer's to choose ([`stage`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataplaneSettings {
    pub config: DataplaneConfig,
    pub rules: Vec<(RuleKey, RuleTarget)>,
}

pub fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
        Protocol::Sctp => PROTO_SCTP,
    }
}

fn v4(ip: std::net::IpAddr) -> Result<Ipv4Addr> {
    match ip {
        std::net::IpAddr::V4(a) => Ok(a),
        std::net::IpAddr::V6(a) => {
            anyhow::bail!("IPv6 destination {a} is not supported by the eBPF dataplane")
        }
    }
}

impl DataplaneSettings {
    pub fn new(
        redirect: &RedirectConfig,
        egress_source: Ipv4Addr,
        eth0_ifindex: u32,
        macvlan_ifindex: u32,
        opts: &DataplaneOptions,
    ) -> Result<DataplaneSettings> {
        check_capacity(redirect.rules.len())?;
        let fallback = redirect.fallback.map(v4).transpose()?;
        let config = DataplaneConfig {
            egress_source: egress_source.octets(),
            fallback: fallback.map_or([0; 4], |a| a.octets()),
            has_fallback: fallback.is_some() as u8,
            eth0_ifindex,
            macvlan_ifindex,
            port_min: opts.port_range.0,
            port_max: opts.port_range.1,
            tcp_established_timeout: opts.tcp_timeout,
            tcp_closing_timeout: opts.tcp_closing_timeout,
            udp_timeout: opts.udp_timeout,
            icmp_timeout: opts.icmp_timeout,
            ..Default::default()
        };
        let rules = redirect
            .rules
            .iter()
            .map(|r| {
                Ok((
                    RuleKey {
                        port: r.local_port,
                        proto: proto_number(r.protocol),
                        generation: 0,
                    },
                    RuleTarget {
                        daddr: v4(r.destination)?.octets(),
                        dport: r.remote_port,
                        _pad: 0,
                    },
                ))
            })
            .collect::<Result<_>>()?;
        Ok(DataplaneSettings { config, rules })
    }
}

/// A replacement whose rules are written under the generation not in force, ready for
/// [`switch`] to put in force (the programs do not see any of it before).
#[derive(Debug)]
pub struct Staged {
    /// The configuration to write, naming the staged generation.
    config: DataplaneConfig,
}

impl Staged {
    /// The generation the rules were written under.
    pub fn generation(&self) -> u8 {
        self.config.generation
    }
}

/// What the programs have in force: the generation GENERATION names, and its configuration
/// (None before any was written: its slot in CONFIG is still zero).
#[derive(Clone, Copy, Debug)]
pub struct InForce {
    pub generation: u8,
    pub config: Option<DataplaneConfig>,
}

/// Reads what is in force from the CONFIG and GENERATION maps.
pub fn in_force(config: &Map, generation: &Map) -> Result<InForce> {
    let g: Array<&MapData, u32> = Array::try_from(generation)?;
    // The programs read it masked too.
    let generation = (g.get(&0, 0).context("reading GENERATION")? & 1) as u8;
    let slots: Array<&MapData, DataplaneConfig> = Array::try_from(config)?;
    let config = slots
        .get(&u32::from(generation), 0)
        .context("reading CONFIG")?;
    Ok(InForce {
        generation,
        // The programs take an interface index of 0 for "not configured" too.
        config: (config.eth0_ifindex != 0).then_some(config),
    })
}

/// The one configuration of a CONFIG pinned by an earlier build as a hash map (key 0), None
/// when it holds none.
pub fn hash_config(config: &Map) -> Result<Option<DataplaneConfig>> {
    let map: HashMap<&MapData, u32, DataplaneConfig> = HashMap::try_from(config)?;
    match map.get(&0, 0) {
        Ok(c) => Ok(Some(c)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e).context("reading CONFIG"),
    }
}

/// Writes `s` under the generation not in force (`now` is what is): first every rule of that
/// generation goes (what the replacement before the last one left, or one that failed
/// half-way), so that the two generations never hold more than twice [`RULES_MAX`] rules, then
/// its rules and its slot in CONFIG are written. Nothing in force is touched: until [`switch`],
/// the programs see exactly what they saw before. Fails, writing nothing, when `s` has more
/// than [`RULES_MAX`] rules.
///
/// A program run that read GENERATION just before the last switch may still be using the
/// generation written here, so the writes wait until every run begun before them has returned.
pub fn stage(
    config: &mut Map,
    rules: &mut Map,
    now: InForce,
    s: &DataplaneSettings,
) -> Result<Staged> {
    check_capacity(s.rules.len())?;
    let target = now.generation ^ 1;
    if now.config.is_some() {
        wait_for_program_runs();
    }
    let mut map: HashMap<&mut MapData, RuleKey, RuleTarget> = HashMap::try_from(rules)?;
    let leftovers: Vec<RuleKey> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| k.generation == target)
        .collect();
    for k in leftovers {
        match map.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("removing the old rule {k:?}")),
        }
    }
    for (k, v) in &s.rules {
        let k = RuleKey {
            generation: target,
            ..*k
        };
        map.insert(k, v, 0).with_context(|| {
            format!("writing rule {k:?} (not applied: the rules in force are unchanged)")
        })?;
    }
    let staged = DataplaneConfig {
        generation: target,
        ..s.config
    };
    let mut slots: Array<&mut MapData, DataplaneConfig> = Array::try_from(config)?;
    slots
        .set(u32::from(target), staged, 0)
        .context("writing CONFIG (not applied: the configuration in force is unchanged)")?;
    Ok(Staged { config: staged })
}

/// Puts a staged replacement in force: one write of GENERATION names the staged generation,
/// whose configuration and rules the programs then read whole. Those it replaced stay until
/// the next replacement: a packet that read GENERATION just before this write still finds
/// them.
pub fn switch(generation: &mut Map, staged: &Staged) -> Result<()> {
    name_generation(generation, staged.config.generation)
        .context("the new configuration is not in force")
}

/// Writes `g` into GENERATION.
pub fn name_generation(generation: &mut Map, g: u8) -> Result<()> {
    let mut map: Array<&mut MapData, u32> = Array::try_from(generation)?;
    map.set(0, u32::from(g), 0).context("writing GENERATION")
}

/// Returns once every program run begun before the call has returned. tc programs run inside
/// an RCU read-side section, so one RCU grace period is enough, and membarrier(2)'s
/// MEMBARRIER_CMD_GLOBAL waits for one (synchronize_rcu). Kernels booted with nohz_full refuse
/// that command; there, a pause thousands of times longer than a program run stands in for it.
fn wait_for_program_runs() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: no pointers; the command only waits.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "membarrier(MEMBARRIER_CMD_GLOBAL) refused; pausing 100 ms for running programs instead"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Refuses more rules than the map holds in one generation.
pub fn check_capacity(rules: usize) -> Result<()> {
    if rules > RULES_MAX as usize {
        bail!(
            "{rules} redirect rules: the eBPF dataplane takes at most {RULES_MAX} (nothing was \
             applied)"
        );
    }
    Ok(())
}

/// Writes the settings so that the programs go from the old configuration to the new one in
/// one step, never seeing a mix: [`stage`], then [`switch`].
pub fn write(dp: &mut super::Dataplane, s: &DataplaneSettings) -> Result<Staged> {
    let staged = dp.stage(s)?;
    dp.switch(&staged)?;
    Ok(staged)
}
