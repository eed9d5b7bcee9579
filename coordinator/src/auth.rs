//! Identities: password hashing, one-time secrets, JWTs and the request extractor that checks
//! them (signature, expiry, and that the user or agent is still allowed to act).

use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::TryRngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::{AppState, db};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    PlatformAdmin,
    HospitalAdmin,
    Researcher,
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PlatformAdmin => "platform_admin",
            Self::HospitalAdmin => "hospital_admin",
            Self::Researcher => "researcher",
            Self::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::PlatformAdmin,
            Self::HospitalAdmin,
            Self::Researcher,
            Self::Agent,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// What a token says about its bearer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// User id, or agent id for [`Role::Agent`].
    pub sub: i64,
    pub role: Role,
    pub hospital: Option<i64>,
    pub iat: i64,
    pub exp: i64,
}

/// Lifetime of a user's token.
pub const USER_TOKEN_SECONDS: i64 = 8 * 3600;
/// Lifetime of an agent's short-lived token (it holds a long-lived credential to get another).
pub const AGENT_TOKEN_SECONDS: i64 = 15 * 60;

/// The HS256 key that signs every token.
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("JWT signing key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "JWT signing key {path} can be read by other users (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Readable { path: String, mode: u32 },
    #[error("JWT signing key {path} is too short: {len} bytes, at least 32 needed")]
    Short { path: String, len: usize },
}

impl Keys {
    /// Reads the key file; refuses one that is missing, short, or readable by group or others.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let display = path.display().to_string();
        let read_err = |source| KeyError::Read {
            path: display.clone(),
            source,
        };
        let mode = std::fs::metadata(path)
            .map_err(read_err)?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Readable {
                path: display,
                mode,
            });
        }
        let bytes = std::fs::read(path).map_err(read_err)?;
        let secret = bytes.trim_ascii();
        if secret.len() < 32 {
            return Err(KeyError::Short {
                path: display,
                len: secret.len(),
            });
        }
        Ok(Self::from_secret(secret))
    }

    pub fn from_secret(secret: &[u8]) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    pub fn issue(&self, sub: i64, role: Role, hospital: Option<i64>, seconds: i64) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub,
            role,
            hospital,
            iat: now,
            exp: now + seconds,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// Checks signature and expiry (no leeway).
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp"]);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .ok()
            .map(|d| d.claims)
    }
}

/// A fresh 256-bit secret, URL-safe base64.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the OS random source is available");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-256 of a high-entropy secret (tokens and credentials; passwords use argon2).
pub fn secret_hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

pub fn hash_password(password: &str) -> Result<String> {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng
        .try_fill_bytes(&mut salt)
        .expect("the OS random source is available");
    let salt = SaltString::encode_b64(&salt).map_err(|e| Error::Internal(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Internal(e.to_string()))
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub struct Principal {
    pub id: i64,
    pub role: Role,
    pub hospital: Option<i64>,
    /// The CSRF token of the dashboard session the request came with (None for bearer tokens).
    pub csrf: Option<String>,
}

impl Principal {
    /// Who did it, for the audit trail.
    pub fn actor(&self) -> String {
        match self.role {
            Role::Agent => format!("agent:{}", self.id),
            role => format!("{}:{}", role.as_str(), self.id),
        }
    }

    pub fn require(&self, role: Role) -> Result<()> {
        if self.role != role {
            return Err(Error::Forbidden(match role {
                Role::PlatformAdmin => "platform admins only",
                Role::HospitalAdmin => "hospital admins only",
                Role::Researcher => "researchers only",
                Role::Agent => "agents only",
            }));
        }
        Ok(())
    }

    /// The hospital of a hospital admin or an agent.
    pub fn hospital(&self) -> Result<i64> {
        self.hospital
            .ok_or(Error::Forbidden("not attached to a hospital"))
    }
}

/// The bearer token of a request: the `Authorization` header.
pub fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// The dashboard's session cookie: a 256-bit secret, HttpOnly, SameSite=Strict.
pub const SESSION_COOKIE: &str = "medsplit_session";
/// The header that carries the CSRF token on every state-changing dashboard request.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Lifetime of a dashboard session.
pub const WEB_SESSION_SECONDS: i64 = 12 * 3600;

/// The CSRF token of a dashboard session. It is derived from the session's secret, so it needs
/// no storage; a page learns it from `/v1/me`, which a cross-site page cannot read.
pub fn csrf_token(session: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(format!("medsplit-csrf:{session}")))
}

/// The session cookie of a request, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
}

/// `Set-Cookie` for a new session (`Some(token)`) or for logging out (`None`).
pub fn set_cookie(token: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match token {
        Some(t) => format!(
            "{SESSION_COOKIE}={t}; Path=/; HttpOnly; SameSite=Strict; Max-Age={WEB_SESSION_SECONDS}{secure}"
        ),
        None => format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

/// False when a browser says the request comes from another site: its `Origin` names a host
/// other than the one it sent the request to.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest);
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Principal {
    async fn from_bearer(token: &str, state: &AppState) -> Result<Self> {
        let claims = state.keys.verify(token).ok_or(Error::Unauthenticated)?;
        let active = match claims.role {
            Role::Agent => db::agent_active(&state.db, claims.sub).await?,
            _ => db::user_active(&state.db, claims.sub).await?,
        };
        if !active {
            return Err(Error::Unauthenticated);
        }
        Ok(Principal {
            id: claims.sub,
            role: claims.role,
            hospital: claims.hospital,
            csrf: None,
        })
    }

    /// A dashboard session; state-changing requests must carry its CSRF token and come from
    /// this origin.
    async fn from_cookie(parts: &Parts, session: &str, state: &AppState) -> Result<Self> {
        let found = db::web_session(&state.db, &secret_hash(session))
            .await?
            .ok_or(Error::Unauthenticated)?;
        let csrf = csrf_token(session);
        if !parts.method.is_safe() {
            let sent = parts
                .headers
                .get(CSRF_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !constant_time_eq(sent, csrf.as_bytes()) || !same_origin(&parts.headers) {
                return Err(Error::Forbidden("missing or wrong CSRF token"));
            }
        }
        Ok(Principal {
            id: found.user_id,
            role: Role::parse(&found.role).ok_or(Error::Internal("unknown role".into()))?,
            hospital: found.hospital_id,
            csrf: Some(csrf),
        })
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        if let Some(token) = bearer(parts) {
            return Self::from_bearer(token, state).await;
        }
        match session_cookie(&parts.headers) {
            Some(session) => Self::from_cookie(parts, session, state).await,
            None => Err(Error::Unauthenticated),
        }
    }
}
