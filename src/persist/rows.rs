//! Memory ↔ rows: the cells of every series as the store's rows (what a
//! flush, a history point and a sync send), and rows added back into cells
//! (what a restore, a reseed and the cluster summary read).
//!
//! Restoring *adds* into the cells what the store holds beyond what this
//! process last wrote there (everything, at start). That one rule makes
//! every late restore exact: the database was down at start and came back,
//! a standby takes over from a stopped writer, or a writer retakes the lease
//! after another process wrote meanwhile: memory becomes what it counted
//! plus what others stored.

use std::collections::{BTreeMap, HashMap};

use chrono::NaiveDate;

use crate::metrics::bot::{ACTIVE_USERS, FAMILIES, FamilyDesc, Kind, Visitor, histogram_bounds};
use crate::metrics::cells::whole_lines;
use crate::metrics::today::Calendar;
use crate::metrics::{BotMetrics, HistogramSnapshot, Metrics};
use crate::store::{self, DailyRow, FlushBatch, SeriesRow};

/// A series' identity in the store, as one string (one allocation per
/// lookup instead of three): no part contains a NUL, so it is unambiguous.
type SeriesKey = String;

fn key(row: &SeriesRow) -> SeriesKey {
    [row.metric.as_str(), row.bot.as_str(), row.labels.as_str()].join("\0")
}

/// What the store holds of each series, as this process last wrote or read
/// it, so a flush sends only changes.
#[derive(Default)]
pub struct Written(HashMap<SeriesKey, f64>);

impl Written {
    pub fn of(rows: &[SeriesRow]) -> Self {
        Written(rows.iter().map(|r| (key(r), r.value)).collect())
    }

    fn get(&self, row: &SeriesRow) -> Option<f64> {
        self.0.get(&key(row)).copied()
    }

    /// Puts each row that differs from the store into `batch`: an update
    /// for a series the store has, an insert for a new one.
    pub fn changes(&self, rows: Vec<SeriesRow>, batch: &mut FlushBatch) {
        for row in rows {
            match self.get(&row) {
                Some(stored) if stored == row.value => {}
                Some(_) => batch.changed.push(row),
                None => batch.added.push(row),
            }
        }
    }

    /// After `batch` was written: the store holds its rows, or, when rows
    /// had gone missing from it, nothing is assumed and the next flush
    /// writes every series.
    pub fn wrote(&mut self, batch: &FlushBatch, report: store::FlushReport) {
        if report.missing {
            tracing::warn!(
                "rows of real_time_metrics disappeared; the next flush rewrites every series"
            );
            self.0.clear();
        } else {
            for row in batch.changed.iter().chain(&batch.added) {
                self.0.insert(key(row), row.value);
            }
        }
    }
}

/// What the store holds of each "today" counter: (bot, counter) → (day, value).
pub type Daily = HashMap<(String, String), (NaiveDate, i64)>;

/// Labels other than `bot` as a canonical JSON object (keys sorted).
fn labels_json<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let map: BTreeMap<&str, &str> = pairs.into_iter().collect();
    serde_json::to_string(&map).unwrap_or_else(|_| "{}".to_owned())
}

/// Flattens every series to the rows the store keeps, histogram lines
/// included, exactly as they are exposed.
struct Flatten(Vec<SeriesRow>);

impl Visitor for Flatten {
    fn scalar(&mut self, family: &'static FamilyDesc, labels: &[&str], value: f64) {
        let pairs = family
            .labels
            .iter()
            .copied()
            .zip(labels.iter().copied())
            .skip(1);
        self.0.push(SeriesRow {
            metric: family.name.to_owned(),
            bot: labels[0].to_owned(),
            labels: labels_json(pairs),
            value,
        });
    }

    fn histogram(&mut self, family: &'static FamilyDesc, labels: &[&str], h: &HistogramSnapshot) {
        let bot = labels[0];
        let others: Vec<(&str, &str)> = family
            .labels
            .iter()
            .copied()
            .zip(labels.iter().copied())
            .skip(1)
            .collect();
        let bounds = h
            .bounds
            .iter()
            .map(|b| b.to_string())
            .chain(["+Inf".to_owned()]);
        for (le, count) in bounds.zip(&h.cumulative) {
            let pairs = others.iter().copied().chain([("le", le.as_str())]);
            self.0.push(SeriesRow {
                metric: format!("{}_bucket", family.name),
                bot: bot.to_owned(),
                labels: labels_json(pairs),
                value: *count as f64,
            });
        }
        for (suffix, value) in [("_sum", h.sum), ("_count", h.count() as f64)] {
            self.0.push(SeriesRow {
                metric: format!("{}{suffix}", family.name),
                bot: bot.to_owned(),
                labels: labels_json(others.iter().copied()),
                value,
            });
        }
    }
}

/// Completes each histogram among `series` with the bucket lines it lacks,
/// so that it reads back whole in `real_time_metrics`, in history, and in
/// whatever restores it. Redis holds only the lines a sync ever moved (a
/// sync sends only non-zero deltas), so an LLM bot that never answered
/// under 50 ms has no `le="0.05"` line there. A missing line is the
/// nearest present line below it, 0 if none, which is exact (see
/// `Histogram::restore`). A
/// histogram with a line this build does not know is left as it is: its
/// restore refuses it, and says so.
pub fn whole_histograms(series: &mut Vec<SeriesRow>) {
    // (family, bot, labels other than `le`) → the lines present.
    type Group = (&'static str, String, String);
    let mut groups: BTreeMap<Group, Vec<(f64, u64)>> = BTreeMap::new();
    for row in series.iter() {
        let Some(family) = FAMILIES.iter().find_map(|f| {
            let bucket = f.kind == Kind::Histogram && row.metric.strip_prefix(f.name)? == "_bucket";
            bucket.then_some(f.name)
        }) else {
            continue;
        };
        let mut labels: BTreeMap<String, String> =
            serde_json::from_str(&row.labels).unwrap_or_default();
        let le = labels.remove("le").and_then(|le| match le.as_str() {
            "+Inf" => Some(f64::INFINITY),
            le => le.parse::<f64>().ok(),
        });
        let others = labels_json(labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let lines = groups.entry((family, row.bot.clone(), others)).or_default();
        match le {
            Some(le) => lines.push((le, row.value as u64)),
            // Unreadable: never guessed at, the group is left alone.
            None => lines.push((f64::NAN, 0)),
        }
    }
    for ((family, bot, others), lines) in groups {
        let Some(bounds) = histogram_bounds(family) else {
            continue;
        };
        let Some(whole) = whole_lines(bounds, &lines) else {
            continue;
        };
        let others: BTreeMap<String, String> = serde_json::from_str(&others).unwrap_or_default();
        let les = bounds
            .iter()
            .map(|b| (*b, b.to_string()))
            .chain([(f64::INFINITY, "+Inf".to_owned())]);
        for ((bound, le), value) in les.zip(whole) {
            if lines.iter().any(|(l, _)| *l == bound) {
                continue;
            }
            let pairs = others
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .chain([("le", le.as_str())]);
            series.push(SeriesRow {
                metric: format!("{family}_bucket"),
                bot: bot.clone(),
                labels: labels_json(pairs),
                value: value as f64,
            });
        }
    }
}

/// Every series as stored rows. A non-finite value cannot arise from
/// checked input (every number has a range); should one ever appear it is
/// left out, so that one bad series never blocks every other bot's writes.
pub fn snapshot(metrics: &Metrics) -> Vec<SeriesRow> {
    let mut flat = Flatten(Vec::with_capacity(1024));
    metrics.visit(&mut flat);
    finite(flat.0)
}

/// One bot's series as stored rows, as [`snapshot`] gives them.
pub fn bot_rows(bot: &crate::metrics::BotMetrics) -> Vec<SeriesRow> {
    let mut flat = Flatten(Vec::with_capacity(64));
    bot.visit(&mut flat);
    finite(flat.0)
}

fn finite(mut rows: Vec<SeriesRow>) -> Vec<SeriesRow> {
    let before = rows.len();
    rows.retain(|r| r.value.is_finite());
    if rows.len() < before {
        tracing::error!(
            series = before - rows.len(),
            "non-finite values left out of the store"
        );
    }
    rows
}

/// What the store holds beyond what this process believes it wrote
/// (`written`, `daily`): the part a restore adds into memory.
pub fn beyond(stored: &store::Stored, written: &Written, daily: &Daily) -> store::Stored {
    let series = stored
        .series
        .iter()
        .filter(|r| r.value.is_finite())
        .map(|r| {
            let mine = written.get(r).unwrap_or(0.0);
            SeriesRow {
                value: (r.value - mine).max(0.0),
                ..r.clone()
            }
        })
        .collect();
    let daily = stored
        .daily
        .iter()
        .map(|d| {
            let mine = match daily.get(&(d.bot.clone(), d.name.clone())) {
                Some((day, v)) if *day == d.day => *v,
                _ => 0,
            };
            DailyRow {
                value: (d.value - mine).max(0),
                ..d.clone()
            }
        })
        .collect();
    store::Stored {
        series,
        // Sketches merge as a union: adding them again changes nothing.
        sketches: stored.sketches.clone(),
        daily,
        progress: stored.progress.clone(),
        ..store::Stored::default()
    }
}

/// What a restore did, for the start-up log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub series: usize,
    pub sketches: usize,
    pub daily: usize,
    /// Rows for bots no longer configured, or metrics this build does not
    /// know: kept in the store, not loaded.
    pub skipped: usize,
}

/// Adds stored values into the (fresh) cells.
pub fn restore(metrics: &Metrics, stored: &store::Stored, now: i64) -> RestoreReport {
    restore_into(
        |name| metrics.bot(name).map(|b| &**b),
        metrics.calendar(),
        stored,
        now,
    )
}

/// [`restore`] into whichever cells `bot_of` names: a process's own, or a
/// scratch copy (`Metrics::scratch`).
pub fn restore_into<'m>(
    bot_of: impl Fn(&str) -> Option<&'m BotMetrics>,
    calendar: &Calendar,
    stored: &store::Stored,
    now: i64,
) -> RestoreReport {
    let mut report = RestoreReport::default();
    // Histogram lines are grouped first: a histogram is restored whole.
    #[derive(Default)]
    struct Hist {
        buckets: Vec<(f64, u64)>,
        sum: f64,
        count: Option<u64>,
        rows: usize,
    }
    let mut histograms: HashMap<(&str, &str), Hist> = HashMap::new();
    for row in &stored.series {
        let Some(bot) = bot_of(&row.bot) else {
            report.skipped += 1;
            continue;
        };
        // Active-user gauges are derived from sketches, not restored.
        if row.metric == ACTIVE_USERS.name {
            continue;
        }
        let labels: BTreeMap<String, String> =
            serde_json::from_str(&row.labels).unwrap_or_default();
        // A histogram line: `<family>_bucket`, `_sum` or `_count`.
        let line = FAMILIES
            .iter()
            .filter(|f| f.kind == Kind::Histogram)
            .find_map(|f| Some((f.name, row.metric.strip_prefix(f.name)?)));
        if let Some((family, suffix @ ("_bucket" | "_sum" | "_count"))) = line {
            let hist = histograms.entry((family, &row.bot)).or_default();
            hist.rows += 1;
            match suffix {
                "_bucket" => {
                    let le = labels.get("le").and_then(|le| match le.as_str() {
                        "+Inf" => Some(f64::INFINITY),
                        le => le.parse::<f64>().ok(),
                    });
                    match le {
                        Some(le) => hist.buckets.push((le, row.value as u64)),
                        None => report.skipped += 1,
                    }
                }
                "_sum" => hist.sum = row.value,
                // The count is the +Inf line: used when that line is missing.
                _ => hist.count = Some(row.value as u64),
            }
            continue;
        }
        let pairs: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if bot.restore_scalar(&row.metric, &pairs, row.value) {
            report.series += 1;
        } else {
            report.skipped += 1;
        }
    }
    for ((family, bot), mut hist) in histograms {
        if let Some(count) = hist.count
            && !hist.buckets.iter().any(|(le, _)| *le == f64::INFINITY)
        {
            hist.buckets.push((f64::INFINITY, count));
        }
        hist.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        match bot_of(bot) {
            Some(b) if b.restore_histogram(family, &hist.buckets, hist.sum) => {
                report.series += hist.rows
            }
            _ => {
                tracing::warn!(
                    family,
                    bot,
                    "stored histogram has a bucket this build does not know; not restored"
                );
                report.skipped += hist.rows;
            }
        }
    }
    for s in &stored.sketches {
        match bot_of(&s.bot) {
            Some(b) if b.active.restore(&s.sketch) => report.sketches += 1,
            _ => report.skipped += 1,
        }
    }
    let today = calendar.day_of(now);
    for d in &stored.daily {
        let counter = bot_of(&d.bot).and_then(|b| b.today.counter(&d.name));
        match counter {
            // Yesterday's count is not today's: it stays stored until replaced.
            Some(c) if Calendar::day_number(d.day) == today => {
                c.restore(today, d.value.max(0) as u64);
                report.daily += 1;
            }
            Some(_) => {}
            None => report.skipped += 1,
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::bot::RESPONSE_BUCKETS;

    fn row(metric: &str, labels: &str, value: f64) -> SeriesRow {
        SeriesRow {
            metric: metric.to_owned(),
            bot: "a".to_owned(),
            labels: labels.to_owned(),
            value,
        }
    }

    /// What Redis holds after one response of 1,840 ms: the lines from
    /// le=2 up, the sum and the count; no line below 2 s ever moved.
    fn slow_response_in_redis() -> Vec<SeriesRow> {
        let family = "bot_response_duration_seconds";
        let mut rows: Vec<SeriesRow> = RESPONSE_BUCKETS
            .iter()
            .filter(|b| **b >= 2.0)
            .map(|b| b.to_string())
            .chain(["+Inf".to_owned()])
            .map(|le| {
                row(
                    &format!("{family}_bucket"),
                    &format!(r#"{{"le":"{le}"}}"#),
                    1.0,
                )
            })
            .collect();
        rows.push(row(&format!("{family}_sum"), "{}", 1.84));
        rows.push(row(&format!("{family}_count"), "{}", 1.0));
        rows
    }

    #[test]
    fn rows_missing_histogram_lines_are_completed_and_restore_whole() {
        let metrics = Metrics::new(&["a".into()], 10, chrono_tz::UTC, 30.0).unwrap();
        let calendar = metrics.calendar();
        // The rows restore as they are...
        let stored = store::Stored {
            series: slow_response_in_redis(),
            ..store::Stored::default()
        };
        let bot = metrics.bot("a").unwrap();
        let report = restore_into(|_| Some(bot), calendar, &stored, 0);
        assert_eq!(report.skipped, 0);
        let h = bot.response_duration();
        assert_eq!(h.count(), 1);
        let p50 = h.quantile(0.5).unwrap();
        assert!((1.0..=2.0).contains(&p50), "in (1, 2]: {p50}");
        // ...and completed, they are every line a flush of the same
        // histogram writes, with the same values.
        let mut rows = slow_response_in_redis();
        whole_histograms(&mut rows);
        let mut written: Vec<(String, String, u64)> = snapshot(&metrics)
            .into_iter()
            .filter(|r| r.metric == "bot_response_duration_seconds_bucket")
            .map(|r| (r.metric, r.labels, r.value as u64))
            .collect();
        let mut completed: Vec<(String, String, u64)> = rows
            .into_iter()
            .filter(|r| r.metric == "bot_response_duration_seconds_bucket")
            .map(|r| (r.metric, r.labels, r.value as u64))
            .collect();
        written.sort();
        completed.sort();
        assert_eq!(completed, written);
    }

    #[test]
    fn a_histogram_with_an_unknown_bound_is_left_alone_and_refused() {
        let family = "bot_response_duration_seconds";
        let mut rows = vec![
            row(&format!("{family}_bucket"), r#"{"le":"7"}"#, 1.0),
            row(&format!("{family}_bucket"), r#"{"le":"+Inf"}"#, 1.0),
        ];
        whole_histograms(&mut rows);
        assert_eq!(rows.len(), 2, "nothing guessed for another build's buckets");
        let metrics = Metrics::new(&["a".into()], 10, chrono_tz::UTC, 30.0).unwrap();
        let stored = store::Stored {
            series: rows,
            ..store::Stored::default()
        };
        let bot = metrics.bot("a").unwrap();
        let report = restore_into(|_| Some(bot), metrics.calendar(), &stored, 0);
        assert_eq!(report.skipped, 2);
        assert_eq!(bot.response_duration().count(), 0);
    }
}
