//! The user book's endpoints: `GET /v1/retention` (cohorts) and
//! `DELETE /v1/users/{user_id}` (erasure).

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{delete, get};
use axum::{Json, response::IntoResponse};
use chrono::{NaiveDate, TimeZone};
use serde::{Deserialize, Serialize};

use crate::event::{Event, EventBody, MAX_USER_ID_LEN, UserId};
use crate::http::error::{Error, Result};
use crate::metrics::today::Calendar;
use crate::metrics::users::RETENTION_DAYS;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/retention", get(get_retention))
        .route("/v1/users/{user_id}", delete(forget_user))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionParams {
    bot: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// Counts of users, never ratios (a ratio is count / size); `None` for a
/// day that has not come yet.
#[derive(Debug, Serialize)]
struct CohortRow {
    day: String,
    size: u32,
    d1: Option<u32>,
    d7: Option<u32>,
    d30: Option<u32>,
    rolling: Rolling,
}

#[derive(Debug, Serialize)]
struct Rolling {
    d1: Option<u32>,
    d7: Option<u32>,
    d30: Option<u32>,
}

#[derive(Debug, Serialize)]
struct RetentionAnswer {
    bot: String,
    timezone: String,
    cohorts: Vec<CohortRow>,
}

/// The most days one answer lists.
const MAX_DAYS: i64 = 400;

/// A day as `2026-11-23` or any RFC 3339 instant (its local day).
fn parse_day(raw: &str, what: &str, tz: chrono_tz::Tz) -> Result<u32> {
    if let Ok(date) = NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
        return Ok(Calendar::day_number(date));
    }
    chrono::DateTime::parse_from_rfc3339(raw)
        .map(|t| Calendar::day_number(tz.from_utc_datetime(&t.naive_utc()).date_naive()))
        .map_err(|_| {
            Error::BadRequest(format!(
                "`{what}` must be a day such as 2026-11-23 or an RFC 3339 time, not `{raw}`"
            ))
        })
}

async fn get_retention(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: std::result::Result<Query<RetentionParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RetentionAnswer>> {
    let reader = super::Reader::of(&state, &headers).inspect_err(|e| super::rejected(None, e))?;
    let Query(params) =
        params.map_err(|e| Error::BadRequest(format!("bad query: {}", e.body_text())))?;
    let metrics = super::one_bot(&state, reader.bot(params.bot)?)?;
    let bot = metrics.bot.to_string();
    let calendar = metrics.today.calendar();
    let tz = calendar.tz();
    let today = calendar.day_of(chrono::Utc::now().timestamp());
    let to = match &params.to {
        Some(raw) => parse_day(raw, "to", tz)?,
        None => today,
    };
    let from = match &params.from {
        Some(raw) => parse_day(raw, "from", tz)?,
        None => to.saturating_sub(30),
    };
    if from > to {
        return Err(Error::BadRequest(format!(
            "`from` ({}) is after `to` ({})",
            Calendar::date(from),
            Calendar::date(to)
        )));
    }
    if i64::from(to - from) >= MAX_DAYS {
        return Err(Error::BadRequest(format!(
            "at most {MAX_DAYS} days per request; narrow `from`..`to`"
        )));
    }
    let cohorts = metrics.cohorts();
    let rows = (from..=to)
        .map(|day| {
            let c = cohorts.iter().find(|c| c.day == day).copied();
            let c = c.unwrap_or(crate::metrics::users::Cohort {
                day,
                ..Default::default()
            });
            // A day +N that has not begun yet has no count, not a zero.
            let come = |i: usize| day + RETENTION_DAYS[i] <= today;
            let at = |i: usize, counts: &[u32; 3]| come(i).then_some(counts[i]);
            CohortRow {
                day: Calendar::date(day).to_string(),
                size: c.size,
                d1: at(0, &c.classic),
                d7: at(1, &c.classic),
                d30: at(2, &c.classic),
                rolling: Rolling {
                    d1: at(0, &c.rolling),
                    d7: at(1, &c.rolling),
                    d30: at(2, &c.rolling),
                },
            }
        })
        .collect();
    Ok(Json(RetentionAnswer {
        bot,
        timezone: tz.name().to_owned(),
        cohorts: rows,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForgetParams {
    bot: Option<String>,
}

#[derive(Debug, Serialize)]
struct Forgotten {
    forgotten: bool,
}

/// Forgets one user: the bot's own token, or `--metrics-token` with
/// `?bot=`. Journaled like an event, so it survives a crash and is replayed
/// in order; the answer says whether the book knew the user.
async fn forget_user(
    State(state): State<AppState>,
    headers: HeaderMap,
    user_id: std::result::Result<Path<String>, axum::extract::rejection::PathRejection>,
    params: std::result::Result<Query<ForgetParams>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response> {
    // An erasure changes state: reading being open (no --metrics-token)
    // does not make it open.
    if super::bearer(&headers).is_none() {
        return Err(Error::Unauthorized(
            "send `Authorization: Bearer <the bot's token>`, or --metrics-token with `?bot=`",
        ));
    }
    let reader = super::Reader::of(&state, &headers).inspect_err(|e| super::rejected(None, e))?;
    let Query(params) =
        params.map_err(|e| Error::BadRequest(format!("bad query: {}", e.body_text())))?;
    let Some(bot) = reader.bot(params.bot)? else {
        return Err(Error::BadRequest(
            "with --metrics-token, name the bot with `?bot=`".into(),
        ));
    };
    let Some(metrics) = state.metrics.bot(&bot) else {
        return Err(Error::NotFound(format!(
            "no bot named `{bot}` is configured"
        )));
    };
    let Path(user_id) =
        user_id.map_err(|e| Error::BadRequest(format!("bad user id: {}", e.body_text())))?;
    if user_id.is_empty() || user_id.chars().count() > MAX_USER_ID_LEN {
        return Err(Error::Invalid {
            message: format!("user_id must be 1 to {MAX_USER_ID_LEN} characters"),
            index: None,
        });
    }
    let user = state.user_key.hash(&UserId::Str(user_id.as_str().into()));
    let known = state.totals.knows_user(&metrics, user.0).await;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let event = Event {
        user: Some(user),
        event_id: None,
        ts: now_ms / 1000,
        chat_type: None,
        body: EventBody::Forget,
    };
    // On a task of its own, as an ingest request is: once journaled it must
    // be applied, whatever becomes of the connection.
    let ingest = state.ingest.clone();
    let applied = tokio::spawn(async move {
        ingest
            .apply(&metrics, std::slice::from_ref(&event), now_ms)
            .await
            .map(|_| ())
    })
    .await
    .map_err(|e| Error::Unavailable(format!("the erasure did not finish: {e}")))?;
    applied?;
    tracing::info!(bot = %bot, "a user was forgotten on request");
    Ok(Json(Forgotten { forgotten: known }).into_response())
}
