//! The BTF maps (named fields in bpftool) and their accessors.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use egress_common::{
    DEFAULT_FLOWS_MAX, DataplaneConfig, FRAGS_MAX, FlowKey, FlowValue, FragKey, FragValue,
    RULES_MAP_ENTRIES, RuleKey, RuleTarget, Stats, packet::HINT_SLOTS,
};

#[btf_map]
pub static STATS: PerCpuArray<Stats, 1> = PerCpuArray::new();

/// The configuration of each generation; GENERATION names the one in force (see
/// `DataplaneConfig`).
#[btf_map]
pub static CONFIG: Array<DataplaneConfig, 2> = Array::new();

/// The generation in force, under index 0: the loader's one write of it switches the
/// configuration and rules whole.
#[btf_map]
pub static GENERATION: Array<u32, 1> = Array::new();

/// The redirect rules of two generations: the one GENERATION names, and a replacement's.
#[btf_map]
pub static RULES: HashMap<RuleKey, RuleTarget, { RULES_MAP_ENTRIES as usize }> = HashMap::new();

/// Connection table of answered flows: two entries per flow (one per direction). Its size is
/// set by the loader.
#[btf_map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue, { DEFAULT_FLOWS_MAX as usize }> =
    LruHashMap::new();

/// Flows no reply has answered yet (a SYN, a datagram out), the same two entries each; the
/// first reply moves them to FLOWS. A flood of new flows (SYNs to anything, spoofed ports)
/// churns only this table: the LRU's eviction is approximate (in batches, ignoring recent use
/// under pressure), and in one table it would take established flows with the flood's. The
/// kernel's conntrack keeps the same line: it early-drops unassured entries, never assured ones.
#[btf_map]
pub static NEW_FLOWS: LruHashMap<FlowKey, FlowValue, { DEFAULT_FLOWS_MAX as usize }> =
    LruHashMap::new();

#[btf_map]
pub static FRAGS: LruHashMap<FragKey, FragValue, { FRAGS_MAX as usize }> = LruHashMap::new();

/// Where a new flow's two entries (or a restored one) are built before they are inserted: on
/// the stack they would not fit the 512 bytes beside the packet path's own state. Not pinned:
/// nothing lives in it between packets.
#[btf_map]
pub static SCRATCH: PerCpuArray<NewEntries, 1> = PerCpuArray::new();

/// Per CPU, the outbound UDP flows last found among the new flows (`packet::hint_tag`): their
/// packets look there first. A one-way flow (syslog, metrics, a flood) would otherwise miss in
/// FLOWS on every packet before its hit in NEW_FLOWS. Only orders the two lookups, so a stale
/// or shared slot costs one miss; not pinned.
#[btf_map]
pub static NEW_HINTS: PerCpuArray<Hints, 1> = PerCpuArray::new();

#[repr(C)]
pub struct Hints {
    pub tags: [u32; HINT_SLOTS],
}

#[repr(C)]
pub struct NewEntries {
    pub a: FlowValue,
    pub b: FlowValue,
}

/// One of the two connection tables. Each operation names its map in its own branch: the
/// verifier wants one known map at each call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// FLOWS.
    Answered,
    /// NEW_FLOWS.
    New,
}

impl Table {
    #[inline(always)]
    pub fn get_ptr_mut(self, key: &FlowKey) -> Option<*mut FlowValue> {
        match self {
            Table::Answered => FLOWS.get_ptr_mut(key),
            Table::New => NEW_FLOWS.get_ptr_mut(key),
        }
    }

    #[inline(always)]
    pub fn contains(self, key: &FlowKey) -> bool {
        self.get_ptr_mut(key).is_some()
    }

    #[inline(always)]
    pub fn insert(self, key: &FlowKey, value: &FlowValue, flags: u64) -> Result<(), i32> {
        match self {
            Table::Answered => FLOWS.insert(key, value, flags),
            Table::New => NEW_FLOWS.insert(key, value, flags),
        }
    }

    #[inline(always)]
    pub fn remove(self, key: &FlowKey) {
        // Gone already (evicted, or removed by another CPU) is fine.
        let _ = match self {
            Table::Answered => FLOWS.remove(key),
            Table::New => NEW_FLOWS.remove(key),
        };
    }
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

/// This CPU's one-way flow hints (same reasoning as `stats`).
#[inline(always)]
pub fn hints() -> Option<&'static mut Hints> {
    // SAFETY: as in `stats`.
    NEW_HINTS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The configuration, looked up once per packet and passed down: every decision of the
/// packet, its rule's generation included, comes from this one value.
#[inline(always)]
pub fn config() -> Option<&'static DataplaneConfig> {
    // The loader writes only a slot GENERATION does not name, and only once every program
    // run that read GENERATION before it last changed has returned; the reference does not
    // outlive the program run.
    let generation = *GENERATION.get(0)?;
    CONFIG.get(generation & 1)
}
