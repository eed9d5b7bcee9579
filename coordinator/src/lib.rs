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
    sessions: Arc<Sessions>,
    /// Woken when a visit may have been queued (Postgres NOTIFY, or a local change).
    work: Arc<Notify>,
    /// Failed log-ins per account and per client address.
    logins: Arc<throttle::LoginThrottle>,
}

impl AppState {
    pub fn new(db: db::Db, keys: auth::Keys, settings: Settings) -> Self {
        let logins =
            throttle::LoginThrottle::new(settings.login_per_account, settings.login_per_address);
        Self {
            logins: Arc::new(logins),
            db,
            keys: Arc::new(keys),
            settings: Arc::new(settings),
            sessions: Arc::new(Sessions::default()),
            work: Arc::new(Notify::new()),
        }
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
    job_id: i64,
    stop: watch::Sender<Option<u16>>,
}

impl Sessions {
    fn register(&self, visit: i64, agent_id: i64, job_id: i64) -> watch::Receiver<Option<u16>> {
        let (stop, rx) = watch::channel(None);
        let previous = self.open.lock().unwrap().insert(
            visit,
            OpenSession {
                agent_id,
                job_id,
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
    fn register_inference(
        &self,
        agent_id: i64,
        job_id: i64,
    ) -> (i64, watch::Receiver<Option<u16>>) {
        let n = self
            .last_inference
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = -(n + 1);
        (key, self.register(key, agent_id, job_id))
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

/// Background work: wakes claimers on Postgres notifications, and re-queues visits whose lease
/// expired. Runs until the process ends.
pub fn spawn_background(state: &AppState) {
    tokio::spawn(scheduler::listen(state.clone()));
    tokio::spawn(scheduler::sweep_forever(state.clone()));
}

/// Requeues visits left running by a previous coordinator process (their sessions died with it).
pub async fn recover(state: &AppState) -> Result<(), sqlx::Error> {
    const REASON: &str = "coordinator restarted";
    let mut tx = state.db.begin().await?;
    let requeued = db::requeue_running(&mut *tx, REASON).await?;
    for v in &requeued {
        db::job_event(
            &mut *tx,
            v.job_id,
            "visit.requeued",
            serde_json::json!({ "visit_id": v.id, "attempt": v.attempt, "reason": REASON }),
        )
        .await?;
    }
    tx.commit().await?;
    if !requeued.is_empty() {
        let visits: Vec<i64> = requeued.iter().map(|v| v.id).collect();
        tracing::info!(
            ?visits,
            "re-queued visits left running by the previous process"
        );
        state.work.notify_waiters();
    }
    Ok(())
}

/// Stops accepting sessions, waits up to `grace` for open ones to finish their visit, then
/// closes the rest (their visits will be retried) and waits for them to go.
pub async fn drain(state: &AppState, grace: Duration) {
    state.sessions.draining.send_replace(true);
    let deadline = tokio::time::Instant::now() + grace;
    while state.open_sessions() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    state
        .sessions
        .stop_where(medsplit_engine::api::close::SHUTDOWN, |_, _| true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while state.open_sessions() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
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
