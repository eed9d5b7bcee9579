//! Log-in: bearer tokens for API clients, session cookies for the dashboard, and the caller.

use std::net::IpAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Body, ClientAddress, audit};
use crate::auth::{self, Principal, Role};
use crate::error::{Error, Result};
use crate::throttle::Scope;
use crate::{AppState, db};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/auth/login", post(login))
        .route("/v1/auth/session", post(web_login).delete(web_logout))
        .route("/v1/me", get(me))
}

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
/// Failed log-ins are throttled per account and per client address ([`crate::throttle`]): a
/// log-in during a lockout gets 429 without its password being checked, and each lockout is
/// audited when it starts.
async fn check_password(
    s: &AppState,
    body: &Login,
    client: Option<IpAddr>,
) -> Result<(i64, Role, Option<i64>)> {
    if let Some(wait) = s.logins.locked(&body.email, client) {
        return Err(Error::TooManyRequests(whole_seconds(wait)));
    }
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
    let Some(creds) = creds.filter(|c| ok && !c.disabled) else {
        return Err(failed_login(s, &body.email, client).await?);
    };
    let role = Role::parse(&creds.role).ok_or(Error::Internal("unknown role".into()))?;
    if !db::user_active(&s.db, creds.id).await? {
        return Err(failed_login(s, &body.email, client).await?);
    }
    Ok((creds.id, role, creds.hospital_id))
}

fn whole_seconds(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Counts a failed log-in; the error to answer with (429 if it started a lockout).
async fn failed_login(s: &AppState, email: &str, client: Option<IpAddr>) -> Result<Error> {
    let lockouts = s.logins.failed(email, client);
    let actor = match client {
        Some(ip) => format!("client:{ip}"),
        None => "client:unknown".to_string(),
    };
    for l in &lockouts {
        let (target, scope) = match &l.scope {
            Scope::Account(account) => (format!("account:{account}"), "account"),
            Scope::Address(ip) => (format!("address:{ip}"), "address"),
        };
        tracing::warn!(%target, seconds = l.retry_after.as_secs(), "log-in lockout");
        db::audit(
            &s.db,
            &actor,
            "login.lockout",
            &target,
            json!({ "scope": scope, "retry_after_seconds": whole_seconds(l.retry_after) }),
        )
        .await?;
    }
    Ok(match lockouts.iter().map(|l| l.retry_after).max() {
        Some(wait) => Error::TooManyRequests(whole_seconds(wait)),
        None => Error::Unauthenticated,
    })
}

/// A bearer token for API clients (the `medsplit` CLI, scripts).
async fn login(
    State(s): State<AppState>,
    ClientAddress(client): ClientAddress,
    Body(body): Body<Login>,
) -> Result<Json<Session>> {
    let (user_id, role, hospital_id) = check_password(&s, &body, client).await?;
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
    ClientAddress(client): ClientAddress,
    Body(body): Body<Login>,
) -> Result<Response> {
    if !auth::same_origin(&headers) {
        return Err(Error::Forbidden("cross-site log-in refused"));
    }
    let (user_id, role, hospital) = check_password(&s, &body, client).await?;
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
