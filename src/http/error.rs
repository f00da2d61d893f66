//! The one error type of the HTTP API and its JSON shape.
//!
//! Every client error names precisely what is wrong, with the index of the
//! offending event when a batch is at fault. Internal errors are answered
//! with an opaque 500; their detail is logged by the tracing middleware,
//! which sees the [`InternalDetail`] extension, inside the request's span.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The body is not well-formed JSON (or NDJSON).
    #[error("{message}")]
    Malformed {
        message: String,
        index: Option<usize>,
    },

    /// No bearer token, or one that belongs to no bot.
    #[error("{0}")]
    Unauthorized(&'static str),

    /// A valid token asking for what it may not read (another bot's data).
    #[error("{0}")]
    Forbidden(String),

    /// The request took longer than `--request-timeout`.
    #[error("the request took longer than {0:?} (--request-timeout)")]
    Timeout(std::time::Duration),

    /// The body or the batch is larger than the configured limit.
    #[error("{0}")]
    TooLarge(String),

    /// The body is not JSON or NDJSON.
    #[error("{0}")]
    UnsupportedMediaType(String),

    /// Well-formed JSON that is not a valid event.
    #[error("{message}")]
    Invalid {
        message: String,
        index: Option<usize>,
    },

    /// A query parameter is missing or wrong.
    #[error("{0}")]
    BadRequest(String),

    #[error("{0}")]
    NotFound(String),

    /// The admin API: what is to be created exists already.
    #[error("{0}")]
    Conflict(String),

    #[error("method not allowed")]
    MethodNotAllowed,

    /// The store cannot answer right now.
    #[error("{0}")]
    Unavailable(String),

    /// Cluster mode: an event_id of the batch is being counted by another
    /// replica that has not confirmed it yet. Nothing of the batch counted.
    #[error("{0}")]
    RetryLater(String),

    #[error(transparent)]
    Store(#[from] crate::store::StoreError),

    /// The journal cannot take the batch: full while the store is behind,
    /// or broken by a failed write. Nothing of the batch was acknowledged.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
}

impl From<crate::event::ParseError> for Error {
    fn from(e: crate::event::ParseError) -> Self {
        use crate::event::ParseError;
        match e {
            ParseError::Malformed { message, index } => Error::Malformed { message, index },
            ParseError::Invalid { message, index } => Error::Invalid { message, index },
            ParseError::TooLarge(message) => Error::TooLarge(message),
        }
    }
}

impl From<crate::persist::PersistError> for Error {
    fn from(e: crate::persist::PersistError) -> Self {
        match e {
            crate::persist::PersistError::Store(e) => Error::Store(e),
            crate::persist::PersistError::Source(e) => {
                match e.downcast::<crate::ingest::IngestError>() {
                    Ok(e) => (*e).into(),
                    Err(e) => Error::Unavailable(e.to_string()),
                }
            }
        }
    }
}

impl From<crate::ingest::IngestError> for Error {
    fn from(e: crate::ingest::IngestError) -> Self {
        match e {
            crate::ingest::IngestError::Journal(e) => Error::Journal(e),
            pending @ crate::ingest::IngestError::Pending => Error::RetryLater(pending.to_string()),
            // Its token was revoked just before: the same answer a request
            // arriving a moment later gets.
            crate::ingest::IngestError::Wiped(_) => {
                Error::Unauthorized("unknown token: its bot was removed")
            }
        }
    }
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Malformed { .. } | Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::Unavailable(_) | Error::Store(_) | Error::Journal(_) | Error::RetryLater(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The stable, machine-readable code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Malformed { .. } => "malformed",
            Error::Unauthorized(_) => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::Timeout(_) => "timeout",
            Error::TooLarge(_) => "too_large",
            Error::UnsupportedMediaType(_) => "unsupported_media_type",
            Error::Invalid { .. } => "invalid",
            Error::BadRequest(_) => "bad_request",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::Unavailable(_) | Error::Store(_) => "unavailable",
            Error::RetryLater(_) => "retry_later",
            Error::Journal(crate::journal::JournalError::Full { .. }) => "journal_full",
            Error::Journal(_) => "journal_failed",
        }
    }

    fn index(&self) -> Option<usize> {
        match self {
            Error::Malformed { index, .. } | Error::Invalid { index, .. } => *index,
            _ => None,
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
}

/// Carries the full text of a server-side failure from the response to the
/// tracing middleware, which logs it; the client only sees a short message.
#[derive(Clone, Debug)]
pub struct InternalDetail(pub String);

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let message = match &self {
            // The store's own message may name hosts or SQL: keep it in logs.
            Error::Store(_) => "the store is unavailable; the event path is unaffected".to_owned(),
            other => other.to_string(),
        };
        let body = Body {
            error: self.code(),
            message,
            index: self.index(),
        };
        let mut response = (self.status(), Json(body)).into_response();
        if let Error::RetryLater(_) = &self {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        if let Error::Store(e) = &self {
            response
                .extensions_mut()
                .insert(InternalDetail(e.to_string()));
        }
        response
    }
}
