//! JSON bodies that the coordinator, the hospital agents and the `medsplit` CLI exchange over
//! REST, and the control frames of a training session (text frames beside the binary
//! [`wire`](crate::wire) messages). Byte strings travel as standard base64.

use serde::{Deserialize, Serialize};

use crate::metrics::{Confusion, EvalKind, MetricsError};
use crate::model::{ConvBlock, ModelConfig, ServerOptimizer};
use crate::preprocess::{LabelSet, Preprocessing};

/// A named model: the client's convolution blocks and the optional client tail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelName {
    /// M1: blocks (16, k7, pool 2), (8, k5, pool 2); cut width 256 on 128-sample beats.
    #[default]
    M1,
    /// M1 with 16 channels in the second block, cut width 512.
    M1Wide,
    /// M1's blocks, a 16-wide encrypted server layer and a client tail (LeakyReLU, Linear):
    /// the configuration chosen by patient-wise cross-validation inside DS1 for the
    /// inter-patient task (docs/benchmarks.md).
    M1Tail,
}

impl ModelName {
    pub const ALL: [ModelName; 3] = [Self::M1, Self::M1Wide, Self::M1Tail];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::M1 => "m1",
            Self::M1Wide => "m1_wide",
            Self::M1Tail => "m1_tail",
        }
    }

    /// The shapes on 128-sample beats without side features, 5 classes.
    pub fn config(self) -> ModelConfig {
        self.spec().config(128, 0, 5)
    }

    pub fn spec(self) -> ModelSpec {
        let m1 = ModelConfig::m1();
        let blocks = match self {
            Self::M1Wide => ModelConfig::m1_wide().blocks,
            Self::M1 | Self::M1Tail => m1.blocks,
        };
        ModelSpec {
            preset: Some(self),
            blocks,
            tail: matches!(self, Self::M1Tail).then_some(16),
            leaky_slope: m1.leaky_slope,
        }
    }
}

/// The model of a job: a preset name (`"m1"`), or a table starting from a preset (default
/// M1) with any of `blocks`, `tail` and `leaky_slope` replaced. The input length, side features
/// and classes come from the job's preprocessing and label set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<ModelName>,
    pub blocks: Vec<ConvBlock>,
    pub tail: Option<usize>,
    pub leaky_slope: f64,
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelName::M1.spec()
    }
}

impl ModelSpec {
    /// The network for inputs of `beat_len` samples and `features` side values, `classes`
    /// outputs.
    pub fn config(&self, beat_len: usize, features: usize, classes: usize) -> ModelConfig {
        ModelConfig {
            beat_len,
            features,
            blocks: self.blocks.clone(),
            tail: self.tail,
            classes,
            leaky_slope: self.leaky_slope,
        }
    }
}

impl<'de> Deserialize<'de> for ModelSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            preset: Option<ModelName>,
            blocks: Option<Vec<ConvBlock>>,
            tail: Option<usize>,
            leaky_slope: Option<f64>,
        }
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ModelSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a model name (m1, m1_wide, m1_tail) or a table of blocks, tail, leaky_slope",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ModelSpec, E> {
                ModelName::ALL
                    .into_iter()
                    .find(|m| m.as_str() == v)
                    .map(ModelName::spec)
                    .ok_or_else(|| {
                        E::custom(format!(
                            "unknown model {v:?}: expected m1, m1_wide or m1_tail"
                        ))
                    })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ModelSpec, A::Error> {
                let t = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                let base = t.preset.unwrap_or_default().spec();
                let model = ModelSpec {
                    preset: None,
                    blocks: t.blocks.unwrap_or_else(|| base.blocks.clone()),
                    tail: t.tail.or(base.tail),
                    leaky_slope: t.leaky_slope.unwrap_or(base.leaky_slope),
                };
                // The preset's name stays while the table says no more than the preset (as a
                // stored spec, written out in full, does).
                let same = model.blocks == base.blocks
                    && model.tail == base.tail
                    && model.leaky_slope == base.leaky_slope;
                Ok(ModelSpec {
                    preset: t.preset.filter(|_| same),
                    ..model
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// How the loss weighs the classes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassWeights {
    /// Every class weighs 1.
    #[default]
    Uniform,
    /// Each hospital weighs its classes inversely to their frequency in its own training split
    /// (`n / (classes · n_c)`, at most [`ClassWeights::BALANCED_CAP`]).
    Balanced,
    /// One weight per class, in the label set's order.
    Fixed(Vec<f32>),
}

impl ClassWeights {
    /// The largest weight `balanced` gives a rare class.
    pub const BALANCED_CAP: f32 = 20.0;

    /// The weights for a training split with `counts` beats per class (`None`: uniform).
    pub fn for_counts(&self, counts: &[usize]) -> Option<Vec<f32>> {
        match self {
            Self::Uniform => None,
            Self::Balanced => Some(crate::model::balanced_weights(counts, Self::BALANCED_CAP)),
            Self::Fixed(w) => Some(w.clone()),
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

/// Who may take a finished job's model out of MedSplit. Shown to every hospital at consent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Release {
    /// The agents of the participating hospitals may export the whole network (their client
    /// weights and the coordinator's server layer); each export is audited.
    #[default]
    Participants,
    /// Nobody: the server layer never leaves the coordinator. The hospitals use the model only
    /// through private inference (their client layers, the coordinator's layer on ciphertexts).
    Nobody,
}

impl Release {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Participants => "participants",
            Self::Nobody => "nobody",
        }
    }

    /// The policy in a sentence, as the consent card shows it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Participants => {
                "the agents of the participating hospitals may export the finished model"
            }
            Self::Nobody => {
                "nobody may export the finished model: its server layer stays on the coordinator, \
                 usable only through private inference"
            }
        }
    }
}

/// A researcher's training job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    #[serde(default)]
    pub model: ModelSpec,
    /// The classes every hospital labels its beats with (default AAMI).
    #[serde(default)]
    pub labels: LabelSet,
    /// How every hospital cuts its beats into model input rows: a preset name or an object
    /// (default the papers' preset, which pre-cut beat files hold).
    #[serde(default)]
    pub preprocessing: Preprocessing,
    /// Transfer learning: the id of a completed job whose final model this job starts from (its
    /// server layer and its client weights); the model, label set and preprocessing must be
    /// that job's, and every hospital must have taken part in it. `None`: weights drawn from
    /// `seed`.
    #[serde(default)]
    pub init_from: Option<i64>,
    /// Whether the client layers train (default). False (only with `init_from`): they stay as
    /// the source job left them and only the server layer trains, one message each way per
    /// batch, no gradient travelling back to the hospitals.
    #[serde(default = "yes")]
    pub train_client: bool,
    /// Hospital names, in the order every round visits them.
    pub hospitals: Vec<String>,
    #[serde(default = "one")]
    pub rounds: u32,
    /// Passes over the hospital's training split per visit.
    #[serde(default = "one")]
    pub local_epochs: u32,
    /// Batches per visit instead of whole epochs (continuing through the hospital's data from
    /// visit to visit); `None`: `local_epochs` passes.
    #[serde(default)]
    pub local_steps: Option<u32>,
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    /// Training batches a visit keeps in flight, 1 to [`crate::protocol::MAX_DEPTH`]: the
    /// agent sends later batches' forward messages before earlier batches' replies arrive, so a
    /// hospital far from the coordinator waits two round trips per this many batches rather
    /// than per batch. 1 trains exactly as one batch at a time; more trains each batch through
    /// layers up to this many batches stale (the rules: [`crate::protocol::ClientSession::with_depth`]).
    /// More than 1 needs trained client layers (`train_client`) and no DP. A new job that
    /// does not say gets [`JobSpec::with_default_in_flight`]'s value; `None` (a job stored
    /// before the field existed) trains one at a time ([`JobSpec::in_flight`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches_in_flight: Option<u32>,
    /// Test accuracy is measured every `eval_every` rounds (and after the last round).
    #[serde(default = "one")]
    pub eval_every: u32,
    /// Seeds the initial weights and the data order.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub server_optimizer: ServerOptimizer,
    /// Learning rate of the hospitals' Adam.
    #[serde(default = "default_client_lr")]
    pub client_lr: f64,
    #[serde(default)]
    pub class_weights: ClassWeights,
    /// Activations and gradients in the clear: for debugging only. HE is on unless this is true.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Attempts a visit gets before `on_failure` applies.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// Who may take the finished model (default: the participating hospitals' agents).
    #[serde(default)]
    pub release: Release,
    /// Differential privacy of every hospital's training (DP-SGD at its agent); `None`: none.
    #[serde(default)]
    pub dp: Option<DpSpec>,
}

/// Differential privacy of a job: every agent trains with DP-SGD. Each step draws every
/// training beat independently with probability `q = batch_size / N` (Poisson sampling; `N`
/// the hospital's training-set size, `batch_size` the expected batch), clips each beat's
/// gradient to `clip_norm` and adds Gaussian noise of standard deviation
/// `noise_multiplier · clip_norm` to the sums before anything leaves the agent: the server
/// layer's gradient that the coordinator receives, and the client layers' update whose result
/// the next hospital receives. The accountant ([`crate::dp`]) turns this into (ε, δ) per
/// hospital.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpSpec {
    /// σ: the noise's standard deviation over the clip norm. Exactly one of this and
    /// `target_epsilon`.
    #[serde(default)]
    pub noise_multiplier: Option<f64>,
    /// A target ε per hospital at `delta`: each agent derives σ from its own sampling rate and
    /// number of steps (so a hospital with fewer beats gets more noise).
    #[serde(default)]
    pub target_epsilon: Option<f64>,
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// The bound on each beat's whole gradient (server layer and client layers together).
    #[serde(default = "default_clip")]
    pub clip_norm: f64,
}

fn default_delta() -> f64 {
    1e-5
}
fn default_clip() -> f64 {
    1.0
}

impl DpSpec {
    /// Checks the fields and how they fit the rest of the job; the first problem is returned.
    fn validate(&self, spec: &JobSpec) -> Result<(), FieldError> {
        let positive = |field: &str, v: f64, max: f64| {
            if v.is_finite() && v > 0.0 && v <= max {
                Ok(())
            } else {
                Err(FieldError::new(
                    format!("dp.{field}"),
                    format!("must be in (0, {max}], got {v}"),
                ))
            }
        };
        match (self.noise_multiplier, self.target_epsilon) {
            (Some(sigma), None) => positive("noise_multiplier", sigma, 100.0)?,
            (None, Some(eps)) => positive("target_epsilon", eps, 100.0)?,
            _ => {
                return Err(FieldError::new(
                    "dp",
                    "give exactly one of noise_multiplier and target_epsilon",
                ));
            }
        }
        positive("delta", self.delta, 0.01)?;
        positive("clip_norm", self.clip_norm, 1000.0)?;
        if spec.insecure_plaintext {
            return Err(FieldError::new(
                "dp",
                "needs HE: with insecure_plaintext the coordinator sees every beat's activations",
            ));
        }
        if spec.class_weights == ClassWeights::Balanced {
            return Err(FieldError::new(
                "class_weights",
                "balanced weights depend on each hospital's class counts, which differential \
                 privacy does not cover: use uniform or fixed weights",
            ));
        }
        Ok(())
    }
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_batch() -> u32 {
    4
}
fn default_attempts() -> u32 {
    3
}
fn default_client_lr() -> f64 {
    crate::model::CLIENT_LR
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

/// The digest a hospital approves a job by: SHA-256 (hex) of the job's id, its owner's e-mail
/// address and its specification as JSON. The agent computes it from every assignment and
/// trains only a job whose digest its hospital approved (`medsplit-agent approve`); the
/// dashboard shows the same digest beside the job.
pub fn job_digest(job_id: i64, owner: &str, spec: &JobSpec) -> String {
    use sha2::{Digest, Sha256};
    let json = serde_json::to_vec(&(job_id, owner, spec)).expect("a job spec serializes");
    Sha256::digest(&json)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A public key's fingerprint, for hospitals to compare out of band: the first 16 bytes of the
/// key's SHA-256, in hex groups of four (`3f2a 91c0 …`).
pub fn key_fingerprint(public_key: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(public_key);
    digest[..16]
        .chunks(2)
        .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
        .collect::<Vec<_>>()
        .join(" ")
}

impl JobSpec {
    /// The whole-number fields and their allowed ranges (inclusive). The dashboard's job form
    /// checks the same ranges (`web/app.js`, `INT_FIELDS`; a test compares them).
    /// `local_steps` is checked when it is set.
    pub const RANGES: [(&'static str, u32, u32); 7] = [
        ("rounds", 1, 1000),
        ("local_epochs", 1, 100),
        ("local_steps", 1, 1_000_000),
        ("batch_size", 1, 256),
        ("batches_in_flight", 1, crate::protocol::MAX_DEPTH as u32),
        ("eval_every", 1, 1000),
        ("max_attempts", 1, 20),
    ];

    /// The largest seed: 2^53 − 1, the largest whole number that every JSON reader (a browser's
    /// included) keeps exact, so that the seed a job shows is the one it trains with.
    pub const MAX_SEED: u64 = (1 << 53) - 1;

    /// `batches_in_flight` of a new job that does not say, when its client layers train without
    /// DP (docs/benchmarks.md, "Batches in flight": the accuracy it costs and the time it saves).
    pub const DEFAULT_BATCHES_IN_FLIGHT: u32 = 4;

    /// Training batches each visit keeps in flight.
    pub fn in_flight(&self) -> u32 {
        self.batches_in_flight.unwrap_or(1)
    }

    /// Whether more than one batch may be in flight: the client layers train, without DP.
    pub fn may_pipeline(&self) -> bool {
        self.train_client && self.dp.is_none()
    }

    /// The spec as a new job stores it: `batches_in_flight` filled in when not given
    /// ([`Self::DEFAULT_BATCHES_IN_FLIGHT`] where it may pipeline, else 1).
    pub fn with_default_in_flight(mut self) -> Self {
        if self.batches_in_flight.is_none() {
            self.batches_in_flight = Some(if self.may_pipeline() {
                Self::DEFAULT_BATCHES_IN_FLIGHT
            } else {
                1
            });
        }
        self
    }

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
            Some(self.rounds),
            Some(self.local_epochs),
            self.local_steps,
            Some(self.batch_size),
            self.batches_in_flight,
            Some(self.eval_every),
            Some(self.max_attempts),
        ];
        for ((field, lo, hi), value) in Self::RANGES.into_iter().zip(values) {
            if let Some(value) = value
                && !(lo..=hi).contains(&value)
            {
                return Err(FieldError::new(
                    field,
                    format!("must be between {lo} and {hi}, got {value}"),
                ));
            }
        }
        if self.seed > Self::MAX_SEED {
            return Err(FieldError::new(
                "seed",
                format!(
                    "must be between 0 and {} (2^53 - 1), got {}",
                    Self::MAX_SEED,
                    self.seed
                ),
            ));
        }
        for (field, lr) in [
            ("server_optimizer.lr", self.server_optimizer.lr()),
            ("client_lr", self.client_lr),
        ] {
            if !(lr.is_finite() && lr > 0.0 && lr <= 1.0) {
                return Err(FieldError::new(
                    field,
                    format!("must be in (0, 1], got {lr}"),
                ));
            }
        }
        if self.init_from.is_some_and(|id| id < 1) {
            return Err(FieldError::new("init_from", "must be a job id"));
        }
        if !self.train_client && self.init_from.is_none() {
            return Err(FieldError::new(
                "train_client",
                "can be false only for a job that starts from a finished one (init_from)",
            ));
        }
        if self.in_flight() > 1 && !self.may_pipeline() {
            return Err(FieldError::new(
                "batches_in_flight",
                "must be 1 when only the server layer trains or with DP",
            ));
        }
        self.preprocessing.validate().map_err(|e| FieldError {
            field: format!("preprocessing.{}", e.field),
            message: e.message,
        })?;
        if let Some(dp) = &self.dp {
            dp.validate(self)?;
        }
        let config = self.model_config();
        config.validate().map_err(|e| model_error(&e, &config))?;
        crate::model::Objective {
            client_lr: self.client_lr,
            class_weights: self.class_weights.for_counts(&vec![1; config.classes]),
        }
        .validate(config.classes)
        .map_err(|e| FieldError::new("class_weights", e.to_string()))?;
        Ok(())
    }

    /// The network this job trains: its model on the inputs its preprocessing makes, with its
    /// label set's classes.
    pub fn model_config(&self) -> ModelConfig {
        self.model.config(
            self.preprocessing.beat_len,
            self.preprocessing.feature_len(),
            self.labels.num_classes(),
        )
    }

    /// The first of `model`, `labels` and `preprocessing` in which this spec differs from
    /// `source`'s: a job starts from another's model only when all three are the same (the
    /// model compared by its layers, whatever preset name it was given by).
    pub fn differs_in_model_from(&self, source: &JobSpec) -> Option<&'static str> {
        let layers = |m: &ModelSpec| (m.blocks.clone(), m.tail, m.leaky_slope);
        if layers(&self.model) != layers(&source.model) {
            Some("model")
        } else if self.labels != source.labels {
            Some("labels")
        } else if self.preprocessing != source.preprocessing {
            Some("preprocessing")
        } else {
            None
        }
    }

    /// Whether the visits of `round` (0-based) end with a test-accuracy measurement.
    pub fn evaluates(&self, round: u32) -> bool {
        (round + 1).is_multiple_of(self.eval_every) || round + 1 == self.rounds
    }
}

/// A model error as a field error of the spec. A cut wider than the HE packing holds comes from
/// the model and the preprocessing's beat length together: the message names both.
fn model_error(e: &crate::model::ModelError, config: &ModelConfig) -> FieldError {
    use crate::model::ModelError as E;
    match e {
        E::TooLarge { field, max, got } if field == "cut width" => FieldError::new(
            "model",
            format!(
                "the cut layer would hold {got} values per beat ({} from the convolution blocks \
                 on {}-sample beats, {} side features), at most {max}: shorten \
                 preprocessing.beat_len or pool more in model.blocks",
                config.conv_width(),
                config.beat_len,
                config.features
            ),
        ),
        E::BeatLen(_) => FieldError::new("preprocessing.beat_len", e.to_string()),
        _ => FieldError::new(model_field(e), e.to_string()),
    }
}

/// The spec field a model error is about.
fn model_field(e: &crate::model::ModelError) -> String {
    use crate::model::ModelError as E;
    match e {
        E::Kernel { block, .. } => format!("model.blocks[{block}].kernel"),
        E::TooShort { block, .. } => format!("model.blocks[{block}].pool"),
        E::Zero { field } | E::TooLarge { field, .. } if field.starts_with("blocks") => {
            format!("model.{field}")
        }
        E::Zero { field } | E::TooLarge { field, .. }
            if field == "tail" || field == "server outputs" =>
        {
            "model.tail".into()
        }
        E::Slope(_) => "model.leaky_slope".into(),
        _ => "model".into(),
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
    /// The most ε this hospital spends on one job, if its admin set a maximum (a job without
    /// `spec.dp` is then refused: its ε is unbounded).
    #[serde(default)]
    pub max_epsilon: Option<f64>,
    /// The ε this hospital has spent on this job in its earlier visits (with `spec.dp`).
    #[serde(default)]
    pub epsilon_spent: Option<f64>,
    /// The e-mail address of the researcher who owns the job (a hospital's policy may name
    /// the researchers it trains for).
    #[serde(default)]
    pub owner: Option<String>,
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

/// A finished job's model as the coordinator releases it to an agent of a participating
/// hospital (`GET /v1/jobs/{id}/model`, only under [`Release::Participants`]): the server layer,
/// and what the model card says of the job. The client layers come sealed to the agent
/// (`GET /v1/jobs/{id}/model/client`, a [`Handoff`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelRelease {
    pub job_id: i64,
    pub job_name: String,
    /// The researcher who ran the job.
    pub owner: String,
    pub spec: JobSpec,
    /// The job's hospitals, in visiting order.
    pub hospitals: Vec<String>,
    /// Rounds completed.
    pub rounds: u32,
    /// When the job finished (RFC 3339).
    pub finished_at: String,
    /// The server layer's parameters, `f32` little-endian (base64), in the order of
    /// [`ServerNet::parameters`](crate::model::ServerNet::parameters).
    pub server: String,
    /// The last round whose visits measured their test sets, hospital by hospital.
    pub evaluation: Option<RoundEvaluation>,
    /// The agent this release went to, as the coordinator records it: `agent NAME (ID) of
    /// HOSPITAL`.
    pub exported_by: String,
}

/// A finished job's client layers as the coordinator hands them to an agent of a participating
/// hospital (`GET /v1/jobs/{id}/model/client`, under every release policy): the spec that shapes
/// them and the last visit's weights sealed to this agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientRelease {
    pub job_id: i64,
    pub spec: JobSpec,
    pub handoff: Handoff,
}

/// The test measurements of one round: each hospital's, on its own held-out beats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundEvaluation {
    /// 0-based.
    pub round: u32,
    pub hospitals: Vec<HospitalEvaluation>,
}

/// One hospital's test measurement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HospitalEvaluation {
    pub hospital: String,
    #[serde(flatten)]
    pub test: TestEvaluation,
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
    /// With `spec.dp`: what this visit's DP-SGD did and the ε spent so far.
    #[serde(default)]
    pub dp: Option<DpReport>,
}

/// A visit's differential privacy, as its agent ran it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpReport {
    /// Training steps of this visit.
    pub steps: u64,
    /// The Poisson sampling rate `q` of each step.
    pub sampling_rate: f64,
    /// σ.
    pub noise_multiplier: f64,
    /// Rows of every step's batch (real beats and padding).
    pub padded_batch: u32,
    /// The ε this hospital has spent on the job after this visit (at the job's δ).
    pub epsilon_spent: f64,
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
    /// The coordinator is shutting down; it has put the visit back in the queue, to be
    /// claimed again (through another replica).
    pub const SHUTDOWN: u16 = 1001;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: &str) -> Result<JobSpec, String> {
        let text = format!(r#"{{"name": "j", "hospitals": ["a"], "model": {model}}}"#);
        serde_json::from_str::<JobSpec>(&text).map_err(|e| e.to_string())
    }

    #[test]
    fn models_are_named_or_tables_and_errors_name_the_field() {
        assert_eq!(spec(r#""m1""#).unwrap().model_config(), ModelConfig::m1());
        assert_eq!(
            spec(r#""m1_wide""#).unwrap().model_config(),
            ModelConfig::m1_wide()
        );
        let tail = spec(r#""m1_tail""#).unwrap();
        assert_eq!(tail.model_config().server_outputs(), 16);
        assert_eq!(tail.model.preset, Some(ModelName::M1Tail));
        // As stored and returned: written out in full, read back with its preset's name.
        let stored = serde_json::to_string(&tail).unwrap();
        assert!(
            stored.contains(r#""model":{"preset":"m1_tail","blocks":"#),
            "{stored}"
        );
        assert_eq!(serde_json::from_str::<JobSpec>(&stored).unwrap(), tail);
        let widened = spec(r#"{"preset": "m1_tail", "tail": 32}"#).unwrap();
        assert_eq!((widened.model.preset, widened.model.tail), (None, Some(32)));

        let custom = spec(
            r#"{"blocks": [{"channels": 8, "kernel": 9, "pool": 4}, {"channels": 4, "kernel": 3, "pool": 2}], "tail": 8}"#,
        )
        .unwrap();
        let config = custom.model_config();
        assert_eq!((config.cut_width().0, config.server_outputs()), (64, 8));
        assert_eq!(custom.model.preset, None);
        custom.validate().unwrap();

        assert!(
            spec(r#""m2""#)
                .unwrap_err()
                .contains("unknown model \"m2\"")
        );
        assert!(spec(r#"{"depth": 3}"#).unwrap_err().contains("depth"));
        let bad = spec(r#"{"blocks": [{"channels": 8, "kernel": 4, "pool": 2}]}"#).unwrap();
        assert_eq!(bad.validate().unwrap_err().field, "model.blocks[0].kernel");
        let bad = spec(r#"{"preset": "m1", "tail": 0}"#).unwrap();
        assert_eq!(bad.validate().unwrap_err().field, "model.tail");
        let bad = spec(r#"{"preset": "m1", "tail": 500}"#).unwrap();
        assert_eq!(bad.validate().unwrap_err().field, "model.tail");
    }

    #[test]
    fn labels_and_preprocessing_default_to_aami_and_the_papers_preset() {
        let s = spec(r#""m1""#).unwrap();
        assert_eq!(s.labels, LabelSet::Aami);
        assert_eq!(s.preprocessing, Preprocessing::papers());
        assert_eq!(s.model_config(), ModelConfig::m1());
        // As stored: both written out, read back the same.
        let stored = serde_json::to_string(&s).unwrap();
        assert!(stored.contains(r#""labels":"aami""#), "{stored}");
        assert!(
            stored.contains(r#""preprocessing":{"lead":null,"#),
            "{stored}"
        );
        assert_eq!(serde_json::from_str::<JobSpec>(&stored).unwrap(), s);
    }

    #[test]
    fn preprocessing_is_a_preset_name_or_an_object_and_shapes_the_model() {
        let with = |extra: &str| {
            serde_json::from_str::<JobSpec>(&format!(
                r#"{{"name": "j", "hospitals": ["a"], "model": "m1_tail"{extra}}}"#
            ))
            .map_err(|e| e.to_string())
        };
        let named = with(r#", "labels": "papers", "preprocessing": "inter_patient""#).unwrap();
        assert_eq!(named.labels, LabelSet::Papers);
        assert_eq!(named.preprocessing, Preprocessing::inter_patient());
        named.validate().unwrap();
        let config = named.model_config();
        assert_eq!(
            (config.beat_len, config.features, config.classes),
            (128, 4, 5)
        );
        assert_eq!(
            config.cut_width().0,
            256 + 4,
            "the RR features join the cut layer"
        );

        let object =
            with(r#", "preprocessing": {"preset": "inter_patient", "beat_len": 256, "rr": null}"#)
                .unwrap();
        object.validate().unwrap();
        let config = object.model_config();
        assert_eq!((config.beat_len, config.features), (256, 0));
        assert_eq!(config.cut_width().0, 512);
        assert_eq!(object.preprocessing.lead.as_deref(), Some("MLII"));
        let stored = serde_json::to_string(&object).unwrap();
        assert_eq!(serde_json::from_str::<JobSpec>(&stored).unwrap(), object);

        assert!(
            with(r#", "preprocessing": "raw""#)
                .unwrap_err()
                .contains("unknown preprocessing preset \"raw\"")
        );
        assert!(
            with(r#", "preprocessing": {"window": 3}"#)
                .unwrap_err()
                .contains("window")
        );
        assert!(
            with(r#", "labels": "mitbih""#)
                .unwrap_err()
                .contains("mitbih")
        );
    }

    #[test]
    fn bad_preprocessing_fields_are_named_under_preprocessing() {
        let mut s = spec(r#""m1""#).unwrap();
        s.preprocessing.before_s = -1.0;
        assert_eq!(s.validate().unwrap_err().field, "preprocessing.before_s");
        s.preprocessing = Preprocessing::inter_patient();
        s.preprocessing.baseline = crate::preprocess::Baseline::Median {
            first_s: 0.2,
            second_s: 0.0,
        };
        assert_eq!(
            s.validate().unwrap_err().field,
            "preprocessing.baseline.median.second_s"
        );
        s.preprocessing = Preprocessing::papers();
        s.preprocessing.beat_len = Preprocessing::MAX_BEAT_LEN + 1;
        assert_eq!(s.validate().unwrap_err().field, "preprocessing.beat_len");
        s.preprocessing.beat_len = 0;
        assert_eq!(s.validate().unwrap_err().field, "preprocessing.beat_len");
    }

    /// The HE packing holds a cut of at most `model::MAX_CUT` values (he.rs tests every shape up
    /// to it): a beat length the preprocessing allows but the model cannot pack is refused.
    #[test]
    fn a_beat_length_whose_cut_does_not_pack_is_refused() {
        let mut s = spec(r#""m1""#).unwrap();
        // M1 keeps 8 channels of beat_len / 4 samples: 1024 samples give the widest cut.
        s.preprocessing.beat_len = 1024;
        s.validate().unwrap();
        assert_eq!(s.model_config().cut_width().0, crate::model::MAX_CUT);
        s.preprocessing.beat_len = Preprocessing::MAX_BEAT_LEN;
        let err = s.validate().unwrap_err();
        assert_eq!(err.field, "model");
        assert!(
            err.message.contains("8192 values per beat")
                && err.message.contains("preprocessing.beat_len"),
            "{err}"
        );
        // The RR features count too: 1024 samples and 4 features are 4 values too many.
        s.preprocessing = Preprocessing::inter_patient();
        s.preprocessing.beat_len = 1024;
        let err = s.validate().unwrap_err();
        assert_eq!(err.field, "model");
        assert!(err.message.contains("2052 values per beat"), "{err}");
        // Pooling more packs it again.
        s.model.blocks[1].pool = 4;
        s.model.preset = None;
        s.validate().unwrap();
        // Every allowed beat length either packs or is refused by validation.
        for beat_len in (1..=Preprocessing::MAX_BEAT_LEN).step_by(7) {
            s.preprocessing.beat_len = beat_len;
            if s.validate().is_ok() {
                assert!(s.model_config().cut_width().0 <= crate::model::MAX_CUT);
            }
        }
    }

    #[test]
    fn dp_takes_one_of_noise_and_target_and_needs_he_and_fixed_weights() {
        let with = |dp: &str, extra: &str| {
            let text = format!(r#"{{"name": "j", "hospitals": ["a"], "dp": {dp}{extra}}}"#);
            serde_json::from_str::<JobSpec>(&text).unwrap().validate()
        };
        assert_eq!(spec(r#""m1""#).unwrap().dp, None);
        let s: JobSpec = serde_json::from_str(
            r#"{"name": "j", "hospitals": ["a"], "dp": {"target_epsilon": 8}}"#,
        )
        .unwrap();
        let dp = s.dp.clone().unwrap();
        assert_eq!(
            (dp.delta, dp.clip_norm, dp.noise_multiplier),
            (1e-5, 1.0, None)
        );
        s.validate().unwrap();
        with(r#"{"noise_multiplier": 1.1, "clip_norm": 0.5}"#, "").unwrap();
        let field = |dp: &str, extra: &str| with(dp, extra).unwrap_err().field;
        assert_eq!(field("{}", ""), "dp");
        assert_eq!(
            field(r#"{"noise_multiplier": 1, "target_epsilon": 8}"#, ""),
            "dp"
        );
        assert_eq!(
            field(r#"{"noise_multiplier": 0}"#, ""),
            "dp.noise_multiplier"
        );
        assert_eq!(field(r#"{"target_epsilon": -1}"#, ""), "dp.target_epsilon");
        assert_eq!(
            field(r#"{"target_epsilon": 8, "delta": 0.5}"#, ""),
            "dp.delta"
        );
        assert_eq!(
            field(r#"{"target_epsilon": 8, "clip_norm": 0}"#, ""),
            "dp.clip_norm"
        );
        assert_eq!(
            field(
                r#"{"target_epsilon": 8}"#,
                r#", "insecure_plaintext": true"#
            ),
            "dp"
        );
        assert_eq!(
            field(
                r#"{"target_epsilon": 8}"#,
                r#", "class_weights": "balanced""#
            ),
            "class_weights"
        );
        with(
            r#"{"target_epsilon": 8}"#,
            r#", "class_weights": {"fixed": [1, 2, 2, 2, 1]}"#,
        )
        .unwrap();
        assert!(
            serde_json::from_str::<JobSpec>(
                r#"{"name": "j", "hospitals": ["a"], "dp": {"epsilon": 8}}"#
            )
            .is_err()
        );
    }

    #[test]
    fn transfer_learning_fields_default_to_a_fresh_fully_trained_job() {
        let s = spec(r#""m1""#).unwrap();
        assert_eq!((s.init_from, s.train_client), (None, true));
        let stored = serde_json::to_string(&s).unwrap();
        assert!(
            stored.contains(r#""init_from":null,"train_client":true"#),
            "{stored}"
        );
        let mut tuned = s.clone();
        tuned.train_client = false;
        assert_eq!(tuned.validate().unwrap_err().field, "train_client");
        tuned.init_from = Some(0);
        assert_eq!(tuned.validate().unwrap_err().field, "init_from");
        tuned.init_from = Some(7);
        tuned.validate().unwrap();
        let back: JobSpec = serde_json::from_str(&serde_json::to_string(&tuned).unwrap()).unwrap();
        assert_eq!(back, tuned);

        assert_eq!(tuned.differs_in_model_from(&s), None);
        let tail = spec(r#""m1_tail""#).unwrap();
        assert_eq!(tail.differs_in_model_from(&s), Some("model"));
        // The same layers written as a table are the same model.
        let table = spec(r#"{"blocks": [{"channels": 16, "kernel": 7, "pool": 2}, {"channels": 8, "kernel": 5, "pool": 2}]}"#).unwrap();
        assert_eq!(table.model_config(), s.model_config());
        assert_eq!(table.differs_in_model_from(&s), None);
        let mut labels = s.clone();
        labels.labels = LabelSet::Papers;
        assert_eq!(labels.differs_in_model_from(&s), Some("labels"));
        let mut cut = s.clone();
        cut.preprocessing = Preprocessing::inter_patient();
        assert_eq!(cut.differs_in_model_from(&s), Some("preprocessing"));
    }

    #[test]
    fn class_weights_and_learning_rates_are_checked() {
        let mut s = spec(r#""m1""#).unwrap();
        assert_eq!(s.class_weights, ClassWeights::Uniform);
        s.class_weights = ClassWeights::Fixed(vec![1.0, 2.0]);
        assert_eq!(s.validate().unwrap_err().field, "class_weights");
        s.class_weights = ClassWeights::Balanced;
        s.validate().unwrap();
        assert_eq!(
            s.class_weights.for_counts(&[90, 10, 0]).unwrap(),
            vec![100.0 / 270.0, 100.0 / 30.0, ClassWeights::BALANCED_CAP]
        );
        s.client_lr = 0.0;
        assert_eq!(s.validate().unwrap_err().field, "client_lr");
        s.client_lr = 1e-3;
        s.local_steps = Some(0);
        assert_eq!(s.validate().unwrap_err().field, "local_steps");
    }
}
