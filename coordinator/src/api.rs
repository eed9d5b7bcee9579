//! REST handlers. Every state-changing handler writes the audit trail in the same transaction
//! as its change.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use medsplit_engine::api::{FieldError, Handoff, JobSpec, Recipient, VisitAssignment};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::{self, Principal, Role};
use crate::error::{Error, Result};
use crate::{AppState, db, session};

/// The OpenAPI document, committed beside the code.
pub const OPENAPI: &str = include_str!("../openapi.json");

pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/v1/openapi.json",
            get(|| async { ([("content-type", "application/json")], OPENAPI) }),
        )
        .route("/v1/auth/login", post(login))
        .route("/v1/auth/session", post(web_login).delete(web_logout))
        .route("/v1/me", get(me))
        .route("/v1/hospitals", get(list_hospitals).post(create_hospital))
        .route("/v1/hospitals/{id}/disable", post(disable_hospital))
        .route("/v1/users", get(list_users).post(create_user))
        .route("/v1/users/{id}/disable", post(disable_user))
        .route("/v1/audit", get(audit_trail))
        .route("/v1/enrolment-tokens", post(create_enrolment_token))
        .route("/v1/agents", get(list_agents))
        .route("/v1/agents/enrol", post(enrol))
        .route("/v1/agents/token", post(agent_token))
        .route("/v1/agents/{id}/revoke", post(revoke_agent))
        .route("/v1/agent/claim", post(claim))
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/visits/{id}/release", post(release))
        .route("/v1/visits/{id}/session", get(session::upgrade))
        .route("/v1/jobs", get(list_jobs).post(create_job))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/consent", post(consent))
        .route("/v1/jobs/{id}/metrics", get(metrics))
        .route("/v1/jobs/{id}/events", get(events))
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

pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
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

// ---------------------------------------------------------------------------------------------
// Users and hospitals

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    email: String,
    password: String,
}

#[derive(Serialize)]
struct Session {
    token: String,
    role: Role,
    user_id: i64,
    hospital_id: Option<i64>,
    expires_at: DateTime<Utc>,
}

/// Checks an email and password; the user's id, role and hospital if they match an active user.
async fn check_password(s: &AppState, body: &Login) -> Result<(i64, Role, Option<i64>)> {
    let creds = db::credentials(&s.db, &body.email).await?;
    // Verify against a fixed hash when the user is unknown, so timing does not tell.
    let hash = creds.as_ref().map(|c| c.password_hash.clone()).unwrap_or_else(|| {
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$0000000000000000000000000000000000000000000"
            .into()
    });
    let password = body.password.clone();
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&password, &hash))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    let creds = creds
        .filter(|c| ok && !c.disabled)
        .ok_or(Error::Unauthenticated)?;
    let role = Role::parse(&creds.role).ok_or(Error::Internal("unknown role".into()))?;
    if !db::user_active(&s.db, creds.id).await? {
        return Err(Error::Unauthenticated);
    }
    Ok((creds.id, role, creds.hospital_id))
}

/// A bearer token for API clients (the `medsplit` CLI, scripts).
async fn login(State(s): State<AppState>, Body(body): Body<Login>) -> Result<Json<Session>> {
    let (user_id, role, hospital_id) = check_password(&s, &body).await?;
    let token = s
        .keys
        .issue(user_id, role, hospital_id, auth::USER_TOKEN_SECONDS);
    Ok(Json(Session {
        token,
        role,
        user_id,
        hospital_id,
        expires_at: Utc::now() + chrono::Duration::seconds(auth::USER_TOKEN_SECONDS),
    }))
}

/// The caller as the dashboard shows it, with the CSRF token of its session.
async fn whoami(s: &AppState, p: &Principal) -> Result<serde_json::Value> {
    let profile = match p.role {
        Role::Agent => None,
        _ => db::profile(&s.db, p.id).await?,
    };
    Ok(json!({
        "authenticated": true,
        "id": p.id,
        "role": p.role,
        "hospital_id": p.hospital,
        "email": profile.as_ref().map(|x| &x.email),
        "hospital": profile.and_then(|x| x.hospital),
        "csrf_token": p.csrf,
    }))
}

/// Dashboard log-in: a session cookie (HttpOnly, SameSite=Strict) instead of a bearer token.
async fn web_login(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
    Body(body): Body<Login>,
) -> Result<Response> {
    if !auth::same_origin(&headers) {
        return Err(Error::Forbidden("cross-site log-in refused"));
    }
    let (user_id, role, hospital) = check_password(&s, &body).await?;
    let token = auth::new_secret();
    let expires_at = Utc::now() + chrono::Duration::seconds(auth::WEB_SESSION_SECONDS);
    let principal = Principal {
        id: user_id,
        role,
        hospital,
        csrf: Some(auth::csrf_token(&token)),
    };
    let mut tx = s.db.begin().await?;
    db::create_web_session(&mut *tx, &auth::secret_hash(&token), user_id, expires_at).await?;
    audit(
        &mut *tx,
        &principal,
        "session.create",
        format!("user:{user_id}"),
        json!({ "expires_at": expires_at }),
    )
    .await?;
    tx.commit().await?;
    let cookie = auth::set_cookie(Some(&token), s.settings.secure_cookies());
    let body = whoami(&s, &principal).await?;
    Ok(([(axum::http::header::SET_COOKIE, cookie)], Json(body)).into_response())
}

async fn web_logout(
    State(s): State<AppState>,
    p: Principal,
    headers: axum::http::HeaderMap,
) -> Result<Response> {
    if let Some(session) = auth::session_cookie(&headers).filter(|_| p.csrf.is_some()) {
        let mut tx = s.db.begin().await?;
        db::delete_web_session(&mut *tx, &auth::secret_hash(session)).await?;
        audit(
            &mut *tx,
            &p,
            "session.delete",
            format!("user:{}", p.id),
            json!({}),
        )
        .await?;
        tx.commit().await?;
    }
    let cookie = auth::set_cookie(None, s.settings.secure_cookies());
    Ok((
        [(axum::http::header::SET_COOKIE, cookie)],
        StatusCode::NO_CONTENT,
    )
        .into_response())
}

/// The caller; `{"authenticated": false}` (not 401) without credentials, so that the dashboard
/// can ask before it has logged in.
async fn me(State(s): State<AppState>, p: Result<Principal>) -> Result<Json<serde_json::Value>> {
    match p {
        Ok(p) => Ok(Json(whoami(&s, &p).await?)),
        Err(Error::Unauthenticated) => Ok(Json(json!({ "authenticated": false }))),
        Err(e) => Err(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewHospital {
    name: String,
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

fn conflict(e: sqlx::Error, message: &str) -> Error {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => Error::Conflict(message.into()),
        _ => e.into(),
    }
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
    tx.commit().await?;
    s.sessions
        .stop_where(medsplit_engine::api::close::REVOKED, |_, o| {
            agents.contains(&o.agent_id)
        });
    Ok(StatusCode::NO_CONTENT)
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

// ---------------------------------------------------------------------------------------------
// Enrolment and agents

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
    body: Option<Json<NewToken>>,
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
        "medsplit-agent enrol --coordinator {} --token {token}",
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
    tx.commit().await?;
    s.sessions
        .stop_where(medsplit_engine::api::close::REVOKED, |_, o| {
            o.agent_id == id
        });
    crate::scheduler::sweep(&s).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Agents: claim, heartbeat, release

#[derive(Deserialize)]
struct Wait {
    /// Seconds to wait for work (long poll), at most 60.
    wait: Option<u64>,
}

async fn claim(State(s): State<AppState>, p: Principal, Query(q): Query<Wait>) -> Result<Response> {
    p.require(Role::Agent)?;
    let hospital = p.hospital()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.wait.unwrap_or(0).min(60));
    loop {
        let notified = s.work.notified();
        if let Some(assignment) = try_claim(&s, p.id, hospital).await? {
            return Ok(Json(assignment).into_response());
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        let wait = (deadline - now).min(s.settings.poll_interval);
        let _ = tokio::time::timeout(wait, notified).await;
    }
}

async fn try_claim(s: &AppState, agent: i64, hospital: i64) -> Result<Option<VisitAssignment>> {
    if *s.sessions.draining.borrow() {
        return Ok(None);
    }
    let lease = s.settings.lease.as_secs_f64();
    let mut tx = s.db.begin().await?;
    let Some(c) = db::claim_visit(&mut *tx, agent, hospital, lease).await? else {
        return Ok(None);
    };
    let handoff = db::handoff(&mut *tx, c.job_id, c.seq, agent).await?;
    let recipients = db::recipients(&mut *tx, c.job_id).await?;
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
            .map(|(agent_id, key)| Recipient {
                agent_id,
                public_key: B64.encode(key),
            })
            .collect(),
        lease_seconds: s.settings.lease.as_secs() as u32,
    }))
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
}

async fn release(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
    Body(body): Body<Release>,
) -> Result<StatusCode> {
    p.require(Role::Agent)?;
    let reason: String = body.reason.chars().take(500).collect();
    if !db::release_visit(&s.db, id, body.attempt, p.id, &reason).await? {
        return Err(Error::Conflict(
            "this attempt no longer holds the visit".into(),
        ));
    }
    s.sessions
        .stop_where(medsplit_engine::api::close::FENCED, |v, _| v == id);
    crate::scheduler::sweep(&s).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Jobs

#[derive(Serialize)]
pub struct JobView {
    id: i64,
    name: String,
    status: String,
    owner_id: i64,
    spec: JobSpec,
    hospitals: Vec<db::JobHospital>,
    visits_done: usize,
    visits_total: usize,
    current: Option<Current>,
    error: Option<String>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
struct Current {
    visit_id: i64,
    round: i32,
    hospital: String,
    status: String,
    progress: f64,
}

async fn job_view(e: &db::Db, job: db::JobRow) -> Result<JobView> {
    let hospitals = db::job_hospitals(e, job.id).await?;
    let visits = db::visits(e, job.id).await?;
    let done = visits
        .iter()
        .filter(|v| matches!(v.status.as_str(), "completed" | "skipped"))
        .count();
    let current = visits
        .iter()
        .find(|v| matches!(v.status.as_str(), "queued" | "running"))
        .map(|v| Current {
            visit_id: v.id,
            round: v.round,
            hospital: hospitals
                .iter()
                .find(|h| h.hospital_id == v.hospital_id)
                .map(|h| h.name.clone())
                .unwrap_or_default(),
            status: v.status.clone(),
            progress: v.progress.unwrap_or(0.0),
        });
    Ok(JobView {
        id: job.id,
        name: job.name,
        status: job.status,
        owner_id: job.owner_id,
        visits_total: (job.spec.rounds as usize) * hospitals.len(),
        spec: job.spec.0,
        hospitals,
        visits_done: done,
        current,
        error: job.error,
        created_at: job.created_at,
        started_at: job.started_at,
        finished_at: job.finished_at,
    })
}

/// Loads a job the caller may see: its owner, a platform admin, or an admin of a hospital it
/// names.
async fn visible_job(s: &AppState, p: &Principal, id: i64) -> Result<db::JobRow> {
    let job = db::job(&s.db, id).await?.ok_or(Error::NotFound("job"))?;
    let allowed = match p.role {
        Role::PlatformAdmin => true,
        Role::Researcher => job.owner_id == p.id,
        Role::HospitalAdmin => db::job_hospitals(&s.db, id)
            .await?
            .iter()
            .any(|h| Some(h.hospital_id) == p.hospital),
        Role::Agent => false,
    };
    if !allowed {
        return Err(Error::NotFound("job"));
    }
    Ok(job)
}

async fn create_job(
    State(s): State<AppState>,
    p: Principal,
    Body(spec): Body<JobSpec>,
) -> Result<(StatusCode, Json<JobView>)> {
    p.require(Role::Researcher)?;
    spec.validate()?;
    let found = db::hospitals_by_name(&s.db, &spec.hospitals).await?;
    let mut ids = Vec::new();
    for (i, name) in spec.hospitals.iter().enumerate() {
        let id = found
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
            .ok_or_else(|| {
                FieldError::new(
                    format!("hospitals[{i}]"),
                    format!("no hospital named {name:?}"),
                )
            })?;
        ids.push(id);
    }
    let on_failure = match spec.on_failure {
        medsplit_engine::api::FailurePolicy::Skip => "skip",
        medsplit_engine::api::FailurePolicy::Fail => "fail",
    };
    let mut tx = s.db.begin().await?;
    let id = db::insert_job(&mut *tx, p.id, &spec, on_failure).await?;
    for (position, hospital) in ids.into_iter().enumerate() {
        db::insert_job_hospital(&mut *tx, id, position as i32, hospital).await?;
    }
    db::job_event(
        &mut *tx,
        id,
        "job.created",
        json!({ "awaiting_consent": spec.hospitals }),
    )
    .await?;
    audit(
        &mut *tx,
        &p,
        "job.create",
        format!("job:{id}"),
        json!({ "name": spec.name }),
    )
    .await?;
    tx.commit().await?;
    let job = db::job(&s.db, id).await?.ok_or(Error::NotFound("job"))?;
    Ok((StatusCode::CREATED, Json(job_view(&s.db, job).await?)))
}

async fn list_jobs(State(s): State<AppState>, p: Principal) -> Result<Json<Vec<JobView>>> {
    let jobs = match p.role {
        Role::PlatformAdmin => db::list_jobs(&s.db, None).await?,
        Role::Researcher => db::list_jobs(&s.db, Some(p.id)).await?,
        Role::HospitalAdmin => db::jobs_for_hospital(&s.db, p.hospital()?).await?,
        Role::Agent => return Err(Error::Forbidden("agents claim visits instead")),
    };
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        out.push(job_view(&s.db, job).await?);
    }
    Ok(Json(out))
}

async fn get_job(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<Json<JobView>> {
    let job = visible_job(&s, &p, id).await?;
    Ok(Json(job_view(&s.db, job).await?))
}

async fn cancel_job(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<Json<JobView>> {
    let job = visible_job(&s, &p, id).await?;
    if !(p.role == Role::PlatformAdmin || (p.role == Role::Researcher && job.owner_id == p.id)) {
        return Err(Error::Forbidden(
            "only the job's owner or a platform admin can cancel it",
        ));
    }
    let mut tx = s.db.begin().await?;
    if !db::end_job(&mut tx, id, "cancelled", None).await? {
        return Err(Error::Conflict(format!(
            "the job is already {}",
            job.status
        )));
    }
    db::job_event(&mut *tx, id, "job.cancelled", json!({ "by": p.actor() })).await?;
    audit(&mut *tx, &p, "job.cancel", format!("job:{id}"), json!({})).await?;
    tx.commit().await?;
    s.sessions
        .stop_where(medsplit_engine::api::close::FENCED, |_, o| o.job_id == id);
    let job = db::job(&s.db, id).await?.ok_or(Error::NotFound("job"))?;
    Ok(Json(job_view(&s.db, job).await?))
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Decision {
    Approve,
    Decline,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Consent {
    decision: Decision,
}

async fn consent(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
    Body(body): Body<Consent>,
) -> Result<Json<JobView>> {
    p.require(Role::HospitalAdmin)?;
    let hospital = p.hospital()?;
    visible_job(&s, &p, id).await?;
    let decision = match body.decision {
        Decision::Approve => "approved",
        Decision::Decline => "declined",
    };
    let mut tx = s.db.begin().await?;
    if !db::set_consent(&mut *tx, id, hospital, decision, p.id).await? {
        return Err(Error::Conflict(
            "the job is not awaiting this hospital's decision".into(),
        ));
    }
    audit(
        &mut *tx,
        &p,
        &format!("job.{decision}"),
        format!("job:{id}"),
        json!({ "hospital_id": hospital }),
    )
    .await?;
    db::job_event(
        &mut *tx,
        id,
        &format!("consent.{decision}"),
        json!({ "hospital_id": hospital }),
    )
    .await?;
    if decision == "declined" {
        db::decline_job(&mut *tx, id).await?;
        db::job_event(
            &mut *tx,
            id,
            "job.declined",
            json!({ "hospital_id": hospital }),
        )
        .await?;
    } else if db::start_job_if_approved(&mut tx, id).await? {
        db::job_event(&mut *tx, id, "job.started", json!({})).await?;
    }
    tx.commit().await?;
    s.work.notify_waiters();
    let job = db::job(&s.db, id).await?.ok_or(Error::NotFound("job"))?;
    Ok(Json(job_view(&s.db, job).await?))
}

#[derive(Serialize)]
struct Metrics {
    visits: Vec<VisitMetrics>,
    /// Test accuracy per round and hospital, as each hospital's agent measured it on its own
    /// held-out data after its visit.
    rounds: Vec<RoundMetrics>,
}

#[derive(Serialize)]
struct VisitMetrics {
    #[serde(flatten)]
    visit: db::Visit,
    hospital: String,
}

#[derive(Serialize)]
struct RoundMetrics {
    round: i32,
    hospitals: Vec<HospitalRound>,
    mean_test_accuracy: Option<f64>,
}

#[derive(Serialize)]
struct HospitalRound {
    hospital: String,
    status: String,
    train_loss: Option<f64>,
    train_accuracy: Option<f64>,
    test_accuracy: Option<f64>,
}

async fn metrics(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<Json<Metrics>> {
    visible_job(&s, &p, id).await?;
    let hospitals = db::job_hospitals(&s.db, id).await?;
    let name = |h: i64| {
        hospitals
            .iter()
            .find(|x| x.hospital_id == h)
            .map(|x| x.name.clone())
            .unwrap_or_default()
    };
    let visits = db::visits(&s.db, id).await?;
    let mut rounds: Vec<RoundMetrics> = Vec::new();
    for v in &visits {
        if rounds.last().is_none_or(|r| r.round != v.round) {
            rounds.push(RoundMetrics {
                round: v.round,
                hospitals: Vec::new(),
                mean_test_accuracy: None,
            });
        }
        rounds
            .last_mut()
            .expect("pushed")
            .hospitals
            .push(HospitalRound {
                hospital: name(v.hospital_id),
                status: v.status.clone(),
                train_loss: v.train_loss,
                train_accuracy: v.train_accuracy,
                test_accuracy: v.test_accuracy,
            });
    }
    for r in &mut rounds {
        let accs: Vec<f64> = r.hospitals.iter().filter_map(|h| h.test_accuracy).collect();
        if !accs.is_empty() {
            r.mean_test_accuracy = Some(accs.iter().sum::<f64>() / accs.len() as f64);
        }
    }
    let visits = visits
        .into_iter()
        .map(|v| VisitMetrics {
            hospital: name(v.hospital_id),
            visit: v,
        })
        .collect();
    Ok(Json(Metrics { visits, rounds }))
}

#[derive(Deserialize)]
struct After {
    after: Option<i64>,
}

async fn events(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
    Query(q): Query<After>,
) -> Result<Json<Vec<db::JobEvent>>> {
    visible_job(&s, &p, id).await?;
    Ok(Json(
        db::job_events(&s.db, id, q.after.unwrap_or(0), 500).await?,
    ))
}
