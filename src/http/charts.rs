//! `GET /v1/charts`: the built-in page's charts, ready to draw. History
//! keeps cumulative counters and histogram buckets; a person wants "how
//! many per hour" and "how slow was that hour", so this turns one bot's
//! history into one value per step for each chart: counter increases,
//! gauges as they stood, latency percentiles from the step's bucket
//! increases (interpolated as PromQL's `histogram_quantile` does).
//!
//! Every number comes from the history table, in one process and in
//! cluster mode alike: the charts lag the present by at most one
//! `--history-interval`, and the page's figures of today come from
//! `/v1/summary`.

use std::collections::{BTreeMap, HashMap};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::http::error::{Error, Result};
use crate::metrics::HistogramSnapshot;
use crate::metrics::bot::histogram_bounds;
use crate::state::AppState;
use crate::store::HistoryQuery;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/charts", get(get_charts))
}

/// The ranges the page offers, with the step each is drawn in: hours for
/// a day or a week (168 points), days for a month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    Day,
    Week,
    Month,
}

impl Range {
    pub fn parse(raw: &str) -> Option<Range> {
        match raw {
            "24h" | "1d" => Some(Range::Day),
            "7d" => Some(Range::Week),
            "30d" => Some(Range::Month),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Range::Day => "24h",
            Range::Week => "7d",
            Range::Month => "30d",
        }
    }

    /// (step in seconds, number of steps).
    fn steps(self) -> (i64, i64) {
        match self {
            Range::Day => (3600, 24),
            Range::Week => (3600, 168),
            Range::Month => (86_400, 30),
        }
    }
}

/// How a chart series is read from one history metric.
#[derive(Debug, Clone, Copy)]
enum Read {
    /// The increase per step of a counter, summed over its series whose
    /// label `.0` is not `.1` (no filter when `None`).
    Increase(Option<(&'static str, &'static str)>),
    /// A gauge's last value within the step, for the series with this
    /// label; carried forward over steps without a point (history skips a
    /// tick in which nothing changed).
    Gauge(&'static str, &'static str),
    /// A quantile of the step's observations, in milliseconds.
    QuantileMs(f64),
}

/// The chart series, by name: a new chart line is one row here and one in
/// the page's table.
const SERIES: &[(&str, &str, Read)] = &[
    ("messages", "bot_messages_total", Read::Increase(None)),
    (
        "active_users",
        "bot_active_users",
        Read::Gauge("window", "1d"),
    ),
    (
        "latency_p50_ms",
        "bot_response_duration_seconds",
        Read::QuantileMs(0.5),
    ),
    (
        "latency_p95_ms",
        "bot_response_duration_seconds",
        Read::QuantileMs(0.95),
    ),
    ("errors", "bot_errors_total", Read::Increase(None)),
    (
        "failed_responses",
        "bot_responses_total",
        Read::Increase(Some(("status", "success"))),
    ),
    (
        "registered",
        "bot_users_registered_total",
        Read::Increase(None),
    ),
    ("spend", "bot_llm_cost_total", Read::Increase(None)),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    bot: Option<String>,
    range: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Answer {
    pub bot: String,
    pub range: &'static str,
    pub step_seconds: i64,
    /// `--currency`, the unit of `spend`.
    pub currency: String,
    /// The start of each step, unix seconds; the last step is the current one.
    pub times: Vec<i64>,
    /// One value per step of `times`; `null` where history has nothing to
    /// say (before its first point; latency in a step without responses).
    pub series: BTreeMap<&'static str, Vec<Option<f64>>>,
}

async fn get_charts(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: std::result::Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Result<Response> {
    let reader = super::Reader::of(&state, &headers).inspect_err(|e| super::rejected(None, e))?;
    let Query(p) =
        params.map_err(|e| Error::BadRequest(format!("bad query: {}", e.body_text())))?;
    let asked = reader.bot(p.bot).inspect_err(|e| {
        if let super::Reader::Bot(own) = &reader {
            super::rejected(Some(own), e);
        }
    })?;
    let range = match p.range.as_deref() {
        None => Range::Day,
        Some(raw) => Range::parse(raw).ok_or_else(|| {
            Error::BadRequest(format!("`range` must be 24h, 7d or 30d, got {raw:?}"))
        })?,
    };
    let bot = super::one_bot(&state, asked)?.bot.to_string();
    let cache = &state.charts.0;
    let key = (bot.clone(), range.name());
    let answer = cache
        .try_get_with(key, async {
            let answer = charts(&state, bot, range, Utc::now()).await?;
            serde_json::to_vec(&answer)
                .map(bytes::Bytes::from)
                .map_err(|e| Error::Unavailable(format!("charts: {e}")))
        })
        .await
        .map_err(|e| match &*e {
            // The store's own message may name hosts or SQL: log it here,
            // answer as the API answers any store failure.
            Error::Store(detail) => {
                tracing::error!(error = %detail, "charts: history read failed");
                Error::Unavailable("the store is unavailable; the event path is unaffected".into())
            }
            other => Error::Unavailable(other.to_string()),
        })?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        answer,
    )
        .into_response())
}

/// The charts of `bot` over `range`, as of `now`.
pub async fn charts(
    state: &AppState,
    bot: String,
    range: Range,
    now: DateTime<Utc>,
) -> Result<Answer> {
    let (step, n) = range.steps();
    let last = now.timestamp().div_euclid(step) * step;
    let first = last - (n - 1) * step;
    let times: Vec<i64> = (0..n).map(|i| first + i * step).collect();
    let from = DateTime::from_timestamp(first, 0).unwrap_or(now);
    // One read per history metric, however many chart series it feeds.
    let mut metrics: Vec<String> = Vec::new();
    for (_, family, read) in SERIES {
        let metric = match read {
            Read::QuantileMs(_) => format!("{family}_bucket"),
            _ => (*family).to_owned(),
        };
        if !metrics.contains(&metric) {
            metrics.push(metric);
        }
    }
    let store = &state.persistence.store;
    // In turn: a handful of indexed reads, whose cost is the database's.
    let mut read = Vec::with_capacity(metrics.len());
    for metric in &metrics {
        let query = HistoryQuery {
            metric: metric.clone(),
            bot: Some(bot.clone()),
            from,
            to: now,
            step_seconds: step,
            limit: super::history::MAX_ROWS + 1,
        };
        let before = store.history_before(metric, &bot, from).await?;
        let points = store.history(&query).await?;
        if points.len() as i64 > super::history::MAX_ROWS {
            // Only a bot with hundreds of error kinds or models gets here;
            // a partial sum would draw a wrong chart, so none is drawn.
            return Err(Error::Unavailable(format!(
                "`{metric}` has more than {} points in this range; chart a shorter range",
                super::history::MAX_ROWS
            )));
        }
        read.push((before, points));
    }
    let mut by_metric: HashMap<&str, Stepped> = HashMap::new();
    for (metric, (before, points)) in metrics.iter().zip(read) {
        let mut stepped = Stepped::default();
        for (labels, value) in before {
            stepped.entry(labels).base = Some(value);
        }
        for p in points {
            let i = (p.at.timestamp() - first).div_euclid(step);
            if let Ok(i) = usize::try_from(i)
                && i < times.len()
            {
                stepped.entry(p.labels).at.insert(i, p.value);
            }
        }
        by_metric.insert(metric.as_str(), stepped);
    }
    let empty = Stepped::default();
    let mut series = BTreeMap::new();
    for (name, family, read) in SERIES {
        let values = match read {
            Read::Increase(except) => {
                let s = by_metric.get(*family).unwrap_or(&empty);
                s.increases(times.len(), |labels| match except {
                    None => true,
                    Some((k, v)) => labels.get(*k).is_none_or(|l| l != v),
                })
            }
            Read::Gauge(k, v) => by_metric
                .get(*family)
                .unwrap_or(&empty)
                .gauge(times.len(), |labels| labels.get(*k).is_some_and(|l| l == v)),
            Read::QuantileMs(q) => {
                let bucket = format!("{family}_bucket");
                let s = by_metric.get(bucket.as_str()).unwrap_or(&empty);
                histogram_bounds(family).map_or_else(
                    || vec![None; times.len()],
                    |bounds| s.quantiles_ms(times.len(), bounds, *q),
                )
            }
        };
        series.insert(*name, values);
    }
    Ok(Answer {
        bot,
        range: range.name(),
        step_seconds: step,
        currency: state.config.currency.clone(),
        times,
        series,
    })
}

/// One metric's series, each as its value before the range and its last
/// value per step index.
#[derive(Debug, Default)]
struct Stepped {
    series: HashMap<String, Line>,
}

#[derive(Debug, Default)]
struct Line {
    base: Option<f64>,
    at: BTreeMap<usize, f64>,
}

impl Stepped {
    fn entry(&mut self, labels: String) -> &mut Line {
        self.series.entry(labels).or_default()
    }

    fn lines<'a>(
        &'a self,
        keep: impl Fn(&BTreeMap<String, String>) -> bool + 'a,
    ) -> impl Iterator<Item = (BTreeMap<String, String>, &'a Line)> + 'a {
        self.series.iter().filter_map(move |(labels, line)| {
            let labels: BTreeMap<String, String> = serde_json::from_str(labels).ok()?;
            keep(&labels).then_some((labels, line))
        })
    }

    /// The summed increase per step of the kept counters. A series with no
    /// point before the range started within it, at 0 (a tick writes every
    /// series, so an earlier point would hold it). A value below the one
    /// before is a reset, as `increase()` reads it. Steps before the first
    /// point of any series are `None`: history did not exist then.
    fn increases(
        &self,
        n: usize,
        keep: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> Vec<Option<f64>> {
        let mut out: Vec<Option<f64>> = vec![None; n];
        for (_, line) in self.lines(keep) {
            let mut prev = line.base;
            for (i, slot) in out.iter_mut().enumerate() {
                let add = match (line.at.get(&i), prev) {
                    (Some(&v), Some(p)) if v >= p => Some(v - p),
                    (Some(&v), _) => Some(v),
                    (None, Some(_)) => Some(0.0),
                    (None, None) => None,
                };
                if let Some(&v) = line.at.get(&i) {
                    prev = Some(v);
                }
                if let Some(add) = add {
                    *slot = Some(slot.unwrap_or(0.0) + add);
                }
            }
        }
        out
    }

    /// The kept gauge's last value per step, carried forward.
    fn gauge(
        &self,
        n: usize,
        keep: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> Vec<Option<f64>> {
        let mut out: Vec<Option<f64>> = vec![None; n];
        for (_, line) in self.lines(keep) {
            let mut prev = line.base;
            for (i, slot) in out.iter_mut().enumerate() {
                if let Some(&v) = line.at.get(&i) {
                    prev = Some(v);
                }
                if let Some(v) = prev {
                    *slot = Some(slot.unwrap_or(0.0) + v);
                }
            }
        }
        out
    }

    /// The `q` quantile of each step's observations, from the increase of
    /// each bucket line in the step; `None` in a step without any.
    fn quantiles_ms(&self, n: usize, bounds: &'static [f64], q: f64) -> Vec<Option<f64>> {
        let mut per_le: Vec<Vec<Option<f64>>> = vec![vec![None; n]; bounds.len() + 1];
        for (labels, line) in self.lines(|_| true) {
            let Some(le) = labels.get("le") else { continue };
            let index = if le == "+Inf" {
                Some(bounds.len())
            } else {
                le.parse::<f64>()
                    .ok()
                    .and_then(|le| bounds.iter().position(|b| *b == le))
            };
            let Some(index) = index else { continue };
            let one = Stepped {
                series: HashMap::from([(
                    String::from("{}"),
                    Line {
                        base: line.base,
                        at: line.at.clone(),
                    },
                )]),
            };
            per_le[index] = one.increases(n, |_| true);
        }
        (0..n)
            .map(|i| {
                let cumulative: Vec<u64> = per_le
                    .iter()
                    .map(|line| line[i].unwrap_or(0.0).max(0.0).round() as u64)
                    .collect();
                let snapshot = HistogramSnapshot {
                    bounds,
                    cumulative,
                    sum: 0.0,
                };
                snapshot.quantile(q).map(|s| (s * 1000.0).round())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A series' labels, its value before the range, its points by step.
    type Given<'a> = (&'a str, Option<f64>, &'a [(usize, f64)]);

    fn stepped(lines: &[Given<'_>]) -> Stepped {
        Stepped {
            series: lines
                .iter()
                .map(|(labels, base, at)| {
                    (
                        (*labels).to_owned(),
                        Line {
                            base: *base,
                            at: at.iter().copied().collect(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(Range::parse("24h"), Some(Range::Day));
        assert_eq!(Range::parse("7d"), Some(Range::Week));
        assert_eq!(Range::parse("30d"), Some(Range::Month));
        assert_eq!(Range::parse("1y"), None);
        assert_eq!(Range::Week.steps(), (3600, 168));
        assert_eq!(Range::Month.steps(), (86_400, 30));
    }

    #[test]
    fn increases_carry_the_last_value_over_quiet_steps() {
        // Base 10 before the range; 12 in step 1, nothing in 2, 15 in 3.
        let s = stepped(&[(r#"{"role":"user"}"#, Some(10.0), &[(1, 12.0), (3, 15.0)])]);
        assert_eq!(
            s.increases(5, |_| true),
            [Some(0.0), Some(2.0), Some(0.0), Some(3.0), Some(0.0)]
        );
    }

    #[test]
    fn a_series_born_in_the_range_counts_from_zero_and_earlier_steps_are_unknown() {
        let s = stepped(&[(r#"{"role":"user"}"#, None, &[(2, 4.0), (3, 6.0)])]);
        assert_eq!(s.increases(4, |_| true), [None, None, Some(4.0), Some(2.0)]);
    }

    #[test]
    fn increases_sum_kept_series_and_read_a_drop_as_a_reset() {
        let s = stepped(&[
            (r#"{"status":"success"}"#, Some(0.0), &[(0, 100.0)]),
            (r#"{"status":"error"}"#, Some(5.0), &[(0, 7.0), (1, 3.0)]),
            (r#"{"status":"timeout"}"#, Some(1.0), &[(1, 2.0)]),
        ]);
        let failed = s.increases(2, |l| l.get("status").is_none_or(|v| v != "success"));
        assert_eq!(failed, [Some(2.0), Some(3.0 + 1.0)]);
    }

    #[test]
    fn gauges_take_the_kept_series_carried_forward() {
        let s = stepped(&[
            (r#"{"window":"1d"}"#, None, &[(1, 3.0), (3, 5.0)]),
            (r#"{"window":"7d"}"#, None, &[(0, 30.0)]),
        ]);
        assert_eq!(
            s.gauge(4, |l| l.get("window").is_some_and(|w| w == "1d")),
            [None, Some(3.0), Some(3.0), Some(5.0)]
        );
    }

    #[test]
    fn quantiles_come_from_the_step_increase_of_each_bucket() {
        let bounds: &'static [f64] = &[0.1, 1.0, 10.0];
        // Step 0: 10 answers in (0.1, 1]. Step 1: none. Step 2: 10 more,
        // all in (1, 10].
        let s = stepped(&[
            (r#"{"le":"0.1"}"#, Some(0.0), &[(0, 0.0), (2, 0.0)]),
            (r#"{"le":"1"}"#, Some(0.0), &[(0, 10.0), (2, 10.0)]),
            (r#"{"le":"10"}"#, Some(0.0), &[(0, 10.0), (2, 20.0)]),
            (r#"{"le":"+Inf"}"#, Some(0.0), &[(0, 10.0), (2, 20.0)]),
        ]);
        assert_eq!(
            s.quantiles_ms(3, bounds, 0.5),
            [Some(550.0), None, Some(5500.0)]
        );
    }
}
