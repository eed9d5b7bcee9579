//! The coordinator's one error type: precise for 4xx, opaque for 5xx (the cause is logged).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use medsplit_engine::api::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(#[from] FieldError),
    #[error("{0}")]
    BadRequest(String),
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
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Gone(_) => StatusCode::GONE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Database(e) if is_unique_violation(e) => StatusCode::CONFLICT,
            Self::Database(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

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
        (status, Json(body)).into_response()
    }
}
