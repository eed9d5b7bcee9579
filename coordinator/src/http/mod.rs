//! REST handlers, one module per resource, each with its `router()`. Every state-changing
//! handler writes the audit trail in the same transaction as its change.

use axum::Router;
use axum::http::{HeaderValue, header};
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
mod extract;
mod hospitals;
mod jobs;
pub(crate) mod models;
mod privacy;
pub(crate) mod text;
mod users;
mod visits;

pub use extract::{Body, ClientAddress, Path, Query, parse_body};
pub use users::check_new_user;

/// The OpenAPI document, committed beside the code.
pub const OPENAPI: &str = include_str!("../../openapi.json");

pub fn routes(state: AppState) -> Router {
    Router::new()
        // Load balancers take a replica out of rotation when this fails (503 while it drains).
        .route("/healthz", get(healthz))
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
        .merge(models::router())
        .merge(privacy::router())
        .route("/v1/jobs/{id}/inference", get(crate::inference::upgrade))
        .fallback(crate::web::serve)
        .layer(tower_http::limit::RequestBodyLimitLayer::new(1 << 20))
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::map_response(nosniff))
        // A failed request is logged once at ERROR by `Error` (with its cause); the trace layer
        // notes every 5xx, the 503s of a draining replica included, at WARN.
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::WARN)),
        )
        .with_state(state)
}

/// No response is sniffed into another type than it declares.
async fn nosniff(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Puts the error responses that the handlers do not make themselves (the router's 405, the
/// body limit's 413, a dashboard file that does not exist) into the API's JSON error shape,
/// keeping their status and headers.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 1024).await {
        Ok(bytes) if status.is_client_error() => String::from_utf8_lossy(&bytes).trim().to_string(),
        _ => String::new(),
    };
    let message = match text.is_empty() {
        false => text,
        true if status.is_server_error() => "internal error".to_string(),
        true => status.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = serde_json::json!({ "error": message }).to_string();
    Response::from_parts(parts, axum::body::Body::from(body))
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
    Error::conflict(e, message)
}

async fn healthz(axum::extract::State(s): axum::extract::State<AppState>) -> Result<&'static str> {
    if s.draining() {
        return Err(Error::Unavailable("the coordinator is shutting down"));
    }
    Ok("ok")
}
