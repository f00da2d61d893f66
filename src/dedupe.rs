//! Remembered `event_id`s: a retry within the dedupe window is counted once.
//!
//! An id is remembered as a 64-bit keyed hash of (bot, id) in one of a ring
//! of time buckets, so each costs a fixed few bytes (a hash-set slot: 8
//! bytes plus a control byte, and the set's spare capacity; 29.5 bytes of
//! RSS per id measured with 2 million ids) instead of a general cache entry. A bucket expires whole: dropping a set of
//! plain integers frees its one allocation, so expiry never stalls a
//! request however many ids it forgets.
//!
//! Memory is bounded by `max_ids`: past it, the oldest bucket is forgotten
//! early and [`Dedupe::effective_window`] says how far back ids are still
//! remembered. The hash key is fixed so that ids read back from the journal
//! after a restart hash as they did before it.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// The SipHash key for (bot, event_id). Fixed, so a restart recognises ids
/// remembered before it.
const ID_HASH_KEY: u128 = 0x6274_6d65_7472_6963_732d_6964_732d_7631;

/// Buckets per window: an id is remembered for between one window and one
/// window plus a bucket (1/16 more).
const BUCKETS: u32 = 16;

/// Shards, each under its own lock, so concurrent requests rarely contend.
const SHARDS: usize = 16;

/// The key of a remembered id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdHash(pub u64);

static ID_HASHER: std::sync::LazyLock<hyperloglockless::DefaultHasher> =
    std::sync::LazyLock::new(|| {
        hyperloglockless::DefaultHasher::seeded(&ID_HASH_KEY.to_be_bytes())
    });

impl IdHash {
    pub fn of(bot: &str, event_id: &str) -> IdHash {
        IdHash(ID_HASHER.hash_one((bot, event_id)))
    }
}

/// The keys are already uniform hashes: hashing them again is wasted work.
#[derive(Default)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The low bits pick the hash-set slot; the high bits pick the shard.
fn shard_index(id: IdHash) -> usize {
    (id.0 >> 60) as usize % SHARDS
}

/// The set of bucket `number` in `shard`, made if new. Buckets stay
/// ordered by number; ids read back at start may be older than the newest
/// bucket.
fn bucket_for(shard: &mut Shard, number: i64) -> &mut IdSet {
    let position = shard.buckets.iter().rposition(|b| b.number <= number);
    let at = match position {
        Some(i) if shard.buckets[i].number == number => i,
        _ => {
            let at = position.map_or(0, |i| i + 1);
            shard.buckets.insert(
                at,
                Bucket {
                    number,
                    ids: IdSet::default(),
                },
            );
            at
        }
    };
    &mut shard.buckets[at].ids
}

/// A set of keyed 64-bit hashes (event ids here, users in
/// `metrics::pending`), hashed as they are.
pub(crate) type UniformSet = HashSet<u64, BuildHasherDefault<PassThrough>>;
type IdSet = UniformSet;

struct Bucket {
    /// Arrival time (unix milliseconds) / bucket length.
    number: i64,
    ids: IdSet,
}

#[derive(Default)]
struct Shard {
    /// Oldest first.
    buckets: VecDeque<Bucket>,
    /// The first bucket number this shard still remembers in full, once the
    /// memory bound made it forget a bucket early.
    floor: i64,
}

pub struct Dedupe {
    /// Bucket length in milliseconds; `None` when dedupe is off
    /// (`--dedupe-window 0s`).
    bucket_ms: Option<i64>,
    shards: Vec<Mutex<Shard>>,
    max_ids: usize,
    len: AtomicUsize,
}

/// Whether an id was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    First,
    Duplicate,
}

impl Dedupe {
    pub fn new(window: Duration, max_ids: usize) -> Self {
        let bucket_ms = (!window.is_zero()).then(|| {
            let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
            ms.div_ceil(u64::from(BUCKETS)).clamp(1, i64::MAX as u64) as i64
        });
        Dedupe {
            bucket_ms,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            max_ids: max_ids.max(SHARDS),
            len: AtomicUsize::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.bucket_ms.is_some()
    }

    /// Remembers `id` as seen at `now_ms` (unix milliseconds); says whether
    /// it had been seen within the window.
    pub fn check(&self, id: IdHash, now_ms: i64) -> Seen {
        let Some(bucket_ms) = self.bucket_ms else {
            return Seen::First;
        };
        let number = now_ms.div_euclid(bucket_ms);
        let mut shard = self.shard(id).lock().unwrap_or_else(|e| e.into_inner());
        self.expire(&mut shard, number);
        if shard.buckets.iter().any(|b| b.ids.contains(&id.0)) {
            return Seen::Duplicate;
        }
        self.insert_locked(&mut shard, id, number);
        Seen::First
    }

    /// [`Dedupe::check`] for a request's ids, in order (an id repeated
    /// within `ids` is a duplicate of its first), into `seen`. Each shard
    /// is locked once, and the count of remembered ids updated once, rather
    /// than both per id: a lookup in a set of millions is a cache miss, and
    /// a locked instruction between two lookups makes the second wait for
    /// the first, where without one the processor overlaps them.
    pub fn check_many(&self, ids: &[IdHash], now_ms: i64, seen: &mut Vec<Seen>) {
        seen.clear();
        seen.resize(ids.len(), Seen::First);
        let Some(bucket_ms) = self.bucket_ms else {
            return;
        };
        if ids.len() < 2 * SHARDS {
            for (s, id) in seen.iter_mut().zip(ids) {
                *s = self.check(*id, now_ms);
            }
            return;
        }
        let number = now_ms.div_euclid(bucket_ms);
        for (index, shard) in self.shards.iter().enumerate() {
            let mut locked = None;
            let mut added = 0;
            for (s, id) in seen.iter_mut().zip(ids) {
                if shard_index(*id) != index {
                    continue;
                }
                let shard = locked.get_or_insert_with(|| {
                    let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                    self.expire(&mut shard, number);
                    shard
                });
                if shard.buckets.iter().any(|b| b.ids.contains(&id.0)) {
                    *s = Seen::Duplicate;
                } else {
                    bucket_for(shard, number).insert(id.0);
                    added += 1;
                }
            }
            if let Some(mut shard) = locked {
                self.count_added(&mut shard, added);
            }
        }
    }

    /// Forgets `id`, remembered by a request that was then refused, so that
    /// its retry counts.
    pub fn forget(&self, id: IdHash, now_ms: i64) {
        let Some(bucket_ms) = self.bucket_ms else {
            return;
        };
        let mut shard = self.shard(id).lock().unwrap_or_else(|e| e.into_inner());
        self.expire(&mut shard, now_ms.div_euclid(bucket_ms));
        for bucket in &mut shard.buckets {
            if bucket.ids.remove(&id.0) {
                self.len.fetch_sub(1, Relaxed);
                break;
            }
        }
    }

    /// Whether `id` is remembered (without remembering it).
    pub fn contains(&self, id: IdHash) -> bool {
        let shard = self.shard(id).lock().unwrap_or_else(|e| e.into_inner());
        shard.buckets.iter().any(|b| b.ids.contains(&id.0))
    }

    /// Remembers an id read back from the journal at start, as seen at
    /// `at_ms` (unix milliseconds).
    pub fn remember(&self, id: IdHash, at_ms: i64, now_ms: i64) {
        let Some(bucket_ms) = self.bucket_ms else {
            return;
        };
        let number = at_ms.div_euclid(bucket_ms);
        let mut shard = self.shard(id).lock().unwrap_or_else(|e| e.into_inner());
        self.expire(&mut shard, now_ms.div_euclid(bucket_ms));
        if number <= now_ms.div_euclid(bucket_ms) - i64::from(BUCKETS)
            || shard.buckets.iter().any(|b| b.ids.contains(&id.0))
        {
            return;
        }
        self.insert_locked(&mut shard, id, number);
    }

    fn shard(&self, id: IdHash) -> &Mutex<Shard> {
        &self.shards[shard_index(id)]
    }

    fn insert_locked(&self, shard: &mut Shard, id: IdHash, number: i64) {
        bucket_for(shard, number).insert(id.0);
        self.count_added(shard, 1);
    }

    /// Counts `added` ids just remembered in `shard`. Over the bound, the
    /// shard forgets its oldest bucket early, one per id added at most (as
    /// one at a time would). Each shard holds about 1/SHARDS of the ids, so
    /// this keeps the whole within the bound without a global lock.
    fn count_added(&self, shard: &mut Shard, added: usize) {
        if added == 0 {
            return;
        }
        let mut len = self.len.fetch_add(added, Relaxed) + added;
        for _ in 0..added {
            if len <= self.max_ids || shard.buckets.len() <= 1 {
                break;
            }
            if let Some(oldest) = shard.buckets.pop_front() {
                len = self.len.fetch_sub(oldest.ids.len(), Relaxed) - oldest.ids.len();
                shard.floor = shard.floor.max(oldest.number + 1);
            }
        }
    }

    fn expire(&self, shard: &mut Shard, now_number: i64) {
        while shard
            .buckets
            .front()
            .is_some_and(|b| b.number <= now_number - i64::from(BUCKETS))
        {
            if let Some(old) = shard.buckets.pop_front() {
                self.len.fetch_sub(old.ids.len(), Relaxed);
            }
        }
    }

    /// Ids remembered right now.
    pub fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How far back ids are remembered at `now`: the configured window,
    /// or less when the memory bound made shards forget early.
    pub fn effective_window(&self, now_ms: i64) -> Duration {
        let Some(bucket_ms) = self.bucket_ms else {
            return Duration::ZERO;
        };
        let now_number = now_ms.div_euclid(bucket_ms);
        let full = now_number - i64::from(BUCKETS) + 1;
        let reach = self
            .shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).floor)
            .fold(full, i64::max);
        // Whole buckets reach back to `reach`; the newest is partly filled.
        Duration::from_millis(((now_number - reach) * bucket_ms).max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    /// The id sets use the keyed hash as it is: hashing it again would be
    /// wasted work, and a constant would put every id in one probe chain
    /// (right answers, at a crawl), which no answer-checking test sees.
    #[test]
    fn the_id_set_uses_an_ids_hash_as_it_is() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<PassThrough>::default();
        for id in [0, 1, 42, u64::MAX, IdHash::of("bot", "e1").0] {
            assert_eq!(build.hash_one(id), id);
        }
    }

    /// The batched check answers as one id at a time would, in order: the
    /// same ids and times through both, many of them repeats (within a
    /// batch and across batches, some past the window).
    #[test]
    fn check_many_answers_as_check_one_at_a_time() {
        let one = Dedupe::new(Duration::from_secs(1600), usize::MAX);
        let many = Dedupe::new(Duration::from_secs(1600), usize::MAX);
        let (mut seen, mut both) = (Vec::new(), [false; 2]);
        for batch in 0..80i64 {
            let now = NOW + batch * 50_000;
            let size = [1, 5, 40, 300][batch as usize % 4];
            let ids: Vec<IdHash> = (0..size)
                .map(|i| IdHash::of("bot", &format!("{}", (batch * 211 + i * 7) % 2000)))
                .collect();
            let want: Vec<Seen> = ids.iter().map(|id| one.check(*id, now)).collect();
            many.check_many(&ids, now, &mut seen);
            assert_eq!(seen, want, "batch {batch}");
            assert_eq!(many.len(), one.len(), "batch {batch}");
            assert_eq!(many.effective_window(now), one.effective_window(now));
            both[0] |= seen.contains(&Seen::First);
            both[1] |= seen.contains(&Seen::Duplicate);
        }
        assert_eq!(both, [true, true], "both answers exercised");
    }

    /// Under the memory bound the batched check forgets old buckets as one
    /// at a time does, one per id added at most, after its lookups (so a
    /// batch may find an id in a bucket it then forgets: never fewer
    /// duplicates than one at a time).
    #[test]
    fn check_many_keeps_the_memory_bound() {
        let d = Dedupe::new(Duration::from_secs(1600), 16 * 100);
        let mut seen = Vec::new();
        for t in 0..16 {
            let ids: Vec<IdHash> = (0..200)
                .map(|i| IdHash::of("bot", &format!("{t}-{i}")))
                .collect();
            d.check_many(&ids, NOW + t * 100_000, &mut seen);
            assert!(seen.iter().all(|s| *s == Seen::First));
        }
        assert!(d.len() <= 16 * 100, "bounded: {}", d.len());
        assert!(d.effective_window(NOW + 1_500_000) < Duration::from_secs(1600));
        d.check_many(&[IdHash::of("bot", "15-199")], NOW + 1_500_000, &mut seen);
        assert_eq!(
            seen,
            [Seen::Duplicate],
            "the newest ids are still remembered"
        );
    }

    #[test]
    fn a_repeat_within_the_window_is_a_duplicate() {
        let d = Dedupe::new(Duration::from_secs(600), 1_000_000);
        assert!(d.enabled());
        let id = IdHash::of("bot", "e1");
        assert_eq!(d.check(id, NOW), Seen::First);
        assert_eq!(d.check(id, NOW + 599_000), Seen::Duplicate);
        assert_eq!(d.check(IdHash::of("other", "e1"), NOW), Seen::First);
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn ids_expire_after_the_window_plus_at_most_a_bucket() {
        let d = Dedupe::new(Duration::from_secs(160), 1_000_000);
        let id = IdHash::of("bot", "e1");
        assert_eq!(d.check(id, NOW), Seen::First);
        assert_eq!(d.check(id, NOW + 170_000), Seen::First);
        assert_eq!(d.len(), 1, "the expired bucket was dropped");
    }

    #[test]
    fn the_memory_bound_forgets_the_oldest_first_and_says_so() {
        let d = Dedupe::new(Duration::from_secs(1600), 16 * 100);
        for t in 0..16 {
            for i in 0..200 {
                d.check(IdHash::of("bot", &format!("{t}-{i}")), NOW + t * 100_000);
            }
        }
        // Every insert over the bound forgets a whole older bucket (each
        // shard has several here), so the bound holds exactly.
        assert!(d.len() <= 16 * 100, "bounded: {}", d.len());
        let window = d.effective_window(NOW + 1_500_000);
        assert!(window < Duration::from_secs(1600), "{window:?}");
        // The newest ids are still remembered.
        assert_eq!(
            d.check(IdHash::of("bot", "15-199"), NOW + 1_500_000),
            Seen::Duplicate
        );
    }

    /// Exactly the bound, over 8 buckets: every id kept, the whole window.
    #[test]
    fn at_the_bound_nothing_is_forgotten() {
        let d = Dedupe::new(Duration::from_secs(1600), 1600);
        let unbounded = Dedupe::new(Duration::from_secs(1600), usize::MAX);
        let ids: Vec<(IdHash, i64)> = (0..8)
            .flat_map(|t| (0..200).map(move |i| (IdHash::of("bot", &format!("{t}-{i}")), t)))
            .collect();
        for &(id, t) in &ids {
            assert_eq!(d.check(id, NOW + t * 100_000), Seen::First);
            unbounded.check(id, NOW + t * 100_000);
        }
        assert_eq!(d.len(), 1600);
        let now = NOW + 800_000;
        assert_eq!(d.effective_window(now), unbounded.effective_window(now));
        for &(id, _) in &ids {
            assert_eq!(d.check(id, now), Seen::Duplicate);
        }
    }

    /// The bound never forgets the bucket being filled: ids within it are
    /// all kept, however far over the bound.
    #[test]
    fn the_bound_never_forgets_the_current_bucket() {
        let d = Dedupe::new(Duration::from_secs(1600), 16);
        for i in 0..100 {
            assert_eq!(d.check(IdHash::of("bot", &i.to_string()), NOW), Seen::First);
        }
        assert_eq!(d.len(), 100);
        for i in 0..100 {
            assert_eq!(
                d.check(IdHash::of("bot", &i.to_string()), NOW),
                Seen::Duplicate
            );
        }
    }

    #[test]
    fn off_when_the_window_is_zero() {
        let d = Dedupe::new(Duration::ZERO, 10);
        assert!(!d.enabled());
        let id = IdHash::of("bot", "e1");
        assert_eq!(d.check(id, NOW), Seen::First);
        assert_eq!(d.check(id, NOW), Seen::First);
        assert_eq!(d.effective_window(NOW), Duration::ZERO);
    }

    #[test]
    fn ids_read_back_at_start_are_duplicates() {
        let d = Dedupe::new(Duration::from_secs(600), 1_000);
        let id = IdHash::of("bot", "e1");
        d.remember(id, NOW - 100_000, NOW);
        d.remember(IdHash::of("bot", "old"), NOW - 10_000_000, NOW);
        assert_eq!(d.check(id, NOW), Seen::Duplicate);
        assert_eq!(d.check(IdHash::of("bot", "old"), NOW), Seen::First);
    }

    /// Read back twice (two journal segments may hold it) an id is
    /// remembered once; one older than the window is not remembered at all.
    #[test]
    fn ids_read_back_are_counted_once_and_only_within_the_window() {
        let d = Dedupe::new(Duration::from_secs(600), 1_000);
        let id = IdHash::of("bot", "e1");
        d.remember(id, NOW - 100_000, NOW);
        d.remember(id, NOW - 100_000, NOW);
        assert_eq!(d.len(), 1);
        d.remember(IdHash::of("bot", "old"), NOW - 10_000_000, NOW);
        assert_eq!(d.len(), 1);
    }

    /// An id seen in a later bucket lives as long as that bucket, not as
    /// long as an older one of the same shard.
    #[test]
    fn each_id_expires_with_its_own_bucket() {
        // 600 s in 16 buckets: 37.5 s each, and NOW starts one.
        const BUCKET_MS: i64 = 37_500;
        let d = Dedupe::new(Duration::from_secs(600), 1_000);
        // The same high bits: the same shard.
        let (first, later) = (IdHash(1), IdHash(2));
        assert_eq!(d.check(first, NOW), Seen::First);
        assert_eq!(d.check(later, NOW + BUCKET_MS), Seen::First);
        // A third id at NOW joins the first one's bucket: one set per
        // bucket, not one per id.
        assert_eq!(d.check(IdHash(3), NOW + 1), Seen::First);
        let buckets = |d: &Dedupe| d.shards[0].lock().unwrap().buckets.len();
        assert_eq!(buckets(&d), 2);
        // The first bucket has expired, the later one not.
        let t = NOW + 16 * BUCKET_MS;
        assert_eq!(d.check(later, t), Seen::Duplicate);
        assert_eq!(d.check(first, t), Seen::First);
    }
}
