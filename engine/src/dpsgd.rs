//! DP-SGD at the hospital: every step trains on a Poisson sample of the training set, padded to
//! a fixed number of rows; each beat's gradient is clipped and Gaussian noise is added to the
//! sums before anything computed from them leaves the agent.
//!
//! What leaves, per step: the server layer's gradient (to the coordinator) and, through the
//! client weights sealed at the end of the visit, the client layers' update (to the next
//! hospital). A beat's contribution to the two is one vector; each part is clipped to
//! `clip_norm / √2` (the server part to `clip_norm` alone when the client layers are frozen),
//! so the whole vector's norm is at most `clip_norm`, and every coordinate of both sums gets
//! noise of standard deviation `noise_multiplier · clip_norm`. That is the subsampled Gaussian
//! mechanism with sensitivity `clip_norm` that [`crate::dp`] accounts for. The noised sums are
//! divided by the expected batch, so they take the place of a batch's mean gradient.
//!
//! The sampling and the noise draw from the operating system's entropy (ChaCha20): the job's
//! seed is known to the coordinator, and the guarantee needs randomness it cannot know. Tests
//! and benchmarks may fix a seed.

use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha20Rng;

use crate::model::ModelConfig;

/// A hospital's DP-SGD settings for one visit.
#[derive(Clone, Debug, PartialEq)]
pub struct DpSgd {
    /// C: the bound on each beat's gradient (both parts together).
    pub clip_norm: f64,
    /// σ: the noise's standard deviation over C.
    pub noise_multiplier: f64,
    /// The expected batch `q · N`: the noised sums are divided by it.
    pub expected_batch: f64,
    /// Rows of every training step's batch: the Poisson sample and dummy rows.
    pub padded_batch: usize,
    /// Fixes the noise (tests and benchmarks); `None`: the operating system's entropy.
    pub seed: Option<u64>,
}

fn rng(seed: Option<u64>) -> ChaCha20Rng {
    match seed {
        Some(s) => ChaCha20Rng::seed_from_u64(s),
        None => ChaCha20Rng::from_os_rng(),
    }
}

/// The clipping and noise of one client session.
pub(crate) struct Mechanism {
    pub(crate) config: DpSgd,
    rng: ChaCha20Rng,
}

impl Mechanism {
    pub(crate) fn new(config: DpSgd) -> Self {
        let rng = rng(config.seed);
        Self { config, rng }
    }

    /// One standard normal draw (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.rng.random::<f64>(); // (0, 1]
        let u2 = self.rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `(Σ_b min(1, bound / ‖x_b‖) · x_b + N(0, (σ·C)²)) / expected_batch`, per coordinate.
    ///
    /// # Shapes
    /// `samples`: each `[dim]` → `[dim]`.
    pub(crate) fn noisy_mean(&mut self, samples: &[Vec<f32>], dim: usize, bound: f64) -> Vec<f32> {
        let mut sum = vec![0f64; dim];
        for x in samples {
            debug_assert_eq!(x.len(), dim);
            let norm = x
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt();
            let scale = if norm > bound { bound / norm } else { 1.0 };
            sum.iter_mut()
                .zip(x)
                .for_each(|(s, &v)| *s += scale * f64::from(v));
        }
        let std = self.config.noise_multiplier * self.config.clip_norm;
        let over = 1.0 / self.config.expected_batch;
        let mut out = Vec::with_capacity(dim);
        for s in sum {
            out.push(((s + std * self.normal()) * over) as f32);
        }
        out
    }

    /// The bound on one part of a beat's gradient when it has `parts` parts.
    pub(crate) fn part_bound(&self, parts: usize) -> f64 {
        self.config.clip_norm / (parts as f64).sqrt()
    }
}

/// The batches of DP-SGD: each step takes every one of `n` training samples independently with
/// probability `q`. A draw of more than `padded` samples (its probability over a whole job is
/// part of δ, see [`crate::dp::padded_batch`]) is cut down to a uniformly chosen `padded` of
/// them.
pub struct PoissonBatches {
    n: usize,
    q: f64,
    padded: usize,
    rng: ChaCha20Rng,
}

impl PoissonBatches {
    /// `seed`: fixes the draws (tests and benchmarks); `None`: the operating system's entropy.
    pub fn new(n: usize, q: f64, padded: usize, seed: Option<u64>) -> Self {
        Self {
            n,
            q: q.clamp(0.0, 1.0),
            padded,
            rng: rng(seed),
        }
    }

    /// The indices of the next step's sample, at most `padded` of them (possibly none).
    pub fn next_batch(&mut self) -> Vec<usize> {
        let mut batch: Vec<usize> = (0..self.n)
            .filter(|_| self.rng.random::<f64>() < self.q)
            .collect();
        if batch.len() > self.padded {
            batch.shuffle(&mut self.rng);
            batch.truncate(self.padded);
            batch.sort_unstable();
        }
        batch
    }
}

/// Each beat's own gradient of the client layers, computed directly (DP-SGD needs one per beat,
/// and a backward pass of the tensor library per beat costs far more than the arithmetic).
/// The layers are those of [`crate::model::ClientNet`]: per block a convolution padded by
/// `k / 2` on both sides, LeakyReLU, max-pooling with stride equal to its window; the cut is
/// the pooled output flattened channel-major, then the side features; the optional tail is
/// LeakyReLU then Linear on the server layer's outputs.
pub(crate) struct ClientLayers<'a> {
    config: &'a ModelConfig,
    /// The client's parameters, in the order of [`crate::model::ClientNet::parameters`].
    params: &'a [f32],
}

impl<'a> ClientLayers<'a> {
    pub(crate) fn new(config: &'a ModelConfig, params: &'a [f32]) -> Self {
        debug_assert_eq!(params.len(), config.client_parameter_count());
        Self { config, params }
    }

    fn leaky(&self, v: f32) -> f32 {
        if v >= 0.0 {
            v
        } else {
            v * self.config.leaky_slope as f32
        }
    }

    fn leaky_slope_at(&self, v: f32) -> f32 {
        if v >= 0.0 {
            1.0
        } else {
            self.config.leaky_slope as f32
        }
    }

    /// The convolution parameters' gradient of one row, given dJ/d(cut) for it, laid out as
    /// the convolution part of [`crate::model::ClientNet::parameters`].
    ///
    /// # Shapes
    /// `row`: `[input_len]`; `cut_grad`: `[cut]` → `[conv parameters]`.
    pub(crate) fn conv_gradient(&self, row: &[f32], cut_grad: &[f32]) -> Vec<f32> {
        // Forward, keeping each block's padded input and the position each pooled value came
        // from.
        struct Block {
            c_in: usize,
            c_out: usize,
            kernel: usize,
            len: usize,
            /// `[c_in, len + 2·(k/2)]`.
            padded: Vec<f32>,
            /// `[c_out, len]`: the convolution's output before the activation.
            pre: Vec<f32>,
            /// `[c_out, len / pool]`: the index in `pre` of each pooled value.
            argmax: Vec<usize>,
            /// Offset of the block's weights in the parameters.
            offset: usize,
        }
        let mut blocks: Vec<Block> = Vec::with_capacity(self.config.blocks.len());
        let mut x = row[..self.config.beat_len].to_vec();
        let (mut c_in, mut len, mut offset) = (1, self.config.beat_len, 0);
        for b in &self.config.blocks {
            let (c_out, k, pad) = (b.channels, b.kernel, b.kernel / 2);
            let width = len + 2 * pad;
            let mut padded = vec![0f32; c_in * width];
            for (ci, xs) in x.chunks_exact(len).enumerate() {
                padded[ci * width + pad..ci * width + pad + len].copy_from_slice(xs);
            }
            let weights = &self.params[offset..offset + c_out * c_in * k];
            let bias = &self.params[offset + c_out * c_in * k..offset + c_out * c_in * k + c_out];
            let mut pre = vec![0f32; c_out * len];
            for co in 0..c_out {
                let out = &mut pre[co * len..(co + 1) * len];
                out.fill(bias[co]);
                for ci in 0..c_in {
                    let xs = &padded[ci * width..(ci + 1) * width];
                    for j in 0..k {
                        let w = weights[(co * c_in + ci) * k + j];
                        out.iter_mut()
                            .zip(&xs[j..j + len])
                            .for_each(|(o, v)| *o += w * v);
                    }
                }
            }
            let pooled = len / b.pool;
            let mut argmax = Vec::with_capacity(c_out * pooled);
            let mut next = Vec::with_capacity(c_out * pooled);
            for co in 0..c_out {
                for p in 0..pooled {
                    let start = co * len + p * b.pool;
                    let window = &pre[start..start + b.pool];
                    let (i, &m) =
                        window
                            .iter()
                            .enumerate()
                            .fold((0, &f32::NEG_INFINITY), |best, cur| {
                                if cur.1 > best.1 { cur } else { best }
                            });
                    argmax.push(start + i);
                    next.push(self.leaky(m));
                }
            }
            blocks.push(Block {
                c_in,
                c_out,
                kernel: k,
                len,
                padded,
                pre,
                argmax,
                offset,
            });
            offset += c_out * c_in * k + c_out;
            x = next;
            c_in = c_out;
            len = pooled;
        }
        // Backward, last block first.
        let mut grads = vec![0f32; offset];
        let mut upstream = cut_grad[..x.len()].to_vec();
        for block in blocks.iter().rev() {
            let Block {
                c_in,
                c_out,
                kernel: k,
                len,
                ..
            } = *block;
            let (pad, width) = (k / 2, len + 2 * (k / 2));
            // dJ/d(pre): each pooled value's gradient through the activation, at its source.
            let mut d_pre = vec![0f32; c_out * len];
            for (&at, &g) in block.argmax.iter().zip(&upstream) {
                d_pre[at] += g * self.leaky_slope_at(block.pre[at]);
            }
            let weights = &self.params[block.offset..block.offset + c_out * c_in * k];
            let (dw, rest) = grads[block.offset..].split_at_mut(c_out * c_in * k);
            let db = &mut rest[..c_out];
            let mut d_padded = vec![0f32; c_in * width];
            for co in 0..c_out {
                let d = &d_pre[co * len..(co + 1) * len];
                db[co] = d.iter().sum();
                for ci in 0..c_in {
                    let xs = &block.padded[ci * width..(ci + 1) * width];
                    let dx = &mut d_padded[ci * width..(ci + 1) * width];
                    for j in 0..k {
                        let idx = (co * c_in + ci) * k + j;
                        dw[idx] = d.iter().zip(&xs[j..j + len]).map(|(a, b)| a * b).sum();
                        let w = weights[idx];
                        dx[j..j + len]
                            .iter_mut()
                            .zip(d)
                            .for_each(|(o, g)| *o += w * g);
                    }
                }
            }
            upstream = d_padded
                .chunks_exact(width)
                .flat_map(|c| c[pad..pad + len].iter().copied())
                .collect();
        }
        grads
    }

    /// With a tail: one row's loss gradient with respect to the server layer's outputs and the
    /// tail's parameters, from the gradient of the loss with respect to the logits.
    ///
    /// # Shapes
    /// `outputs`: `[tail]`; `d_logits`: `[classes]` → (`[tail]`, `[tail·classes + classes]`).
    pub(crate) fn tail_gradient(&self, outputs: &[f32], d_logits: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (width, classes) = (outputs.len(), d_logits.len());
        let weights = &self.params[self.params.len() - width * classes - classes..];
        let mut grads = Vec::with_capacity(width * classes + classes);
        let mut d_outputs = Vec::with_capacity(width);
        for (i, &o) in outputs.iter().enumerate() {
            let h = self.leaky(o);
            grads.extend(d_logits.iter().map(|&d| h * d));
            let back: f32 = (0..classes)
                .map(|c| weights[i * classes + c] * d_logits[c])
                .sum();
            d_outputs.push(back * self.leaky_slope_at(o));
        }
        grads.extend_from_slice(d_logits);
        (d_outputs, grads)
    }

    /// With a tail: the logits of one row's server-layer outputs.
    pub(crate) fn tail_logits(&self, outputs: &[f32]) -> Vec<f32> {
        let (width, classes) = (outputs.len(), self.config.classes);
        let tail = &self.params[self.params.len() - width * classes - classes..];
        let (weights, bias) = tail.split_at(width * classes);
        let mut logits = bias.to_vec();
        for (i, &o) in outputs.iter().enumerate() {
            let h = self.leaky(o);
            logits
                .iter_mut()
                .zip(&weights[i * classes..(i + 1) * classes])
                .for_each(|(l, w)| *l += h * w);
        }
        logits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mechanism(sigma: f64) -> Mechanism {
        Mechanism::new(DpSgd {
            clip_norm: 1.0,
            noise_multiplier: sigma,
            expected_batch: 2.0,
            padded_batch: 4,
            seed: Some(7),
        })
    }

    #[test]
    fn each_sample_is_clipped_before_the_sum() {
        let mut m = mechanism(0.0);
        // Norms 5 and 0.5: the first is scaled to 1, the second kept.
        let out = m.noisy_mean(&[vec![3.0, 4.0], vec![0.3, 0.4]], 2, 1.0);
        let want = [(0.6 + 0.3) / 2.0, (0.8 + 0.4) / 2.0];
        for (o, w) in out.iter().zip(want) {
            assert!((f64::from(*o) - w).abs() < 1e-6, "{out:?}");
        }
        assert!((m.part_bound(2) - 0.5f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn the_noise_has_the_stated_standard_deviation() {
        let mut m = mechanism(1.5);
        let out = m.noisy_mean(&[], 200_000, 1.0);
        let n = out.len() as f64;
        let mean = out.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = out
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        // σ·C / expected_batch = 0.75.
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var.sqrt() - 0.75).abs() < 0.01, "{}", var.sqrt());
    }

    #[test]
    fn poisson_batches_take_each_sample_with_probability_q_and_respect_the_pad() {
        let mut b = PoissonBatches::new(1000, 0.05, 1000, Some(3));
        let mut counts = vec![0u32; 1000];
        let steps = 2000;
        let mut sizes = 0usize;
        for _ in 0..steps {
            let batch = b.next_batch();
            assert!(batch.windows(2).all(|w| w[0] < w[1]));
            sizes += batch.len();
            batch.iter().for_each(|&i| counts[i] += 1);
        }
        let mean = sizes as f64 / steps as f64;
        assert!((mean - 50.0).abs() < 1.0, "{mean}");
        // Every sample is drawn about q · steps = 100 times.
        assert!(counts.iter().all(|&c| (50..160).contains(&c)));
        let mut capped = PoissonBatches::new(1000, 0.05, 40, Some(3));
        let sizes: Vec<usize> = (0..200).map(|_| capped.next_batch().len()).collect();
        assert!(sizes.iter().all(|&s| s <= 40) && sizes.contains(&40));
        // Unseeded draws differ.
        let mut a = PoissonBatches::new(1000, 0.05, 1000, None);
        let mut c = PoissonBatches::new(1000, 0.05, 1000, None);
        assert_ne!(a.next_batch(), c.next_batch());
    }
}
