//! The HTTP API: one file per resource, each with its own `router()`,
//! merged here under the shared middleware.

mod admin;
mod charts;
pub mod error;
mod events;
mod health;
mod history;
mod metrics;
mod page;
mod summary;
mod users;

use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use tower_http::compression::CompressionLayer;
use tracing::Span;

use crate::http::error::{Error, InternalDetail, Result};
use crate::serve::RateLimited;
use crate::state::AppState;

/// The whole application as a router, separate from serving so tests can
/// drive it without a socket.
pub fn router(state: AppState) -> Router {
    let timeout = state.config.request_timeout;
    Router::new()
        .merge(events::router())
        .merge(admin::router())
        .merge(metrics::router())
        // Compresses the JSON answers that can be large, and the page and
        // its assets; /metrics arrives already compressed (once per
        // render), and event answers are tiny.
        .merge(
            summary::router()
                .merge(history::router())
                .merge(users::router())
                .merge(charts::router())
                .merge(page::router())
                .layer(CompressionLayer::new().gzip(true)),
        )
        .merge(health::router())
        .fallback(|| async { Error::NotFound("no such endpoint; see README for the API".into()) })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .with_state(state)
        .layer(Observe { timeout })
}

/// The project's own 408 (tower-http's has an empty body) and the request
/// log, in one layer: one clock read per request serves both the deadline
/// and the latency, and the span is built only when `debug` is on (at
/// ~100k requests a second, the two tower layers this replaces cost two
/// more clock reads, a boxed clone of the inner service and a wrapped body
/// per request). The timeout covers reading the body, which handlers do
/// themselves.
#[derive(Clone, Copy)]
struct Observe {
    timeout: Duration,
}

impl<S> tower_layer::Layer<S> for Observe {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone)]
struct Observed<S> {
    inner: S,
    timeout: Duration,
}

impl<S> tower_service::Service<Request> for Observed<S>
where
    S: tower_service::Service<Request, Response = Response, Error = std::convert::Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = crate::BoxFuture<'static, Result<Response, std::convert::Infallible>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        use tracing::Instrument;
        let started = tokio::time::Instant::now();
        let timeout = self.timeout;
        // Debug level: at the default `info` the span is never built.
        let span = tracing::debug_span!(
            "http",
            method = %req.method(),
            route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()),
            status = tracing::field::Empty,
        );
        let answer = self.inner.call(req);
        Box::pin(
            async move {
                let response = match tokio::time::timeout_at(started + timeout, answer).await {
                    Ok(Ok(response)) => response,
                    Err(_) => {
                        let e = Error::Timeout(timeout);
                        rejected(None, &e);
                        e.into_response()
                    }
                };
                log_answer(&response, started);
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// The request log: failures at error, the rest at debug. The latency is
/// read only for a line that is written.
fn log_answer(res: &Response, started: tokio::time::Instant) {
    let status = res.status().as_u16();
    Span::current().record("status", status);
    let latency = || started.elapsed();
    if let Some(InternalDetail(detail)) = res.extensions().get::<InternalDetail>() {
        tracing::error!(error = %detail, status, latency = ?latency(), "request failed");
    } else if res.status() == axum::http::StatusCode::SERVICE_UNAVAILABLE {
        // /readyz logs its changes of state itself; a line per probe would
        // drown them.
        tracing::debug!(latency = ?latency(), "request done");
    } else if res.status().is_server_error() {
        tracing::error!(status, latency = ?latency(), "request failed");
    } else {
        tracing::debug!(latency = ?latency(), "request done");
    }
}

/// Who may read counts, as decided by the request's bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reader {
    /// `--metrics-token`, or no token where `--metrics-token` is unset.
    Everything,
    /// A bot's own ingest token: that bot's summary and history only.
    Bot(std::sync::Arc<str>),
}

impl Reader {
    /// The reader of `/v1/summary` and `/v1/history`: `--metrics-token`
    /// reads every bot, a bot's token its own bot, and no token at all is
    /// enough only while `--metrics-token` is unset.
    fn of(state: &AppState, headers: &HeaderMap) -> Result<Reader> {
        let config = &state.config;
        let reader = match (bearer(headers), &config.metrics_token) {
            (Some(token), Some(expected)) if same_secret(token, expected) => Reader::Everything,
            (Some(token), _) => match state.registry.bot_for(token) {
                Some(bot) => Reader::Bot(bot),
                None => {
                    return Err(Error::Unauthorized(
                        "unknown token: send --metrics-token, or a bot's own token to read that bot",
                    ));
                }
            },
            (None, None) => Reader::Everything,
            (None, Some(_)) => {
                return Err(Error::Unauthorized(
                    "send `Authorization: Bearer <--metrics-token>`, or a bot's own token to read that bot",
                ));
            }
        };
        Ok(reader)
    }

    /// The bot a request reads: the one asked for, and for a bot's token
    /// its own bot, whether asked for or not.
    fn bot(&self, asked: Option<String>) -> Result<Option<String>> {
        match (self, asked) {
            (Reader::Everything, asked) => Ok(asked),
            (Reader::Bot(own), None) => Ok(Some(own.to_string())),
            (Reader::Bot(own), Some(asked)) if *asked == **own => Ok(Some(asked)),
            (Reader::Bot(own), Some(asked)) => Err(Error::Forbidden(format!(
                "this token reads bot `{own}` only, not `{asked}`"
            ))),
        }
    }
}

/// The one bot a per-bot read is about (`/v1/charts`, `/v1/retention`):
/// the one asked for, which must exist, or else the only one configured.
fn one_bot(
    state: &AppState,
    asked: Option<String>,
) -> Result<std::sync::Arc<crate::metrics::BotMetrics>> {
    match asked {
        Some(bot) => state
            .metrics
            .bot(&bot)
            .ok_or_else(|| Error::NotFound(format!("no bot named `{bot}` is configured"))),
        None => match &**state.metrics.bots() {
            [only] => Ok(only.clone()),
            _ => Err(Error::BadRequest(
                "name a bot: `bot` is required when several bots are configured".into(),
            )),
        },
    }
}

/// At most one warning a period about refused requests, so a misbehaving
/// client shows in the log without flooding it; every refusal is at debug.
static REJECTIONS: std::sync::Mutex<RateLimited> =
    std::sync::Mutex::new(RateLimited::new(Duration::from_secs(10)));

/// Logs a refused request: at debug always, with the bot when the token
/// named one, and at warn at most once per ten seconds.
fn rejected(bot: Option<&str>, e: &Error) {
    let status = e.status().as_u16();
    let reason = e.code();
    tracing::debug!(bot, status, reason, "request refused: {e}");
    let allowed = REJECTIONS.lock().unwrap_or_else(|p| p.into_inner()).allow();
    if let Some(suppressed) = allowed {
        tracing::warn!(
            bot,
            status,
            reason,
            suppressed,
            "request refused: {e} (at most one such line per 10 s; `suppressed` counts the others since the last, all are at debug)"
        );
    }
}

/// The token of an `Authorization: Bearer …` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares secrets in time independent of where they first differ.
use crate::registry::same_secret;

/// True when the client accepts a gzip body (and did not refuse it, q=0).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or_default();
            let refused =
                parts.any(|p| p.replace(' ', "").eq_ignore_ascii_case("q=0") || p == "q=0.0");
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

/// Serves a rendered answer, compressed if the client takes gzip.
fn serve_rendered(rendered: &crate::render_cache::Rendered, headers: &HeaderMap) -> Response {
    let mut response = match (&rendered.gzip, accepts_gzip(headers)) {
        (Some(gzip), true) => ([(header::CONTENT_ENCODING, "gzip")], gzip.clone()).into_response(),
        _ => rendered.body.clone().into_response(),
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(rendered.content_type),
    );
    h.insert(
        header::VARY,
        header::HeaderValue::from_static("accept-encoding"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "bearer abc")])),
            Some("abc")
        );
        assert_eq!(bearer(&headers(&[("authorization", "Basic abc")])), None);
        assert_eq!(bearer(&headers(&[])), None);
    }

    #[test]
    fn gzip_negotiation() {
        assert!(accepts_gzip(&headers(&[("accept-encoding", "gzip")])));
        assert!(accepts_gzip(&headers(&[(
            "accept-encoding",
            "deflate, gzip;q=0.5"
        )])));
        assert!(!accepts_gzip(&headers(&[("accept-encoding", "gzip;q=0")])));
        assert!(!accepts_gzip(&headers(&[("accept-encoding", "identity")])));
        assert!(!accepts_gzip(&headers(&[])));
    }

    #[test]
    fn secrets() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
