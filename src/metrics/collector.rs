//! Writes the bots' `bot_*` families straight into the Prometheus text
//! format, byte for byte what the prometheus crate's `Registry::gather` and
//! `TextEncoder` would write for them (families by name, empty ones left
//! out, series ordered by label values), without building a protobuf
//! message, five strings and a sort entry per series first: for 1,000 bots
//! that detour cost more than everything else in a render.

use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

use super::bot::{BotMetrics, FAMILIES, FamilyDesc, Kind, SelfCounters, Visitor};
use super::cells::{HistogramSnapshot, LeTexts};

/// One bot's series of one family while they are written.
#[derive(Default)]
struct FamilyText {
    /// The current bot's series: (sort key, text) ranges into `scratch`.
    entries: Vec<(Range<usize>, Range<usize>)>,
    scratch: Vec<u8>,
}

impl FamilyText {
    /// Appends the current bot's series to `out` ordered by their label
    /// values after `bot` (the bot itself sorts first: bots are visited in
    /// name order).
    fn finish_bot(&mut self, out: &mut Vec<u8>) {
        let scratch = &self.scratch;
        self.entries
            .sort_unstable_by(|a, b| scratch[a.0.clone()].cmp(&scratch[b.0.clone()]));
        for (_, text) in &self.entries {
            out.extend_from_slice(&scratch[text.clone()]);
        }
        self.entries.clear();
        self.scratch.clear();
    }
}

/// A [`Visitor`] that writes one family's text: every bot is walked once
/// per family, and only that family's series are written, so the page is
/// written in name order straight away rather than through a buffer per
/// family copied into it at the end (5 MB copied, and 5 MB kept, for
/// 1,000 bots).
struct Writer {
    /// The family being written.
    family: &'static FamilyDesc,
    text: FamilyText,
    series: usize,
    /// The `le` label values of each set of histogram bounds, formatted once.
    le: LeTexts,
    /// The start of the bucket lines of the histogram being written.
    prefix: Vec<u8>,
}

impl Writer {
    /// Starts a series: writes its sort key (label values after `bot`,
    /// each followed by a NUL, which sorts below every character, so the
    /// joined keys order as the values do one by one). Returns the key.
    fn key(text: &mut FamilyText, labels: &[&str]) -> Range<usize> {
        let start = text.scratch.len();
        for value in labels.iter().skip(1) {
            text.scratch.extend_from_slice(value.as_bytes());
            text.scratch.push(0);
        }
        start..text.scratch.len()
    }
}

fn escape(out: &mut Vec<u8>, s: &str, quote: bool) {
    if !s
        .bytes()
        .any(|b| b == b'\\' || b == b'\n' || (quote && b == b'"'))
    {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    for c in s.chars() {
        match c {
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '"' if quote => out.extend_from_slice(b"\\\""),
            c => {
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// One sample line, as the prometheus crate's `write_sample` writes it.
fn sample(
    out: &mut Vec<u8>,
    family: &FamilyDesc,
    suffix: &str,
    labels: &[&str],
    le: Option<&str>,
    value: f64,
) {
    out.extend_from_slice(family.name.as_bytes());
    out.extend_from_slice(suffix.as_bytes());
    let mut separator = b'{';
    for (name, value) in family.labels.iter().zip(labels) {
        out.push(separator);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"=\"");
        escape(out, value, true);
        out.push(b'"');
        separator = b',';
    }
    if let Some(le) = le {
        out.push(separator);
        out.extend_from_slice(b"le=\"");
        out.extend_from_slice(le.as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b"} ");
    write_value(out, value);
    out.push(b'\n');
}

/// f64's Display, as the crate's `value.to_string()` (3, not 3.0), with a
/// fast path for the whole numbers most samples are: their digits are the
/// same, and shortest-float formatting was a quarter of a render.
fn write_value(out: &mut Vec<u8>, value: f64) {
    if value.is_sign_positive() && value < 1e15 && value.fract() == 0.0 {
        let mut n = value as u64;
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(&digits[i..]);
    } else {
        let _ = write!(out, "{value}");
    }
}

impl Visitor for Writer {
    fn wants(&self, family: &'static FamilyDesc) -> bool {
        std::ptr::eq(family, self.family)
    }

    fn scalar(&mut self, family: &'static FamilyDesc, labels: &[&str], value: f64) {
        if !self.wants(family) {
            return;
        }
        self.series += 1;
        let text = &mut self.text;
        let key = Self::key(text, labels);
        let start = text.scratch.len();
        sample(&mut text.scratch, family, "", labels, None, value);
        let end = text.scratch.len();
        text.entries.push((key, start..end));
    }

    fn histogram(
        &mut self,
        family: &'static FamilyDesc,
        labels: &[&str],
        snapshot: &HistogramSnapshot,
    ) {
        if !self.wants(family) {
            return;
        }
        // Buckets, +Inf, _sum and _count.
        self.series += snapshot.cumulative.len() + 2;
        let (le, text) = (self.le.of(snapshot.bounds), &mut self.text);
        let key = Self::key(text, labels);
        let start = text.scratch.len();
        let out = &mut text.scratch;
        // What every bucket line of the series starts with, written (and
        // its labels escaped) once rather than once per bucket: bucket
        // lines are two thirds of a page. Then `sample`'s format.
        let prefix = &mut self.prefix;
        prefix.clear();
        prefix.extend_from_slice(family.name.as_bytes());
        prefix.extend_from_slice(b"_bucket");
        let mut separator = b'{';
        for (name, value) in family.labels.iter().zip(labels) {
            prefix.push(separator);
            prefix.extend_from_slice(name.as_bytes());
            prefix.extend_from_slice(b"=\"");
            escape(prefix, value, true);
            prefix.push(b'"');
            separator = b',';
        }
        prefix.push(separator);
        prefix.extend_from_slice(b"le=\"");
        let count = snapshot.count() as f64;
        let buckets = le
            .iter()
            .map(String::as_str)
            .zip(snapshot.cumulative.iter().map(|c| *c as f64));
        for (le, value) in buckets.chain([("+Inf", count)]) {
            out.extend_from_slice(prefix);
            out.extend_from_slice(le.as_bytes());
            out.extend_from_slice(b"\"} ");
            write_value(out, value);
            out.push(b'\n');
        }
        sample(out, family, "_sum", labels, None, snapshot.sum);
        sample(out, family, "_count", labels, None, count);
        let end = text.scratch.len();
        text.entries.push((key, start..end));
    }
}

/// A family's `# HELP` and `# TYPE` lines, as the crate's `TextEncoder`
/// writes them.
fn header(out: &mut Vec<u8>, desc: &FamilyDesc) {
    out.extend_from_slice(b"# HELP ");
    out.extend_from_slice(desc.name.as_bytes());
    out.push(b' ');
    escape(out, desc.help, false);
    out.extend_from_slice(b"\n# TYPE ");
    out.extend_from_slice(desc.name.as_bytes());
    out.extend_from_slice(match desc.kind {
        Kind::Counter => b" counter\n".as_slice(),
        Kind::Gauge => b" gauge\n",
        Kind::Histogram => b" histogram\n",
    });
}

/// A self-metric family with a `bot` label (`botmetrics_events_accepted_total`
/// and the like): one series per bot, or one per bot and value of a second
/// label, each read from the handles the bot holds in its [`SelfCounters`].
pub struct PerBotFamily {
    pub desc: &'static FamilyDesc,
    /// The second label's value (None: `bot` is the only label), in the
    /// order the values sort, and where the series' value lives.
    pub series: &'static [(Option<&'static str>, ReadValue)],
}

/// Where a self-series' value lives among a bot's handles.
pub type ReadValue = fn(&SelfCounters) -> f64;

/// Writes a [`PerBotFamily`] for `bots` (sorted by name), byte for byte
/// what `Registry::gather` and `TextEncoder` write for the same vec: for
/// 1,000 bots that path built, cloned and sorted 9,000 protobuf messages
/// per render, a third of the render's time. Writes nothing without bots,
/// as `gather` leaves an empty family out. Returns the lines written.
pub fn write_per_bot(out: &mut Vec<u8>, family: &PerBotFamily, bots: &[Arc<BotMetrics>]) -> usize {
    if bots.is_empty() {
        return 0;
    }
    header(out, family.desc);
    for bot in bots {
        for (label, value) in family.series {
            let value = value(&bot.counters);
            match label {
                Some(label) => sample(out, family.desc, "", &[&bot.bot, label], None, value),
                None => sample(out, family.desc, "", &[&bot.bot], None, value),
            }
        }
    }
    bots.len() * family.series.len()
}

/// Writes every bot's `bot_*` series (`bots` sorted by name) and returns
/// how many sample lines they are.
///
/// With more than one thread, the families are cut into pieces of about
/// equal size (by the last page's), written at once (`share`): the first
/// into `out`, the others into buffers of their own appended to it, so
/// most of the page is copied once, against the render's time divided
/// among the cores. Either way the bytes are the same: families by name.
pub fn write_bots(
    bots: &[Arc<BotMetrics>],
    out: &mut Vec<u8>,
    kept: &mut Buffers,
    threads: usize,
) -> usize {
    // Room for the page as big as the last one was, and for what the
    // caller writes after (the self-metrics, under 1 KB a bot), so the
    // 5 MB page is never copied to grow. (A pooled page has it already.)
    out.reserve(kept.last_page + 1024 * bots.len());
    let start = out.len();
    let mut order: Vec<&'static FamilyDesc> = FAMILIES.to_vec();
    order.sort_by_key(|f| f.name);
    kept.sizes.resize(order.len(), 1);
    // Twice as many pieces as threads, so that a thread that runs late
    // leaves its share to the others.
    let pieces = if threads > 1 { 2 * threads } else { 1 }.min(order.len());
    let counts = cut(&kept.sizes, pieces);
    let each = kept.last_page / pieces;
    kept.pieces.resize_with(pieces, Default::default);
    let mut families = &order[..];
    let mut sizes = &mut kept.sizes[..];
    let mut items = Vec::with_capacity(pieces);
    let mut first = Some(&mut *out);
    for (piece, n) in kept.pieces.iter_mut().zip(counts) {
        let (these, rest) = families.split_at(n);
        families = rest;
        let (their_sizes, rest) = std::mem::take(&mut sizes).split_at_mut(n);
        sizes = rest;
        let Piece { scratch, page } = piece;
        let page = match first.take() {
            Some(out) => out,
            None => {
                page.clear();
                page.reserve(each + each / 8);
                page
            }
        };
        items.push((these, their_sizes, scratch, page));
    }
    let series = crate::share::share(items, threads, |(these, sizes, scratch, page)| {
        scratch.write(these, bots, page, sizes)
    })
    .into_iter()
    .sum();
    for piece in &mut kept.pieces[1..] {
        out.extend_from_slice(&piece.page);
        // Not kept: megabytes held between scrapes for a millisecond of
        // page faults (the buffer is mapped, so freeing it unmaps it).
        piece.page = Vec::new();
    }
    kept.last_page = out.len() - start;
    series
}

/// How many families (of these sizes) go in each of `pieces` runs of
/// about equal size; every run gets at least one if there are enough.
fn cut(sizes: &[usize], pieces: usize) -> Vec<usize> {
    let total: usize = sizes.iter().sum();
    let mut counts = vec![0; pieces];
    let (mut piece, mut done) = (0, 0);
    for (i, size) in sizes.iter().enumerate() {
        // Move to the next run once this one reached its share, as long
        // as the runs left still have a family each.
        let left = sizes.len() - i;
        if piece + 1 < pieces
            && counts[piece] > 0
            && (done * pieces >= total * (piece + 1) || left < pieces - piece)
        {
            piece += 1;
        }
        counts[piece] += 1;
        done += size;
    }
    counts
}

/// What one render keeps for the next: each run's scratch (and, during a
/// render, its page: the first run writes into the caller's), each
/// family's size on the last page (to cut the next one evenly) and the
/// page's size, to reserve it.
#[derive(Default)]
pub struct Buffers {
    pieces: Vec<Piece>,
    sizes: Vec<usize>,
    last_page: usize,
}

#[derive(Default)]
struct Piece {
    scratch: Scratch,
    page: Vec<u8>,
}

/// One writer's buffers: a bot's series, the formatted `le` values, the
/// bucket line prefix.
#[derive(Default)]
struct Scratch {
    text: FamilyText,
    le: LeTexts,
    prefix: Vec<u8>,
}

impl Buffers {
    /// The size of the last page written with these buffers.
    pub fn last_page(&self) -> usize {
        self.last_page
    }
}

impl Scratch {
    /// Writes `families` for every bot into `out`, noting each one's size.
    fn write(
        &mut self,
        families: &[&'static FamilyDesc],
        bots: &[Arc<BotMetrics>],
        out: &mut Vec<u8>,
        sizes: &mut [usize],
    ) -> usize {
        let Some(first) = families.first() else {
            return 0;
        };
        let mut writer = Writer {
            family: first,
            text: std::mem::take(&mut self.text),
            series: 0,
            le: std::mem::take(&mut self.le),
            prefix: std::mem::take(&mut self.prefix),
        };
        for (family, size) in families.iter().zip(sizes) {
            writer.family = family;
            let header_at = out.len();
            header(out, family);
            let series_at = out.len();
            for bot in bots {
                bot.visit(&mut writer);
                writer.text.finish_bot(out);
            }
            // A family no bot has a series of is left out, as `gather` does.
            if out.len() == series_at {
                out.truncate(header_at);
            }
            *size = out.len() - header_at;
        }
        self.text = writer.text;
        self.le = writer.le;
        self.prefix = writer.prefix;
        writer.series
    }
}

#[cfg(test)]
mod tests {
    //! The text written here against what the prometheus crate writes for
    //! the same series through its `Collector`, `gather` and `TextEncoder`
    //! (how earlier versions rendered): they must be the same bytes.

    use prometheus::core::{Collector, Desc};
    use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};

    use super::*;
    use crate::event::{BodyFormat, parse_batch};
    use crate::metrics::Metrics;

    struct Reference {
        bots: Vec<Arc<BotMetrics>>,
        descs: Vec<Desc>,
    }

    struct Builder(Vec<MetricFamily>);

    impl Builder {
        fn metric(&mut self, family: &'static FamilyDesc, labels: &[&str]) -> &mut proto::Metric {
            let i = FAMILIES.iter().position(|f| f.name == family.name).unwrap();
            let pairs = family
                .labels
                .iter()
                .zip(labels)
                .map(|(name, value)| {
                    let mut pair = LabelPair::default();
                    pair.set_name((*name).to_owned());
                    pair.set_value((*value).to_owned());
                    pair
                })
                .collect();
            let metrics = self.0[i].mut_metric();
            metrics.push(proto::Metric::from_label(pairs));
            metrics.last_mut().unwrap()
        }
    }

    impl Visitor for Builder {
        fn scalar(&mut self, family: &'static FamilyDesc, labels: &[&str], value: f64) {
            let metric = self.metric(family, labels);
            if family.kind == Kind::Gauge {
                let mut g = proto::Gauge::default();
                g.set_value(value);
                metric.set_gauge(g);
            } else {
                let mut c = proto::Counter::default();
                c.set_value(value);
                metric.set_counter(c);
            }
        }

        fn histogram(
            &mut self,
            family: &'static FamilyDesc,
            labels: &[&str],
            s: &HistogramSnapshot,
        ) {
            let mut h = proto::Histogram::default();
            h.set_sample_count(s.count());
            h.set_sample_sum(s.sum);
            h.set_bucket(
                s.bounds
                    .iter()
                    .zip(&s.cumulative)
                    .map(|(bound, count)| {
                        let mut b = proto::Bucket::default();
                        b.set_upper_bound(*bound);
                        b.set_cumulative_count(*count);
                        b
                    })
                    .collect(),
            );
            self.metric(family, labels).set_histogram(h);
        }
    }

    impl Collector for Reference {
        fn desc(&self) -> Vec<&Desc> {
            self.descs.iter().collect()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            let mut builder = Builder(
                FAMILIES
                    .iter()
                    .map(|f| {
                        let mut mf = MetricFamily::default();
                        mf.set_name(f.name.to_owned());
                        mf.set_help(f.help.to_owned());
                        mf.set_field_type(match f.kind {
                            Kind::Counter => MetricType::COUNTER,
                            Kind::Gauge => MetricType::GAUGE,
                            Kind::Histogram => MetricType::HISTOGRAM,
                        });
                        mf
                    })
                    .collect(),
            );
            for bot in &self.bots {
                bot.visit(&mut builder);
            }
            builder.0
        }
    }

    #[test]
    fn cuts_are_even_and_never_empty() {
        assert_eq!(cut(&[1, 1, 1, 1], 2), vec![2, 2]);
        assert_eq!(cut(&[10, 1, 1, 1, 1, 10], 2), vec![3, 3]);
        assert_eq!(cut(&[100, 1, 1], 3), vec![1, 1, 1]);
        assert_eq!(cut(&[1, 1, 100], 3), vec![1, 1, 1]);
        assert_eq!(cut(&[5; 10], 4).iter().sum::<usize>(), 10);
        assert_eq!(cut(&[0, 0, 0], 2).iter().sum::<usize>(), 3);
        assert_eq!(cut(&[7], 1), vec![1]);
        for pieces in 1..=8 {
            let counts = cut(&[3, 9, 1, 1, 4, 12, 2, 2], pieces);
            assert_eq!(counts.iter().sum::<usize>(), 8, "{pieces}: {counts:?}");
            assert!(counts.iter().all(|&c| c > 0), "{pieces}: {counts:?}");
        }
    }

    #[test]
    fn values_print_as_f64_display() {
        for v in [
            0.0,
            -0.0,
            1.0,
            0.1,
            -3.0,
            2.5e-7,
            999_999_999_999_999.0,
            1e15,
            1e16,
            123_456_789_012_345_680.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let mut out = Vec::new();
            write_value(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), v.to_string(), "{v:?}");
        }
    }

    #[test]
    fn same_bytes_as_the_prometheus_crate() {
        // Names that sort differently from their configured order, and
        // free-form labels that arrive out of order.
        let names: Vec<Arc<str>> = ["zeta", "alpha", "alpha1", "Beta", "a-b", "a.b"]
            .into_iter()
            .map(Arc::from)
            .collect();
        let metrics = Metrics::new(&names, 3, chrono_tz::UTC, 30.0, Default::default()).unwrap();
        let body = br#"[
            {"type":"message","role":"assistant","user_id":1,"db_queries":3},
            {"type":"message","role":"user","user_id":"u2"},
            {"type":"response","status":"timeout","duration_ms":61000,"model":"m-z","tokens":{"prompt":3,"completion":1}},
            {"type":"response","status":"success","duration_ms":250,"model":"m-a","tokens":{"prompt":1,"completion":1}},
            {"type":"cache","result":"miss","cache":"zz"},
            {"type":"cache","result":"hit","cache":"aa"},
            {"type":"consent","granted":false},
            {"type":"error","kind":"z_err"},{"type":"error","kind":"a_err"},
            {"type":"error","kind":"b_err"},{"type":"error","kind":"c_err"},
            {"type":"custom","name":"n1","value":0.1},
            {"type":"custom","name":"n2","value":1000000000000},
            {"type":"user_registered","user_id":3},
            {"type":"limit_reached"}
        ]"#;
        let now = chrono::Utc::now().timestamp();
        let events = parse_batch(
            body,
            BodyFormat::Json,
            100,
            now,
            &crate::event::UserKey::legacy(),
        )
        .unwrap();
        for (i, bot) in metrics.bots().iter().enumerate() {
            // Each bot a different share of the batch; one bot nothing.
            for event in events.iter().take(i * 3) {
                bot.apply(event);
            }
        }
        let mut ours = Vec::new();
        let series = write_bots(
            &metrics.bots().sorted,
            &mut ours,
            &mut Buffers::default(),
            1,
        );
        // Written in pieces at once, the same bytes: the first cut by
        // family count, the next ones by the sizes of the page before,
        // with buffers kept from a render in fewer or more pieces.
        let mut kept = Buffers::default();
        for threads in [1, 2, 2, 3, 4, 2, 1] {
            let mut page = b"before\n".to_vec();
            let lines = write_bots(&metrics.bots().sorted, &mut page, &mut kept, threads);
            assert_eq!(
                (&page[7..], lines),
                (&ours[..], series),
                "{threads} threads"
            );
        }

        let registry = prometheus::Registry::new();
        let descs = FAMILIES
            .iter()
            .map(|f| {
                let labels = f.labels.iter().map(|l| (*l).to_owned()).collect();
                Desc::new(f.name.into(), f.help.into(), labels, Default::default()).unwrap()
            })
            .collect();
        let reference = Reference {
            bots: metrics.bots().to_vec(),
            descs,
        };
        registry.register(Box::new(reference)).unwrap();
        let mut theirs = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut theirs,
        )
        .unwrap();
        let ours = String::from_utf8(ours).unwrap();
        assert_eq!(ours, String::from_utf8(theirs.clone()).unwrap());
        // Every kind of line is in it (the last bot had every event): the cap
        // folded a fourth error kind.
        for line in [
            r#"bot_errors_total{bot="a.b",kind="other"} 1"#,
            r#"bot_response_duration_seconds_bucket{bot="a.b",le="+Inf"} 2"#,
            r#"bot_active_users{bot="a.b",window="30d"} 3"#,
            r#"bot_custom_events_total{bot="a.b",name="n1"} 0.1"#,
        ] {
            assert!(ours.contains(line), "{line}");
        }
        let lines = String::from_utf8(theirs)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .count();
        assert_eq!(series, lines);
    }
}
