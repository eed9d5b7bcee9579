//! The two halves of split training as state machines over serialized wire messages.
//!
//! A training step is four messages: the client sends `Forward`, the server answers `Logits`,
//! the client computes softmax + loss with its labels and sends `Backward`, the server answers
//! `InputGradients` and updates its layer, the client backpropagates and updates its layers.
//! An evaluation step is `Forward { train: false }` → `Logits`. Neither side does I/O.
//!
//! Each side has a `prepare` method for the work that does not depend on the other side's next
//! message (the server's optimiser step and weight transforms, the client's encryption pads).
//! Over a network each side calls it after sending, so that it overlaps the other side's
//! computation; in one process [`InProcess`] runs it in turn. It never changes results.

use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};

use crate::dpsgd::{ClientLayers, DpSgd, Mechanism};
use crate::he::{ClientKey, HeError, Packing, ServerHe};
use crate::metrics::MetricsError;
use crate::model::{
    self, ClientNet, ModelConfig, ModelError, Objective, ServerNet, ServerOptimizer, tensor_values,
};
use crate::wire::{
    Activations, ClientMessage, Gradients, LayerGradient, Outputs, ServerMessage, WireError,
};

/// How the cut-layer values travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privacy {
    /// Plaintext activations and gradients (`split`).
    Plaintext,
    /// GLWE-encrypted activations and gradients (`split-he`).
    Encrypted,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    He(#[from] HeError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    #[error("{what}: expected {expected} values, got {got}")]
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("a batch holds 1 to {max} samples, got {0}", max = u16::MAX)]
    BatchSize(usize),
    #[error("label {label} at row {row} is not below {classes}")]
    Label {
        row: usize,
        label: u8,
        classes: usize,
    },
    #[error("non-finite value in {0}")]
    NotFinite(&'static str),
    #[error("predicted class {class} at row {row} is not below {classes}")]
    Prediction {
        row: usize,
        class: usize,
        classes: usize,
    },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("differential privacy: {0}")]
    Dp(String),
}

fn expect(what: &'static str, expected: usize, got: usize) -> Result<(), ProtocolError> {
    if expected != got {
        return Err(ProtocolError::Shape {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

fn finite(what: &'static str, values: &[f32]) -> Result<(), ProtocolError> {
    if values.iter().any(|v| !v.is_finite()) {
        return Err(ProtocolError::NotFinite(what));
    }
    Ok(())
}

fn tensor2(values: Vec<f32>, rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

/// Loss and accuracy of one training batch as the client measured them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchStats {
    pub samples: usize,
    pub loss_sum: f64,
    pub correct: usize,
}

/// Checks a batch and returns its size.
///
/// # Shapes
/// `rows`: `[B, beat_len + features]` row-major; `labels`: `[B]`, or empty when `train` is
/// false.
fn check_batch(
    config: &ModelConfig,
    rows: &[f32],
    labels: &[u8],
    train: bool,
) -> Result<usize, ProtocolError> {
    let batch = rows.len() / config.input_len();
    if batch == 0 || batch > u16::MAX as usize {
        return Err(ProtocolError::BatchSize(batch));
    }
    expect("input rows", batch * config.input_len(), rows.len())?;
    finite("input rows", rows)?;
    if train {
        expect("labels", batch, labels.len())?;
        if let Some((row, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l as usize >= config.classes)
        {
            return Err(ProtocolError::Label {
                row,
                label,
                classes: config.classes,
            });
        }
    }
    Ok(batch)
}

/// The client's end of the U on the server layer's outputs: the tail (if any), softmax
/// cross-entropy with the labels; loss statistics, dJ/doutputs (of the batch's mean or weighted
/// mean loss) and the gradients of the tail's parameters.
///
/// # Shapes
/// `outputs`: `[B, server_outputs]` → dJ/doutputs `[B, server_outputs]`.
fn loss_and_gradient(
    model: &ClientNet,
    config: &ModelConfig,
    objective: &Objective,
    outputs: &[f32],
    labels: &[u8],
    device: &Device,
) -> (BatchStats, Vec<f32>, GradientsParams) {
    let batch = labels.len();
    let outputs_t =
        tensor2(outputs.to_vec(), batch, config.server_outputs(), device).require_grad();
    let logits = model.head(outputs_t.clone());
    let logit_values = tensor_values(logits.clone());
    let loss = model::cross_entropy(logits, labels, objective.class_weights.as_deref(), device);
    let loss_value = tensor_values(loss.clone())[0] as f64;
    let grads = loss.backward();
    let g = tensor_values(outputs_t.grad(&grads).expect("outputs require a gradient"));
    let tail = if model.has_tail() {
        GradientsParams::from_grads(grads, model)
    } else {
        GradientsParams::new()
    };
    let stats = BatchStats {
        samples: batch,
        loss_sum: loss_value * batch as f64,
        correct: model::correct_predictions(&logit_values, labels, config.classes),
    };
    (stats, g, tail)
}

/// The batch-summed gradient of the server layer from the cut-layer activations and
/// dJ/doutputs: `Σ_b a_bᵀ g_b` and `Σ_b g_b`, summed in f64.
///
/// # Shapes
/// `activations`: `[B, cut]`, `g`: `[B, outputs]` → weight `[cut, outputs]`, bias `[outputs]`.
pub fn layer_gradient(activations: &[f32], g: &[f32], cut: usize, outputs: usize) -> LayerGradient {
    let mut weight = vec![0f64; cut * outputs];
    let mut bias = vec![0f64; outputs];
    for (a, gb) in activations.chunks_exact(cut).zip(g.chunks_exact(outputs)) {
        for (i, &ai) in a.iter().enumerate() {
            for (j, &gj) in gb.iter().enumerate() {
                weight[i * outputs + j] += ai as f64 * gj as f64;
            }
        }
        bias.iter_mut().zip(gb).for_each(|(b, &gj)| *b += gj as f64);
    }
    LayerGradient {
        weight: weight.into_iter().map(|v| v as f32).collect(),
        bias: bias.into_iter().map(|v| v as f32).collect(),
    }
}

/// What the client does after a message.
#[derive(Debug)]
pub enum ClientEvent {
    /// Send these bytes to the server.
    Send(Vec<u8>),
    /// The training step is complete.
    Trained(BatchStats),
    /// The evaluation step is complete: predicted classes.
    Evaluated(Vec<usize>),
    /// The inference step ([`ClientSession::start_inference`]) is complete: the class
    /// probabilities, `[B, classes]` row-major.
    Predicted(Vec<f32>),
    /// The server applied the gradient sent by [`ClientSession::finish`].
    Updated,
}

/// What a forward message asks of the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// A training step: the loss and the backward message follow.
    Train,
    /// An evaluation step: the predicted classes.
    Classes,
    /// An inference step: the class probabilities.
    Probabilities,
}

/// A message of the client's that awaits the server's reply (oldest first in
/// [`ClientSession::inflight`]).
enum Awaited {
    Logits {
        /// The client layers as they were at this batch's forward pass: its backward pass is
        /// taken through them (their parameters' ids key the gradients), however many updates
        /// the layers have had since.
        stashed: ClientNet,
        activations: Tensor<2>,
        values: Vec<f32>,
        labels: Vec<u8>,
        step: Step,
        /// With DP-SGD: the real rows of the padded batch (the first ones).
        real: Vec<f32>,
    },
    InputGradients {
        stashed: ClientNet,
        activations: Tensor<2>,
        stats: BatchStats,
        /// Gradients of the tail's parameters (empty without a tail).
        tail: GradientsParams,
    },
    /// With DP-SGD: the input gradients, for each real row's own backward pass.
    PrivateInputGradients {
        stats: BatchStats,
        /// The real rows of the batch.
        real: Vec<f32>,
        /// Each real row's gradient of the tail's parameters (empty without a tail).
        tails: Vec<Vec<f32>>,
    },
    /// The gradient of the last training batch of a frozen client is on its way.
    Updated,
}

impl Awaited {
    /// An evaluation step (which may overlap other evaluation steps).
    fn is_evaluation(&self) -> bool {
        matches!(
            self,
            Self::Logits {
                step: Step::Classes,
                ..
            }
        )
    }

    /// Part of a training step (which may overlap other training steps).
    fn is_training(&self) -> bool {
        matches!(
            self,
            Self::Logits {
                step: Step::Train,
                ..
            } | Self::InputGradients { .. }
                | Self::PrivateInputGradients { .. }
        )
    }
}

/// The most training batches a session keeps in flight ([`ClientSession::with_depth`]).
pub const MAX_DEPTH: usize = 32;

fn checked_depth(depth: usize) -> Result<usize, ProtocolError> {
    if !(1..=MAX_DEPTH).contains(&depth) {
        return Err(ProtocolError::Unexpected(
            "batches in flight: 1 to MAX_DEPTH",
        ));
    }
    Ok(depth)
}

/// The hospital's half: its layers, labels, loss, optimiser and (in `split-he`) its secret key.
pub struct ClientSession {
    config: ModelConfig,
    objective: Objective,
    model: ClientNet,
    optimizer: ModuleOptimizer,
    device: Device,
    he: Option<(ClientKey, Packing)>,
    /// The messages sent whose replies are awaited, in the order they were sent (the server
    /// answers in that order).
    inflight: std::collections::VecDeque<Awaited>,
    /// Training batches that may be in flight at once ([`ClientSession::with_depth`]).
    depth: usize,
    /// The client layers do not train ([`ClientSession::frozen`]).
    frozen: bool,
    /// With frozen layers: the server layer's gradient of the last training batch, sent with
    /// the next message.
    pending_update: Option<LayerGradient>,
    /// DP-SGD's clipping and noise ([`ClientSession::with_dp`]).
    dp: Option<Mechanism>,
    #[cfg(test)]
    last_gradients: Vec<f32>,
}

impl ClientSession {
    pub fn new(config: &ModelConfig, privacy: Privacy, seed: u64) -> Result<Self, ProtocolError> {
        config.validate()?;
        let device = Device::flex().autodiff();
        let model = config.init_client(seed, &device);
        Self::build(config, privacy, model, device)
    }

    /// A session continuing from client parameters handed over by the previous hospital.
    pub fn resume(
        config: &ModelConfig,
        privacy: Privacy,
        parameters: &[f32],
    ) -> Result<Self, ProtocolError> {
        let device = Device::flex().autodiff();
        let model = config.client_from_parameters(parameters, &device)?;
        Self::build(config, privacy, model, device)
    }

    fn build(
        config: &ModelConfig,
        privacy: Privacy,
        model: ClientNet,
        device: Device,
    ) -> Result<Self, ProtocolError> {
        let he = match privacy {
            Privacy::Plaintext => None,
            Privacy::Encrypted => Some((
                ClientKey::generate(),
                Packing::new(config.cut_width().0, config.server_outputs())?,
            )),
        };
        Ok(Self {
            config: config.clone(),
            objective: Objective::default(),
            model,
            optimizer: model::client_optimizer(),
            device,
            he,
            inflight: std::collections::VecDeque::new(),
            depth: 1,
            frozen: false,
            pending_update: None,
            dp: None,
            #[cfg(test)]
            last_gradients: Vec::new(),
        })
    }

    /// The same session with its layers frozen (a job with `train_client: false`): training
    /// steps train only the server layer, in one message each way. The server answers a batch's
    /// activations with its outputs; the client computes the loss and the batch-summed gradient of
    /// the server layer, which rides on its next message (applied before that batch's forward
    /// pass, so the steps are those of sequential training), and no gradient comes back. The
    /// last training batch's gradient goes with [`ClientSession::finish`] unless an evaluation
    /// step carries it. The server session must be [`ServerSession::frozen_client`].
    pub fn frozen(mut self) -> Self {
        self.frozen = true;
        self
    }

    /// The same session with up to `depth` training batches in flight ([`MAX_DEPTH`] at most):
    /// it starts a batch's forward pass before the replies of the batches before it have come
    /// back, so that a slow link carries `depth` batches per round trip. The server answers in
    /// the order it receives, and the client must drive the steps in the order that
    /// [`InProcess::train_pipelined`] does (after each reply: send what it asks, then start
    /// batches until `depth` are in flight), which makes the results independent of timing.
    ///
    /// Staleness, for batch `t` (from 1) with `depth` = K; K = 1 is sequential training, and
    /// the batches go in waves of K (`InProcess::train_pipelined`):
    /// * the client's forward pass of `t` uses the client layers updated by batches `1..=t − K`
    ///   (K − 1 updates fewer than sequential training);
    /// * its backward pass is taken through those same layers (stashed at the forward pass),
    ///   and its update applied to the current layers;
    /// * the server's forward pass of `t` uses the server layer updated by every batch of the
    ///   earlier waves (up to K − 1 updates fewer);
    /// * the server layer's gradient of `t` is the client's `Σ aᵀg` from `t`'s activations and
    ///   gradients, applied to the current server layer; `t`'s input gradients use the server
    ///   layer current when its backward message arrives in `split-he` (the updates of the
    ///   batches before it), and that of its forward pass in `split`.
    ///
    /// Evaluation steps overlap the same way (up to `depth`, with no training step in flight);
    /// they change no weights, so their answers are those of one at a time.
    ///
    /// Needs trained client layers without DP-SGD (refused otherwise at the first step).
    pub fn with_depth(mut self, depth: usize) -> Result<Self, ProtocolError> {
        self.depth = checked_depth(depth)?;
        Ok(self)
    }

    /// The same session training with DP-SGD ([`crate::dpsgd`]): a training step takes the
    /// rows of a Poisson sample (at most `dp.padded_batch`, possibly none), pads them with
    /// dummy rows to `dp.padded_batch`, clips each real row's gradient and sends only noised
    /// sums. Needs encrypted activations: in the clear each row's activation would leave.
    pub fn with_dp(mut self, dp: DpSgd) -> Result<Self, ProtocolError> {
        if self.he.is_none() {
            return Err(ProtocolError::Dp("needs encrypted activations".into()));
        }
        let valid = |v: f64| v.is_finite() && v > 0.0;
        if !(valid(dp.clip_norm)
            && valid(dp.expected_batch)
            && dp.noise_multiplier.is_finite()
            && dp.noise_multiplier >= 0.0
            && (1..=u16::MAX as usize).contains(&dp.padded_batch))
        {
            return Err(ProtocolError::Dp(format!("invalid settings {dp:?}")));
        }
        self.dp = Some(Mechanism::new(dp));
        Ok(self)
    }

    /// With frozen layers: the message carrying the last training batch's gradient of the
    /// server layer, if no forward message has carried it yet (at the end of a visit); answered
    /// by [`ClientEvent::Updated`]. `None` when nothing is pending.
    pub fn finish(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        if !self.inflight.is_empty() {
            return Err(ProtocolError::Unexpected("a step is already in flight"));
        }
        let Some(update) = self.pending_update.take() else {
            return Ok(None);
        };
        self.inflight.push_back(Awaited::Updated);
        Ok(Some(ClientMessage::Update(update).encode()))
    }

    /// Sets the learning rate and class weights (the defaults: [`Objective::default`]).
    pub fn set_objective(&mut self, objective: Objective) -> Result<(), ProtocolError> {
        objective.validate(self.config.classes)?;
        self.objective = objective;
        Ok(())
    }

    /// Starts a training step (`train`, with labels) or an evaluation step (labels empty).
    ///
    /// # Shapes
    /// `rows`: `[B, beat_len + features]` row-major; `labels`: `[B]`.
    pub fn start(
        &mut self,
        rows: &[f32],
        labels: &[u8],
        train: bool,
    ) -> Result<Vec<u8>, ProtocolError> {
        let step = if train { Step::Train } else { Step::Classes };
        self.begin(rows, labels, step)
    }

    /// Starts an inference step: the server layer's forward pass alone (the message of an
    /// evaluation step), answered by [`ClientEvent::Predicted`] with the class probabilities.
    ///
    /// # Shapes
    /// `rows`: `[B, beat_len + features]` row-major.
    pub fn start_inference(&mut self, rows: &[f32]) -> Result<Vec<u8>, ProtocolError> {
        self.begin(rows, &[], Step::Probabilities)
    }

    fn begin(&mut self, rows: &[f32], labels: &[u8], step: Step) -> Result<Vec<u8>, ProtocolError> {
        let train = step == Step::Train;
        // Up to `depth` steps of one kind overlap: training batches (stale by the rules at
        // `with_depth`) or evaluation steps (which change no weights, so they are exact).
        // Inference steps and steps of another kind start once nothing is in flight.
        let busy = self.inflight.len() >= self.depth
            || match step {
                Step::Train => self.inflight.iter().any(|s| !s.is_training()),
                Step::Classes => self.inflight.iter().any(|s| !s.is_evaluation()),
                Step::Probabilities => !self.inflight.is_empty(),
            };
        if busy {
            return Err(ProtocolError::Unexpected("a step is already in flight"));
        }
        if self.depth > 1 && (self.frozen || self.dp.is_some()) {
            return Err(ProtocolError::Unexpected(
                "batches in flight need trained client layers without DP-SGD",
            ));
        }
        let (padded_rows, padded_labels);
        let (rows, labels, real) = match (&self.dp, train) {
            (Some(dp), true) => {
                let width = self.config.input_len();
                let n = rows.len() / width;
                let padded = dp.config.padded_batch;
                if rows.len() != n * width || n > padded || labels.len() != n {
                    return Err(ProtocolError::Dp(format!(
                        "a step takes at most {padded} rows of {width} values with their \
                         labels, got {} values and {} labels",
                        rows.len(),
                        labels.len()
                    )));
                }
                padded_rows = [rows, &vec![0.0; (padded - n) * width]].concat();
                padded_labels = [labels, &vec![0; padded - n]].concat();
                (&padded_rows[..], &padded_labels[..], rows.to_vec())
            }
            _ => (rows, labels, Vec::new()),
        };
        let batch = check_batch(&self.config, rows, labels, train)?;
        let activations = self.model.forward(tensor2(
            rows.to_vec(),
            batch,
            self.config.input_len(),
            &self.device,
        ));
        let values = tensor_values(activations.clone());
        let payload = match &mut self.he {
            None => Activations::Plain(values.clone()),
            Some((key, packing)) => {
                let cut = self.config.cut_width().0;
                let mut uploads = Vec::new();
                let mut start = 0;
                for n in packing.chunks(batch) {
                    let plain =
                        packing.encode_activations(&values[start * cut..(start + n) * cut], n)?;
                    uploads.push(key.encrypt(&plain));
                    start += n;
                }
                Activations::Encrypted(uploads)
            }
        };
        self.inflight.push_back(Awaited::Logits {
            stashed: self.model.clone(),
            activations,
            values,
            labels: labels.to_vec(),
            step,
            real,
        });
        let message = if self.frozen {
            ClientMessage::FrozenForward {
                batch: batch as u16,
                activations: payload,
                update: self.pending_update.take(),
            }
        } else {
            ClientMessage::Forward {
                train,
                batch: batch as u16,
                activations: payload,
            }
        };
        Ok(message.encode())
    }

    /// Handles the server's answer to the message sent last.
    pub fn on_message(&mut self, bytes: &[u8]) -> Result<ClientEvent, ProtocolError> {
        let message = ServerMessage::decode(bytes)?;
        let Some(awaited) = self.inflight.pop_front() else {
            return Err(ProtocolError::Unexpected("a reply with no step in flight"));
        };
        match (awaited, message) {
            (
                Awaited::Logits {
                    stashed,
                    activations,
                    values,
                    labels,
                    step,
                    real,
                },
                ServerMessage::Logits(out),
            ) => {
                let batch = activations.dims()[0];
                let outputs = self.open_logits(out, batch)?;
                if step != Step::Train {
                    let logits = self.model.head(tensor2(
                        outputs,
                        batch,
                        self.config.server_outputs(),
                        &self.device,
                    ));
                    let logits = tensor_values(logits);
                    finite("logits", &logits)?;
                    let classes = self.config.classes;
                    return Ok(match step {
                        Step::Probabilities => {
                            ClientEvent::Predicted(model::softmax(&logits, classes))
                        }
                        _ => ClientEvent::Evaluated(model::predictions(&logits, classes).collect()),
                    });
                }
                if self.dp.is_some() {
                    return self.private_step(&values, &labels, real, &outputs, batch);
                }
                let (stats, g, tail) = loss_and_gradient(
                    &self.model,
                    &self.config,
                    &self.objective,
                    &outputs,
                    &labels,
                    &self.device,
                );
                if self.frozen {
                    let (cut, outputs) = (self.config.cut_width().0, self.config.server_outputs());
                    self.pending_update = Some(layer_gradient(&values, &g, cut, outputs));
                    return Ok(ClientEvent::Trained(stats));
                }
                let (cut, classes) = (self.config.cut_width().0, self.config.server_outputs());
                let layer = layer_gradient(&values, &g, cut, classes);
                let payload = self.seal_gradients(g, layer, batch)?;
                self.inflight.push_back(Awaited::InputGradients {
                    stashed,
                    activations,
                    stats,
                    tail,
                });
                Ok(ClientEvent::Send(ClientMessage::Backward(payload).encode()))
            }
            (
                Awaited::InputGradients {
                    stashed,
                    activations,
                    stats,
                    mut tail,
                },
                ServerMessage::InputGradients(out),
            ) => {
                let batch = activations.dims()[0];
                let grads = self.open_input_gradients(out, batch)?;
                let grads = tensor2(grads, batch, self.config.cut_width().0, &self.device);
                // Inject dJ/da as the upstream gradient of the cut layer (the side features
                // are inputs: their part of dJ/da has nothing to update).
                let gradients = (activations * grads).sum().backward();
                // Taken at the weights of the forward pass (the stashed layers), applied to the
                // current ones: the same with one batch in flight.
                let mut params = GradientsParams::from_grads(gradients, &stashed);
                if let Some((weight, bias)) = self.model.tail_ids() {
                    if let Some(g) = tail.remove::<2>(weight) {
                        params.register(weight, g);
                    }
                    if let Some(g) = bias.and_then(|id| tail.remove::<1>(id)) {
                        params.register(bias.expect("bias id"), g);
                    }
                }
                #[cfg(test)]
                {
                    self.last_gradients = self.model.gradient_values(&params);
                }
                self.model =
                    self.optimizer
                        .step(self.objective.client_lr, self.model.clone(), params);
                Ok(ClientEvent::Trained(stats))
            }
            (
                Awaited::PrivateInputGradients { stats, real, tails },
                ServerMessage::InputGradients(out),
            ) => {
                let batch = self.dp.as_ref().expect("DP state").config.padded_batch;
                let grads = self.open_input_gradients(out, batch)?;
                self.private_update(&real, &tails, &grads);
                Ok(ClientEvent::Trained(stats))
            }
            (Awaited::Updated, ServerMessage::Updated) => Ok(ClientEvent::Updated),
            (state, _) => {
                self.inflight.push_front(state);
                Err(ProtocolError::Unexpected(
                    "message does not answer the step in flight",
                ))
            }
        }
    }

    /// The server layer's outputs (the logits without a tail), decrypted in `split-he`.
    fn open_logits(&mut self, out: Outputs, batch: usize) -> Result<Vec<f32>, ProtocolError> {
        let classes = self.config.server_outputs();
        let logits = match (out, &mut self.he) {
            (Outputs::Plain(v), None) => v,
            (Outputs::Encrypted(cts), Some((key, packing))) => {
                let mut logits = Vec::with_capacity(batch * classes);
                let mut cts = cts.iter();
                for n in packing.chunks(batch) {
                    let mut phases = Vec::new();
                    for g in 0..packing.groups(n) {
                        let ct = cts
                            .next()
                            .ok_or(ProtocolError::Unexpected("too few logit ciphertexts"))?;
                        phases.push(key.decrypt(ct, packing.forward_output_bodies(n, g))?);
                    }
                    logits.extend(packing.decode_logits(&phases, n)?);
                }
                if cts.next().is_some() {
                    return Err(ProtocolError::Unexpected("too many logit ciphertexts"));
                }
                logits
            }
            _ => {
                return Err(ProtocolError::Unexpected(
                    "logits in the wrong privacy mode",
                ));
            }
        };
        expect("logits", batch * classes, logits.len())?;
        finite("logits", &logits)?;
        Ok(logits)
    }

    fn open_input_gradients(
        &mut self,
        out: Outputs,
        batch: usize,
    ) -> Result<Vec<f32>, ProtocolError> {
        let cut = self.config.cut_width().0;
        let grads = match (out, &mut self.he) {
            (Outputs::Plain(v), None) => v,
            (Outputs::Encrypted(cts), Some((key, packing))) => {
                let chunks: Vec<usize> = packing.chunks(batch).collect();
                let outputs = chunks.iter().map(|&n| packing.backward_outputs(n)).sum();
                expect("input-gradient ciphertexts", outputs, cts.len())?;
                let mut grads = Vec::with_capacity(batch * cut);
                let mut cts = cts.iter();
                for n in chunks {
                    let phases = packing
                        .backward_output_bodies(n)
                        .into_iter()
                        .zip(cts.by_ref())
                        .map(|(bodies, ct)| key.decrypt(ct, bodies))
                        .collect::<Result<Vec<_>, _>>()?;
                    grads.extend(packing.decode_input_gradients(&phases, n)?);
                }
                grads
            }
            _ => {
                return Err(ProtocolError::Unexpected(
                    "input gradients in the wrong privacy mode",
                ));
            }
        };
        expect("input gradients", batch * cut, grads.len())?;
        finite("input gradients", &grads)?;
        Ok(grads)
    }

    /// The backward payload: dJ/dlogits in the clear, or encrypted together with the batch-summed
    /// gradient of the server layer (`Σ_b a_bᵀ g_b` and `Σ_b g_b`).
    fn seal_gradients(
        &mut self,
        g: Vec<f32>,
        layer: LayerGradient,
        batch: usize,
    ) -> Result<Gradients, ProtocolError> {
        let Some((key, packing)) = &mut self.he else {
            return Ok(Gradients::Plain(g));
        };
        let classes = self.config.server_outputs();
        let LayerGradient { weight, bias } = layer;
        let mut uploads = Vec::new();
        let mut start = 0;
        for n in packing.chunks(batch) {
            let chunk = &g[start * classes..(start + n) * classes];
            for u in 0..packing.backward_uploads(n) {
                uploads.push(key.encrypt(&packing.encode_gradients(chunk, n, u)?));
            }
            start += n;
        }
        Ok(Gradients::Encrypted {
            uploads,
            weight_grad: weight,
            bias_grad: bias,
        })
    }

    /// Work for the next message that does not depend on the server's answer: in `split-he`,
    /// the encryption pads ([`ClientKey::prepare`]) of the uploads that message will carry (the
    /// backward uploads while the logits are awaited, the next forward upload of a batch of the
    /// same size while the input gradients are). A networked client calls it after sending each
    /// message, so that it runs while the server computes; skipping it changes nothing but
    /// timing.
    pub fn prepare(&mut self) {
        let Some((key, packing)) = &mut self.he else {
            return;
        };
        let uploads = match self.inflight.front() {
            None | Some(Awaited::Updated) => 0,
            Some(Awaited::Logits {
                activations, step, ..
            }) => {
                let batch = activations.dims()[0];
                if *step == Step::Train && !self.frozen {
                    packing
                        .chunks(batch)
                        .map(|n| packing.backward_uploads(n))
                        .sum()
                } else {
                    packing.chunks(batch).count()
                }
            }
            Some(Awaited::InputGradients { activations, .. }) => {
                packing.chunks(activations.dims()[0]).count()
            }
            Some(Awaited::PrivateInputGradients { .. }) => {
                let batch = self.dp.as_ref().map_or(0, |dp| dp.config.padded_batch);
                packing.chunks(batch).count()
            }
        };
        key.prepare(uploads);
    }

    /// A DP-SGD training step's answer to the logits: each real row's loss (weighted, not
    /// averaged) and its gradients ([`ClientLayers`]); the server layer's part of each row's
    /// gradient clipped, summed and noised ([`Mechanism::noisy_mean`]); then either the
    /// backward message (the rows' unclipped dJ/doutputs encrypted, padding rows zero, and the
    /// noised layer gradient) or, with frozen layers, the noised gradient pending for the next
    /// message.
    ///
    /// # Shapes
    /// `values`: `[padded, cut]`; `labels`: `[padded]`; `real`: `[n, input_len]`;
    /// `outputs`: `[padded, server_outputs]`.
    fn private_step(
        &mut self,
        values: &[f32],
        labels: &[u8],
        real: Vec<f32>,
        outputs: &[f32],
        batch: usize,
    ) -> Result<ClientEvent, ProtocolError> {
        let (cut, width, classes) = (
            self.config.cut_width().0,
            self.config.server_outputs(),
            self.config.classes,
        );
        let n = real.len() / self.config.input_len();
        let params = self.model.parameters();
        let layers = ClientLayers::new(&self.config, &params);
        let mut g = vec![0f32; batch * width];
        let mut tails = Vec::with_capacity(n);
        let mut stats = BatchStats {
            samples: n,
            ..BatchStats::default()
        };
        let mut weight_sum = 0f64;
        for b in 0..n {
            let out = &outputs[b * width..(b + 1) * width];
            let logits = if self.model.has_tail() {
                layers.tail_logits(out)
            } else {
                out.to_vec()
            };
            let label = usize::from(labels[b]);
            let w = self
                .objective
                .class_weights
                .as_ref()
                .map_or(1.0, |w| w[label]);
            let p = model::softmax(&logits, classes);
            stats.loss_sum += f64::from(-w * p[label].max(f32::MIN_POSITIVE).ln());
            weight_sum += f64::from(w);
            stats.correct += model::correct_predictions(&logits, &labels[b..b + 1], classes);
            let mut d_logits: Vec<f32> = p.iter().map(|&v| w * v).collect();
            d_logits[label] -= w;
            let gb = if self.model.has_tail() {
                let (d_out, tail) = layers.tail_gradient(out, &d_logits);
                tails.push(tail);
                d_out
            } else {
                d_logits
            };
            g[b * width..(b + 1) * width].copy_from_slice(&gb);
        }
        finite("loss gradients", &g)?;
        // Reported as the usual step does: the weighted mean loss, times the rows.
        if weight_sum > 0.0 {
            stats.loss_sum *= n as f64 / weight_sum;
        }
        let dp = self.dp.as_mut().expect("DP state");
        let bound = dp.part_bound(if self.frozen { 1 } else { 2 });
        let per_sample: Vec<Vec<f32>> = (0..n)
            .map(|b| {
                let gb = &g[b * width..(b + 1) * width];
                let mut v = layer_gradient(&values[b * cut..(b + 1) * cut], gb, cut, width).weight;
                v.extend_from_slice(gb);
                v
            })
            .collect();
        let mut noised = dp.noisy_mean(&per_sample, cut * width + width, bound);
        let bias = noised.split_off(cut * width);
        let layer = LayerGradient {
            weight: noised,
            bias,
        };
        if self.frozen {
            self.pending_update = Some(layer);
            return Ok(ClientEvent::Trained(stats));
        }
        let payload = self.seal_gradients(g, layer, batch)?;
        self.inflight
            .push_back(Awaited::PrivateInputGradients { stats, real, tails });
        Ok(ClientEvent::Send(ClientMessage::Backward(payload).encode()))
    }

    /// The client layers' DP-SGD update: each real row's gradient (its dJ/da through the
    /// convolutions, and its tail gradient), clipped, summed and noised, then the optimiser's
    /// step.
    ///
    /// # Shapes
    /// `real`: `[n, input_len]`; `tails`: `n × [tail parameters]`; `grads`: `[padded, cut]`.
    fn private_update(&mut self, real: &[f32], tails: &[Vec<f32>], grads: &[f32]) {
        let (width, cut) = (self.config.input_len(), self.config.cut_width().0);
        let n = real.len() / width;
        let params = self.model.parameters();
        let layers = ClientLayers::new(&self.config, &params);
        let per_sample: Vec<Vec<f32>> = (0..n)
            .map(|b| {
                let mut v = layers.conv_gradient(
                    &real[b * width..(b + 1) * width],
                    &grads[b * cut..(b + 1) * cut],
                );
                if let Some(tail) = tails.get(b) {
                    v.extend_from_slice(tail);
                }
                v
            })
            .collect();
        let dp = self.dp.as_mut().expect("DP state");
        let bound = dp.part_bound(2);
        let noised = dp.noisy_mean(&per_sample, params.len(), bound);
        let params = self.model.gradients_from_values(&noised, &self.device);
        #[cfg(test)]
        {
            self.last_gradients = noised;
        }
        self.model = self
            .optimizer
            .step(self.objective.client_lr, self.model.clone(), params);
    }

    /// The client half, for sealing and hand-off.
    pub fn model(&self) -> &ClientNet {
        &self.model
    }
}

/// A training batch whose backward message the server awaits (oldest first in
/// [`ServerSession::backlog`]).
enum AwaitBackward {
    Plain {
        /// The layer of the forward pass, whose parameters' ids key the graph's gradients.
        stashed: Box<ServerNet>,
        input: Box<Tensor<2>>,
        logits: Box<Tensor<2>>,
    },
    Encrypted {
        batch: usize,
    },
}

/// What a server session serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerMode {
    /// Training and evaluation steps.
    Train,
    /// Training steps of the server layer alone, the client layers frozen
    /// ([`ServerSession::frozen_client`]), and evaluation steps.
    FrozenClient,
    /// Forward passes without training: private inference on a trained layer.
    Inference,
}

/// The coordinator's half: its layer and optimiser; in `split-he` it only ever holds ciphertexts
/// of activations and of per-sample gradients.
pub struct ServerSession {
    config: ModelConfig,
    mode: ServerMode,
    /// Samples of every forward message answered.
    forwarded: u64,
    model: ServerNet,
    optimizer: ModuleOptimizer,
    lr: f64,
    device: Device,
    he: Option<(ServerHe, Packing)>,
    /// Training batches answered whose backward message is awaited, in order.
    backlog: std::collections::VecDeque<AwaitBackward>,
    /// Training batches that may await their backward message at once
    /// ([`ServerSession::with_depth`]).
    depth: usize,
    /// A weight update failed (weights outside the fixed-point range); nothing more is served.
    failed: bool,
    /// The gradient of the last backward message, applied by [`ServerSession::prepare`].
    pending: Option<GradientsParams>,
    /// Chunk sizes of the last forward message, whose weight transforms `prepare` makes.
    chunks: Vec<usize>,
    #[cfg(test)]
    last_gradients: Vec<f32>,
}

impl ServerSession {
    pub fn new(
        config: &ModelConfig,
        privacy: Privacy,
        optimizer: ServerOptimizer,
        seed: u64,
    ) -> Result<Self, ProtocolError> {
        config.validate()?;
        let device = Device::flex().autodiff();
        let model = config.init_server(seed, &device);
        Self::build(config, privacy, optimizer, model, device)
    }

    /// A session continuing from a checkpoint of the server layer.
    pub fn resume(
        config: &ModelConfig,
        privacy: Privacy,
        optimizer: ServerOptimizer,
        parameters: &[f32],
    ) -> Result<Self, ProtocolError> {
        let device = Device::flex().autodiff();
        let model = config.server_from_parameters(parameters, &device)?;
        Self::build(config, privacy, optimizer, model, device)
    }

    /// A forward-only session on a trained server layer, for private inference: it answers the
    /// forward messages of evaluation and inference steps and refuses training steps and
    /// backward messages, so its layer never changes.
    pub fn inference(
        config: &ModelConfig,
        privacy: Privacy,
        parameters: &[f32],
    ) -> Result<Self, ProtocolError> {
        let mut session = Self::resume(config, privacy, ServerOptimizer::default(), parameters)?;
        session.mode = ServerMode::Inference;
        Ok(session)
    }

    /// The same session for a client whose layers are frozen ([`ClientSession::frozen`]): it
    /// answers `FrozenForward` messages (applying the gradient each carries before the forward
    /// pass) and `Update`, and refuses the four-message training step.
    pub fn frozen_client(mut self) -> Self {
        if self.mode == ServerMode::Train {
            self.mode = ServerMode::FrozenClient;
        }
        self
    }

    /// The same session accepting up to `depth` training batches before their backward
    /// messages (the client's [`ClientSession::with_depth`]; the staleness rules are there).
    pub fn with_depth(mut self, depth: usize) -> Result<Self, ProtocolError> {
        self.depth = checked_depth(depth)?;
        Ok(self)
    }

    /// Samples of the forward messages answered so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded
    }

    fn build(
        config: &ModelConfig,
        privacy: Privacy,
        optimizer: ServerOptimizer,
        model: ServerNet,
        device: Device,
    ) -> Result<Self, ProtocolError> {
        let he = match privacy {
            Privacy::Plaintext => None,
            Privacy::Encrypted => {
                let packing = Packing::new(config.cut_width().0, config.server_outputs())?;
                let mut he = ServerHe::new(packing);
                let (w, b) = model.weights();
                he.set_weights(&w, &b)?;
                Some((he, packing))
            }
        };
        Ok(Self {
            config: config.clone(),
            mode: ServerMode::Train,
            forwarded: 0,
            model,
            optimizer: optimizer.init(),
            lr: optimizer.lr(),
            device,
            he,
            backlog: std::collections::VecDeque::new(),
            depth: 1,
            failed: false,
            pending: None,
            chunks: Vec::new(),
            #[cfg(test)]
            last_gradients: Vec::new(),
        })
    }

    /// Handles one client message and returns the reply. Work left by the previous message
    /// that [`ServerSession::prepare`] has not done yet is done first.
    pub fn handle(&mut self, bytes: &[u8]) -> Result<Vec<u8>, ProtocolError> {
        self.prepare()?;
        self.not_failed()?;
        let message = ClientMessage::decode(bytes)?;
        let refused = match (self.mode, &message) {
            (_, ClientMessage::Forward { train: false, .. }) => None,
            (ServerMode::Inference, _) => {
                Some("an inference session answers forward messages without training only")
            }
            (
                ServerMode::FrozenClient,
                ClientMessage::Forward { .. } | ClientMessage::Backward(_),
            ) => Some(
                "the job's client layers are frozen: a training step is one forward message \
                 carrying the last batch's gradient of the server layer",
            ),
            (ServerMode::Train, ClientMessage::FrozenForward { .. } | ClientMessage::Update(_)) => {
                Some("the job trains the client layers: frozen-client messages are refused")
            }
            _ => None,
        };
        if let Some(reason) = refused {
            return Err(ProtocolError::Unexpected(reason));
        }
        let idle = self.backlog.is_empty();
        let reply = match message {
            ClientMessage::Forward {
                train,
                batch,
                activations,
            } if (train && self.backlog.len() < self.depth) || idle => {
                self.forward(train, batch as usize, activations)?
            }
            ClientMessage::Backward(grads) if !idle => self.backward(grads)?,
            ClientMessage::FrozenForward {
                batch,
                activations,
                update,
            } if idle => {
                if let Some(update) = update {
                    self.apply(update)?;
                }
                self.forward(false, batch as usize, activations)?
            }
            ClientMessage::Update(update) if idle => {
                self.apply(update)?;
                ServerMessage::Updated
            }
            _ => {
                return Err(ProtocolError::Unexpected(
                    "message does not fit the step in flight",
                ));
            }
        };
        Ok(reply.encode())
    }

    fn forward(
        &mut self,
        train: bool,
        batch: usize,
        activations: Activations,
    ) -> Result<ServerMessage, ProtocolError> {
        if batch == 0 {
            return Err(ProtocolError::BatchSize(0));
        }
        let cut = self.config.cut_width().0;
        let reply = match (activations, &mut self.he) {
            (Activations::Plain(values), None) => {
                expect("activations", batch * cut, values.len())?;
                finite("activations", &values)?;
                let input = tensor2(values, batch, cut, &self.device).require_grad();
                let logits = self.model.forward(input.clone());
                let out = tensor_values(logits.clone());
                if train {
                    self.backlog.push_back(AwaitBackward::Plain {
                        stashed: Box::new(self.model.clone()),
                        input: Box::new(input),
                        logits: Box::new(logits),
                    });
                }
                Ok(ServerMessage::Logits(Outputs::Plain(out)))
            }
            (Activations::Encrypted(uploads), Some((he, packing))) => {
                let chunks: Vec<usize> = packing.chunks(batch).collect();
                expect("activation ciphertexts", chunks.len(), uploads.len())?;
                let mut outputs = Vec::new();
                for (upload, &n) in uploads.iter().zip(&chunks) {
                    outputs.extend(he.forward(upload, n)?);
                }
                self.chunks = chunks;
                self.chunks.dedup();
                if train {
                    self.backlog.push_back(AwaitBackward::Encrypted { batch });
                }
                Ok(ServerMessage::Logits(Outputs::Encrypted(outputs)))
            }
            _ => Err(ProtocolError::Unexpected(
                "activations in the wrong privacy mode",
            )),
        }?;
        self.forwarded += batch as u64;
        Ok(reply)
    }

    fn backward(&mut self, grads: Gradients) -> Result<ServerMessage, ProtocolError> {
        let (cut, classes) = (self.config.cut_width().0, self.config.server_outputs());
        let awaited = self.backlog.pop_front().ok_or(ProtocolError::Unexpected(
            "a backward message with no batch in flight",
        ))?;
        let (reply, params) = match (grads, awaited, &mut self.he) {
            (
                Gradients::Plain(g),
                AwaitBackward::Plain {
                    stashed,
                    input,
                    logits,
                },
                None,
            ) => {
                let batch = input.dims()[0];
                expect("logit gradients", batch * classes, g.len())?;
                finite("logit gradients", &g)?;
                let upstream = tensor2(g, batch, classes, &self.device);
                let gradients = ((*logits).clone() * upstream).sum().backward();
                let da = tensor_values(input.grad(&gradients).expect("input requires a gradient"));
                let params = GradientsParams::from_grads(gradients, &*stashed);
                (ServerMessage::InputGradients(Outputs::Plain(da)), params)
            }
            (
                Gradients::Encrypted {
                    uploads,
                    weight_grad,
                    bias_grad,
                },
                AwaitBackward::Encrypted { batch },
                Some((he, packing)),
            ) => {
                expect("weight gradient", cut * classes, weight_grad.len())?;
                expect("bias gradient", classes, bias_grad.len())?;
                finite("weight gradient", &weight_grad)?;
                finite("bias gradient", &bias_grad)?;
                let chunks: Vec<usize> = packing.chunks(batch).collect();
                let counts: Vec<usize> = chunks
                    .iter()
                    .map(|&n| packing.backward_uploads(n))
                    .collect();
                expect("gradient ciphertexts", counts.iter().sum(), uploads.len())?;
                let mut outputs = Vec::new();
                let mut start = 0;
                for (&n, &count) in chunks.iter().zip(&counts) {
                    outputs.extend(he.backward(&uploads[start..start + count], n)?);
                    start += count;
                }
                let params = layer_params(&self.model, weight_grad, bias_grad, cut, classes);
                (
                    ServerMessage::InputGradients(Outputs::Encrypted(outputs)),
                    params,
                )
            }
            _ => {
                return Err(ProtocolError::Unexpected(
                    "gradients in the wrong privacy mode",
                ));
            }
        };
        #[cfg(test)]
        {
            self.last_gradients = self.model.gradient_values(&params);
        }
        self.pending = Some(params);
        Ok(reply)
    }

    /// Applies a gradient of the server layer computed by a frozen client: the optimiser step and,
    /// in `split-he`, the new weights' transforms, before the forward pass that follows.
    fn apply(&mut self, update: LayerGradient) -> Result<(), ProtocolError> {
        let (cut, classes) = (self.config.cut_width().0, self.config.server_outputs());
        expect("weight gradient", cut * classes, update.weight.len())?;
        expect("bias gradient", classes, update.bias.len())?;
        finite("weight gradient", &update.weight)?;
        finite("bias gradient", &update.bias)?;
        let params = layer_params(&self.model, update.weight, update.bias, cut, classes);
        #[cfg(test)]
        {
            self.last_gradients = self.model.gradient_values(&params);
        }
        self.pending = Some(params);
        self.prepare()
    }

    /// Work that need not hold up the reply just produced: after a backward message, the
    /// optimiser step of the layer and, in `split-he`, the Fourier transforms of the new weights
    /// for the chunk sizes of the last batch. A networked server calls it after sending each
    /// reply, so that it runs while the client computes; [`ServerSession::handle`] and
    /// [`ServerSession::model`] call it too, so skipping it changes nothing but timing.
    pub fn prepare(&mut self) -> Result<(), ProtocolError> {
        if let Some(params) = self.pending.take() {
            self.model = self.optimizer.step(self.lr, self.model.clone(), params);
            if let Some((he, _)) = &mut self.he {
                let (w, b) = self.model.weights();
                if let Err(e) = he.set_weights(&w, &b) {
                    self.failed = true;
                    return Err(e.into());
                }
            }
        }
        if let (Some((he, _)), false) = (&mut self.he, self.failed) {
            for &n in &self.chunks {
                he.prepare(n)?;
            }
        }
        Ok(())
    }

    /// The server layer with every update applied, for checkpoints.
    pub fn model(&mut self) -> Result<&ServerNet, ProtocolError> {
        self.prepare()?;
        self.not_failed()?;
        Ok(&self.model)
    }

    fn not_failed(&self) -> Result<(), ProtocolError> {
        if self.failed {
            return Err(ProtocolError::Unexpected(
                "the server layer failed to update; the session cannot continue",
            ));
        }
        Ok(())
    }
}

/// A gradient of the server layer computed elsewhere, as the optimiser takes it.
fn layer_params(
    model: &ServerNet,
    weight: Vec<f32>,
    bias: Vec<f32>,
    cut: usize,
    classes: usize,
) -> GradientsParams {
    let inner = Device::flex();
    let mut params = GradientsParams::new();
    let (weight_id, bias_id) = model.parameter_ids();
    params.register(weight_id, tensor2(weight, cut, classes, &inner));
    if let Some(id) = bias_id {
        params.register(
            id,
            Tensor::<1>::from_data(TensorData::new(bias, [classes]), &inner),
        );
    }
    params
}

/// The whole model in one process: the `local` baseline, same data, seeds and optimisers.
pub struct LocalModel {
    config: ModelConfig,
    objective: Objective,
    client: ClientNet,
    server: ServerNet,
    client_optimizer: ModuleOptimizer,
    server_optimizer: ModuleOptimizer,
    server_lr: f64,
    device: Device,
    #[cfg(test)]
    last_gradients: (Vec<f32>, Vec<f32>),
}

impl LocalModel {
    pub fn new(
        config: &ModelConfig,
        optimizer: ServerOptimizer,
        seed: u64,
    ) -> Result<Self, ProtocolError> {
        config.validate()?;
        let device = Device::flex().autodiff();
        Ok(Self {
            config: config.clone(),
            objective: Objective::default(),
            client: config.init_client(seed, &device),
            server: config.init_server(seed, &device),
            client_optimizer: model::client_optimizer(),
            server_optimizer: optimizer.init(),
            server_lr: optimizer.lr(),
            device,
            #[cfg(test)]
            last_gradients: Default::default(),
        })
    }

    /// Sets the learning rate and class weights (the defaults: [`Objective::default`]).
    pub fn set_objective(&mut self, objective: Objective) -> Result<(), ProtocolError> {
        objective.validate(self.config.classes)?;
        self.objective = objective;
        Ok(())
    }

    fn logits(&self, rows: &[f32], batch: usize) -> Tensor<2> {
        let input = tensor2(rows.to_vec(), batch, self.config.input_len(), &self.device);
        self.client
            .head(self.server.forward(self.client.forward(input)))
    }
}

/// One way of training the split model: `local`, or the two halves exchanging messages.
pub trait Trainer {
    /// One optimisation step on a batch.
    ///
    /// # Shapes
    /// `beats`: `[B, beat_len + features]` (input rows), `labels`: `[B]`.
    fn train_batch(&mut self, beats: &[f32], labels: &[u8]) -> Result<BatchStats, ProtocolError>;
    /// Optimisation steps on `batches` (rows and labels each), in order; each batch's
    /// statistics. A split trainer keeps its batches in flight ([`InProcess::train_pipelined`]).
    fn train_batches(
        &mut self,
        batches: &mut dyn Iterator<Item = (Vec<f32>, Vec<u8>)>,
    ) -> Result<Vec<BatchStats>, ProtocolError> {
        batches
            .map(|(beats, labels)| self.train_batch(&beats, &labels))
            .collect()
    }
    /// Predicted classes of a batch.
    fn predict(&mut self, beats: &[f32]) -> Result<Vec<usize>, ProtocolError>;
    /// Bytes sent each way so far.
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }
}

impl Trainer for LocalModel {
    fn train_batch(&mut self, beats: &[f32], labels: &[u8]) -> Result<BatchStats, ProtocolError> {
        let batch = check_batch(&self.config, beats, labels, true)?;
        let logits = self.logits(beats, batch);
        let values = tensor_values(logits.clone());
        let loss = model::cross_entropy(
            logits,
            labels,
            self.objective.class_weights.as_deref(),
            &self.device,
        );
        let stats = BatchStats {
            samples: batch,
            loss_sum: tensor_values(loss.clone())[0] as f64 * batch as f64,
            correct: model::correct_predictions(&values, labels, self.config.classes),
        };
        let mut gradients = loss.backward();
        let client = GradientsParams::from_module(&mut gradients, &self.client);
        let server = GradientsParams::from_module(&mut gradients, &self.server);
        #[cfg(test)]
        {
            self.last_gradients = (
                self.client.gradient_values(&client),
                self.server.gradient_values(&server),
            );
        }
        self.client =
            self.client_optimizer
                .step(self.objective.client_lr, self.client.clone(), client);
        self.server = self
            .server_optimizer
            .step(self.server_lr, self.server.clone(), server);
        Ok(stats)
    }

    fn predict(&mut self, beats: &[f32]) -> Result<Vec<usize>, ProtocolError> {
        let batch = check_batch(&self.config, beats, &[], false)?;
        let logits = tensor_values(self.logits(beats, batch));
        Ok(model::predictions(&logits, self.config.classes).collect())
    }
}

/// Bytes exchanged, each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub client_to_server: u64,
    pub server_to_client: u64,
    pub messages: u64,
}

/// Both halves in one process, exchanging the serialized messages a network would carry.
pub struct InProcess {
    pub client: ClientSession,
    pub server: ServerSession,
    traffic: Traffic,
}

impl InProcess {
    pub fn new(
        config: &ModelConfig,
        privacy: Privacy,
        optimizer: ServerOptimizer,
        seed: u64,
    ) -> Result<Self, ProtocolError> {
        Ok(Self {
            client: ClientSession::new(config, privacy, seed)?,
            server: ServerSession::new(config, privacy, optimizer, seed)?,
            traffic: Traffic::default(),
        })
    }

    /// Both halves from sessions made elsewhere (e.g. resumed from a hand-off and a
    /// checkpoint, as a visit of cyclic training does).
    pub fn from_sessions(client: ClientSession, server: ServerSession) -> Self {
        Self {
            client,
            server,
            traffic: Traffic::default(),
        }
    }

    /// Both halves with up to `depth` training batches in flight
    /// ([`ClientSession::with_depth`]).
    pub fn with_depth(mut self, depth: usize) -> Result<Self, ProtocolError> {
        self.client = self.client.with_depth(depth)?;
        self.server = self.server.with_depth(depth)?;
        Ok(self)
    }

    /// Trains `batches` (rows and labels each) with up to the sessions' depth in flight, driven
    /// as a networked agent drives them: after each reply the client sends what the reply asks
    /// (a backward message), then starts batches until `depth` are in flight. The server
    /// answers messages in the order they were sent, so what each side computes depends on that
    /// order alone, not on timing: a network gives the same results. With depth K the batches
    /// go in waves of K: the forward messages of a wave, their backward messages as the logits
    /// come back, and the next wave's forwards as the input gradients do. Returns each batch's
    /// statistics, in order.
    pub fn train_pipelined(
        &mut self,
        batches: impl IntoIterator<Item = (Vec<f32>, Vec<u8>)>,
    ) -> Result<Vec<BatchStats>, ProtocolError> {
        let mut batches = batches.into_iter();
        let mut replies = std::collections::VecDeque::new();
        let mut in_flight = 0;
        let mut stats = Vec::new();
        loop {
            while in_flight < self.client.depth {
                let Some((rows, labels)) = batches.next() else {
                    break;
                };
                let forward = self.client.start(&rows, &labels, true)?;
                replies.push_back(self.send(forward)?);
                in_flight += 1;
            }
            let Some(reply) = replies.pop_front() else {
                return Ok(stats);
            };
            match self.client.on_message(&reply)? {
                ClientEvent::Send(next) => replies.push_back(self.send(next)?),
                ClientEvent::Trained(s) => {
                    stats.push(s);
                    in_flight -= 1;
                }
                _ => return Err(ProtocolError::Unexpected("training step did not finish")),
            }
        }
    }

    /// One message to the server, and its reply.
    fn send(&mut self, request: Vec<u8>) -> Result<Vec<u8>, ProtocolError> {
        self.traffic.client_to_server += request.len() as u64;
        self.client.prepare();
        let reply = self.server.handle(&request)?;
        self.server.prepare()?;
        self.traffic.server_to_client += reply.len() as u64;
        self.traffic.messages += 2;
        Ok(reply)
    }

    /// With a frozen client: sends the last training batch's gradient of the server layer if no
    /// message has carried it yet ([`ClientSession::finish`]).
    pub fn finish(&mut self) -> Result<(), ProtocolError> {
        let Some(update) = self.client.finish()? else {
            return Ok(());
        };
        match self.exchange(update)? {
            ClientEvent::Updated => Ok(()),
            _ => Err(ProtocolError::Unexpected("the update was not applied")),
        }
    }

    /// Class probabilities of a batch through an inference step, `[B, classes]` row-major.
    pub fn infer(&mut self, rows: &[f32]) -> Result<Vec<f32>, ProtocolError> {
        let forward = self.client.start_inference(rows)?;
        match self.exchange(forward)? {
            ClientEvent::Predicted(probabilities) => Ok(probabilities),
            _ => Err(ProtocolError::Unexpected("inference step did not finish")),
        }
    }

    fn exchange(&mut self, request: Vec<u8>) -> Result<ClientEvent, ProtocolError> {
        // Over a network the client prepares while the server computes and the server while the
        // client computes; here the same work runs in turn.
        let reply = self.send(request)?;
        self.client.on_message(&reply)
    }
}

impl Trainer for InProcess {
    fn train_batch(&mut self, beats: &[f32], labels: &[u8]) -> Result<BatchStats, ProtocolError> {
        let forward = self.client.start(beats, labels, true)?;
        // Four messages, or one each way with a frozen client.
        let mut event = self.exchange(forward)?;
        loop {
            match event {
                ClientEvent::Send(next) => event = self.exchange(next)?,
                ClientEvent::Trained(stats) => return Ok(stats),
                _ => return Err(ProtocolError::Unexpected("training step did not finish")),
            }
        }
    }

    fn train_batches(
        &mut self,
        batches: &mut dyn Iterator<Item = (Vec<f32>, Vec<u8>)>,
    ) -> Result<Vec<BatchStats>, ProtocolError> {
        self.train_pipelined(batches)
    }

    fn predict(&mut self, beats: &[f32]) -> Result<Vec<usize>, ProtocolError> {
        let forward = self.client.start(beats, &[], false)?;
        match self.exchange(forward)? {
            ClientEvent::Evaluated(predicted) => Ok(predicted),
            _ => Err(ProtocolError::Unexpected("evaluation step did not finish")),
        }
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use crate::training::{epoch_order, evaluate, gather, train_epoch};

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "gradient lengths differ");
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn norm(a: &[f32]) -> f32 {
        a.iter().map(|x| x * x).sum::<f32>().sqrt()
    }

    /// M1 with four side features, a 12-wide client tail, and class weights.
    fn side_and_tail() -> (ModelConfig, Objective) {
        let config = ModelConfig {
            features: 4,
            tail: Some(12),
            ..ModelConfig::m1()
        };
        let objective = Objective {
            client_lr: 2e-3,
            class_weights: Some(vec![0.5, 1.0, 2.0, 4.0, 1.5]),
        };
        (config, objective)
    }

    /// Synthetic beats with `features` side values appended to each row.
    fn rows(beats: Vec<f32>, beat_len: usize, features: usize) -> Vec<f32> {
        beats
            .chunks_exact(beat_len)
            .enumerate()
            .flat_map(|(b, beat)| {
                let side = (0..features).map(move |f| ((b * 7 + f * 3) % 11) as f32 / 5.0);
                beat.iter().copied().chain(side)
            })
            .collect()
    }

    fn dp(clip_norm: f64, noise_multiplier: f64, expected_batch: f64, padded: usize) -> DpSgd {
        DpSgd {
            clip_norm,
            noise_multiplier,
            expected_batch,
            padded_batch: padded,
            seed: Some(9),
        }
    }

    /// Without clipping or noise, with the expected batch set to the batch's total class
    /// weight, DP-SGD's per-row gradients sum to the batch-mean gradient of the usual step:
    /// the same client and server gradients (padding rows add nothing), and the coordinator
    /// sees the padded batch size whatever the sample.
    #[test]
    fn dp_sgd_without_clipping_or_noise_is_the_usual_step_and_pads_the_batch() {
        let (config, objective) = side_and_tail();
        let weights = objective.class_weights.clone().unwrap();
        let data = synthetic(24, 11);
        let optimizer = ServerOptimizer::default();
        let mut he = InProcess::new(&config, Privacy::Encrypted, optimizer, 5).unwrap();
        he.client.set_objective(objective.clone()).unwrap();
        let mut private = InProcess::new(&config, Privacy::Encrypted, optimizer, 5).unwrap();
        private.client.set_objective(objective).unwrap();
        let padded = 9;
        for (step, batch) in [
            vec![0, 1, 2, 3, 4, 5],
            vec![6, 7, 8],
            vec![9, 10, 11, 12, 13],
        ]
        .iter()
        .enumerate()
        {
            let (beats, labels) = gather(&data, batch);
            let beats = rows(beats, config.beat_len, config.features);
            let total: f32 = labels.iter().map(|&l| weights[usize::from(l)]).sum();
            private.client.dp = Some(Mechanism::new(dp(1e9, 0.0, f64::from(total), padded)));
            let forward = private.client.start(&beats, &labels, true).unwrap();
            let Ok(ClientMessage::Forward { batch: seen, .. }) = ClientMessage::decode(&forward)
            else {
                panic!("a forward message");
            };
            assert_eq!(
                seen as usize, padded,
                "the coordinator sees the padded batch"
            );
            private.client.inflight.clear();
            let p = private.train_batch(&beats, &labels).unwrap();
            let h = he.train_batch(&beats, &labels).unwrap();
            assert_eq!(p.correct, h.correct);
            assert!((p.loss_sum - h.loss_sum).abs() < 1e-3, "{p:?} vs {h:?}");
            let (hc, hs) = (&he.client.last_gradients, &he.server.last_gradients);
            let (pc, ps) = (
                &private.client.last_gradients,
                &private.server.last_gradients,
            );
            assert!(norm(hc) > 1e-4 && norm(hs) > 1e-4, "gradients vanished");
            assert!(
                max_diff(hc, pc) <= 1e-4,
                "step {step}: client {}",
                max_diff(hc, pc)
            );
            assert!(
                max_diff(hs, ps) <= 1e-4,
                "step {step}: server {}",
                max_diff(hs, ps)
            );
        }
    }

    /// With clipping: each row's server part is at most C/√2, so the sum the coordinator gets
    /// is at most n·C/√2 over the expected batch; with noise it differs from step to step even
    /// on the same rows, and an empty sample is still a (pure-noise) step of the padded size.
    #[test]
    fn dp_sgd_clips_each_row_and_noises_what_the_coordinator_receives() {
        let config = ModelConfig::m1();
        let data = synthetic(8, 3);
        let (beats, labels) = gather(&data, &[0, 1, 2, 3]);
        let optimizer = ServerOptimizer::default();
        let session = |noise: f64| {
            let client = ClientSession::new(&config, Privacy::Encrypted, 5)
                .unwrap()
                .with_dp(dp(0.01, noise, 4.0, 6))
                .unwrap();
            let server = ServerSession::new(&config, Privacy::Encrypted, optimizer, 5).unwrap();
            InProcess::from_sessions(client, server)
        };
        let mut clipped = session(0.0);
        clipped.train_batch(&beats, &labels).unwrap();
        let seen = norm(&clipped.server.last_gradients);
        assert!(
            seen > 0.0 && seen <= 4.0 * 0.01 / 2f32.sqrt() / 4.0 * 1.001,
            "{seen}"
        );
        let mut noisy = session(1.0);
        noisy.train_batch(&beats, &labels).unwrap();
        let first = noisy.server.last_gradients.clone();
        noisy.train_batch(&[], &[]).unwrap();
        let empty = noisy.server.last_gradients.clone();
        // Noise of σ·C / 4 = 0.0025 per coordinate: far above the clipped signal.
        assert!(norm(&first) > 10.0 * seen, "{} vs {seen}", norm(&first));
        assert!(norm(&empty) > 10.0 * seen);
        assert!(max_diff(&first, &empty) > 1e-3);
        // Plaintext sessions cannot use DP-SGD, and a sample beyond the pad is refused.
        assert!(
            ClientSession::new(&config, Privacy::Plaintext, 5)
                .unwrap()
                .with_dp(dp(1.0, 1.0, 4.0, 6))
                .is_err()
        );
        let (seven, seven_labels) = gather(&data, &[0, 1, 2, 3, 4, 5, 6]);
        assert!(matches!(
            noisy.train_batch(&seven, &seven_labels),
            Err(ProtocolError::Dp(_))
        ));
    }

    #[test]
    fn split_gradients_match_local_and_split_he_stays_close() {
        check_modes_agree(ModelConfig::m1(), Objective::default());
    }

    #[test]
    fn side_features_tail_and_class_weights_agree_across_modes() {
        let (config, objective) = side_and_tail();
        check_modes_agree(config, objective);
    }

    fn check_modes_agree(config: ModelConfig, objective: Objective) {
        let data = synthetic(24, 11);
        let optimizer = ServerOptimizer::default();
        let mut local = LocalModel::new(&config, optimizer, 5).unwrap();
        let mut split = InProcess::new(&config, Privacy::Plaintext, optimizer, 5).unwrap();
        let mut he = InProcess::new(&config, Privacy::Encrypted, optimizer, 5).unwrap();
        local.set_objective(objective.clone()).unwrap();
        split.client.set_objective(objective.clone()).unwrap();
        he.client.set_objective(objective).unwrap();
        for (step, batch) in (0..24).collect::<Vec<_>>().chunks(6).enumerate() {
            let (beats, labels) = gather(&data, batch);
            let beats = rows(beats, config.beat_len, config.features);
            let l = local.train_batch(&beats, &labels).unwrap();
            let s = split.train_batch(&beats, &labels).unwrap();
            let h = he.train_batch(&beats, &labels).unwrap();
            assert_eq!(l.correct, s.correct);
            assert!(
                (l.loss_sum - s.loss_sum).abs() < 1e-5,
                "step {step}: loss {l:?} vs {s:?}"
            );
            assert!(
                (l.loss_sum - h.loss_sum).abs() < 1e-3,
                "step {step}: loss {l:?} vs {h:?}"
            );

            let (lc, ls) = &local.last_gradients;
            let (sc, ss) = (&split.client.last_gradients, &split.server.last_gradients);
            let (hc, hs) = (&he.client.last_gradients, &he.server.last_gradients);
            assert!(norm(lc) > 1e-4 && norm(ls) > 1e-4, "gradients vanished");
            assert!(
                max_diff(lc, sc) <= 1e-6 * norm(lc).max(1.0),
                "step {step}: client split vs local {}",
                max_diff(lc, sc)
            );
            assert!(
                max_diff(ls, ss) <= 1e-6 * norm(ls).max(1.0),
                "step {step}: server split vs local {}",
                max_diff(ls, ss)
            );
            assert!(
                max_diff(lc, hc) <= 1e-4,
                "step {step}: client split-he vs local {}",
                max_diff(lc, hc)
            );
            assert!(
                max_diff(ls, hs) <= 1e-4,
                "step {step}: server split-he vs local {}",
                max_diff(ls, hs)
            );
        }
        // The updates agree too: the optimiser states advance the same way in every mode. Adam
        // magnifies the HE noise on near-zero gradients, so compare the updates in L2.
        let (w0, _) = config.init_server(5, &Device::flex()).weights();
        let (lw, _) = local.server.weights();
        let (sw, _) = split.server.model().unwrap().weights();
        let (hw, _) = he.server.model().unwrap().weights();
        let distance =
            |a: &[f32], b: &[f32]| norm(&a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>());
        let moved = distance(&lw, &w0);
        let (split_off, he_off) = (distance(&sw, &lw) / moved, distance(&hw, &lw) / moved);
        eprintln!(
            "server update differs from local by {split_off:e} (split), {he_off:e} (split-he)"
        );
        assert!(moved > 1e-3, "server layer did not move: {moved}");
        assert!(
            split_off <= 1e-6,
            "split server update differs from local by {split_off}"
        );
        assert!(
            he_off <= 0.02,
            "split-he server update differs from local by {he_off}"
        );
    }

    #[test]
    fn split_he_learns_synthetic_beats_well_above_chance() {
        let config = ModelConfig::m1();
        let train = synthetic(1500, 1);
        let test = synthetic(500, 2);
        let mut he =
            InProcess::new(&config, Privacy::Encrypted, ServerOptimizer::default(), 3).unwrap();
        for epoch in 0..2 {
            let order = epoch_order(train.len(), 3, epoch);
            train_epoch(&mut he, &train, &order, 8, &mut |_, _| {}).unwrap();
        }
        let accuracy = evaluate(&mut he, &test, 8, &crate::wfdb::CLASS_SYMBOLS)
            .unwrap()
            .accuracy();
        eprintln!("split-he synthetic test accuracy after 2 epochs: {accuracy:.3}");
        assert!(accuracy >= 0.8, "accuracy {accuracy}");
        assert!(he.traffic().client_to_server > 0 && he.traffic().server_to_client > 0);
    }

    #[test]
    fn an_m1_batch_of_four_moves_one_upload_each_way_and_six_outputs_back() {
        let config = ModelConfig::m1();
        let train = synthetic(4, 1);
        let mut he =
            InProcess::new(&config, Privacy::Encrypted, ServerOptimizer::default(), 3).unwrap();
        train_epoch(&mut he, &train, &[0, 1, 2, 3], 4, &mut |_, _| {}).unwrap();
        let t = he.traffic();
        // Up: the forward and the gradient upload (a seed and 2,048 bodies of 46 bits each,
        // 11,792 bytes) and the layer's gradient (1,285 f32). Down: 3 logit outputs and 3
        // input-gradient outputs, each a 2,048-word mask of 32 bits and its bodies (8 + 8 + 4
        // logits; 344 + 344 + 342 gradients). A few bytes of framing per message.
        let up = 2 * 11_792 + 1_285 * 4;
        let down = 6 * 8_192 + (8 + 8 + 4 + 344 + 344 + 342) * 4;
        eprintln!(
            "one batch of 4: {} B up, {} B down",
            t.client_to_server, t.server_to_client
        );
        assert!(
            (up..up + 64).contains(&(t.client_to_server as usize)),
            "{} bytes up, expected {up} and framing",
            t.client_to_server
        );
        assert!(
            (down..down + 128).contains(&(t.server_to_client as usize)),
            "{} bytes down, expected {down} and framing",
            t.server_to_client
        );
    }

    #[test]
    fn bad_messages_are_refused_and_nothing_is_lost() {
        let config = ModelConfig::m1();
        let data = synthetic(8, 4);
        let (beats, labels) = gather(&data, &[0, 1, 2, 3]);
        let mut he =
            InProcess::new(&config, Privacy::Encrypted, ServerOptimizer::default(), 1).unwrap();
        let mut plain = ClientSession::new(&config, Privacy::Plaintext, 1).unwrap();

        assert!(matches!(
            he.server.handle(&[1, 2, 3]),
            Err(ProtocolError::Wire(_))
        ));
        assert!(matches!(he.server.handle(&[]), Err(ProtocolError::Wire(_))));
        let plaintext = plain.start(&beats, &labels, true).unwrap();
        assert!(matches!(
            he.server.handle(&plaintext),
            Err(ProtocolError::Unexpected(_))
        ));
        let backward = ClientMessage::Backward(Gradients::Plain(vec![0.0; 20])).encode();
        assert!(matches!(
            he.server.handle(&backward),
            Err(ProtocolError::Unexpected(_))
        ));

        // A forward message whose batch size lies about its ciphertexts.
        let forward = he.client.start(&beats, &labels, true).unwrap();
        let mut lying = ClientMessage::decode(&forward).unwrap();
        if let ClientMessage::Forward { batch, .. } = &mut lying {
            *batch = 12;
        }
        assert!(matches!(
            he.server.handle(&lying.encode()),
            Err(ProtocolError::Shape { .. })
        ));
        // The honest message still goes through: the session was not disturbed.
        let reply = he.server.handle(&forward).unwrap();
        assert!(matches!(
            he.client.on_message(&[0xff; 3]),
            Err(ProtocolError::Wire(_))
        ));
        assert!(matches!(
            he.client.on_message(&reply).unwrap(),
            ClientEvent::Send(_)
        ));

        assert!(matches!(
            plain.start(&beats, &labels, true),
            Err(ProtocolError::Unexpected(_))
        ));
        let mut fresh = ClientSession::new(&config, Privacy::Plaintext, 1).unwrap();
        assert!(matches!(
            fresh.start(&beats[..300], &labels, true),
            Err(ProtocolError::Shape { .. })
        ));
        assert!(matches!(
            fresh.start(&beats, &[0, 1, 9, 2], true),
            Err(ProtocolError::Label {
                row: 2,
                label: 9,
                ..
            })
        ));
        let mut nan = beats.clone();
        nan[5] = f32::NAN;
        assert!(matches!(
            fresh.start(&nan, &labels, true),
            Err(ProtocolError::NotFinite(_))
        ));
        assert!(matches!(
            fresh.start(&[], &[], true),
            Err(ProtocolError::BatchSize(0))
        ));
    }

    /// The batches of one epoch, as `train_pipelined` takes them.
    fn epoch_batches(
        data: &crate::data::Dataset,
        epoch: usize,
        batch: usize,
    ) -> Vec<(Vec<f32>, Vec<u8>)> {
        epoch_order(data.len(), 3, epoch)
            .chunks(batch)
            .map(|b| gather(data, b))
            .collect()
    }

    fn layers(p: &mut InProcess) -> (Vec<f32>, Vec<f32>) {
        (
            p.client.model().parameters(),
            p.server.model().unwrap().parameters(),
        )
    }

    #[test]
    fn one_batch_in_flight_is_sequential_training_bit_for_bit() {
        let config = ModelConfig::m1();
        let data = synthetic(96, 6);
        let new =
            || InProcess::new(&config, Privacy::Plaintext, ServerOptimizer::default(), 4).unwrap();
        let (mut sequential, mut pipelined) = (new(), new().with_depth(1).unwrap());
        for epoch in 0..2 {
            let order = epoch_order(data.len(), 3, epoch);
            train_epoch(&mut sequential, &data, &order, 4, &mut |_, _| {}).unwrap();
            let stats = pipelined
                .train_pipelined(epoch_batches(&data, epoch, 4))
                .unwrap();
            assert_eq!(stats.len(), 24);
        }
        assert_eq!(layers(&mut sequential), layers(&mut pipelined));
        assert_eq!(sequential.traffic(), pipelined.traffic());
    }

    /// With K batches in flight the steps are stale but the same on every run (the order of
    /// the messages alone decides them), training still learns, and encrypted training follows
    /// the plaintext one; more than K batches, or a step of another kind, are refused.
    #[test]
    fn batches_in_flight_train_deterministically_and_through_he() {
        let config = ModelConfig::m1();
        let train = synthetic(1200, 1);
        let test = synthetic(400, 2);
        let run = |privacy, depth| {
            let mut p = InProcess::new(&config, privacy, ServerOptimizer::default(), 3)
                .unwrap()
                .with_depth(depth)
                .unwrap();
            for epoch in 0..2 {
                let stats = p.train_pipelined(epoch_batches(&train, epoch, 8)).unwrap();
                assert_eq!(stats.iter().map(|s| s.samples).sum::<usize>(), train.len());
            }
            p
        };
        let mut plain = run(Privacy::Plaintext, 4);
        let mut again = run(Privacy::Plaintext, 4);
        let mut sequential = run(Privacy::Plaintext, 1);
        assert_eq!(layers(&mut plain), layers(&mut again), "timing-independent");
        assert_ne!(
            layers(&mut plain),
            layers(&mut sequential),
            "the steps are stale"
        );
        let accuracy = |p: &mut InProcess| {
            evaluate(p, &test, 8, &crate::wfdb::CLASS_SYMBOLS)
                .unwrap()
                .accuracy()
        };
        let mut he = run(Privacy::Encrypted, 4);
        let (a_plain, a_he, a_seq) = (
            accuracy(&mut plain),
            accuracy(&mut he),
            accuracy(&mut sequential),
        );
        // Staleness costs accuracy here (measured in docs/benchmarks.md); the run still learns
        // well above chance (20 %), and HE follows the plaintext steps.
        eprintln!("4 in flight: plaintext {a_plain:.3}, HE {a_he:.3}; sequential {a_seq:.3}");
        assert!(a_plain >= 0.75 && a_he >= 0.75, "{a_plain} {a_he}");
        assert!((a_plain - a_he).abs() <= 0.05, "{a_plain} vs {a_he}");

        // Three training forwards with two allowed; an evaluation while training is in flight.
        let mut client = ClientSession::new(&config, Privacy::Plaintext, 1)
            .unwrap()
            .with_depth(2)
            .unwrap();
        let mut server =
            ServerSession::new(&config, Privacy::Plaintext, ServerOptimizer::default(), 1)
                .unwrap()
                .with_depth(2)
                .unwrap();
        let (rows, labels) = gather(&train, &[0, 1, 2, 3]);
        for _ in 0..2 {
            let f = client.start(&rows, &labels, true).unwrap();
            server.handle(&f).unwrap();
        }
        assert!(client.start(&rows, &labels, true).is_err());
        assert!(client.start(&rows, &[], false).is_err());
        // Evaluation steps overlap too, up to the depth, and answer as one at a time does.
        let mut one = ClientSession::new(&config, Privacy::Plaintext, 1).unwrap();
        let mut two = ClientSession::new(&config, Privacy::Plaintext, 1)
            .unwrap()
            .with_depth(2)
            .unwrap();
        let serve = || {
            ServerSession::new(&config, Privacy::Plaintext, ServerOptimizer::default(), 1).unwrap()
        };
        let (mut server_one, mut server_two) = (serve(), serve());
        let batches = [gather(&test, &[0, 1, 2]).0, gather(&test, &[3, 4]).0];
        let mut expected = Vec::new();
        for rows in &batches {
            let f = one.start(rows, &[], false).unwrap();
            assert!(one.start(rows, &[], false).is_err(), "one at a time");
            let ClientEvent::Evaluated(p) =
                one.on_message(&server_one.handle(&f).unwrap()).unwrap()
            else {
                panic!("an evaluation")
            };
            expected.push(p);
        }
        let sent: Vec<_> = batches
            .iter()
            .map(|rows| two.start(rows, &[], false).unwrap())
            .collect();
        assert!(two.start(&batches[0], &[], false).is_err(), "two at most");
        assert!(
            two.start(&rows, &labels, true).is_err(),
            "no training step among evaluations"
        );
        for (f, expected) in sent.iter().zip(&expected) {
            let ClientEvent::Evaluated(p) = two.on_message(&server_two.handle(f).unwrap()).unwrap()
            else {
                panic!("an evaluation")
            };
            assert_eq!(&p, expected);
        }
        let mut other = ClientSession::new(&config, Privacy::Plaintext, 2)
            .unwrap()
            .with_depth(3)
            .unwrap();
        let third = other.start(&rows, &labels, true).unwrap();
        assert!(server.handle(&third).is_err(), "a third batch in flight");
        assert!(
            ClientSession::new(&config, Privacy::Plaintext, 1)
                .unwrap()
                .with_depth(MAX_DEPTH + 1)
                .is_err()
        );
        let frozen = ClientSession::new(&config, Privacy::Plaintext, 1)
            .unwrap()
            .frozen()
            .with_depth(2)
            .unwrap();
        let mut frozen = frozen;
        assert!(
            frozen.start(&rows, &labels, true).is_err(),
            "frozen layers go one at a time"
        );
    }

    #[test]
    fn preparing_ahead_changes_nothing_but_timing() {
        // Two plaintext servers fed the same messages, one prepared after every reply (as the
        // coordinator does) and one never: identical replies and identical layers.
        let config = ModelConfig::m1();
        let data = synthetic(16, 5);
        let mut client = ClientSession::new(&config, Privacy::Plaintext, 2).unwrap();
        let optimizer = ServerOptimizer::default();
        let mut prepared = ServerSession::new(&config, Privacy::Plaintext, optimizer, 2).unwrap();
        let mut lazy = ServerSession::new(&config, Privacy::Plaintext, optimizer, 2).unwrap();
        for batch in [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]] {
            let (beats, labels) = gather(&data, &batch);
            let mut out = client.start(&beats, &labels, true).unwrap();
            loop {
                client.prepare();
                let reply = prepared.handle(&out).unwrap();
                prepared.prepare().unwrap();
                assert_eq!(reply, lazy.handle(&out).unwrap());
                match client.on_message(&reply).unwrap() {
                    ClientEvent::Send(next) => out = next,
                    _ => break,
                }
            }
        }
        assert_eq!(
            prepared.model().unwrap().parameters(),
            lazy.model().unwrap().parameters()
        );
    }

    #[test]
    fn a_gradient_that_breaks_the_fixed_point_range_ends_the_session() {
        // SGD with lr 1 and a finite but enormous gradient puts the weights outside the packing
        // range: the update fails once, cleanly, and the session serves nothing more.
        let config = ModelConfig::m1();
        let data = synthetic(4, 6);
        let (beats, labels) = gather(&data, &[0, 1, 2, 3]);
        let sgd = ServerOptimizer::Sgd { lr: 1.0 };
        let mut he = InProcess::new(&config, Privacy::Encrypted, sgd, 3).unwrap();
        let forward = he.client.start(&beats, &labels, true).unwrap();
        let logits = he.server.handle(&forward).unwrap();
        let ClientEvent::Send(backward) = he.client.on_message(&logits).unwrap() else {
            panic!("a training step continues with a backward message");
        };
        let mut huge = ClientMessage::decode(&backward).unwrap();
        let ClientMessage::Backward(Gradients::Encrypted { weight_grad, .. }) = &mut huge else {
            panic!("an encrypted backward message");
        };
        weight_grad.iter_mut().for_each(|g| *g = 1e30);
        he.server.handle(&huge.encode()).unwrap();
        assert!(matches!(
            he.server.prepare(),
            Err(ProtocolError::He(HeError::OutOfRange { .. }))
        ));
        assert!(matches!(
            he.server.handle(&forward),
            Err(ProtocolError::Unexpected(_))
        ));
        assert!(he.server.prepare().is_ok(), "the failure is reported once");
        assert!(
            he.server.model().is_err(),
            "no checkpoint of a failed layer"
        );
    }

    /// The parameters of both halves after a few HE training steps of `config` (a trained
    /// layer, not the initial one).
    fn trained(config: &ModelConfig, objective: Objective) -> (Vec<f32>, Vec<f32>) {
        let data = synthetic(48, 21);
        let mut he =
            InProcess::new(config, Privacy::Encrypted, ServerOptimizer::default(), 9).unwrap();
        he.client.set_objective(objective).unwrap();
        for batch in (0..48).collect::<Vec<_>>().chunks(8) {
            let (beats, labels) = gather(&data, batch);
            let beats = rows(beats, config.beat_len, config.features);
            he.train_batch(&beats, &labels).unwrap();
        }
        let client = he.client.model().parameters();
        (client, he.server.model().unwrap().parameters())
    }

    #[test]
    fn private_inference_agrees_with_the_plaintext_forward_pass() {
        for (config, objective) in [(ModelConfig::m1(), Objective::default()), side_and_tail()] {
            let (client, server) = trained(&config, objective);
            let session = |privacy| {
                InProcess::from_sessions(
                    ClientSession::resume(&config, privacy, &client).unwrap(),
                    ServerSession::inference(&config, privacy, &server).unwrap(),
                )
            };
            let (mut he, mut plain) = (session(Privacy::Encrypted), session(Privacy::Plaintext));
            // The plaintext forward pass of both halves in one place.
            let device = Device::flex();
            let client_net = config.client_from_parameters(&client, &device).unwrap();
            let server_net = config.server_from_parameters(&server, &device).unwrap();
            let data = synthetic(45, 22);
            let indices: Vec<usize> = (0..45).collect();
            let mut largest = 0f32;
            // Batches of one chunk, of several chunks, and a ragged last one.
            for batch in [&indices[..3], &indices[3..30], &indices[30..]] {
                let (beats, _) = gather(&data, batch);
                let beats = rows(beats, config.beat_len, config.features);
                let input = tensor2(beats.clone(), batch.len(), config.input_len(), &device);
                let logits =
                    tensor_values(client_net.head(server_net.forward(client_net.forward(input))));
                let expected = model::softmax(&logits, config.classes);
                let p = plain.infer(&beats).unwrap();
                let h = he.infer(&beats).unwrap();
                assert_eq!(p.len(), batch.len() * config.classes);
                assert!(
                    max_diff(&p, &expected) <= 1e-6,
                    "plaintext split vs one place"
                );
                largest = largest.max(max_diff(&h, &expected));
                for (row, (hr, er)) in h
                    .chunks_exact(config.classes)
                    .zip(expected.chunks_exact(config.classes))
                    .enumerate()
                {
                    assert!((hr.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                    let mut sorted = er.to_vec();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    if sorted[0] - sorted[1] > 1e-3 {
                        let class = |r: &[f32]| model::predictions(r, config.classes).next();
                        assert_eq!(class(hr), class(er), "row {row}: {hr:?} vs {er:?}");
                    }
                }
            }
            eprintln!("private inference: probabilities within {largest:e} of plaintext");
            assert!(largest <= 1e-5, "HE probabilities off by {largest}");
            assert!(
                largest > 0.0,
                "the encrypted path adds noise, however small"
            );
        }
    }

    #[test]
    fn an_inference_session_refuses_training_and_keeps_its_layer() {
        let config = ModelConfig::m1();
        let (client, server) = trained(&config, Objective::default());
        let data = synthetic(8, 23);
        let (beats, labels) = gather(&data, &[0, 1, 2, 3]);
        let mut c = ClientSession::resume(&config, Privacy::Encrypted, &client).unwrap();
        let mut s = ServerSession::inference(&config, Privacy::Encrypted, &server).unwrap();
        let train = c.start(&beats, &labels, true).unwrap();
        assert!(matches!(
            s.handle(&train),
            Err(ProtocolError::Unexpected(_))
        ));
        let mut c = ClientSession::resume(&config, Privacy::Encrypted, &client).unwrap();
        let backward = ClientMessage::Backward(Gradients::Encrypted {
            uploads: Vec::new(),
            weight_grad: vec![1.0; config.server_parameter_count() - 5],
            bias_grad: vec![1.0; 5],
        });
        assert!(matches!(
            s.handle(&backward.encode()),
            Err(ProtocolError::Unexpected(_))
        ));
        // Evaluation and inference steps are answered, and counted.
        let forward = c.start(&beats, &[], false).unwrap();
        let reply = s.handle(&forward).unwrap();
        assert!(matches!(c.on_message(&reply).unwrap(), ClientEvent::Evaluated(p) if p.len() == 4));
        let forward = c.start_inference(&beats[..2 * config.input_len()]).unwrap();
        let reply = s.handle(&forward).unwrap();
        assert!(
            matches!(c.on_message(&reply).unwrap(), ClientEvent::Predicted(p) if p.len() == 10)
        );
        assert_eq!(s.forwarded(), 6);
        assert_eq!(
            s.model().unwrap().parameters(),
            server,
            "the layer never moves"
        );
    }

    #[test]
    fn a_frozen_client_trains_the_server_layer_alone_in_one_message_each_way() {
        for (config, objective) in [(ModelConfig::m1(), Objective::default()), side_and_tail()] {
            let (client, server) = trained(&config, objective.clone());
            let optimizer = ServerOptimizer::default();
            let frozen = |privacy| {
                let mut c = ClientSession::resume(&config, privacy, &client)
                    .unwrap()
                    .frozen();
                c.set_objective(objective.clone()).unwrap();
                let s = ServerSession::resume(&config, privacy, optimizer, &server)
                    .unwrap()
                    .frozen_client();
                InProcess::from_sessions(c, s)
            };
            let (mut plain, mut he) = (frozen(Privacy::Plaintext), frozen(Privacy::Encrypted));
            // The four-message step from the same weights computes the same first gradient.
            let mut regular = InProcess::from_sessions(
                ClientSession::resume(&config, Privacy::Plaintext, &client).unwrap(),
                ServerSession::resume(&config, Privacy::Plaintext, optimizer, &server).unwrap(),
            );
            regular.client.set_objective(objective.clone()).unwrap();
            let data = synthetic(40, 31);
            let batches: Vec<Vec<usize>> = (0..40)
                .collect::<Vec<_>>()
                .chunks(8)
                .map(<[usize]>::to_vec)
                .collect();
            for (step, batch) in batches.iter().enumerate() {
                let (beats, labels) = gather(&data, batch);
                let beats = rows(beats, config.beat_len, config.features);
                let p = plain.train_batch(&beats, &labels).unwrap();
                let h = he.train_batch(&beats, &labels).unwrap();
                assert!(
                    (p.loss_sum - h.loss_sum).abs() < 1e-3,
                    "step {step}: {p:?} vs {h:?}"
                );
                assert_eq!(
                    plain.traffic().messages,
                    2 * (step as u64 + 1),
                    "one each way"
                );
                if step == 0 {
                    let r = regular.train_batch(&beats, &labels).unwrap();
                    assert!((r.loss_sum - p.loss_sum).abs() < 1e-6);
                } else if step == 1 {
                    // Batch 2's message carried batch 1's gradient, applied before its forward.
                    let (f, r) = (&plain.server.last_gradients, &regular.server.last_gradients);
                    assert!(norm(r) > 1e-4);
                    assert!(
                        max_diff(f, r) <= 1e-6 * norm(r).max(1.0),
                        "{}",
                        max_diff(f, r)
                    );
                }
            }
            let before = plain.traffic().messages;
            plain.finish().unwrap();
            he.finish().unwrap();
            assert_eq!(
                plain.traffic().messages,
                before + 2,
                "the last gradient's message"
            );
            plain.finish().unwrap();
            assert_eq!(plain.traffic().messages, before + 2, "nothing left to send");
            for session in [&plain, &he] {
                assert_eq!(session.client.model().parameters(), client, "client frozen");
            }
            let distance = |a: &[f32], b: &[f32]| {
                norm(&a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>())
            };
            let (p, h) = (
                plain.server.model().unwrap().parameters(),
                he.server.model().unwrap().parameters(),
            );
            let moved = distance(&p, &server);
            assert!(moved > 1e-3, "the server layer trained: {moved}");
            assert!(
                distance(&h, &p) / moved <= 0.02,
                "split-he frozen vs plaintext"
            );
            // An evaluation step after training carries the pending gradient itself.
            let (beats, _) = gather(&data, &[0, 1, 2]);
            let beats = rows(beats, config.beat_len, config.features);
            let mut again = frozen(Privacy::Encrypted);
            let (train_beats, labels) = gather(&data, &batches[0]);
            let train_beats = rows(train_beats, config.beat_len, config.features);
            again.train_batch(&train_beats, &labels).unwrap();
            assert_eq!(again.predict(&beats).unwrap().len(), 3);
            assert_ne!(again.server.model().unwrap().parameters(), server);
            again.finish().unwrap();
            assert_eq!(again.traffic().messages, 4, "no separate update message");
        }
    }

    #[test]
    fn frozen_and_four_message_steps_are_refused_by_the_other_kind_of_server() {
        let config = ModelConfig::m1();
        let data = synthetic(4, 32);
        let (beats, labels) = gather(&data, &[0, 1, 2, 3]);
        let optimizer = ServerOptimizer::default();
        let mut regular = ServerSession::new(&config, Privacy::Encrypted, optimizer, 1).unwrap();
        let mut frozen = ServerSession::new(&config, Privacy::Encrypted, optimizer, 1)
            .unwrap()
            .frozen_client();
        let mut c = ClientSession::new(&config, Privacy::Encrypted, 1).unwrap();
        let four = c.start(&beats, &labels, true).unwrap();
        assert!(matches!(
            frozen.handle(&four),
            Err(ProtocolError::Unexpected(_))
        ));
        let mut f = ClientSession::new(&config, Privacy::Encrypted, 1)
            .unwrap()
            .frozen();
        let one = f.start(&beats, &labels, true).unwrap();
        assert!(matches!(
            regular.handle(&one),
            Err(ProtocolError::Unexpected(_))
        ));
        // A gradient of the wrong shape is refused and changes nothing.
        let bad = ClientMessage::Update(LayerGradient {
            weight: vec![0.1; 7],
            bias: vec![0.0; 5],
        });
        assert!(matches!(
            frozen.handle(&bad.encode()),
            Err(ProtocolError::Shape { .. })
        ));
        assert_eq!(
            frozen.model().unwrap().parameters(),
            regular.model().unwrap().parameters()
        );
        // The frozen server answers the one-message step.
        let reply = frozen.handle(&one).unwrap();
        assert!(matches!(
            f.on_message(&reply).unwrap(),
            ClientEvent::Trained(_)
        ));
    }

    #[test]
    fn the_wide_variant_trains_through_he() {
        let config = ModelConfig::m1_wide();
        assert_eq!(config.cut_width().0, 512);
        let data = synthetic(12, 8);
        let mut he = InProcess::new(
            &config,
            Privacy::Encrypted,
            ServerOptimizer::Sgd { lr: 0.01 },
            2,
        )
        .unwrap();
        let order: Vec<usize> = (0..12).collect();
        let totals = train_epoch(&mut he, &data, &order, 6, &mut |_, _| {}).unwrap();
        assert_eq!(totals.samples, 12);
        assert_eq!(he.predict(&gather(&data, &[0, 1, 2]).0).unwrap().len(), 3);
    }
}
