//! Writing the configuration into the maps.
use std::{collections::HashSet, net::Ipv4Addr};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};
use egress_common::{
    DataplaneConfig, MAP_CONFIG, MAP_RULES, PROTO_SCTP, PROTO_TCP, PROTO_UDP, RuleKey, RuleTarget,
};

use super::DataplaneOptions;
use crate::config::{Protocol, RedirectConfig};

/// Everything the programs read from their maps.
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
                        _pad: 0,
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

/// Writes the settings: new rules first, then stale ones removed, so a rule present in both
/// the old and the new configuration never disappears.
pub fn write(ebpf: &mut Ebpf, s: &DataplaneSettings) -> Result<()> {
    let mut config: Array<&mut MapData, DataplaneConfig> =
        Array::try_from(ebpf.map_mut(MAP_CONFIG).context("CONFIG map missing")?)?;
    config.set(0, s.config, 0).context("writing CONFIG")?;
    let mut rules: HashMap<&mut MapData, RuleKey, RuleTarget> =
        HashMap::try_from(ebpf.map_mut(MAP_RULES).context("RULES map missing")?)?;
    for (k, v) in &s.rules {
        rules
            .insert(k, v, 0)
            .with_context(|| format!("writing rule {k:?}"))?;
    }
    let wanted: HashSet<RuleKey> = s.rules.iter().map(|(k, _)| *k).collect();
    let stale: Vec<RuleKey> = rules
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !wanted.contains(k))
        .collect();
    for k in stale {
        rules
            .remove(&k)
            .with_context(|| format!("removing stale rule {k:?}"))?;
    }
    Ok(())
}
