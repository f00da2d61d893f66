//! `GET /metrics`: the Prometheus exposition, rendered at most once per TTL.

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::Error;
use crate::render_cache::Rendered;
use crate::state::AppState;

/// The content type of the Prometheus text format, exactly.
pub const EXPOSITION_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(get_metrics))
}

async fn get_metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(expected) = &state.config.metrics_token {
        let ok = super::bearer(&headers).is_some_and(|token| super::same_secret(token, expected));
        if !ok {
            return Error::Unauthorized("/metrics needs `Authorization: Bearer <--metrics-token>`")
                .into_response();
        }
    }
    let metrics = state.metrics.clone();
    let rendered = state
        .metrics_page
        .get_or_render(
            state.persistence.generation(),
            &state.metrics.selfm,
            move || Rendered::with_gzip(EXPOSITION_CONTENT_TYPE, metrics.render()),
        )
        .await;
    super::serve_rendered(&rendered, &headers)
}
