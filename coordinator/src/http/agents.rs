//! Agents as their hospital's admins see them: listed, revoked, and deleted if they never
//! connected.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use medsplit_engine::api::FieldError;
use serde::Deserialize;
use serde_json::json;

use super::{Path, Query, audit};
use crate::auth::{Principal, Role};
use crate::control::{self, Stop};
use crate::error::{Error, Result};
use crate::{AppState, db};
use medsplit_engine::api::close;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/agents", get(list_agents))
        .route("/v1/agents/{id}", delete(delete_agent))
        .route("/v1/agents/{id}/revoke", post(revoke_agent))
}

#[derive(Deserialize)]
struct HospitalQuery {
    hospital_id: Option<i64>,
}

async fn list_agents(
    State(s): State<AppState>,
    p: Principal,
    Query(q): Query<HospitalQuery>,
) -> Result<Json<Vec<db::AgentInfo>>> {
    let hospital = match p.role {
        Role::HospitalAdmin => p.hospital()?,
        Role::PlatformAdmin => q
            .hospital_id
            .ok_or_else(|| FieldError::new("hospital_id", "required"))?,
        _ => return Err(Error::Forbidden("admins only")),
    };
    Ok(Json(db::list_agents(&s.db, hospital).await?))
}

async fn revoke_agent(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<StatusCode> {
    p.require(Role::HospitalAdmin)?;
    let hospital = p.hospital()?;
    let mut tx = s.db.begin().await?;
    if !db::revoke_agent(&mut *tx, id, hospital).await? {
        return Err(Error::NotFound("active agent of your hospital"));
    }
    audit(
        &mut *tx,
        &p,
        "agent.revoke",
        format!("agent:{id}"),
        json!({}),
    )
    .await?;
    // Its running visits are released now: they count as failed attempts and are re-queued.
    for visit in db::running_visits_of_agent(&mut *tx, id).await? {
        if let Some(v) = db::visit(&mut *tx, visit).await? {
            db::release_visit(&mut *tx, visit, v.attempt, id, "agent revoked").await?;
        }
    }
    control::announce(&mut *tx, Stop::Agent(id), close::REVOKED).await?;
    tx.commit().await?;
    control::apply(&s.sessions, Stop::Agent(id), close::REVOKED);
    // Its waiting claims end.
    s.work.notify_waiters();
    crate::scheduler::sweep(&s).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes an agent of the caller's hospital that has never connected (its enrolment could not
/// write its state, say): it trained nothing, and the weights sealed to it go with it. An agent
/// that has connected stays on record; revoke it instead.
async fn delete_agent(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<StatusCode> {
    p.require(Role::HospitalAdmin)?;
    let hospital = p.hospital()?;
    let mut tx = s.db.begin().await?;
    let name = match db::delete_unseen_agent(&mut tx, id, hospital).await? {
        Ok(name) => name,
        Err(db::Undeletable::Unknown) => return Err(Error::NotFound("agent of your hospital")),
        Err(db::Undeletable::Seen) => {
            return Err(Error::Conflict(
                "the agent has connected to the coordinator: revoke it instead".into(),
            ));
        }
    };
    audit(
        &mut *tx,
        &p,
        "agent.delete",
        format!("agent:{id}"),
        json!({ "name": name }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
