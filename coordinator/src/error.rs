//! The coordinator's one error type: precise for 4xx, opaque for 5xx (the cause is logged).

use axum::Json;
use axum::extract::rejection::{
    BytesRejection, PathRejection, QueryRejection, RawPathParamsRejection,
};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use medsplit_engine::api::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{0}")]
    BadRequest(String),
    /// The request was refused before its handler ran (by an extractor: a malformed path or
    /// query, a body that is too large or not JSON, no WebSocket upgrade), with that status.
    #[error("{message}")]
    Rejected { status: StatusCode, message: String },
    #[error("authentication required")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(&'static str),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Unavailable(&'static str),
    /// Too many failed log-ins: retry after this many seconds.
    #[error("too many failed log-ins; try again in {0} s")]
    TooManyRequests(u64),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Rejected { status, .. } => *status,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Gone(_) => StatusCode::GONE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Database(e) if is_unique_violation(e) => StatusCode::CONFLICT,
            Self::Database(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl Error {
    /// A unique violation as a conflict with `message`; other errors as they are.
    pub fn conflict(e: sqlx::Error, message: &str) -> Self {
        if is_unique_violation(&e) {
            Self::Conflict(message.into())
        } else {
            e.into()
        }
    }

    /// The body is not declared as JSON.
    pub fn not_json() -> Self {
        Self::Rejected {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: "the body must be JSON, sent with Content-Type: application/json".into(),
        }
    }
}

macro_rules! from_rejection {
    ($($rejection:ty),*) => {$(
        impl From<$rejection> for Error {
            fn from(r: $rejection) -> Self {
                Self::Rejected { status: r.status(), message: r.body_text() }
            }
        }
    )*};
}

from_rejection!(
    BytesRejection,
    PathRejection,
    QueryRejection,
    RawPathParamsRejection,
    WebSocketUpgradeRejection
);

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            Self::Invalid(f) => {
                serde_json::json!({ "error": f.to_string(), "field": f.field, "message": f.message })
            }
            Self::Database(e) if is_unique_violation(e) => {
                serde_json::json!({ "error": "already exists" })
            }
            Self::Unavailable(m) => serde_json::json!({ "error": m }),
            _ if status.is_server_error() => {
                tracing::error!(error = %self, "request failed");
                serde_json::json!({ "error": "internal error" })
            }
            _ => serde_json::json!({ "error": self.to_string() }),
        };
        let mut response = (status, Json(body)).into_response();
        if let Self::TooManyRequests(seconds) = self {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds),
            );
        }
        response
    }
}
