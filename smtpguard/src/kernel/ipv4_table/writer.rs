//! Puts the compiled IPv4 table into the XDP program's maps.
//!
//! - Whole lists ([`Ipv4Table::prepare`], then [`Ipv4Table::switched`] once
//!   the caller has flipped `active_generation`): compiled, then copied into
//!   the inactive generation through `mmap` (the maps are `BPF_F_MMAPABLE`).
//! - Single prefixes ([`Ipv4Table::set`]) change the active generation in
//!   place and touch only what they cover, then the per-/16 summary of
//!   the /16s they touched. A /24 whose group changes gets
//!   a new group in a free slot (copy-on-write), published with one aligned
//!   u32 store into the first level; the old slot is reused only after a
//!   grace period, when no packet can still be reading it. A prefix of /24
//!   or shorter repaints its range of the first level, one atomic store per
//!   /24 (the guarantee per-entry trie updates gave).
//!
//! When the free slots run out, `set` changes nothing and says so
//! ([`Ipv4TableError::OutOfSlots`]); the caller then writes the whole list
//! into the other generation, which compacts it.

use std::{
    collections::{BTreeMap, VecDeque},
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{fence, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::{
    maps::{Map, MapData},
    Ebpf,
};
use ipnet::Ipv4Net;
use smtpguard_common::{
    ipv4_table::{entry, Group, COMPACT, GROUP_INDEX, MAX_GROUPS, MAX_LEAVES},
    map_names,
};

use super::compile::{
    self, slash24, span24, summary_entry, sweep, BuiltGroup, Ipv4Rule, LOOK_IN_TBL24,
    TBL16_ENTRIES, TBL24_ENTRIES,
};
use crate::kernel::KernelError;

/// How long a replaced group or leaf range stays untouched: XDP runs
/// inside an RCU read section of a few microseconds, so after this no
/// packet can still be reading it.
const GRACE: Duration = Duration::from_millis(2);

/// Errors of the IPv4 table writer.
#[derive(Debug, thiserror::Error)]
pub enum Ipv4TableError {
    /// More IPv4 prefixes than the table holds.
    #[error("{count} IPv4 prefixes exceed the kernel table capacity of {max}")]
    TooManyPrefixes {
        /// Prefixes wanted.
        count: usize,
        /// The capacity.
        max: usize,
    },
    /// No free group slot or leaf range for a single-prefix change; nothing
    /// changed. Writing the whole list into the other generation compacts.
    #[error("no free IPv4 group slot or leaf range for a single-prefix change")]
    OutOfSlots,
}

/// One map's memory: mapped from the kernel, or on the heap for tests
/// (the IPv6 table maps its maps the same way).
pub(in crate::kernel) struct Region<T> {
    base: NonNull<T>,
    len: usize,
    owner: Owner<T>,
}

enum Owner<T> {
    /// The map fd, kept open while mapped; unmapped on drop.
    Map(#[allow(dead_code)] MapData, usize),
    /// Heap memory (tests).
    Heap(#[allow(dead_code)] Vec<T>),
}

// SAFETY: the memory lives as long as the Region; the kernel only reads it
// and this process writes it through `&mut Ipv4Table` alone.
unsafe impl<T> Send for Region<T> {}
// SAFETY: as for Send.
unsafe impl<T> Sync for Region<T> {}

impl<T: Copy + Default> Region<T> {
    pub(in crate::kernel) fn map(
        ebpf: &mut Ebpf,
        name: &'static str,
        len: usize,
    ) -> Result<Self, KernelError> {
        let Some(Map::Array(data)) = ebpf.take_map(name) else {
            return Err(KernelError::MissingMap(name));
        };
        let bytes = len * size_of::<T>();
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF_F_MMAPABLE array fd, shared, its whole length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(KernelError::MapMemory {
                map: name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Region {
            base: NonNull::new(ptr.cast()).ok_or(KernelError::MissingMap(name))?,
            len,
            owner: Owner::Map(data, bytes),
        })
    }

    pub(in crate::kernel) fn heap(len: usize) -> Self {
        let mut v = vec![T::default(); len];
        Region {
            base: NonNull::new(v.as_mut_ptr()).expect("vec pointer"),
            len,
            owner: Owner::Heap(v),
        }
    }

    pub(in crate::kernel) fn slice(&self) -> &[T] {
        // SAFETY: `len` elements live at `base` while self does.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) }
    }

    pub(in crate::kernel) fn slice_mut(&mut self) -> &mut [T] {
        // SAFETY: as in slice(); only for memory no packet reads (the
        // inactive generation, or slots not yet published).
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.len) }
    }
}

impl Region<u32> {
    /// One aligned u32 store that a concurrent packet sees whole; Release
    /// so that what it points to (a group and its leaves, or the first
    /// level a summary entry sends the packet to) is visible first.
    fn publish(&self, index: usize, value: u32) {
        assert!(index < self.len, "entry index {index} out of range");
        // SAFETY: in bounds (checked above), aligned, derived from the raw
        // pointer (shared memory, not a Rust reference); AtomicU32 has
        // u32's layout.
        let slot = unsafe { &*self.base.as_ptr().add(index).cast::<AtomicU32>() };
        slot.store(value, Ordering::Release);
    }
}

impl<T> Drop for Region<T> {
    fn drop(&mut self) {
        if let Owner::Map(_, bytes) = self.owner {
            // SAFETY: unmapping exactly what map() mapped.
            unsafe { libc::munmap(self.base.as_ptr().cast(), bytes) };
        }
    }
}

/// One generation's four maps.
struct Generation {
    tbl16: Region<u32>,
    tbl24: Region<u32>,
    groups: Region<Group>,
    leaves: Region<u32>,
}

impl Generation {
    fn lookup(&self, addr: Ipv4Addr) -> u32 {
        compile::lookup(
            self.tbl16.slice(),
            self.tbl24.slice(),
            self.groups.slice(),
            self.leaves.slice(),
            addr,
        )
    }
}

/// A slot given back, reusable once its grace period is over.
#[derive(Clone, Copy, Debug)]
enum Retired {
    Group(u32),
    Leaves { base: u32, len: u32 },
}

/// Free group slots and leaf ranges of the active generation.
#[derive(Debug)]
struct Slots {
    next_group: u32,
    free_groups: Vec<u32>,
    next_leaf: u32,
    /// Free leaf ranges by length (index = length, 1 to 256).
    free_leaves: Vec<Vec<u32>>,
    retired: VecDeque<(Instant, Retired)>,
}

impl Slots {
    fn after_compile(groups: usize, leaves: usize) -> Self {
        Slots {
            next_group: groups as u32,
            free_groups: Vec::new(),
            next_leaf: leaves as u32,
            free_leaves: vec![Vec::new(); 257],
            retired: VecDeque::new(),
        }
    }

    fn reclaim(&mut self, now: Instant) {
        while let Some(&(at, slot)) = self.retired.front() {
            if now.duration_since(at) < GRACE {
                break;
            }
            self.retired.pop_front();
            self.free(slot);
        }
    }

    fn free(&mut self, slot: Retired) {
        match slot {
            Retired::Group(g) => self.free_groups.push(g),
            // A compact group's empty range was never taken.
            Retired::Leaves { len: 0, .. } => {}
            Retired::Leaves { base, len } => self.free_leaves[len as usize].push(base),
        }
    }

    fn group(&mut self) -> Option<u32> {
        self.free_groups.pop().or_else(|| {
            (self.next_group < MAX_GROUPS).then(|| {
                self.next_group += 1;
                self.next_group - 1
            })
        })
    }

    fn leaves(&mut self, len: u32) -> Option<u32> {
        if len == 0 {
            // A compact group: no leaves.
            return Some(0);
        }
        self.free_leaves[len as usize].pop().or_else(|| {
            (self.next_leaf + len <= MAX_LEAVES).then(|| {
                self.next_leaf += len;
                self.next_leaf - len
            })
        })
    }
}

/// A /24's new content, planned before anything is written.
struct Planned {
    slash24: u32,
    built: BuiltGroup,
}

/// The writer. See the module docs.
pub struct Ipv4Table {
    generations: [Generation; 2],
    active: usize,
    /// The rules in force, sorted as the sweep wants them.
    rules: BTreeMap<Ipv4Net, u32>,
    slots: Slots,
    /// Prefix capacity.
    capacity: usize,
    /// /16s the active generation's summary settles (see
    /// [`compile::summarize`]).
    settled: usize,
    /// A whole list written into the inactive generation, waiting for the
    /// switch: its rules, slots and settled /16s.
    prepared: Option<(BTreeMap<Ipv4Net, u32>, Slots, usize)>,
    /// When the last switch happened: the generation it left may still be
    /// read by a packet for [`GRACE`] after.
    switched_at: Option<Instant>,
}

impl Ipv4Table {
    /// Maps the eight maps of both generations; `capacity` is the most IPv4
    /// prefixes a list may hold.
    pub(crate) fn take_from(
        ebpf: &mut Ebpf,
        active: usize,
        capacity: usize,
    ) -> Result<Self, KernelError> {
        let mut take = |i: usize| -> Result<Generation, KernelError> {
            Ok(Generation {
                tbl16: Region::map(ebpf, map_names::TBL16_V4[i], TBL16_ENTRIES)?,
                tbl24: Region::map(ebpf, map_names::TBL24[i], TBL24_ENTRIES)?,
                groups: Region::map(ebpf, map_names::GROUPS4[i], MAX_GROUPS as usize)?,
                leaves: Region::map(ebpf, map_names::LEAVES4[i], MAX_LEAVES as usize)?,
            })
        };
        let generations = [take(0)?, take(1)?];
        Ok(Self::with(generations, active, capacity))
    }

    /// A table on the heap, for tests of the update logic.
    pub fn in_memory(capacity: usize) -> Self {
        let heap = || Generation {
            tbl16: Region::heap(TBL16_ENTRIES),
            tbl24: Region::heap(TBL24_ENTRIES),
            groups: Region::heap(MAX_GROUPS as usize),
            leaves: Region::heap(MAX_LEAVES as usize),
        };
        Self::with([heap(), heap()], 0, capacity)
    }

    fn with(generations: [Generation; 2], active: usize, capacity: usize) -> Self {
        Ipv4Table {
            generations,
            active,
            rules: BTreeMap::new(),
            slots: Slots::after_compile(0, 0),
            capacity,
            // Fresh maps are zeroed: every /16 settled on "no entry".
            settled: TBL16_ENTRIES,
            prepared: None,
            switched_at: None,
        }
    }

    /// Prefixes in force.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no prefix is in force.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The prefix capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The entry the active generation holds for `addr`, as the XDP
    /// program reads it (decode with [`compile::decode`]).
    pub fn lookup(&self, addr: Ipv4Addr) -> u32 {
        self.generations[self.active].lookup(addr)
    }

    /// Compiles `rules` and writes them into the inactive generation; the
    /// active one is untouched. The caller then flips `active_generation`
    /// and calls [`Ipv4Table::switched`] (or [`Ipv4Table::abandon`]).
    /// Returns whether the program should read this generation's per-/16
    /// summary first (`RuntimeConfig::v4_summary`, see
    /// [`compile::summary_pays`]).
    ///
    /// # Errors
    ///
    /// [`Ipv4TableError::TooManyPrefixes`] beyond the capacity; nothing was written.
    pub fn prepare(&mut self, rules: &[Ipv4Rule]) -> Result<bool, Ipv4TableError> {
        let rules = compile::normalize(rules);
        if rules.len() > self.capacity {
            return Err(Ipv4TableError::TooManyPrefixes {
                count: rules.len(),
                max: self.capacity,
            });
        }
        // The inactive generation was in force until the last switch: a
        // packet that read the old generation number may still be in it.
        if let Some(at) = self.switched_at {
            let left = GRACE.saturating_sub(at.elapsed());
            if !left.is_zero() {
                std::thread::sleep(left);
            }
        }
        let next = &mut self.generations[1 - self.active];
        // The first level is compiled in place: no packet reads the
        // inactive generation, and an error below leaves it inactive.
        let (groups, leaves) = compile::compile_into(&rules, next.tbl24.slice_mut());
        // Cannot happen within MAX_PREFIXES_PER_FAMILY (see MAX_LEAVES).
        if groups.len() > MAX_GROUPS as usize || leaves.len() > MAX_LEAVES as usize {
            return Err(Ipv4TableError::OutOfSlots);
        }
        next.groups.slice_mut()[..groups.len()].copy_from_slice(&groups);
        next.leaves.slice_mut()[..leaves.len()].copy_from_slice(&leaves);
        let settled = compile::summarize(next.tbl24.slice(), next.tbl16.slice_mut());
        fence(Ordering::Release);
        let map = rules.iter().map(|r| (r.prefix, r.entry)).collect();
        let slots = Slots::after_compile(groups.len(), leaves.len());
        self.prepared = Some((map, slots, settled));
        Ok(compile::summary_pays(settled))
    }

    /// Whether the program should read the active generation's summary
    /// first (see [`compile::summary_pays`]); single changes move it.
    pub fn summary_pays(&self) -> bool {
        compile::summary_pays(self.settled)
    }

    /// The caller switched to the generation [`Ipv4Table::prepare`] wrote.
    pub fn switched(&mut self) {
        if let Some((rules, slots, settled)) = self.prepared.take() {
            self.rules = rules;
            self.slots = slots;
            self.settled = settled;
            self.active = 1 - self.active;
            self.switched_at = Some(Instant::now());
        }
    }

    /// The switch did not happen; the prepared generation is forgotten.
    pub fn abandon(&mut self) {
        self.prepared = None;
    }

    /// Installs (`Some(entry)`) or removes (`None`) one prefix in the
    /// active generation, in force when this returns.
    ///
    /// # Errors
    ///
    /// [`Ipv4TableError::TooManyPrefixes`] for a new prefix beyond the
    /// capacity, [`Ipv4TableError::OutOfSlots`]; either way nothing changed.
    pub fn set(&mut self, prefix: Ipv4Net, new: Option<u32>) -> Result<(), Ipv4TableError> {
        let prefix = prefix.trunc();
        let old = self.rules.get(&prefix).copied();
        if old == new {
            return Ok(());
        }
        if old.is_none() && self.rules.len() >= self.capacity {
            return Err(Ipv4TableError::TooManyPrefixes {
                count: self.rules.len() + 1,
                max: self.capacity,
            });
        }
        match new {
            Some(e) => self.rules.insert(prefix, e),
            None => self.rules.remove(&prefix),
        };
        let result = if prefix.prefix_len() <= 24 {
            self.repaint(prefix)
        } else {
            self.regroup(slash24(&prefix))
        };
        if result.is_err() {
            match old {
                Some(e) => self.rules.insert(prefix, e),
                None => self.rules.remove(&prefix),
            };
        }
        result
    }

    /// The entry of /24 `x` from the prefixes of /24 or shorter.
    fn short_entry(&self, x: u32) -> u32 {
        (0..=24u8)
            .rev()
            .find_map(|len| {
                let net = Ipv4Net::new(Ipv4Addr::from(x << 8), len).ok()?.trunc();
                self.rules.get(&net).copied()
            })
            .unwrap_or(entry::NONE)
    }

    /// The prefixes longer than /24 inside /24s `[from, to)`, in order.
    fn longs(&self, from: u32, to: u32) -> Vec<Ipv4Rule> {
        let lo = Ipv4Net::new(Ipv4Addr::from(from << 8), 0).expect("len 0");
        let hi = Ipv4Net::new(Ipv4Addr::from(((to - 1) << 8) | 0xff), 32).expect("len 32");
        self.rules
            .range(lo..=hi)
            .filter(|(p, _)| p.prefix_len() > 24)
            .map(|(&prefix, &entry)| Ipv4Rule { prefix, entry })
            .collect()
    }

    /// Rebuilds the one /24 a prefix longer than /24 is in.
    fn regroup(&mut self, x: u32) -> Result<(), Ipv4TableError> {
        let longs = self.longs(x, x + 1);
        let base = self.short_entry(x);
        if longs.is_empty() {
            self.write(&[], &[(x, x + 1, base)])
        } else {
            let built = BuiltGroup::new(base, &longs);
            self.write(&[Planned { slash24: x, built }], &[])
        }
    }

    /// Repaints the range of a prefix of /24 or shorter.
    fn repaint(&mut self, prefix: Ipv4Net) -> Result<(), Ipv4TableError> {
        let from = slash24(&prefix);
        let to = from + (1u32 << (24 - prefix.prefix_len()));
        // What covers the range from outside: the longest shorter prefix.
        let outside = (0..prefix.prefix_len())
            .rev()
            .find_map(|len| {
                let net = Ipv4Net::new(prefix.network(), len).ok()?.trunc();
                self.rules.get(&net).copied()
            })
            .unwrap_or(entry::NONE);
        let last = Ipv4Net::new(prefix.broadcast(), 24)
            .expect("len 24")
            .trunc();
        let inside: Vec<_> = self
            .rules
            .range(prefix..=last)
            .filter(|(p, _)| p.prefix_len() <= 24)
            .map(|(&prefix, &entry)| span24(&Ipv4Rule { prefix, entry }))
            .collect();
        let mut plain = Vec::new();
        sweep(&inside, from, to, outside, |lo, hi, v| {
            plain.push((lo, hi, v))
        });
        let longs = self.longs(from, to);
        let mut planned = Vec::new();
        for chunk in longs.chunk_by(|a, b| slash24(&a.prefix) == slash24(&b.prefix)) {
            let x = slash24(&chunk[0].prefix);
            let seg = plain.partition_point(|&(_, hi, _)| hi <= x);
            let built = BuiltGroup::new(plain[seg].2, chunk);
            planned.push(Planned { slash24: x, built });
        }
        self.write(&planned, &plain)
    }

    /// Allocates every slot `planned` needs (or none and fails), writes the
    /// groups and leaves, then publishes: plain entries for the /24s of
    /// `plain` that get no group, group entries for the planned ones.
    fn write(
        &mut self,
        planned: &[Planned],
        plain: &[(u32, u32, u32)],
    ) -> Result<(), Ipv4TableError> {
        let slots = self.allocate(planned)?;
        let active = &mut self.generations[self.active];
        for (p, &(g, base)) in planned.iter().zip(&slots) {
            let built = &p.built;
            active.groups.slice_mut()[g as usize] = if built.compact {
                built.group
            } else {
                active.leaves.slice_mut()[base as usize..][..built.leaves.len()]
                    .copy_from_slice(&built.leaves);
                Group {
                    base,
                    ..built.group
                }
            };
        }
        fence(Ordering::Release);
        let mut retired = Vec::new();
        let store = |x: u32, value: u32, retired: &mut Vec<Retired>| {
            let old = active.tbl24.slice()[x as usize];
            active.tbl24.publish(x as usize, value);
            if old >> entry::KIND_SHIFT == entry::GROUP {
                let g = old & GROUP_INDEX;
                retired.push(Retired::Group(g));
                // A compact group has no leaves.
                if old & COMPACT == 0 {
                    let group = active.groups.slice()[g as usize];
                    let len: u32 = group.bitmap.iter().map(|w| w.count_ones()).sum();
                    retired.push(Retired::Leaves {
                        base: group.base,
                        len,
                    });
                }
            }
        };
        let mut next = planned.iter().map(|p| p.slash24).peekable();
        for &(lo, hi, v) in plain {
            for x in lo..hi {
                if next.peek() == Some(&x) {
                    next.next();
                    continue;
                }
                store(x, v, &mut retired);
            }
        }
        for (p, &(g, _)) in planned.iter().zip(&slots) {
            store(p.slash24, p.built.entry(g), &mut retired);
        }
        // The summary last: a /16 it settled stays settled on its old
        // entry (the old verdict) until every /24 under it is written.
        let mut touched: Vec<u32> = plain
            .iter()
            .flat_map(|&(lo, hi, _)| (lo >> 8)..=((hi - 1) >> 8))
            .chain(planned.iter().map(|p| p.slash24 >> 8))
            .collect();
        touched.sort_unstable();
        touched.dedup();
        for y in touched {
            let y = y as usize;
            let summary = summary_entry(&active.tbl24.slice()[y * 256..][..256]);
            let old = active.tbl16.slice()[y];
            if old != summary {
                active.tbl16.publish(y, summary);
                if old == LOOK_IN_TBL24 {
                    self.settled += 1;
                } else if summary == LOOK_IN_TBL24 {
                    self.settled -= 1;
                }
            }
        }
        let now = Instant::now();
        self.slots
            .retired
            .extend(retired.into_iter().map(|r| (now, r)));
        Ok(())
    }

    /// Takes every free group slot of the generation in force, as a table
    /// after a long run of single changes: the next change that needs a
    /// group gets [`Ipv4TableError::OutOfSlots`] (tests of the fallback).
    #[cfg(any(test, feature = "test-support"))]
    pub fn use_up_slots(&mut self) {
        self.slots.next_group = MAX_GROUPS;
        self.slots.free_groups.clear();
        self.slots.retired.clear();
    }

    /// A group slot and a leaf range for each planned /24, or nothing.
    fn allocate(&mut self, planned: &[Planned]) -> Result<Vec<(u32, u32)>, Ipv4TableError> {
        self.slots.reclaim(Instant::now());
        match self.try_allocate(planned) {
            Some(s) => Ok(s),
            None if !self.slots.retired.is_empty() => {
                // Wait out the grace period of what was given back last.
                std::thread::sleep(GRACE);
                self.slots.reclaim(Instant::now());
                self.try_allocate(planned).ok_or(Ipv4TableError::OutOfSlots)
            }
            None => Err(Ipv4TableError::OutOfSlots),
        }
    }

    fn try_allocate(&mut self, planned: &[Planned]) -> Option<Vec<(u32, u32)>> {
        let mut got = Vec::with_capacity(planned.len());
        for p in planned {
            let len = p.built.leaves.len() as u32;
            let g = self.slots.group();
            let base = self.slots.leaves(len);
            match (g, base) {
                (Some(g), Some(base)) => got.push((g, base)),
                (g, base) => {
                    // Give back what was taken: nothing was written yet.
                    if let Some(g) = g {
                        self.slots.free(Retired::Group(g));
                    }
                    if let Some(base) = base {
                        self.slots.free(Retired::Leaves { base, len });
                    }
                    for (i, &(g, base)) in got.iter().enumerate() {
                        self.slots.free(Retired::Group(g));
                        let len = planned[i].built.leaves.len() as u32;
                        self.slots.free(Retired::Leaves { base, len });
                    }
                    return None;
                }
            }
        }
        Some(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::ipv4_table::compile::{compile, leaf_entry};
    use proptest::prelude::*;
    use smtpguard_common::Action;

    fn arb_change() -> impl Strategy<Value = (Ipv4Net, Option<u32>)> {
        (any::<u32>(), 14u8..=32, 0u8..3, 1u32..32).prop_map(|(bits, len, what, id)| {
            let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) | (bits & 0x3ff);
            let net = Ipv4Net::new(base.into(), len).unwrap().trunc();
            let e = match what {
                0 => None,
                1 => Some(leaf_entry(Action::Permit, id)),
                _ => Some(leaf_entry(Action::Deny, id)),
            };
            (net, e)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]

        /// Single-prefix changes in place give the table a whole compile
        /// of the same set gives, for every address they touch.
        #[test]
        fn single_changes_equal_a_whole_compile(
            start in proptest::collection::vec(arb_change(), 0..20),
            changes in proptest::collection::vec(arb_change(), 1..30),
        ) {
            let mut table = Ipv4Table::in_memory(1 << 20);
            let initial: Vec<Ipv4Rule> = start.iter().filter_map(|(p, e)| e.map(|entry| Ipv4Rule { prefix: *p, entry })).collect();
            table.prepare(&initial).unwrap();
            table.switched();
            for (p, e) in &changes {
                table.set(*p, *e).unwrap();
            }
            let set: Vec<Ipv4Rule> = table.rules.iter().map(|(&prefix, &entry)| Ipv4Rule { prefix, entry }).collect();
            let whole = compile(&set);
            let base = u32::from(Ipv4Addr::new(198, 17, 255, 0));
            for a in base..base + 0x600 {
                let a = Ipv4Addr::from(a);
                prop_assert_eq!(table.lookup(a), compile::lookup(&whole.tbl16, &whole.tbl24, &whole.groups, &whole.leaves, a), "{}", a);
            }
            // The summary kept up: every /16 as a fresh summary has it.
            let active = &table.generations[table.active];
            let mut fresh = vec![0; TBL16_ENTRIES];
            let settled = compile::summarize(active.tbl24.slice(), &mut fresh);
            prop_assert_eq!(active.tbl16.slice(), &fresh[..]);
            prop_assert_eq!(table.settled, settled);
        }
    }

    #[test]
    fn a_group_turns_dense_and_compact_again_and_gives_back_its_slots() {
        let mut table = Ipv4Table::in_memory(1 << 20);
        let net = |h: u32| Ipv4Net::new(Ipv4Addr::new(192, 0, 2, h as u8), 32).unwrap();
        let hosts = [10u32, 30, 50, 70];
        let check = |table: &Ipv4Table| {
            let set: Vec<Ipv4Rule> = table
                .rules
                .iter()
                .map(|(&prefix, &entry)| Ipv4Rule { prefix, entry })
                .collect();
            let whole = compile(&set);
            for h in 0..256u32 {
                let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 0, 2, 0)) + h);
                assert_eq!(
                    table.lookup(a),
                    compile::lookup(&whole.tbl16, &whole.tbl24, &whole.groups, &whole.leaves, a),
                    "{a}"
                );
            }
        };
        let slash24 = |table: &Ipv4Table| {
            table.generations[table.active].tbl24.slice()
                [(u32::from(Ipv4Addr::new(192, 0, 2, 0)) >> 8) as usize]
        };
        // Three /32s: seven runs, compact; the fourth makes nine, dense.
        for (i, &h) in hosts.iter().enumerate() {
            table
                .set(net(h), Some(leaf_entry(Action::Deny, h)))
                .unwrap();
            check(&table);
            assert_eq!(
                slash24(&table) & COMPACT != 0,
                i < 3,
                "after {} /32s",
                i + 1
            );
        }
        // And back: compact again after the first removal, none at the end.
        for &h in &hosts {
            table.set(net(h), None).unwrap();
            check(&table);
        }
        assert_eq!(slash24(&table), entry::NONE);
        // Every slot given back exactly once: whatever was taken (slots
        // are reused as they come back) is free again, none twice.
        std::thread::sleep(GRACE);
        table.slots.reclaim(Instant::now());
        let mut groups = table.slots.free_groups.clone();
        groups.sort_unstable();
        groups.dedup();
        assert_eq!(
            groups.len(),
            table.slots.free_groups.len(),
            "a group slot freed twice"
        );
        assert_eq!(groups.len(), table.slots.next_group as usize);
        let free_leaves: usize = (0..table.slots.free_leaves.len())
            .map(|len| len * table.slots.free_leaves[len].len())
            .sum();
        assert_eq!(free_leaves, table.slots.next_leaf as usize);
        assert_eq!(
            table.slots.free_leaves[9].len(),
            1,
            "the dense group's leaves"
        );
    }

    #[test]
    fn single_changes_move_the_summary_flag_both_ways() {
        let mut table = Ipv4Table::in_memory(1 << 20);
        assert!(table.summary_pays(), "fresh maps: every /16 settled");
        let deny = leaf_entry(Action::Deny, 1);
        // One /24 in each of just over half the /16s unsettles them.
        let nets: Vec<Ipv4Net> = (0..=TBL16_ENTRIES as u32 / 2)
            .map(|y| Ipv4Net::new(Ipv4Addr::from(y << 16), 24).unwrap())
            .collect();
        for n in &nets {
            table.set(*n, Some(deny)).unwrap();
        }
        assert_eq!(table.settled, TBL16_ENTRIES / 2 - 1);
        assert!(!table.summary_pays());
        for n in &nets {
            table.set(*n, None).unwrap();
        }
        assert_eq!(table.settled, TBL16_ENTRIES);
        assert!(table.summary_pays());
    }

    #[test]
    fn capacity_and_slot_exhaustion_change_nothing() {
        let mut table = Ipv4Table::in_memory(2);
        let deny = leaf_entry(Action::Deny, 1);
        table
            .set("192.0.2.1/32".parse().unwrap(), Some(deny))
            .unwrap();
        table
            .set("192.0.2.0/24".parse().unwrap(), Some(deny))
            .unwrap();
        let err = table
            .set("198.51.100.0/24".parse().unwrap(), Some(deny))
            .unwrap_err();
        assert!(
            matches!(err, Ipv4TableError::TooManyPrefixes { count: 3, max: 2 }),
            "{err}"
        );
        assert_eq!(table.lookup("198.51.100.1".parse().unwrap()), entry::NONE);
        // Every slot taken: the change fails whole and the old entry stays.
        table.capacity = 10;
        table.slots = Slots {
            next_group: MAX_GROUPS,
            ..Slots::after_compile(0, 0)
        };
        let err = table
            .set("192.0.2.2/32".parse().unwrap(), Some(deny))
            .unwrap_err();
        assert!(matches!(err, Ipv4TableError::OutOfSlots), "{err}");
        assert_eq!(table.len(), 2);
        assert_eq!(table.lookup("192.0.2.2".parse().unwrap()), deny);
        assert_eq!(table.lookup("192.0.2.1".parse().unwrap()), deny);
    }
}
