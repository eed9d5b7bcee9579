//! The coordinator as the agent sees it: REST calls with a short-lived token obtained from the
//! long-lived credential, and the WebSocket training session.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use medsplit_engine::api::{ClientRelease, ModelRelease, VisitAssignment};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::AgentError;

/// How often an agent heartbeats: well inside the coordinator's lease (30 s by default).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open training session.
pub type Session = WebSocketStream<Box<dyn Io>>;

/// Connection settings shared by REST and WebSocket: base URL and trusted roots.
#[derive(Clone)]
pub struct Endpoint {
    base: Url,
    http: reqwest::Client,
    tls: Arc<rustls::ClientConfig>,
}

impl Endpoint {
    /// `ca_cert`: a PEM file of extra roots to trust (a private CA); the public web roots are
    /// always trusted.
    pub fn new(base: &str, ca_cert: Option<&Path>) -> Result<Self, AgentError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = Url::parse(base)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| {
                AgentError::Config(format!(
                    "coordinator URL {base:?} is not http(s)://host[:port]"
                ))
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .user_agent(concat!("medsplit-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path)
                .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert =
                    cert.map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
            }
            http = http.add_root_certificate(
                reqwest::Certificate::from_pem(&pem)
                    .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?,
            );
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            base,
            http: http.build().map_err(AgentError::Http)?,
            tls: Arc::new(tls),
        })
    }

    fn url(&self, path: &str) -> Url {
        self.base.join(path).expect("relative API path")
    }

    pub fn base(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

/// Turns a non-success response into [`AgentError::Status`] with the coordinator's message.
async fn check(resp: reqwest::Response) -> Result<reqwest::Response, AgentError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let message = resp
        .json::<ErrorBody>()
        .await
        .map(|b| b.error)
        .unwrap_or_else(|_| status.canonical_reason().unwrap_or("").to_string());
    Err(AgentError::Status {
        status: status.as_u16(),
        message,
    })
}

#[derive(Serialize)]
struct EnrolRequest<'a> {
    token: &'a str,
    name: &'a str,
    public_key: &'a str,
    version: &'a str,
}

#[derive(Deserialize)]
pub struct Enrolled {
    pub agent_id: i64,
    pub hospital_id: i64,
    pub credential: String,
}

/// Redeems a one-time enrolment token.
pub async fn enrol(
    endpoint: &Endpoint,
    token: &str,
    name: &str,
    public_key: &str,
) -> Result<Enrolled, AgentError> {
    let resp = endpoint
        .http
        .post(endpoint.url("/v1/agents/enrol"))
        .json(&EnrolRequest {
            token,
            name,
            public_key,
            version: env!("CARGO_PKG_VERSION"),
        })
        .send()
        .await?;
    Ok(check(resp).await?.json().await?)
}

/// The coordinator, authenticated as one agent.
pub struct Coordinator {
    endpoint: Endpoint,
    credential: String,
    token: Mutex<Option<(String, Instant)>>,
}

#[derive(Deserialize)]
struct AgentToken {
    token: String,
    expires_in: u64,
}

impl Coordinator {
    pub fn new(endpoint: Endpoint, credential: String) -> Self {
        Self {
            endpoint,
            credential,
            token: Mutex::new(None),
        }
    }

    /// A valid short-lived token, fetched again a minute before it expires.
    async fn token(&self) -> Result<String, AgentError> {
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref()
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let resp = self
            .endpoint
            .http
            .post(self.endpoint.url("/v1/agents/token"))
            .json(&serde_json::json!({ "credential": self.credential }))
            .send()
            .await?;
        let t: AgentToken = match check(resp).await {
            Err(AgentError::Status { status: 401, .. }) => return Err(AgentError::Revoked),
            r => r?.json().await?,
        };
        let until = Instant::now() + Duration::from_secs(t.expires_in.saturating_sub(60).max(1));
        *cached = Some((t.token.clone(), until));
        Ok(t.token)
    }

    async fn post<T: Serialize>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<reqwest::Response, AgentError> {
        self.send(reqwest::Method::POST, path, body).await
    }

    async fn send<T: Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &T,
    ) -> Result<reqwest::Response, AgentError> {
        let token = self.token().await?;
        let resp = self
            .endpoint
            .http
            .request(method, self.endpoint.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            // The token may have been refused because the agent was revoked: find out.
            *self.token.lock().await = None;
            self.token().await?;
        }
        check(resp).await
    }

    async fn get(&self, path: &str) -> Result<reqwest::Response, AgentError> {
        let token = self.token().await?;
        let resp = self
            .endpoint
            .http
            .get(self.endpoint.url(path))
            .bearer_auth(token)
            .send()
            .await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            *self.token.lock().await = None;
            self.token().await?;
        }
        check(resp).await
    }

    /// A job of this agent's hospital as the coordinator describes it (for its admin to
    /// approve at the agent).
    pub async fn job(&self, job: i64) -> Result<crate::approvals::JobToApprove, AgentError> {
        Ok(self.get(&format!("/v1/jobs/{job}")).await?.json().await?)
    }

    /// A finished job's client layers, sealed to this agent.
    pub async fn client_release(&self, job: i64) -> Result<ClientRelease, AgentError> {
        Ok(self
            .get(&format!("/v1/jobs/{job}/model/client"))
            .await?
            .json()
            .await?)
    }

    /// A finished job's server layer and record, when its release policy lets this agent
    /// export it (the coordinator records the export).
    pub async fn model_release(&self, job: i64) -> Result<ModelRelease, AgentError> {
        Ok(self
            .get(&format!("/v1/jobs/{job}/model"))
            .await?
            .json()
            .await?)
    }

    /// Tells the coordinator how many beats the hospital has for training and testing (under the
    /// default cut), from which it projects each job's ε before consent.
    pub async fn report_data(&self, train: usize, test: usize) -> Result<(), AgentError> {
        let body = serde_json::json!({ "train_samples": train, "test_samples": test });
        self.send(reqwest::Method::PUT, "/v1/agent/data", &body)
            .await
            .map(|_| ())
    }

    /// Claims a visit, waiting up to `wait` for one to be queued.
    pub async fn claim(&self, wait: Duration) -> Result<Option<VisitAssignment>, AgentError> {
        let path = format!("/v1/agent/claim?wait={}", wait.as_secs());
        let resp = self.post(&path, &serde_json::json!({})).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Ok(Some(resp.json().await?))
    }

    /// Reports the agent alive and extends the lease of `visit` (id, attempt); false if the
    /// attempt no longer holds the visit.
    pub async fn heartbeat(&self, visit: Option<(i64, i32)>) -> Result<bool, AgentError> {
        let body = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "visit_id": visit.map(|v| v.0),
            "attempt": visit.map(|v| v.1),
        });
        match self.post("/v1/agent/heartbeat", &body).await {
            Ok(_) => Ok(true),
            Err(AgentError::Status { status: 409, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Keeps the lease of `visit` (id, attempt) with a heartbeat every [`HEARTBEAT_INTERVAL`]
    /// until the returned task is aborted, for tools that drive a visit themselves (the
    /// benchmark, the load generator); the daemon's own loop also watches for fencing.
    pub fn keep_lease(self: &Arc<Self>, visit: (i64, i32)) -> tokio::task::JoinHandle<()> {
        let coordinator = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT_INTERVAL).await;
                if let Err(e) = coordinator.heartbeat(Some(visit)).await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
        })
    }

    /// Gives a visit back (it will be retried). The coordinator refuses control characters in
    /// any text, so those of the reason (line breaks of an error chain) become spaces.
    pub async fn release(&self, visit: i64, attempt: i32, reason: &str) -> Result<(), AgentError> {
        self.give_back(visit, attempt, reason, false).await
    }

    /// Refuses a visit that this hospital's data cannot serve: given back for good (no retry;
    /// the job's failure policy applies), with the reason for the researcher.
    pub async fn refuse(&self, visit: i64, attempt: i32, reason: &str) -> Result<(), AgentError> {
        self.give_back(visit, attempt, reason, true).await
    }

    async fn give_back(
        &self,
        visit: i64,
        attempt: i32,
        reason: &str,
        refused: bool,
    ) -> Result<(), AgentError> {
        let reason: String = reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let body = serde_json::json!({ "attempt": attempt, "reason": reason, "refused": refused });
        match self
            .post(&format!("/v1/visits/{visit}/release"), &body)
            .await
        {
            Ok(_) | Err(AgentError::Status { status: 409, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Opens the training session of a claimed visit.
    pub async fn session(&self, visit: i64, attempt: i32) -> Result<Session, AgentError> {
        let mut url = self.endpoint.url(&format!("/v1/visits/{visit}/session"));
        url.query_pairs_mut()
            .append_pair("attempt", &attempt.to_string());
        self.websocket(url).await
    }

    /// Opens a private-inference session on a finished job's model: the coordinator applies the
    /// job's server layer to the encrypted activations sent on it.
    pub async fn inference_session(&self, job: i64) -> Result<Session, AgentError> {
        self.websocket(self.endpoint.url(&format!("/v1/jobs/{job}/inference")))
            .await
    }

    async fn websocket(&self, mut url: Url) -> Result<Session, AgentError> {
        let token = self.token().await?;
        let tls = url.scheme() == "https";
        url.set_scheme(if tls { "wss" } else { "ws" })
            .expect("ws schemes are valid");
        let host = url.host_str().unwrap_or_default().to_string();
        let port = url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| AgentError::Session(e.to_string()))?;
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .expect("token is a valid header value"),
        );
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| AgentError::Session(format!("connecting to {host}:{port}: {e}")))?;
        tcp.set_nodelay(true).ok();
        let stream: Box<dyn Io> = if tls {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| AgentError::Session(e.to_string()))?;
            let connector = tokio_rustls::TlsConnector::from(self.endpoint.tls.clone());
            Box::new(
                connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| AgentError::Session(format!("TLS: {e}")))?,
            )
        } else {
            Box::new(tcp)
        };
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(64 << 20));
        match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let message = resp
                    .body()
                    .as_ref()
                    .and_then(|b| serde_json::from_slice::<ErrorBody>(b).ok())
                    .map(|b| b.error)
                    .unwrap_or_default();
                Err(AgentError::Status {
                    status: resp.status().as_u16(),
                    message,
                })
            }
            Err(e) => Err(AgentError::Session(e.to_string())),
        }
    }
}
