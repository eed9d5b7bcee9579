//! Settings of a running coordinator (the flags of `medsplit-coordinator serve`).

use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Settings {
    /// Base URL agents and browsers use, e.g. `https://medsplit.example.org`.
    pub public_url: String,
    /// A visit's lease: an agent that sends no heartbeat for this long loses the visit.
    pub lease: Duration,
    /// How often expired leases, visits of replicas that are gone, and open sessions whose
    /// visit was taken away are looked for.
    pub sweep_interval: Duration,
    /// A replica that has not recorded a heartbeat for this long is gone: any other replica
    /// re-queues the visits whose sessions it hosted. It beats three times per period.
    pub replica_timeout: Duration,
    /// Claims wait this long for work before polling the database again (fallback for
    /// missed notifications).
    pub poll_interval: Duration,
    /// Finished jobs' events and per-message-kind counts are deleted this long after the job
    /// ended (kept forever when `None`).
    pub retention: Option<Duration>,
    /// Largest training-session frame accepted.
    pub max_message_bytes: usize,
    /// How long an enrolment token stays valid.
    pub enrolment_ttl: Duration,
    /// Serve the dashboard from this directory instead of the copy built into the binary
    /// (for working on `web/` without rebuilding).
    pub web_dir: Option<PathBuf>,
    /// Failed log-ins allowed per account (e-mail address) before a lockout.
    pub login_per_account: crate::throttle::Limit,
    /// Failed log-ins allowed per client address before a lockout.
    pub login_per_address: crate::throttle::Limit,
    /// Behind a reverse proxy: the request header that names the client's address (the last
    /// address in it is used, the one the proxy added). Without it, the peer's address.
    pub client_address_header: Option<axum::http::HeaderName>,
}

impl Settings {
    /// Session cookies are marked `Secure` when browsers reach the coordinator over HTTPS.
    pub fn secure_cookies(&self) -> bool {
        self.public_url.starts_with("https://")
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            public_url: "http://127.0.0.1:8080".into(),
            lease: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(1),
            replica_timeout: Duration::from_secs(3),
            poll_interval: Duration::from_secs(5),
            retention: None,
            max_message_bytes: 16 << 20,
            enrolment_ttl: Duration::from_secs(24 * 3600),
            web_dir: None,
            login_per_account: crate::throttle::Limit {
                burst: 5,
                period: Duration::from_secs(60),
            },
            login_per_address: crate::throttle::Limit {
                burst: 20,
                period: Duration::from_secs(6),
            },
            client_address_header: None,
        }
    }
}
