//! A real coordinator process on loopback over a fresh database, and in-process agents.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use medsplit_agent::client::{self, Coordinator, Endpoint};
use medsplit_agent::config::{Config, LocalData, Source, Split};
use medsplit_agent::daemon::Datasets;
use medsplit_agent::state::{AgentState, Identity};
use medsplit_engine::preprocess::{LabelSet, Preprocessing};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

pub const PASSWORD: &str = "correct horse battery staple";

/// The URL of the database a `#[sqlx::test]` pool points at.
pub async fn database_url(pool: &PgPool) -> String {
    let name: String = sqlx::query_scalar("select current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let (server, _) = base.rsplit_once('/').expect("URL with a database name");
    format!("{server}/{name}")
}

pub struct Server {
    pub child: Child,
    pub url: String,
    pub db_url: String,
    pub dir: PathBuf,
    pub port: u16,
    /// The flags it was started with, beyond the address, lease and key.
    pub extra: Vec<String>,
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "medsplit-test-{tag}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

impl Server {
    /// Starts `medsplit-coordinator serve` (port 0 unless `port` is given).
    pub async fn start(db_url: &str, port: u16, extra: &[&str]) -> Server {
        let dir = temp_dir("coordinator");
        Self::start_in(dir, db_url, port, extra).await
    }

    async fn start_in(dir: PathBuf, db_url: &str, port: u16, extra: &[&str]) -> Server {
        use std::os::unix::fs::OpenOptionsExt;
        let key = dir.join("jwt.key");
        if !key.exists() {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&key)
                .unwrap();
            std::io::Write::write_all(&mut f, b"test-signing-key-0123456789abcdef0123456789")
                .unwrap();
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_medsplit-coordinator"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(if extra.contains(&"--lease-seconds") {
                &[][..]
            } else {
                &["--lease-seconds", "4"][..]
            })
            .arg("--jwt-key-file")
            .arg(&key)
            .args(extra)
            .env("DATABASE_URL", db_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("coordinator started in time")
            .unwrap()
            .expect("coordinator printed its address");
        let url = line.rsplit(' ').next().unwrap().to_string();
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server {
            child,
            url,
            db_url: db_url.to_string(),
            dir,
            port,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// SIGKILL, then a new process on the same port, database and flags.
    pub async fn kill_and_restart(&mut self) {
        self.kill().await;
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let next = Self::start_in(self.dir.clone(), &self.db_url, self.port, &extra).await;
        *self = next;
    }

    /// SIGKILL, waiting for the process to go.
    pub async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// SIGTERM (a graceful shutdown), waiting up to `limit` for the process to exit.
    pub async fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running").to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("the coordinator exited in time")
            .unwrap()
    }

    pub fn api(&self) -> Api {
        Api {
            base: self.url.clone(),
            http: reqwest::Client::new(),
            token: None,
        }
    }
}

/// A REST caller.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
    pub token: Option<String>,
}

impl Api {
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(body)).await
    }

    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        v
    }

    pub async fn login(&self, email: &str) -> Api {
        let v = self
            .ok(
                "POST",
                "/v1/auth/login",
                Some(json!({ "email": email, "password": PASSWORD })),
            )
            .await;
        Api {
            token: Some(v["token"].as_str().unwrap().to_string()),
            ..self.clone()
        }
    }
}

/// A platform with an admin, `n` hospitals (h0, h1, …) each with an admin (admin-h0@…), and a
/// researcher.
pub struct Platform {
    pub server: Server,
    pub admin: Api,
    pub researcher: Api,
    pub hospital_admins: Vec<Api>,
    pub hospital_ids: Vec<i64>,
}

impl Platform {
    pub async fn new(pool: &PgPool, hospitals: usize, extra: &[&str]) -> Platform {
        let db_url = database_url(pool).await;
        medsplit_coordinator::create_admin(pool, "admin@example.org", PASSWORD)
            .await
            .unwrap();
        let server = Server::start(&db_url, 0, extra).await;
        let admin = server.api().login("admin@example.org").await;
        let mut hospital_admins = Vec::new();
        let mut hospital_ids = Vec::new();
        for i in 0..hospitals {
            let h = admin
                .ok(
                    "POST",
                    "/v1/hospitals",
                    Some(json!({ "name": format!("h{i}") })),
                )
                .await;
            let id = h["id"].as_i64().unwrap();
            let email = format!("admin-h{i}@example.org");
            admin
                .ok(
                    "POST",
                    "/v1/users",
                    Some(json!({ "email": email, "password": PASSWORD, "role": "hospital_admin", "hospital_id": id })),
                )
                .await;
            hospital_admins.push(server.api().login(&email).await);
            hospital_ids.push(id);
        }
        admin
            .ok(
                "POST",
                "/v1/users",
                Some(json!({ "email": "researcher@example.org", "password": PASSWORD, "role": "researcher" })),
            )
            .await;
        let researcher = server.api().login("researcher@example.org").await;
        Platform {
            server,
            admin,
            researcher,
            hospital_admins,
            hospital_ids,
        }
    }

    /// Enrols an agent of hospital `i` through the real enrolment flow.
    pub async fn enrol(&self, i: usize) -> TestAgent {
        let token = self.hospital_admins[i]
            .ok("POST", "/v1/enrolment-tokens", Some(json!({})))
            .await["token"]
            .as_str()
            .unwrap()
            .to_string();
        let endpoint = Endpoint::new(&self.server.url, None).unwrap();
        let key = medsplit_agent::state::new_key();
        let public = base64::engine::general_purpose::STANDARD.encode(key.public_key().as_bytes());
        let enrolled = client::enrol(&endpoint, &token, &format!("agent-h{i}"), &public)
            .await
            .unwrap();
        TestAgent {
            state: Arc::new(AgentState {
                identity: Identity {
                    coordinator: self.server.url.clone(),
                    agent_id: enrolled.agent_id,
                    hospital_id: enrolled.hospital_id,
                    credential: enrolled.credential,
                },
                secret_key: key,
            }),
            data: Arc::new(synthetic_data(200 + 40 * i, i as u64)),
        }
    }

    /// Submits a job over the named hospitals and has every hospital approve it.
    pub async fn approved_job(&self, spec: Value) -> i64 {
        let job = self
            .researcher
            .ok("POST", "/v1/jobs", Some(spec.clone()))
            .await;
        let id = job["id"].as_i64().unwrap();
        for name in spec["hospitals"].as_array().unwrap() {
            let i: usize = name.as_str().unwrap()[1..].parse().unwrap();
            self.hospital_admins[i]
                .ok(
                    "POST",
                    &format!("/v1/jobs/{id}/consent"),
                    Some(json!({ "decision": "approve" })),
                )
                .await;
        }
        id
    }

    /// Polls the job until it leaves `running`/`pending`.
    pub async fn wait_job(&self, id: i64, limit: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let job = self
                .researcher
                .ok("GET", &format!("/v1/jobs/{id}"), None)
                .await;
            let status = job["status"].as_str().unwrap().to_string();
            if !matches!(status.as_str(), "pending" | "running") {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} did not finish: {job}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A hospital's cohort of 5 synthetic patients with `beats` beats in all, one patient held out
/// for test, cut with the papers' preprocessing and labelled N L R A V (the job spec's shape).
pub fn synthetic_data(beats: usize, seed: u64) -> LocalData {
    Config {
        state_dir: PathBuf::from("/nonexistent"),
        ca_cert: None,
        sources: vec![Source::Synthetic {
            patients: 5,
            beats,
            seed: 100 + seed,
        }],
        split: Split {
            seed,
            ..Split::default()
        },
        shard: None,
        max_epsilon: None,
        policy: Default::default(),
    }
    .load_data(&Preprocessing::papers(), LabelSet::Papers)
    .unwrap()
}

/// The default policy, except that the hospital's consent on the dashboard is enough: the tests
/// of everything else do not approve each job at the agent (tests/policy.rs checks that the
/// default refuses a job that was not).
pub fn trusting() -> medsplit_agent::policy::Policy {
    medsplit_agent::policy::Policy {
        require_approval: false,
        ..Default::default()
    }
}

pub struct TestAgent {
    pub state: Arc<AgentState>,
    pub data: Arc<LocalData>,
}

/// An agent daemon running in this process; dropping `stop` or aborting `task` kills it.
pub struct Running {
    pub task: tokio::task::JoinHandle<Result<(), medsplit_agent::AgentError>>,
    pub stop: watch::Sender<bool>,
}

impl TestAgent {
    pub fn coordinator(&self) -> Coordinator {
        Coordinator::new(
            Endpoint::new(&self.state.identity.coordinator, None).unwrap(),
            self.state.identity.credential.clone(),
        )
    }

    /// The agent's data for any job: `data`, already cut; under [`trusting`].
    pub fn datasets(&self) -> Arc<Datasets> {
        let data = self.data.clone();
        Arc::new(Datasets::with_loader(move |_, _| Ok(data.clone())).with_policy(trusting()))
    }

    pub fn spawn(&self) -> Running {
        self.spawn_with(self.datasets())
    }

    /// Runs the daemon on `data` under `policy` instead of the default one.
    pub fn spawn_under(&self, policy: medsplit_agent::policy::Policy) -> Running {
        let data = self.data.clone();
        self.spawn_with(Arc::new(
            Datasets::with_loader(move |_, _| Ok(data.clone())).with_policy(policy),
        ))
    }

    /// Runs the daemon on `datasets` (e.g. cut from a configuration, per job).
    pub fn spawn_with(&self, datasets: Arc<Datasets>) -> Running {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(medsplit_agent::daemon::run(
            Arc::new(self.coordinator()),
            self.state.clone(),
            datasets,
            rx,
        ));
        Running { task, stop }
    }
}

/// What an in-process daemon logged (its `tracing` events, as text lines).
#[derive(Clone, Default)]
pub struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl TestAgent {
    /// Like [`TestAgent::spawn`], recording what the daemon logs.
    pub fn spawn_logged(&self) -> (Running, Logs) {
        use tracing::instrument::WithSubscriber;
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(
            medsplit_agent::daemon::run(
                Arc::new(self.coordinator()),
                self.state.clone(),
                self.datasets(),
                rx,
            )
            .with_subscriber(subscriber),
        );
        (Running { task, stop }, logs)
    }
}

/// A small job on the papers' label set and preprocessing (those of the synthetic beats).
pub fn spec(hospitals: &[&str], rounds: u32) -> Value {
    json!({
        "name": "test job",
        "labels": "papers",
        "hospitals": hospitals,
        "rounds": rounds,
        "batch_size": 8,
        "local_epochs": 1,
        "seed": 3,
    })
}

impl TestAgent {
    /// The same agent, reaching the coordinator at `url` (a load balancer's, say).
    pub fn through(&self, url: &str) -> TestAgent {
        let identity = Identity {
            coordinator: url.to_string(),
            ..self.state.identity.clone()
        };
        TestAgent {
            state: Arc::new(AgentState {
                identity,
                secret_key: self.state.secret_key.clone(),
            }),
            data: self.data.clone(),
        }
    }
}

/// HAProxy in front of the replicas listening on `replicas`, as deploy/haproxy.cfg configures it
/// (scripts/balancer-deps installs Debian's haproxy); stopped when dropped.
pub async fn balancer(replicas: &[u16]) -> medsplit_balancer::Balancer {
    medsplit_balancer::Balancer::start(&temp_dir("balancer"), replicas)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The first `Some` that `probe` gives, polled every 20 ms; panics naming `what` after `limit`.
pub async fn eventually<T, F>(limit: Duration, what: &str, mut probe: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The details of job `job`'s `visit.requeued` events, oldest first.
pub async fn requeued_events(pool: &PgPool, job: i64) -> Vec<Value> {
    sqlx::query_scalar(
        "select detail from job_events where job_id = $1 and kind = 'visit.requeued' order by id",
    )
    .bind(job)
    .fetch_all(pool)
    .await
    .unwrap()
}
