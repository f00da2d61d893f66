//! `GET /metrics`: the Prometheus exposition, rendered at most once per TTL.

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::http::error::Error;
use crate::render_cache::Rendered;
use crate::state::AppState;

/// The content type of the Prometheus text format, exactly.
pub const EXPOSITION_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(get_metrics))
}

async fn get_metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    // Open while --metrics-token is unset, whatever the request carries:
    // Prometheus is configured once and should not break on a stray header.
    if let Some(expected) = &state.config.metrics_token {
        let token = super::bearer(&headers);
        if !token.is_some_and(|token| super::same_secret(token, expected)) {
            let bot = token.and_then(|t| state.registry.bot_for(t));
            let e = match &bot {
                Some(bot) => Error::Forbidden(format!(
                    "bot `{bot}`'s token reads its own /v1/summary and /v1/history; /metrics needs --metrics-token"
                )),
                None => {
                    Error::Unauthorized("/metrics needs `Authorization: Bearer <--metrics-token>`")
                }
            };
            super::rejected(bot.as_deref(), &e);
            return e.into_response();
        }
    }
    let metrics = state.metrics.clone();
    let rendered = state
        .metrics_page
        .get_or_render(
            state.persistence.cache_generation(),
            &state.metrics.selfm,
            move || Rendered::with_gzip(EXPOSITION_CONTENT_TYPE, metrics.render_body()),
        )
        .await;
    super::serve_rendered(&rendered, &headers)
}
