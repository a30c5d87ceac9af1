//! Writing the configuration into the maps.
use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, Map, MapData, MapError};
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

/// The configuration in force (CONFIG's value), None before any was written.
pub fn current(config: &Map) -> Result<Option<DataplaneConfig>> {
    let map: HashMap<&MapData, u32, DataplaneConfig> = HashMap::try_from(config)?;
    match map.get(&0, 0) {
        Ok(c) => Ok(Some(c)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e).context("reading CONFIG"),
    }
}

/// Writes the rules of `s` under the generation not in force (`active` is the one in force,
/// None when nothing is): first every rule of any other generation goes (what a replacement
/// left, or one that failed half-way), so that the two generations never hold more than twice
/// [`RULES_MAX`] rules. The rules in force are not touched, and neither is CONFIG: until
/// [`switch`], the programs see exactly what they saw before. Fails, writing nothing, when `s`
/// has more than [`RULES_MAX`] rules.
pub fn stage(rules: &mut Map, active: Option<u8>, s: &DataplaneSettings) -> Result<Staged> {
    check_capacity(s.rules.len())?;
    let target = active.map_or(0, |g| g ^ 1);
    let mut map: HashMap<&mut MapData, RuleKey, RuleTarget> = HashMap::try_from(rules)?;
    let leftovers: Vec<RuleKey> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| Some(k.generation) != active)
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
    Ok(Staged {
        config: DataplaneConfig {
            generation: target,
            ..s.config
        },
    })
}

/// Puts a staged replacement in force: one update of CONFIG, which the programs see whole
/// (see [`DataplaneConfig`]), names the staged generation. The rules it replaced stay until
/// the next replacement removes them: a packet that read the old configuration just before
/// this update still finds the old rules.
pub fn switch(config: &mut Map, staged: &Staged) -> Result<()> {
    let mut map: HashMap<&mut MapData, u32, DataplaneConfig> = HashMap::try_from(config)?;
    map.insert(0, staged.config, 0)
        .context("writing CONFIG (the new rules are not in force)")
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
