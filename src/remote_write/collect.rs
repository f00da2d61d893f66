//! One snapshot of every series `/metrics` shows, as remote-write series.
//!
//! The `bot_*` series come from the same [`Visitor`] walk the exposition
//! writes its text from, and the `botmetrics_*` self-metrics from the same
//! `Registry::gather`, so a pushed series has exactly the name, labels and
//! value a scrape of `/metrics` at that moment would have (histograms as
//! `_bucket{le}`, `_sum` and `_count`, `le` formatted as the exposition
//! formats it). Dashboards and rules written for the scraped series work on
//! the pushed ones unchanged.

use prometheus::proto::MetricType;

use super::proto::{Label, Sample, TimeSeries, WriteRequest};
use crate::metrics::{FamilyDesc, HistogramSnapshot, Metrics, Visitor};

/// Builds series with the labels every push adds (`job`, `instance`, the
/// `--remote-write-label`s), each set only where the series has no label of
/// that name (as Prometheus' `external_labels`).
struct Builder<'a> {
    extra: &'a [(String, String)],
    timestamp: i64,
    out: Vec<TimeSeries>,
}

impl Builder<'_> {
    fn series<'n>(
        &mut self,
        name: &str,
        labels: impl Iterator<Item = (&'n str, &'n str)>,
        le: Option<&str>,
        value: f64,
    ) {
        let mut all: Vec<Label> = Vec::with_capacity(8);
        all.push(Label {
            name: "__name__".into(),
            value: name.into(),
        });
        for (n, v) in labels {
            all.push(Label {
                name: n.into(),
                value: v.into(),
            });
        }
        if let Some(le) = le {
            all.push(Label {
                name: "le".into(),
                value: le.into(),
            });
        }
        for (n, v) in self.extra {
            if !all.iter().any(|l| &l.name == n) {
                all.push(Label {
                    name: n.clone(),
                    value: v.clone(),
                });
            }
        }
        // Receivers require label names in byte order.
        all.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        self.out.push(TimeSeries {
            labels: all,
            samples: vec![Sample {
                value,
                timestamp: self.timestamp,
            }],
        });
    }

    fn histogram<'n>(
        &mut self,
        name: &str,
        labels: &[(&'n str, &'n str)],
        buckets: impl Iterator<Item = (String, u64)>,
        sum: f64,
        count: u64,
    ) {
        for (le, cumulative) in buckets {
            self.series(
                &format!("{name}_bucket"),
                labels.iter().copied(),
                Some(&le),
                cumulative as f64,
            );
        }
        self.series(
            &format!("{name}_bucket"),
            labels.iter().copied(),
            Some("+Inf"),
            count as f64,
        );
        self.series(&format!("{name}_sum"), labels.iter().copied(), None, sum);
        self.series(
            &format!("{name}_count"),
            labels.iter().copied(),
            None,
            count as f64,
        );
    }
}

impl Visitor for Builder<'_> {
    fn scalar(&mut self, family: &'static FamilyDesc, labels: &[&str], value: f64) {
        let pairs = family.labels.iter().copied().zip(labels.iter().copied());
        self.series(family.name, pairs, None, value);
    }

    fn histogram(&mut self, family: &'static FamilyDesc, labels: &[&str], h: &HistogramSnapshot) {
        let pairs: Vec<(&str, &str)> = family
            .labels
            .iter()
            .copied()
            .zip(labels.iter().copied())
            .collect();
        // `cumulative` ends with the +Inf bucket, written by `histogram`.
        let buckets = h
            .bounds
            .iter()
            .map(f64::to_string)
            .zip(h.cumulative.iter().copied());
        Builder::histogram(self, family.name, &pairs, buckets, h.sum, h.count());
    }
}

/// Every `bot_*` and `botmetrics_*` series now, one sample each at
/// `timestamp` (ms), with `extra` labels.
pub fn snapshot(metrics: &Metrics, extra: &[(String, String)], timestamp: i64) -> WriteRequest {
    let mut b = Builder {
        extra,
        timestamp,
        out: Vec::with_capacity(1024),
    };
    metrics.visit(&mut b);
    // What a render sets, so a push-only deployment (nobody scrapes) shows
    // them too: the `bot_*` lines and the sketches' heap.
    metrics.selfm.series.set(b.out.len() as i64);
    let sketch_bytes: usize = metrics.bots().iter().map(|m| m.active.heap_bytes()).sum();
    metrics.selfm.sketch_bytes.set(sketch_bytes as i64);
    for family in metrics.gather() {
        let name = family.name();
        for m in family.get_metric() {
            let labels: Vec<(&str, &str)> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            match family.get_field_type() {
                MetricType::COUNTER => {
                    b.series(name, labels.into_iter(), None, m.get_counter().get_value())
                }
                MetricType::GAUGE => {
                    b.series(name, labels.into_iter(), None, m.get_gauge().get_value())
                }
                MetricType::HISTOGRAM => {
                    let h = m.get_histogram();
                    let buckets = h
                        .get_bucket()
                        .iter()
                        .filter(|bk| bk.upper_bound().is_finite())
                        .map(|bk| (bk.upper_bound().to_string(), bk.cumulative_count()));
                    b.histogram(
                        name,
                        &labels,
                        buckets,
                        h.get_sample_sum(),
                        h.get_sample_count(),
                    );
                }
                // botmetrics registers neither.
                MetricType::SUMMARY | MetricType::UNTYPED => {}
            }
        }
    }
    WriteRequest { timeseries: b.out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_has_the_exposition_s_series_and_values() {
        let metrics =
            Metrics::new(&["b".into()], 10, chrono_tz::UTC, 0.0, Default::default()).unwrap();
        let extra = vec![("instance".to_string(), "h:1".to_string())];
        let request = snapshot(&metrics, &extra, 42);
        let text = String::from_utf8(metrics.render()).unwrap();
        // Every exposition line is a pushed series with the same value.
        let pushed: std::collections::HashMap<String, f64> = request
            .timeseries
            .iter()
            .map(|t| {
                let name = &t
                    .labels
                    .iter()
                    .find(|l| l.name == "__name__")
                    .unwrap()
                    .value;
                let mut labels: Vec<String> = t
                    .labels
                    .iter()
                    .filter(|l| l.name != "__name__" && l.name != "instance")
                    .map(|l| format!("{}=\"{}\"", l.name, l.value))
                    .collect();
                labels.sort();
                (
                    format!("{name}{{{}}}", labels.join(",")),
                    t.samples[0].value,
                )
            })
            .collect();
        let mut lines = 0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut labels: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
            labels.sort();
            let key = format!("{name}{{{}}}", labels.join(","));
            // Gauges the render itself sets may differ by that render.
            if name.starts_with("botmetrics_render") {
                continue;
            }
            assert_eq!(
                pushed.get(&key).copied(),
                Some(value.parse().unwrap()),
                "{key}"
            );
            lines += 1;
        }
        assert!(lines > 50, "{lines} lines compared");
        for t in &request.timeseries {
            let names: Vec<&str> = t.labels.iter().map(|l| l.name.as_str()).collect();
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(names, sorted);
            assert!(names.contains(&"instance"));
            assert_eq!(
                t.samples,
                vec![Sample {
                    value: t.samples[0].value,
                    timestamp: 42
                }]
            );
        }
    }
}
