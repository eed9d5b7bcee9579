//! JSON bodies that the coordinator, the hospital agents and the `medsplit` CLI exchange over
//! REST, and the control frames of a training session (text frames beside the binary
//! [`wire`](crate::wire) messages). Byte strings travel as standard base64.

use serde::{Deserialize, Serialize};

use crate::metrics::{Confusion, EvalKind, MetricsError};
use crate::model::{ModelConfig, ServerOptimizer};

/// The model a job trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelName {
    /// M1, cut width 256.
    #[default]
    M1,
    /// M1 with 16 channels in the second block, cut width 512.
    M1Wide,
}

impl ModelName {
    pub fn config(self) -> ModelConfig {
        match self {
            Self::M1 => ModelConfig::m1(),
            Self::M1Wide => ModelConfig::m1_wide(),
        }
    }
}

/// What happens when a visit has failed `max_attempts` times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Leave that hospital out of this round and go on with the next one.
    #[default]
    Skip,
    /// Fail the whole job.
    Fail,
}

/// A researcher's training job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    #[serde(default)]
    pub model: ModelName,
    /// Hospital names, in the order every round visits them.
    pub hospitals: Vec<String>,
    #[serde(default = "one")]
    pub rounds: u32,
    /// Passes over the hospital's training split per visit.
    #[serde(default = "one")]
    pub local_epochs: u32,
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    /// Test accuracy is measured every `eval_every` rounds (and after the last round).
    #[serde(default = "one")]
    pub eval_every: u32,
    /// Seeds the initial weights and the data order.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub server_optimizer: ServerOptimizer,
    /// Activations and gradients in the clear: for debugging only. HE is on unless this is true.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Attempts a visit gets before `on_failure` applies.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    #[serde(default)]
    pub on_failure: FailurePolicy,
}

fn one() -> u32 {
    1
}
fn default_batch() -> u32 {
    4
}
fn default_attempts() -> u32 {
    3
}

/// A rejected field: the path of the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl JobSpec {
    /// The whole-number fields and their allowed ranges (inclusive). The dashboard's job form
    /// checks the same ranges (`web/app.js`, `INT_FIELDS`; a test compares them).
    pub const RANGES: [(&'static str, u32, u32); 5] = [
        ("rounds", 1, 1000),
        ("local_epochs", 1, 100),
        ("batch_size", 1, 256),
        ("eval_every", 1, 1000),
        ("max_attempts", 1, 20),
    ];

    /// Checks every field's range; the first problem found is returned.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err(FieldError::new("name", "must be 1 to 200 characters"));
        }
        if self.hospitals.is_empty() || self.hospitals.len() > 64 {
            return Err(FieldError::new("hospitals", "must name 1 to 64 hospitals"));
        }
        for (i, h) in self.hospitals.iter().enumerate() {
            if self.hospitals[..i].contains(h) {
                return Err(FieldError::new(
                    format!("hospitals[{i}]"),
                    format!("{h:?} is named twice"),
                ));
            }
        }
        let values = [
            self.rounds,
            self.local_epochs,
            self.batch_size,
            self.eval_every,
            self.max_attempts,
        ];
        for ((field, lo, hi), value) in Self::RANGES.into_iter().zip(values) {
            if !(lo..=hi).contains(&value) {
                return Err(FieldError::new(
                    field,
                    format!("must be between {lo} and {hi}, got {value}"),
                ));
            }
        }
        let lr = self.server_optimizer.lr();
        if !(lr.is_finite() && lr > 0.0 && lr <= 1.0) {
            return Err(FieldError::new(
                "server_optimizer.lr",
                format!("must be in (0, 1], got {lr}"),
            ));
        }
        Ok(())
    }

    /// Whether the visits of `round` (0-based) end with a test-accuracy measurement.
    pub fn evaluates(&self, round: u32) -> bool {
        (round + 1).is_multiple_of(self.eval_every) || round + 1 == self.rounds
    }
}

/// A visit an agent has claimed: everything it needs to train it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VisitAssignment {
    pub visit_id: i64,
    /// Fencing token: every later call about this visit carries it.
    pub attempt: i32,
    pub job_id: i64,
    pub round: u32,
    pub position: u32,
    pub spec: JobSpec,
    /// The client weights left by the last completed visit, sealed to this agent; `None` on
    /// the job's first visit (the weights are then drawn from `spec.seed`).
    pub handoff: Option<Handoff>,
    /// The agents the weights are sealed to at the end of the visit.
    pub recipients: Vec<Recipient>,
    /// Seconds the lease lasts without a heartbeat.
    pub lease_seconds: u32,
}

/// Client weights sealed by one agent to another.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Handoff {
    pub from_visit_id: i64,
    pub sender_agent_id: i64,
    /// The sender's X25519 public key (base64).
    pub sender_public_key: String,
    /// `nonce ‖ ciphertext` (base64).
    pub sealed: String,
}

/// An agent the next weights are sealed to.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Recipient {
    pub agent_id: i64,
    /// X25519 public key (base64).
    pub public_key: String,
}

/// Sealed weights for one recipient.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SealedCopy {
    pub recipient_agent_id: i64,
    /// `nonce ‖ ciphertext` (base64).
    pub sealed: String,
}

/// Text frames the agent sends during a training session.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentFrame {
    /// How far the visit has got.
    Progress {
        epoch: u32,
        epochs: u32,
        samples_done: u64,
        samples_total: u64,
    },
    /// The visit is done: its measurements and the sealed client weights.
    Complete(VisitReport),
}

/// What the agent measured during a visit (never per-sample values).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VisitReport {
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub train_samples: u64,
    pub test_accuracy: Option<f64>,
    pub test_samples: u64,
    /// The counts behind `test_accuracy`: present exactly when it is.
    #[serde(default)]
    pub test_evaluation: Option<TestEvaluation>,
    pub sealed: Vec<SealedCopy>,
}

/// A test-set measurement as counts: the confusion matrix of the hospital's held-out beats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestEvaluation {
    /// Which kind of split the test set came from.
    pub kind: EvalKind,
    /// Class names, in the order of the matrix's rows and columns.
    pub classes: Vec<String>,
    /// Beats by true class (rows) and predicted class (columns); they sum to `test_samples`.
    pub confusion: Vec<Vec<u64>>,
}

impl TestEvaluation {
    pub fn new(kind: EvalKind, confusion: &Confusion) -> Self {
        Self {
            kind,
            classes: confusion.classes().to_vec(),
            confusion: confusion.rows(),
        }
    }

    /// The matrix, checked: square, one row per class, valid class names.
    pub fn confusion(&self) -> Result<Confusion, MetricsError> {
        Confusion::from_counts(self.classes.clone(), &self.confusion)
    }
}

/// Text frames the coordinator sends during a training session.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CoordinatorFrame {
    /// The visit is recorded and the server layer checkpointed.
    Completed,
}

/// Close codes of a training session.
pub mod close {
    /// A frame could not be decoded or did not fit the protocol.
    pub const BAD_MESSAGE: u16 = 4400;
    /// The agent was revoked.
    pub const REVOKED: u16 = 4403;
    /// The visit is no longer this attempt's: lease expired, job cancelled or finished.
    pub const FENCED: u16 = 4409;
    /// The coordinator is shutting down; the visit will be retried.
    pub const SHUTDOWN: u16 = 1001;
}
