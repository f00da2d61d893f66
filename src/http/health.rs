//! `GET /healthz` (the process serves) and `GET /readyz` (it can take
//! events, because its journal can write, and answer with the right totals:
//! in one process, the store answers and its totals are loaded; in cluster
//! mode, always — see `totals::Totals`).

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::http::error::{Error, Result};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the store answers and stored totals are loaded: a load
/// balancer should not route to a replica that would show reset counters.
/// A change of state is logged once, not once per probe.
async fn readyz(State(state): State<AppState>) -> Result<Json<Value>> {
    let answer = check(&state).await;
    let now = match &answer {
        Ok(_) => "ready",
        Err((kind, _)) => kind,
    };
    let before = {
        let mut last = state.readiness.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *last, now)
    };
    if before != now {
        match &answer {
            Ok(_) if before.is_empty() => tracing::debug!("ready"),
            Ok(_) => tracing::info!("ready again"),
            Err((_, e)) => tracing::warn!("not ready: {e}"),
        }
    }
    answer.map_err(|(_, e)| e)
}

async fn check(state: &AppState) -> std::result::Result<Json<Value>, (&'static str, Error)> {
    let persistence = &state.persistence;
    let backend = persistence.store.backend();
    // In both modes: a replica whose journal broke refuses every event
    // until restart, so a balancer must take it out.
    if state.ingest.journal().is_some_and(|j| j.is_broken()) {
        return Err((
            "journal",
            Error::Unavailable(
                "a journal write failed (a full or failing disk); events are refused until restart"
                    .into(),
            ),
        ));
    }
    if let Some(fields) = state.totals.ready_without_store() {
        let mut answer = serde_json::Map::new();
        answer.insert("status".into(), "ready".into());
        answer.insert("store".into(), backend.into());
        answer.extend(fields.into_iter().map(|(k, v)| (k.to_owned(), v)));
        return Ok(Json(Value::Object(answer)));
    }

    match tokio::time::timeout(Duration::from_secs(2), persistence.store.ping()).await {
        Ok(Ok(())) => state.metrics.selfm.store_up.set(1),
        Ok(Err(e)) => {
            state.metrics.selfm.store_up.set(0);
            return Err((
                "unreachable",
                Error::Unavailable(format!("the {backend} store is unreachable: {e}")),
            ));
        }
        Err(_) => {
            state.metrics.selfm.store_up.set(0);
            return Err((
                "slow",
                Error::Unavailable(format!("the {backend} store did not answer within 2 s")),
            ));
        }
    }
    if let Some(reason) = persistence.standby_reason() {
        return Err(("standby", Error::Unavailable(reason)));
    }
    if !persistence.is_restored() {
        return Err((
            "restoring",
            Error::Unavailable("stored totals are not loaded yet".into()),
        ));
    }
    Ok(Json(json!({ "status": "ready", "store": backend })))
}
