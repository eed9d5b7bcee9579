//! Users: created and disabled by platform admins.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use medsplit_engine::api::FieldError;
use serde::Deserialize;
use serde_json::json;

use super::{Body, Path, audit, conflict};
use crate::auth::{self, Principal, Role};
use crate::error::{Error, Result};
use crate::{AppState, db};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/users", get(list_users).post(create_user))
        .route("/v1/users/{id}/disable", post(disable_user))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    email: String,
    password: String,
    role: Role,
    hospital_id: Option<i64>,
}

pub fn check_new_user(email: &str, password: &str) -> Result<()> {
    if !(3..=254).contains(&email.len()) || !email.contains('@') {
        return Err(FieldError::new("email", "must be an email address").into());
    }
    if password.chars().count() < 12 {
        return Err(FieldError::new("password", "must be at least 12 characters").into());
    }
    Ok(())
}

async fn create_user(
    State(s): State<AppState>,
    p: Principal,
    Body(body): Body<NewUser>,
) -> Result<(StatusCode, Json<db::User>)> {
    p.require(Role::PlatformAdmin)?;
    check_new_user(&body.email, &body.password)?;
    match (body.role, body.hospital_id) {
        (Role::Agent, _) => {
            return Err(FieldError::new("role", "agents enrol with a token").into());
        }
        (Role::HospitalAdmin, None) => {
            return Err(FieldError::new("hospital_id", "a hospital admin needs a hospital").into());
        }
        (Role::PlatformAdmin | Role::Researcher, Some(_)) => {
            return Err(
                FieldError::new("hospital_id", "only hospital admins have a hospital").into(),
            );
        }
        _ => {}
    }
    if let Some(h) = body.hospital_id
        && db::hospital(&s.db, h).await?.is_none()
    {
        return Err(FieldError::new("hospital_id", "no such hospital").into());
    }
    let password = body.password.clone();
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
    let mut tx = s.db.begin().await?;
    let user = db::create_user(
        &mut *tx,
        &body.email,
        &hash,
        body.role.as_str(),
        body.hospital_id,
    )
    .await
    .map_err(|e| conflict(e, "a user with this email exists"))?;
    audit(
        &mut *tx,
        &p,
        "user.create",
        format!("user:{}", user.id),
        json!({ "email": user.email, "role": user.role, "hospital_id": user.hospital_id }),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(user)))
}

async fn list_users(State(s): State<AppState>, p: Principal) -> Result<Json<Vec<db::User>>> {
    p.require(Role::PlatformAdmin)?;
    Ok(Json(db::list_users(&s.db).await?))
}

async fn disable_user(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<StatusCode> {
    p.require(Role::PlatformAdmin)?;
    if id == p.id {
        return Err(Error::Conflict("you cannot disable yourself".into()));
    }
    let mut tx = s.db.begin().await?;
    if !db::set_user_disabled(&mut *tx, id, true).await? {
        return Err(Error::NotFound("user"));
    }
    audit(
        &mut *tx,
        &p,
        "user.disable",
        format!("user:{id}"),
        json!({}),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
