//! `GET /healthz` (the process serves) and `GET /readyz` (the store answers).

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::error::{Error, Result};
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
    if let Some(cluster) = &state.cluster {
        // Every replica serves, Redis and the store up or not: it counts in
        // memory and its journal, and its summary reads the cluster (or the
        // store) whatever its own state. Taking replicas out of a balancer
        // during a Redis outage would only refuse events they can keep.
        return Ok(Json(json!({
            "status": "ready",
            "store": backend,
            "cluster": true,
            "journal_counted": cluster.syncer.is_prepared(),
        })));
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
