//! Pinned maps from an earlier run are reused so connections survive a restart, but only if
//! their layout is the one this build expects: a pin left by a different version is replaced,
//! loudly, instead of being read with the wrong layout.
use std::{mem::size_of, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, MapInfo};
use egress_common::{
    DataplaneConfig, FlowKey, FlowValue, FragKey, FragValue, MAP_CONFIG, MAP_FLOWS, MAP_FRAGS,
    MAP_NEW_FLOWS, MAP_RULES, MAP_STATS, RuleKey, RuleTarget, Stats,
};
use tracing::warn;

/// (map, key size, value size) as this build defines them.
const LAYOUTS: [(&str, usize, usize); 6] = [
    (MAP_STATS, size_of::<u32>(), size_of::<Stats>()),
    (MAP_CONFIG, size_of::<u32>(), size_of::<DataplaneConfig>()),
    (MAP_RULES, size_of::<RuleKey>(), size_of::<RuleTarget>()),
    (MAP_FLOWS, size_of::<FlowKey>(), size_of::<FlowValue>()),
    (MAP_NEW_FLOWS, size_of::<FlowKey>(), size_of::<FlowValue>()),
    (MAP_FRAGS, size_of::<FragKey>(), size_of::<FragValue>()),
];

/// Whether a map found from an earlier run (pinned, or through an attached program) has the
/// key and value sizes this build gives map `name`; if not, says what it has and expects.
pub fn layout_mismatch(name: &str, info: &MapInfo) -> Option<String> {
    let (_, key, value) = LAYOUTS.iter().find(|(n, _, _)| *n == name)?;
    let found = (info.key_size() as usize, info.value_size() as usize);
    (found != (*key, *value)).then(|| {
        format!(
            "key and value of {found:?} bytes, this version's are {:?}",
            (key, value)
        )
    })
}

/// Removes pinned maps under `dir` whose key or value size differs from this build's.
pub fn drop_incompatible(dir: &Path) -> Result<()> {
    for (name, _, _) in LAYOUTS {
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
