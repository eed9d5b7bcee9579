//! The MedSplit coordinator: REST API for researchers and admins, the schedule of training
//! visits (Postgres is the source of truth), and the server-side layer of every job, applied to
//! encrypted activations in one WebSocket session per visit.
//!
//! `main` parses flags and calls [`serve`]; tests build the same router with [`create_app`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use tokio::sync::{Notify, watch};

pub mod auth;
pub mod config;
mod control;
pub mod db;
mod error;
mod http;
mod inference;
mod scheduler;
mod session;
pub mod throttle;
mod web;

pub use config::Settings;
pub use error::Error;

/// Shared by every request handler and background task.
#[derive(Clone)]
pub struct AppState {
    pub db: db::Db,
    pub keys: Arc<auth::Keys>,
    pub settings: Arc<Settings>,
    /// This process's id among the replicas on the database.
    pub replica: i64,
    sessions: Arc<Sessions>,
    /// Woken when a visit may have been queued (Postgres NOTIFY, or a local change).
    work: Arc<Notify>,
    /// Failed log-ins per account and per client address.
    logins: Arc<throttle::LoginThrottle>,
}

impl AppState {
    /// Registers this process as a replica on the database (`address` tells operators where it
    /// listens).
    pub async fn register(
        db: db::Db,
        keys: auth::Keys,
        settings: Settings,
        address: &str,
    ) -> Result<Self, sqlx::Error> {
        let replica = db::register_replica(&db, address).await?;
        let logins =
            throttle::LoginThrottle::new(settings.login_per_account, settings.login_per_address);
        Ok(Self {
            logins: Arc::new(logins),
            db,
            keys: Arc::new(keys),
            settings: Arc::new(settings),
            replica,
            sessions: Arc::new(Sessions::default()),
            work: Arc::new(Notify::new()),
        })
    }

    /// Whether a graceful shutdown has begun: no new sessions or claims.
    pub fn draining(&self) -> bool {
        *self.sessions.draining.borrow()
    }

    /// Number of training sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.sessions.open.lock().unwrap().len()
    }
}

/// Open sessions, so that revocation, cancellation and lease loss end them at once: training
/// sessions under their visit's id, private-inference sessions under negative numbers of their
/// own (which no visit id matches).
#[derive(Default)]
struct Sessions {
    open: Mutex<HashMap<i64, OpenSession>>,
    last_inference: std::sync::atomic::AtomicI64,
    draining: watch::Sender<bool>,
}

struct OpenSession {
    agent_id: i64,
    hospital_id: i64,
    job_id: i64,
    /// The visit's attempt, for training sessions.
    attempt: Option<i32>,
    stop: watch::Sender<Option<u16>>,
}

/// Who a session serves.
#[derive(Clone, Copy)]
struct SessionOf {
    agent_id: i64,
    hospital_id: i64,
    job_id: i64,
}

impl Sessions {
    fn register(
        &self,
        visit: i64,
        attempt: Option<i32>,
        of: SessionOf,
    ) -> watch::Receiver<Option<u16>> {
        let (stop, rx) = watch::channel(None);
        let previous = self.open.lock().unwrap().insert(
            visit,
            OpenSession {
                agent_id: of.agent_id,
                hospital_id: of.hospital_id,
                job_id: of.job_id,
                attempt,
                stop,
            },
        );
        if let Some(previous) = previous {
            previous
                .stop
                .send_replace(Some(medsplit_engine::api::close::FENCED));
        }
        rx
    }

    /// Registers a private-inference session; returns its key and its stop signal.
    fn register_inference(&self, of: SessionOf) -> (i64, watch::Receiver<Option<u16>>) {
        let n = self
            .last_inference
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = -(n + 1);
        (key, self.register(key, None, of))
    }

    /// The open training sessions: (visit, attempt, agent).
    fn training(&self) -> Vec<(i64, i32, i64)> {
        let open = self.open.lock().unwrap();
        open.iter()
            .filter_map(|(&visit, s)| Some((visit, s.attempt?, s.agent_id)))
            .collect()
    }

    fn unregister(&self, visit: i64, rx: &watch::Receiver<Option<u16>>) {
        let mut open = self.open.lock().unwrap();
        if open
            .get(&visit)
            .is_some_and(|s| s.stop.subscribe().same_channel(rx))
        {
            open.remove(&visit);
        }
    }

    fn stop_where(&self, code: u16, pred: impl Fn(i64, &OpenSession) -> bool) {
        for (visit, s) in self.open.lock().unwrap().iter() {
            if pred(*visit, s) {
                // The first reason given is the one the agent hears.
                s.stop.send_if_modified(|current| {
                    let unset = current.is_none();
                    if unset {
                        *current = Some(code);
                    }
                    unset
                });
            }
        }
    }
}

/// The router: REST API, training sessions, OpenAPI document.
pub fn create_app(state: AppState) -> Router {
    http::routes(state)
}

/// Background work: this replica's heartbeat; wakes claimers and ends sessions on Postgres
/// notifications; re-queues visits whose lease expired or whose replica is gone. Runs until the
/// process ends.
pub fn spawn_background(state: &AppState) {
    tokio::spawn(scheduler::beat_forever(state.clone()));
    tokio::spawn(scheduler::listen(state.clone()));
    tokio::spawn(scheduler::sweep_forever(state.clone()));
}

/// Re-queues the visits whose sessions were hosted by replicas that are gone (a previous process
/// of this one, say), and only those: sessions on live replicas go on. The sweep does the same
/// every tick; this runs it once at start-up.
pub async fn recover(state: &AppState) -> Result<(), sqlx::Error> {
    scheduler::requeue_orphans(state).await
}

/// Graceful shutdown: stops accepting sessions and claims, waits up to `grace` for open sessions
/// to finish their visit, then hands the rest back (re-queued without counting a failure, with a
/// job event each), closes their sessions, and records that this replica has stopped.
pub async fn drain(state: &AppState, grace: Duration) {
    state.sessions.draining.send_replace(true);
    // Waiting claims return, so that agents claim through another replica.
    state.work.notify_waiters();
    let deadline = tokio::time::Instant::now() + grace;
    while state.open_sessions() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Err(e) = scheduler::hand_back(state).await {
        tracing::warn!(error = %e, "could not hand back the open visits; other replicas will");
    }
    state
        .sessions
        .stop_where(medsplit_engine::api::close::SHUTDOWN, |_, _| true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while state.open_sessions() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Err(e) = db::stop_replica(&state.db, state.replica).await {
        tracing::warn!(error = %e, "could not record this replica's stop");
    }
}

pub async fn connect(database_url: &str) -> Result<db::Db, sqlx::Error> {
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(32)
        .acquire_timeout(Duration::from_secs(10))
        .connect(database_url)
        .await?;
    MIGRATOR.run(&db).await?;
    Ok(db)
}

/// The schema, from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Creates a platform admin; returns the user id.
pub async fn create_admin(db: &db::Db, email: &str, password: &str) -> Result<i64, Error> {
    http::check_new_user(email, password)?;
    let hash = auth::hash_password(password)?;
    let mut tx = db.begin().await?;
    let user = db::create_user(&mut *tx, email, &hash, "platform_admin", None)
        .await
        .map_err(|e| Error::conflict(e, "a user with this email exists"))?;
    db::audit(
        &mut *tx,
        "cli",
        "user.create",
        &format!("user:{}", user.id),
        serde_json::json!({ "email": email, "role": "platform_admin" }),
    )
    .await?;
    tx.commit().await?;
    Ok(user.id)
}

/// rustls server configuration from PEM files.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<axum_server::tls_rustls::RustlsConfig, Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| Error::Internal(format!("{}: {e}", p.display())))
    };
    let certs = rustls_pemfile::certs(&mut &read(cert)?[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Internal(format!("{}: {e}", cert.display())))?;
    let key_der = rustls_pemfile::private_key(&mut &read(key)?[..])
        .map_err(|e| Error::Internal(format!("{}: {e}", key.display())))?
        .ok_or_else(|| Error::Internal(format!("{}: no private key", key.display())))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| Error::Internal(format!("TLS: {e}")))?;
    Ok(axum_server::tls_rustls::RustlsConfig::from_config(
        std::sync::Arc::new(config),
    ))
}

/// Logs to stderr: human-readable, or one JSON object per line.
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: not in files, pipes or the journal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}
