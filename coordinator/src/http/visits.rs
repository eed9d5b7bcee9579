//! Visits as agents work them: claim (long poll), heartbeat, release, and the training session.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use medsplit_engine::api::{Handoff, Recipient, VisitAssignment};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Body, Path, Query};
use crate::auth::{Principal, Role};
use crate::control::{self, Stop};
use crate::error::{Error, Result};
use crate::{AppState, db, session};
use medsplit_engine::api::close;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/agent/claim", post(claim))
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/agent/data", put(data))
        .route("/v1/visits/{id}/release", post(release))
        .route("/v1/visits/{id}/session", get(session::upgrade))
}

#[derive(Deserialize)]
struct Wait {
    /// Seconds to wait for work (long poll), at most 60.
    wait: Option<u64>,
}

/// A visit for the agent, waiting up to `wait` seconds for one. Revoking the agent or disabling
/// its hospital wakes the wait and ends it with 401; a graceful shutdown of this replica, with
/// 503.
async fn claim(State(s): State<AppState>, p: Principal, Query(q): Query<Wait>) -> Result<Response> {
    p.require(Role::Agent)?;
    let hospital = p.hospital()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.wait.unwrap_or(0).min(60));
    loop {
        let notified = s.work.notified();
        // Agents claim through another replica (behind a balancer, the next request goes there).
        if s.draining() {
            return Err(Error::Unavailable("the coordinator is shutting down"));
        }
        if let Some(assignment) = try_claim(&s, p.id, hospital).await? {
            return Ok(Json(assignment).into_response());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        let wait = (deadline - now).min(s.settings.poll_interval);
        let _ = tokio::time::timeout(wait, notified).await;
        if !db::agent_active(&s.db, p.id).await? {
            return Err(Error::Unauthenticated);
        }
    }
}

async fn try_claim(s: &AppState, agent: i64, hospital: i64) -> Result<Option<VisitAssignment>> {
    let lease = s.settings.lease.as_secs_f64();
    let mut tx = s.db.begin().await?;
    let Some(c) = db::claim_visit(&mut *tx, agent, hospital, lease).await? else {
        return Ok(None);
    };
    let handoff = db::handoff(&mut *tx, c.job_id, c.seq, agent).await?;
    let recipients = db::job_agents(&mut *tx, c.job_id).await?;
    // The hospital's ε limit and what it has spent travel with the visit: its agent refuses
    // a visit that would go past the limit.
    // (A maximum with a job without DP: the agent refuses it, its ε being unbounded.)
    let max_epsilon = db::hospital(&mut *tx, hospital)
        .await?
        .and_then(|h| h.max_epsilon);
    let epsilon_spent = match c.spec.dp {
        Some(_) => Some(
            db::epsilon_spent(&mut *tx, c.job_id, hospital)
                .await?
                .unwrap_or(0.0),
        ),
        None => None,
    };
    let owner = db::job(&mut *tx, c.job_id).await?.map(|j| j.owner);
    db::job_event(
        &mut *tx,
        c.job_id,
        "visit.started",
        json!({ "visit_id": c.visit_id, "round": c.round, "position": c.position,
                "attempt": c.attempt, "agent_id": agent }),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(VisitAssignment {
        visit_id: c.visit_id,
        attempt: c.attempt,
        job_id: c.job_id,
        round: c.round as u32,
        position: c.position as u32,
        spec: c.spec.0,
        handoff: handoff.map(|h| Handoff {
            from_visit_id: h.visit_id,
            sender_agent_id: h.sender_agent_id,
            sender_public_key: B64.encode(h.sender_public_key),
            sealed: B64.encode(h.sealed),
        }),
        recipients: recipients
            .into_iter()
            .filter(|a| a.active)
            .map(|a| Recipient {
                agent_id: a.id,
                public_key: B64.encode(a.public_key),
            })
            .collect(),
        lease_seconds: s.settings.lease.as_secs() as u32,
        max_epsilon,
        epsilon_spent,
        owner,
    }))
}

/// What an agent has of its data, under the default cut: the coordinator projects each job's ε
/// from it before consent.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataReport {
    pub train_samples: u64,
    pub test_samples: u64,
}

async fn data(
    State(s): State<AppState>,
    p: Principal,
    Body(body): Body<DataReport>,
) -> Result<StatusCode> {
    p.require(Role::Agent)?;
    let count = |field: &str, v: u64| {
        i64::try_from(v)
            .ok()
            .filter(|&v| v <= 1 << 40)
            .ok_or_else(|| medsplit_engine::api::FieldError::new(field, "at most 2^40"))
    };
    let train = count("train_samples", body.train_samples)?;
    let test = count("test_samples", body.test_samples)?;
    db::set_agent_data(&s.db, p.id, train, test).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub version: Option<String>,
    pub visit_id: Option<i64>,
    pub attempt: Option<i32>,
}

async fn heartbeat(
    State(s): State<AppState>,
    p: Principal,
    Body(body): Body<Heartbeat>,
) -> Result<StatusCode> {
    p.require(Role::Agent)?;
    if let Some(v) = body.version.as_deref().filter(|v| v.len() <= 64) {
        db::set_agent_version(&s.db, p.id, v).await?;
    }
    if let (Some(visit), Some(attempt)) = (body.visit_id, body.attempt)
        && !db::heartbeat(&s.db, visit, attempt, p.id, s.settings.lease.as_secs_f64()).await?
    {
        return Err(Error::Conflict(
            "this attempt no longer holds the visit".into(),
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub attempt: i32,
    pub reason: String,
    /// The hospital's data cannot give what the job asks: retrying cannot help, so the job's
    /// `on_failure` applies at once.
    #[serde(default)]
    pub refused: bool,
}

async fn release(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
    Body(body): Body<Release>,
) -> Result<StatusCode> {
    p.require(Role::Agent)?;
    let reason: String = body.reason.chars().take(500).collect();
    if body.refused {
        let mut tx = s.db.begin().await?;
        let Some(visit) = db::refuse_visit(&mut tx, id, body.attempt, p.id, &reason).await? else {
            return Err(Error::Conflict(
                "this attempt no longer holds the visit".into(),
            ));
        };
        crate::scheduler::apply_failure(&mut tx, &visit, true).await?;
        control::announce(&mut *tx, Stop::Visit(id), close::FENCED).await?;
        tx.commit().await?;
        control::apply(&s.sessions, Stop::Visit(id), close::FENCED);
        s.work.notify_waiters();
        return Ok(StatusCode::NO_CONTENT);
    }
    let mut tx = s.db.begin().await?;
    if !db::release_visit(&mut *tx, id, body.attempt, p.id, &reason).await? {
        return Err(Error::Conflict(
            "this attempt no longer holds the visit".into(),
        ));
    }
    control::announce(&mut *tx, Stop::Visit(id), close::FENCED).await?;
    tx.commit().await?;
    control::apply(&s.sessions, Stop::Visit(id), close::FENCED);
    crate::scheduler::sweep(&s).await?;
    Ok(StatusCode::NO_CONTENT)
}
