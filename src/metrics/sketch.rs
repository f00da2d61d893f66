//! One HyperLogLog++-style sketch of distinct users: its sparse and dense
//! forms, its estimators, the union of several, and its stored form.
//!
//! Apart from the per-bot API (`active.rs`) and the time buckets
//! (`ring.rs`) because it has mathematics of its own (hash to entry or
//! register, registers to a count, bytes to a row), which neither looks into.
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
//! one dense bucket makes the union dense.
//!
//! # Merging and storage
//!
//! A sparse entry projects onto exactly the dense register the same hash
//! would have set (its top 14 bits, the same rank), so every union, sparse
//! or dense, is a register-wise maximum: restoring a row twice, or merging
//! another replica's, never inflates a count. A stored row is the dense
//! registers (2^14 bytes, as every earlier version wrote them), or a tagged
//! sparse list (see [`SketchRow`]).

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::store::SketchRow;

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
pub(super) const SPARSE_TAG: u8 = 0xFF;

// ---------------------------------------------------------------------------
// Entries and registers
// ---------------------------------------------------------------------------

/// A sparse entry: the hash's top 25 bits, then its rank in the low 7 bits.
/// Sorting entries sorts them by prefix, and so by dense register.
type Entry = u32;
const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

pub(super) fn rank_of(hash: u64) -> u8 {
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

/// A sorted list's entries by their top [`Index::BITS`] bits: where each
/// such run starts. Entries are hash prefixes, so spread evenly: a list of
/// 1,024 entries has about four a run, and a lookup is two loads and a
/// search of those few instead of ten dependent steps over the whole list.
/// Built for one request's lookups (one pass over the list), it costs no
/// memory between requests.
struct Index<'l> {
    list: &'l [Entry],
    starts: [u16; Index::RUNS + 1],
}

impl<'l> Index<'l> {
    const BITS: u32 = 8;
    const RUNS: usize = 1 << Self::BITS;

    /// Worth its pass over the list only when the lookups outnumber a
    /// fraction of the list (a large request, or a small list).
    fn worth(list: &[Entry], lookups: usize) -> bool {
        lookups * 8 >= list.len()
    }

    fn new(list: &'l [Entry]) -> Self {
        // SPARSE_MAX entries at most: a list that passes it turns dense
        // before its lock is let go.
        debug_assert!(list.len() < usize::from(u16::MAX));
        let mut starts = [0u16; Self::RUNS + 1];
        let mut run = 0;
        for (i, e) in list.iter().enumerate() {
            let of = Self::run_of(*e);
            while run <= of {
                starts[run] = i as u16;
                run += 1;
            }
        }
        for start in &mut starts[run..] {
            *start = list.len() as u16;
        }
        Index { list, starts }
    }

    fn run_of(e: Entry) -> usize {
        (e >> (Entry::BITS - Self::BITS)) as usize
    }

    /// [`covers`], looked up within the entry's run.
    fn covers(&self, e: Entry) -> bool {
        let run = Self::run_of(e);
        let (from, to) = (
            usize::from(self.starts[run]),
            usize::from(self.starts[run + 1]),
        );
        covers(&self.list[from..to], e)
    }
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
pub(super) struct Sketch {
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
    pub(super) fn insert(&self, hash: u64, bytes: &AtomicUsize) -> bool {
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

    /// Counts several hashes (a request's users in one bucket): as many
    /// [`Self::insert`]s, with the list read once and, if any entry is new,
    /// written once. True when a register (or entry) changed.
    pub(super) fn insert_many(&self, hashes: &[u64], bytes: &AtomicUsize) -> bool {
        if let Some(dense) = self.dense.get() {
            return raise_all(dense, hashes);
        }
        let mut fresh = Vec::new();
        {
            let list = self.read();
            if let Some(dense) = self.dense.get() {
                return raise_all(dense, hashes);
            }
            let entries = hashes.iter().map(|h| entry_of(*h));
            if Index::worth(&list, hashes.len()) {
                let index = Index::new(&list);
                fresh.extend(entries.filter(|e| !index.covers(*e)));
            } else {
                fresh.extend(entries.filter(|e| !covers(&list, *e)));
            }
        }
        if fresh.is_empty() {
            return false;
        }
        let mut list = self.lock();
        if let Some(dense) = self.dense.get() {
            return raise_all(dense, hashes);
        }
        let capacity = list.capacity();
        let mut changed = false;
        for e in fresh {
            changed |= add_entry(&mut list, e);
            // Dense from here: the rest are registers.
            if list.len() > SPARSE_MAX {
                self.settle(&mut list, capacity, bytes);
                if let Some(dense) = self.dense.get() {
                    return raise_all(dense, hashes) || changed;
                }
            }
        }
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
    pub(super) fn heap_bytes(&self) -> usize {
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
    pub(super) fn merge(&self, stored: &Decoded, bytes: &AtomicUsize) {
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
    pub(super) fn encode(&self) -> Vec<u8> {
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
    // Most inserts are of users already counted: a plain load settles
    // them, and only a register that grows pays the read-modify-write.
    dense[index].load(Ordering::Relaxed) < rank
        && dense[index].fetch_max(rank, Ordering::Relaxed) < rank
}

fn raise_all(dense: &[AtomicU8], hashes: &[u64]) -> bool {
    hashes.iter().fold(false, |changed, h| {
        raise(dense, (h >> (64 - PRECISION)) as usize, rank_of(*h)) | changed
    })
}

/// The union of several sketches, for one window's estimate.
pub(super) enum Union {
    Sparse(Vec<Entry>),
    Dense(Box<[u8]>),
}

impl Union {
    pub(super) fn new() -> Self {
        Union::Sparse(Vec::new())
    }

    pub(super) fn add(&mut self, sketch: &Sketch) {
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
    pub(super) fn estimate(&self) -> u64 {
        match self {
            Union::Sparse(list) => sparse_estimate(list.len()).round() as u64,
            Union::Dense(registers) => dense_estimate(registers.iter().copied()).round() as u64,
        }
    }
}

// ---------------------------------------------------------------------------
// Storage rows
// ---------------------------------------------------------------------------

pub(super) enum Decoded {
    Sparse(Vec<Entry>),
    Dense(Vec<u8>),
}

impl SketchRow {
    pub(super) fn decode(&self) -> Option<Decoded> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::UserId;

    fn user(n: u64) -> UserId<'static> {
        UserId::Int(n.into())
    }

    /// The run index answers every lookup as the whole-list search does:
    /// empty and full lists, entries in the first and last runs, prefixes
    /// held with a lower, equal or higher rank, and prefixes absent.
    #[test]
    fn the_run_index_finds_what_the_list_holds() {
        let mut rng = crate::testing::Rng(0x9E37_79B9_7F4A_7C15);
        let mut next = || rng.next();
        for len in [0usize, 1, 2, 7, 100, 255, 256, 257, 1000, SPARSE_MAX] {
            let mut list = Vec::new();
            // The extremes of the hash space land in the first and last run.
            for h in [0u64, u64::MAX, 1 << 63, (1 << 56) - 1]
                .into_iter()
                .take(len)
            {
                add_entry(&mut list, entry_of(h));
            }
            while list.len() < len {
                add_entry(&mut list, entry_of(next()));
            }
            let index = Index::new(&list);
            let mut asked: Vec<Entry> = list.clone();
            for e in &list {
                // The same prefix with every rank around the held one.
                for rank in [1u32, 2, 64, 65] {
                    asked.push((e & !0x7F) | rank);
                }
            }
            asked.extend((0..2000).map(|_| entry_of(next())));
            asked.extend([entry_of(0), entry_of(u64::MAX), entry_of(1 << 63)]);
            for e in asked {
                assert_eq!(index.covers(e), covers(&list, e), "len {len}, entry {e:#x}");
            }
        }
    }

    #[test]
    fn dense_estimator_matches_the_crate() {
        use hyperloglockless::AtomicHyperLogLog;
        for n in [0u64, 1, 100, 3000, 50_000] {
            let reference = AtomicHyperLogLog::seeded(PRECISION, crate::event::LEGACY_USER_KEY);
            let ours = Sketch::default();
            {
                let mut list = ours.lock();
                ours.densify(&mut list);
            }
            for i in 0..n {
                let hash = crate::event::UserKey::legacy().hash(&user(i)).0;
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
}
