//! `medsplit-coordinator`: serve the API and training sessions, or create the first admin.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use medsplit_coordinator::{AppState, Settings, auth, db};

#[derive(Parser)]
#[command(version, about = "MedSplit coordinator")]
struct Cli {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// Log format: `text`, or `json` for log collectors.
    #[arg(
        long,
        env = "MEDSPLIT_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the REST API, the dashboard and the training sessions.
    Serve(Box<Serve>),
    /// Create a platform admin (the first one, or another). The password is read from
    /// MEDSPLIT_ADMIN_PASSWORD, or else from the first line of standard input.
    CreateAdmin {
        #[arg(long)]
        email: String,
    },
}

#[derive(clap::Args)]
struct Serve {
    /// Address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, env = "MEDSPLIT_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// URL that agents and browsers reach this coordinator at (used in enrolment commands).
    #[arg(long, env = "MEDSPLIT_PUBLIC_URL")]
    public_url: Option<String>,
    /// File holding the JWT signing secret (at least 32 bytes; mode 0600).
    #[arg(long, env = "MEDSPLIT_JWT_KEY_FILE")]
    jwt_key_file: PathBuf,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, env = "MEDSPLIT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "MEDSPLIT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Seconds a visit's lease lasts without a heartbeat.
    #[arg(long, env = "MEDSPLIT_LEASE_SECONDS", default_value_t = 30)]
    lease_seconds: u64,
    /// Largest training-session message accepted, in bytes.
    #[arg(long, env = "MEDSPLIT_MAX_MESSAGE_BYTES", default_value_t = 16 << 20)]
    max_message_bytes: usize,
    /// Seconds without a heartbeat after which a replica is taken for gone and the visits whose
    /// sessions it hosted are re-queued by the others (replicas beat three times as often).
    #[arg(long, env = "MEDSPLIT_REPLICA_TIMEOUT_SECONDS", default_value_t = 3)]
    replica_timeout_seconds: u64,
    /// Days after a job ends that its events and its visits' per-message-kind counts are kept
    /// (its figures, confusion matrices and model stay). Kept forever when not given.
    #[arg(long, env = "MEDSPLIT_RETENTION_DAYS")]
    retention_days: Option<f64>,
    /// On SIGTERM/SIGINT, seconds to let open sessions finish their visit before closing them.
    #[arg(long, env = "MEDSPLIT_DRAIN_SECONDS", default_value_t = 20)]
    drain_seconds: u64,
    /// Serve the dashboard's files from this directory instead of the copy built into the
    /// binary (for working on web/).
    #[arg(long, env = "MEDSPLIT_WEB_DIR")]
    web_dir: Option<PathBuf>,
    /// Behind a reverse proxy: the header it puts the client's address in (e.g.
    /// X-Forwarded-For; its last address is used), for throttling failed log-ins per address.
    /// Set it only when every request comes through that proxy.
    #[arg(long, env = "MEDSPLIT_CLIENT_ADDRESS_HEADER")]
    client_address_header: Option<axum::http::HeaderName>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    medsplit_coordinator::init_logging(&cli.log_format);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(try_main(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once (a cause whose message its error already
/// includes, as sqlx's and io's do, is left out).
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let message = cause.to_string();
        if !out.contains(&message) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&message);
        }
    }
    out
}

async fn try_main(cli: Cli) -> anyhow::Result<()> {
    let url = cli
        .database_url
        .context("no database: pass --database-url or set DATABASE_URL")?;
    match cli.command {
        Command::CreateAdmin { email } => create_admin(&url, &email).await,
        Command::Serve(args) => serve(&url, *args).await,
    }
}

async fn create_admin(url: &str, email: &str) -> anyhow::Result<()> {
    let password = match std::env::var("MEDSPLIT_ADMIN_PASSWORD") {
        Ok(p) => p,
        Err(_) => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    let db = medsplit_coordinator::connect(url).await?;
    let id = medsplit_coordinator::create_admin(&db, email, &password).await?;
    println!("platform admin {email} created (user {id})");
    Ok(())
}

/// Where this replica is, as the `replicas` table shows it: the listening address, with the
/// host's name in place of an unspecified IP (each container of a replicated service listens on
/// 0.0.0.0:8080; their host names tell them apart).
fn replica_address(scheme: &str, addr: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| addr.ip().is_unspecified() && !h.is_empty());
    match host {
        Some(host) => format!("{scheme}://{host}:{}", addr.port()),
        None => format!("{scheme}://{addr}"),
    }
}

async fn serve(url: &str, args: Serve) -> anyhow::Result<()> {
    let keys = auth::Keys::from_file(&args.jwt_key_file)?;
    let db: db::Db = medsplit_coordinator::connect(url)
        .await
        .context("connecting to Postgres and running migrations")?;
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let settings = Settings {
        public_url: args
            .public_url
            .unwrap_or_else(|| format!("{scheme}://{addr}")),
        lease: Duration::from_secs(args.lease_seconds.max(1)),
        replica_timeout: Duration::from_secs(args.replica_timeout_seconds.max(1)),
        retention: retention(args.retention_days)?,
        max_message_bytes: args.max_message_bytes,
        web_dir: args.web_dir,
        client_address_header: args.client_address_header,
        ..Settings::default()
    };
    let state = AppState::register(db, keys, settings, &replica_address(scheme, addr)).await?;
    medsplit_coordinator::recover(&state).await?;
    medsplit_coordinator::spawn_background(&state);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(medsplit_coordinator::tls_config(cert, key)?),
        _ => None,
    };
    let app = medsplit_coordinator::create_app(state.clone());
    let handle = axum_server::Handle::new();
    let drain = Duration::from_secs(args.drain_seconds);
    tokio::spawn({
        let handle = handle.clone();
        let state = state.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down: draining training sessions");
            medsplit_coordinator::drain(&state, drain).await;
            handle.graceful_shutdown(Some(Duration::from_secs(5)));
        }
    });
    println!("medsplit-coordinator listening on {scheme}://{addr}");
    tracing::info!(%addr, scheme, "listening");
    // The peer's address reaches the handlers (log-in throttling per client address).
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    // Training steps are small request/response exchanges: send every frame at once.
    let nodelay = axum_server::accept::NoDelayAcceptor::new();
    match tls {
        Some(config) => {
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(config).acceptor(nodelay);
            axum_server::from_tcp(listener)
                .acceptor(acceptor)
                .handle(handle)
                .serve(service)
                .await?
        }
        None => {
            axum_server::from_tcp(listener)
                .acceptor(nodelay)
                .handle(handle)
                .serve(service)
                .await?
        }
    }
    Ok(())
}

fn retention(days: Option<f64>) -> anyhow::Result<Option<Duration>> {
    match days {
        None => Ok(None),
        Some(d) if d.is_finite() && d > 0.0 && d <= 36_500.0 => {
            Ok(Some(Duration::from_secs_f64(d * 86_400.0)))
        }
        Some(d) => anyhow::bail!("--retention-days must be more than 0 and at most 36500, got {d}"),
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
