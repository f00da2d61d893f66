//! `GET /v1/summary`: the bot's own `/metrics` command, JSON or chat text.

use axum::Router;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::http::error::{Error, Result};
use std::sync::Arc;

use crate::metrics::BotMetrics;
use crate::render_cache::Rendered;
use crate::state::{AppState, SummaryKey};
use crate::summary::Summary;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/summary", get(get_summary))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    bot: Option<String>,
    format: Option<String>,
}

async fn get_summary(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: std::result::Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Result<Response> {
    let reader = super::Reader::of(&state, &headers).inspect_err(|e| super::rejected(None, e))?;
    let Query(mut params) =
        params.map_err(|e| Error::BadRequest(format!("bad query: {}", e.body_text())))?;
    params.bot = reader.bot(params.bot).inspect_err(|e| {
        if let super::Reader::Bot(own) = &reader {
            super::rejected(Some(own), e);
        }
    })?;
    let text = match params.format.as_deref() {
        None | Some("json") => false,
        Some("text") => true,
        Some(other) => {
            return Err(Error::BadRequest(format!(
                "format `{other}` is unknown; use json or text"
            )));
        }
    };
    if let Some(bot) = &params.bot
        && state.metrics.bot(bot).is_none()
    {
        return Err(Error::NotFound(format!(
            "no bot named `{bot}` is configured"
        )));
    }
    let key = SummaryKey {
        bot: params.bot,
        text,
        generation: state.persistence.cache_generation(),
    };
    let render_state = state.clone();
    let rendered = state
        .summaries
        .get_or_render_async(key.clone(), &state.metrics.selfm, async move {
            let bots: Vec<Arc<BotMetrics>> = render_state
                .metrics
                .bots()
                .iter()
                .filter(|b| key.bot.as_deref().is_none_or(|name| &*b.bot == name))
                .cloned()
                .collect();
            let uptime = render_state.started.elapsed().as_secs();
            let summaries: Vec<Summary> = render_state
                .totals
                .summaries(&bots, chrono::Utc::now(), uptime)
                .await
                .into_iter()
                .map(|s| s.in_currency(&render_state.config.currency))
                .collect();
            render(&summaries, &key)
        })
        .await;
    Ok(super::serve_rendered(&rendered, &headers).into_response())
}

/// The answer for `summaries`, as JSON or chat text.
fn render(summaries: &[Summary], key: &SummaryKey) -> Rendered {
    if key.text {
        let text = if summaries.is_empty() {
            "No bots are configured yet.".to_owned()
        } else {
            summaries
                .iter()
                .map(Summary::to_text)
                .collect::<Vec<_>>()
                .join("\n\n")
        };
        return Rendered::plain("text/plain; charset=utf-8", text.into_bytes());
    }
    // One bot (asked for, or the only one) is the object itself; several
    // are listed, so a client never has to guess the shape from the count.
    let body = match (key.bot.is_some() || summaries.len() == 1, summaries.first()) {
        (true, Some(one)) => serde_json::to_vec(one),
        // Written straight from the summaries: through a `serde_json::Value`
        // 1,000 bots' answer took 9 MB of map nodes first.
        _ => {
            #[derive(serde::Serialize)]
            struct Listed<'a> {
                bots: &'a [Summary],
            }
            serde_json::to_vec(&Listed { bots: summaries })
        }
    };
    Rendered::plain("application/json", body.unwrap_or_default())
}
