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

/// Where a new flow's two entries (or a restored one) are built before they are inserted: on
/// the stack they would not fit the 512 bytes beside the packet path's own state. Not pinned:
/// nothing lives in it between packets.
#[btf_map]
pub static SCRATCH: PerCpuArray<NewEntries, 1> = PerCpuArray::new();

#[repr(C)]
pub struct NewEntries {
    pub a: FlowValue,
    pub b: FlowValue,
}

/// This CPU's counters, looked up once per packet and passed down.
#[inline(always)]
pub fn stats() -> Option<&'static mut Stats> {
    // SAFETY: a per-CPU slot: only this program run, on this CPU, touches it until it returns
    // (tc programs run with preemption disabled); the reference does not outlive the run.
    STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// This CPU's scratch entries (same reasoning as `stats`).
#[inline(always)]
pub fn scratch() -> Option<&'static mut NewEntries> {
    // SAFETY: as in `stats`.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
pub fn config() -> Option<&'static DataplaneConfig> {
    CONFIG.get(0)
}
