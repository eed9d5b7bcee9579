//! REST handlers, one module per resource, each with its `router()`. Every state-changing
//! handler writes the audit trail in the same transaction as its change.

use axum::Router;
use axum::response::Response;
use axum::routing::get;
use medsplit_engine::api::FieldError;

use crate::AppState;
use crate::auth::Principal;
use crate::db;
use crate::error::{Error, Result};

mod agents;
mod audit;
mod auth;
mod enrolment;
mod hospitals;
mod jobs;
pub(crate) mod text;
mod users;
mod visits;

pub use users::check_new_user;

/// The OpenAPI document, committed beside the code.
pub const OPENAPI: &str = include_str!("../../openapi.json");

pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/v1/openapi.json",
            get(|| async { ([("content-type", "application/json")], OPENAPI) }),
        )
        .merge(auth::router())
        .merge(hospitals::router())
        .merge(users::router())
        .merge(audit::router())
        .merge(enrolment::router())
        .merge(agents::router())
        .merge(visits::router())
        .merge(jobs::router())
        .fallback(crate::web::serve)
        .layer(axum::middleware::map_response(nosniff))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(1 << 20))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// No response is sniffed into another type than it declares.
async fn nosniff(mut response: Response) -> Response {
    response.headers_mut().insert(
        axum::http::header::X_CONTENT_TYPE_OPTIONS,
        axum::http::HeaderValue::from_static("nosniff"),
    );
    response
}

/// A JSON body whose errors name the offending field (axum's own rejection does not).
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned> axum::extract::FromRequest<AppState> for Body<T> {
    type Rejection = Error;

    async fn from_request(req: axum::extract::Request, state: &AppState) -> Result<Self> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| Error::BadRequest(e.body_text()))?;
        parse_body(&bytes).map(Body)
    }
}

/// Parses a JSON body strictly (one value, nothing after it), refuses control and formatting
/// characters in every string ([`text`]), then reads it as `T`; errors name the field.
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))?;
    text::check_json(&value)?;
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut field = e.path().to_string();
        let message = e.inner().to_string();
        if let Some(missing) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            field = if field == "." {
                missing.to_string()
            } else {
                format!("{field}.{missing}")
            };
        }
        if field == "." || e.inner().is_syntax() || e.inner().is_eof() {
            Error::BadRequest(format!("invalid JSON body: {message}"))
        } else {
            Error::Invalid(FieldError::new(field, message))
        }
    })
}

async fn audit(
    e: impl sqlx::PgExecutor<'_>,
    who: &Principal,
    action: &str,
    target: String,
    detail: serde_json::Value,
) -> Result<()> {
    Ok(db::audit(e, &who.actor(), action, &target, detail).await?)
}

fn check_name(field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(FieldError::new(field, "1 to 64 characters: letters, digits, - _ .").into());
    }
    Ok(())
}

fn conflict(e: sqlx::Error, message: &str) -> Error {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => Error::Conflict(message.into()),
        _ => e.into(),
    }
}
