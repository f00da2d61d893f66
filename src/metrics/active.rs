//! Distinct active users per bot, from HyperLogLog sketches.
//!
//! A user id is hashed with a keyed SipHash and only the hash's leading bits
//! and trailing-zero count reach a register; the id itself is dropped at once
//! and never stored. Sketches are kept per UTC hour (24 of them, for the 1d
//! window) and per UTC day (30, for 7d and 30d); a window's estimate is the
//! union of its buckets, so an estimate rolls forward as buckets expire.
//! Memory is fixed: 54 sketches of 16 KiB per bot, whatever the user count.
//!
//! The hash key and the precision are fixed so that sketches written by one
//! process (or replica) can be merged with another's after a restart.

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};

use hyperloglockless::{AtomicHyperLogLog, DefaultHasher};

use crate::event::{UserHash, UserId};

/// 2^14 registers: 0.81 % standard error, 16 KiB per sketch.
pub const PRECISION: u8 = 14;
pub const REGISTERS: usize = 1 << PRECISION;
/// The user-id hash key (see [`crate::event::UserHash`]); sketches carry it
/// so that one process's registers merge with another's.
const HASH_KEY: u128 = crate::event::USER_HASH_KEY;

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

/// The bucket sizes of the sketches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            _ => None,
        }
    }

    fn seconds(self) -> i64 {
        match self {
            Granularity::Hour => HOUR,
            Granularity::Day => DAY,
        }
    }
}

fn new_sketch() -> AtomicHyperLogLog {
    AtomicHyperLogLog::seeded(PRECISION, HASH_KEY)
}

struct Slot {
    /// The bucket number (unix seconds / bucket size) this slot holds.
    bucket: i64,
    sketch: AtomicHyperLogLog,
    /// Set by inserts that change a register, cleared by the flush that
    /// stores it, so an idle bot writes no sketch.
    dirty: AtomicBool,
}

/// A ring of sketches, one per bucket, reused as buckets expire.
struct Ring {
    granularity: Granularity,
    slots: RwLock<Vec<Slot>>,
}

impl Ring {
    fn new(granularity: Granularity, len: usize) -> Self {
        let slots = (0..len).map(|_| Slot {
            bucket: i64::MIN,
            sketch: new_sketch(),
            dirty: AtomicBool::new(false),
        });
        Ring {
            granularity,
            slots: RwLock::new(slots.collect()),
        }
    }

    fn slot_index(len: usize, bucket: i64) -> usize {
        bucket.rem_euclid(len as i64) as usize
    }

    fn insert(&self, hash: u64, ts: i64) {
        let bucket = ts.div_euclid(self.granularity.seconds());
        {
            let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
            let slot = &slots[Self::slot_index(slots.len(), bucket)];
            if slot.bucket == bucket {
                insert_marking(slot, hash);
                return;
            }
            if slot.bucket > bucket {
                // Older than the ring reaches: outside every window.
                return;
            }
        }
        // A new bucket: recycle its slot (once per hour or day per ring).
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let len = slots.len();
        let slot = &mut slots[Self::slot_index(len, bucket)];
        if slot.bucket < bucket {
            *slot = Slot {
                bucket,
                sketch: new_sketch(),
                dirty: AtomicBool::new(false),
            };
        }
        if slot.bucket == bucket {
            insert_marking(slot, hash);
        }
    }

    /// The union of the buckets in `[now_bucket - span + 1, now_bucket]`.
    fn estimate(&self, now: i64, span: i64) -> u64 {
        let now_bucket = now.div_euclid(self.granularity.seconds());
        let union = new_sketch();
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        for slot in slots
            .iter()
            .filter(|s| s.bucket > now_bucket - span && s.bucket <= now_bucket)
        {
            // Same precision by construction, so union cannot fail.
            let _ = union.union(&slot.sketch);
        }
        // Rounded, not truncated: the crate's count() truncates, which
        // reads one user as zero.
        union.raw_count().round() as u64
    }
}

fn insert_marking(slot: &Slot, hash: u64) {
    // The register sum changes exactly when a register does; marking only
    // then keeps a repeat visitor from causing a write.
    let before = slot.sketch.parts().3;
    slot.sketch.insert_hash(hash);
    if !slot.dirty.load(Relaxed) && slot.sketch.parts().3 != before {
        slot.dirty.store(true, Relaxed);
    }
}

/// One stored sketch: which bucket, and its registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SketchRow {
    pub granularity: Granularity,
    pub bucket: i64,
    pub registers: Vec<u8>,
}

pub struct ActiveUsers {
    hourly: Ring,
    daily: Ring,
}

impl Default for ActiveUsers {
    fn default() -> Self {
        Self::new()
    }
}

impl ActiveUsers {
    pub fn new() -> Self {
        ActiveUsers {
            hourly: Ring::new(Granularity::Hour, 24),
            daily: Ring::new(Granularity::Day, 30),
        }
    }

    /// Counts a user as active at `ts` (unix seconds). The id is hashed
    /// once and dropped.
    pub fn insert(&self, user: &UserId<'_>, ts: i64) {
        self.insert_hashed(user.hash(), ts);
    }

    /// Counts an already hashed user as active at `ts` (unix seconds).
    pub fn insert_hashed(&self, user: UserHash, ts: i64) {
        self.hourly.insert(user.0, ts);
        self.daily.insert(user.0, ts);
    }

    /// The three windows' estimates at `now`.
    pub fn estimates_at(&self, now: i64) -> [(&'static str, u64); 3] {
        [
            ("1d", self.hourly.estimate(now, 24)),
            ("7d", self.daily.estimate(now, 7)),
            ("30d", self.daily.estimate(now, 30)),
        ]
    }

    pub fn estimates(&self) -> [(&'static str, u64); 3] {
        self.estimates_at(chrono::Utc::now().timestamp())
    }

    /// The sketches changed since the last call, clearing their marks. A
    /// flush that fails hands them back with [`Self::mark_dirty`].
    pub fn take_dirty(&self) -> Vec<SketchRow> {
        let mut rows = Vec::new();
        for ring in [&self.hourly, &self.daily] {
            let slots = ring.slots.read().unwrap_or_else(|e| e.into_inner());
            for slot in slots.iter().filter(|s| s.dirty.swap(false, Relaxed)) {
                rows.push(SketchRow {
                    granularity: ring.granularity,
                    bucket: slot.bucket,
                    registers: slot.sketch.iter().collect(),
                });
            }
        }
        rows
    }

    /// Marks the given buckets changed again, after a failed flush.
    pub fn mark_dirty(&self, rows: &[SketchRow]) {
        for row in rows {
            let ring = match row.granularity {
                Granularity::Hour => &self.hourly,
                Granularity::Day => &self.daily,
            };
            let slots = ring.slots.read().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = slots.iter().find(|s| s.bucket == row.bucket) {
                slot.dirty.store(true, Relaxed);
            }
        }
    }

    /// Merges a stored sketch into its bucket (a union, so restoring twice or
    /// merging another replica's sketch never inflates the estimate).
    /// Returns false for a malformed row.
    pub fn restore(&self, row: &SketchRow) -> bool {
        if row.registers.len() != REGISTERS {
            return false;
        }
        let zeros = row.registers.iter().filter(|&&r| r == 0).count();
        let sum: f64 = row.registers.iter().map(|&r| (-f64::from(r)).exp2()).sum();
        let registers: Box<[AtomicU8]> = row.registers.iter().map(|&r| AtomicU8::new(r)).collect();
        let stored = AtomicHyperLogLog::from_parts(
            registers,
            DefaultHasher::seeded(&HASH_KEY.to_be_bytes()),
            zeros,
            sum,
        );
        let ring = match row.granularity {
            Granularity::Hour => &self.hourly,
            Granularity::Day => &self.daily,
        };
        let mut slots = ring.slots.write().unwrap_or_else(|e| e.into_inner());
        let len = slots.len();
        let slot = &mut slots[Ring::slot_index(len, row.bucket)];
        if slot.bucket < row.bucket {
            *slot = Slot {
                bucket: row.bucket,
                sketch: new_sketch(),
                dirty: AtomicBool::new(false),
            };
        }
        if slot.bucket == row.bucket {
            let _ = slot.sketch.union(&stored);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn user(n: u64) -> UserId<'static> {
        UserId::Int(n.into())
    }

    #[test]
    fn small_counts_are_exact() {
        let a = ActiveUsers::new();
        for n in 0..10 {
            a.insert(&user(n), NOW);
            a.insert(&user(n), NOW);
        }
        assert_eq!(a.estimates_at(NOW), [("1d", 10), ("7d", 10), ("30d", 10)]);
    }

    #[test]
    fn windows_roll() {
        let a = ActiveUsers::new();
        a.insert(&user(1), NOW);
        a.insert(&user(2), NOW - 2 * DAY);
        a.insert(&user(3), NOW - 10 * DAY);
        a.insert(&user(4), NOW - 40 * DAY);
        assert_eq!(a.estimates_at(NOW), [("1d", 1), ("7d", 2), ("30d", 3)]);
        // A day later user 1 has left the 1d window but not the others.
        assert_eq!(
            a.estimates_at(NOW + DAY),
            [("1d", 0), ("7d", 2), ("30d", 3)]
        );
        assert_eq!(
            a.estimates_at(NOW + 60 * DAY),
            [("1d", 0), ("7d", 0), ("30d", 0)]
        );
    }

    #[test]
    fn sketches_round_trip_without_inflating() {
        let a = ActiveUsers::new();
        for n in 0..5000 {
            a.insert(&user(n), NOW);
        }
        let rows = a.take_dirty();
        assert_eq!(rows.len(), 2, "one hourly and one daily sketch changed");
        assert!(a.take_dirty().is_empty(), "nothing changed since");
        let b = ActiveUsers::new();
        for row in &rows {
            assert!(b.restore(row));
            assert!(b.restore(row));
        }
        assert_eq!(a.estimates_at(NOW), b.estimates_at(NOW));
        a.insert(&user(1), NOW);
        assert!(
            a.take_dirty().is_empty(),
            "a repeat visitor changes no register"
        );
    }
}
