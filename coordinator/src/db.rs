//! Every SQL statement of the coordinator, checked against the schema at compile time
//! (`coordinator/.sqlx/` holds the checked shapes so that builds need no database).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;
use sqlx::types::Json;

pub type Db = sqlx::PgPool;

/// The channel agents' claims wait on; the payload is the hospital id.
pub const VISITS_CHANNEL: &str = "medsplit_visits";

/// The channel every replica listens on for sessions to end (revocation, hospital disabled,
/// cancellation, lease loss, job failure); the payload is a [`crate::control::Stop`].
pub const CONTROL_CHANNEL: &str = "medsplit_control";

// ---------------------------------------------------------------------------------------------
// Hospitals and users

#[derive(Debug, Clone, Serialize)]
pub struct Hospital {
    pub id: i64,
    pub name: String,
    pub disabled: bool,
    /// The most ε the hospital spends on one job, if its admin set a maximum.
    pub max_epsilon: Option<f64>,
    pub created_at: DateTime<Utc>,
}

pub async fn create_hospital(e: impl PgExecutor<'_>, name: &str) -> sqlx::Result<Hospital> {
    sqlx::query_as!(
        Hospital,
        "insert into hospitals (name) values ($1) returning id, name, disabled, max_epsilon, created_at",
        name
    )
    .fetch_one(e)
    .await
}

pub async fn list_hospitals(e: impl PgExecutor<'_>) -> sqlx::Result<Vec<Hospital>> {
    sqlx::query_as!(
        Hospital,
        "select id, name, disabled, max_epsilon, created_at from hospitals order by name"
    )
    .fetch_all(e)
    .await
}

pub async fn hospital(e: impl PgExecutor<'_>, id: i64) -> sqlx::Result<Option<Hospital>> {
    sqlx::query_as!(
        Hospital,
        "select id, name, disabled, max_epsilon, created_at from hospitals where id = $1",
        id
    )
    .fetch_optional(e)
    .await
}

pub async fn set_hospital_disabled(
    e: impl PgExecutor<'_>,
    id: i64,
    disabled: bool,
) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "update hospitals set disabled = $2 where id = $1",
        id,
        disabled
    )
    .execute(e)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Sets (or clears) a hospital's maximum ε per job; false if there is no such hospital.
pub async fn set_max_epsilon(
    e: impl PgExecutor<'_>,
    id: i64,
    max_epsilon: Option<f64>,
) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "update hospitals set max_epsilon = $2 where id = $1",
        id,
        max_epsilon
    )
    .execute(e)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Ids of the named hospitals that exist and are enabled, as `(name, id)`.
pub async fn hospitals_by_name(
    e: impl PgExecutor<'_>,
    names: &[String],
) -> sqlx::Result<Vec<(String, i64)>> {
    let rows = sqlx::query!(
        "select name, id from hospitals where name = any($1) and not disabled",
        names
    )
    .fetch_all(e)
    .await?;
    Ok(rows.into_iter().map(|r| (r.name, r.id)).collect())
}

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub role: String,
    pub hospital_id: Option<i64>,
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
}

pub async fn create_user(
    e: impl PgExecutor<'_>,
    email: &str,
    password_hash: &str,
    role: &str,
    hospital_id: Option<i64>,
) -> sqlx::Result<User> {
    sqlx::query_as!(
        User,
        "insert into users (email, password_hash, role, hospital_id) values ($1, $2, $3, $4)
         returning id, email, role, hospital_id, disabled, created_at",
        email,
        password_hash,
        role,
        hospital_id
    )
    .fetch_one(e)
    .await
}

pub async fn list_users(e: impl PgExecutor<'_>) -> sqlx::Result<Vec<User>> {
    sqlx::query_as!(
        User,
        "select id, email, role, hospital_id, disabled, created_at from users order by id"
    )
    .fetch_all(e)
    .await
}

pub struct Credentials {
    pub id: i64,
    pub password_hash: String,
    pub role: String,
    pub hospital_id: Option<i64>,
    pub disabled: bool,
}

pub async fn credentials(e: impl PgExecutor<'_>, email: &str) -> sqlx::Result<Option<Credentials>> {
    sqlx::query_as!(
        Credentials,
        "select id, password_hash, role, hospital_id, disabled from users where email = $1",
        email
    )
    .fetch_optional(e)
    .await
}

pub async fn set_user_disabled(
    e: impl PgExecutor<'_>,
    id: i64,
    disabled: bool,
) -> sqlx::Result<bool> {
    let r = sqlx::query!("update users set disabled = $2 where id = $1", id, disabled)
        .execute(e)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Whether the user exists and may act now (not disabled, nor its hospital).
pub async fn user_active(e: impl PgExecutor<'_>, id: i64) -> sqlx::Result<bool> {
    let row = sqlx::query_scalar!(
        r#"select (not u.disabled and not coalesce(h.disabled, false)) as "active!"
           from users u left join hospitals h on h.id = u.hospital_id where u.id = $1"#,
        id
    )
    .fetch_optional(e)
    .await?;
    Ok(row.unwrap_or(false))
}

/// A user's name and hospital, for the dashboard's header.
pub struct Profile {
    pub email: String,
    pub hospital: Option<String>,
}

pub async fn profile(e: impl PgExecutor<'_>, id: i64) -> sqlx::Result<Option<Profile>> {
    sqlx::query_as!(
        Profile,
        r#"select u.email, h.name as "hospital?"
           from users u left join hospitals h on h.id = u.hospital_id where u.id = $1"#,
        id
    )
    .fetch_optional(e)
    .await
}

// ---------------------------------------------------------------------------------------------
// Dashboard sessions

pub async fn create_web_session(
    e: impl PgExecutor<'_>,
    token_hash: &[u8],
    user_id: i64,
    expires_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "insert into web_sessions (token_hash, user_id, expires_at) values ($1, $2, $3)",
        token_hash,
        user_id,
        expires_at
    )
    .execute(e)
    .await?;
    Ok(())
}

/// The user behind an unexpired dashboard session, if that user (and its hospital) is active.
pub struct WebSession {
    pub user_id: i64,
    pub role: String,
    pub hospital_id: Option<i64>,
    pub expires_at: DateTime<Utc>,
}

pub async fn web_session(
    e: impl PgExecutor<'_>,
    token_hash: &[u8],
) -> sqlx::Result<Option<WebSession>> {
    sqlx::query_as!(
        WebSession,
        r#"select u.id as user_id, u.role, u.hospital_id, s.expires_at
           from web_sessions s
           join users u on u.id = s.user_id
           left join hospitals h on h.id = u.hospital_id
           where s.token_hash = $1 and s.expires_at > now()
             and not u.disabled and not coalesce(h.disabled, false)"#,
        token_hash
    )
    .fetch_optional(e)
    .await
}

pub async fn delete_web_session(e: impl PgExecutor<'_>, token_hash: &[u8]) -> sqlx::Result<()> {
    sqlx::query!("delete from web_sessions where token_hash = $1", token_hash)
        .execute(e)
        .await?;
    Ok(())
}

pub async fn purge_web_sessions(e: impl PgExecutor<'_>) -> sqlx::Result<u64> {
    Ok(
        sqlx::query!("delete from web_sessions where expires_at <= now()")
            .execute(e)
            .await?
            .rows_affected(),
    )
}

// ---------------------------------------------------------------------------------------------
// Audit trail

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: serde_json::Value,
}

pub async fn audit(
    e: impl PgExecutor<'_>,
    actor: &str,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> sqlx::Result<()> {
    sqlx::query!(
        "insert into audit_log (actor, action, target, detail) values ($1, $2, $3, $4)",
        actor,
        action,
        target,
        detail
    )
    .execute(e)
    .await?;
    Ok(())
}

pub async fn audit_trail(e: impl PgExecutor<'_>, limit: i64) -> sqlx::Result<Vec<AuditEntry>> {
    sqlx::query_as!(
        AuditEntry,
        "select id, at, actor, action, target, detail from audit_log order by id desc limit $1",
        limit
    )
    .fetch_all(e)
    .await
}

// ---------------------------------------------------------------------------------------------
// Enrolment and agents

pub async fn create_enrolment_token(
    e: impl PgExecutor<'_>,
    hospital_id: i64,
    token_hash: &[u8],
    created_by: i64,
    expires_at: DateTime<Utc>,
) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        "insert into enrolment_tokens (hospital_id, token_hash, created_by, expires_at)
         values ($1, $2, $3, $4) returning id",
        hospital_id,
        token_hash,
        created_by,
        expires_at
    )
    .fetch_one(e)
    .await
}

/// Why a token cannot be redeemed.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenState {
    Unknown,
    Used,
    Expired,
}

/// Marks the token used and returns `(token id, hospital id)`, or why it cannot be used.
pub async fn redeem_token(
    tx: &mut sqlx::PgConnection,
    token_hash: &[u8],
) -> sqlx::Result<Result<(i64, i64), TokenState>> {
    let row = sqlx::query!(
        r#"select id, hospital_id, used_at, expires_at < now() as "expired!"
           from enrolment_tokens where token_hash = $1 for update"#,
        token_hash
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(Err(TokenState::Unknown));
    };
    if row.used_at.is_some() {
        return Ok(Err(TokenState::Used));
    }
    if row.expired {
        return Ok(Err(TokenState::Expired));
    }
    sqlx::query!(
        "update enrolment_tokens set used_at = now() where id = $1",
        row.id
    )
    .execute(&mut *tx)
    .await?;
    Ok(Ok((row.id, row.hospital_id)))
}

pub async fn create_agent(
    tx: &mut sqlx::PgConnection,
    token_id: i64,
    hospital_id: i64,
    name: &str,
    public_key: &[u8],
    credential_hash: &[u8],
    version: &str,
) -> sqlx::Result<i64> {
    let id = sqlx::query_scalar!(
        "insert into agents (hospital_id, name, public_key, credential_hash, version)
         values ($1, $2, $3, $4, $5) returning id",
        hospital_id,
        name,
        public_key,
        credential_hash,
        version
    )
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query!(
        "update enrolment_tokens set agent_id = $2 where id = $1",
        token_id,
        id
    )
    .execute(&mut *tx)
    .await?;
    Ok(id)
}

pub struct AgentIdentity {
    pub id: i64,
    pub hospital_id: i64,
    pub revoked: bool,
}

pub async fn agent_by_credential(
    e: impl PgExecutor<'_>,
    credential_hash: &[u8],
) -> sqlx::Result<Option<AgentIdentity>> {
    sqlx::query_as!(
        AgentIdentity,
        r#"select a.id, a.hospital_id, (a.revoked_at is not null or h.disabled) as "revoked!"
           from agents a join hospitals h on h.id = a.hospital_id where a.credential_hash = $1"#,
        credential_hash
    )
    .fetch_optional(e)
    .await
}

/// Whether the agent may act now; records that it was seen.
pub async fn agent_active(e: impl PgExecutor<'_>, id: i64) -> sqlx::Result<bool> {
    let row = sqlx::query_scalar!(
        r#"update agents a set last_seen_at = now() from hospitals h
           where a.id = $1 and h.id = a.hospital_id and a.revoked_at is null and not h.disabled
           returning a.id"#,
        id
    )
    .fetch_optional(e)
    .await?;
    Ok(row.is_some())
}

/// Records what an agent has of its data.
pub async fn set_agent_data(
    e: impl PgExecutor<'_>,
    id: i64,
    train_samples: i64,
    test_samples: i64,
) -> sqlx::Result<()> {
    sqlx::query!(
        "update agents set train_samples = $2, test_samples = $3, data_reported_at = now()
         where id = $1",
        id,
        train_samples,
        test_samples
    )
    .execute(e)
    .await?;
    Ok(())
}

/// The training beats a hospital's agents last reported: the latest report of an active agent.
pub async fn hospital_train_samples(
    e: impl PgExecutor<'_>,
    hospital_id: i64,
) -> sqlx::Result<Option<i64>> {
    Ok(sqlx::query_scalar!(
        "select train_samples from agents
         where hospital_id = $1 and revoked_at is null and train_samples is not null
         order by data_reported_at desc limit 1",
        hospital_id
    )
    .fetch_optional(e)
    .await?
    .flatten())
}

pub async fn set_agent_version(e: impl PgExecutor<'_>, id: i64, version: &str) -> sqlx::Result<()> {
    sqlx::query!("update agents set version = $2 where id = $1", id, version)
        .execute(e)
        .await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentInfo {
    pub id: i64,
    pub hospital_id: i64,
    pub name: String,
    pub version: String,
    pub enrolled_at: DateTime<Utc>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub current_visit: Option<i64>,
    /// The agent's public key, shown as its fingerprint for hospitals to compare out of band.
    #[serde(rename = "key_fingerprint", serialize_with = "fingerprint")]
    pub public_key: Vec<u8>,
    /// Seen (any authenticated request, heartbeats every few seconds) within the last 30 s.
    pub online: bool,
}

fn fingerprint<S: serde::Serializer>(key: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&medsplit_engine::api::key_fingerprint(key))
}

pub async fn list_agents(e: impl PgExecutor<'_>, hospital_id: i64) -> sqlx::Result<Vec<AgentInfo>> {
    sqlx::query_as!(
        AgentInfo,
        r#"select a.id, a.hospital_id, a.name, a.version, a.enrolled_at, a.last_seen_at, a.revoked_at,
                  a.public_key,
                  (select v.id from visits v where v.agent_id = a.id and v.status = 'running' limit 1)
                    as current_visit,
                  coalesce(a.revoked_at is null and a.last_seen_at > now() - interval '30 seconds', false)
                    as "online!"
           from agents a where a.hospital_id = $1 order by a.id"#,
        hospital_id
    )
    .fetch_all(e)
    .await
}

/// Revokes an agent of `hospital_id`; false if there is no such agent or it was revoked already.
pub async fn revoke_agent(e: impl PgExecutor<'_>, id: i64, hospital_id: i64) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "update agents set revoked_at = now()
         where id = $1 and hospital_id = $2 and revoked_at is null",
        id,
        hospital_id
    )
    .execute(e)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Why an agent cannot be deleted.
#[derive(Debug, PartialEq, Eq)]
pub enum Undeletable {
    /// No such agent in the hospital.
    Unknown,
    /// It has made an authenticated request: it may have trained, and stays on record.
    Seen,
}

/// Deletes an agent of `hospital_id` that has never been seen, with the weights sealed to it,
/// and returns its name. The row lock makes a concurrent first request of the agent wait, and
/// then find no agent.
pub async fn delete_unseen_agent(
    tx: &mut sqlx::PgConnection,
    id: i64,
    hospital_id: i64,
) -> sqlx::Result<Result<String, Undeletable>> {
    let row = sqlx::query!(
        r#"select name, last_seen_at is not null as "seen!" from agents
           where id = $1 and hospital_id = $2 for update"#,
        id,
        hospital_id
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(Err(Undeletable::Unknown));
    };
    if row.seen {
        return Ok(Err(Undeletable::Seen));
    }
    sqlx::query!(
        "delete from sealed_weights where recipient_agent_id = $1",
        id
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "update enrolment_tokens set agent_id = null where agent_id = $1",
        id
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!("delete from agents where id = $1", id)
        .execute(&mut *tx)
        .await?;
    Ok(Ok(row.name))
}

// ---------------------------------------------------------------------------------------------
// Jobs

#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: i64,
    pub name: String,
    pub owner_id: i64,
    /// The owner's e-mail address.
    pub owner: String,
    pub spec: Json<medsplit_engine::api::JobSpec>,
    pub status: String,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub async fn insert_job(
    e: impl PgExecutor<'_>,
    owner_id: i64,
    spec: &medsplit_engine::api::JobSpec,
    on_failure: &str,
) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        "insert into jobs (name, owner_id, spec, status, rounds, max_attempts, on_failure)
         values ($1, $2, $3, 'pending', $4, $5, $6) returning id",
        spec.name,
        owner_id,
        Json(spec) as _,
        spec.rounds as i32,
        spec.max_attempts as i32,
        on_failure
    )
    .fetch_one(e)
    .await
}

pub async fn insert_job_hospital(
    e: impl PgExecutor<'_>,
    job_id: i64,
    position: i32,
    hospital_id: i64,
) -> sqlx::Result<()> {
    sqlx::query!(
        "insert into job_hospitals (job_id, position, hospital_id) values ($1, $2, $3)",
        job_id,
        position,
        hospital_id
    )
    .execute(e)
    .await?;
    Ok(())
}

pub async fn job(e: impl PgExecutor<'_>, id: i64) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as!(
        JobRow,
        r#"select j.id, j.name, j.owner_id, u.email as owner,
                  j.spec as "spec: Json<medsplit_engine::api::JobSpec>", j.status,
                  j.error, j.created_at, j.started_at, j.finished_at
           from jobs j join users u on u.id = j.owner_id where j.id = $1"#,
        id
    )
    .fetch_optional(e)
    .await
}

/// Jobs of `owner` (all jobs when `None`), newest first.
pub async fn list_jobs(e: impl PgExecutor<'_>, owner: Option<i64>) -> sqlx::Result<Vec<JobRow>> {
    sqlx::query_as!(
        JobRow,
        r#"select j.id, j.name, j.owner_id, u.email as owner,
                  j.spec as "spec: Json<medsplit_engine::api::JobSpec>", j.status,
                  j.error, j.created_at, j.started_at, j.finished_at
           from jobs j join users u on u.id = j.owner_id
           where $1::bigint is null or j.owner_id = $1 order by j.id desc"#,
        owner
    )
    .fetch_all(e)
    .await
}

#[derive(Debug, Clone, Serialize)]
pub struct JobHospital {
    pub position: i32,
    pub hospital_id: i64,
    pub name: String,
    pub consent: String,
    pub decided_at: Option<DateTime<Utc>>,
}

pub async fn job_hospitals(e: impl PgExecutor<'_>, job_id: i64) -> sqlx::Result<Vec<JobHospital>> {
    sqlx::query_as!(
        JobHospital,
        "select jh.position, jh.hospital_id, h.name, jh.consent, jh.decided_at
         from job_hospitals jh join hospitals h on h.id = jh.hospital_id
         where jh.job_id = $1 order by jh.position",
        job_id
    )
    .fetch_all(e)
    .await
}

/// Records a hospital's decision on a pending job; false if the job is not pending or does not
/// name the hospital, or the hospital decided already.
pub async fn set_consent(
    e: impl PgExecutor<'_>,
    job_id: i64,
    hospital_id: i64,
    consent: &str,
    user_id: i64,
) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "update job_hospitals jh set consent = $3, decided_by = $4, decided_at = now()
         from jobs j
         where jh.job_id = $1 and jh.hospital_id = $2 and j.id = jh.job_id
           and j.status = 'pending' and jh.consent = 'pending'",
        job_id,
        hospital_id,
        consent,
        user_id
    )
    .execute(e)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Jobs naming `hospital_id` with the hospital's consent, newest first.
pub async fn jobs_for_hospital(
    e: impl PgExecutor<'_>,
    hospital_id: i64,
) -> sqlx::Result<Vec<JobRow>> {
    sqlx::query_as!(
        JobRow,
        r#"select j.id, j.name, j.owner_id, u.email as owner,
                  j.spec as "spec: Json<medsplit_engine::api::JobSpec>",
                  j.status, j.error, j.created_at, j.started_at, j.finished_at
           from jobs j join job_hospitals jh on jh.job_id = j.id join users u on u.id = j.owner_id
           where jh.hospital_id = $1 order by j.id desc"#,
        hospital_id
    )
    .fetch_all(e)
    .await
}

/// Starts a pending job whose hospitals have all approved: creates its visits (rounds ×
/// hospitals) and queues the first. Returns false when consent is still missing.
pub async fn start_job_if_approved(tx: &mut sqlx::PgConnection, job_id: i64) -> sqlx::Result<bool> {
    let started = sqlx::query_scalar!(
        "update jobs set status = 'running', started_at = now()
         where id = $1 and status = 'pending'
           and not exists (select 1 from job_hospitals
                           where job_id = $1 and consent <> 'approved')
         returning rounds",
        job_id
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(rounds) = started else {
        return Ok(false);
    };
    sqlx::query!(
        "insert into visits (job_id, seq, round, position, hospital_id, status)
         select $1, r * n.count + jh.position, r, jh.position, jh.hospital_id,
                case when r = 0 and jh.position = 0 then 'queued' else 'waiting' end
         from job_hospitals jh
         cross join generate_series(0, $2 - 1) r
         cross join (select count(*)::int as count from job_hospitals where job_id = $1) n
         where jh.job_id = $1
         order by r, jh.position",
        job_id,
        rounds
    )
    .execute(&mut *tx)
    .await?;
    notify_queued(&mut *tx, job_id).await?;
    Ok(true)
}

/// Marks a pending job declined (a declined job never runs).
pub async fn decline_job(e: impl PgExecutor<'_>, job_id: i64) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "update jobs set status = 'declined', finished_at = now()
         where id = $1 and status = 'pending'",
        job_id
    )
    .execute(e)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Ends a job that is still pending or running with `status` (`cancelled` or `failed`); its
/// unfinished visits are cancelled. False if the job had already ended.
pub async fn end_job(
    tx: &mut sqlx::PgConnection,
    job_id: i64,
    status: &str,
    error: Option<&str>,
) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "update jobs set status = $2, error = $3, finished_at = now()
         where id = $1 and status in ('pending', 'running')",
        job_id,
        status,
        error
    )
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query!(
        "update visits set status = 'cancelled', lease_expires_at = null
         where job_id = $1 and status in ('waiting', 'queued', 'running')",
        job_id
    )
    .execute(&mut *tx)
    .await?;
    Ok(true)
}

#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub kind: String,
    pub detail: serde_json::Value,
}

pub async fn job_event(
    e: impl PgExecutor<'_>,
    job_id: i64,
    kind: &str,
    detail: serde_json::Value,
) -> sqlx::Result<()> {
    sqlx::query!(
        "insert into job_events (job_id, kind, detail) values ($1, $2, $3)",
        job_id,
        kind,
        detail
    )
    .execute(e)
    .await?;
    Ok(())
}

pub async fn job_events(
    e: impl PgExecutor<'_>,
    job_id: i64,
    after: i64,
    limit: i64,
) -> sqlx::Result<Vec<JobEvent>> {
    sqlx::query_as!(
        JobEvent,
        "select id, at, kind, detail from job_events where job_id = $1 and id > $2
         order by id limit $3",
        job_id,
        after,
        limit
    )
    .fetch_all(e)
    .await
}

// ---------------------------------------------------------------------------------------------
// Visits: claim, lease, completion

#[derive(Debug, Clone, Serialize)]
pub struct Visit {
    pub id: i64,
    pub job_id: i64,
    pub seq: i32,
    pub round: i32,
    pub position: i32,
    pub hospital_id: i64,
    pub status: String,
    pub attempt: i32,
    pub failures: i32,
    pub agent_id: Option<i64>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub progress: Option<f64>,
    pub train_loss: Option<f64>,
    pub train_accuracy: Option<f64>,
    pub train_samples: Option<i64>,
    pub test_accuracy: Option<f64>,
    pub test_samples: Option<i64>,
    pub bytes_up: Option<i64>,
    pub bytes_down: Option<i64>,
    pub messages: Option<i64>,
    pub server_seconds: Option<f64>,
    pub wall_seconds: Option<f64>,
    pub last_error: Option<String>,
    /// The visit's DP-SGD as its agent reported it.
    pub dp: Option<Json<medsplit_engine::api::DpReport>>,
    /// The ε the hospital had spent on the job after this visit.
    pub epsilon_spent: Option<f64>,
    /// What the coordinator received and sent, per message kind.
    pub message_kinds: Option<Json<Vec<MessageKind>>>,
    /// Class names of the test confusion matrix.
    #[serde(skip)]
    pub test_classes: Option<Vec<String>>,
    /// The test confusion matrix, row-major (rows: true class).
    #[serde(skip)]
    pub test_confusion: Option<Vec<i64>>,
    /// `patient` or `beat`: the kind of split the test set came from.
    #[serde(skip)]
    pub test_evaluation: Option<String>,
}

/// Messages of one kind and direction in a visit's session.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct MessageKind {
    /// `up` (agent to coordinator) or `down`.
    pub direction: String,
    pub kind: String,
    pub count: i64,
    pub bytes: i64,
}

pub async fn visits(e: impl PgExecutor<'_>, job_id: i64) -> sqlx::Result<Vec<Visit>> {
    sqlx::query_as!(
        Visit,
        r#"select id, job_id, seq, round, position, hospital_id, status, attempt, failures, agent_id,
                lease_expires_at, started_at, finished_at, progress, train_loss, train_accuracy,
                train_samples, test_accuracy, test_samples, bytes_up, bytes_down, messages,
                server_seconds, wall_seconds, last_error, test_classes, test_confusion,
                test_evaluation, dp as "dp: Json<medsplit_engine::api::DpReport>", epsilon_spent,
                message_kinds as "message_kinds: Json<Vec<MessageKind>>"
         from visits where job_id = $1 order by seq"#,
        job_id
    )
    .fetch_all(e)
    .await
}

pub async fn visit(e: impl PgExecutor<'_>, id: i64) -> sqlx::Result<Option<Visit>> {
    sqlx::query_as!(
        Visit,
        r#"select id, job_id, seq, round, position, hospital_id, status, attempt, failures, agent_id,
                lease_expires_at, started_at, finished_at, progress, train_loss, train_accuracy,
                train_samples, test_accuracy, test_samples, bytes_up, bytes_down, messages,
                server_seconds, wall_seconds, last_error, test_classes, test_confusion,
                test_evaluation, dp as "dp: Json<medsplit_engine::api::DpReport>", epsilon_spent,
                message_kinds as "message_kinds: Json<Vec<MessageKind>>"
         from visits where id = $1"#,
        id
    )
    .fetch_optional(e)
    .await
}

/// The ε a hospital has spent on a job: the largest its completed visits reported.
pub async fn epsilon_spent(
    e: impl PgExecutor<'_>,
    job_id: i64,
    hospital_id: i64,
) -> sqlx::Result<Option<f64>> {
    sqlx::query_scalar!(
        "select max(epsilon_spent) from visits
         where job_id = $1 and hospital_id = $2 and status = 'completed'",
        job_id,
        hospital_id
    )
    .fetch_one(e)
    .await
}

pub struct Claimed {
    pub visit_id: i64,
    pub attempt: i32,
    pub job_id: i64,
    pub seq: i32,
    pub round: i32,
    pub position: i32,
    pub spec: Json<medsplit_engine::api::JobSpec>,
}

/// Claims the oldest queued visit of the agent's hospital that the agent can train (it holds
/// the weights the last completed visit sealed to it, or the job has none yet): the visit runs
/// under a lease of `lease_seconds`, and its attempt number is the fencing token.
///
/// Nothing is claimed for an agent that is revoked or whose hospital is disabled. The statement
/// holds a share lock on both rows until its transaction ends, so that a revocation or a
/// hospital's disabling either comes first (and this claims nothing) or waits for the claim to
/// commit (and then releases the visit it gave).
pub async fn claim_visit(
    e: impl PgExecutor<'_>,
    agent_id: i64,
    hospital_id: i64,
    lease_seconds: f64,
) -> sqlx::Result<Option<Claimed>> {
    sqlx::query_as!(
        Claimed,
        r#"with agent as (
             select a.id from agents a join hospitals h on h.id = a.hospital_id
             where a.id = $1 and a.hospital_id = $2 and a.revoked_at is null and not h.disabled
             for share of a, h
           ),
           candidate as (
             select v.id from visits v join jobs j on j.id = v.job_id
             where exists (select 1 from agent)
               and v.hospital_id = $2 and v.status = 'queued' and j.status = 'running'
               and not exists (
                 select 1 from visits p
                 where p.job_id = v.job_id and p.status = 'completed' and p.seq < v.seq
                   and not exists (select 1 from visits q where q.job_id = v.job_id
                                   and q.status = 'completed' and q.seq > p.seq and q.seq < v.seq)
                   and not exists (select 1 from sealed_weights s
                                   where s.visit_id = p.id and s.recipient_agent_id = $1))
             order by v.job_id, v.seq
             limit 1
             for update of v skip locked
           )
           update visits v set status = 'running', attempt = v.attempt + 1, agent_id = $1,
                  lease_expires_at = now() + make_interval(secs => $3), started_at = now(),
                  progress = 0, replica_id = null
           from candidate c, jobs j
           where v.id = c.id and j.id = v.job_id
           returning v.id as visit_id, v.attempt, v.job_id, v.seq, v.round, v.position,
                     j.spec as "spec: Json<medsplit_engine::api::JobSpec>""#,
        agent_id,
        hospital_id,
        lease_seconds
    )
    .fetch_optional(e)
    .await
}

pub struct HandoffRow {
    pub visit_id: i64,
    pub sender_agent_id: i64,
    pub sender_public_key: Vec<u8>,
    pub sealed: Vec<u8>,
}

/// The client weights the last completed visit before `seq` sealed to `agent_id`.
pub async fn handoff(
    e: impl PgExecutor<'_>,
    job_id: i64,
    seq: i32,
    agent_id: i64,
) -> sqlx::Result<Option<HandoffRow>> {
    sqlx::query_as!(
        HandoffRow,
        "select s.visit_id, s.sender_agent_id, a.public_key as sender_public_key, s.sealed
         from sealed_weights s join agents a on a.id = s.sender_agent_id
         where s.visit_id = (select id from visits where job_id = $1 and seq < $2
                             and status = 'completed' order by seq desc limit 1)
           and s.recipient_agent_id = $3",
        job_id,
        seq,
        agent_id
    )
    .fetch_optional(e)
    .await
}

/// An agent of one of a job's hospitals.
pub struct JobAgent {
    pub id: i64,
    pub name: String,
    /// The agent's hospital's name.
    pub hospital: String,
    pub public_key: Vec<u8>,
    /// Neither revoked nor of a disabled hospital: it may train the job's later visits, and
    /// client weights are sealed to it.
    pub active: bool,
}

/// Every agent of the job's hospitals, revoked ones and those of disabled hospitals included.
pub async fn job_agents(e: impl PgExecutor<'_>, job_id: i64) -> sqlx::Result<Vec<JobAgent>> {
    sqlx::query_as!(
        JobAgent,
        r#"select a.id, a.name, h.name as hospital, a.public_key,
                  (a.revoked_at is null and not h.disabled) as "active!"
           from agents a
           join hospitals h on h.id = a.hospital_id
           join job_hospitals jh on jh.hospital_id = a.hospital_id
           where jh.job_id = $1 order by a.id"#,
        job_id
    )
    .fetch_all(e)
    .await
}

/// Extends the lease of a running visit held by this attempt; false if the attempt was fenced.
pub async fn heartbeat(
    e: impl PgExecutor<'_>,
    visit_id: i64,
    attempt: i32,
    agent_id: i64,
    lease_seconds: f64,
) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "update visits set lease_expires_at = now() + make_interval(secs => $4)
         where id = $1 and attempt = $2 and agent_id = $3 and status = 'running'",
        visit_id,
        attempt,
        agent_id,
        lease_seconds
    )
    .execute(e)
    .await?;
    Ok(r.rows_affected() == 1)
}

pub async fn set_progress(
    e: impl PgExecutor<'_>,
    visit_id: i64,
    attempt: i32,
    progress: f64,
) -> sqlx::Result<()> {
    sqlx::query!(
        "update visits set progress = $3 where id = $1 and attempt = $2 and status = 'running'",
        visit_id,
        attempt,
        progress
    )
    .execute(e)
    .await?;
    Ok(())
}

/// Ends this attempt of a running visit now: it counts as a failed attempt and is re-queued (or
/// the job's policy applies) by the next [`expire_leases`].
pub async fn release_visit(
    e: impl PgExecutor<'_>,
    visit_id: i64,
    attempt: i32,
    agent_id: i64,
    reason: &str,
) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "update visits set lease_expires_at = now() - interval '1 second', last_error = $4
         where id = $1 and attempt = $2 and agent_id = $3 and status = 'running'",
        visit_id,
        attempt,
        agent_id,
        reason
    )
    .execute(e)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Ends this attempt of a running visit for good: the hospital's data cannot give what the job
/// asks, so retrying cannot help. Its failure is counted and `reason` kept as its last error;
/// the caller applies the job's policy ([`crate::scheduler::apply_failure`]). `None` when this
/// attempt no longer holds the visit.
pub async fn refuse_visit(
    tx: &mut sqlx::PgConnection,
    visit_id: i64,
    attempt: i32,
    agent_id: i64,
    reason: &str,
) -> sqlx::Result<Option<Expired>> {
    sqlx::query_as!(
        Expired,
        "update visits v set failures = v.failures + 1, agent_id = null, lease_expires_at = null,
                status = 'queued', last_error = $4
         from jobs j
         where j.id = v.job_id and v.id = $1 and v.attempt = $2 and v.agent_id = $3
           and v.status = 'running'
         returning v.id, v.job_id, v.seq, v.hospital_id, v.failures, j.max_attempts, j.on_failure,
                   v.last_error",
        visit_id,
        attempt,
        agent_id,
        reason
    )
    .fetch_optional(&mut *tx)
    .await
}

pub struct Requeued {
    pub id: i64,
    pub job_id: i64,
    pub attempt: i32,
}

pub struct Expired {
    pub id: i64,
    pub job_id: i64,
    pub seq: i32,
    pub hospital_id: i64,
    pub failures: i32,
    pub max_attempts: i32,
    pub on_failure: String,
    /// Why the attempt ended, when the agent said (its release) or the coordinator knows.
    pub last_error: Option<String>,
}

/// Running visits whose lease has expired, locked for this transaction; their failure count is
/// incremented.
pub async fn take_expired(tx: &mut sqlx::PgConnection) -> sqlx::Result<Vec<Expired>> {
    sqlx::query_as!(
        Expired,
        "with expired as (
             select v.id from visits v
             where v.status = 'running' and v.lease_expires_at < now()
             for update of v skip locked
         )
         update visits v set failures = v.failures + 1, agent_id = null, lease_expires_at = null,
                status = 'queued'
         from expired e, jobs j
         where v.id = e.id and j.id = v.job_id
         returning v.id, v.job_id, v.seq, v.hospital_id, v.failures, j.max_attempts, j.on_failure,
                   v.last_error"
    )
    .fetch_all(&mut *tx)
    .await
}

pub async fn skip_visit(e: impl PgExecutor<'_>, visit_id: i64) -> sqlx::Result<()> {
    sqlx::query!(
        "update visits set status = 'skipped', finished_at = now() where id = $1",
        visit_id
    )
    .execute(e)
    .await?;
    Ok(())
}

/// Measurements of a completed visit.
pub struct VisitOutcome {
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub train_samples: i64,
    pub test_accuracy: Option<f64>,
    pub test_samples: i64,
    /// The test set's class names, confusion matrix (row-major) and kind of split.
    pub test: Option<(Vec<String>, Vec<i64>, &'static str)>,
    pub bytes_up: i64,
    pub bytes_down: i64,
    pub messages: i64,
    pub server_seconds: f64,
    pub message_kinds: Vec<MessageKind>,
    pub dp: Option<medsplit_engine::api::DpReport>,
}

/// Completes this attempt of a running visit; `None` if the attempt was fenced (lease lost, job
/// cancelled). Returns the job and the visit's position in the schedule.
pub async fn complete_visit(
    tx: &mut sqlx::PgConnection,
    visit_id: i64,
    attempt: i32,
    agent_id: i64,
    m: &VisitOutcome,
) -> sqlx::Result<Option<(i64, i32)>> {
    let row = sqlx::query!(
        "update visits set status = 'completed', finished_at = now(), lease_expires_at = null,
                progress = 1, train_loss = $4, train_accuracy = $5, train_samples = $6,
                test_accuracy = $7, test_samples = $8, bytes_up = $9, bytes_down = $10,
                messages = $11, server_seconds = $12,
                test_classes = $13, test_confusion = $14, test_evaluation = $15,
                message_kinds = $16, dp = $17, epsilon_spent = $18,
                wall_seconds = extract(epoch from now() - started_at)::float8
         where id = $1 and attempt = $2 and agent_id = $3 and status = 'running'
           and lease_expires_at > now()
         returning job_id, seq",
        visit_id,
        attempt,
        agent_id,
        m.train_loss,
        m.train_accuracy,
        m.train_samples,
        m.test_accuracy,
        m.test_samples,
        m.bytes_up,
        m.bytes_down,
        m.messages,
        m.server_seconds,
        m.test.as_ref().map(|t| t.0.as_slice()),
        m.test.as_ref().map(|t| t.1.as_slice()),
        m.test.as_ref().map(|t| t.2),
        Json(&m.message_kinds) as _,
        m.dp.as_ref().map(Json) as _,
        m.dp.as_ref().map(|d| d.epsilon_spent),
    )
    .fetch_optional(&mut *tx)
    .await?;
    Ok(row.map(|r| (r.job_id, r.seq)))
}

pub async fn store_checkpoint(
    e: impl PgExecutor<'_>,
    job_id: i64,
    server_layer: &[u8],
) -> sqlx::Result<()> {
    sqlx::query!(
        "update jobs set server_checkpoint = $2 where id = $1",
        job_id,
        server_layer
    )
    .execute(e)
    .await?;
    Ok(())
}

pub async fn checkpoint(e: impl PgExecutor<'_>, job_id: i64) -> sqlx::Result<Option<Vec<u8>>> {
    sqlx::query_scalar!("select server_checkpoint from jobs where id = $1", job_id)
        .fetch_one(e)
        .await
}

pub async fn store_sealed(
    e: impl PgExecutor<'_>,
    visit_id: i64,
    recipient: i64,
    sender: i64,
    sealed: &[u8],
) -> sqlx::Result<()> {
    sqlx::query!(
        "insert into sealed_weights (visit_id, recipient_agent_id, sender_agent_id, sealed)
         values ($1, $2, $3, $4)",
        visit_id,
        recipient,
        sender,
        sealed
    )
    .execute(e)
    .await?;
    Ok(())
}

/// Queues the job's next waiting visit, or completes the job when none is left. Returns
/// whether the job is now complete.
pub async fn advance(tx: &mut sqlx::PgConnection, job_id: i64) -> sqlx::Result<bool> {
    let next = sqlx::query_scalar!(
        "update visits set status = 'queued'
         where id = (select id from visits where job_id = $1 and status = 'waiting'
                     order by seq limit 1)
         returning id",
        job_id
    )
    .fetch_optional(&mut *tx)
    .await?;
    if next.is_some() {
        notify_queued(&mut *tx, job_id).await?;
        return Ok(false);
    }
    sqlx::query!(
        "update jobs set status = 'completed', finished_at = now()
         where id = $1 and status = 'running'",
        job_id
    )
    .execute(&mut *tx)
    .await?;
    Ok(true)
}

/// Wakes agents waiting for work (delivered when the transaction commits).
pub async fn notify_queued(e: impl PgExecutor<'_>, job_id: i64) -> sqlx::Result<()> {
    sqlx::query!(
        "select pg_notify($1, $2)",
        VISITS_CHANNEL,
        job_id.to_string()
    )
    .execute(e)
    .await?;
    Ok(())
}

/// Running jobs' open visits held by `agent_id` (to close their sessions on revocation).
pub async fn running_visits_of_agent(
    e: impl PgExecutor<'_>,
    agent_id: i64,
) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar!(
        "select id from visits where agent_id = $1 and status = 'running'",
        agent_id
    )
    .fetch_all(e)
    .await
}

// ---------------------------------------------------------------------------------------------
// Finished models: export records

/// Records that `agent_id` (of `hospital_id`) exported `job_id`'s model.
pub async fn record_export(
    e: impl PgExecutor<'_>,
    job_id: i64,
    agent_id: i64,
    hospital_id: i64,
) -> sqlx::Result<()> {
    sqlx::query!(
        "insert into model_exports (job_id, agent_id, hospital_id) values ($1, $2, $3)",
        job_id,
        agent_id,
        hospital_id
    )
    .execute(e)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportRow {
    pub agent_id: i64,
    pub agent: String,
    pub hospital: String,
    pub at: DateTime<Utc>,
}

/// Every export of `job_id`'s model, oldest first.
pub async fn exports(e: impl PgExecutor<'_>, job_id: i64) -> sqlx::Result<Vec<ExportRow>> {
    sqlx::query_as!(
        ExportRow,
        "select x.agent_id, a.name as agent, h.name as hospital, x.at
         from model_exports x
         join agents a on a.id = x.agent_id
         join hospitals h on h.id = x.hospital_id
         where x.job_id = $1 order by x.id",
        job_id
    )
    .fetch_all(e)
    .await
}

// ---------------------------------------------------------------------------------------------
// Replicas: the coordinator processes on this database

/// Registers a starting replica; returns its id.
pub async fn register_replica(e: impl PgExecutor<'_>, address: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        "insert into replicas (address) values ($1) returning id",
        address
    )
    .fetch_one(e)
    .await
}

/// Records that the replica is alive.
pub async fn replica_heartbeat(e: impl PgExecutor<'_>, id: i64) -> sqlx::Result<()> {
    sqlx::query!(
        "update replicas set heartbeat_at = now() where id = $1 and stopped_at is null",
        id
    )
    .execute(e)
    .await?;
    Ok(())
}

/// Records that the replica shut down: whatever it still hosts is anyone's to re-queue.
pub async fn stop_replica(e: impl PgExecutor<'_>, id: i64) -> sqlx::Result<()> {
    sqlx::query!(
        "update replicas set stopped_at = now() where id = $1 and stopped_at is null",
        id
    )
    .execute(e)
    .await?;
    Ok(())
}

/// Forgets replicas gone for a day that host nothing.
pub async fn prune_replicas(e: impl PgExecutor<'_>) -> sqlx::Result<u64> {
    let r = sqlx::query!(
        "delete from replicas r
         where coalesce(r.stopped_at, r.heartbeat_at) < now() - interval '1 day'
           and not exists (select 1 from visits v where v.replica_id = r.id and v.status = 'running')"
    )
    .execute(e)
    .await?;
    Ok(r.rows_affected())
}

/// Records that this attempt's session is hosted by `replica`; false if the attempt no longer
/// holds the visit.
pub async fn host_session(
    e: impl PgExecutor<'_>,
    visit_id: i64,
    attempt: i32,
    agent_id: i64,
    replica: i64,
) -> sqlx::Result<bool> {
    let r = sqlx::query!(
        "update visits set replica_id = $4
         where id = $1 and attempt = $2 and agent_id = $3 and status = 'running'",
        visit_id,
        attempt,
        agent_id,
        replica
    )
    .execute(e)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// A running visit put back in the queue because the replica hosting its session went away.
pub struct Orphaned {
    pub id: i64,
    pub job_id: i64,
    pub attempt: i32,
    pub replica_id: i64,
    /// The replica shut down (rather than stopped beating).
    pub stopped: bool,
}

/// Puts back in the queue, without counting a failure, the running visits whose sessions were
/// hosted by a replica that shut down or whose heartbeat is older than `timeout_seconds` (and
/// only those: sessions on live replicas go on). Rows are locked and skipped when another
/// replica holds them, so concurrent sweeps re-queue each visit once.
pub async fn requeue_orphans(
    e: impl PgExecutor<'_>,
    timeout_seconds: f64,
) -> sqlx::Result<Vec<Orphaned>> {
    sqlx::query_as!(
        Orphaned,
        r#"with orphaned as (
             select v.id, r.id as replica_id, r.stopped_at is not null as stopped
             from visits v join replicas r on r.id = v.replica_id
             where v.status = 'running'
               and (r.stopped_at is not null
                    or r.heartbeat_at < now() - make_interval(secs => $1))
             for update of v skip locked
           )
           update visits v set status = 'queued', agent_id = null, lease_expires_at = null,
                  replica_id = null,
                  last_error = case when o.stopped then 'coordinator replica shut down'
                                    else 'coordinator replica stopped responding' end
           from orphaned o
           where v.id = o.id
           returning v.id, v.job_id, v.attempt, o.replica_id as "replica_id!",
                     o.stopped as "stopped!""#,
        timeout_seconds
    )
    .fetch_all(e)
    .await
}

/// Puts back in the queue, without counting a failure, the running visits whose sessions
/// `replica` hosts (at the end of its graceful shutdown).
pub async fn requeue_hosted(
    e: impl PgExecutor<'_>,
    replica: i64,
    reason: &str,
) -> sqlx::Result<Vec<Requeued>> {
    sqlx::query_as!(
        Requeued,
        "update visits set status = 'queued', agent_id = null, lease_expires_at = null,
                replica_id = null, last_error = $2
         where status = 'running' and replica_id = $1
         returning id, job_id, attempt",
        replica,
        reason
    )
    .fetch_all(e)
    .await
}

/// A session open on this replica, as the polling fallback checks it.
pub struct HeldSession {
    pub visit_id: i64,
    /// The visit is still this attempt's, in a running job.
    pub held: bool,
    /// The agent is neither revoked nor of a disabled hospital.
    pub active: bool,
}

/// For each open session (visit, attempt, agent): whether its attempt still holds the visit and
/// whether its agent may still train.
pub async fn check_sessions(
    e: impl PgExecutor<'_>,
    visits: &[i64],
    attempts: &[i32],
    agents: &[i64],
) -> sqlx::Result<Vec<HeldSession>> {
    sqlx::query_as!(
        HeldSession,
        r#"select s.visit_id as "visit_id!",
                  coalesce(v.status = 'running' and v.attempt = s.attempt
                           and v.agent_id = s.agent_id and j.status = 'running', false) as "held!",
                  coalesce(a.revoked_at is null and not h.disabled, false) as "active!"
           from unnest($1::bigint[], $2::int[], $3::bigint[]) as s (visit_id, attempt, agent_id)
           left join visits v on v.id = s.visit_id
           left join jobs j on j.id = v.job_id
           left join agents a on a.id = s.agent_id
           left join hospitals h on h.id = a.hospital_id"#,
        visits,
        attempts,
        agents
    )
    .fetch_all(e)
    .await
}

/// Tells every replica to end the sessions `payload` names (delivered when the transaction
/// commits).
pub async fn notify_control(e: impl PgExecutor<'_>, payload: &str) -> sqlx::Result<()> {
    sqlx::query!("select pg_notify($1, $2)", CONTROL_CHANNEL, payload)
        .execute(e)
        .await?;
    Ok(())
}

/// Deletes the sealed copies of the job's visits before `seq`: once a later visit has completed
/// they can no longer be read (each visit reads the copies of the last completed visit before
/// it, and exports read the final visit's).
pub async fn delete_stale_sealed(
    e: impl PgExecutor<'_>,
    job_id: i64,
    seq: i32,
) -> sqlx::Result<u64> {
    let r = sqlx::query!(
        "delete from sealed_weights s using visits v
         where v.id = s.visit_id and v.job_id = $1 and v.seq < $2",
        job_id,
        seq
    )
    .execute(e)
    .await?;
    Ok(r.rows_affected())
}

/// What the retention purge deleted.
pub struct Purged {
    pub events: i64,
    pub visits: i64,
}

/// For jobs that finished more than `seconds` ago: deletes their events and the per-message-kind
/// counts of their visits (the bulk of a visit's row). Their visits' figures, confusion matrices,
/// final model and sealed copies stay.
pub async fn purge_finished_jobs(
    tx: &mut sqlx::PgConnection,
    seconds: f64,
) -> sqlx::Result<Purged> {
    let events = sqlx::query!(
        "delete from job_events e using jobs j
         where j.id = e.job_id and j.finished_at < now() - make_interval(secs => $1)",
        seconds
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let visits = sqlx::query!(
        "update visits v set message_kinds = null from jobs j
         where j.id = v.job_id and v.message_kinds is not null
           and j.finished_at < now() - make_interval(secs => $1)",
        seconds
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(Purged {
        events: events as i64,
        visits: visits as i64,
    })
}
