//! A ring of sketches, one per time bucket (a UTC hour or day), reused as
//! buckets expire, and the estimates of the windows that end now.
//!
//! Apart from `sketch.rs` because time is its own concern: which bucket a
//! timestamp falls in, when a slot is recycled (freeing its sketch), which
//! sketches changed since the last flush, and a cache of the windows'
//! estimates, keyed by the current bucket and by change counters bumped
//! whenever a register moves, so rendering a bot that saw no new user since
//! the last render costs a few atomic loads.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use super::sketch::{Sketch, Union};
use crate::store::{Granularity, SketchRow};

pub(super) const HOUR: i64 = 3600;
pub(super) const DAY: i64 = 86_400;

impl Granularity {
    fn seconds(self) -> i64 {
        match self {
            Granularity::Hour => HOUR,
            Granularity::Day => DAY,
        }
    }
}

struct Slot {
    /// The bucket number (unix seconds / bucket size) this slot holds.
    bucket: i64,
    sketch: Sketch,
    /// Bumped by every change to the sketch: a cached estimate that saw the
    /// same counts (and the same ring generation) is still right.
    changes: AtomicU64,
    /// Set by inserts that change a register, cleared by the flush that
    /// stores it, so an idle bot writes no sketch.
    dirty: AtomicBool,
}

impl Slot {
    fn empty(bucket: i64) -> Self {
        Slot {
            bucket,
            sketch: Sketch::default(),
            changes: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
        }
    }

    fn changed(&self) {
        // Release: an estimate that reads this count sees the change.
        self.changes.fetch_add(1, Ordering::Release);
        if !self.dirty.load(Ordering::Relaxed) {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }
}

struct Slots {
    /// Bumped (under the write lock) whenever a slot is replaced or
    /// restored, so change counts are only compared within one generation.
    generation: u64,
    slots: Vec<Slot>,
}

/// What an estimate was computed from.
#[derive(Clone, Copy, PartialEq, Eq)]
struct CacheKey {
    now_bucket: i64,
    generation: u64,
    changes: u64,
}

/// A ring of sketches, one per bucket, reused as buckets expire.
pub(super) struct Ring {
    granularity: Granularity,
    slots: RwLock<Slots>,
    /// The last estimates of this ring's windows and what they saw.
    cache: Mutex<Option<(CacheKey, [u64; 2])>>,
    /// Heap bytes held by this ring's sketches.
    bytes: AtomicUsize,
}

impl Ring {
    pub(super) fn new(granularity: Granularity, len: usize) -> Self {
        Ring {
            granularity,
            slots: RwLock::new(Slots {
                generation: 0,
                slots: (0..len).map(|_| Slot::empty(i64::MIN)).collect(),
            }),
            cache: Mutex::new(None),
            bytes: AtomicUsize::new(0),
        }
    }

    fn slot_index(len: usize, bucket: i64) -> usize {
        bucket.rem_euclid(len as i64) as usize
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Slots> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Slots> {
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn insert(&self, hash: u64, ts: i64) {
        let bucket = ts.div_euclid(self.granularity.seconds());
        {
            let slots = self.read();
            let slot = &slots.slots[Self::slot_index(slots.slots.len(), bucket)];
            if slot.bucket == bucket {
                if slot.sketch.insert(hash, &self.bytes) {
                    slot.changed();
                }
                return;
            }
            if slot.bucket > bucket {
                // Older than the ring reaches: outside every window.
                return;
            }
        }
        // A new bucket: recycle its slot (once per hour or day per ring).
        let mut slots = self.write();
        let slot = self.claim(&mut slots, bucket);
        if let Some(slot) = slot
            && slot.sketch.insert(hash, &self.bytes)
        {
            slot.changed();
        }
    }

    /// Counts a request's users (hash, unix seconds): as many
    /// [`Self::insert`]s, with the ring read once and each bucket's sketch
    /// given its users at once. `scratch` is reused between calls.
    pub(super) fn insert_all(&self, users: &[(u64, i64)], scratch: &mut Vec<u64>) {
        let seconds = self.granularity.seconds();
        let bucket_of = |ts: i64| ts.div_euclid(seconds);
        let mut late: Vec<(u64, i64)> = Vec::new();
        {
            let slots = self.read();
            let len = slots.slots.len();
            // A batch spans a bucket or two: each bucket's users go in one
            // pass over the batch, and past four buckets one at a time.
            let mut done: [Option<i64>; 4] = [None; 4];
            for (n, &(_, ts)) in users.iter().enumerate() {
                let bucket = bucket_of(ts);
                if done.contains(&Some(bucket)) {
                    continue;
                }
                let rest = &users[n..];
                let Some(free) = done.iter().position(Option::is_none) else {
                    late.extend(
                        rest.iter()
                            .filter(|(_, t)| !done.contains(&Some(bucket_of(*t)))),
                    );
                    break;
                };
                done[free] = Some(bucket);
                let in_bucket = rest.iter().filter(|(_, t)| bucket_of(*t) == bucket);
                let slot = &slots.slots[Self::slot_index(len, bucket)];
                if slot.bucket == bucket {
                    scratch.clear();
                    scratch.extend(in_bucket.map(|(h, _)| *h));
                    if slot.sketch.insert_many(scratch, &self.bytes) {
                        slot.changed();
                    }
                } else if slot.bucket < bucket {
                    // A new bucket: its slot is claimed under the write lock.
                    late.extend(in_bucket);
                }
                // Else older than the ring reaches: outside every window.
            }
        }
        for (hash, ts) in late {
            self.insert(hash, ts);
        }
    }

    /// The slot for `bucket`, replacing an older bucket's (whose memory is
    /// freed); `None` when the slot holds a newer bucket.
    fn claim<'a>(&self, slots: &'a mut Slots, bucket: i64) -> Option<&'a Slot> {
        let len = slots.slots.len();
        let i = Self::slot_index(len, bucket);
        if slots.slots[i].bucket < bucket {
            let old = std::mem::replace(&mut slots.slots[i], Slot::empty(bucket));
            self.bytes
                .fetch_sub(old.sketch.heap_bytes(), Ordering::Relaxed);
            slots.generation += 1;
        }
        let slot = &slots.slots[i];
        (slot.bucket == bucket).then_some(slot)
    }

    /// The estimates of the windows of `spans` buckets ending at `now`
    /// (spans ascending, at most two), each the union of its buckets. The
    /// larger window is the smaller one's union plus its older buckets.
    pub(super) fn estimates(&self, now: i64, spans: [i64; 2]) -> [u64; 2] {
        let now_bucket = now.div_euclid(self.granularity.seconds());
        let slots = self.read();
        let in_window =
            |s: &&Slot, span: i64| s.bucket > now_bucket - span && s.bucket <= now_bucket;
        let key = CacheKey {
            now_bucket,
            generation: slots.generation,
            changes: slots
                .slots
                .iter()
                .map(|s| s.changes.load(Ordering::Acquire))
                .sum(),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached, estimates)) = *cache
            && cached == key
        {
            return estimates;
        }
        let mut union = Union::new();
        let mut out = [0; 2];
        let mut covered = 0;
        for (k, span) in spans.into_iter().enumerate() {
            if k > 0 && span == covered {
                out[k] = out[k - 1];
                continue;
            }
            for slot in slots
                .slots
                .iter()
                .filter(|s| in_window(s, span) && !in_window(s, covered))
            {
                union.add(&slot.sketch);
            }
            out[k] = union.estimate();
            covered = span;
        }
        *cache = Some((key, out));
        out
    }

    /// Appends a row for each sketch changed since the last call, clearing
    /// their marks.
    pub(super) fn take_dirty(&self, rows: &mut Vec<SketchRow>) {
        let slots = self.read();
        for slot in slots
            .slots
            .iter()
            .filter(|s| s.dirty.swap(false, Ordering::Relaxed))
        {
            rows.push(SketchRow {
                granularity: self.granularity,
                bucket: slot.bucket,
                registers: slot.sketch.encode(),
            });
        }
    }

    /// Marks `bucket` changed again, if the ring still holds it.
    pub(super) fn mark_dirty(&self, bucket: i64) {
        let slots = self.read();
        if let Some(slot) = slots.slots.iter().find(|s| s.bucket == bucket) {
            slot.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Merges a stored sketch of this ring's granularity into its bucket.
    /// Returns false for a malformed row.
    pub(super) fn restore(&self, row: &SketchRow) -> bool {
        let Some(stored) = row.decode() else {
            return false;
        };
        let mut slots = self.write();
        if let Some(slot) = self.claim(&mut slots, row.bucket) {
            slot.sketch.merge(&stored, &self.bytes);
        }
        slots.generation += 1;
        true
    }

    /// Heap bytes held by this ring's sketches, as kept track of.
    pub(super) fn heap_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The same, counted by walking every sketch.
    #[cfg(test)]
    pub(super) fn walked_bytes(&self) -> usize {
        let slots = self.read();
        slots
            .slots
            .iter()
            .map(|s| s.sketch.heap_bytes())
            .sum::<usize>()
    }
}
