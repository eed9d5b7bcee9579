//! Enrolment: a hospital admin's one-time token, redeemed by an agent for its credential,
//! which the agent exchanges for short-lived bearer tokens.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use medsplit_engine::api::FieldError;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Body, audit, check_name};
use crate::auth::{self, Principal, Role};
use crate::error::{Error, Result};
use crate::{AppState, db};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/enrolment-tokens", post(create_enrolment_token))
        .route("/v1/agents/enrol", post(enrol))
        .route("/v1/agents/token", post(agent_token))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewToken {
    /// Validity in seconds (default: the coordinator's setting).
    ttl_seconds: Option<u64>,
}

#[derive(Serialize)]
struct EnrolmentToken {
    token: String,
    expires_at: DateTime<Utc>,
    command: String,
}

async fn create_enrolment_token(
    State(s): State<AppState>,
    p: Principal,
    body: Option<Body<NewToken>>,
) -> Result<(StatusCode, Json<EnrolmentToken>)> {
    p.require(Role::HospitalAdmin)?;
    let hospital = p.hospital()?;
    let ttl = body
        .and_then(|b| b.0.ttl_seconds)
        .map(Duration::from_secs)
        .unwrap_or(s.settings.enrolment_ttl);
    if ttl.is_zero() || ttl > Duration::from_secs(7 * 24 * 3600) {
        return Err(FieldError::new("ttl_seconds", "must be 1 s to 7 days").into());
    }
    let token = auth::new_secret();
    let expires_at = Utc::now() + chrono::Duration::from_std(ttl).expect("bounded ttl");
    let mut tx = s.db.begin().await?;
    let id = db::create_enrolment_token(
        &mut *tx,
        hospital,
        &auth::secret_hash(&token),
        p.id,
        expires_at,
    )
    .await?;
    audit(
        &mut *tx,
        &p,
        "enrolment_token.create",
        format!("enrolment_token:{id}"),
        json!({ "hospital_id": hospital, "expires_at": expires_at }),
    )
    .await?;
    tx.commit().await?;
    let command = format!(
        "medsplit-agent enrol --coordinator {} --token {token} --state-dir {AGENT_STATE_DIR}",
        s.settings.public_url
    );
    Ok((
        StatusCode::CREATED,
        Json(EnrolmentToken {
            token,
            expires_at,
            command,
        }),
    ))
}

/// The agent's state directory in the enrolment command: the one the operations guide and the
/// agent's systemd unit use.
const AGENT_STATE_DIR: &str = "/var/lib/medsplit-agent";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Enrol {
    token: String,
    name: String,
    /// X25519 public key, base64.
    public_key: String,
    version: String,
}

#[derive(Serialize, Deserialize)]
pub struct Enrolled {
    pub agent_id: i64,
    pub hospital_id: i64,
    pub credential: String,
}

async fn enrol(
    State(s): State<AppState>,
    Body(body): Body<Enrol>,
) -> Result<(StatusCode, Json<Enrolled>)> {
    check_name("name", &body.name)?;
    let key = B64
        .decode(&body.public_key)
        .ok()
        .filter(|k| k.len() == 32)
        .ok_or_else(|| FieldError::new("public_key", "must be a base64 X25519 key (32 bytes)"))?;
    if body.version.len() > 64 {
        return Err(FieldError::new("version", "at most 64 characters").into());
    }
    let mut tx = s.db.begin().await?;
    let (token_id, hospital_id) =
        match db::redeem_token(&mut tx, &auth::secret_hash(&body.token)).await? {
            Ok(t) => t,
            Err(db::TokenState::Unknown) => return Err(Error::Unauthenticated),
            Err(db::TokenState::Used) => return Err(Error::Gone("enrolment token already used")),
            Err(db::TokenState::Expired) => return Err(Error::Gone("enrolment token expired")),
        };
    let credential = auth::new_secret();
    let agent_id = db::create_agent(
        &mut tx,
        token_id,
        hospital_id,
        &body.name,
        &key,
        &auth::secret_hash(&credential),
        &body.version,
    )
    .await?;
    db::audit(
        &mut *tx,
        &format!("agent:{agent_id}"),
        "agent.enrol",
        &format!("agent:{agent_id}"),
        json!({ "hospital_id": hospital_id, "name": body.name, "token_id": token_id }),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(Enrolled {
            agent_id,
            hospital_id,
            credential,
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentLogin {
    credential: String,
}

#[derive(Serialize, Deserialize)]
pub struct AgentToken {
    pub token: String,
    pub expires_in: i64,
}

async fn agent_token(
    State(s): State<AppState>,
    Body(body): Body<AgentLogin>,
) -> Result<Json<AgentToken>> {
    let agent = db::agent_by_credential(&s.db, &auth::secret_hash(&body.credential))
        .await?
        .filter(|a| !a.revoked)
        .ok_or(Error::Unauthenticated)?;
    let token = s.keys.issue(
        agent.id,
        Role::Agent,
        Some(agent.hospital_id),
        auth::AGENT_TOKEN_SECONDS,
    );
    Ok(Json(AgentToken {
        token,
        expires_in: auth::AGENT_TOKEN_SECONDS,
    }))
}
