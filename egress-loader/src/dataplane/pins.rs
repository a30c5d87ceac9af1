//! Pinned maps from an earlier run are reused so connections survive a restart, but only if
//! their layout is the one this build expects: a pin left by a different version is replaced,
//! loudly, instead of being read with the wrong layout.
use std::{mem::size_of, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{Map, MapData, MapInfo, MapType};
use egress_common::{
    DataplaneConfig, FlowKey, FlowValue, FragKey, FragValue, MAP_CONFIG, MAP_FLOWS, MAP_FRAGS,
    MAP_GENERATION, MAP_NEW_FLOWS, MAP_RULES, MAP_STATS, RULES_MAP_ENTRIES, RuleKey, RuleTarget,
    Stats,
};
use tracing::warn;

/// A map's layout as this build defines it: what a map of an earlier run must have to be
/// reused.
struct Layout {
    name: &'static str,
    kind: MapType,
    key: usize,
    value: usize,
    /// The capacity, for maps whose size is this build's (the connection tables' is set by the
    /// operator and kept).
    entries: Option<u32>,
}

const fn layout(
    name: &'static str,
    kind: MapType,
    key: usize,
    value: usize,
    entries: Option<u32>,
) -> Layout {
    Layout {
        name,
        kind,
        key,
        value,
        entries,
    }
}

/// Earlier builds had CONFIG as an array of one slot (the same key and value sizes), then as a
/// hash map of one value, and RULES with room for one generation: the type and the capacity
/// are compared as well as the sizes.
const LAYOUTS: [Layout; 7] = [
    layout(
        MAP_STATS,
        MapType::PerCpuArray,
        size_of::<u32>(),
        size_of::<Stats>(),
        Some(1),
    ),
    layout(
        MAP_CONFIG,
        MapType::Array,
        size_of::<u32>(),
        size_of::<DataplaneConfig>(),
        Some(2),
    ),
    layout(
        MAP_GENERATION,
        MapType::Array,
        size_of::<u32>(),
        size_of::<u32>(),
        Some(1),
    ),
    layout(
        MAP_RULES,
        MapType::Hash,
        size_of::<RuleKey>(),
        size_of::<RuleTarget>(),
        Some(RULES_MAP_ENTRIES),
    ),
    layout(
        MAP_FLOWS,
        MapType::LruHash,
        size_of::<FlowKey>(),
        size_of::<FlowValue>(),
        None,
    ),
    layout(
        MAP_NEW_FLOWS,
        MapType::LruHash,
        size_of::<FlowKey>(),
        size_of::<FlowValue>(),
        None,
    ),
    layout(
        MAP_FRAGS,
        MapType::LruHash,
        size_of::<FragKey>(),
        size_of::<FragValue>(),
        None,
    ),
];

/// Whether a map found from an earlier run (pinned, or through an attached program) has the
/// type, key and value sizes and capacity this build gives map `name`; if not, says what it
/// has and expects.
pub fn layout_mismatch(name: &str, info: &MapInfo) -> Option<String> {
    let l = LAYOUTS.iter().find(|l| l.name == name)?;
    let kind = info.map_type().ok();
    if kind != Some(l.kind) {
        return Some(format!(
            "a map of type {kind:?}, this version's is {:?}",
            l.kind
        ));
    }
    let found = (info.key_size() as usize, info.value_size() as usize);
    if found != (l.key, l.value) {
        return Some(format!(
            "key and value of {found:?} bytes, this version's are {:?}",
            (l.key, l.value)
        ));
    }
    match l.entries {
        Some(n) if n != info.max_entries() => Some(format!(
            "room for {} entries, this version's has {n}",
            info.max_entries()
        )),
        _ => None,
    }
}

/// The generation in force in a CONFIG pinned by the build before this one (a hash map of one
/// value), which [`drop_incompatible`] replaces. Until this build's programs replace its
/// programs, they look their rules up under it, so the first configuration this build writes
/// must go under the other generation.
pub fn generation_of_hash_config(dir: &Path) -> Option<u8> {
    let map = MapData::from_pin(dir.join(MAP_CONFIG)).ok()?;
    if map.info().ok()?.map_type().ok()? != MapType::Hash {
        return None;
    }
    let config = super::fill::hash_config(&Map::HashMap(map)).ok()??;
    Some(config.generation & 1)
}

/// Removes pinned maps under `dir` whose layout differs from this build's.
pub fn drop_incompatible(dir: &Path) -> Result<()> {
    for Layout { name, .. } in LAYOUTS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        if let Some(why) = layout_mismatch(name, &info) {
            warn!(
                map = name,
                "pinned map is from an incompatible egress-router version ({why}); replacing it (its state, such as live connections, is lost)"
            );
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}
