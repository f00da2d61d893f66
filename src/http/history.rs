//! `GET /v1/history`: points from the history table, downsampled.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::http::error::{Error, Result};
use crate::metrics::bot::{FAMILIES, Kind};
use crate::state::AppState;
use crate::store::HistoryQuery;

/// Points per series in one answer, as Prometheus caps a range query.
pub const MAX_POINTS_PER_SERIES: i64 = 11_000;
/// Rows in one answer, whatever the number of series.
pub const MAX_ROWS: i64 = 100_000;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/history", get(get_history))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    metric: Option<String>,
    bot: Option<String>,
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
}

#[derive(Debug, Serialize)]
struct Answer {
    metric: String,
    from: String,
    to: String,
    step_seconds: i64,
    series: Vec<Series>,
}

#[derive(Debug, Serialize)]
struct Series {
    bot: String,
    labels: BTreeMap<String, String>,
    /// `[unix seconds, value]`, the last value stored within each step.
    points: Vec<(i64, f64)>,
}

/// The names history is kept under: every family, histograms as their
/// `_bucket`, `_sum` and `_count` lines.
pub fn known_metric(name: &str) -> bool {
    FAMILIES.iter().any(|f| match f.kind {
        Kind::Histogram => name
            .strip_prefix(f.name)
            .is_some_and(|suffix| matches!(suffix, "_bucket" | "_sum" | "_count")),
        _ => f.name == name,
    })
}

fn parse_time(field: &str, raw: &str) -> Result<DateTime<Utc>> {
    if let Ok(secs) = raw.parse::<f64>()
        && secs.is_finite()
        && secs >= 0.0
    {
        return DateTime::from_timestamp(secs as i64, 0)
            .ok_or_else(|| Error::BadRequest(format!("`{field}` is out of range")));
    }
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            Error::BadRequest(format!(
                "`{field}` must be RFC 3339 or unix seconds, got {raw:?}"
            ))
        })
}

async fn get_history(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: std::result::Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Answer>> {
    let reader = super::Reader::of(&state, &headers).inspect_err(|e| super::rejected(None, e))?;
    let Query(mut p) =
        params.map_err(|e| Error::BadRequest(format!("bad query: {}", e.body_text())))?;
    p.bot = reader.bot(p.bot).inspect_err(|e| {
        if let super::Reader::Bot(own) = &reader {
            super::rejected(Some(own), e);
        }
    })?;
    let metric = p.metric.ok_or_else(|| {
        Error::BadRequest("`metric` is required, e.g. metric=bot_messages_total".into())
    })?;
    if !known_metric(&metric) {
        return Err(Error::BadRequest(format!(
            "`{metric}` is not a botmetrics metric"
        )));
    }
    if let Some(bot) = &p.bot
        && state.metrics.bot(bot).is_none()
    {
        return Err(Error::NotFound(format!(
            "no bot named `{bot}` is configured"
        )));
    }
    let to =
        p.to.as_deref()
            .map(|t| parse_time("to", t))
            .transpose()?
            .unwrap_or_else(Utc::now);
    let from = match p.from.as_deref() {
        Some(f) => parse_time("from", f)?,
        None => to - chrono::Duration::days(1),
    };
    if from >= to {
        return Err(Error::BadRequest("`from` must be before `to`".into()));
    }
    let span = (to - from).num_seconds();
    let step_seconds = match p.step.as_deref() {
        Some(raw) => {
            let step = raw
                .parse::<u64>()
                .map(std::time::Duration::from_secs)
                .or_else(|_| crate::config::parse_duration(raw))
                .map_err(|e| Error::BadRequest(format!("`step`: {e}")))?;
            i64::try_from(step.as_secs()).unwrap_or(i64::MAX)
        }
        // Default: the history interval, or coarser so the cap holds.
        None => {
            (state.config.history_interval.as_secs() as i64).max(span / MAX_POINTS_PER_SERIES + 1)
        }
    };
    if step_seconds < 1 {
        return Err(Error::BadRequest("`step` must be at least 1s".into()));
    }
    if span / step_seconds > MAX_POINTS_PER_SERIES {
        return Err(Error::BadRequest(format!(
            "{} points per series exceed the limit of {MAX_POINTS_PER_SERIES}; raise `step` or narrow from/to",
            span / step_seconds
        )));
    }
    let query = HistoryQuery {
        metric: metric.clone(),
        bot: p.bot,
        from,
        to,
        step_seconds,
        limit: MAX_ROWS + 1,
    };
    let points = state.persistence.store.history(&query).await?;
    if points.len() as i64 > MAX_ROWS {
        return Err(Error::BadRequest(format!(
            "more than {MAX_ROWS} points match; name a bot, raise `step` or narrow from/to"
        )));
    }
    let mut series: Vec<Series> = Vec::new();
    for point in points {
        let labels: BTreeMap<String, String> =
            serde_json::from_str(&point.labels).unwrap_or_default();
        match series.last_mut() {
            Some(s) if s.bot == point.bot && s.labels == labels => {
                s.points.push((point.at.timestamp(), point.value))
            }
            _ => series.push(Series {
                bot: point.bot,
                labels,
                points: vec![(point.at.timestamp(), point.value)],
            }),
        }
    }
    let secs = chrono::SecondsFormat::Secs;
    Ok(Json(Answer {
        metric,
        from: from.to_rfc3339_opts(secs, true),
        to: to.to_rfc3339_opts(secs, true),
        step_seconds,
        series,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names() {
        assert!(known_metric("bot_messages_total"));
        assert!(known_metric("bot_response_duration_seconds_bucket"));
        assert!(known_metric("bot_db_queries_per_message_count"));
        assert!(!known_metric("bot_response_duration_seconds"));
        assert!(!known_metric("bot_messages_total_bucket"));
        assert!(!known_metric("pg_catalog"));
    }
}
