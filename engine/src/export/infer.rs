//! Inference with a trained model in plain Rust: the same arithmetic as the burn halves
//! (`ClientNet::forward`, `ServerNet::forward`, `ClientNet::head`), one row at a time, without
//! a tensor library's per-call overhead. A test checks it against burn.

use super::TrainedModel;

/// One convolution block's weights.
struct Block {
    c_in: usize,
    c_out: usize,
    kernel: usize,
    pool: usize,
    /// `[c_out, c_in, kernel]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// A linear layer with its weight stored `[out, in]`, so each output is one dot product.
struct Dense {
    inputs: usize,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Dense {
    /// From MedSplit's `[in, out]` weight.
    fn new(values: &[f32], inputs: usize, outputs: usize) -> Self {
        let (w, b) = values.split_at(inputs * outputs);
        let mut weight = vec![0.0; w.len()];
        for i in 0..inputs {
            for o in 0..outputs {
                weight[o * inputs + i] = w[i * outputs + o];
            }
        }
        Self {
            inputs,
            weight,
            bias: b.to_vec(),
        }
    }

    #[inline(always)]
    fn forward(&self, x: &[f32], out: &mut [f32]) {
        for ((o, w), b) in out
            .iter_mut()
            .zip(self.weight.chunks_exact(self.inputs))
            .zip(&self.bias)
        {
            *o = b + dot(w, x);
        }
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: the compiler keeps them in one vector register.
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// A trained model ready to classify rows (`beat_len` samples, then the side features).
pub struct Classifier {
    beat_len: usize,
    features: usize,
    classes: usize,
    slope: f32,
    blocks: Vec<Block>,
    server: Dense,
    tail: Option<Dense>,
}

/// Buffers one thread reuses from row to row.
#[derive(Default)]
pub struct Scratch {
    padded: Vec<f32>,
    conv: Vec<f32>,
    cut: Vec<f32>,
    outputs: Vec<f32>,
}

impl Classifier {
    pub fn new(model: &TrainedModel) -> Self {
        let config = &model.config;
        let mut rest = model.client.as_slice();
        let mut take = |n: usize| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        };
        let mut c_in = 1;
        let mut blocks = Vec::new();
        for b in &config.blocks {
            let weight = take(b.channels * c_in * b.kernel).to_vec();
            let bias = take(b.channels).to_vec();
            blocks.push(Block {
                c_in,
                c_out: b.channels,
                kernel: b.kernel,
                pool: b.pool,
                weight,
                bias,
            });
            c_in = b.channels;
        }
        let tail = config
            .tail
            .map(|width| Dense::new(take((width + 1) * config.classes), width, config.classes));
        Self {
            beat_len: config.beat_len,
            features: config.features,
            classes: config.classes,
            slope: config.leaky_slope as f32,
            server: Dense::new(&model.server, config.cut_width().0, config.server_outputs()),
            blocks,
            tail,
        }
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Values per input row.
    pub fn input_len(&self) -> usize {
        self.beat_len + self.features
    }

    #[inline(always)]
    fn leaky(&self, v: f32) -> f32 {
        if v >= 0.0 { v } else { v * self.slope }
    }

    /// The logits of one row into `logits` (`classes` values).
    pub fn logits_into(&self, row: &[f32], scratch: &mut Scratch, logits: &mut [f32]) {
        assert_eq!(row.len(), self.input_len(), "row length");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { self.logits_avx2(row, scratch, logits) };
        }
        self.logits_with(row, scratch, logits);
    }

    /// [`Self::logits_with`] compiled for AVX2: the loops vectorise eight lanes wide instead of
    /// SSE2's four (the same arithmetic, in the same order).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn logits_avx2(&self, row: &[f32], scratch: &mut Scratch, logits: &mut [f32]) {
        self.logits_with(row, scratch, logits);
    }

    #[inline(always)]
    fn logits_with(&self, row: &[f32], scratch: &mut Scratch, logits: &mut [f32]) {
        let Scratch {
            padded,
            conv,
            cut,
            outputs,
        } = scratch;
        cut.clear();
        cut.extend_from_slice(&row[..self.beat_len]);
        let mut len = self.beat_len;
        for b in &self.blocks {
            let pad = b.kernel / 2;
            let width = len + 2 * pad;
            // The input, zero-padded on both sides, channel by channel.
            padded.clear();
            padded.resize(b.c_in * width, 0.0);
            for (ci, x) in cut.chunks_exact(len).enumerate() {
                padded[ci * width + pad..ci * width + pad + len].copy_from_slice(x);
            }
            conv.clear();
            conv.resize(b.c_out * len, 0.0);
            let taps_per_channel = b.c_in * b.kernel;
            // Four output channels at a time: each input sample loaded once feeds four sums.
            for (quad, block) in conv.chunks_mut(4 * len).enumerate() {
                let first = 4 * quad;
                for (i, acc) in block.chunks_exact_mut(len).enumerate() {
                    acc.fill(b.bias[first + i]);
                }
                let weight = |co: usize, ci: usize, j: usize| {
                    b.weight[co * taps_per_channel + ci * b.kernel + j]
                };
                if block.len() == 4 * len {
                    let (a0, rest) = block.split_at_mut(len);
                    let (a1, rest) = rest.split_at_mut(len);
                    let (a2, a3) = rest.split_at_mut(len);
                    for ci in 0..b.c_in {
                        let x = &padded[ci * width..(ci + 1) * width];
                        for j in 0..b.kernel {
                            let w = [0, 1, 2, 3].map(|q| weight(first + q, ci, j));
                            let lanes = x[j..j + len]
                                .iter()
                                .zip(a0.iter_mut())
                                .zip(a1.iter_mut())
                                .zip(a2.iter_mut())
                                .zip(a3.iter_mut());
                            for ((((v, p0), p1), p2), p3) in lanes {
                                *p0 += w[0] * v;
                                *p1 += w[1] * v;
                                *p2 += w[2] * v;
                                *p3 += w[3] * v;
                            }
                        }
                    }
                } else {
                    for (i, acc) in block.chunks_exact_mut(len).enumerate() {
                        for ci in 0..b.c_in {
                            let x = &padded[ci * width..(ci + 1) * width];
                            for j in 0..b.kernel {
                                let w = weight(first + i, ci, j);
                                for (a, v) in acc.iter_mut().zip(&x[j..j + len]) {
                                    *a += w * v;
                                }
                            }
                        }
                    }
                }
            }
            // LeakyReLU then max-pooling (the activation is monotonic: pooled = max of the
            // activated values, as in burn).
            let pooled_len = len / b.pool;
            cut.clear();
            for acc in conv.chunks_exact(len) {
                for window in acc[..pooled_len * b.pool].chunks_exact(b.pool) {
                    let max = window.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    cut.push(self.leaky(max));
                }
            }
            len = pooled_len;
        }
        cut.extend_from_slice(&row[self.beat_len..]);
        match &self.tail {
            None => self.server.forward(cut, logits),
            Some(tail) => {
                outputs.clear();
                outputs.resize(self.server.bias.len(), 0.0);
                self.server.forward(cut, outputs);
                for v in outputs.iter_mut() {
                    *v = self.leaky(*v);
                }
                tail.forward(outputs, logits);
            }
        }
    }

    /// Logits of `rows` (row after row), `[rows, classes]`.
    pub fn logits(&self, rows: &[f32]) -> Vec<f32> {
        let mut scratch = Scratch::default();
        let mut out = vec![0.0; rows.len() / self.input_len() * self.classes];
        for (row, logits) in rows
            .chunks_exact(self.input_len())
            .zip(out.chunks_exact_mut(self.classes))
        {
            self.logits_into(row, &mut scratch, logits);
        }
        out
    }
}

/// Softmax of one row of logits, in place.
pub fn softmax_assign(logits: &mut [f32]) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0;
    for v in logits.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in logits.iter_mut() {
        *v /= sum;
    }
}

/// The burn halves' logits of `rows`: MedSplit's own forward pass, the reference that this
/// module and the ONNX graph are checked against.
pub fn burn_logits(model: &TrainedModel, rows: &[f32]) -> Vec<f32> {
    use burn::tensor::{Device, Tensor, TensorData};
    let device = Device::flex();
    let config = &model.config;
    let client = config
        .client_from_parameters(&model.client, &device)
        .expect("checked model");
    let server = config
        .server_from_parameters(&model.server, &device)
        .expect("checked model");
    let n = rows.len() / config.input_len();
    let x = Tensor::<2>::from_data(
        TensorData::new(rows.to_vec(), [n, config.input_len()]),
        &device,
    );
    crate::model::tensor_values(client.head(server.forward(client.forward(x))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tests::{random_model, shapes};

    #[test]
    fn agrees_with_burn() {
        for config in shapes() {
            let model = random_model(&config, 3);
            let n = 37;
            let rows: Vec<f32> = (0..n * config.input_len())
                .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5)
                .collect();
            let ours = Classifier::new(&model).logits(&rows);
            let burn = burn_logits(&model, &rows);
            assert_eq!(ours.len(), n * config.classes);
            let worst = ours
                .iter()
                .zip(&burn)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-5, "{config:?}: worst difference {worst}");
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut v = [1.0, 2.0, 3.0, 1000.0];
        softmax_assign(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(v[3] > 0.999);
    }
}
