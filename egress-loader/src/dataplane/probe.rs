//! Kernel features the dataplane relies on, probed before loading so a missing one is named
//! instead of surfacing as a verifier or syscall error.
use anyhow::{Result, bail};
use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

use super::attach::tcx_supported;

/// What the running kernel offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    pub tc_programs: bool,
    pub btf: bool,
    pub lru_hash: bool,
    pub fib_lookup: bool,
    pub redirect_neigh: bool,
    pub coarse_clock: bool,
    pub tcx: bool,
}

pub fn probe() -> KernelFeatures {
    let helper = |h| is_helper_supported(ProgramType::SchedClassifier, h).unwrap_or(false);
    KernelFeatures {
        tc_programs: is_program_supported(ProgramType::SchedClassifier).unwrap_or(false),
        btf: aya::features().btf().is_some(),
        lru_hash: is_map_supported(aya::maps::MapType::LruHash).unwrap_or(false),
        fib_lookup: helper(BpfHelper::BPF_FUNC_fib_lookup),
        redirect_neigh: helper(BpfHelper::BPF_FUNC_redirect_neigh),
        coarse_clock: helper(BpfHelper::BPF_FUNC_ktime_get_coarse_ns),
        tcx: tcx_supported(),
    }
}

impl KernelFeatures {
    /// Fails naming every missing feature the dataplane cannot do without.
    pub fn require(&self) -> Result<()> {
        let mut missing = Vec::new();
        if !self.tc_programs {
            missing.push("BPF tc (sched_cls) programs: missing privileges (CAP_BPF, CAP_NET_ADMIN) or a kernel without CONFIG_NET_CLS_BPF");
        }
        if !self.btf {
            missing.push("BTF (CONFIG_DEBUG_INFO_BTF): needed for the named-field maps");
        }
        if !self.lru_hash {
            missing.push("LRU hash maps (Linux 4.10)");
        }
        if !self.fib_lookup {
            missing.push("the bpf_fib_lookup helper (Linux 4.18)");
        }
        if !self.redirect_neigh {
            missing.push("the bpf_redirect_neigh helper (Linux 5.10)");
        }
        if !self.coarse_clock {
            missing.push("the bpf_ktime_get_coarse_ns helper (Linux 5.11)");
        }
        if missing.is_empty() {
            return Ok(());
        }
        bail!(
            "this kernel cannot run the eBPF dataplane; missing: {}",
            missing.join("; ")
        )
    }
}
