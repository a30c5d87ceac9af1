//! The BTF maps (named fields in bpftool) and their accessors.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use egress_common::{
    DEFAULT_FLOWS_MAX, DataplaneConfig, FRAGS_MAX, FlowKey, FlowValue, FragKey, FragValue,
    RULES_MAX, RuleKey, RuleTarget, Stats,
};

#[btf_map]
pub static STATS: PerCpuArray<Stats, 1> = PerCpuArray::new();

#[btf_map]
pub static CONFIG: Array<DataplaneConfig, 1> = Array::new();

#[btf_map]
pub static RULES: HashMap<RuleKey, RuleTarget, { RULES_MAX as usize }> = HashMap::new();

/// Connection table: two entries per flow (one per direction). Its size is set by the loader.
#[btf_map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue, { DEFAULT_FLOWS_MAX as usize }> =
    LruHashMap::new();

#[btf_map]
pub static FRAGS: LruHashMap<FragKey, FragValue, { FRAGS_MAX as usize }> = LruHashMap::new();

/// Runs `f` on this CPU's counters.
#[inline(always)]
pub fn with_stats(f: impl FnOnce(&mut Stats)) {
    if let Some(p) = STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this program on this CPU touches it now.
        f(unsafe { &mut *p })
    }
}

#[inline(always)]
pub fn config() -> Option<&'static DataplaneConfig> {
    CONFIG.get(0)
}
