//! `POST /v1/events`: events in.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};

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
        Ok(accepted) => Ok((StatusCode::ACCEPTED, Json(accepted))),
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
    // On a task of its own: once its record is queued in the journal, a
    // batch must run to its count or refusal whatever the client does
    // (hangs up, or `--request-timeout` fires), or its record would reach
    // the disk uncounted (see `ingest`'s module doc).
    let state = state.clone();
    let bot = bot.clone();
    tokio::spawn(async move {
        let mut events = parse_batch(&bytes, format, max_batch, now, &state.user_key)?;
        state.prices().price(&mut events);
        Ok(state.ingest.apply(&bot, &events, now_ms).await?)
    })
    .await
    .map_err(|e| Error::Unavailable(format!("the batch was not applied: {e}")))?
}

fn body_format(headers: &HeaderMap) -> Result<BodyFormat> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(BodyFormat::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
            Ok(BodyFormat::Ndjson)
        }
        "" => Err(Error::UnsupportedMediaType(
            "set Content-Type: application/json (an event or an array) or application/x-ndjson"
                .into(),
        )),
        other => Err(Error::UnsupportedMediaType(format!(
            "Content-Type `{other}` is not accepted; use application/json or application/x-ndjson"
        ))),
    }
}
