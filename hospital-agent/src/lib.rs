//! The MedSplit hospital agent: holds the hospital's data, the client-side layers, the labels,
//! the loss and a per-visit HE secret key; claims visits from the coordinator and trains them.
//! Only ciphertexts, aggregate measurements and sealed weights leave it.

pub mod approvals;
pub mod client;
pub mod config;
pub mod daemon;
pub mod inference;
pub mod model_dir;
pub mod peers;
pub mod policy;
pub mod predict;
pub mod privacy;
pub mod release;
pub mod seal;
pub mod state;
pub mod visit;

pub use medsplit_engine::protocol::ClientSession;

use std::path::Path;

use base64::Engine;
use medsplit_engine::data::DataError;
use medsplit_engine::protocol::ProtocolError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Wfdb(#[from] medsplit_engine::wfdb::WfdbError),
    /// The hospital's data cannot give what a job asks (its preprocessing or label set): the
    /// visit is refused with this reason, other jobs go on.
    #[error("this hospital's data cannot give what the job asks: {0}")]
    Unsupported(String),
    /// The visit would take the hospital past its privacy budget: refused before any step.
    #[error("refused by the hospital's privacy budget: {0}")]
    OverBudget(String),
    /// The hospital's policy (agent.toml `[policy]`) does not allow the job: refused before any
    /// data is read.
    #[error("refused by the hospital's policy: {0}")]
    Policy(String),
    /// The assignment gives an agent another public key than the one pinned for it (or this
    /// agent a key not its own): refused before any data is read.
    #[error("refused: a public key changed: {0}")]
    KeyChanged(String),
    /// The assignment hands over older client weights than this agent has already had of the
    /// job (or none): refused before any data is read.
    #[error("refused: the coordinator rolls the job back: {0}")]
    Rollback(String),
    #[error("coordinator unreachable: {0}")]
    Http(#[from] reqwest::Error),
    #[error("enrolment refused: {0}")]
    Enrolment(Box<AgentError>),
    #[error("coordinator answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("this agent's credential was refused: it has been revoked (or its hospital disabled)")]
    Revoked,
    #[error("training session: {0}")]
    Session(String),
    #[error("the coordinator closed the session ({code}): {reason}")]
    Closed { code: u16, reason: String },
    #[error("the visit was taken from this attempt (lease lost or job cancelled)")]
    Fenced,
    #[error("shutting down")]
    Shutdown,
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Seal(#[from] seal::SealError),
}

impl AgentError {
    /// Errors that retrying cannot fix: the daemon stops on them.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Revoked | Self::Config(_) | Self::State(_))
    }
}

/// Enrols this machine's agent: makes sure `state_dir` can hold the state (so that a token is
/// never spent on a directory that cannot), redeems the one-time `token` for a new identity
/// key, and writes the state.
pub async fn enrol(
    endpoint: &client::Endpoint,
    token: &str,
    name: &str,
    state_dir: &Path,
) -> Result<state::Identity, AgentError> {
    state::prepare(state_dir)?;
    let key = state::new_key();
    let public = base64::engine::general_purpose::STANDARD.encode(key.public_key().as_bytes());
    let enrolled = client::enrol(endpoint, token, name, &public)
        .await
        .map_err(|e| AgentError::Enrolment(Box::new(e)))?;
    let identity = state::Identity {
        coordinator: endpoint.base().to_string(),
        agent_id: enrolled.agent_id,
        hospital_id: enrolled.hospital_id,
        credential: enrolled.credential,
    };
    state::save(state_dir, &identity, &key)?;
    Ok(identity)
}
