//! Hospitals: created and disabled by platform admins.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use medsplit_engine::api::FieldError;
use serde::Deserialize;
use serde_json::json;

use super::{Body, Path, audit, check_name, conflict};
use crate::auth::{Principal, Role};
use crate::control::{self, Stop};
use crate::error::{Error, Result};
use crate::{AppState, db};
use medsplit_engine::api::close;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/hospitals", get(list_hospitals).post(create_hospital))
        .route("/v1/hospitals/{id}/disable", post(disable_hospital))
        .route("/v1/hospitals/{id}/max-epsilon", put(set_max_epsilon))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewHospital {
    name: String,
}

async fn create_hospital(
    State(s): State<AppState>,
    p: Principal,
    Body(body): Body<NewHospital>,
) -> Result<(StatusCode, Json<db::Hospital>)> {
    p.require(Role::PlatformAdmin)?;
    check_name("name", &body.name)?;
    let mut tx = s.db.begin().await?;
    let h = db::create_hospital(&mut *tx, &body.name)
        .await
        .map_err(|e| conflict(e, "a hospital with this name exists"))?;
    audit(
        &mut *tx,
        &p,
        "hospital.create",
        format!("hospital:{}", h.id),
        json!({ "name": h.name }),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(h)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaxEpsilon {
    /// The most ε the hospital spends on one job; `null` removes the maximum.
    max_epsilon: Option<f64>,
}

/// The hospital's admins (and platform admins) set the most ε it spends on one job. Jobs already
/// approved keep running; their agents refuse any visit that would go past the new maximum.
async fn set_max_epsilon(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
    Body(body): Body<MaxEpsilon>,
) -> Result<Json<db::Hospital>> {
    match p.role {
        Role::PlatformAdmin => {}
        Role::HospitalAdmin if p.hospital == Some(id) => {}
        Role::HospitalAdmin => {
            return Err(Error::Forbidden(
                "only this hospital's admins set its maximum ε",
            ));
        }
        _ => return Err(Error::Forbidden("admins only")),
    }
    if let Some(eps) = body.max_epsilon
        && !(eps > 0.0 && eps <= 1000.0)
    {
        return Err(
            FieldError::new("max_epsilon", "must be in (0, 1000], or null for none").into(),
        );
    }
    let mut tx = s.db.begin().await?;
    if !db::set_max_epsilon(&mut *tx, id, body.max_epsilon).await? {
        return Err(Error::NotFound("hospital"));
    }
    audit(
        &mut *tx,
        &p,
        "hospital.max_epsilon",
        format!("hospital:{id}"),
        json!({ "max_epsilon": body.max_epsilon }),
    )
    .await?;
    tx.commit().await?;
    let h = db::hospital(&s.db, id)
        .await?
        .ok_or(Error::NotFound("hospital"))?;
    Ok(Json(h))
}

async fn list_hospitals(
    State(s): State<AppState>,
    _p: Principal,
) -> Result<Json<Vec<db::Hospital>>> {
    Ok(Json(db::list_hospitals(&s.db).await?))
}

async fn disable_hospital(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<StatusCode> {
    p.require(Role::PlatformAdmin)?;
    let mut tx = s.db.begin().await?;
    if !db::set_hospital_disabled(&mut *tx, id, true).await? {
        return Err(Error::NotFound("hospital"));
    }
    audit(
        &mut *tx,
        &p,
        "hospital.disable",
        format!("hospital:{id}"),
        json!({}),
    )
    .await?;
    let agents: Vec<i64> = db::list_agents(&mut *tx, id)
        .await?
        .iter()
        .map(|a| a.id)
        .collect();
    // Its agents' running visits are released now, as when an agent is revoked.
    for &agent in &agents {
        for visit in db::running_visits_of_agent(&mut *tx, agent).await? {
            if let Some(v) = db::visit(&mut *tx, visit).await? {
                db::release_visit(&mut *tx, visit, v.attempt, agent, "hospital disabled").await?;
            }
        }
    }
    control::announce(&mut *tx, Stop::Hospital(id), close::REVOKED).await?;
    tx.commit().await?;
    control::apply(&s.sessions, Stop::Hospital(id), close::REVOKED);
    // Its agents' waiting claims end.
    s.work.notify_waiters();
    crate::scheduler::sweep(&s).await?;
    Ok(StatusCode::NO_CONTENT)
}
