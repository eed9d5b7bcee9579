//! The paper's M1 network, cut in two: the client half (two convolution blocks) and the server
//! half (one linear layer). Softmax and the loss stay with the client.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv1d, Conv1dConfig};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::nn::pool::{MaxPool1d, MaxPool1dConfig};
use burn::nn::{LeakyRelu, LeakyReluConfig, Linear, LinearConfig, PaddingConfig1d};
use burn::optim::{AdamConfig, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Width of the cut layer: the flattened client output per sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutWidth(pub usize);

/// Number of output classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCount(pub usize);

/// Errors in a model configuration.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelError {
    #[error("beat length must be positive, got {0}")]
    BeatLen(usize),
    #[error(
        "blocks[{block}]: kernel sizes must be odd so that padding k/2 keeps the length, got {kernel}"
    )]
    Kernel { block: usize, kernel: usize },
    #[error("{field} must be positive")]
    Zero { field: String },
    #[error("{field} must be at most {max}, got {got}")]
    TooLarge {
        field: String,
        max: usize,
        got: usize,
    },
    #[error("blocks[{block}]: its {len}-sample input is shorter than its pool of {pool}")]
    TooShort {
        block: usize,
        len: usize,
        pool: usize,
    },
    #[error("leaky ReLU slope must be finite and in [0, 1), got {0}")]
    Slope(f64),
    #[error("class weights: expected {expected} finite positive weights, got {got:?}")]
    ClassWeights { expected: usize, got: Vec<f32> },
    #[error("expected {expected} parameters, got {got}")]
    ParameterCount { expected: usize, got: usize },
    #[error("a parameter is not finite")]
    NonFiniteParameter,
}

/// One client convolution block: `Conv1d(c_in → channels, kernel, padding kernel/2)` →
/// LeakyReLU → `MaxPool1d(pool, stride pool)` (a pool of 1 keeps the length).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvBlock {
    pub channels: usize,
    pub kernel: usize,
    pub pool: usize,
}

/// Shapes of the split network.
///
/// Client: the convolution [`blocks`](Self::blocks) on the `[1, beat_len]` waveform, flattened
/// channel-major (index = channel·len + t), then the row's `features` side values appended: the
/// cut-layer vector. Server: `Linear(cut → server_outputs)`, the layer evaluated on ciphertexts.
/// With a `tail` the client finishes the U: `LeakyReLU → Linear(tail → classes)`; without one the
/// server layer's outputs are the logits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub beat_len: usize,
    /// Side values per input row after the waveform (e.g. RR-interval features).
    pub features: usize,
    pub blocks: Vec<ConvBlock>,
    /// Width of the server layer's output when the client applies LeakyReLU + Linear after it.
    pub tail: Option<usize>,
    pub classes: usize,
    pub leaky_slope: f64,
}

/// The largest cut width and server output width a configuration may have (the HE packing
/// needs a cut of at most N = 2048 values; the output bound keeps replies small).
pub const MAX_CUT: usize = 2048;
/// See [`MAX_CUT`].
pub const MAX_SERVER_OUTPUTS: usize = 64;
/// At most this many convolution blocks, channels per block and kernel taps.
pub const MAX_BLOCKS: usize = 4;
pub const MAX_CHANNELS: usize = 64;
pub const MAX_KERNEL: usize = 31;

impl ModelConfig {
    /// The paper's M1 on 128-sample beats: 16 and 8 channels, kernels 7 and 5, cut width 256.
    pub fn m1() -> Self {
        Self {
            beat_len: 128,
            features: 0,
            blocks: vec![
                ConvBlock {
                    channels: 16,
                    kernel: 7,
                    pool: 2,
                },
                ConvBlock {
                    channels: 8,
                    kernel: 5,
                    pool: 2,
                },
            ],
            tail: None,
            classes: 5,
            leaky_slope: 0.01,
        }
    }

    /// The 512-wide variant: 16 channels in the second block.
    pub fn m1_wide() -> Self {
        let mut config = Self::m1();
        config.blocks[1].channels = 16;
        config
    }

    /// Values per input row: the waveform, then the side features.
    pub fn input_len(&self) -> usize {
        self.beat_len + self.features
    }

    /// Waveform length after each block.
    fn lengths(&self) -> impl Iterator<Item = usize> + '_ {
        self.blocks.iter().scan(self.beat_len, |len, b| {
            *len /= b.pool.max(1);
            Some(*len)
        })
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if self.beat_len == 0 {
            return Err(ModelError::BeatLen(self.beat_len));
        }
        let zero = |field: String| ModelError::Zero { field };
        if self.blocks.is_empty() {
            return Err(zero("blocks".into()));
        }
        let too_large = |field: String, max: usize, got: usize| {
            if got > max {
                Err(ModelError::TooLarge { field, max, got })
            } else {
                Ok(())
            }
        };
        too_large("blocks".into(), MAX_BLOCKS, self.blocks.len())?;
        let mut len = self.beat_len;
        for (i, b) in self.blocks.iter().enumerate() {
            for (name, v) in [
                ("channels", b.channels),
                ("kernel", b.kernel),
                ("pool", b.pool),
            ] {
                if v == 0 {
                    return Err(zero(format!("blocks[{i}].{name}")));
                }
            }
            too_large(format!("blocks[{i}].channels"), MAX_CHANNELS, b.channels)?;
            too_large(format!("blocks[{i}].kernel"), MAX_KERNEL, b.kernel)?;
            if b.kernel % 2 == 0 {
                return Err(ModelError::Kernel {
                    block: i,
                    kernel: b.kernel,
                });
            }
            if len < b.pool {
                return Err(ModelError::TooShort {
                    block: i,
                    len,
                    pool: b.pool,
                });
            }
            len /= b.pool;
        }
        if self.classes < 2 {
            return Err(zero("classes (at least 2)".into()));
        }
        if self.tail == Some(0) {
            return Err(zero("tail".into()));
        }
        too_large("cut width".into(), MAX_CUT, self.cut_width().0)?;
        too_large(
            "server outputs".into(),
            MAX_SERVER_OUTPUTS,
            self.server_outputs(),
        )?;
        if !(0.0..1.0).contains(&self.leaky_slope) {
            return Err(ModelError::Slope(self.leaky_slope));
        }
        Ok(())
    }

    /// Values of the convolution output (before the side features are appended).
    pub fn conv_width(&self) -> usize {
        let channels = self.blocks.last().map_or(0, |b| b.channels);
        channels * self.lengths().last().unwrap_or(self.beat_len)
    }

    /// Width of the cut layer: the convolution output and the side features.
    pub fn cut_width(&self) -> CutWidth {
        CutWidth(self.conv_width() + self.features)
    }

    pub fn class_count(&self) -> ClassCount {
        ClassCount(self.classes)
    }

    /// Outputs of the server layer: the tail's width, or the logits.
    pub fn server_outputs(&self) -> usize {
        self.tail.unwrap_or(self.classes)
    }

    /// The client half with PyTorch's default initialisation, drawn from `seed`.
    pub fn init_client(&self, seed: u64, device: &Device) -> ClientNet {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut c_in = 1;
        let mut convs = Vec::new();
        let mut pools = Vec::new();
        for b in &self.blocks {
            let (c_out, k) = (b.channels, b.kernel);
            let mut conv = Conv1dConfig::new(c_in, c_out, k)
                .with_padding(PaddingConfig1d::Explicit(k / 2, k / 2))
                .init(device);
            let bound = 1.0 / ((c_in * k) as f32).sqrt();
            conv.weight = uniform_param(&mut rng, [c_out, c_in, k], bound, device);
            conv.bias = Some(uniform_param(&mut rng, [c_out], bound, device));
            convs.push(conv);
            pools.push(MaxPool1dConfig::new(b.pool).with_stride(b.pool).init());
            c_in = c_out;
        }
        let tail = self.tail.map(|width| {
            let mut linear = LinearConfig::new(width, self.classes).init(device);
            let bound = 1.0 / (width as f32).sqrt();
            linear.weight = uniform_param(&mut rng, [width, self.classes], bound, device);
            linear.bias = Some(uniform_param(&mut rng, [self.classes], bound, device));
            linear
        });
        ClientNet {
            convs,
            pools,
            tail,
            activation: LeakyReluConfig::new()
                .with_negative_slope(self.leaky_slope)
                .init(),
            beat_len: self.beat_len,
            features: self.features,
        }
    }

    /// The server half with PyTorch's default initialisation, drawn from `seed`.
    pub fn init_server(&self, seed: u64, device: &Device) -> ServerNet {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5e_7e_75);
        let (cut, out) = (self.cut_width().0, self.server_outputs());
        let mut linear = LinearConfig::new(cut, out).init(device);
        let bound = 1.0 / (cut as f32).sqrt();
        linear.weight = uniform_param(&mut rng, [cut, out], bound, device);
        linear.bias = Some(uniform_param(&mut rng, [out], bound, device));
        ServerNet { linear }
    }
}

impl ModelConfig {
    /// Number of values in [`ClientNet::parameters`].
    pub fn client_parameter_count(&self) -> usize {
        let mut c_in = 1;
        let mut count = 0;
        for b in &self.blocks {
            count += b.channels * c_in * b.kernel + b.channels;
            c_in = b.channels;
        }
        count + self.tail.map_or(0, |w| (w + 1) * self.classes)
    }

    /// Number of values in [`ServerNet::parameters`].
    pub fn server_parameter_count(&self) -> usize {
        (self.cut_width().0 + 1) * self.server_outputs()
    }

    /// The client half holding `values` (in the order of [`ClientNet::parameters`]).
    pub fn client_from_parameters(
        &self,
        values: &[f32],
        device: &Device,
    ) -> Result<ClientNet, ModelError> {
        self.validate()?;
        check_parameters(self.client_parameter_count(), values)?;
        let mut net = self.init_client(0, device);
        let mut rest = values;
        let mut take = |n: usize| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head.to_vec()
        };
        let mut c_in = 1;
        for (conv, b) in net.convs.iter_mut().zip(&self.blocks) {
            let shape = [b.channels, c_in, b.kernel];
            conv.weight =
                Param::from_data(TensorData::new(take(shape.iter().product()), shape), device);
            conv.bias = Some(Param::from_data(
                TensorData::new(take(b.channels), [b.channels]),
                device,
            ));
            c_in = b.channels;
        }
        if let (Some(linear), Some(width)) = (&mut net.tail, self.tail) {
            let shape = [width, self.classes];
            linear.weight =
                Param::from_data(TensorData::new(take(width * self.classes), shape), device);
            linear.bias = Some(Param::from_data(
                TensorData::new(take(self.classes), [self.classes]),
                device,
            ));
        }
        Ok(net)
    }

    /// The server layer holding `values` (in the order of [`ServerNet::parameters`]).
    pub fn server_from_parameters(
        &self,
        values: &[f32],
        device: &Device,
    ) -> Result<ServerNet, ModelError> {
        self.validate()?;
        check_parameters(self.server_parameter_count(), values)?;
        let (cut, out) = (self.cut_width().0, self.server_outputs());
        let (w, b) = values.split_at(cut * out);
        let mut linear = LinearConfig::new(cut, out).init(device);
        linear.weight = Param::from_data(TensorData::new(w.to_vec(), [cut, out]), device);
        linear.bias = Some(Param::from_data(TensorData::new(b.to_vec(), [out]), device));
        Ok(ServerNet { linear })
    }
}

fn check_parameters(expected: usize, values: &[f32]) -> Result<(), ModelError> {
    if values.len() != expected {
        return Err(ModelError::ParameterCount {
            expected,
            got: values.len(),
        });
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(ModelError::NonFiniteParameter);
    }
    Ok(())
}

fn uniform_param<const D: usize>(
    rng: &mut ChaCha8Rng,
    shape: [usize; D],
    bound: f32,
    device: &Device,
) -> Param<Tensor<D>> {
    let values: Vec<f32> = (0..shape.iter().product())
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Param::from_data(TensorData::new(values, shape), device)
}

/// The layers each hospital runs on its own data.
#[derive(Module, Debug)]
pub struct ClientNet {
    convs: Vec<Conv1d>,
    pools: Vec<MaxPool1d>,
    tail: Option<Linear>,
    activation: LeakyRelu,
    beat_len: usize,
    features: usize,
}

impl ClientNet {
    /// Cut-layer activations of input rows.
    ///
    /// # Shapes
    /// `rows`: `[B, beat_len + features]` → `[B, conv + features]`: the convolution output
    /// flattened channel-major (index = channel·len + t), then the row's side features.
    pub fn forward(&self, rows: Tensor<2>) -> Tensor<2> {
        let [batch, _] = rows.dims();
        let beats =
            rows.clone()
                .slice([0..batch, 0..self.beat_len])
                .reshape([batch, 1, self.beat_len]);
        let mut x = beats;
        for (conv, pool) in self.convs.iter().zip(&self.pools) {
            x = pool.forward(self.activation.forward(conv.forward(x)));
        }
        let flat = x.flatten(1, 2);
        if self.features == 0 {
            return flat;
        }
        let side = rows.slice([0..batch, self.beat_len..self.beat_len + self.features]);
        Tensor::cat(vec![flat, side], 1)
    }

    /// Logits from the server layer's outputs: the tail (LeakyReLU, Linear) or the identity.
    ///
    /// # Shapes
    /// `outputs`: `[B, server_outputs]` → `[B, classes]`.
    pub fn head(&self, outputs: Tensor<2>) -> Tensor<2> {
        match &self.tail {
            Some(linear) => linear.forward(self.activation.forward(outputs)),
            None => outputs,
        }
    }

    /// Whether a tail follows the server layer.
    pub fn has_tail(&self) -> bool {
        self.tail.is_some()
    }

    /// Parameter ids of the tail's weight `[tail, classes]` and bias `[classes]`.
    pub(crate) fn tail_ids(
        &self,
    ) -> Option<(burn::module::ParamId, Option<burn::module::ParamId>)> {
        self.tail
            .as_ref()
            .map(|l| (l.weight.id, l.bias.as_ref().map(|b| b.id)))
    }

    /// Every parameter, flattened: per block the conv weight `[c_out, c_in, k]` then its bias
    /// `[c_out]`; then the tail's weight `[tail, classes]` and bias `[classes]`.
    pub fn parameters(&self) -> Vec<f32> {
        let mut out = Vec::new();
        for conv in &self.convs {
            out.extend(tensor_values(conv.weight.val()));
            if let Some(b) = &conv.bias {
                out.extend(tensor_values(b.val()));
            }
        }
        if let Some(linear) = &self.tail {
            out.extend(tensor_values(linear.weight.val()));
            if let Some(b) = &linear.bias {
                out.extend(tensor_values(b.val()));
            }
        }
        out
    }
}

/// The layer the coordinator holds.
#[derive(Module, Debug)]
pub struct ServerNet {
    linear: Linear,
}

impl ServerNet {
    /// # Shapes
    /// `activations`: `[B, cut]` → logits `[B, classes]`.
    pub fn forward(&self, activations: Tensor<2>) -> Tensor<2> {
        self.linear.forward(activations)
    }

    /// Weights `[cut, classes]` (row-major) and bias `[classes]` as plain values.
    pub fn weights(&self) -> (Vec<f32>, Vec<f32>) {
        let w = tensor_values(self.linear.weight.val());
        let b = self
            .linear
            .bias
            .as_ref()
            .map(|b| tensor_values(b.val()))
            .unwrap_or_default();
        (w, b)
    }

    /// Every parameter, flattened: weight `[cut, classes]` then bias `[classes]`.
    pub fn parameters(&self) -> Vec<f32> {
        let (mut w, b) = self.weights();
        w.extend(b);
        w
    }

    /// Parameter ids of the weight and the bias, for injecting gradients computed elsewhere.
    pub fn parameter_ids(&self) -> (burn::module::ParamId, Option<burn::module::ParamId>) {
        (
            self.linear.weight.id,
            self.linear.bias.as_ref().map(|b| b.id),
        )
    }
}

/// Values of a tensor, row-major.
pub fn tensor_values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 tensor data")
}

/// Softmax cross-entropy (softmax applied once, inside the loss): the mean over the batch, or
/// with `weights` the weighted mean `Σ w_y·l / Σ w_y` (PyTorch's `weight=`).
///
/// # Shapes
/// `logits`: `[B, classes]`, `labels`: `[B]`, `weights`: `[classes]` → scalar `[1]`.
pub fn cross_entropy(
    logits: Tensor<2>,
    labels: &[u8],
    weights: Option<&[f32]>,
    device: &Device,
) -> Tensor<1> {
    let targets = Tensor::<1, Int>::from_data(
        TensorData::new(
            labels.iter().map(|&l| l as i64).collect::<Vec<_>>(),
            [labels.len()],
        ),
        device,
    );
    let loss: CrossEntropyLoss = CrossEntropyLossConfig::new()
        .with_weights(weights.map(<[f32]>::to_vec))
        .init(device);
    loss.forward(logits, targets)
}

/// Number of rows whose arg-max equals the label.
pub fn correct_predictions(logits: &[f32], labels: &[u8], classes: usize) -> usize {
    predictions(logits, classes)
        .zip(labels)
        .filter(|(p, l)| *p == **l as usize)
        .count()
}

/// Arg-max of each row of `[B, classes]` logits.
pub fn predictions(logits: &[f32], classes: usize) -> impl Iterator<Item = usize> + '_ {
    logits.chunks_exact(classes).map(|row| {
        row.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            })
            .0
    })
}

/// Softmax of each row of `[B, classes]` logits (computed in f64, max-subtracted).
pub fn softmax(logits: &[f32], classes: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks_exact(classes) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let exp: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
        let sum: f64 = exp.iter().sum();
        out.extend(exp.iter().map(|e| (e / sum) as f32));
    }
    out
}

/// Optimiser of the client half: Adam (β 0.9/0.999, ε 1e-8, as in PyTorch); its learning rate
/// is the job's `client_lr` ([`CLIENT_LR`] by default).
pub fn client_optimizer() -> ModuleOptimizer {
    AdamConfig::new().with_epsilon(1e-8).init()
}

/// Optimiser of the server layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServerOptimizer {
    /// Adam with ε 1e-8.
    Adam { lr: f64 },
    /// Plain stochastic gradient descent.
    Sgd { lr: f64 },
}

impl Default for ServerOptimizer {
    fn default() -> Self {
        Self::Adam { lr: 1e-3 }
    }
}

impl ServerOptimizer {
    pub fn init(&self) -> ModuleOptimizer {
        match self {
            Self::Adam { .. } => AdamConfig::new().with_epsilon(1e-8).init(),
            Self::Sgd { .. } => SgdConfig::new().init(),
        }
    }

    pub fn lr(&self) -> f64 {
        match *self {
            Self::Adam { lr } | Self::Sgd { lr } => lr,
        }
    }
}

/// Default learning rate of the client's Adam.
pub const CLIENT_LR: f64 = 1e-3;

/// What the client optimises, beside the shapes: its learning rate and the loss's class
/// weights (`None`: every class weighs 1).
#[derive(Clone, Debug, PartialEq)]
pub struct Objective {
    pub client_lr: f64,
    pub class_weights: Option<Vec<f32>>,
}

impl Default for Objective {
    fn default() -> Self {
        Self {
            client_lr: CLIENT_LR,
            class_weights: None,
        }
    }
}

impl Objective {
    /// Checks the weights against the class count: finite and positive, one per class.
    pub fn validate(&self, classes: usize) -> Result<(), ModelError> {
        if let Some(w) = &self.class_weights
            && (w.len() != classes || w.iter().any(|v| !(v.is_finite() && *v > 0.0)))
        {
            return Err(ModelError::ClassWeights {
                expected: classes,
                got: w.clone(),
            });
        }
        Ok(())
    }
}

/// Class weights inversely proportional to class frequency, `n / (classes · max(n_c, 1))`
/// (scikit-learn's `class_weight="balanced"`), capped at `cap` so that a class with a handful
/// of beats does not dominate.
pub fn balanced_weights(counts: &[usize], cap: f32) -> Vec<f32> {
    let n: usize = counts.iter().sum();
    let classes = counts.len().max(1);
    counts
        .iter()
        .map(|&c| (n as f32 / (classes as f32 * c.max(1) as f32)).min(cap))
        .collect()
}

impl ClientNet {
    /// Every parameter's gradient, concatenated in the order of [`ClientNet::parameters`]; a
    /// parameter without a gradient in `grads` counts as zeros (for equivalence tests).
    #[cfg(test)]
    pub(crate) fn gradient_values(&self, grads: &burn::optim::GradientsParams) -> Vec<f32> {
        fn dense<const D: usize>(
            out: &mut Vec<f32>,
            grads: &burn::optim::GradientsParams,
            param: &Param<Tensor<D>>,
        ) {
            match grads.get::<D>(param.id) {
                Some(g) => out.extend(tensor_values(g)),
                None => out.extend(std::iter::repeat_n(0.0, param.val().shape().num_elements())),
            }
        }
        let mut out = Vec::new();
        for conv in &self.convs {
            dense(&mut out, grads, &conv.weight);
            if let Some(b) = &conv.bias {
                dense(&mut out, grads, b);
            }
        }
        if let Some(linear) = &self.tail {
            dense(&mut out, grads, &linear.weight);
            if let Some(b) = &linear.bias {
                dense(&mut out, grads, b);
            }
        }
        out
    }

    /// Gradients for the optimiser from `values`, laid out as [`ClientNet::gradient_values`]
    /// gives them.
    pub(crate) fn gradients_from_values(
        &self,
        values: &[f32],
        device: &Device,
    ) -> burn::optim::GradientsParams {
        fn put<const D: usize>(
            out: &mut burn::optim::GradientsParams,
            rest: &mut &[f32],
            param: &Param<Tensor<D>>,
            device: &Device,
        ) {
            let shape = param.val().shape();
            let (head, tail) = rest.split_at(shape.num_elements());
            *rest = tail;
            out.register(
                param.id,
                Tensor::<D>::from_data(TensorData::new(head.to_vec(), shape), device),
            );
        }
        let mut out = burn::optim::GradientsParams::new();
        let mut rest = values;
        for conv in &self.convs {
            put(&mut out, &mut rest, &conv.weight, device);
            if let Some(b) = &conv.bias {
                put(&mut out, &mut rest, b, device);
            }
        }
        if let Some(linear) = &self.tail {
            put(&mut out, &mut rest, &linear.weight, device);
            if let Some(b) = &linear.bias {
                put(&mut out, &mut rest, b, device);
            }
        }
        out
    }
}

#[cfg(test)]
impl ServerNet {
    pub(crate) fn gradient_values(&self, grads: &burn::optim::GradientsParams) -> Vec<f32> {
        let mut out: Vec<f32> = grads
            .get::<2>(self.linear.weight.id)
            .map(tensor_values)
            .unwrap_or_default();
        if let Some(b) = &self.linear.bias {
            out.extend(grads.get::<1>(b.id).map(tensor_values).unwrap_or_default());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three blocks, RR-style side features and a client tail.
    fn with_side_and_tail() -> ModelConfig {
        ModelConfig {
            beat_len: 96,
            features: 4,
            blocks: vec![
                ConvBlock {
                    channels: 8,
                    kernel: 9,
                    pool: 2,
                },
                ConvBlock {
                    channels: 8,
                    kernel: 5,
                    pool: 3,
                },
                ConvBlock {
                    channels: 4,
                    kernel: 3,
                    pool: 1,
                },
            ],
            tail: Some(12),
            classes: 5,
            leaky_slope: 0.01,
        }
    }

    #[test]
    fn shapes_follow_the_blocks() {
        let m1 = ModelConfig::m1();
        assert_eq!((m1.cut_width().0, m1.server_outputs()), (256, 5));
        assert_eq!(m1.client_parameter_count(), 16 * 7 + 16 + 8 * 16 * 5 + 8);
        let c = with_side_and_tail();
        // 96 → 48 → 16 → 16 samples; 4 channels · 16 + 4 features.
        assert_eq!(
            (c.conv_width(), c.cut_width().0, c.server_outputs()),
            (64, 68, 12)
        );
        let device = Device::flex();
        let rows: Vec<f32> = (0..3 * c.input_len())
            .map(|i| (i % 7) as f32 / 7.0)
            .collect();
        let rows =
            Tensor::<2>::from_data(TensorData::new(rows.clone(), [3, c.input_len()]), &device);
        let cut = tensor_values(c.init_client(1, &device).forward(rows.clone()));
        assert_eq!(cut.len(), 3 * 68);
        // The side features pass through unchanged at the end of each cut vector.
        let side = tensor_values(rows.slice([0..3, 96..100]));
        for b in 0..3 {
            assert_eq!(&cut[b * 68 + 64..(b + 1) * 68], &side[b * 4..(b + 1) * 4]);
        }
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let mut c = with_side_and_tail();
        c.blocks[1].kernel = 4;
        assert_eq!(
            c.validate(),
            Err(ModelError::Kernel {
                block: 1,
                kernel: 4
            })
        );
        let mut c = with_side_and_tail();
        c.blocks[2].pool = 40;
        assert_eq!(
            c.validate(),
            Err(ModelError::TooShort {
                block: 2,
                len: 16,
                pool: 40
            })
        );
        let mut c = with_side_and_tail();
        c.blocks[0].channels = 0;
        assert_eq!(
            c.validate(),
            Err(ModelError::Zero {
                field: "blocks[0].channels".into()
            })
        );
        let mut c = ModelConfig::m1();
        c.beat_len = 4096;
        assert!(matches!(c.validate(), Err(ModelError::TooLarge { .. })));
        let mut c = with_side_and_tail();
        c.tail = Some(65);
        assert!(matches!(c.validate(), Err(ModelError::TooLarge { .. })));
    }

    #[test]
    fn balanced_weights_follow_scikit_learn() {
        // sklearn.utils.class_weight.compute_class_weight("balanced", classes=[0, 1, 2],
        // y=[0]*6 + [1]*3 + [2]) = [0.5556, 1.1111, 3.3333].
        let w = balanced_weights(&[6, 3, 1], 100.0);
        for (got, want) in w.iter().zip([0.5556f32, 1.1111, 3.3333]) {
            assert!((got - want).abs() < 1e-4, "{w:?}");
        }
        assert_eq!(balanced_weights(&[6, 3, 1, 0], 2.0)[3], 2.0);
    }

    #[test]
    fn parameters_round_trip_and_bad_ones_are_refused() {
        for config in [
            ModelConfig::m1(),
            ModelConfig::m1_wide(),
            with_side_and_tail(),
        ] {
            let device = Device::flex();
            let client = config.init_client(7, &device);
            let values = client.parameters();
            assert_eq!(values.len(), config.client_parameter_count());
            let back = config.client_from_parameters(&values, &device).unwrap();
            assert_eq!(back.parameters(), values);
            let beats = Tensor::<2>::from_data(
                TensorData::new(
                    vec![0.25f32; 2 * config.input_len()],
                    [2, config.input_len()],
                ),
                &device,
            );
            assert_eq!(
                tensor_values(back.forward(beats.clone())),
                tensor_values(client.forward(beats))
            );

            let server = config.init_server(7, &device);
            let values = server.parameters();
            assert_eq!(values.len(), config.server_parameter_count());
            let back = config.server_from_parameters(&values, &device).unwrap();
            assert_eq!(back.parameters(), values);

            assert_eq!(
                config.client_from_parameters(&values[..3], &device).err(),
                Some(ModelError::ParameterCount {
                    expected: config.client_parameter_count(),
                    got: 3
                })
            );
            let mut bad = values.clone();
            bad[0] = f32::NAN;
            assert_eq!(
                config.server_from_parameters(&bad, &device).err(),
                Some(ModelError::NonFiniteParameter)
            );
        }
    }
}
