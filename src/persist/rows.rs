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

use crate::metrics::bot::{FAMILIES, FamilyDesc, Kind, Visitor, histogram_bounds};
use crate::metrics::cells::{LeTexts, whole_lines};
use crate::metrics::today::Calendar;
use crate::metrics::{BotMetrics, HistogramSnapshot, Metrics};
use crate::store::{self, DailyRow, FlushBatch, SeriesRow};

/// What the store holds of each series, as this process last wrote or read
/// it, so a flush sends only changes.
///
/// A series is known by a 128-bit digest of its name and labels, under its
/// bot: two SipHashes with random keys, so no input can be made to collide,
/// and chance makes two of a million series collide with odds of 2^-88.
/// Kept as strings, the keys of 1,000 bots' 88,000 series were 9 MB on the
/// heap, each its own allocation; as digests they are 2 MB and none.
#[derive(Default)]
pub struct Written {
    seeds: [std::hash::RandomState; 2],
    bots: HashMap<String, SeriesValues>,
}

/// One bot's series in [`Written`]: digest → value.
type SeriesValues = HashMap<u128, f64, foldhash::fast::RandomState>;

impl Written {
    pub fn of(rows: &[SeriesRow]) -> Self {
        let mut written = Written::default();
        for r in rows {
            written.set(&r.bot, &r.metric, &r.labels, r.value);
        }
        written
    }

    fn id(&self, metric: &str, labels: &str) -> u128 {
        use std::hash::{BuildHasher, Hasher};
        let [a, b] = self.seeds.each_ref().map(|seed| {
            let mut h = seed.build_hasher();
            h.write(metric.as_bytes());
            // 0xff never occurs in UTF-8: the parts cannot run together.
            h.write_u8(0xff);
            h.write(labels.as_bytes());
            h.finish()
        });
        (u128::from(a) << 64) | u128::from(b)
    }

    fn lookup(&self, metric: &str, bot: &str, labels: &str) -> Option<f64> {
        let series = self.bots.get(bot)?;
        series.get(&self.id(metric, labels)).copied()
    }

    fn get(&self, row: &SeriesRow) -> Option<f64> {
        self.lookup(&row.metric, &row.bot, &row.labels)
    }

    fn set(&mut self, bot: &str, metric: &str, labels: &str, value: f64) {
        let id = self.id(metric, labels);
        match self.bots.get_mut(bot) {
            Some(series) => {
                series.insert(id, value);
            }
            None => {
                let mut series = HashMap::default();
                series.insert(id, value);
                self.bots.insert(bot.to_owned(), series);
            }
        }
    }

    /// Puts each row that differs from the store into `batch`: an update
    /// for a series the store has, an insert for a new one.
    ///
    /// Sorted in place: the larger of the two kinds stays in `rows`' own
    /// allocation and only the smaller is moved out. On the first flush of
    /// 1,000 bots `rows` is 88,000 series (a 10 MB vector); pushing each
    /// into a second vector held both at once, the largest part of the
    /// flush's peak.
    pub fn changes(&self, mut rows: Vec<SeriesRow>, batch: &mut FlushBatch) {
        #[derive(Clone, Copy, PartialEq)]
        enum Kind {
            Same,
            Changed,
            Added,
        }
        let kinds: Vec<Kind> = rows
            .iter()
            .map(|row| match self.get(row) {
                Some(stored) if stored == row.value => Kind::Same,
                Some(_) => Kind::Changed,
                None => Kind::Added,
            })
            .collect();
        let added = kinds.iter().filter(|k| **k == Kind::Added).count();
        let changed = kinds.iter().filter(|k| **k == Kind::Changed).count();
        let (keep, moved) = if added >= changed {
            (Kind::Added, Kind::Changed)
        } else {
            (Kind::Changed, Kind::Added)
        };
        let mut out = Vec::with_capacity(added.min(changed));
        // `extract_if` visits the rows in order: `kind` is the kind of the
        // row it last looked at, which is the row it yields.
        let mut each = kinds.into_iter();
        let kind = std::cell::Cell::new(Kind::Same);
        for row in rows.extract_if(.., |_| {
            kind.set(each.next().unwrap_or(Kind::Same));
            kind.get() != keep
        }) {
            if kind.get() == moved {
                out.push(row);
            }
        }
        let (kept, moved) = match keep {
            Kind::Added => (&mut batch.added, &mut batch.changed),
            _ => (&mut batch.changed, &mut batch.added),
        };
        if kept.is_empty() {
            *kept = rows;
        } else {
            kept.append(&mut rows);
        }
        moved.append(&mut out);
    }

    /// Forgets what the store held of `bots`: a flush deletes their rows
    /// before it writes anything, so every row they have now is new.
    pub fn forget_bots(&mut self, bots: &[String]) {
        for bot in bots {
            self.bots.remove(bot);
        }
    }

    /// After a flush wrote `changed` and `added`: the store holds them, or,
    /// when rows had gone missing from it, nothing is assumed and the next
    /// flush writes every series.
    pub fn wrote(&mut self, changed: &[SeriesRow], added: &[SeriesRow], missing: bool) {
        if missing {
            tracing::warn!(
                "rows of real_time_metrics disappeared; the next flush rewrites every series"
            );
            self.bots.clear();
            return;
        }
        for row in changed.iter().chain(added) {
            self.set(&row.bot, &row.metric, &row.labels, row.value);
        }
    }
}

/// What the store holds of each "today" counter: (bot, counter) → (day, value).
pub type Daily = HashMap<(String, String), (NaiveDate, i64)>;

/// Writes labels other than `bot` as a canonical JSON object: keys sorted,
/// compact, strings escaped as serde_json escapes them (so it is the text
/// `serde_json` writes for a `BTreeMap` of them). Sorted on the stack:
/// families have at most three labels besides `bot`, then `le`.
fn write_labels_json<'a>(out: &mut String, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) {
    const MOST: usize = 6;
    let mut on_stack = [("", ""); MOST];
    let mut spilled = Vec::new();
    let mut n = 0;
    for pair in pairs {
        if n < MOST {
            on_stack[n] = pair;
        } else {
            if spilled.is_empty() {
                spilled.extend_from_slice(&on_stack);
            }
            spilled.push(pair);
        }
        n += 1;
    }
    let sorted = if n > MOST {
        &mut spilled[..]
    } else {
        &mut on_stack[..n]
    };
    // Stable, so that of two equal keys the last wins, as in a map.
    sorted.sort_by_key(|(k, _)| *k);
    out.clear();
    out.push('{');
    let mut first = true;
    for (i, (k, v)) in sorted.iter().enumerate() {
        if sorted.get(i + 1).is_some_and(|(next, _)| next == k) {
            continue;
        }
        if !std::mem::take(&mut first) {
            out.push(',');
        }
        push_json_str(out, k);
        out.push(':');
        push_json_str(out, v);
    }
    out.push('}');
}

fn push_json_str(out: &mut String, s: &str) {
    // Most label values need no escape (serde_json escapes only `"`, `\`
    // and control characters): copied as they are, without serde_json's
    // detour through bytes and the UTF-8 check of the whole buffer back.
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push('"');
        out.push_str(s);
        out.push('"');
        return;
    }
    // serde_json writes a str as valid UTF-8 JSON; into a String's bytes it
    // cannot fail.
    let mut buf = std::mem::take(out).into_bytes();
    let _ = serde_json::to_writer(&mut buf, s);
    *out = String::from_utf8(buf).unwrap_or_default();
}

/// Labels other than `bot` as a canonical JSON object (keys sorted).
fn labels_json<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    write_labels_json(&mut out, pairs);
    out
}

/// Flattens series to the rows the store keeps, histogram lines included,
/// exactly as they are exposed. With `unchanged` set, a series whose value
/// is what the store holds is compared in reused buffers and left out
/// without allocating: a flush of 1,000 quiet bots (87,000 series) then
/// builds no row at all, where it built four strings per series, every
/// tick, inside the ingest pause of the cut.
struct Flatten<'w> {
    rows: Vec<SeriesRow>,
    unchanged: Option<&'w Written>,
    labels: String,
    /// The bot whose rows come now, and what the store holds of it: rows
    /// come bot by bot, so its map is looked up once, not once a row.
    bot: Option<String>,
    stored: Option<&'w SeriesValues>,
    /// Reused for a histogram's line names, and its bounds as `le` texts
    /// (formatting a float costs more than the rest of a line's compare).
    metric: String,
    le: LeTexts,
}

impl<'w> Flatten<'w> {
    fn new(unchanged: Option<&'w Written>) -> Self {
        Flatten {
            rows: Vec::new(),
            unchanged,
            labels: String::new(),
            bot: None,
            stored: None,
            metric: String::new(),
            le: LeTexts::default(),
        }
    }

    /// Whether the store holds `value` for the series `metric`,
    /// `self.labels` of `bot`.
    fn is_stored(&mut self, metric: &str, bot: &str, value: f64) -> bool {
        let Some(written) = self.unchanged else {
            return false;
        };
        if self.bot.as_deref() != Some(bot) {
            self.bot = Some(bot.to_owned());
            self.stored = written.bots.get(bot);
        }
        self.stored
            .and_then(|series| series.get(&written.id(metric, &self.labels)))
            == Some(&value)
    }

    /// One row: `self.labels` holds its labels JSON.
    fn push(&mut self, metric: &str, bot: &str, value: f64) {
        if self.is_stored(metric, bot, value) {
            return;
        }
        self.rows.push(SeriesRow {
            metric: metric.to_owned(),
            bot: bot.to_owned(),
            labels: self.labels.clone(),
            value,
        });
    }

    fn finish(self) -> Vec<SeriesRow> {
        finite(self.rows)
    }
}

impl Visitor for Flatten<'_> {
    fn scalar(&mut self, family: &'static FamilyDesc, labels: &[&str], value: f64) {
        let pairs = family
            .labels
            .iter()
            .copied()
            .zip(labels.iter().copied())
            .skip(1);
        write_labels_json(&mut self.labels, pairs);
        self.push(family.name, labels[0], value);
    }

    fn histogram(&mut self, family: &'static FamilyDesc, labels: &[&str], h: &HistogramSnapshot) {
        let bot = labels[0];
        let others = || {
            family
                .labels
                .iter()
                .copied()
                .zip(labels.iter().copied())
                .skip(1)
        };
        let mut metric = std::mem::take(&mut self.metric);
        metric.clear();
        metric.push_str(family.name);
        metric.push_str("_bucket");
        // Out of `self` while its rows are pushed, which borrows all of it.
        let mut texts = std::mem::take(&mut self.le);
        let le = texts.of(h.bounds);
        for (i, count) in h.cumulative.iter().enumerate() {
            let le = le.get(i).map_or("+Inf", String::as_str);
            write_labels_json(&mut self.labels, others().chain([("le", le)]));
            self.push(&metric, bot, *count as f64);
        }
        self.le = texts;
        for (suffix, value) in [("_sum", h.sum), ("_count", h.count() as f64)] {
            metric.clear();
            metric.push_str(family.name);
            metric.push_str(suffix);
            write_labels_json(&mut self.labels, others());
            self.push(&metric, bot, value);
        }
        self.metric = metric;
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
    let mut flat = Flatten::new(None);
    metrics.visit(&mut flat);
    flat.finish()
}

/// The rows of [`snapshot`] whose value is not what `written` says the
/// store holds: what a flush may have to send, built without allocating
/// for the rest.
///
/// A bot untouched since the last cut (see `BotMetrics::take_touched`) has
/// only its estimates compared: what else it has is what the store got at
/// that cut, or was handed back for the next one (`Source::not_stored`
/// touches every bot). A bot the store holds nothing of, as `written`
/// knows it (new, wiped, or every row missing), is compared whole.
pub fn changed(metrics: &Metrics, written: &Written) -> Vec<SeriesRow> {
    let mut flat = Flatten::new(Some(written));
    for bot in metrics.bots().iter() {
        // Taken for every bot, so that the mark is clear for the next cut.
        let touched = bot.take_touched();
        if touched || !written.bots.contains_key(&*bot.bot) {
            bot.visit(&mut flat);
        } else {
            bot.visit_timed(&mut flat);
        }
    }
    flat.finish()
}

/// One bot's series as stored rows, as [`snapshot`] gives them.
pub fn bot_rows(bot: &crate::metrics::BotMetrics) -> Vec<SeriesRow> {
    let mut flat = Flatten::new(None);
    bot.visit(&mut flat);
    flat.finish()
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

/// A 128-bit digest of `rows` in order: two SipHashes told apart by a
/// leading byte. Two different history points share it with odds of
/// 2^-128, so an unchanged point is recognised without keeping the last.
pub fn digest(rows: &[SeriesRow]) -> u128 {
    use std::hash::{DefaultHasher, Hasher};
    let half = |seed: u8| {
        let mut h = DefaultHasher::new();
        h.write_u8(seed);
        for r in rows {
            // 0xff never occurs in UTF-8: the parts cannot run together.
            for part in [&r.metric, &r.bot, &r.labels] {
                h.write(part.as_bytes());
                h.write_u8(0xff);
            }
            h.write_u64(r.value.to_bits());
        }
        h.finish()
    };
    (u128::from(half(0)) << 64) | u128::from(half(1))
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

/// Puts each bot's stored users back into its book (rows of bots no longer
/// configured are left in the store).
pub fn restore_users(metrics: &Metrics, stored: &store::Stored) -> usize {
    let mut users = 0;
    for (bot, rows) in &stored.users {
        if let Some(b) = metrics.bot(bot) {
            users += rows.len();
            b.book.restore(rows);
        }
    }
    users
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
    let set = metrics.bots();
    restore_into(
        |name| set.get(name).map(|b| &**b),
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
        // Gauges derived from sketches or the user book are not restored.
        if crate::metrics::bot::derived(&row.metric) {
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
        let day = Calendar::day_number(d.day);
        let value = d.value.max(0) as u64;
        match bot_of(&d.bot).and_then(|b| b.today.restore(&d.name, day, value, today)) {
            Some(true) => report.daily += 1,
            // No longer current (yesterday's count is not today's): it
            // stays stored until replaced.
            Some(false) => {}
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

    /// A flush sends a row the store holds with another value as a change,
    /// one it lacks as an insert, in the order they came, and nothing of
    /// the rest; whichever kind is the larger keeps the vector it came in.
    #[test]
    fn changes_sort_rows_in_place() {
        let stored = Written::of(&[
            row("x", "{}", 1.0),
            row("y", "{}", 2.0),
            row("z", "{}", 3.0),
        ]);
        let rows = vec![
            row("x", "{}", 1.0),
            row("n1", "{}", 4.0),
            row("y", "{}", 5.0),
            row("n2", "{}", 6.0),
            row("z", "{}", 3.0),
        ];
        let at = rows.as_ptr();
        let mut batch = FlushBatch::default();
        stored.changes(rows, &mut batch);
        assert_eq!(batch.changed, vec![row("y", "{}", 5.0)]);
        assert_eq!(
            batch.added,
            vec![row("n1", "{}", 4.0), row("n2", "{}", 6.0)]
        );
        assert_eq!(
            batch.added.as_ptr(),
            at,
            "the inserts kept the rows' allocation"
        );

        // Mostly changes: they keep it, and the lone insert moves out.
        let rows = vec![
            row("x", "{}", 7.0),
            row("n", "{}", 8.0),
            row("z", "{}", 9.0),
        ];
        let at = rows.as_ptr();
        let mut batch = FlushBatch::default();
        stored.changes(rows, &mut batch);
        assert_eq!(
            batch.changed,
            vec![row("x", "{}", 7.0), row("z", "{}", 9.0)]
        );
        assert_eq!(batch.added, vec![row("n", "{}", 8.0)]);
        assert_eq!(batch.changed.as_ptr(), at);

        // The first flush: the store holds nothing, every row is an insert.
        let rows: Vec<_> = (0..1000)
            .map(|i| row(&format!("m{i}"), "{}", 1.0))
            .collect();
        let at = rows.as_ptr();
        let mut batch = FlushBatch::default();
        Written::default().changes(rows, &mut batch);
        assert_eq!(batch.added.len(), 1000);
        assert!(batch.changed.is_empty());
        assert_eq!(batch.added.as_ptr(), at);
    }

    /// A series is told apart by every part of its identity, and a wiped
    /// bot's series are forgotten without touching another bot's.
    #[test]
    fn written_knows_each_series_under_its_bot() {
        let other = |metric: &str, labels: &str, value| SeriesRow {
            bot: "b".to_owned(),
            ..row(metric, labels, value)
        };
        let mut stored = Written::of(&[
            row("m", r#"{"k":"v"}"#, 1.0),
            other("m", r#"{"k":"v"}"#, 2.0),
        ]);
        assert_eq!(stored.get(&row("m", r#"{"k":"v"}"#, 0.0)), Some(1.0));
        assert_eq!(stored.get(&other("m", r#"{"k":"v"}"#, 0.0)), Some(2.0));
        // The same bytes split differently are another series.
        assert_eq!(stored.get(&row("m{", r#""k":"v"}"#, 0.0)), None);
        assert_eq!(stored.get(&row("n", r#"{"k":"v"}"#, 0.0)), None);
        stored.wrote(
            &[row("m", r#"{"k":"v"}"#, 3.0)],
            &[row("n", "{}", 4.0)],
            false,
        );
        assert_eq!(stored.get(&row("m", r#"{"k":"v"}"#, 0.0)), Some(3.0));
        assert_eq!(stored.get(&row("n", "{}", 0.0)), Some(4.0));
        stored.forget_bots(&["a".to_owned()]);
        assert_eq!(stored.get(&row("m", r#"{"k":"v"}"#, 0.0)), None);
        assert_eq!(stored.get(&other("m", r#"{"k":"v"}"#, 0.0)), Some(2.0));
        stored.wrote(&[], &[], true);
        assert_eq!(stored.get(&other("m", r#"{"k":"v"}"#, 0.0)), None);
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
        let metrics =
            Metrics::new(&["a".into()], 10, chrono_tz::UTC, 30.0, Default::default()).unwrap();
        let calendar = metrics.calendar();
        // The rows restore as they are...
        let stored = store::Stored {
            series: slow_response_in_redis(),
            ..store::Stored::default()
        };
        let bot = metrics.bot("a").unwrap();
        let report = restore_into(|_| Some(&*bot), calendar, &stored, 0);
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
        let metrics =
            Metrics::new(&["a".into()], 10, chrono_tz::UTC, 30.0, Default::default()).unwrap();
        let stored = store::Stored {
            series: rows,
            ..store::Stored::default()
        };
        let bot = metrics.bot("a").unwrap();
        let report = restore_into(|_| Some(&*bot), metrics.calendar(), &stored, 0);
        assert_eq!(report.skipped, 2);
        assert_eq!(bot.response_duration().count(), 0);
    }

    #[test]
    fn labels_json_is_what_serde_json_writes_for_a_sorted_map() {
        let hostile = [
            "plain",
            "quote \" and back\\slash",
            "new\nline\ttab\r\u{1}\u{1f}",
            "ünïcødé ✓ 𝄞",
            "",
            // Not escaped by serde_json: the fast path copies it too.
            "del \u{7f} and / slash",
        ];
        for v in hostile {
            let pairs = [("model", v), ("kind", "prompt"), ("le", "+Inf")];
            let map: BTreeMap<&str, &str> = pairs.into_iter().collect();
            assert_eq!(labels_json(pairs), serde_json::to_string(&map).unwrap());
        }
        assert_eq!(labels_json([]), "{}");
        // More pairs than fit on the stack, and a repeated key (the last
        // wins, as in a map).
        let many: Vec<(&str, &str)> = ["g", "f", "e", "d", "c", "b", "a", "a"]
            .into_iter()
            .zip(["1", "2", "3", "4", "5", "6", "7", "8"])
            .collect();
        let map: BTreeMap<&str, &str> = many.iter().copied().collect();
        assert_eq!(labels_json(many), serde_json::to_string(&map).unwrap());
    }

    #[test]
    fn changed_rows_are_the_snapshot_rows_the_store_does_not_hold() {
        use crate::event::{BodyFormat, parse_batch};
        let metrics = Metrics::new(
            &["a".into(), "b".into()],
            10,
            chrono_tz::UTC,
            30.0,
            Default::default(),
        )
        .unwrap();
        let now = chrono::Utc::now().timestamp();
        let apply = |bot: &str, body: &[u8]| {
            for event in &parse_batch(
                body,
                BodyFormat::Json,
                100,
                now,
                &crate::event::UserKey::legacy(),
            )
            .unwrap()
            {
                metrics.bot(bot).unwrap().apply(event);
            }
        };
        apply(
            "a",
            br#"[{"type":"response","status":"success","duration_ms":300,"model":"m-1","tokens":{"prompt":2,"completion":1}},
                 {"type":"error","kind":"k"}]"#,
        );
        // Nothing written yet: every row is a change.
        let all = snapshot(&metrics);
        assert_eq!(changed(&metrics, &Written::default()), all);
        // Everything written: nothing is.
        let written = Written::of(&all);
        assert_eq!(changed(&metrics, &written), vec![]);
        // One more event for each bot: exactly the rows that moved.
        apply("a", br#"[{"type":"error","kind":"k"}]"#);
        apply("b", br#"[{"type":"message","role":"user","db_queries":2}]"#);
        let now_rows = snapshot(&metrics);
        let expected: Vec<SeriesRow> = now_rows
            .iter()
            .filter(|r| !all.contains(r))
            .cloned()
            .collect();
        let got = changed(&metrics, &written);
        assert_eq!(got, expected);
        // The error count, and b's message, db-query histogram (2 lines of
        // nine bounds up, +Inf, sum, count) and nothing else.
        assert!(
            got.iter()
                .any(|r| r.bot == "a" && r.metric == "bot_errors_total")
        );
        assert!(
            got.iter()
                .all(|r| r.bot == "b" || r.metric == "bot_errors_total")
        );
        assert_eq!(got.iter().filter(|r| r.bot == "a").count(), 1);
    }

    /// The change marks skip a quiet bot's compare: at every cut, over
    /// random events, session ends, retention scans, restores and failed
    /// writes, `changed` gives exactly the rows a compare of every series
    /// gives.
    #[test]
    fn change_marks_leave_out_only_what_the_store_holds() {
        use crate::event::{BodyFormat, parse_batch};
        let bots: Vec<String> = (0..6).map(|i| format!("b{i}")).collect();
        let names: Vec<std::sync::Arc<str>> = bots.iter().map(|b| b.as_str().into()).collect();
        let metrics = Metrics::new(&names, 10, chrono_tz::UTC, 30.0, Default::default()).unwrap();
        let every_series = |written: &Written| {
            let mut flat = Flatten::new(Some(written));
            metrics.visit(&mut flat);
            flat.finish()
        };
        let mut written = Written::default();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut now = chrono::Utc::now().timestamp() - 40 * 86_400;
        let mut skipped = 0;
        for round in 0..400 {
            now += next(4 * 3600) as i64;
            // A few bots get events; the rest stay quiet.
            for _ in 0..next(3) {
                let bot = &bots[next(bots.len() as u64) as usize];
                let body = match next(5) {
                    0 => format!(
                        r#"{{"type":"message","role":"user","user_id":"u{}","ts":{now}}}"#,
                        next(20)
                    ),
                    1 => format!(
                        r#"{{"type":"response","status":"success","duration_ms":{},"model":"m{}","tokens":{{"prompt":3,"completion":2}},"ts":{now}}}"#,
                        next(5000),
                        next(3)
                    ),
                    2 => format!(r#"{{"type":"error","kind":"k{}","ts":{now}}}"#, next(4)),
                    3 => format!(
                        r#"{{"type":"feedback","score":1,"user_id":"u{}","ts":{now}}}"#,
                        next(20)
                    ),
                    _ => format!(
                        r#"{{"type":"message","role":"assistant","user_id":"u{}","ts":{now}}}"#,
                        next(20)
                    ),
                };
                let events = parse_batch(
                    body.as_bytes(),
                    BodyFormat::Json,
                    100,
                    now,
                    &crate::event::UserKey::legacy(),
                )
                .unwrap();
                metrics.bot(bot).unwrap().apply_all(events.iter());
            }
            // The book's scan: sessions end after the gap, ratios move.
            if next(3) == 0 {
                for bot in metrics.bots().iter() {
                    bot.scan_users(now);
                }
            }
            // A restore adds into one bot's cells.
            if next(40) == 0 {
                let bot = metrics
                    .bot(&bots[next(bots.len() as u64) as usize])
                    .unwrap();
                assert!(bot.restore_scalar("bot_errors_total", &[("kind", "restored")], 2.0));
            }
            // The cut: the full compare first (it takes no mark), then
            // `changed` with the marks.
            let want = every_series(&written);
            let got = changed(&metrics, &written);
            assert_eq!(got, want, "round {round}");
            skipped += metrics
                .bots()
                .iter()
                .filter(|b| !got.iter().any(|r| r.bot == *b.bot))
                .count();
            // Now and then the store refuses the write: every bot is
            // touched, as `Local::not_stored` does, and nothing is written.
            if next(10) == 0 {
                for bot in metrics.bots().iter() {
                    bot.touch();
                }
                continue;
            }
            let mut batch = FlushBatch::default();
            written.changes(got, &mut batch);
            written.wrote(&batch.changed, &batch.added, false);
            // A wipe of what the store held of a bot, or all of it.
            match next(60) {
                0 => written.forget_bots(&[bots[0].clone()]),
                1 => written.wrote(&[], &[], true),
                _ => {}
            }
        }
        // The marks did skip quiet bots, most of the time.
        assert!(skipped > 400, "{skipped} quiet bot cuts");
    }

    #[test]
    fn the_digest_tells_rows_apart_by_every_part() {
        let base = vec![row("m", "{}", 1.0), row("n", r#"{"k":"v"}"#, 2.0)];
        let d = digest(&base);
        assert_eq!(d, digest(&base.clone()));
        let mut value = base.clone();
        value[1].value = 3.0;
        let mut order = base.clone();
        order.swap(0, 1);
        // Parts that would run together without a separator.
        let shifted = vec![row("mn", "{}", 1.0), row("", r#"{"k":"v"}"#, 2.0)];
        let mut bot = base.clone();
        bot[0].bot = "b".into();
        for other in [value, order, shifted, bot, vec![]] {
            assert_ne!(digest(&other), d, "{other:?}");
        }
    }
}
