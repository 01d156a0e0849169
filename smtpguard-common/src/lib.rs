//! Types shared by the smtpguard XDP program (`smtpguard-ebpf`) and the
//! userspace daemon (`smtpguard`).
//!
//! Everything that crosses the kernel/user boundary is defined here once:
//! map names, map sizes, the layout of map values, the runtime
//! configuration record and the indices of the verdict counters. All
//! shared structs are `#[repr(C)]` with explicit padding and no `bool`, so
//! both sides agree on every byte. Addresses are always in network byte
//! order (`[u8; 4]` / `[u8; 16]`, as they appear in the packet).
#![no_std]

/// Name of the XDP program inside the object file (`bpftool prog` shows it).
pub const PROGRAM_NAME: &str = "smtpguard";

/// Map names. At most 15 characters so that `bpftool map` shows them whole.
pub mod map_names {
    /// `Array<RuntimeConfig>` with one element: mode, ports, generation.
    /// The program's global `SG_CONFIG`, in a data section of its own that
    /// aya loads as this map (named after the section), so that the
    /// program reads the record with no map lookup.
    pub const CONFIG: &str = ".data.sgcfg";
    /// IPv4 LPM tries, one per list generation: only the frozen
    /// `trie-reference` program has them now (the bench baseline and the
    /// lookup oracle); the production program uses the compiled table.
    pub const RULES_V4: [&str; 2] = ["SG_RULES4_A", "SG_RULES4_B"];
    /// The IPv4 first level, `Array<[u32; 16]>`, one per generation (see
    /// [`super::ipv4_table`]).
    pub const TBL24: [&str; 2] = ["SG_TBL24_A", "SG_TBL24_B"];
    /// The IPv4 summary of the first level, one entry per /16,
    /// `Array<[u32; 16]>`, one per generation (see [`super::ipv4_table`]).
    pub const TBL16_V4: [&str; 2] = ["SG_TBL16_4_A", "SG_TBL16_4_B"];
    /// The IPv4 groups, `Array<Group>`, one per generation.
    pub const GROUPS4: [&str; 2] = ["SG_GROUPS4_A", "SG_GROUPS4_B"];
    /// The IPv4 group leaves, `Array<[u32; 16]>`, one per generation.
    pub const LEAVES4: [&str; 2] = ["SG_LEAVES4_A", "SG_LEAVES4_B"];
    /// IPv6 LPM tries, one per list generation: only the frozen
    /// `trie-reference` program has them now (the bench baseline and the
    /// lookup oracle); the production program uses the compiled table.
    pub const RULES_V6: [&str; 2] = ["SG_RULES6_A", "SG_RULES6_B"];
    /// The IPv6 first level, `Array<[u32; 16]>`, one per IPv6 generation
    /// (see [`super::ipv6_table`]).
    pub const TBL16_V6: [&str; 2] = ["SG_TBL16_6_A", "SG_TBL16_6_B"];
    /// The IPv6 nodes, `Array<Group>`, one per IPv6 generation.
    pub const GROUPS6: [&str; 2] = ["SG_GROUPS6_A", "SG_GROUPS6_B"];
    /// The IPv6 node leaves, `Array<[u32; 16]>`, one per IPv6 generation.
    pub const LEAVES6: [&str; 2] = ["SG_LEAVES6_A", "SG_LEAVES6_B"];
    /// `Array<u32>` with one element: the IPv6 generation in force (0 or 1).
    pub const GENERATION_V6: &str = "SG_GEN6";
    /// `PerCpuArray<CpuState>` with one element: each CPU's outcome
    /// counters, pending hits and drop-log window (see
    /// [`super::CpuState`]).
    pub const CPU_STATE: &str = "SG_CPU";
    /// `Array<u64>` of [`super::MAX_RULE_IDS`] per-entry hit counters, indexed by rule id.
    pub const HITS: &str = "SG_HITS";
    /// `HashMap<RateKey, RateBucket>`: one token bucket per client (see
    /// [`super::rate`]); `table_size` entries, preallocated, no eviction.
    pub const RATE_BUCKETS: &str = "SG_RATE";
    /// `Array<RateBucket>` with one element: the bucket shared by new
    /// clients while `SG_RATE` is full.
    pub const RATE_OVERFLOW: &str = "SG_RATE_OVF";
    /// `RingBuf` of [`super::rate::RateEvent`]: "client over the limit".
    pub const RATE_EVENTS: &str = "SG_RATE_EV";
}

/// Capacity of each LPM trie (one address family, one generation), in prefixes.
///
/// The tries are created with `BPF_F_NO_PREALLOC`, so unused capacity costs
/// no kernel memory.
pub const MAX_PREFIXES_PER_FAMILY: u32 = 1 << 20;

/// The compiled IPv4 lookup: a DIR-24 first level plus popcount-indexed
/// groups for the /24s that hold longer prefixes (/25 to /32).
///
/// - `TBL24` has one [entry](entry) per /24 (2^24 of them, index = the top
///   24 address bits), stored 16 to a 64-byte array element
///   ([`TBL24_LINES`] elements) because the kernel rounds array elements
///   up to 8 bytes.
/// - A group entry points into `GROUPS4`: the verdicts of the /24's 256
///   addresses as runs. Bit `i` of the 256-bit `bitmap` is set where a run
///   starts (bit 0 always), and the run holding host `h` is leaf
///   `base + rank[h / 64] + popcount(bitmap[h / 64] << (63 - h % 64)) - 1`.
/// - A /24 of at most [`COMPACT_RUNS`](ipv4_table::COMPACT_RUNS) runs (one
///   /32 in it makes three) has its group in the compact form instead
///   ([`CompactGroup`](ipv4_table::CompactGroup), the same 40 bytes, its
///   `TBL24` entry marked with [`COMPACT`](ipv4_table::COMPACT)): the runs'
///   first hosts and entries inline, so such a source costs two dependent
///   loads, not three.
/// - `LEAVES4` holds leaves (plain rule entries), 16 to an element.
/// - `TBL16_4` summarizes `TBL24` per /16 (2^16 entries, 256 KiB): the
///   /16's entry where all 256 of its `TBL24` entries are the same plain
///   entry, else a `GROUP` entry meaning "look in `TBL24`". It is exact
///   between changes (while a single change is written, a /16 it settled
///   keeps the old verdict until the change's /24s are all written, then
///   is republished); the program reads it first only while
///   [`RuntimeConfig::v4_summary`](super::RuntimeConfig::v4_summary) is
///   set, which userspace does for lists that leave most /16s uniform.
///   Then a source in such a /16 costs one load from a table that stays
///   in cache and in the TLB, where the 64 MiB `TBL24` costs a TLB and a
///   cache miss for every scattered source (about 170 ns on a VM).
///
/// Every entry already carries the longest-prefix verdict: the compiler
/// merges permit and deny (deny wins a tie) before writing.
pub mod ipv4_table {
    /// `TBL24` elements (16 entries each): 2^24 entries, 64 MiB.
    pub const TBL24_LINES: u32 = 1 << 20;
    /// `TBL16_4` elements (16 entries each): 2^16 entries, 256 KiB.
    pub const TBL16_LINES: u32 = (1 << 16) / ENTRIES_PER_LINE;
    /// Entries per `TBL24` or `LEAVES4` element.
    pub const ENTRIES_PER_LINE: u32 = 16;
    /// Capacity of `GROUPS4` per generation: one group per /24 holding a
    /// longer prefix, so a list of `MAX_PREFIXES_PER_FAMILY` always fits.
    pub const MAX_GROUPS: u32 = super::MAX_PREFIXES_PER_FAMILY;
    /// Capacity of `LEAVES4` per generation, in leaves (13 MiB): a /24
    /// with k longer prefixes has at most 2k + 1 runs, so a full list
    /// needs at most 3 * 2^20 and the other 2^18 are room for
    /// copy-on-write updates (when they run out, a single change writes
    /// the whole list into the other generation, which compacts it).
    pub const MAX_LEAVES: u32 = 3 * (1 << 20) + (1 << 18);
    /// `LEAVES4` elements.
    pub const LEAF_LINES: u32 = MAX_LEAVES / ENTRIES_PER_LINE;

    /// The encoding of a `TBL24` or leaf entry: `[kind:2][payload:30]`.
    pub mod entry {
        /// Where the kind starts.
        pub const KIND_SHIFT: u32 = 30;
        /// The payload bits: a rule id, or for `GROUP` a group index (in
        /// IPv4 `TBL24`: the index under [`GROUP_INDEX`](super::GROUP_INDEX)
        /// and the [`COMPACT`](super::COMPACT) bit).
        pub const PAYLOAD: u32 = (1 << KIND_SHIFT) - 1;
        /// No entry covers these addresses (the mode decides).
        pub const NONE: u32 = 0;
        /// A permit rule; the payload is its rule id. Equals `Action::Permit`.
        pub const PERMIT: u32 = 1;
        /// A deny rule; the payload is its rule id. Equals `Action::Deny`.
        pub const DENY: u32 = 2;
        /// A group; the payload indexes `GROUPS4` (IPv4: in `TBL24` only,
        /// masked with [`GROUP_INDEX`](super::GROUP_INDEX)) or `GROUPS6`
        /// (IPv6: in `TBL16` and in leaves, one per level).
        /// In the IPv4 `TBL16_4` summary it means "look in `TBL24`"
        /// (payload 0).
        pub const GROUP: u32 = 3;

        /// Packs a kind and a payload.
        pub const fn pack(kind: u32, payload: u32) -> u32 {
            (kind << KIND_SHIFT) | (payload & PAYLOAD)
        }
    }

    /// In the payload of a `GROUP` entry of `TBL24`: the group is a
    /// [`CompactGroup`]. IPv4 only (IPv6 nodes are never compact).
    pub const COMPACT: u32 = 1 << 29;
    /// The group index in the payload of a `GROUP` entry of `TBL24`.
    pub const GROUP_INDEX: u32 = COMPACT - 1;
    /// Runs a [`CompactGroup`] holds at most.
    pub const COMPACT_RUNS: usize = 8;

    /// A /24 of at most [`COMPACT_RUNS`] runs: an element of `GROUPS4`
    /// stored in [`Group`]'s 40 bytes, marked [`COMPACT`] in its `TBL24`
    /// entry. Run `i` covers hosts `starts[i]` up to the next run's start
    /// and has entry `entries[i]`; `starts[0]` is 0, starts ascend, and the
    /// slots after the last run repeat it (same start, same entry), so the
    /// run of host `h` is the number of `starts[1..]` at or below `h`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CompactGroup {
        /// First host of each run.
        pub starts: [u8; COMPACT_RUNS],
        /// Entry of each run (plain entries, never `GROUP`).
        pub entries: [u32; COMPACT_RUNS],
    }

    impl CompactGroup {
        /// The entry of host `host` (0..=255; higher bits are ignored).
        /// Branch-free: the compares are subtractions whose borrow is the
        /// answer, so a scattered flood costs no mispredictions.
        #[inline(always)]
        pub fn entry_of(&self, host: u32) -> u32 {
            let host = host & 0xff;
            let starts = u64::from_le_bytes(self.starts);
            let mut run = 0u32;
            let mut i = 1;
            while i < COMPACT_RUNS {
                let start = ((starts >> (8 * i)) & 0xff) as u32;
                // start <= host: host - start does not borrow.
                run += (host.wrapping_sub(start) >> 31) ^ 1;
                i += 1;
            }
            self.entries[(run as usize) & (COMPACT_RUNS - 1)]
        }

        /// The group as stored in `GROUPS4`.
        pub fn into_group(self) -> Group {
            // SAFETY: both are repr(C), 40 bytes (transmute checks the
            // size), and every bit pattern is valid for both.
            unsafe { core::mem::transmute::<CompactGroup, Group>(self) }
        }

        /// A `GROUPS4` element read back as the compact form.
        #[inline(always)]
        pub fn from_group(group: &Group) -> &CompactGroup {
            // SAFETY: same size; Group's alignment (8) is stricter than
            // CompactGroup's (4); every bit pattern is valid.
            unsafe { &*(group as *const Group).cast::<CompactGroup>() }
        }
    }

    /// One /24 that holds prefixes longer than /24, in the bitmap form:
    /// an element of `GROUPS4` (or an IPv6 node of `GROUPS6`). An IPv4
    /// slot whose `TBL24` entry has [`COMPACT`] set holds a
    /// [`CompactGroup`] in these bytes instead.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Group {
        /// Bit `h` (word `h / 64`, bit `h % 64`) is set where a run of equal
        /// entries starts at host `h`; bit 0 is always set.
        pub bitmap: [u64; 4],
        /// Index in `LEAVES4` of the first run's leaf.
        pub base: u32,
        /// Set bits in the words before word `w` (`rank[0]` is 0).
        pub rank: [u8; 4],
    }
}

/// The compiled IPv6 lookup: a multibit trie with a 16-bit direct first
/// level and 8-bit-stride nodes compressed into runs, in the formats of
/// [`ipv4_table`] (entries, [`Group`](ipv4_table::Group), 16-entry lines).
///
/// - `TBL16` has one [entry](ipv4_table::entry) per /16 (2^16 of them,
///   index = the top 16 address bits), stored 16 to a 64-byte element
///   ([`TBL16_LINES`](ipv6_table::TBL16_LINES) elements, 256 KiB).
/// - A `GROUP` entry, in `TBL16` or in a leaf, points into `GROUPS6`: a
///   node holding the 256 entries of the next 8 address bits as runs,
///   exactly as an IPv4 group holds a /24's 256 hosts. For the next
///   address byte `b`, the entry is leaf
///   `base + rank[b / 64] + popcount(bitmap[b / 64] << (63 - b % 64)) - 1`
///   of `LEAVES6`. Unlike IPv4, a leaf may itself be a `GROUP` entry: the
///   node of the next 8 bits. A lookup follows at most
///   [`MAX_LEVELS`](ipv6_table::MAX_LEVELS) nodes (bits 16 to 128).
/// - A node exists for every 8-bit boundary a listed prefix crosses: a
///   prefix of length `L > 16` needs the nodes at depths 16, 24, ... below
///   `L`, `ceil((L - 16) / 8)` of them (a /48 four, a /128 fourteen),
///   shared with every other prefix on the same path.
///
/// Every entry already carries the longest-prefix verdict: the compiler
/// merges permit and deny (deny wins a tie) before writing. Addresses are
/// taken as the number the 16 octets spell in network byte order: the top
/// 16 bits index `TBL16`, then each following octet one node.
///
/// # Bounds
///
/// The maps are preallocated arrays, so the capacity is in nodes and
/// leaves, not prefixes. A node has at most `1 + 2 * (prefixes ending in
/// it) + 2 * (child nodes)` runs, so a list of `P` prefixes needing `G`
/// nodes has at most `3G + 2P` leaves, and `G <= 14P`. Any list of up to
/// [`GUARANTEED_PREFIXES`](ipv6_table::GUARANTEED_PREFIXES) prefixes fits
/// whatever their lengths; longer lists fit as long as their prefixes
/// share paths (full bogons, 130,320 prefixes, needs 8,683 nodes). A list
/// that needs more nodes or leaves than the maps hold is refused whole
/// ("kernel IPv6 table is full"): nothing is written to the generation in
/// force and no switch happens.
pub mod ipv6_table {
    pub use super::ipv4_table::{entry, Group, ENTRIES_PER_LINE};

    /// `TBL16` elements (16 entries each): 2^16 entries, 256 KiB.
    pub const TBL16_LINES: u32 = (1 << 16) / ENTRIES_PER_LINE;
    /// Nodes a lookup visits at most: one per octet after the first two.
    pub const MAX_LEVELS: u32 = 14;
    /// Capacity of `GROUPS6` per generation, in nodes (40 bytes each,
    /// 10 MiB). Full bogons needs 8,683; with as many permits nested in
    /// it, about 15,000.
    pub const MAX_GROUPS: u32 = 1 << 18;
    /// Capacity of `LEAVES6` per generation, in leaves (4 bytes each,
    /// 4 MiB).
    pub const MAX_LEAVES: u32 = 1 << 20;
    /// `LEAVES6` elements.
    pub const LEAF_LINES: u32 = MAX_LEAVES / ENTRIES_PER_LINE;
    /// Prefixes that always fit, whatever their lengths: each needs at
    /// most [`MAX_LEVELS`] nodes and `3 * MAX_LEVELS + 2` leaves (see the
    /// module docs).
    pub const GUARANTEED_PREFIXES: u32 = {
        let by_groups = MAX_GROUPS / MAX_LEVELS;
        let by_leaves = MAX_LEAVES / (3 * MAX_LEVELS + 2);
        if by_groups < by_leaves {
            by_groups
        } else {
            by_leaves
        }
    };
}

/// Size of the hit-counter array: rule ids are `0..MAX_RULE_IDS`.
/// Rule id 0 is never assigned, so a zeroed value reads as "no rule".
pub const MAX_RULE_IDS: u32 = 1 << 21;

/// How many SMTP ports the XDP program can watch at once.
pub const MAX_PORTS: usize = 8;

/// What a list entry says about the addresses it covers.
///
/// Stored as the `action` of a [`Rule`]. Values are stable ABI.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// On the permit list: the SYN passes.
    Permit = 1,
    /// On the deny list: the SYN is dropped.
    Deny = 2,
}

/// The value of an LPM trie entry.
///
/// The key is `aya::maps::lpm_trie::Key<[u8; 4]>` (IPv4) or
/// `Key<[u8; 16]>` (IPv6): prefix length in bits, then the address in
/// network byte order with all host bits zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// An [`Action`] as `u32` (`1` permit, `2` deny).
    pub action: u32,
    /// Index into the hit-counter map `SG_HITS`; never 0.
    pub rule_id: u32,
}

/// What the program does with a SYN from an address that matches no entry.
///
/// Values are stable ABI (stored in [`RuntimeConfig::mode`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// "Accept all, except the following list": unlisted sources pass.
    AcceptAllExceptDeny = 0,
    /// "Deny all, except the following list": unlisted sources are dropped.
    DenyAllExceptPermit = 1,
}

/// Whether verdicts are carried out. Stored in [`RuntimeConfig::enforcement`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Drop what the policy denies.
    Enforce = 0,
    /// Count and log what would be dropped, drop nothing.
    Monitor = 1,
    /// Count SYNs, judge nothing, drop nothing.
    Off = 2,
}

/// The runtime configuration of the XDP program: its global `SG_CONFIG`
/// (the map [`map_names::CONFIG`]).
///
/// Changing it takes effect on the next packet; no program reload is needed.
/// A zeroed record (before the daemon writes one) means: accept-all mode,
/// enforcing, generation 0, no ports, so nothing is ever dropped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// A [`Mode`] as `u32`.
    pub mode: u32,
    /// An [`Enforcement`] as `u32`.
    pub enforcement: u32,
    /// Which trie pair (`0` = `_A`, `1` = `_B`) holds the lists in force.
    pub active_generation: u32,
    /// How many entries of `ports` are in use (`0..=MAX_PORTS`).
    pub port_count: u32,
    /// Destination TCP ports to guard, in network byte order.
    pub ports: [u16; MAX_PORTS],
    /// At most this many drop events per second go to the log (0 = none).
    pub log_rate_per_sec: u32,
    /// 1: the IPv4 lookup reads the `TBL16_4` summary of the generation
    /// in force before `TBL24` (see [`ipv4_table`]); 0: `TBL24` first.
    /// Either way the verdict is the old or the new list's: the summary is
    /// exact between changes, and during one it still holds the old
    /// verdict for a /16 until the change's /24s are written.
    pub v4_summary: u32,
    /// The SYN rate limit per client, in SYNs per minute; 0 = off (see
    /// [`rate`]).
    pub rate_per_minute: u32,
    /// 1: sources whose deciding entry is a permit entry skip the limiter.
    pub rate_exempt_permitted: u32,
    /// Emission interval of the token bucket: 60 s / `rate_per_minute`, ns.
    pub rate_interval_ns: u64,
    /// How far ahead of now a bucket's `tat_ns` may be for a SYN to pass:
    /// `(rate_per_minute - 1) * rate_interval_ns` (a burst of
    /// `rate_per_minute`).
    pub rate_tolerance_ns: u64,
    /// The IPv6 client grouping as a mask over the source address (network
    /// byte order, as four native-endian words: `u32::from_ne_bytes` of
    /// each four octets, as the program loads them from the packet).
    pub rate_v6_mask: [u32; 4],
    /// The prefix length `rate_v6_mask` was made from (for events).
    pub rate_v6_prefix: u32,
    /// Explicit padding; always 0.
    pub _pad2: u32,
}

impl RuntimeConfig {
    /// All-zero record: see the type's documentation.
    pub const fn zeroed() -> Self {
        Self {
            mode: 0,
            enforcement: 0,
            active_generation: 0,
            port_count: 0,
            ports: [0; MAX_PORTS],
            log_rate_per_sec: 0,
            v4_summary: 0,
            rate_per_minute: 0,
            rate_exempt_permitted: 0,
            rate_interval_ns: 0,
            rate_tolerance_ns: 0,
            rate_v6_mask: [0; 4],
            rate_v6_prefix: 0,
            _pad2: 0,
        }
    }
}

/// The per-client SYN rate limit (issue #16): a token bucket per client,
/// kept as GCRA (the "generic cell rate algorithm", ITU-T I.371), which is
/// a token bucket stored as one number, so that one compare-and-swap
/// updates it on any CPU.
///
/// A bucket holds `tat_ns`, the theoretical arrival time: when the bucket
/// will be full again. A SYN at `now` passes when
/// `max(tat_ns, now) - now <= tolerance` and then moves `tat_ns` to
/// `max(tat_ns, now) + interval`; otherwise it is dropped and `tat_ns`
/// stays. With `interval = 60 s / limit` and `tolerance = (limit - 1) *
/// interval`, a burst of exactly `limit` SYNs passes from a full bucket,
/// and a token comes back every `interval`. A bucket is full again (and
/// can be forgotten) once `tat_ns <= now`: at most 60 s after its last SYN.
///
/// Clients are keyed by [`RateKey`]: IPv4 (and IPv4-mapped IPv6) by /32,
/// IPv6 by the configured prefix. The table (`SG_RATE`) is a preallocated
/// hash with no eviction: a flood of new sources can fill it but never push
/// a known client out. While it is full, a new client is charged to the
/// one shared overflow bucket (`SG_RATE_OVF`), so new sources fail closed
/// together while known clients keep their own buckets; the daemon deletes
/// full buckets every few seconds.
pub mod rate {
    /// One minute in nanoseconds: the refill period of a whole bucket.
    pub const MINUTE_NS: u64 = 60_000_000_000;
    /// Default of `rate_limit.table_size`, in clients.
    pub const DEFAULT_TABLE_SIZE: u32 = 1 << 17;
    /// `RateKey::family` of an IPv4 client.
    pub const FAMILY_V4: u32 = 4;
    /// `RateKey::family` of an IPv6 client group.
    pub const FAMILY_V6: u32 = 6;
    /// Size of the event ring buffer in bytes (a power of two, at least a
    /// page): 4096 events of 48 bytes (8 bytes of ring header each).
    pub const EVENT_RING_BYTES: u32 = 1 << 18;

    /// Key of `SG_RATE`: a client.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct RateKey {
        /// [`FAMILY_V4`] or [`FAMILY_V6`].
        pub family: u32,
        /// The address (IPv4: word 0, the rest 0) or the IPv6 prefix with
        /// the host bits zero, in network byte order as native-endian words.
        pub addr: [u32; 4],
    }

    /// Value of `SG_RATE` and of `SG_RATE_OVF`'s one element.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct RateBucket {
        /// When the bucket is full again, `bpf_ktime_get_coarse_ns` time
        /// (CLOCK_MONOTONIC_COARSE). Updated by compare-and-swap.
        pub tat_ns: u64,
        /// When the last [`RateEvent`] of this bucket was sent (0: never);
        /// at most one per `MINUTE_NS`. Updated by compare-and-swap.
        pub event_ns: u64,
    }

    /// "A client went over the limit": the first drop of a bucket in each
    /// minute, sent through `SG_RATE_EVENTS`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RateEvent {
        /// The client (or, with `overflow` 1, the first new client charged
        /// to the full table's shared bucket).
        pub key: RateKey,
        /// 1 when the drop was charged to the overflow bucket.
        pub overflow: u32,
        /// The limit in force, SYNs per minute.
        pub limit: u32,
        /// Prefix length of `key` (32 for IPv4).
        pub prefix_len: u32,
        /// When, `bpf_ktime_get_coarse_ns` time.
        pub at_ns: u64,
    }
}

/// Everything the program keeps per CPU: element 0 of the per-CPU `SG_CPU`
/// ([`map_names::CPU_STATE`]). One record, so that a judged SYN finds its
/// counter, its pending hit and the drop-log window with one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuState {
    /// Outcome counters, indexed by [`slot`]; userspace sums them over the
    /// CPUs and derives the [`counter`] totals.
    pub counters: [u64; slot::SLOT_COUNT as usize],
    /// Hits not yet added to `SG_HITS`.
    pub pending: HitPending,
    /// The drop-event rate limiter.
    pub log: LogWindow,
}

/// State of the drop-event rate limiter: [`CpuState::log`] in the
/// production program (the frozen `trie-reference` program keeps one
/// shared element of its own map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogWindow {
    /// Start of the current one-second window, `bpf_ktime_get_coarse_ns`
    /// nanoseconds (`bpf_ktime_get_ns` in `trie-reference`).
    pub start_ns: u64,
    /// Events logged in the current window.
    pub logged: u64,
    /// The kernel tick (`bpf_jiffies64`) at which the program last read the
    /// clock: within one tick a full window suppresses with no clock read
    /// (unused by `trie-reference`).
    pub tick: u64,
}

/// Hits of one CPU not yet added to `SG_HITS`: [`CpuState::pending`].
///
/// A flood from one source hits the same entry packet after packet, so the
/// program counts into this per-CPU record and adds `count` to the shared
/// `SG_HITS[rule_id]` (one atomic add) only when a packet hits a different
/// entry. An entry's hits are therefore `SG_HITS[id]` plus the `count` of
/// every CPU whose `rule_id` is `id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HitPending {
    /// The entry hit last on this CPU (0: none yet).
    pub rule_id: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
    /// Hits of `rule_id` on this CPU not yet in `SG_HITS`.
    pub count: u64,
}

/// The verdict counters operators see (`stats`, `/metrics`, the log line),
/// indexed like [`COUNTER_NAMES`].
///
/// Invariant, per packet: `PACKETS` goes up by one, and so does exactly one
/// of `DROP_DENY_LIST`, `DROP_NOT_PERMITTED`, `DROP_RATE_LIMIT` or one
/// `PASS_*` counter (`WOULD_DROP` counts as a pass reason). `PASSED` is the
/// sum of the pass reasons, so `PACKETS = DROP_DENY_LIST +
/// DROP_NOT_PERMITTED + DROP_RATE_LIMIT + PASSED`.
///
/// The production program counts each packet once, in the [`slot`] of its
/// outcome (one of those reasons) and family; userspace derives `PACKETS`,
/// `SYN*`, `DROP_V4`/`DROP_V6`, `PASSED` and `LOG_SUPPRESSED` from the
/// slots, so the invariant holds by construction. The frozen
/// `trie-reference` program still increments these indices directly.
pub mod counter {
    /// Every packet the program saw.
    pub const PACKETS: u32 = 0;
    /// New-connection SYNs to a guarded port (IPv4 and IPv6).
    pub const SYN: u32 = 1;
    /// ... of which IPv4 (including IPv4-mapped IPv6 sources).
    pub const SYN_V4: u32 = 2;
    /// ... of which IPv6.
    pub const SYN_V6: u32 = 3;
    /// SYNs dropped because the most specific matching entry is a deny entry.
    pub const DROP_DENY_LIST: u32 = 4;
    /// SYNs dropped in deny-all mode because no permit entry matched.
    pub const DROP_NOT_PERMITTED: u32 = 5;
    /// Drops of IPv4 SYNs (every drop reason).
    pub const DROP_V4: u32 = 6;
    /// Drops of IPv6 SYNs (every drop reason).
    pub const DROP_V6: u32 = 7;
    /// Monitor mode: SYNs that enforcement would have dropped (passed).
    pub const WOULD_DROP: u32 = 8;
    /// Every packet passed, for any reason.
    pub const PASSED: u32 = 9;
    /// Pass: not IPv4/IPv6 (ARP, LLDP, ...).
    pub const PASS_NOT_IP: u32 = 10;
    /// Pass: IP, but not TCP (ICMP, NDP, UDP, ...).
    pub const PASS_NOT_TCP: u32 = 11;
    /// Pass: TCP to a port that is not guarded.
    pub const PASS_OTHER_PORT: u32 = 12;
    /// Pass: TCP to a guarded port, but not a new-connection SYN.
    pub const PASS_NOT_SYN: u32 = 13;
    /// Pass: a SYN the policy permits.
    pub const PASS_PERMITTED: u32 = 14;
    /// Pass: malformed or truncated header at any layer.
    pub const PASS_MALFORMED: u32 = 15;
    /// Pass: more than two VLAN tags.
    pub const PASS_VLAN_DEPTH: u32 = 16;
    /// Pass: IPv6 extension-header chain longer than the program walks.
    pub const PASS_IPV6_CHAIN: u32 = 17;
    /// Pass: a non-first fragment (never parsed as TCP).
    pub const PASS_FRAGMENT: u32 = 18;
    /// Pass: a SYN while enforcement is off.
    pub const PASS_FILTER_OFF: u32 = 19;
    /// Pass: IPsec ESP; the transport header is encrypted.
    pub const PASS_ESP: u32 = 20;
    /// Drop events not logged because of the rate limit (not a verdict;
    /// nothing is counted when the rate is 0, i.e. logging is off).
    pub const LOG_SUPPRESSED: u32 = 21;
    /// SYNs dropped because their client was over the SYN rate limit
    /// (see [`super::rate`]); only SYNs the lists let through are charged.
    pub const DROP_RATE_LIMIT: u32 = 22;
}

/// Number of verdict counters ([`COUNTER_NAMES`]).
pub const COUNTER_COUNT: u32 = 23;

/// Counter names for logs and metrics, indexed like [`counter`].
pub const COUNTER_NAMES: [&str; COUNTER_COUNT as usize] = [
    "packets",
    "syn",
    "syn_v4",
    "syn_v6",
    "drop_deny_list",
    "drop_not_permitted",
    "drop_v4",
    "drop_v6",
    "would_drop",
    "passed",
    "pass_not_ip",
    "pass_not_tcp",
    "pass_other_port",
    "pass_not_syn",
    "pass_permitted",
    "pass_malformed",
    "pass_vlan_depth",
    "pass_ipv6_chain",
    "pass_fragment",
    "pass_filter_off",
    "pass_esp",
    "log_suppressed",
    "drop_rate_limit",
];

/// Layout of the production program's per-CPU [`CpuState::counters`]: one slot per
/// (outcome, family, logging on), plus [`slot::LOGGED`].
///
/// The outcome is a terminal [`counter`] index: a drop reason, `WOULD_DROP`
/// or a `PASS_*` reason (the other indices stay unused). The family is that
/// of a judged SYN's source (IPv4-mapped IPv6 sources are IPv4); packets
/// that are not judged SYNs count as family 0. "Logging on" is whether
/// `log_rate_per_sec` was non-zero, so that suppressed log events can be
/// derived without a write on the suppressed path:
/// `LOG_SUPPRESSED = drop events with logging on - LOGGED`.
pub mod slot {
    use super::COUNTER_COUNT;

    /// Family 0: IPv4 (or not a judged SYN).
    pub const FAMILY_V4: u32 = 0;
    /// Family 1: IPv6.
    pub const FAMILY_V6: u32 = 1;

    /// Slot of `outcome` (a [`super::counter`] index) for `family`
    /// (`FAMILY_V4`/`FAMILY_V6`) and `log_on` (0 or 1).
    #[inline(always)]
    pub const fn index(outcome: u32, family: u32, log_on: u32) -> u32 {
        outcome + COUNTER_COUNT * (family + 2 * log_on)
    }

    /// Drop events written to the log (not a verdict; counted in addition
    /// to the packet's outcome, at most the log rate per second per CPU).
    pub const LOGGED: u32 = COUNTER_COUNT * 4;

    /// Number of slots in [`super::CpuState::counters`].
    pub const SLOT_COUNT: u32 = LOGGED + 1;
}

/// How deep the program walks IPv6 extension headers before giving up
/// (the chain then passes, counted as `PASS_IPV6_CHAIN`).
pub const IPV6_MAX_EXTENSION_HEADERS: u32 = 8;

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): repr(C), Copy, no padding the compiler adds
    // (explicit `_pad` fields), valid for any bit pattern.
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Rule {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::RuntimeConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::LogWindow {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ipv4_table::Group {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::HitPending {}
    // SAFETY: see above (u64s, then two records of u64s and u32 pairs).
    unsafe impl aya::Pod for super::CpuState {}
    // SAFETY: see above (five u32, no implicit padding).
    unsafe impl aya::Pod for super::rate::RateKey {}
    // SAFETY: see above (two u64).
    unsafe impl aya::Pod for super::rate::RateBucket {}
    // SAFETY: see above (20 + 3 * 4 bytes, then a u64 at offset 32).
    unsafe impl aya::Pod for super::rate::RateEvent {}
}
