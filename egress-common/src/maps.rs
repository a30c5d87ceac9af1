//! Map keys and values. Names of the pinned maps live here too, so the loader, `status`, the
//! tests and the README all agree with the eBPF object.

/// Pinned map names (files under the bpffs directory).
pub const MAP_STATS: &str = "STATS";
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_GENERATION: &str = "GENERATION";
pub const MAP_RULES: &str = "RULES";
pub const MAP_FLOWS: &str = "FLOWS";
pub const MAP_NEW_FLOWS: &str = "NEW_FLOWS";
pub const MAP_FRAGS: &str = "FRAGS";

/// Program names (functions in egress-ebpf).
pub const PROG_ETH0_INGRESS: &str = "eth0_ingress";
pub const PROG_MACVLAN_INGRESS: &str = "macvlan_ingress";

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Default capacity of the connection table (two entries per flow), and of the table of flows
/// not answered yet.
pub const DEFAULT_FLOWS_MAX: u32 = 65536;
pub const FRAGS_MAX: u32 = 4096;
/// Redirect rules a configuration may have. The RULES map holds twice as many: the rules of
/// the configuration in force and those of the one replacing it (see [`RuleKey::generation`]).
pub const RULES_MAX: u32 = 4096;
/// Capacity of the RULES map: two generations of [`RULES_MAX`] rules.
pub const RULES_MAP_ENTRIES: u32 = 2 * RULES_MAX;

/// Per-CPU counters, one slot. Field names are what `bpftool map dump` and `status` show.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every packet seen on eth0 ingress (translated or not).
    pub eth0_rx_packets: u64,
    pub eth0_rx_bytes: u64,
    /// Every packet seen on macvlan0 ingress.
    pub macvlan_rx_packets: u64,
    pub macvlan_rx_bytes: u64,
    /// Translated cluster -> outside (DNAT + SNAT).
    pub out_packets: u64,
    pub out_bytes: u64,
    /// Translated replies outside -> cluster.
    pub in_packets: u64,
    pub in_bytes: u64,
    /// New connection-table flows created.
    pub new_flows: u64,
    /// eth0 packets that matched no rule and no fallback: left to the local stack.
    pub no_rule: u64,
    /// Drops by reason.
    pub drop_table_full: u64,
    pub drop_port_exhausted: u64,
    pub drop_malformed: u64,
    pub drop_unsolicited: u64,
    /// Later fragments of datagrams that must be translated, whose first fragment was not seen
    /// (later fragments of anything else go to the stack as their first fragment does).
    pub drop_fragment: u64,
    /// TTL would expire on forwarding.
    pub drop_ttl: u64,
    /// Translated packets handed to the kernel stack because the FIB lookup gave no direct path.
    pub fib_pass: u64,
    /// FIB lookups made; the other translated packets used their flow's cached route.
    pub fib_lookups: u64,
    /// Entries put back because the LRU had evicted one direction of a live flow alone.
    pub flows_restored: u64,
}

impl Stats {
    /// Adds another CPU's slot into this one.
    pub fn accumulate(&mut self, o: &Stats) {
        self.eth0_rx_packets += o.eth0_rx_packets;
        self.eth0_rx_bytes += o.eth0_rx_bytes;
        self.macvlan_rx_packets += o.macvlan_rx_packets;
        self.macvlan_rx_bytes += o.macvlan_rx_bytes;
        self.out_packets += o.out_packets;
        self.out_bytes += o.out_bytes;
        self.in_packets += o.in_packets;
        self.in_bytes += o.in_bytes;
        self.new_flows += o.new_flows;
        self.no_rule += o.no_rule;
        self.drop_table_full += o.drop_table_full;
        self.drop_port_exhausted += o.drop_port_exhausted;
        self.drop_malformed += o.drop_malformed;
        self.drop_unsolicited += o.drop_unsolicited;
        self.drop_fragment += o.drop_fragment;
        self.drop_ttl += o.drop_ttl;
        self.fib_pass += o.fib_pass;
        self.fib_lookups += o.fib_lookups;
        self.flows_restored += o.flows_restored;
    }
}

/// Dataplane settings, written by the loader: CONFIG holds one per generation (index 0 and 1),
/// and GENERATION's one value names the one in force.
///
/// A replacement of the configuration becomes visible to the programs in one step: the new
/// settings and rules are written under the generation not in force, then one write of
/// GENERATION names it. (An array value is overwritten in place, so a program reading the
/// slot being written could read half of each; no program reads a slot while it is written,
/// because the loader waits, before writing one, until every program run that could still be
/// reading it from before the last switch has returned: see the loader's `fill::stage`.)
/// Both are arrays, whose lookups the verifier inlines into a bounds check and an address:
/// cheaper, on every packet, than the hash lookup an atomic update of one value would need.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// EGRESS_SOURCE: the SNAT address.
    pub egress_source: [u8; 4],
    /// The fallback destination (all unmatched traffic), valid when `has_fallback` is 1.
    pub fallback: [u8; 4],
    pub has_fallback: u8,
    pub _pad0: [u8; 3],
    pub eth0_ifindex: u32,
    pub macvlan_ifindex: u32,
    /// Source ports picked from [port_min, port_max] when the client's own port is taken.
    pub port_min: u16,
    pub port_max: u16,
    /// Idle timeouts in seconds, checked on lookup.
    pub tcp_established_timeout: u32,
    pub tcp_closing_timeout: u32,
    pub udp_timeout: u32,
    pub icmp_timeout: u32,
    /// A TCP port of the router itself (its metrics and health listener): never sent to the
    /// fallback, so that probes and scrapes of the pod IP reach the router. 0: none. (This
    /// was padding: a CONFIG map pinned by an older build reads as 0.)
    pub local_tcp_port: u16,
    /// The generation (0 or 1) of this configuration, its index in CONFIG: the programs look
    /// its rules up under it. (This was padding: the rules and configuration of an older
    /// build both read as generation 0.)
    pub generation: u8,
    pub _pad1: u8,
}

/// Key of the redirect rule map: a local (router) port and protocol, in one generation of
/// rules. Only the generation [`DataplaneConfig::generation`] names is in force; the other
/// holds the rules of a replacement being written, or those it replaced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub port: u16,
    pub proto: u8,
    pub generation: u8,
}

/// Where a rule sends matching traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleTarget {
    pub daddr: [u8; 4],
    pub dport: u16,
    pub _pad: u16,
}

/// A packet's 5-tuple as seen on the wire where it arrives. For ICMP echo, `sport` is the echo
/// identifier on requests and `dport` the identifier on replies (the other side is 0), so a
/// reply's key is the swapped tuple of the translated request, like TCP and UDP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    // Scalar padding: a `[u8; 3]` is zeroed by a memset call in the eBPF program.
    pub _pad0: u8,
    pub _pad1: u16,
}

impl FlowKey {
    /// The key of packets going the other way.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// `FlowValue::direction`.
pub const DIR_OUT: u8 = 0;
pub const DIR_IN: u8 = 1;

/// `FlowValue::flags`.
pub const FLOW_CLOSING: u8 = 1; // FIN or RST seen: the short TCP timeout applies

/// One direction of a translated flow: the packet matching the key is rewritten to
/// (`saddr`,`sport`) -> (`daddr`,`dport`) and forwarded out of the other interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub direction: u8,
    pub flags: u8,
    pub _pad: u16,
    /// CLOCK_MONOTONIC (bpf_ktime_get_coarse_ns) of the last packet in this direction.
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The FIB's answer for this direction, reused for a short while.
    pub route: RouteCache,
}

/// How long a flow entry's cached route stands in for a FIB lookup: a route, neighbour or MTU
/// change reaches an established flow within this time. The lookup is the largest cost of an
/// established packet; per packet, reading the cache is a few loads.
pub const ROUTE_CACHE_NS: u64 = 100_000_000;

/// Ethernet header plus one VLAN tag: what the kernel allows over the MTU when it checks that
/// a frame can be forwarded (is_skb_forwardable).
const FRAME_OVERHEAD: u32 = 14 + 4;

/// A direct FIB answer (egress device, MACs, device MTU) kept in a flow entry. Only direct
/// answers are kept: a missing neighbour or a route to the stack is asked again each packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteCache {
    /// bpf_ktime_get_coarse_ns of the lookup; 0: nothing cached.
    pub at_ns: u64,
    pub ifindex: u32,
    /// The egress device's MTU as the lookup reports it (0 where the kernel does not report
    /// it, and then the cache is never used).
    pub mtu: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub _pad: u32,
}

impl RouteCache {
    /// Whether this answer stands for a lookup of a `frame_len`-byte frame at `now`: it is
    /// fresh and the frame fits the MTU with the kernel's own margin. Bigger frames take the
    /// lookup, which checks them the way the kernel forwards them. GSO packets are passed with
    /// a length of 0: they leave as segments, and the lookup would not check their length.
    pub const fn usable(&self, now: u64, frame_len: u32) -> bool {
        RouteCache::fresh(self.at_ns, self.ifindex, self.mtu, now, frame_len)
    }

    /// `usable` on the fields themselves, as the eBPF program reads them one by one from a
    /// shared map value.
    pub const fn fresh(at_ns: u64, ifindex: u32, mtu: u32, now: u64, frame_len: u32) -> bool {
        ifindex != 0
            && at_ns != 0
            && now >= at_ns
            && now - at_ns < ROUTE_CACHE_NS
            && frame_len <= mtu + FRAME_OVERHEAD
    }
}

impl FlowValue {
    /// Whether this entry rewrites packets to exactly `key`'s tuple: it is the other direction
    /// of the flow whose packets arrive with `key`.
    pub fn answers(&self, key: &FlowKey) -> bool {
        self.saddr == key.daddr
            && self.daddr == key.saddr
            && self.sport == key.dport
            && self.dport == key.sport
    }

    /// The translated tuple as a key: for an outbound entry, the key its replies arrive with.
    pub const fn translated_key(&self, proto: u8) -> FlowKey {
        FlowKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// Key of the fragment map: later fragments of a datagram carry no ports, so the first
/// fragment records the flow's ports under the datagram's identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
    pub _pad: u32,
    pub last_seen_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for Stats {}
    unsafe impl aya::Pod for DataplaneConfig {}
    unsafe impl aya::Pod for RuleKey {}
    unsafe impl aya::Pod for RuleTarget {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for RouteCache {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(at_ns: u64, mtu: u32) -> RouteCache {
        RouteCache {
            at_ns,
            ifindex: 3,
            mtu,
            smac: [2, 0, 0, 0, 0, 1],
            dmac: [2, 0, 0, 0, 0, 2],
            _pad: 0,
        }
    }

    #[test]
    fn a_cached_route_is_used_while_fresh_and_never_when_empty() {
        let c = cached(1_000, 1500);
        assert!(c.usable(1_000, 64));
        assert!(c.usable(1_000 + ROUTE_CACHE_NS - 1, 64));
        assert!(!c.usable(1_000 + ROUTE_CACHE_NS, 64), "stale");
        assert!(
            !c.usable(999, 64),
            "a lookup from the future is not trusted"
        );
        assert!(!RouteCache::default().usable(1_000, 64), "empty");
        assert!(
            !RouteCache {
                ifindex: 0,
                ..cached(1_000, 1500)
            }
            .usable(1_000, 64)
        );
    }

    #[test]
    fn a_cached_route_takes_only_frames_that_fit_the_mtu() {
        let c = cached(1_000, 1500);
        assert!(c.usable(1_000, 1500 + 14 + 4));
        assert!(
            !c.usable(1_000, 1500 + 14 + 5),
            "the lookup checks bigger frames"
        );
        assert!(
            !cached(1_000, 0).usable(1_000, 60),
            "an MTU the kernel did not report"
        );
    }

    #[test]
    fn an_entry_answers_the_tuple_it_rewrites_back_to() {
        let client = FlowKey {
            saddr: [10, 128, 0, 10],
            daddr: [10, 128, 0, 5],
            sport: 40000,
            dport: 80,
            proto: 6,
            _pad0: 0,
            _pad1: 0,
        };
        let reply = FlowValue {
            saddr: [10, 128, 0, 5],
            daddr: [10, 128, 0, 10],
            sport: 80,
            dport: 40000,
            ..Default::default()
        };
        assert!(reply.answers(&client));
        let other = FlowKey {
            sport: 40001,
            ..client
        };
        assert!(!reply.answers(&other), "another client port");
        assert!(!reply.answers(&client.reversed()), "the wrong way round");
    }

    #[test]
    fn flow_value_layout_is_what_the_pinned_map_holds() {
        // The loader compares sizes with pinned maps; padding must be explicit (no holes).
        assert_eq!(core::mem::size_of::<RouteCache>(), 32);
        assert_eq!(core::mem::size_of::<FlowValue>(), 72);
        assert_eq!(core::mem::size_of::<RuleKey>(), 4);
        assert_eq!(core::mem::size_of::<DataplaneConfig>(), 44);
    }
}
