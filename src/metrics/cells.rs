//! The storage cells behind every `bot_*` series: lock-free counters and
//! histograms, and capped families for free-form labels.
//!
//! The prometheus crate's own types cannot be set to a value, so a restart
//! could not restore a histogram. These cells can be read for a snapshot and
//! restored to exact values, and they are exposed through a custom
//! `Collector` (see `collector.rs`) on the application's `Registry`.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus::IntCounter;

/// A float that many threads add to without a lock.
#[derive(Debug, Default)]
pub struct AtomicF64(AtomicU64);

impl AtomicF64 {
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }

    pub fn add(&self, v: f64) {
        // A compare-and-swap loop: there is no native float add. Contention
        // is between at most a handful of request threads, so it is short.
        let _ = self.0.fetch_update(Relaxed, Relaxed, |bits| {
            Some((f64::from_bits(bits) + v).to_bits())
        });
    }

    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Relaxed);
    }
}

/// A monotonic counter. Floats, because custom events may carry fractional
/// values; every integer up to 2^53 is still exact.
pub type Counter = AtomicF64;

/// Money: integer micro-units of the currency, so a sum never drifts
/// (see `prices`). Exposed and stored in currency units.
#[derive(Debug, Default)]
pub struct Micros(AtomicU64);

impl Micros {
    pub fn add(&self, micros: u64) {
        let _ = self
            .0
            .fetch_update(Relaxed, Relaxed, |m| Some(m.saturating_add(micros)));
    }

    pub fn micros(&self) -> u64 {
        self.0.load(Relaxed)
    }

    /// In currency units: exact below 2^53 micro-units (9 billion units).
    pub fn get(&self) -> f64 {
        self.micros() as f64 / 1e6
    }

    /// Adds a stored value, given in currency units.
    pub fn restore(&self, value: f64) {
        if value.is_finite() && value > 0.0 {
            self.add((value * 1e6).round() as u64);
        }
    }
}

/// A histogram with fixed bounds. Buckets hold non-cumulative counts so an
/// observation touches exactly one bucket; they are summed on read.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One more than `bounds`: the last bucket is `+Inf`.
    buckets: Box<[AtomicU64]>,
    sum: AtomicF64,
}

/// Each table of histogram bounds as the `le` texts of its bucket lines,
/// formatted once (formatting a float costs more than the rest of a line),
/// for a render or a flush that writes many histograms of few tables.
#[derive(Default)]
pub struct LeTexts(Vec<(&'static [f64], Vec<String>)>);

impl LeTexts {
    /// The texts of `bounds`, in order (`+Inf` not included).
    pub fn of(&mut self, bounds: &'static [f64]) -> &[String] {
        let i = match self.0.iter().position(|(b, _)| std::ptr::eq(*b, bounds)) {
            Some(i) => i,
            None => {
                self.0
                    .push((bounds, bounds.iter().map(f64::to_string).collect()));
                self.0.len() - 1
            }
        };
        &self.0[i].1
    }
}

/// What a histogram holds at one instant, in exposition form.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    /// Cumulative counts per bound, then the `+Inf` bucket (= count).
    pub cumulative: Vec<u64>,
    pub sum: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The `q` quantile, interpolated linearly inside the bucket it falls in,
    /// as PromQL's `histogram_quantile` does. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = q * count as f64;
        let i = self.cumulative.iter().position(|&c| c as f64 >= rank)?;
        if i == self.bounds.len() {
            // In the +Inf bucket: the highest finite bound is the best answer.
            return self.bounds.last().copied();
        }
        let (lower, below) = if i == 0 {
            (0.0, 0)
        } else {
            (self.bounds[i - 1], self.cumulative[i - 1])
        };
        let in_bucket = self.cumulative[i] - below;
        if in_bucket == 0 {
            return Some(self.bounds[i]);
        }
        Some(lower + (self.bounds[i] - lower) * (rank - below as f64) / in_bucket as f64)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicF64::default(),
        }
    }

    pub fn observe(&self, v: f64) {
        // `le` semantics: a value equal to a bound belongs to that bucket.
        let i = self.bounds.partition_point(|&b| b < v);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum.add(v);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Relaxed);
                total
            })
            .collect();
        HistogramSnapshot {
            bounds: self.bounds,
            cumulative,
            sum: self.sum.get(),
        }
    }

    /// Adds a stored snapshot (cumulative counts, as exposed) back in.
    /// The stored lines may be any subset of this build's bounds (`+Inf`
    /// included), in any order: Redis, and so the cluster's store rows,
    /// hold only the lines a sync ever moved, because a sync sends only
    /// non-zero deltas. A line is missing only when no sync ever moved it:
    /// no value at or below its bound was ever counted, so it is 0, and so
    /// is every line below it. Taking the nearest present line below (0 if
    /// none) is then exact, and keeps any stored set monotone. Returns
    /// false, changing nothing, when a stored bound is not one of this
    /// build's, because the buckets would not mean the same thing.
    pub fn restore(&self, cumulative_by_bound: &[(f64, u64)], sum: f64) -> bool {
        let Some(whole) = whole_lines(self.bounds, cumulative_by_bound) else {
            return false;
        };
        let mut below = 0;
        for (bucket, cumulative) in self.buckets.iter().zip(whole) {
            bucket.fetch_add(cumulative.saturating_sub(below), Relaxed);
            below = below.max(cumulative);
        }
        self.sum.add(sum);
        true
    }
}

/// Every cumulative line of `bounds` and then `+Inf`, from the `lines`
/// stored (any subset, any order): a missing line is the nearest present
/// line below it, 0 if none (see [`Histogram::restore`]). `None` when a
/// stored bound is not one of `bounds`, or one is stored twice with two
/// values.
pub fn whole_lines(bounds: &[f64], lines: &[(f64, u64)]) -> Option<Vec<u64>> {
    let mut present: Vec<Option<u64>> = vec![None; bounds.len() + 1];
    for &(le, cumulative) in lines {
        let i = if le == f64::INFINITY {
            bounds.len()
        } else {
            bounds.iter().position(|&b| b == le)?
        };
        match present[i] {
            Some(seen) if seen != cumulative => return None,
            _ => present[i] = Some(cumulative),
        }
    }
    let mut below = 0;
    Some(
        present
            .into_iter()
            .map(|line| {
                // The running maximum: a line below that is higher than a
                // present line cannot be (lines never decrease), so the
                // buckets restored stay non-negative whatever was stored.
                below = below.max(line.unwrap_or(below));
                below
            })
            .collect(),
    )
}

/// The value a free-form label takes once its family is full.
pub const OVERFLOW_VALUE: &str = "other";

/// Series keyed by one free-form label value, capped at a number of distinct
/// values. Past the cap new values share the `other` series, and the
/// overflow counter says so: the event still counts, only its label is
/// coarsened.
#[derive(Debug)]
pub struct Family<T> {
    cap: usize,
    /// Looked up for most events (a model, a cache, an error kind), so the
    /// hash is foldhash's rather than SipHash: several times cheaper on a
    /// short name. Its seed is random per process, and a family holds at
    /// most `cap` values from authenticated bots, so the table cannot be
    /// flooded.
    series: RwLock<HashMap<Box<str>, T, foldhash::fast::RandomState>>,
    overflow: IntCounter,
}

impl<T: Default> Family<T> {
    pub fn new(cap: usize, overflow: IntCounter) -> Self {
        Family {
            cap,
            series: RwLock::new(HashMap::default()),
            overflow,
        }
    }

    /// Runs `f` on the series for `value`, creating it if needed. The common
    /// case, a value already seen, takes a shared lock and does not allocate.
    pub fn with<R>(&self, value: &str, f: impl FnOnce(&T) -> R) -> R {
        {
            let series = self.series.read().unwrap_or_else(|e| e.into_inner());
            if let Some(cell) = series.get(value) {
                return f(cell);
            }
        }
        let mut series = self.series.write().unwrap_or_else(|e| e.into_inner());
        let distinct = series.len() - usize::from(series.contains_key(OVERFLOW_VALUE));
        let key = if series.contains_key(value) || distinct < self.cap || value == OVERFLOW_VALUE {
            value
        } else {
            self.overflow.inc();
            OVERFLOW_VALUE
        };
        f(series.entry(key.into()).or_default())
    }

    /// Like [`Family::with`] but never folds into `other`: for restoring a
    /// stored series. It was admitted under the cap when it was counted;
    /// folding it now would leave its stored row beside the `other` row it
    /// went into, and the next restart would count it twice. New values
    /// still fold once the family is full.
    pub fn with_restored<R>(&self, value: &str, f: impl FnOnce(&T) -> R) -> R {
        let mut series = self.series.write().unwrap_or_else(|e| e.into_inner());
        f(series.entry(value.into()).or_default())
    }

    /// Calls `f` for every series, ordered by label value so output is stable.
    pub fn for_each(&self, mut f: impl FnMut(&str, &T)) {
        let series = self.series.read().unwrap_or_else(|e| e.into_inner());
        let mut keys: Vec<&Box<str>> = series.keys().collect();
        keys.sort_unstable();
        for key in keys {
            f(key, &series[key]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[1.0, 2.0, 5.0];

    #[test]
    fn histogram_buckets_use_le() {
        let h = Histogram::new(BOUNDS);
        for v in [0.5, 1.0, 1.5, 2.0, 4.0, 100.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.cumulative, vec![2, 4, 5, 6]);
        assert_eq!(s.count(), 6);
        assert_eq!(s.sum, 109.0);
    }

    #[test]
    fn histogram_restores_exactly() {
        let h = Histogram::new(BOUNDS);
        for v in [0.5, 1.5, 3.0, 3.0, 7.0] {
            h.observe(v);
        }
        let s = h.snapshot();
        let restored = Histogram::new(BOUNDS);
        let pairs: Vec<(f64, u64)> = BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(s.cumulative.iter().copied())
            .collect();
        assert!(restored.restore(&pairs, s.sum));
        assert_eq!(restored.snapshot(), s);
        assert!(
            !restored.restore(&[(1.5, 1), (f64::INFINITY, 1)], 1.0),
            "other bounds are refused"
        );
        assert_eq!(restored.snapshot(), s);
    }

    #[test]
    fn a_histogram_missing_the_lines_no_value_moved_restores_whole() {
        // What Redis holds after two slow values: only the lines a sync
        // moved (le=5 and +Inf), in any order.
        let h = Histogram::new(BOUNDS);
        assert!(h.restore(&[(f64::INFINITY, 2), (5.0, 2)], 8.0));
        let s = h.snapshot();
        assert_eq!(s.cumulative, vec![0, 0, 2, 2]);
        assert_eq!(s.quantile(0.5), Some(3.5), "halfway through (2, 5]");
        // A missing line between present ones is the present line below it.
        let h = Histogram::new(BOUNDS);
        assert!(h.restore(&[(1.0, 3), (5.0, 4), (f64::INFINITY, 4)], 6.0));
        assert_eq!(h.snapshot().cumulative, vec![3, 3, 4, 4]);
        // A bound this build does not know, or one line with two values,
        // is refused, changing nothing.
        assert!(!h.restore(&[(3.0, 1), (f64::INFINITY, 1)], 1.0));
        assert!(!h.restore(&[(5.0, 1), (5.0, 2)], 1.0));
        assert_eq!(h.snapshot().cumulative, vec![3, 3, 4, 4]);
        assert_eq!(h.snapshot().sum, 6.0);
    }

    #[test]
    fn quantiles_interpolate_like_promql() {
        let h = Histogram::new(BOUNDS);
        assert_eq!(h.snapshot().quantile(0.5), None);
        for _ in 0..10 {
            h.observe(1.5);
        }
        // All ten in (1, 2]: the median sits halfway through that bucket.
        assert_eq!(h.snapshot().quantile(0.5), Some(1.5));
        h.observe(1000.0);
        assert_eq!(h.snapshot().quantile(1.0), Some(5.0));
    }

    #[test]
    fn restored_values_are_never_folded() {
        let overflow = IntCounter::new("o", "o").unwrap();
        let f: Family<Counter> = Family::new(1, overflow.clone());
        f.with("new", |c| c.add(1.0));
        f.with_restored("a", |c| c.add(2.0));
        f.with_restored("b", |c| c.add(3.0));
        f.with("c", |c| c.add(4.0));
        let mut seen = Vec::new();
        f.for_each(|k, c| seen.push((k.to_owned(), c.get())));
        assert_eq!(
            seen,
            [
                ("a".into(), 2.0),
                ("b".into(), 3.0),
                ("new".into(), 1.0),
                ("other".into(), 4.0)
            ]
        );
        assert_eq!(overflow.get(), 1, "only the new value overflowed");
    }

    #[test]
    fn family_caps_distinct_values() {
        let overflow = IntCounter::new("o", "o").unwrap();
        let f: Family<Counter> = Family::new(2, overflow.clone());
        for name in ["a", "b", "c", "d", "a"] {
            f.with(name, |c| c.add(1.0));
        }
        let mut seen = Vec::new();
        f.for_each(|k, c| seen.push((k.to_owned(), c.get())));
        assert_eq!(
            seen,
            [("a".into(), 2.0), ("b".into(), 1.0), ("other".into(), 2.0)]
        );
        assert_eq!(overflow.get(), 2);
    }
}
