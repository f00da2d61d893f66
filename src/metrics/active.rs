//! Distinct active users per bot, from HyperLogLog++-style sketches.
//!
//! A user id is hashed with a keyed SipHash (see [`crate::event::UserHash`])
//! and dropped at once. Sketches are kept per UTC hour (24 of them, for the
//! 1d window) and per UTC day (30, for 7d and 30d); a window's estimate is
//! the union of its buckets, so an estimate rolls forward as buckets expire.
//!
//! # Memory model
//!
//! A bucket costs nothing until its first user. It then starts **sparse**:
//! a sorted list of 4-byte entries, one per distinct 25-bit hash prefix
//! (HyperLogLog++'s sparse precision p′ = 25) with the rank of that hash.
//! Past [`SPARSE_MAX`] entries (4 KiB) it turns **dense**: 2^14 one-byte
//! registers (16 KiB), after which inserts are a lock-free `fetch_max` and
//! memory no longer grows. A bot's worst case is therefore the old fixed
//! 54 × 16 KiB, reached only by a bot with more than 1,024 users in every
//! hour and day bucket; a bot with a little traffic holds a few hundred
//! bytes. A bucket that leaves the ring is dropped with its memory.
//!
//! # Estimates
//!
//! Sparse: linear counting over the 2^25 virtual registers, exact but for
//! the rare two users sharing a 25-bit prefix (≈ 1.5 % chance of one such
//! pair among 1,000 users). Dense: LogLog-Beta over 2^14 registers, 0.81 %
//! standard error. A window holding only sparse buckets merges their lists;
//! one dense bucket makes the union dense. Each ring caches its windows'
//! estimates, keyed by the current bucket and by change counters bumped
//! whenever a register moves, so rendering a bot that saw no new user since
//! the last render costs a few atomic loads.
//!
//! # Merging and storage
//!
//! A sparse entry projects onto exactly the dense register the same hash
//! would have set (its top 14 bits, the same rank), so every union, sparse
//! or dense, is a register-wise maximum: restoring a row twice, or merging
//! another replica's, never inflates a count. A stored row is the dense
//! registers (2^14 bytes, as every earlier version wrote them), or a tagged
//! sparse list (see [`SketchRow`]).
//!
//! The hash key and the precisions are fixed so that sketches written by one
//! process (or replica) can be merged with another's after a restart.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::event::{UserHash, UserId};
pub use crate::store::{Granularity, SketchRow};

/// 2^14 dense registers: 0.81 % standard error, 16 KiB per sketch.
pub const PRECISION: u8 = 14;
pub const REGISTERS: usize = 1 << PRECISION;
/// The sparse precision p′ of HyperLogLog++: 2^25 virtual registers.
pub const SPARSE_PRECISION: u8 = 25;
/// A sparse sketch turns dense past this many entries (4 KiB of entries, a
/// quarter of a dense sketch; ≈ 1,024 users).
pub const SPARSE_MAX: usize = 1024;
/// The largest rank a 64-bit hash can have: 1 + 64 trailing zeros.
const MAX_RANK: u8 = 65;
/// First byte of a stored sparse row. Dense registers never exceed
/// [`MAX_RANK`], so a dense row can never start with it.
const SPARSE_TAG: u8 = 0xFF;

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

impl Granularity {
    fn seconds(self) -> i64 {
        match self {
            Granularity::Hour => HOUR,
            Granularity::Day => DAY,
        }
    }
}

// ---------------------------------------------------------------------------
// Entries and registers
// ---------------------------------------------------------------------------

/// A sparse entry: the hash's top 25 bits, then its rank in the low 7 bits.
/// Sorting entries sorts them by prefix, and so by dense register.
type Entry = u32;
const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

fn rank_of(hash: u64) -> u8 {
    // The rank every earlier version stored: 1 + trailing zeros of the
    // whole hash (the register index comes from the top bits).
    1 + hash.trailing_zeros() as u8
}

fn entry_of(hash: u64) -> Entry {
    ((hash >> (64 - SPARSE_PRECISION)) as u32) << 7 | u32::from(rank_of(hash))
}

fn prefix(e: Entry) -> u32 {
    e >> 7
}

fn entry_rank(e: Entry) -> u8 {
    (e & 0x7F) as u8
}

/// The dense register an entry projects onto.
fn register_of(e: Entry) -> usize {
    (prefix(e) >> (SPARSE_PRECISION - PRECISION)) as usize
}

/// True when the list already has `e`'s prefix with at least its rank.
fn covers(list: &[Entry], e: Entry) -> bool {
    list.binary_search_by_key(&prefix(e), |x| prefix(*x))
        .is_ok_and(|i| entry_rank(list[i]) >= entry_rank(e))
}

/// Adds `e` to a sorted list, keeping one entry per prefix with the larger
/// rank. True when the list changed.
fn add_entry(list: &mut Vec<Entry>, e: Entry) -> bool {
    match list.binary_search_by_key(&prefix(e), |x| prefix(*x)) {
        Ok(i) if entry_rank(list[i]) < entry_rank(e) => {
            list[i] = e;
            true
        }
        Ok(_) => false,
        Err(i) => {
            list.insert(i, e);
            true
        }
    }
}

/// The union of two sorted lists, one entry per prefix with the larger rank.
fn merge_entries(a: &[Entry], b: &[Entry]) -> Vec<Entry> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (a[i], b[j]);
        match prefix(x).cmp(&prefix(y)) {
            std::cmp::Ordering::Less => {
                out.push(x);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(y);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(x.max(y));
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// Linear counting over the 2^25 virtual registers of the sparse form.
fn sparse_estimate(entries: usize) -> f64 {
    let m = (1u64 << SPARSE_PRECISION) as f64;
    m * (m / (m - entries as f64)).ln()
}

/// LogLog-Beta (Qin et al. 2016, arXiv:1612.02284) over dense registers:
/// the estimator earlier versions used through the hyperloglockless crate,
/// with the same coefficients for precision 14. The harmonic sum is taken
/// in fixed point, so the result does not depend on the order of registers.
fn dense_estimate(registers: impl Iterator<Item = u8>) -> f64 {
    const BETA: [f64; 8] = [
        -3.71009760230692e-01,
        9.78811941207509e-03,
        1.85796293324165e-01,
        2.03015527328432e-01,
        -1.16710521803686e-01,
        4.31106699492820e-02,
        -5.99583540511831e-03,
        4.49704299509437e-04,
    ];
    let mut zeros = 0usize;
    // Σ 2^-r, scaled by 2^66: exact for every rank 0..=65.
    let mut scaled: u128 = 0;
    for r in registers {
        zeros += usize::from(r == 0);
        scaled += 1u128 << (66 - u32::from(r.min(MAX_RANK)));
    }
    let m = REGISTERS as f64;
    let sum = scaled as f64 / (1u128 << 66) as f64;
    let beta = if zeros == 0 {
        0.0
    } else {
        let z = zeros as f64;
        let zl = (z + 1.0).ln();
        let mut poly = BETA[7];
        for b in BETA[1..7].iter().rev() {
            poly = poly * zl + b;
        }
        poly * zl + BETA[0] * z
    };
    let alpha = 0.721_347_520_444_481_7 / (1.0 + 1.079_441_541_679_835_7 / m);
    alpha * m * (m - zeros as f64) / (sum + beta)
}

// ---------------------------------------------------------------------------
// One sketch
// ---------------------------------------------------------------------------

type Dense = Box<[AtomicU8]>;

fn new_dense() -> Dense {
    (0..REGISTERS).map(|_| AtomicU8::new(0)).collect()
}

/// One bucket's sketch: sparse entries until [`SPARSE_MAX`], dense after.
#[derive(Default)]
struct Sketch {
    /// Set once, when the sketch turns dense; from then on an insert is one
    /// `fetch_max` and never takes the lock.
    dense: OnceLock<Dense>,
    /// Sorted entries while sparse; emptied (and freed) on turning dense.
    /// A repeat visitor only reads it, so concurrent inserts of known users
    /// do not wait for each other.
    sparse: RwLock<Vec<Entry>>,
}

/// A sketch's contents as read: borrowed registers or a locked list.
enum View<'a> {
    Sparse(RwLockReadGuard<'a, Vec<Entry>>),
    Dense(&'a [AtomicU8]),
}

impl Sketch {
    fn lock(&self) -> RwLockWriteGuard<'_, Vec<Entry>> {
        self.sparse.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<Entry>> {
        self.sparse.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one hash; true when a register (or entry) changed. `bytes`
    /// follows the sketch's heap size.
    fn insert(&self, hash: u64, bytes: &AtomicUsize) -> bool {
        if let Some(dense) = self.dense.get() {
            return raise(dense, (hash >> (64 - PRECISION)) as usize, rank_of(hash));
        }
        let e = entry_of(hash);
        {
            let list = self.read();
            if self.dense.get().is_none() && covers(&list, e) {
                return false;
            }
        }
        let mut list = self.lock();
        // Another thread may have turned it dense while this one waited.
        if let Some(dense) = self.dense.get() {
            return raise(dense, (hash >> (64 - PRECISION)) as usize, rank_of(hash));
        }
        let capacity = list.capacity();
        let changed = add_entry(&mut list, e);
        self.settle(&mut list, capacity, bytes);
        changed
    }

    /// After the list changed (it had `capacity` before): turns the sketch
    /// dense past [`SPARSE_MAX`] entries and accounts the heap it now holds.
    fn settle(&self, list: &mut Vec<Entry>, capacity: usize, bytes: &AtomicUsize) {
        if list.len() > SPARSE_MAX {
            self.densify(list);
        }
        let before = capacity * ENTRY_BYTES;
        let after = match self.dense.get() {
            Some(_) => REGISTERS,
            None => list.capacity() * ENTRY_BYTES,
        };
        if after >= before {
            bytes.fetch_add(after - before, Ordering::Relaxed);
        } else {
            bytes.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Heap bytes held: the registers, or the list's allocation.
    fn heap_bytes(&self) -> usize {
        match self.view() {
            View::Dense(registers) => registers.len(),
            View::Sparse(list) => list.capacity() * ENTRY_BYTES,
        }
    }

    /// Turns the sketch dense. Called with the list locked, so no insert
    /// can land in the list after it was copied.
    fn densify(&self, list: &mut Vec<Entry>) {
        let dense = new_dense();
        for &e in list.iter() {
            raise(&dense, register_of(e), entry_rank(e));
        }
        // Only ever set under the lock, after checking it was unset.
        let _ = self.dense.set(dense);
        *list = Vec::new();
    }

    fn view(&self) -> View<'_> {
        if let Some(dense) = self.dense.get() {
            return View::Dense(dense);
        }
        let list = self.read();
        match self.dense.get() {
            Some(dense) => View::Dense(dense),
            None => View::Sparse(list),
        }
    }

    /// Merges stored contents in (a register-wise maximum).
    fn merge(&self, stored: &Decoded, bytes: &AtomicUsize) {
        match stored {
            Decoded::Sparse(entries) => {
                for &e in entries {
                    self.insert_entry(e, bytes);
                }
            }
            Decoded::Dense(registers) => {
                let dense = match self.dense.get() {
                    Some(dense) => dense,
                    None => {
                        let mut list = self.lock();
                        if self.dense.get().is_none() {
                            let capacity = list.capacity();
                            self.densify(&mut list);
                            self.settle(&mut list, capacity, bytes);
                        }
                        self.dense.get().expect("just turned dense")
                    }
                };
                for (i, &r) in registers.iter().enumerate() {
                    raise(dense, i, r);
                }
            }
        }
    }

    fn insert_entry(&self, e: Entry, bytes: &AtomicUsize) {
        if let Some(dense) = self.dense.get() {
            raise(dense, register_of(e), entry_rank(e));
            return;
        }
        let mut list = self.lock();
        match self.dense.get() {
            Some(dense) => {
                raise(dense, register_of(e), entry_rank(e));
            }
            None => {
                let capacity = list.capacity();
                add_entry(&mut list, e);
                self.settle(&mut list, capacity, bytes);
            }
        }
    }

    /// The stored form (see [`SketchRow`]).
    fn encode(&self) -> Vec<u8> {
        match self.view() {
            View::Dense(registers) => registers
                .iter()
                .map(|r| r.load(Ordering::Relaxed))
                .collect(),
            View::Sparse(list) => {
                let mut out = Vec::with_capacity(1 + 4 * list.len());
                out.push(SPARSE_TAG);
                for e in list.iter() {
                    out.extend_from_slice(&e.to_be_bytes());
                }
                out
            }
        }
    }
}

fn raise(dense: &[AtomicU8], index: usize, rank: u8) -> bool {
    dense[index].fetch_max(rank, Ordering::Relaxed) < rank
}

/// The union of several sketches, for one window's estimate.
enum Union {
    Sparse(Vec<Entry>),
    Dense(Box<[u8]>),
}

impl Union {
    fn new() -> Self {
        Union::Sparse(Vec::new())
    }

    fn add(&mut self, sketch: &Sketch) {
        match (&mut *self, sketch.view()) {
            (Union::Sparse(acc), View::Sparse(list)) => *acc = merge_entries(acc, &list),
            (Union::Dense(acc), View::Sparse(list)) => {
                for &e in list.iter() {
                    let r = &mut acc[register_of(e)];
                    *r = (*r).max(entry_rank(e));
                }
            }
            (acc, View::Dense(registers)) => {
                let dense = acc.make_dense();
                for (r, x) in dense.iter_mut().zip(registers) {
                    *r = (*r).max(x.load(Ordering::Relaxed));
                }
            }
        }
    }

    fn make_dense(&mut self) -> &mut [u8] {
        if let Union::Sparse(list) = self {
            let mut dense = vec![0u8; REGISTERS].into_boxed_slice();
            for &e in list.iter() {
                let r = &mut dense[register_of(e)];
                *r = (*r).max(entry_rank(e));
            }
            *self = Union::Dense(dense);
        }
        match self {
            Union::Dense(dense) => dense,
            Union::Sparse(_) => unreachable!("converted above"),
        }
    }

    /// Rounded, not truncated, so that one user never reads as zero.
    fn estimate(&self) -> u64 {
        match self {
            Union::Sparse(list) => sparse_estimate(list.len()).round() as u64,
            Union::Dense(registers) => dense_estimate(registers.iter().copied()).round() as u64,
        }
    }
}

// ---------------------------------------------------------------------------
// Rings of buckets
// ---------------------------------------------------------------------------

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
struct Ring {
    granularity: Granularity,
    slots: RwLock<Slots>,
    /// The last estimates of this ring's windows and what they saw.
    cache: Mutex<Option<(CacheKey, [u64; 2])>>,
    /// Heap bytes held by this ring's sketches.
    bytes: AtomicUsize,
}

impl Ring {
    fn new(granularity: Granularity, len: usize) -> Self {
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

    fn insert(&self, hash: u64, ts: i64) {
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
    fn estimates(&self, now: i64, spans: [i64; 2]) -> [u64; 2] {
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
}

// ---------------------------------------------------------------------------
// Storage rows
// ---------------------------------------------------------------------------

enum Decoded {
    Sparse(Vec<Entry>),
    Dense(Vec<u8>),
}

impl SketchRow {
    fn decode(&self) -> Option<Decoded> {
        let bytes = &self.registers;
        match bytes.first() {
            Some(&SPARSE_TAG) => {
                let body = &bytes[1..];
                if !body.len().is_multiple_of(4) {
                    return None;
                }
                let entries: Vec<Entry> = body
                    .chunks_exact(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let well_formed = entries
                    .iter()
                    .all(|&e| (1..=MAX_RANK).contains(&entry_rank(e)))
                    && entries.windows(2).all(|w| prefix(w[0]) < prefix(w[1]));
                well_formed.then_some(Decoded::Sparse(entries))
            }
            _ if bytes.len() == REGISTERS && bytes.iter().all(|&r| r <= MAX_RANK) => {
                Some(Decoded::Dense(bytes.clone()))
            }
            _ => None,
        }
    }

    /// The dense registers this row stands for, whichever form it was
    /// stored in: what a register-wise maximum merges (a replica's sketch,
    /// for instance). `None` for a malformed row.
    pub fn dense_registers(&self) -> Option<Vec<u8>> {
        Some(match self.decode()? {
            Decoded::Dense(registers) => registers,
            Decoded::Sparse(entries) => {
                let mut registers = vec![0u8; REGISTERS];
                for e in entries {
                    let r = &mut registers[register_of(e)];
                    *r = (*r).max(entry_rank(e));
                }
                registers
            }
        })
    }
}

// ---------------------------------------------------------------------------
// A bot's active users
// ---------------------------------------------------------------------------

pub struct ActiveUsers {
    hourly: Ring,
    daily: Ring,
    /// In cluster mode: the cluster-wide estimates (1d, 7d, 30d) Redis gave
    /// at the last sync, which replace this process's own.
    cluster: Mutex<Option<[u64; 3]>>,
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
            cluster: Mutex::new(None),
        }
    }

    /// Sets the cluster-wide estimates every later read answers with.
    pub fn set_cluster(&self, estimates: [u64; 3]) {
        *self.cluster.lock().unwrap_or_else(|e| e.into_inner()) = Some(estimates);
    }

    fn ring(&self, granularity: Granularity) -> &Ring {
        match granularity {
            Granularity::Hour => &self.hourly,
            Granularity::Day => &self.daily,
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
        if let Some([day, week, month]) = *self.cluster.lock().unwrap_or_else(|e| e.into_inner()) {
            return [("1d", day), ("7d", week), ("30d", month)];
        }
        // The hourly ring has one window; the second span is the same.
        let [day, _] = self.hourly.estimates(now, [24, 24]);
        let [week, month] = self.daily.estimates(now, [7, 30]);
        [("1d", day), ("7d", week), ("30d", month)]
    }

    pub fn estimates(&self) -> [(&'static str, u64); 3] {
        self.estimates_at(chrono::Utc::now().timestamp())
    }

    /// The sketches changed since the last call, clearing their marks. A
    /// flush that fails hands them back with [`Self::mark_dirty`].
    pub fn take_dirty(&self) -> Vec<SketchRow> {
        let mut rows = Vec::new();
        for ring in [&self.hourly, &self.daily] {
            let slots = ring.read();
            for slot in slots
                .slots
                .iter()
                .filter(|s| s.dirty.swap(false, Ordering::Relaxed))
            {
                rows.push(SketchRow {
                    granularity: ring.granularity,
                    bucket: slot.bucket,
                    registers: slot.sketch.encode(),
                });
            }
        }
        rows
    }

    /// Marks the given buckets changed again, after a failed flush.
    pub fn mark_dirty(&self, rows: &[SketchRow]) {
        for row in rows {
            let slots = self.ring(row.granularity).read();
            if let Some(slot) = slots.slots.iter().find(|s| s.bucket == row.bucket) {
                slot.dirty.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Merges a stored sketch into its bucket (a union, so restoring twice or
    /// merging another replica's sketch never inflates the estimate).
    /// Returns false for a malformed row.
    pub fn restore(&self, row: &SketchRow) -> bool {
        let Some(stored) = row.decode() else {
            return false;
        };
        let ring = self.ring(row.granularity);
        let mut slots = ring.write();
        if let Some(slot) = ring.claim(&mut slots, row.bucket) {
            slot.sketch.merge(&stored, &ring.bytes);
        }
        slots.generation += 1;
        true
    }

    /// Heap bytes held by this bot's sketches (entries and registers; the
    /// fixed ~5 KiB of empty slots aside): at most 54 × 16 KiB.
    pub fn heap_bytes(&self) -> usize {
        self.hourly.bytes.load(Ordering::Relaxed) + self.daily.bytes.load(Ordering::Relaxed)
    }

    /// The same, counted by walking every sketch (what `heap_bytes` keeps
    /// track of as sketches grow).
    #[cfg(test)]
    fn walked_bytes(&self) -> usize {
        [&self.hourly, &self.daily]
            .iter()
            .map(|ring| {
                let slots = ring.read();
                slots
                    .slots
                    .iter()
                    .map(|s| s.sketch.heap_bytes())
                    .sum::<usize>()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn user(n: u64) -> UserId<'static> {
        UserId::Int(n.into())
    }

    fn within_2_percent(estimate: u64, n: u64) {
        let error = (estimate as f64 - n as f64).abs() / n as f64;
        assert!(
            error <= 0.02,
            "{estimate} for {n} users: {:.2} % off",
            error * 100.0
        );
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
        // 5,000 users: dense; 50: sparse. Both forms survive a restore.
        for users in [5000, 50] {
            let a = ActiveUsers::new();
            for n in 0..users {
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
            assert_eq!(b.take_dirty(), Vec::new(), "a restore is not a change");
            a.insert(&user(1), NOW);
            assert!(
                a.take_dirty().is_empty(),
                "a repeat visitor changes no register"
            );
        }
    }

    #[test]
    fn memory_grows_with_users_until_dense() {
        let a = ActiveUsers::new();
        assert_eq!(a.heap_bytes(), 0, "nothing before the first user");
        for n in 0..20 {
            a.insert(&user(n), NOW);
        }
        // Two sparse sketches (hour, day) of 20 entries each.
        assert!(a.heap_bytes() <= 2 * 32 * 4, "{} bytes", a.heap_bytes());
        for n in 20..2000 {
            a.insert(&user(n), NOW);
        }
        assert_eq!(a.heap_bytes(), 2 * REGISTERS, "two dense sketches, no list");
        assert_eq!(a.walked_bytes(), a.heap_bytes());
        // Spread over 24 hours, each bucket stays sparse.
        let b = ActiveUsers::new();
        for n in 0..24 * 50 {
            b.insert(&user(n), NOW - (n as i64 % 24) * HOUR);
        }
        // 24 hourly lists of 50 entries, two daily lists: no dense sketch.
        assert!(
            b.heap_bytes() <= 24 * 64 * 4 + 2 * SPARSE_MAX * 4,
            "{} bytes",
            b.heap_bytes()
        );
        within_2_percent(b.estimates_at(NOW)[0].1, 24 * 50);
        assert_eq!(b.walked_bytes(), b.heap_bytes());
        // A new bucket taking an old one's slot gives its memory back.
        let before = b.heap_bytes();
        b.insert(&user(1), NOW + 40 * DAY);
        assert_eq!(b.walked_bytes(), b.heap_bytes());
        assert!(
            b.heap_bytes() < before,
            "{} then {}",
            before,
            b.heap_bytes()
        );
        // Restores are counted too, sparse and dense.
        let c = ActiveUsers::new();
        for row in a.take_dirty().iter().chain(&b.take_dirty()) {
            assert!(c.restore(row));
        }
        assert_eq!(c.walked_bytes(), c.heap_bytes());
    }

    #[test]
    fn accurate_at_every_size() {
        let a = ActiveUsers::new();
        let mut inserted = 0;
        for n in [
            1u64, 2, 5, 10, 50, 100, 500, 1000, 1024, 1025, 2000, 10_000, 100_000,
        ] {
            while inserted < n {
                // Ids far apart, as real user ids are.
                a.insert(&user(inserted * 7_919 + 1_000_003), NOW);
                inserted += 1;
            }
            for (window, estimate) in a.estimates_at(NOW) {
                if n <= SPARSE_MAX as u64 {
                    assert_eq!(estimate, n, "{window}: exact while sparse");
                } else {
                    within_2_percent(estimate, n);
                }
            }
        }
    }

    #[test]
    fn sparse_and_dense_unions_agree_with_one_sketch() {
        // The same users split over hours (some buckets sparse, one dense)
        // estimate as one dense sketch of all of them would.
        let split = ActiveUsers::new();
        let whole = ActiveUsers::new();
        for n in 0..3000 {
            let hours = if n < 1500 { 0 } else { (n as i64 % 5) + 1 };
            split.insert(&user(n), NOW - hours * HOUR);
            whole.insert(&user(n), NOW);
        }
        assert_eq!(split.estimates_at(NOW)[0], whole.estimates_at(NOW)[0]);
        // And a dense row stored from one merges with the other's sparse one.
        let rows = whole.take_dirty();
        let dense = rows[0].dense_registers().expect("well formed");
        let mut max = vec![0u8; REGISTERS];
        for row in split
            .take_dirty()
            .iter()
            .filter(|r| r.granularity == Granularity::Hour)
        {
            for (m, r) in max
                .iter_mut()
                .zip(row.dense_registers().expect("well formed"))
            {
                *m = (*m).max(r);
            }
        }
        assert_eq!(max, dense, "register-wise max of the parts is the whole");
    }

    #[test]
    fn estimates_follow_changes_through_the_cache() {
        let a = ActiveUsers::new();
        a.insert(&user(1), NOW);
        assert_eq!(a.estimates_at(NOW)[0].1, 1);
        assert_eq!(a.estimates_at(NOW)[0].1, 1, "cached");
        a.insert(&user(2), NOW - HOUR);
        assert_eq!(a.estimates_at(NOW)[0].1, 2, "an older bucket changed");
        let row = SketchRow {
            granularity: Granularity::Hour,
            bucket: NOW.div_euclid(HOUR) - 2,
            registers: {
                let b = ActiveUsers::new();
                b.insert(&user(3), NOW - 2 * HOUR);
                b.take_dirty()
                    .into_iter()
                    .find(|r| r.granularity == Granularity::Hour)
                    .expect("hourly row")
                    .registers
            },
        };
        assert!(a.restore(&row));
        assert_eq!(a.estimates_at(NOW)[0].1, 3, "a restore changes estimates");
        assert_eq!(a.estimates_at(NOW + DAY)[0].1, 0, "the window moved");
    }

    #[test]
    fn old_dense_rows_read_and_malformed_rows_refused() {
        // A dense row as earlier versions stored it: one user's register.
        let hash = user(7).hash().0;
        let mut registers = vec![0u8; REGISTERS];
        registers[(hash >> 50) as usize] = rank_of(hash);
        let row = |registers: Vec<u8>| SketchRow {
            granularity: Granularity::Day,
            bucket: NOW.div_euclid(DAY),
            registers,
        };
        let a = ActiveUsers::new();
        assert!(a.restore(&row(registers.clone())));
        assert_eq!(a.estimates_at(NOW)[2].1, 1);
        a.insert(&user(7), NOW);
        assert!(
            a.take_dirty()
                .iter()
                .all(|r| r.granularity == Granularity::Hour)
        );

        for bad in [
            vec![],
            vec![0; REGISTERS - 1],
            vec![66; REGISTERS],
            vec![SPARSE_TAG, 0, 0, 1],
            // A rank of zero, then two entries out of order.
            vec![SPARSE_TAG, 0, 0, 0, 0],
            vec![SPARSE_TAG, 0, 0, 1, 1, 0, 0, 0, 1],
        ] {
            assert!(!a.restore(&row(bad.clone())), "{bad:?}");
        }
    }

    #[test]
    fn dense_estimator_matches_the_crate() {
        use hyperloglockless::AtomicHyperLogLog;
        for n in [0u64, 1, 100, 3000, 50_000] {
            let reference = AtomicHyperLogLog::seeded(PRECISION, crate::event::USER_HASH_KEY);
            let ours = Sketch::default();
            {
                let mut list = ours.lock();
                ours.densify(&mut list);
            }
            for i in 0..n {
                let hash = user(i).hash().0;
                reference.insert_hash(hash);
                ours.insert(hash, &AtomicUsize::new(0));
            }
            let View::Dense(registers) = ours.view() else {
                panic!("dense");
            };
            let mine = dense_estimate(registers.iter().map(|r| r.load(Ordering::Relaxed)));
            let theirs = reference.raw_count();
            assert!(
                (mine - theirs).abs() <= 1e-9 * theirs.max(1.0),
                "{mine} vs {theirs}"
            );
        }
    }

    #[test]
    fn concurrent_inserts_across_the_switch_lose_nothing() {
        let a = std::sync::Arc::new(ActiveUsers::new());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for n in 0..1500 {
                        a.insert(&user(t * 1_000_000 + n), NOW);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let sequential = ActiveUsers::new();
        for t in 0..4u64 {
            for n in 0..1500 {
                sequential.insert(&user(t * 1_000_000 + n), NOW);
            }
        }
        assert_eq!(a.take_dirty(), sequential.take_dirty());
    }
}
