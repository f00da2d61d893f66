//! Exposes the bots' cells through the prometheus crate's `Collector` trait,
//! so one `Registry::gather` returns bot series and self-metrics together
//! and the crate's `TextEncoder` writes the exposition format.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};

use super::bot::{BotMetrics, FAMILIES, FamilyDesc, Kind, Visitor};
use super::cells::HistogramSnapshot;

const SERIES_NAME: &str = "botmetrics_series";
const SERIES_HELP: &str = "bot_* series currently exposed (histogram lines included).";

pub struct BotCollector {
    bots: Vec<Arc<BotMetrics>>,
    descs: Vec<Desc>,
}

impl BotCollector {
    pub fn new(bots: Vec<Arc<BotMetrics>>) -> prometheus::Result<Self> {
        let mut descs = FAMILIES
            .iter()
            .map(|f| {
                Desc::new(
                    f.name.to_owned(),
                    f.help.to_owned(),
                    f.labels.iter().map(|l| (*l).to_owned()).collect(),
                    Default::default(),
                )
            })
            .collect::<prometheus::Result<Vec<_>>>()?;
        descs.push(Desc::new(
            SERIES_NAME.into(),
            SERIES_HELP.into(),
            vec![],
            Default::default(),
        )?);
        Ok(BotCollector { bots, descs })
    }
}

/// Builds one `MetricFamily` per family, in `FAMILIES` order.
struct Builder {
    families: Vec<MetricFamily>,
    series: usize,
}

impl Builder {
    fn metric(&mut self, family: &'static FamilyDesc, labels: &[&str]) -> &mut proto::Metric {
        let i = FAMILIES
            .iter()
            .position(|f| f.name == family.name)
            .unwrap_or_default();
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
        let metrics = self.families[i].mut_metric();
        metrics.push(proto::Metric::from_label(pairs));
        metrics.last_mut().expect("just pushed")
    }
}

impl Visitor for Builder {
    fn scalar(&mut self, family: &'static FamilyDesc, labels: &[&str], value: f64) {
        self.series += 1;
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
        snapshot: &HistogramSnapshot,
    ) {
        // Buckets (the TextEncoder adds +Inf itself), _sum and _count.
        self.series += snapshot.cumulative.len() + 2;
        let mut h = proto::Histogram::default();
        h.set_sample_count(snapshot.count());
        h.set_sample_sum(snapshot.sum);
        h.set_bucket(
            snapshot
                .bounds
                .iter()
                .zip(&snapshot.cumulative)
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

impl Collector for BotCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let families = FAMILIES
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
            .collect();
        let mut builder = Builder {
            families,
            series: 0,
        };
        for bot in &self.bots {
            bot.visit(&mut builder);
        }
        let mut series = MetricFamily::default();
        series.set_name(SERIES_NAME.to_owned());
        series.set_help(SERIES_HELP.to_owned());
        series.set_field_type(MetricType::GAUGE);
        let mut g = proto::Gauge::default();
        g.set_value(builder.series as f64);
        series.set_metric(vec![proto::Metric::from_gauge(g)]);
        builder.families.push(series);
        builder.families
    }
}
