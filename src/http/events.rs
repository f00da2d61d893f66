//! `POST /v1/events`: events in.

use std::panic::AssertUnwindSafe;
use std::task::Poll;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};

use crate::BoxFuture;
use crate::event::{BodyFormat, parse_batch};
use crate::http::error::{Error, Result};
use crate::ingest::Accepted;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/events", post(post_events))
}

async fn post_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> impl IntoResponse {
    match ingest(&state, &headers, body).await {
        Ok(accepted) => Ok((StatusCode::ACCEPTED, answer(accepted))),
        Err(e) => {
            let bot = super::bearer(&headers).and_then(|t| state.registry.bot_for(t));
            super::rejected(bot.as_deref(), &e);
            state
                .metrics
                .selfm
                .events_rejected
                .with_label_values(&[e.code()])
                .inc();
            Err(e)
        }
    }
}

/// Checks everything about the request before anything is counted: the
/// token, the content type, the size, then every event of the batch.
async fn ingest(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Accepted> {
    let config = &state.config;
    if state.registry.is_empty() {
        return Err(Error::Unauthorized(
            "ingestion is disabled: start botmetrics with --tokens bot=secret",
        ));
    }
    let token = super::bearer(headers)
        .ok_or(Error::Unauthorized("send `Authorization: Bearer <token>`"))?;
    let bot_name = state
        .registry
        .bot_for(token)
        .ok_or(Error::Unauthorized("unknown token"))?;
    let bot = state
        .metrics
        .bot(&bot_name)
        .ok_or(Error::Unauthorized("unknown token"))?;

    let format = body_format(headers)?;
    let limit = usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX);
    let too_large = || {
        Error::TooLarge(format!(
            "the body is larger than {limit} bytes (--max-body-bytes)"
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > config.max_body_bytes) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            too_large()
        } else {
            Error::Malformed {
                message: format!("could not read the body: {e}"),
                index: None,
            }
        }
    })?;

    let now_ms = chrono::Utc::now().timestamp_millis();
    let now = now_ms.div_euclid(1000);
    let max_batch = usize::try_from(config.max_batch).unwrap_or(usize::MAX);
    // Run to the end whatever the client does: once its record is queued
    // in the journal, a batch must reach its count or refusal even if the
    // client hangs up or `--request-timeout` fires, or its record would
    // reach the disk uncounted (see `ingest`'s module doc). It is polled
    // here first: when nothing makes it wait (no group write to join, no
    // flush holding the gate; the common case of a single event) it is
    // done in that one poll, without a task of its own. If it must wait,
    // it moves to a task before this handler awaits anything, so nothing
    // can drop it halfway.
    let state = state.clone();
    let bot = bot.clone();
    let mut batch: BoxFuture<'static, Result<Accepted>> = Box::pin(async move {
        let mut events = parse_batch(&bytes, format, max_batch, now, &state.user_key)?;
        state.prices().price(&mut events);
        Ok(state.ingest.apply(&bot, &events, now_ms).await?)
    });
    let first = std::future::poll_fn(|cx| {
        Poll::Ready(std::panic::catch_unwind(AssertUnwindSafe(|| {
            batch.as_mut().poll(cx)
        })))
    })
    .await;
    match first {
        Ok(Poll::Ready(result)) => result,
        Ok(Poll::Pending) => tokio::spawn(batch)
            .await
            .map_err(|e| Error::Unavailable(format!("the batch was not applied: {e}")))?,
        Err(_) => Err(Error::Unavailable(
            "the batch was not applied: it panicked".into(),
        )),
    }
}

/// The answer's body. The two answers a single event gets are static, so
/// the hot path builds none; `Json` writes the rest.
fn answer(accepted: Accepted) -> axum::response::Response {
    const ONE_ACCEPTED: &str = r#"{"accepted":1,"duplicates":0}"#;
    const ONE_DUPLICATE: &str = r#"{"accepted":0,"duplicates":1}"#;
    let fixed = match (accepted.accepted, accepted.duplicates) {
        (1, 0) => ONE_ACCEPTED,
        (0, 1) => ONE_DUPLICATE,
        _ => return Json(accepted).into_response(),
    };
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        fixed,
    )
        .into_response()
}

fn body_format(headers: &HeaderMap) -> Result<BodyFormat> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mime = content_type.split(';').next().unwrap_or_default().trim();
    // Compared without case and without a lowercased copy: this runs for
    // every request.
    let is = |name: &str| mime.eq_ignore_ascii_case(name);
    if is("application/json") {
        Ok(BodyFormat::Json)
    } else if [
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
    ]
    .into_iter()
    .any(is)
    {
        Ok(BodyFormat::Ndjson)
    } else if mime.is_empty() {
        Err(Error::UnsupportedMediaType(
            "set Content-Type: application/json (an event or an array) or application/x-ndjson"
                .into(),
        ))
    } else {
        Err(Error::UnsupportedMediaType(format!(
            "Content-Type `{}` is not accepted; use application/json or application/x-ndjson",
            mime.to_ascii_lowercase()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The static answers are byte for byte what `Json` would write.
    #[tokio::test]
    async fn fixed_answers_are_the_json_ones() {
        for accepted in [
            Accepted {
                accepted: 1,
                duplicates: 0,
            },
            Accepted {
                accepted: 0,
                duplicates: 1,
            },
            Accepted {
                accepted: 7,
                duplicates: 3,
            },
        ] {
            let response = answer(accepted);
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            let body = axum::body::to_bytes(response.into_body(), 1024)
                .await
                .unwrap();
            assert_eq!(body, serde_json::to_vec(&accepted).unwrap());
        }
    }
}
