//! Running the platform on one machine (the demo and the benchmarks): a Postgres to use, and a
//! small JSON REST caller.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::process::Command;

/// A REST caller with an optional bearer token; errors carry the coordinator's message.
#[derive(Clone)]
pub struct Rest {
    pub base: String,
    http: reqwest::Client,
    pub token: Option<String>,
}

impl Rest {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            token: None,
        }
    }

    pub fn with_token(self, token: String) -> Self {
        Self {
            token: Some(token),
            ..self
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.parse()?, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the coordinator at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            let field = value["field"]
                .as_str()
                .map(|f| format!(" (field {f})"))
                .unwrap_or_default();
            bail!(
                "{method} {path}: {status}: {}{field}",
                value["error"].as_str().unwrap_or(&text)
            );
        }
        Ok(value)
    }

    pub async fn login(&self, email: &str, password: &str) -> anyhow::Result<Rest> {
        let v = self
            .call(
                "POST",
                "/v1/auth/login",
                Some(json!({ "email": email, "password": password })),
            )
            .await?;
        Ok(self
            .clone()
            .with_token(v["token"].as_str().unwrap_or_default().to_string()))
    }
}

/// A database for one run: a fresh database on `DATABASE_URL`'s server, or a private cluster.
pub struct Postgres {
    pub url: String,
    admin_url: Option<(String, String)>,
    cluster: Option<(PathBuf, PathBuf, Option<String>)>,
}

impl Postgres {
    pub async fn start(dir: &Path) -> anyhow::Result<Postgres> {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            let name = format!("medsplit_run_{}", std::process::id());
            let (server, _) = url
                .split_once('?')
                .map(|(a, _)| a)
                .unwrap_or(&url)
                .rsplit_once('/')
                .context("DATABASE_URL has no database name")?;
            let pool = sqlx::PgPool::connect(&url)
                .await
                .context("connecting to DATABASE_URL")?;
            sqlx::query(&format!("drop database if exists {name}"))
                .execute(&pool)
                .await?;
            sqlx::query(&format!("create database {name}"))
                .execute(&pool)
                .await?;
            pool.close().await;
            eprintln!("database {name} on DATABASE_URL's server");
            return Ok(Postgres {
                url: format!("{server}/{name}"),
                admin_url: Some((url.clone(), name)),
                cluster: None,
            });
        }
        let bindir = postgres_bindir().context(
            "no DATABASE_URL and no PostgreSQL server binaries found: install them \
             (Debian/Ubuntu: apt install postgresql) or set DATABASE_URL",
        )?;
        let data = dir.join("pg");
        std::fs::create_dir_all(&data)?;
        // SAFETY: geteuid(2) cannot fail and touches no memory.
        let owner = if unsafe { libc::geteuid() } == 0 {
            // initdb refuses to run as root.
            let user = if Command::new("id")
                .arg("-u")
                .arg("postgres")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await?
                .success()
            {
                "postgres"
            } else {
                "nobody"
            };
            let ok = Command::new("chown")
                .args(["-R", user])
                .arg(&data)
                .status()
                .await?;
            if !ok.success() {
                bail!("cannot hand {} to {user}", data.display());
            }
            Some(user.to_string())
        } else {
            None
        };
        let run = |bin: &str| {
            let mut c = match &owner {
                Some(u) => {
                    let mut c = Command::new("runuser");
                    c.args(["-u", u, "--"]).arg(bindir.join(bin));
                    c
                }
                None => Command::new(bindir.join(bin)),
            };
            c.stdout(Stdio::null()).stderr(Stdio::piped());
            c
        };
        let out = run("initdb")
            .arg("-D")
            .arg(data.join("db"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .output()
            .await?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let out = run("pg_ctl")
            .arg("-D")
            .arg(data.join("db"))
            .arg("-l")
            .arg(data.join("server.log"))
            .arg("-w")
            .arg("-o")
            .arg(format!(
                "-c listen_addresses=127.0.0.1 -p {port} -k {}",
                data.display()
            ))
            .arg("start")
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "starting PostgreSQL failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        eprintln!(
            "private PostgreSQL on 127.0.0.1:{port} ({})",
            bindir.display()
        );
        Ok(Postgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            admin_url: None,
            cluster: Some((bindir, data.join("db"), owner)),
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some((bindir, data, owner)) = &self.cluster {
            let mut c = match owner {
                Some(u) => {
                    let mut c = std::process::Command::new("runuser");
                    c.args(["-u", u, "--"]).arg(bindir.join("pg_ctl"));
                    c
                }
                None => std::process::Command::new(bindir.join("pg_ctl")),
            };
            let _ = c
                .arg("-D")
                .arg(data)
                .args(["-m", "fast", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some((url, name)) = &self.admin_url {
            let url = url.clone();
            let name = name.clone();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let pool = sqlx::PgPool::connect(&url).await.ok()?;
                    sqlx::query(&format!("drop database if exists {name} with (force)"))
                        .execute(&pool)
                        .await
                        .ok()
                })
            })
            .join();
        }
    }
}

fn postgres_bindir() -> Option<PathBuf> {
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("initdb").exists())
        .collect();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

/// As a platform admin: creates hospital `name`, a user `role` (with the hospital for a
/// hospital admin) with email `email`, and logs that user in.
pub async fn create_user(
    admin: &Rest,
    email: &str,
    password: &str,
    role: &str,
    hospital_id: Option<i64>,
) -> anyhow::Result<Rest> {
    admin
        .call(
            "POST",
            "/v1/users",
            Some(json!({ "email": email, "password": password, "role": role, "hospital_id": hospital_id })),
        )
        .await?;
    Rest::new(&admin.base).login(email, password).await
}

/// As a platform admin: creates hospital `name` and its admin `admin@{name}.local`; returns the
/// hospital admin's session.
pub async fn hospital_with_admin(admin: &Rest, name: &str, password: &str) -> anyhow::Result<Rest> {
    let h = admin
        .call("POST", "/v1/hospitals", Some(json!({ "name": name })))
        .await?;
    let email = format!("admin@{name}.local");
    create_user(admin, &email, password, "hospital_admin", h["id"].as_i64()).await
}

/// A fresh enrolment token of the hospital admin's hospital.
pub async fn enrolment_token(hospital_admin: &Rest) -> anyhow::Result<String> {
    let t = hospital_admin
        .call("POST", "/v1/enrolment-tokens", Some(json!({})))
        .await?;
    Ok(t["token"].as_str().unwrap_or_default().to_string())
}

/// Enrols an agent in this process (for benchmarks): its coordinator client and identity key.
pub async fn enrol_in_process(
    url: &str,
    hospital_admin: &Rest,
    name: &str,
) -> anyhow::Result<(medsplit_agent::client::Coordinator, crypto_box::SecretKey)> {
    use base64::Engine;
    let token = enrolment_token(hospital_admin).await?;
    let endpoint = medsplit_agent::client::Endpoint::new(url, None)?;
    let key = medsplit_agent::state::new_key();
    let public = base64::engine::general_purpose::STANDARD.encode(key.public_key().as_bytes());
    let enrolled = medsplit_agent::client::enrol(&endpoint, &token, name, &public).await?;
    Ok((
        medsplit_agent::client::Coordinator::new(endpoint, enrolled.credential),
        key,
    ))
}

/// Writes a new file readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| path.display().to_string())?;
    std::io::Write::write_all(&mut f, bytes)?;
    Ok(())
}
