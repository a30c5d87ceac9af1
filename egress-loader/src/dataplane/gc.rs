//! Garbage collection of expired flows (legacy mode). The dataplane does not need it (expiry is
//! checked on lookup and the table is LRU); it keeps the table small and `status` truthful.
use std::collections::HashMap as StdHashMap;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData};
use egress_common::{
    DataplaneConfig, FlowKey, FlowValue, MAP_FLOWS, MAP_NEW_FLOWS,
    packet::{idle_timeout_ns, is_expired},
};

use super::{Dataplane, entries::entries, status::monotonic_ns};

/// Which entries of a table snapshot are expired: idle past their timeout in both directions
/// (the same rule the programs apply on lookup).
pub fn expired(entries: &[(FlowKey, FlowValue)], cfg: &DataplaneConfig, now: u64) -> Vec<FlowKey> {
    let last: StdHashMap<FlowKey, u64> =
        entries.iter().map(|(k, v)| (*k, v.last_seen_ns)).collect();
    entries
        .iter()
        .filter(|(k, v)| {
            let timeout = idle_timeout_ns(cfg, k.proto, v.flags);
            let peer = v.translated_key(k.proto).reversed();
            let newest = last
                .get(&peer)
                .map_or(v.last_seen_ns, |p| (*p).max(v.last_seen_ns));
            is_expired(now, newest, timeout)
        })
        .map(|(k, _)| *k)
        .collect()
}

impl Dataplane {
    /// Removes expired flows from both connection tables; returns how many entries went.
    pub fn collect_garbage(&mut self) -> Result<usize> {
        let cfg = self
            .in_force()?
            .config
            .context("the dataplane is not configured")?;
        let mut removed = 0;
        for table in [MAP_FLOWS, MAP_NEW_FLOWS] {
            let snapshot = entries::<FlowKey, FlowValue>(self.ebpf.map(table).context(table)?)?;
            let mut flows: HashMap<&mut MapData, FlowKey, FlowValue> =
                HashMap::try_from(self.ebpf.map_mut(table).context(table)?)?;
            let dead = expired(&snapshot, &cfg, monotonic_ns());
            for k in &dead {
                // Gone already (LRU, or the other CPU) is fine.
                let _ = flows.remove(k);
            }
            removed += dead.len();
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use egress_common::{DIR_IN, DIR_OUT, PROTO_UDP};

    use super::*;

    fn pair(out_seen: u64, in_seen: u64) -> Vec<(FlowKey, FlowValue)> {
        let k = FlowKey {
            saddr: [10, 0, 0, 1],
            daddr: [10, 0, 0, 5],
            sport: 1000,
            dport: 53,
            proto: PROTO_UDP,
            _pad0: 0,
            _pad1: 0,
        };
        let v = FlowValue {
            saddr: [1, 1, 1, 1],
            daddr: [2, 2, 2, 2],
            sport: 1000,
            dport: 53,
            direction: DIR_OUT,
            last_seen_ns: out_seen,
            ..Default::default()
        };
        let rk = v.translated_key(PROTO_UDP).reversed();
        let rv = FlowValue {
            saddr: k.daddr,
            daddr: k.saddr,
            sport: 53,
            dport: 1000,
            direction: DIR_IN,
            last_seen_ns: in_seen,
            ..Default::default()
        };
        vec![(k, v), (rk, rv)]
    }

    #[test]
    fn a_flow_is_live_while_either_direction_is() {
        let cfg = DataplaneConfig {
            udp_timeout: 10,
            ..Default::default()
        };
        let s = 1_000_000_000u64;
        assert!(
            expired(&pair(0, 95 * s), &cfg, 100 * s).is_empty(),
            "replies keep it alive"
        );
        assert_eq!(expired(&pair(0, 5 * s), &cfg, 100 * s).len(), 2);
        assert!(expired(&pair(95 * s, 0), &cfg, 100 * s).is_empty());
    }
}
