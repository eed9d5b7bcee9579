//! The audit trail, read by platform admins.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::Query;
use crate::auth::{Principal, Role};
use crate::error::Result;
use crate::{AppState, db};

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/audit", get(audit_trail))
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<i64>,
}

async fn audit_trail(
    State(s): State<AppState>,
    p: Principal,
    Query(q): Query<Limit>,
) -> Result<Json<Vec<db::AuditEntry>>> {
    p.require(Role::PlatformAdmin)?;
    let limit = q.limit.unwrap_or(200).clamp(1, 1000);
    Ok(Json(db::audit_trail(&s.db, limit).await?))
}
