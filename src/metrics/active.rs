//! Distinct active users per bot: the 1d, 7d and 30d windows, from
//! HyperLogLog++-style sketches.
//!
//! A user id is hashed with a keyed SipHash (see [`crate::event::UserHash`])
//! and dropped at once. Sketches are kept per UTC hour (24 of them, for the
//! 1d window) and per UTC day (30, for 7d and 30d); a window's estimate is
//! the union of its buckets, so an estimate rolls forward as buckets expire.
//!
//! This file is the per-bot API the rest of the crate uses: counting a
//! user, the windows' estimates, the rows a flush stores and restoring them.
//! How one sketch counts, merges and is stored is `sketch.rs`; how a ring of
//! them follows the clock is `ring.rs`.
//!
//! The hash key and the precisions are fixed so that sketches written by one
//! process (or replica) can be merged with another's after a restart.

use std::sync::Mutex;

use super::ring::Ring;
pub use super::sketch::{PRECISION, REGISTERS, SPARSE_MAX, SPARSE_PRECISION};
use crate::event::UserHash;
#[cfg(test)]
use crate::event::UserId;
pub use crate::store::{Granularity, SketchRow};

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
    #[cfg(test)]
    pub fn insert(&self, user: &UserId<'_>, ts: i64) {
        self.insert_hashed(crate::event::UserKey::legacy().hash(user), ts);
    }

    /// Counts an already hashed user as active at `ts` (unix seconds).
    pub fn insert_hashed(&self, user: UserHash, ts: i64) {
        self.hourly.insert(user.0, ts);
        self.daily.insert(user.0, ts);
    }

    /// [`Self::insert_hashed`] for a request's users (hash, unix seconds)
    /// at once: each ring read once, each bucket's sketch given its users
    /// together. `scratch` is reused between calls.
    pub fn insert_all(&self, users: &[(u64, i64)], scratch: &mut Vec<u64>) {
        self.hourly.insert_all(users, scratch);
        self.daily.insert_all(users, scratch);
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
            ring.take_dirty(&mut rows);
        }
        rows
    }

    /// Marks the given buckets changed again, after a failed flush.
    pub fn mark_dirty(&self, rows: &[SketchRow]) {
        for row in rows {
            self.ring(row.granularity).mark_dirty(row.bucket);
        }
    }

    /// Merges a stored sketch into its bucket (a union, so restoring twice or
    /// merging another replica's sketch never inflates the estimate).
    /// Returns false for a malformed row.
    pub fn restore(&self, row: &SketchRow) -> bool {
        self.ring(row.granularity).restore(row)
    }

    /// Heap bytes held by this bot's sketches (entries and registers; the
    /// fixed ~5 KiB of empty slots aside): at most 54 × 16 KiB.
    pub fn heap_bytes(&self) -> usize {
        self.hourly.heap_bytes() + self.daily.heap_bytes()
    }

    /// The same, counted by walking every sketch (what `heap_bytes` keeps
    /// track of as sketches grow).
    #[cfg(test)]
    fn walked_bytes(&self) -> usize {
        self.hourly.walked_bytes() + self.daily.walked_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ring::{DAY, HOUR};
    use crate::metrics::sketch::{SPARSE_TAG, rank_of};

    #[test]
    fn a_request_counted_at_once_leaves_what_one_by_one_leaves() {
        // Runs over one bucket, two, more than four, a new bucket (its slot
        // claimed), buckets older than the ring, sparse and turning dense.
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let pool: Vec<u64> = (0..5000).map(|_| next()).collect();
        let one = ActiveUsers::new();
        let all = ActiveUsers::new();
        let mut scratch = Vec::new();
        for run in 0..40 {
            let spread = [60, 3 * HOUR, 9 * HOUR, 40 * DAY][run % 4];
            let len = [1, 10, 700, 3000][(run / 4) % 4];
            let base = NOW + run as i64 * HOUR / 2;
            let users: Vec<(u64, i64)> = (0..len)
                .map(|_| {
                    let user = pool[(next() % 5000) as usize];
                    (user, base - (next() % spread as u64) as i64)
                })
                .collect();
            for &(h, ts) in &users {
                one.insert_hashed(UserHash(h), ts);
            }
            all.insert_all(&users, &mut scratch);
        }
        let rows = |a: &ActiveUsers| {
            let mut rows = a.take_dirty();
            rows.sort_by_key(|r| (r.granularity as u8, r.bucket));
            rows
        };
        let (a, b) = (rows(&one), rows(&all));
        assert!(a.len() > 30, "{} buckets", a.len());
        assert_eq!(a, b);
        let now = NOW + 20 * HOUR;
        assert_eq!(one.estimates_at(now), all.estimates_at(now));
    }

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
        let hash = crate::event::UserKey::legacy().hash(&user(7)).0;
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
