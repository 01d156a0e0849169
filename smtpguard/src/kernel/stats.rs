//! Reads the XDP program's verdict counters and per-entry hit counters.
//!
//! The program counts each packet once, in the slot of its outcome and
//! family (`smtpguard_common::slot`); the totals operators see
//! ([`CounterSnapshot`], named by `COUNTER_NAMES`) are derived here.

use std::sync::Arc;

use smtpguard_common::{counter, slot, COUNTER_COUNT, COUNTER_NAMES};

use super::{cpu_state::CpuStates, hits::HitsMapping};

/// Totals of every verdict counter over all CPUs, indexed like
/// `smtpguard_common::counter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterSnapshot(pub [u64; COUNTER_COUNT as usize]);

impl CounterSnapshot {
    /// The value of counter `index` (a `smtpguard_common::counter` constant).
    pub fn get(&self, index: u32) -> u64 {
        self.0[index as usize]
    }

    /// `(name, value)` pairs in index order, names from `COUNTER_NAMES`.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        COUNTER_NAMES.iter().copied().zip(self.0.iter().copied())
    }

    /// Counter-wise `self - earlier` (counters only grow; saturates if the
    /// program was reloaded in between).
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        let mut out = [0; COUNTER_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.0[i].saturating_sub(earlier.0[i]);
        }
        CounterSnapshot(out)
    }

    /// SYNs dropped, every reason.
    pub fn dropped(&self) -> u64 {
        self.get(counter::DROP_DENY_LIST)
            + self.get(counter::DROP_NOT_PERMITTED)
            + self.get(counter::DROP_RATE_LIMIT)
    }
}

/// How many whole reads [`Stats::counters`] makes at most while looking for
/// two that agree.
pub const SNAPSHOT_TRIES: usize = 16;

/// Reader of the outcome counters (in each CPU's record) and the hit
/// counters.
pub struct Stats {
    cpus: Arc<CpuStates>,
    hits: Arc<HitsMapping>,
}

impl Stats {
    pub(crate) fn new(cpus: Arc<CpuStates>, hits: Arc<HitsMapping>) -> Self {
        Stats { cpus, hits }
    }

    /// Sums every counter over all CPUs, as one snapshot that does not tear.
    ///
    /// One read copies every CPU's record, one CPU after the other, while
    /// the other CPUs go on counting: a packet judged during the read may
    /// be in the snapshot or not. The counters are therefore read until two
    /// reads in a row agree: no counter moved between them, so the second
    /// is the state at one instant (the XDP program runs without preemption, in
    /// nanoseconds, against the microseconds of a read). Under a steady flood
    /// no two reads may agree; after [`SNAPSHOT_TRIES`] reads the last one
    /// is returned, and the totals of such a read may be off by the few
    /// packets judged while it ran.
    pub fn counters(&self) -> CounterSnapshot {
        let mut last = self.read_counters();
        for _ in 1..SNAPSHOT_TRIES {
            let next = self.read_counters();
            if next == last {
                break;
            }
            last = next;
        }
        last
    }

    fn read_counters(&self) -> CounterSnapshot {
        let mut slots = [0u64; slot::SLOT_COUNT as usize];
        for cpu in self.cpus.read() {
            for (total, value) in slots.iter_mut().zip(cpu.counters) {
                *total += value;
            }
        }
        derive_totals(&slots)
    }

    /// Hits of one rule id (0 for ids out of range), pending ones included.
    pub fn hits(&self, rule_id: u32) -> u64 {
        self.hits.get(rule_id)
    }

    /// Every rule id with a non-zero hit count, as `(rule_id, hits)`,
    /// ascending by rule id.
    pub fn all_hits(&self) -> Vec<(u32, u64)> {
        self.hits.nonzero()
    }
}

/// The totals of [`counter`] from the per-CPU outcome slots (each summed
/// over CPUs). See `smtpguard_common::slot` for the layout.
fn derive_totals(slots: &[u64; slot::SLOT_COUNT as usize]) -> CounterSnapshot {
    use counter::*;
    let at = |outcome: u32, family: u32, log_on: u32| {
        slots[slot::index(outcome, family, log_on) as usize]
    };
    let mut out = [0u64; COUNTER_COUNT as usize];
    let mut logged_events = 0u64;
    for outcome in 0..COUNTER_COUNT {
        for family in [slot::FAMILY_V4, slot::FAMILY_V6] {
            for log_on in [0, 1] {
                let n = at(outcome, family, log_on);
                if n == 0 {
                    continue;
                }
                out[outcome as usize] += n;
                out[PACKETS as usize] += n;
                let judged = matches!(
                    outcome,
                    DROP_DENY_LIST
                        | DROP_NOT_PERMITTED
                        | DROP_RATE_LIMIT
                        | WOULD_DROP
                        | PASS_PERMITTED
                        | PASS_FILTER_OFF
                );
                if judged {
                    out[SYN as usize] += n;
                    let by_family = if family == slot::FAMILY_V4 {
                        SYN_V4
                    } else {
                        SYN_V6
                    };
                    out[by_family as usize] += n;
                }
                match outcome {
                    DROP_DENY_LIST | DROP_NOT_PERMITTED | DROP_RATE_LIMIT => {
                        let by_family = if family == slot::FAMILY_V4 {
                            DROP_V4
                        } else {
                            DROP_V6
                        };
                        out[by_family as usize] += n;
                    }
                    _ => out[PASSED as usize] += n,
                }
                if log_on == 1
                    && matches!(
                        outcome,
                        DROP_DENY_LIST | DROP_NOT_PERMITTED | DROP_RATE_LIMIT | WOULD_DROP
                    )
                {
                    logged_events += n;
                }
            }
        }
    }
    // Only terminal outcomes have slots; the derived indices read as zero
    // there, so the sums above counted nothing twice.
    out[LOG_SUPPRESSED as usize] = logged_events.saturating_sub(slots[slot::LOGGED as usize]);
    CounterSnapshot(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smtpguard_common::counter::*;

    fn slots(entries: &[(u32, u32, u32, u64)], logged: u64) -> [u64; slot::SLOT_COUNT as usize] {
        let mut s = [0; slot::SLOT_COUNT as usize];
        for (outcome, family, log_on, n) in entries {
            s[slot::index(*outcome, *family, *log_on) as usize] += n;
        }
        s[slot::LOGGED as usize] = logged;
        s
    }

    #[test]
    fn totals_are_derived_from_outcome_slots() {
        let (v4, v6) = (slot::FAMILY_V4, slot::FAMILY_V6);
        let c = derive_totals(&slots(
            &[
                (DROP_DENY_LIST, v4, 0, 5),
                (DROP_DENY_LIST, v6, 1, 7),
                (DROP_NOT_PERMITTED, v4, 1, 2),
                (WOULD_DROP, v6, 1, 1),
                (PASS_PERMITTED, v6, 0, 3),
                (PASS_FILTER_OFF, v4, 0, 4),
                (PASS_NOT_TCP, v4, 0, 11),
                (PASS_MALFORMED, v4, 1, 13),
                (DROP_RATE_LIMIT, v4, 1, 3),
                (DROP_RATE_LIMIT, v6, 0, 2),
            ],
            6,
        ));
        assert_eq!(c.get(PACKETS), 51);
        assert_eq!(c.get(SYN), 27);
        assert_eq!((c.get(SYN_V4), c.get(SYN_V6)), (14, 13));
        assert_eq!((c.get(DROP_V4), c.get(DROP_V6)), (10, 9));
        assert_eq!(c.get(DROP_RATE_LIMIT), 5);
        assert_eq!(c.dropped(), 19);
        assert_eq!(c.get(PASSED), 51 - 19);
        assert_eq!(c.get(WOULD_DROP), 1);
        assert_eq!(c.get(PASS_NOT_TCP), 11);
        // Drop events while logging was on: 7 + 2 + 1 + 3, of which 6 logged.
        assert_eq!(c.get(LOG_SUPPRESSED), 7);
    }
}
