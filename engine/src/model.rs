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
    #[error("beat length must be a positive multiple of 4 (two 2× max-pools), got {0}")]
    BeatLen(usize),
    #[error("kernel sizes must be odd so that padding k/2 keeps the length, got {0}")]
    Kernel(usize),
    #[error("{field} must be positive")]
    Zero { field: &'static str },
    #[error("leaky ReLU slope must be finite and in [0, 1), got {0}")]
    Slope(f64),
    #[error("expected {expected} parameters, got {got}")]
    ParameterCount { expected: usize, got: usize },
    #[error("a parameter is not finite")]
    NonFiniteParameter,
}

/// Shapes of the split M1 network.
///
/// Client: Conv1d(1→c₁, k₁, pad k₁/2) → LeakyReLU → MaxPool(2) → Conv1d(c₁→c₂, k₂, pad k₂/2) →
/// LeakyReLU → MaxPool(2) → flatten (index = channel·(len/4) + t). Server: Linear(cut → classes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub beat_len: usize,
    pub channels: [usize; 2],
    pub kernels: [usize; 2],
    pub classes: usize,
    pub leaky_slope: f64,
}

impl ModelConfig {
    /// The paper's M1 on 128-sample beats: 16 and 8 channels, kernels 7 and 5, cut width 256.
    pub fn m1() -> Self {
        Self {
            beat_len: 128,
            channels: [16, 8],
            kernels: [7, 5],
            classes: 5,
            leaky_slope: 0.01,
        }
    }

    /// The 512-wide variant: 16 channels in the second block.
    pub fn m1_wide() -> Self {
        Self {
            channels: [16, 16],
            ..Self::m1()
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if self.beat_len == 0 || !self.beat_len.is_multiple_of(4) {
            return Err(ModelError::BeatLen(self.beat_len));
        }
        for (field, v) in [
            ("channels", self.channels[0]),
            ("channels", self.channels[1]),
        ]
        .into_iter()
        .chain([("classes", self.classes)])
        {
            if v == 0 {
                return Err(ModelError::Zero { field });
            }
        }
        if let Some(&k) = self.kernels.iter().find(|&&k| k % 2 == 0) {
            return Err(ModelError::Kernel(k));
        }
        if !(0.0..1.0).contains(&self.leaky_slope) {
            return Err(ModelError::Slope(self.leaky_slope));
        }
        Ok(())
    }

    pub fn cut_width(&self) -> CutWidth {
        CutWidth(self.channels[1] * self.beat_len / 4)
    }

    pub fn class_count(&self) -> ClassCount {
        ClassCount(self.classes)
    }

    /// The client half with PyTorch's default initialisation, drawn from `seed`.
    pub fn init_client(&self, seed: u64, device: &Device) -> ClientNet {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let conv = |rng: &mut ChaCha8Rng, c_in: usize, c_out: usize, k: usize| {
            let mut conv = Conv1dConfig::new(c_in, c_out, k)
                .with_padding(PaddingConfig1d::Explicit(k / 2, k / 2))
                .init(device);
            let bound = 1.0 / ((c_in * k) as f32).sqrt();
            conv.weight = uniform_param(rng, [c_out, c_in, k], bound, device);
            conv.bias = Some(uniform_param(rng, [c_out], bound, device));
            conv
        };
        ClientNet {
            conv1: conv(&mut rng, 1, self.channels[0], self.kernels[0]),
            conv2: conv(
                &mut rng,
                self.channels[0],
                self.channels[1],
                self.kernels[1],
            ),
            pool: MaxPool1dConfig::new(2).with_stride(2).init(),
            activation: LeakyReluConfig::new()
                .with_negative_slope(self.leaky_slope)
                .init(),
        }
    }

    /// The server half with PyTorch's default initialisation, drawn from `seed`.
    pub fn init_server(&self, seed: u64, device: &Device) -> ServerNet {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5e_7e_75);
        let cut = self.cut_width().0;
        let mut linear = LinearConfig::new(cut, self.classes).init(device);
        let bound = 1.0 / (cut as f32).sqrt();
        linear.weight = uniform_param(&mut rng, [cut, self.classes], bound, device);
        linear.bias = Some(uniform_param(&mut rng, [self.classes], bound, device));
        ServerNet { linear }
    }
}

impl ModelConfig {
    /// Number of values in [`ClientNet::parameters`].
    pub fn client_parameter_count(&self) -> usize {
        let [c1, c2] = self.channels;
        let [k1, k2] = self.kernels;
        c1 * k1 + c1 + c2 * c1 * k2 + c2
    }

    /// Number of values in [`ServerNet::parameters`].
    pub fn server_parameter_count(&self) -> usize {
        (self.cut_width().0 + 1) * self.classes
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
        let [c1, c2] = self.channels;
        let [k1, k2] = self.kernels;
        let mut rest = values;
        for (conv, shape) in [
            (&mut net.conv1, [c1, 1, k1]),
            (&mut net.conv2, [c2, c1, k2]),
        ] {
            let (w, tail) = rest.split_at(shape.iter().product());
            let (b, tail) = tail.split_at(shape[0]);
            conv.weight = Param::from_data(TensorData::new(w.to_vec(), shape), device);
            conv.bias = Some(Param::from_data(
                TensorData::new(b.to_vec(), [shape[0]]),
                device,
            ));
            rest = tail;
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
        let cut = self.cut_width().0;
        let (w, b) = values.split_at(cut * self.classes);
        let mut linear = LinearConfig::new(cut, self.classes).init(device);
        linear.weight = Param::from_data(TensorData::new(w.to_vec(), [cut, self.classes]), device);
        linear.bias = Some(Param::from_data(
            TensorData::new(b.to_vec(), [self.classes]),
            device,
        ));
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
    conv1: Conv1d,
    conv2: Conv1d,
    pool: MaxPool1d,
    activation: LeakyRelu,
}

impl ClientNet {
    /// Cut-layer activations.
    ///
    /// # Shapes
    /// `beats`: `[B, 1, L]` → `[B, c₂·L/4]`, flattened channel-major (index = channel·L/4 + t).
    pub fn forward(&self, beats: Tensor<3>) -> Tensor<2> {
        let x = self
            .pool
            .forward(self.activation.forward(self.conv1.forward(beats)));
        let x = self
            .pool
            .forward(self.activation.forward(self.conv2.forward(x)));
        x.flatten(1, 2)
    }

    /// Every parameter, flattened: conv1 weight `[c₁, 1, k₁]`, conv1 bias `[c₁]`, conv2 weight
    /// `[c₂, c₁, k₂]`, conv2 bias `[c₂]`.
    pub fn parameters(&self) -> Vec<f32> {
        let mut out = Vec::new();
        for conv in [&self.conv1, &self.conv2] {
            out.extend(tensor_values(conv.weight.val()));
            if let Some(b) = &conv.bias {
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

/// Mean softmax cross-entropy (softmax applied once, inside the loss).
///
/// # Shapes
/// `logits`: `[B, classes]`, `labels`: `[B]` → scalar `[1]`.
pub fn cross_entropy(logits: Tensor<2>, labels: &[u8], device: &Device) -> Tensor<1> {
    let targets = Tensor::<1, Int>::from_data(
        TensorData::new(
            labels.iter().map(|&l| l as i64).collect::<Vec<_>>(),
            [labels.len()],
        ),
        device,
    );
    let loss: CrossEntropyLoss = CrossEntropyLossConfig::new().init(device);
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

/// Optimiser of the client half: Adam (lr 1e-3, β 0.9/0.999, ε 1e-8, as in PyTorch).
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

/// Learning rate of the client's Adam.
pub const CLIENT_LR: f64 = 1e-3;

#[cfg(test)]
impl ClientNet {
    /// Every parameter's gradient, concatenated in a fixed order (for equivalence tests).
    pub(crate) fn gradient_values(&self, grads: &burn::optim::GradientsParams) -> Vec<f32> {
        let mut out = Vec::new();
        for conv in [&self.conv1, &self.conv2] {
            out.extend(
                grads
                    .get::<3>(conv.weight.id)
                    .map(tensor_values)
                    .unwrap_or_default(),
            );
            if let Some(b) = &conv.bias {
                out.extend(grads.get::<1>(b.id).map(tensor_values).unwrap_or_default());
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

    #[test]
    fn parameters_round_trip_and_bad_ones_are_refused() {
        for config in [ModelConfig::m1(), ModelConfig::m1_wide()] {
            let device = Device::flex();
            let client = config.init_client(7, &device);
            let values = client.parameters();
            assert_eq!(values.len(), config.client_parameter_count());
            let back = config.client_from_parameters(&values, &device).unwrap();
            assert_eq!(back.parameters(), values);
            let beats = Tensor::<3>::from_data(
                TensorData::new(vec![0.25f32; 2 * config.beat_len], [2, 1, config.beat_len]),
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
