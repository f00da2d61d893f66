//! `/v1/admin/bots`: bots and their tokens at runtime, behind
//! `--admin-token` (see `registry` for what is kept and how it spreads).
//!
//! Every call is logged at info with who made it (the admin token's
//! prefix, never the token), what it asked and how it ended, and counted in
//! `botmetrics_admin_requests_total{action,outcome}`. A refused call
//! changes nothing: input is checked whole before the registry is touched.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::http::error::{Error, Result};
use crate::registry::{RegistryError, prefix_of, same_secret};
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/bots", get(list).post(create))
        .route("/v1/admin/bots/{bot}", delete(revoke_bot))
        .route(
            "/v1/admin/bots/{bot}/tokens",
            axum::routing::post(add_token),
        )
        .route("/v1/admin/bots/{bot}/tokens/{prefix}", delete(revoke_token))
}

/// The admin token's prefix when the request carries it.
fn admin(state: &AppState, headers: &HeaderMap) -> Result<String> {
    let Some(expected) = &state.config.admin_token else {
        return Err(Error::NotFound(
            "the admin API is off: start botmetrics with --admin-token".into(),
        ));
    };
    match super::bearer(headers) {
        Some(token) if same_secret(token, &expected.0) => Ok(prefix_of(token)),
        Some(_) => Err(Error::Unauthorized("wrong admin token")),
        None => Err(Error::Unauthorized(
            "send `Authorization: Bearer <--admin-token>`",
        )),
    }
}

/// One process with a standby: changes go to the writer, which reads the
/// registry only itself (see `startup::registry_loop`); a standby that
/// changed it would leave the writer serving the old tokens.
async fn writable(state: &AppState) -> Result<()> {
    if state.config.redis_url.is_none() && !state.persistence.store.is_writer().await {
        return Err(Error::Unavailable(
            "this process is a standby: send admin changes to the one serving the store (its /readyz says 200)".into(),
        ));
    }
    Ok(())
}

/// Runs one admin action: checks the token, logs and counts the outcome.
async fn run<F>(
    state: &AppState,
    headers: &HeaderMap,
    action: &'static str,
    bot: Option<&str>,
    work: F,
) -> Response
where
    F: std::future::Future<Output = Result<(StatusCode, serde_json::Value)>>,
{
    let who = match admin(state, headers) {
        Ok(who) => who,
        Err(e) => {
            tracing::warn!(
                action,
                bot,
                status = e.status().as_u16(),
                "admin call refused: {e}"
            );
            state.registry.count(action, "unauthorized");
            return e.into_response();
        }
    };
    let answer = work.await;
    match answer {
        Ok((status, body)) => {
            tracing::info!(who = %format!("admin:{who}"), action, bot, status = status.as_u16(), "admin call done");
            state.registry.count(action, "ok");
            (status, Json(body)).into_response()
        }
        Err(e) => {
            tracing::info!(who = %format!("admin:{who}"), action, bot, status = e.status().as_u16(), "admin call refused: {e}");
            state.registry.count(action, e.code());
            e.into_response()
        }
    }
}

impl From<RegistryError> for Error {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::UnknownBot(_) | RegistryError::UnknownToken { .. } => {
                Error::NotFound(e.to_string())
            }
            RegistryError::Duplicate(_) | RegistryError::Disagree { .. } => {
                Error::Conflict(e.to_string())
            }
            RegistryError::Random => Error::Unavailable(e.to_string()),
            RegistryError::Store(e) => Error::Store(e),
        }
    }
}

async fn list(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let work = async {
        state.registry.refresh().await?;
        Ok((StatusCode::OK, json!({ "bots": state.registry.bots() })))
    };
    run(&state, &headers, "list", None, work).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBot {
    bot: String,
}

fn checked_name(bot: &str) -> Result<()> {
    if crate::event::is_short_name(bot) {
        Ok(())
    } else {
        Err(Error::Invalid {
            message: format!(
                "bot name `{}` must be 1-64 characters of [A-Za-z0-9_.:-]",
                bot.chars().take(80).collect::<String>()
            ),
            index: None,
        })
    }
}

async fn create(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let parsed: std::result::Result<NewBot, _> = serde_json::from_slice(&body);
    let name = parsed.as_ref().ok().map(|b| b.bot.clone());
    let work = async {
        let new = parsed.map_err(|e| match e.classify() {
            serde_json::error::Category::Data => Error::Invalid {
                message: format!("{e}; send {{\"bot\": \"name\"}}"),
                index: None,
            },
            _ => Error::Malformed {
                message: format!("{e}; send {{\"bot\": \"name\"}}"),
                index: None,
            },
        })?;
        checked_name(&new.bot)?;
        writable(&state).await?;
        let (token, prefix) = state.registry.create(&new.bot).await?;
        Ok((
            StatusCode::CREATED,
            json!({ "bot": new.bot, "token": token, "prefix": prefix }),
        ))
    };
    run(&state, &headers, "create_bot", name.as_deref(), work).await
}

async fn add_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(bot): Path<String>,
) -> Response {
    let work = async {
        checked_name(&bot)?;
        writable(&state).await?;
        let (token, prefix) = state.registry.add_token(&bot).await?;
        Ok((
            StatusCode::CREATED,
            json!({ "bot": bot, "token": token, "prefix": prefix }),
        ))
    };
    run(&state, &headers, "add_token", Some(&bot), work).await
}

async fn revoke_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((bot, prefix)): Path<(String, String)>,
) -> Response {
    let work = async {
        checked_name(&bot)?;
        writable(&state).await?;
        state.registry.revoke_token(&bot, &prefix).await?;
        Ok((StatusCode::OK, json!({ "bot": bot, "revoked": prefix })))
    };
    run(&state, &headers, "revoke_token", Some(&bot), work).await
}

#[derive(Deserialize)]
struct RevokeQuery {
    #[serde(default)]
    wipe: bool,
}

async fn revoke_bot(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(bot): Path<String>,
    query: std::result::Result<Query<RevokeQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let work = async {
        checked_name(&bot)?;
        let Query(query) = query.map_err(|e| Error::BadRequest(e.body_text()))?;
        writable(&state).await?;
        let registered = match state.registry.revoke_bot(&bot).await {
            Ok(()) => true,
            // Revoked before with its data kept: a wipe still removes it
            // (from memory, or from the store after a restart).
            Err(RegistryError::UnknownBot(_)) if query.wipe => false,
            Err(e) => return Err(e.into()),
        };
        if !query.wipe {
            return Ok((
                StatusCode::OK,
                json!({ "bot": bot, "revoked": true, "wiped": false }),
            ));
        }
        // On a task of its own, as an ingest request is: once journaled the
        // wipe must be applied, whatever becomes of the connection.
        let persistence = state.persistence.clone();
        let name = bot.clone();
        let report = tokio::spawn(async move { persistence.wipe(&name).await })
            .await
            .map_err(|e| Error::Unavailable(format!("the wipe did not finish: {e}")))??;
        if !registered && report.memory == Default::default() && report.store_rows == Some(0) {
            return Err(RegistryError::UnknownBot(bot.clone()).into());
        }
        Ok((
            StatusCode::OK,
            json!({
                "bot": bot,
                "revoked": registered,
                "wiped": true,
                "removed": {
                    "series": report.memory.series,
                    "users": report.memory.users,
                    "store_rows": report.store_rows,
                },
                "store": if report.store_rows.is_some() { "removed" } else { "pending" },
            }),
        ))
    };
    run(&state, &headers, "revoke_bot", Some(&bot), work).await
}
