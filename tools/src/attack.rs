//! What the coordinator can reconstruct from what it receives: an attack harness on real
//! training.
//!
//! The harness plays the coordinator. A [`ClientSession`] and a [`ServerSession`] train as in a
//! job; every client message is decoded with the wire types, and the attacker uses only what the
//! coordinator holds: the batch-summed gradient of its layer (`Σ_b a_bᵀ g_b`, `Σ_b g_b`), the
//! batch size, its own weights and the job's objective (class weights). From these it
//! reconstructs each sample's cut-layer activation and label. The client's true activations
//! (its weights right before the step) and labels are used for scoring only.
//!
//! Attackers:
//! - **honest-but-curious** (the coordinator's layer trains as usual):
//!   - batch 1: `Σ aᵀg = a gᵀ`, so `a = (Σ aᵀg)·g / ‖g‖²` exactly; the label is the negative
//!     entry of `g = (softmax − onehot)·w`;
//!   - any batch: *class sums*. Treating every sample of class `j` as having the same softmax
//!     `q_j`, `Σ g = Σ_j x_j (q_j − e_j)` gives the label counts and `Σ aᵀg = Σ_j T_j (q_j − e_j)ᵀ`
//!     the per-class sums of activations (exactly when a class is absent from the batch; with
//!     every class present one direction is unidentifiable and is filled with the attacker's
//!     running estimate of the mean activation). `q_j` is re-estimated from the recovered class
//!     means through the known server layer, a few rounds;
//!   - batches up to `classes − 1` samples (the rank of `Σ aᵀg`): every activation lies in the
//!     column space of `Σ aᵀg`. For each multiset of labels, the coordinates of the activations in
//!     that space are solved for by Levenberg–Marquardt so that the server layer's own softmax
//!     reproduces both sums; the multiset with the smallest residual wins.
//! - **malicious** (it chooses the weights of the attacked steps): all weights zero but one
//!   "fishing" column `M·w` along a fixed random direction `w`, with biases `0` for the
//!   commonest class `d`, `−M·τ` for the rarest class `m` and `−30` for the others. Every sample's
//!   softmax saturates at `e_d` (or at `e_m` above the threshold `τ`), so the column of each other
//!   class is minus the sum of that class's activations (its count is exact: `−B·Σg_j`), and
//!   column `m` is the activation of the samples above the threshold (minus class `m`'s sum).
//!   The threshold tracks the count of samples above it (`B·Σg_m`) towards one per batch.
//!
//! Scores, per batch size: the *centered* cosine (both vectors minus the training set's mean
//! activation under the client's current weights) between each true activation and the
//! recovered one it is matched to (a maximum-weight one-to-one assignment of the batch's
//! recovered vectors to its samples on centered cosine), its median, the share above 0.9, the
//! share of matched labels that are right, and the leave-one-out k-NN accuracy of the recovered
//! activations (centered, cosine, with the true labels) next to the majority-class rate.

use std::fmt::Write as _;

use anyhow::{Context, bail};
use medsplit_engine::data::Dataset;
use medsplit_engine::dp;
use medsplit_engine::dpsgd::{DpSgd, PoissonBatches};
use medsplit_engine::model::{ModelConfig, Objective, ServerOptimizer};
use medsplit_engine::protocol::{
    ClientEvent, ClientSession, Privacy, ServerSession, layer_gradient,
};
use medsplit_engine::training::{SampleStream, gather};
use medsplit_engine::wire::{Activations, ClientMessage, Gradients, LayerGradient};
use serde::Serialize;

/// Differential privacy of the attacked training (DP-SGD at the client).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DpOptions {
    /// σ, or `None` with `target_epsilon`.
    pub noise_multiplier: Option<f64>,
    /// ε for a 10-round job of one pass per visit over the training set.
    pub target_epsilon: Option<f64>,
    pub delta: f64,
    pub clip_norm: f64,
}

/// What to attack.
#[derive(Clone, Debug)]
pub struct AttackOptions {
    pub batch_sizes: Vec<usize>,
    /// Samples attacked per window (the steps of a window: this over the batch size, rounded up).
    pub samples: usize,
    /// Training samples between the first window (the start of training) and a second one;
    /// 0: the first window only.
    pub later: usize,
    /// Also run the malicious coordinator (its own training run per batch size).
    pub malicious: bool,
    /// `Encrypted` (`split-he`, what a job runs) or `Plaintext`, where the harness forms the
    /// same sums itself from the plaintext activations and dJ/dlogits.
    pub privacy: Privacy,
    /// Neighbours of the k-NN score.
    pub knn_k: usize,
    /// Training rows whose mean activation centers the cosines.
    pub reference_rows: usize,
    pub seed: u64,
    pub dp: Option<DpOptions>,
}

impl Default for AttackOptions {
    fn default() -> Self {
        Self {
            batch_sizes: vec![1, 2, 4, 8, 32],
            samples: 512,
            later: 0,
            malicious: false,
            privacy: Privacy::Encrypted,
            knn_k: 5,
            reference_rows: 512,
            seed: 0,
            dp: None,
        }
    }
}

/// The training being attacked.
pub struct Target<'a> {
    pub config: &'a ModelConfig,
    pub objective: Objective,
    pub optimizer: ServerOptimizer,
    pub train: &'a Dataset,
}

/// The figures of one attacker on one window of one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct AttackResult {
    pub batch_size: usize,
    pub dp: bool,
    /// ε of the attacked training at δ = 1e-5 (absent without DP).
    pub epsilon: Option<f64>,
    /// Median centered cosine of the samples to their matched recovered activations.
    pub cosine_median: f64,
    /// Share of samples recovered above centered cosine 0.9.
    pub recovered_share: f64,
    /// Share of samples whose matched recovered label is right (absent when the server layer's
    /// outputs are not the logits).
    pub label_recovery: Option<f64>,
    /// Leave-one-out k-NN accuracy of the recovered activations with the true labels.
    pub knn_accuracy: f64,
    /// Share of the commonest class among the scored samples.
    pub majority_rate: f64,
    pub attacker: &'static str,
    /// `start` (the first steps of training) or `later` (after `step_offset` samples).
    pub window: &'static str,
    pub step_offset: u64,
    pub samples: usize,
    pub steps: usize,
    pub cosine_mean: f64,
    /// Share above centered cosine 0.99.
    pub exact_share: f64,
    /// Median plain (uncentered) cosine, for comparison with the centered one.
    pub plain_cosine_median: f64,
    pub knn_k: usize,
    pub privacy: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AttackReport {
    /// The training set attacked (filled in by the caller).
    pub dataset: String,
    pub matching: &'static str,
    pub centering: &'static str,
    pub results: Vec<AttackResult>,
}

/// Runs every attacker on every batch size.
pub fn run(target: &Target, options: &AttackOptions) -> anyhow::Result<AttackReport> {
    if options.dp.is_some() && options.privacy != Privacy::Encrypted {
        bail!("DP-SGD needs split-he (--attack-privacy split-he)");
    }
    if options.samples == 0 || options.batch_sizes.contains(&0) || options.knn_k == 0 {
        bail!("attack samples, batch sizes and k must be at least 1");
    }
    let mut results = Vec::new();
    let attackers: &[Kind] = if options.malicious {
        &[Kind::Honest, Kind::Malicious]
    } else {
        &[Kind::Honest]
    };
    for &kind in attackers {
        for &batch in &options.batch_sizes {
            results.extend(attack_run(target, options, batch, kind)?);
        }
    }
    Ok(AttackReport {
        dataset: String::new(),
        matching: "per batch, a maximum-weight one-to-one assignment (Hungarian) of recovered \
                   vectors to samples on centered cosine",
        centering: "both vectors minus the mean activation of reference training rows under the \
                    client's weights at the step",
        results,
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Honest,
    Malicious,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Honest => "honest-but-curious",
            Kind::Malicious => "malicious",
        }
    }
}

/// One sample's score.
struct Scored {
    cosine: f64,
    plain: f64,
    label_ok: Option<bool>,
    label: u8,
    /// The matched recovered activation, centered.
    recovered: Vec<f64>,
}

fn attack_run(
    target: &Target,
    options: &AttackOptions,
    batch: usize,
    kind: Kind,
) -> anyhow::Result<Vec<AttackResult>> {
    let config = target.config;
    let (privacy, seed) = (options.privacy, options.seed);
    let mut client = ClientSession::new(config, privacy, seed)?;
    client.set_objective(target.objective.clone())?;
    // With DP-SGD: the plan of a 10-round job of one pass per visit over this training set at
    // this expected batch; every step a Poisson sample, padded.
    let n = target.train.len() as u64;
    let mut epsilon = None;
    let mut poisson = None;
    if let Some(dp) = &options.dp {
        let schedule = dp::Schedule {
            batch_size: batch as u32,
            rounds: 10,
            local_epochs: 1,
            local_steps: None,
        };
        let plan = dp::plan_with(
            dp.noise_multiplier,
            dp.target_epsilon,
            dp.delta,
            &schedule,
            n,
        )?;
        eprintln!(
            "attack batch {batch}: DP-SGD q = {:.2e}, σ = {:.3}, {} rows per step, ε = {:.3} at δ = {} for 10 rounds",
            plan.sampling_rate, plan.noise_multiplier, plan.padded_batch, plan.epsilon, plan.delta
        );
        epsilon = Some(plan.epsilon);
        client = client.with_dp(DpSgd {
            clip_norm: dp.clip_norm,
            noise_multiplier: plan.noise_multiplier,
            expected_batch: plan.sampling_rate * n as f64,
            padded_batch: plan.padded_batch as usize,
            seed: Some(seed),
        })?;
        poisson = Some(PoissonBatches::new(
            n as usize,
            plan.sampling_rate,
            plan.padded_batch as usize,
            Some(seed),
        ));
    }
    // The next step's samples: `k` from the stream, or the next Poisson sample with DP.
    let mut next = |stream: &mut SampleStream, k: usize| match &mut poisson {
        Some(p) => p.next_batch(),
        None => stream.take(k),
    };
    let mut server = ServerSession::new(config, privacy, target.optimizer, seed)?;
    let mut stream = SampleStream::starting_at(target.train.len(), seed, 0)
        .context("the training set is empty")?;
    let reference = reference_rows(target.train, options.reference_rows, seed);
    let mut attacker = Attacker::new(config, target.objective.class_weights.clone(), seed);
    let steps = options.samples.div_ceil(batch);
    let mut windows = vec![("start", 0u64)];
    if options.later > 0 {
        windows.push(("later", (steps * batch + options.later) as u64));
    }
    let mut out = Vec::new();
    let mut position = 0u64;
    for (window, offset) in windows {
        // Plain training up to the window.
        while position < offset {
            let k = batch.min((offset - position) as usize);
            let (rows, labels) = gather(target.train, &next(&mut stream, k));
            step(&mut client, &mut server, &rows, &labels, None)?;
            position += k as u64;
        }
        let mut scored = Vec::new();
        let mut mean = Vec::new();
        for s in 0..steps {
            let (rows, labels) = gather(target.train, &next(&mut stream, batch));
            position += batch as u64;
            // The attacker is told how many real rows a padded DP batch holds (a stronger
            // attacker than the coordinator); an empty sample leaves nothing to recover.
            let real = labels.len();
            let parameters = client.model().parameters();
            if s % 8 == 0 {
                mean = mean_activation(config, &parameters, &reference)?;
            }
            let truth = activations(config, &parameters, &rows)?;
            let view = match kind {
                Kind::Honest => {
                    let (weights, bias) = server.model()?.weights();
                    let view = step(&mut client, &mut server, &rows, &labels, Some(real))?
                        .context("the step's gradient")?;
                    if real == 0 {
                        continue;
                    }
                    attacker.honest(&view, &weights, &bias, real)
                }
                Kind::Malicious => {
                    let (weights, bias) = attacker.fishing_layer(s, real.max(1));
                    let mut chosen = weights.clone();
                    chosen.extend(&bias);
                    let mut fishing =
                        ServerSession::resume(config, privacy, target.optimizer, &chosen)?;
                    let view = step(&mut client, &mut fishing, &rows, &labels, Some(real))?
                        .context("the step's gradient")?;
                    if real == 0 {
                        continue;
                    }
                    attacker.malicious(&view, &weights, &bias, real, s)
                }
            };
            scored.extend(score(&truth, &labels, &view, &mean, config.cut_width().0));
        }
        out.push(summarise(
            &scored,
            options,
            batch,
            kind,
            window,
            offset,
            steps,
            config.tail.is_none(),
        ));
        out.last_mut().expect("a result").epsilon = epsilon;
        let last = out.last().expect("a result");
        eprintln!(
            "attack {:>18} batch {:>2} {:>5}: centered cosine median {:.3}, > 0.9 {:.3}, labels {}, k-NN {:.3} (majority {:.3})",
            kind.name(),
            batch,
            window,
            last.cosine_median,
            last.recovered_share,
            last.label_recovery
                .map_or("-".to_owned(), |l| format!("{l:.3}")),
            last.knn_accuracy,
            last.majority_rate
        );
    }
    Ok(out)
}

/// One training step through the serialized messages. With `observe`, returns the coordinator's
/// view of the step's gradient: the batch-summed gradient of its layer as the backward message
/// carries it (`split-he`), or as the coordinator forms it from the plaintext messages (`split`).
fn step(
    client: &mut ClientSession,
    server: &mut ServerSession,
    rows: &[f32],
    labels: &[u8],
    observe: Option<usize>,
) -> anyhow::Result<Option<LayerGradient>> {
    let forward = client.start(rows, labels, true)?;
    let plain_activations = match ClientMessage::decode(&forward)? {
        ClientMessage::Forward {
            activations: Activations::Plain(a),
            ..
        } => Some(a),
        _ => None,
    };
    client.prepare();
    let reply = server.handle(&forward)?;
    server.prepare()?;
    let ClientEvent::Send(backward) = client.on_message(&reply)? else {
        bail!("a training step continues with a backward message");
    };
    let view = match (observe, ClientMessage::decode(&backward)?) {
        (None, _) => None,
        (
            Some(_),
            ClientMessage::Backward(Gradients::Encrypted {
                weight_grad,
                bias_grad,
                ..
            }),
        ) => Some(LayerGradient {
            weight: weight_grad,
            bias: bias_grad,
        }),
        (Some(batch), ClientMessage::Backward(Gradients::Plain(g))) => {
            let a = plain_activations.context("plaintext activations")?;
            let outputs = g.len() / batch;
            Some(layer_gradient(&a, &g, a.len() / batch, outputs))
        }
        _ => bail!("unexpected backward message"),
    };
    client.prepare();
    let reply = server.handle(&backward)?;
    server.prepare()?;
    match client.on_message(&reply)? {
        ClientEvent::Trained(_) => Ok(view),
        _ => bail!("the training step did not finish"),
    }
}

fn reference_rows(train: &Dataset, n: usize, seed: u64) -> Vec<f32> {
    let mut stream = SampleStream::starting_at(train.len(), seed ^ 0x5eed, 0).expect("non-empty");
    gather(train, &stream.take(n.min(train.len()).max(1))).0
}

/// Cut-layer activations of input rows under client `parameters`, `[B, cut]` row-major: the
/// activations of a plaintext evaluation message of a session holding those parameters (ground
/// truth for scoring; the attacker never sees them).
fn activations(config: &ModelConfig, parameters: &[f32], rows: &[f32]) -> anyhow::Result<Vec<f32>> {
    let mut session = ClientSession::resume(config, Privacy::Plaintext, parameters)?;
    let mut out = Vec::with_capacity(rows.len() / config.input_len() * config.cut_width().0);
    for chunk in rows.chunks(config.input_len() * 1024) {
        match ClientMessage::decode(&session.start(chunk, &[], false)?)? {
            ClientMessage::Forward {
                activations: Activations::Plain(a),
                ..
            } => out.extend(a),
            _ => bail!("a plaintext forward message"),
        }
        session = ClientSession::resume(config, Privacy::Plaintext, parameters)?;
    }
    Ok(out)
}

fn mean_activation(
    config: &ModelConfig,
    parameters: &[f32],
    rows: &[f32],
) -> anyhow::Result<Vec<f64>> {
    let cut = config.cut_width().0;
    let values = activations(config, parameters, rows)?;
    let n = values.len() / cut;
    let mut mean = vec![0f64; cut];
    for a in values.chunks_exact(cut) {
        mean.iter_mut()
            .zip(a)
            .for_each(|(m, &v)| *m += v as f64 / n as f64);
    }
    Ok(mean)
}

/// What the attacker reconstructed of one batch: a vector and a label guess per sample.
struct Recovered {
    vectors: Vec<Vec<f64>>,
    labels: Vec<Option<u8>>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let n = norm(a) * norm(b);
    if n <= 1e-300 { 0.0 } else { dot(a, b) / n }
}

/// Scores a batch: centered cosines, the assignment, the labels.
fn score(truth: &[f32], labels: &[u8], view: &Recovered, mean: &[f64], cut: usize) -> Vec<Scored> {
    let center = |v: &[f64]| v.iter().zip(mean).map(|(x, m)| x - m).collect::<Vec<_>>();
    let true_rows: Vec<Vec<f64>> = truth
        .chunks_exact(cut)
        .map(|a| a.iter().map(|&v| v as f64).collect())
        .collect();
    let centered_true: Vec<Vec<f64>> = true_rows.iter().map(|a| center(a)).collect();
    let centered_rec: Vec<Vec<f64>> = view.vectors.iter().map(|a| center(a)).collect();
    let weights: Vec<Vec<f64>> = centered_true
        .iter()
        .map(|t| centered_rec.iter().map(|r| cosine(t, r)).collect())
        .collect();
    let assignment = hungarian_max(&weights);
    assignment
        .iter()
        .enumerate()
        .map(|(b, &r)| Scored {
            cosine: weights[b][r],
            plain: cosine(&true_rows[b], &view.vectors[r]),
            label_ok: view.labels[r].map(|l| l == labels[b]),
            label: labels[b],
            recovered: centered_rec[r].clone(),
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn summarise(
    scored: &[Scored],
    options: &AttackOptions,
    batch: usize,
    kind: Kind,
    window: &'static str,
    offset: u64,
    steps: usize,
    labels_known: bool,
) -> AttackResult {
    let n = scored.len().max(1) as f64;
    let cosines: Vec<f64> = scored.iter().map(|s| s.cosine).collect();
    let plain: Vec<f64> = scored.iter().map(|s| s.plain).collect();
    let label_recovery =
        labels_known.then(|| scored.iter().filter(|s| s.label_ok == Some(true)).count() as f64 / n);
    let vectors: Vec<&[f64]> = scored.iter().map(|s| s.recovered.as_slice()).collect();
    let labels: Vec<u8> = scored.iter().map(|s| s.label).collect();
    let mut counts = [0usize; 256];
    labels.iter().for_each(|&l| counts[l as usize] += 1);
    AttackResult {
        batch_size: batch,
        dp: options.dp.is_some(),
        epsilon: None,
        cosine_median: median(&cosines),
        recovered_share: cosines.iter().filter(|&&c| c > 0.9).count() as f64 / n,
        label_recovery,
        knn_accuracy: knn_accuracy(&vectors, &labels, options.knn_k),
        majority_rate: *counts.iter().max().expect("counts") as f64 / n,
        attacker: kind.name(),
        window,
        step_offset: offset,
        samples: scored.len(),
        steps,
        cosine_mean: cosines.iter().sum::<f64>() / n,
        exact_share: cosines.iter().filter(|&&c| c > 0.99).count() as f64 / n,
        plain_cosine_median: median(&plain),
        knn_k: options.knn_k,
        privacy: match options.privacy {
            Privacy::Encrypted => "split-he",
            Privacy::Plaintext => "split",
        },
    }
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Leave-one-out k-NN accuracy on cosine similarity (ties of votes go to the nearer class).
pub fn knn_accuracy(vectors: &[&[f64]], labels: &[u8], k: usize) -> f64 {
    let n = vectors.len();
    if n < 2 {
        return f64::NAN;
    }
    let norms: Vec<f64> = vectors.iter().map(|v| norm(v)).collect();
    let mut correct = 0;
    for i in 0..n {
        let mut sims: Vec<(f64, usize)> = (0..n)
            .filter(|&j| j != i)
            .map(|j| {
                let d = norms[i] * norms[j];
                let s = if d <= 1e-300 {
                    0.0
                } else {
                    dot(vectors[i], vectors[j]) / d
                };
                (s, j)
            })
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut votes = [0usize; 256];
        let mut first = [usize::MAX; 256];
        for (rank, &(_, j)) in sims.iter().take(k).enumerate() {
            let l = labels[j] as usize;
            votes[l] += 1;
            first[l] = first[l].min(rank);
        }
        let best = (0..256)
            .max_by(|&a, &b| votes[a].cmp(&votes[b]).then(first[b].cmp(&first[a])))
            .expect("classes");
        if best == labels[i] as usize {
            correct += 1;
        }
    }
    correct as f64 / n as f64
}

/// Maximum-weight assignment of rows to distinct columns (rows ≤ columns): the column of each
/// row. The Hungarian algorithm (shortest augmenting paths), O(rows²·columns).
pub fn hungarian_max(weights: &[Vec<f64>]) -> Vec<usize> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let m = weights[0].len();
    assert!(n <= m, "more rows than columns");
    let cost = |i: usize, j: usize| -weights[i][j];
    // 1-based potentials, as in the classic formulation.
    let (mut u, mut v) = (vec![0f64; n + 1], vec![0f64; m + 1]);
    let (mut p, mut way) = (vec![0usize; m + 1], vec![0usize; m + 1]);
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0;
        let mut minv = vec![f64::INFINITY; m + 1];
        let mut used = vec![false; m + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let mut delta = f64::INFINITY;
            let mut j1 = 0;
            for j in 1..=m {
                if !used[j] {
                    let cur = cost(i0 - 1, j - 1) - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut out = vec![0usize; n];
    for j in 1..=m {
        if p[j] > 0 {
            out[p[j] - 1] = j - 1;
        }
    }
    out
}

/// A small deterministic generator (SplitMix64) for the attacker's random direction.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn gaussian(&mut self) -> f64 {
        let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The coordinator's state across the steps it attacks.
struct Attacker {
    cut: usize,
    outputs: usize,
    /// Whether the server layer's outputs are the logits (no client tail).
    logits: bool,
    class_weights: Vec<f64>,
    /// Running mean of the recovered activations (fills what a sum cannot identify).
    mean: Vec<f64>,
    mean_count: f64,
    /// Label counts seen (exactly) so far.
    counts: Vec<f64>,
    /// Malicious: the fishing direction, threshold, slope, classes.
    direction: Vec<f64>,
    threshold: f64,
    spread: f64,
    dominant: usize,
    fish: usize,
    /// Projections on the fishing direction of activations recovered so far.
    projections: Vec<f64>,
}

/// Steps the malicious coordinator probes with a zero layer (every softmax uniform: exact
/// label counts) before it fishes.
const PROBE_STEPS: usize = 4;

/// The largest magnitude of a fishing weight or bias (the packing refuses 64 and beyond).
const FISHING_LIMIT: f64 = 48.0;

impl Attacker {
    fn new(config: &ModelConfig, class_weights: Option<Vec<f32>>, seed: u64) -> Self {
        let (cut, outputs) = (config.cut_width().0, config.server_outputs());
        let mut rng = SplitMix(seed ^ 0xf15f_0000);
        let mut direction: Vec<f64> = (0..cut).map(|_| rng.gaussian()).collect();
        let n = norm(&direction);
        direction.iter_mut().for_each(|d| *d /= n);
        let logits = config.tail.is_none();
        Self {
            cut,
            outputs,
            logits,
            class_weights: match class_weights {
                Some(w) if logits => w.iter().map(|&v| v as f64).collect(),
                _ => vec![1.0; outputs],
            },
            mean: vec![0.0; cut],
            mean_count: 0.0,
            counts: vec![0.0; outputs],
            direction,
            threshold: 0.0,
            spread: 1.0,
            dominant: 0,
            fish: outputs - 1,
            projections: Vec::new(),
        }
    }

    fn learn_mean(&mut self, v: &[f64], weight: f64) {
        self.mean_count += weight;
        let f = weight / self.mean_count;
        self.mean
            .iter_mut()
            .zip(v)
            .for_each(|(m, x)| *m += f * (x - *m));
    }

    /// The honest-but-curious reconstruction of a batch.
    fn honest(&mut self, view: &LayerGradient, v: &[f32], c: &[f32], batch: usize) -> Recovered {
        let (cut, k) = (self.cut, self.outputs);
        let wg: Vec<f64> = view.weight.iter().map(|&x| x as f64).collect();
        let bg: Vec<f64> = view.bias.iter().map(|&x| x as f64).collect();
        let out = if batch == 1 {
            // Σ aᵀg = a gᵀ and Σ g = g.
            let gg = dot(&bg, &bg);
            let a: Vec<f64> = (0..cut)
                .map(|i| dot(&wg[i * k..(i + 1) * k], &bg) / gg.max(1e-300))
                .collect();
            let label = self.logits.then(|| argmin(&bg) as u8);
            Recovered {
                vectors: vec![a],
                labels: vec![label],
            }
        } else if !self.logits {
            self.span_guess(&wg, batch)
        } else {
            let v: Vec<f64> = v.iter().map(|&x| x as f64).collect();
            let c: Vec<f64> = c.iter().map(|&x| x as f64).collect();
            let (sums, counts) = self.class_sums(&wg, &bg, &v, &c, batch);
            let mut rec = expand(&sums, &counts);
            if batch < k
                && let Some(better) = self.subspace_solve(&wg, &bg, &v, &c, batch, &rec)
            {
                rec = better;
            }
            rec
        };
        for a in &out.vectors {
            self.learn_mean(a, 1.0);
        }
        out
    }

    /// Without the logits' softmax to work with: the leading directions of `Σ aᵀg`, oriented to
    /// be mostly non-negative and scaled to the running mean's norm.
    fn span_guess(&self, wg: &[f64], batch: usize) -> Recovered {
        let basis = column_basis(wg, self.cut, self.outputs, batch.min(self.outputs));
        let scale = norm(&self.mean).max(1.0);
        let mut vectors = Vec::new();
        if basis.is_empty() {
            return Recovered {
                vectors: vec![self.mean.clone(); batch],
                labels: vec![None; batch],
            };
        }
        for b in 0..batch {
            let mut u = basis[b % basis.len()].clone();
            if u.iter().sum::<f64>() < 0.0 {
                u.iter_mut().for_each(|x| *x = -*x);
            }
            u.iter_mut().for_each(|x| *x *= scale);
            vectors.push(u);
        }
        Recovered {
            labels: vec![None; batch],
            vectors,
        }
    }

    /// Class sums and label counts: see the module documentation. Returns the per-class mean
    /// activations and the integer counts.
    fn class_sums(
        &self,
        wg: &[f64],
        bg: &[f64],
        v: &[f64],
        c: &[f64],
        batch: usize,
    ) -> (Vec<Vec<f64>>, Vec<usize>) {
        let (cut, k) = (self.cut, self.outputs);
        let w = &self.class_weights;
        let mut q: Vec<Vec<f64>> = vec![softmax(&logits(v, c, &self.mean, cut, k)); k];
        let mut means = vec![self.mean.clone(); k];
        let mut counts = vec![0usize; k];
        for _round in 0..6 {
            // H x = Σg with Σ x = 1, x_j = n_j w_j / Σ n w.
            let h = |i: usize, j: usize| q[j][i] - if i == j { 1.0 } else { 0.0 };
            let mut rows: Vec<Vec<f64>> =
                (0..k).map(|i| (0..k).map(|j| h(i, j)).collect()).collect();
            let mut rhs: Vec<f64> = bg.to_vec();
            rows.push(vec![1.0; k]);
            rhs.push(1.0);
            let x = nnls(&rows, &rhs, k);
            let raw: Vec<f64> = (0..k).map(|j| x[j] / w[j]).collect();
            let total: f64 = raw.iter().sum();
            let raw: Vec<f64> = raw
                .iter()
                .map(|r| r * batch as f64 / total.max(1e-300))
                .collect();
            counts = round_counts(&raw, batch);
            // T Hᵀ = s Σaᵀg on the present classes, T_j = w_j S_j.
            let s: f64 = (0..k).map(|j| counts[j] as f64 * w[j]).sum();
            let present: Vec<usize> = (0..k).filter(|&j| counts[j] > 0).collect();
            let p = present.len();
            // Least squares per cut coordinate: minimise ‖Σ_j T_ij H[:, j] − s wg_i‖ (ridge).
            let hp: Vec<Vec<f64>> = (0..k)
                .map(|i| present.iter().map(|&j| h(i, j)).collect())
                .collect();
            let mut gram = vec![vec![0f64; p]; p];
            for a in 0..p {
                for b in 0..p {
                    gram[a][b] = (0..k).map(|i| hp[i][a] * hp[i][b]).sum();
                }
                gram[a][a] += 1e-9;
            }
            let inverse = invert(&gram);
            let mut t = vec![vec![0f64; cut]; p];
            for i in 0..cut {
                let row = &wg[i * k..(i + 1) * k];
                let proj: Vec<f64> = (0..p)
                    .map(|a| (0..k).map(|r| hp[r][a] * row[r]).sum::<f64>() * s)
                    .collect();
                for a in 0..p {
                    t[a][i] = (0..p).map(|b| inverse[a][b] * proj[b]).sum();
                }
            }
            let mut sums: Vec<Vec<f64>> = (0..p)
                .map(|a| t[a].iter().map(|x| x / w[present[a]]).collect())
                .collect();
            if p == k {
                // One direction is unidentifiable: the null vector h0 of H (T + u·h0ᵀ gives the
                // same product). Fill it so that the total matches the running mean.
                if let Some(h0) = null_vector(&hp) {
                    let denom: f64 = (0..p).map(|a| h0[a] / w[present[a]]).sum();
                    if denom.abs() > 1e-9 && self.mean_count > 0.0 {
                        for i in 0..cut {
                            let total: f64 = sums.iter().map(|s| s[i]).sum();
                            let u = (batch as f64 * self.mean[i] - total) / denom;
                            for a in 0..p {
                                sums[a][i] += u * h0[a] / w[present[a]];
                            }
                        }
                    }
                }
            }
            for (a, &j) in present.iter().enumerate() {
                means[j] = sums[a].iter().map(|x| x / counts[j] as f64).collect();
                q[j] = softmax(&logits(v, c, &means[j], cut, k));
            }
        }
        (means, counts)
    }

    /// Batches below the rank bound: every activation lies in the column space of `Σ aᵀg`;
    /// solve for their coordinates under each label multiset (Levenberg–Marquardt on both sums).
    fn subspace_solve(
        &self,
        wg: &[f64],
        bg: &[f64],
        v: &[f64],
        c: &[f64],
        batch: usize,
        init: &Recovered,
    ) -> Option<Recovered> {
        let (cut, k) = (self.cut, self.outputs);
        let r = batch.min(k - 1);
        let basis = column_basis(wg, cut, k, r);
        if basis.len() < r {
            return None;
        }
        let r = basis.len();
        // Observed sums in basis coordinates, and the server layer seen from the basis.
        let m: Vec<f64> = (0..r)
            .flat_map(|a| (0..k).map(move |j| (a, j)))
            .map(|(a, j)| (0..cut).map(|i| basis[a][i] * wg[i * k + j]).sum())
            .collect();
        let pm: Vec<f64> = (0..r)
            .flat_map(|a| (0..k).map(move |j| (a, j)))
            .map(|(a, j)| (0..cut).map(|i| basis[a][i] * v[i * k + j]).sum())
            .collect();
        let (m_norm, b_norm) = (norm(&m).max(1e-12), norm(bg).max(1e-12));
        let w = &self.class_weights;
        let residual = |z: &[f64], labels: &[usize], out: &mut Vec<f64>| {
            out.clear();
            let s: f64 = labels.iter().map(|&l| w[l]).sum();
            let mut mh = vec![0f64; r * k];
            let mut bh = vec![0f64; k];
            for (b, &l) in labels.iter().enumerate() {
                let zb = &z[b * r..(b + 1) * r];
                let lg: Vec<f64> = (0..k)
                    .map(|j| c[j] + (0..r).map(|a| zb[a] * pm[a * k + j]).sum::<f64>())
                    .collect();
                let p = softmax(&lg);
                for j in 0..k {
                    let g = w[l] * (p[j] - if j == l { 1.0 } else { 0.0 }) / s;
                    bh[j] += g;
                    for a in 0..r {
                        mh[a * k + j] += zb[a] * g;
                    }
                }
            }
            out.extend(mh.iter().zip(&m).map(|(x, y)| (x - y) / m_norm));
            out.extend(bh.iter().zip(bg).map(|(x, y)| (x - y) / b_norm));
        };
        let project = |a: &[f64]| -> Vec<f64> { basis.iter().map(|u| dot(u, a)).collect() };
        let mut best: Option<(f64, Vec<f64>, Vec<usize>)> = None;
        for labels in multisets(batch, k) {
            // Start from the class means of the class-sum solution (or the mean), spread apart.
            let mut z = Vec::with_capacity(batch * r);
            for (b, &l) in labels.iter().enumerate() {
                let start = init
                    .labels
                    .iter()
                    .position(|x| *x == Some(l as u8))
                    .map_or(self.mean.clone(), |i| init.vectors[i].clone());
                let mut zb = project(&start);
                zb.iter_mut()
                    .enumerate()
                    .for_each(|(a, x)| *x *= 1.0 + 0.05 * (((a + b) % 3) as f64 - 1.0));
                z.extend(zb);
            }
            let cost = levenberg_marquardt(&mut z, |z, out| residual(z, &labels, out), 60);
            if best.as_ref().is_none_or(|(c, _, _)| cost < *c) {
                best = Some((cost, z, labels));
            }
        }
        let (_, z, labels) = best?;
        let vectors = (0..batch)
            .map(|b| {
                let zb = &z[b * r..(b + 1) * r];
                (0..cut)
                    .map(|i| (0..r).map(|a| zb[a] * basis[a][i]).sum())
                    .collect()
            })
            .collect();
        Some(Recovered {
            vectors,
            labels: labels.iter().map(|&l| Some(l as u8)).collect(),
        })
    }

    /// The malicious coordinator's layer for attacked step `step`: weight `[cut, outputs]`
    /// row-major and bias.
    /// A zero layer while probing, and at batch size 1 (where a saturated softmax could hide
    /// the sample instead: the exact solution needs a non-zero gradient).
    fn fishing_layer(&self, step: usize, batch: usize) -> (Vec<f32>, Vec<f32>) {
        let (cut, k) = (self.cut, self.outputs);
        let mut weight = vec![0f32; cut * k];
        let mut bias = vec![0f32; k];
        if step < PROBE_STEPS || !self.logits || batch == 1 {
            return (weight, bias);
        }
        // Sharp enough to saturate, within the fixed-point range of the encrypted layer's weights
        // and biases (and logits well below its wrap-around).
        let largest = self.direction.iter().fold(0f64, |m, d| m.max(d.abs()));
        let slope = (8.0 / self.spread.max(1e-6))
            .min(FISHING_LIMIT / self.threshold.abs().max(1e-9))
            .min(FISHING_LIMIT / largest.max(1e-9));
        for i in 0..cut {
            weight[i * k + self.fish] = (slope * self.direction[i]) as f32;
        }
        for (j, b) in bias.iter_mut().enumerate() {
            *b = if j == self.dominant {
                0.0
            } else if j == self.fish {
                (-slope * self.threshold) as f32
            } else {
                -30.0
            };
        }
        (weight, bias)
    }

    fn malicious(
        &mut self,
        view: &LayerGradient,
        v: &[f32],
        c: &[f32],
        batch: usize,
        step: usize,
    ) -> Recovered {
        let (cut, k) = (self.cut, self.outputs);
        if step < PROBE_STEPS || !self.logits || batch == 1 {
            // A zero layer: every softmax is uniform, Σg gives the label counts exactly.
            if self.logits && step < PROBE_STEPS {
                // Uniform softmax: B·Σg_j = B/k − n_j (without class weights).
                for j in 0..k {
                    let n = (batch as f64 / k as f64 - batch as f64 * view.bias[j] as f64).round();
                    self.counts[j] += n.max(0.0);
                }
            }
            let out = self.honest(view, v, c, batch);
            if step + 1 == PROBE_STEPS {
                self.choose_classes();
                self.calibrate();
            }
            if step >= PROBE_STEPS {
                self.track(view, batch);
            }
            return out;
        }
        let wg: Vec<f64> = view.weight.iter().map(|&x| x as f64).collect();
        let column =
            |j: usize| -> Vec<f64> { (0..cut).map(|i| wg[i * k + j] * batch as f64).collect() };
        let mut vectors = Vec::new();
        let mut labels = Vec::new();
        let mut exact = Vec::new();
        for j in 0..k {
            if j == self.dominant || j == self.fish {
                continue;
            }
            let n = (-(batch as f64) * view.bias[j] as f64).round().max(0.0) as usize;
            self.counts[j] += n as f64;
            if n == 0 {
                continue;
            }
            let mean: Vec<f64> = column(j).iter().map(|x| -x / n as f64).collect();
            if n == 1 {
                exact.push(mean.clone());
            }
            for _ in 0..n {
                vectors.push(mean.clone());
                labels.push(Some(j as u8));
            }
        }
        let above = batch as f64 * view.bias[self.fish] as f64;
        if above.round() >= 1.0 {
            let fished: Vec<f64> = column(self.fish)
                .iter()
                .map(|x| x / above.round())
                .collect();
            if above.round() == 1.0 {
                exact.push(fished.clone());
            }
            vectors.push(fished);
            labels.push(Some(self.dominant as u8));
        }
        for a in &exact {
            self.learn_mean(a, 1.0);
            self.projections.push(dot(a, &self.direction));
        }
        vectors.truncate(batch);
        labels.truncate(batch);
        while vectors.len() < batch {
            vectors.push(self.mean.clone());
            labels.push(Some(self.dominant as u8));
        }
        self.track(view, batch);
        Recovered { vectors, labels }
    }

    fn choose_classes(&mut self) {
        let order = |a: &usize, b: &usize| self.counts[*a].total_cmp(&self.counts[*b]);
        self.dominant = (0..self.outputs).max_by(order).expect("classes");
        self.fish = (0..self.outputs)
            .filter(|&j| j != self.dominant)
            .min_by(order)
            .expect("two classes");
    }

    /// The threshold's starting point: the spread of what the probes recovered along the
    /// fishing direction.
    fn calibrate(&mut self) {
        let t = dot(&self.mean, &self.direction);
        self.spread = (0.25 * norm(&self.mean)).max(1e-3) / (self.cut as f64).sqrt() * 4.0;
        self.threshold = t + self.spread;
    }

    /// Moves the threshold towards one sample above it per batch (`B·Σg_m` counts them, less
    /// the batch's samples of class `m`), and re-estimates the spread.
    fn track(&mut self, view: &LayerGradient, batch: usize) {
        let above = batch as f64 * view.bias[self.fish] as f64;
        self.threshold += 0.3 * self.spread * (above - 1.0).clamp(-3.0, 3.0);
        if self.projections.len() >= 8 {
            let n = self.projections.len() as f64;
            let mean = self.projections.iter().sum::<f64>() / n;
            let var = self
                .projections
                .iter()
                .map(|p| (p - mean).powi(2))
                .sum::<f64>()
                / n;
            self.spread = var.sqrt().max(1e-3);
        }
    }
}

fn argmin(v: &[f64]) -> usize {
    (0..v.len())
        .min_by(|&a, &b| v[a].total_cmp(&v[b]))
        .expect("non-empty")
}

fn softmax(z: &[f64]) -> Vec<f64> {
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|x| (x - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// Logits of the server layer `v` (`[cut, k]` row-major), `c` on activation `a`.
fn logits(v: &[f64], c: &[f64], a: &[f64], cut: usize, k: usize) -> Vec<f64> {
    (0..k)
        .map(|j| c[j] + (0..cut).map(|i| a[i] * v[i * k + j]).sum::<f64>())
        .collect()
}

/// Each class's mean repeated by its count.
fn expand(means: &[Vec<f64>], counts: &[usize]) -> Recovered {
    let mut vectors = Vec::new();
    let mut labels = Vec::new();
    for (j, &n) in counts.iter().enumerate() {
        for _ in 0..n {
            vectors.push(means[j].clone());
            labels.push(Some(j as u8));
        }
    }
    Recovered { vectors, labels }
}

/// Non-negative integers summing to `total` nearest to `raw` (largest remainders).
fn round_counts(raw: &[f64], total: usize) -> Vec<usize> {
    let mut counts: Vec<usize> = raw.iter().map(|r| r.max(0.0).floor() as usize).collect();
    let mut sum: usize = counts.iter().sum();
    while sum > total {
        let j = (0..raw.len())
            .filter(|&j| counts[j] > 0)
            .min_by(|&a, &b| (raw[a] - counts[a] as f64).total_cmp(&(raw[b] - counts[b] as f64)))
            .expect("positive count");
        counts[j] -= 1;
        sum -= 1;
    }
    while sum < total {
        let j = (0..raw.len())
            .max_by(|&a, &b| (raw[a] - counts[a] as f64).total_cmp(&(raw[b] - counts[b] as f64)))
            .expect("classes");
        counts[j] += 1;
        sum += 1;
    }
    counts
}

/// Non-negative least squares `min ‖A x − b‖, x ≥ 0` by projected coordinate descent.
fn nnls(a: &[Vec<f64>], b: &[f64], n: usize) -> Vec<f64> {
    let mut x = vec![1.0 / n as f64; n];
    let col_sq: Vec<f64> = (0..n)
        .map(|j| a.iter().map(|r| r[j] * r[j]).sum())
        .collect();
    let mut r: Vec<f64> = a.iter().zip(b).map(|(row, bi)| dot(row, &x) - bi).collect();
    for _ in 0..500 {
        for j in 0..n {
            if col_sq[j] <= 1e-300 {
                continue;
            }
            let grad: f64 = a.iter().zip(&r).map(|(row, ri)| row[j] * ri).sum();
            let new = (x[j] - grad / col_sq[j]).max(0.0);
            let d = new - x[j];
            if d != 0.0 {
                for (ri, row) in r.iter_mut().zip(a) {
                    *ri += d * row[j];
                }
                x[j] = new;
            }
        }
    }
    x
}

/// Inverse of a small symmetric positive-definite matrix (Gauss–Jordan with pivoting).
fn invert(m: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = m.len();
    let mut a: Vec<Vec<f64>> = m
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let mut r = row.clone();
            r.extend((0..n).map(|j| if i == j { 1.0 } else { 0.0 }));
            r
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))
            .expect("rows");
        a.swap(col, pivot);
        let p = a[col][col];
        if p.abs() < 1e-300 {
            continue;
        }
        a[col].iter_mut().for_each(|x| *x /= p);
        for row in 0..n {
            if row != col {
                let f = a[row][col];
                if f != 0.0 {
                    let pivot_row = a[col].clone();
                    a[row]
                        .iter_mut()
                        .zip(&pivot_row)
                        .for_each(|(x, y)| *x -= f * y);
                }
            }
        }
    }
    a.into_iter().map(|r| r[n..].to_vec()).collect()
}

/// Solves a small linear system `m x = b` (Gaussian elimination with pivoting).
fn solve(m: &[Vec<f64>], b: &[f64]) -> Vec<f64> {
    let inv = invert(m);
    inv.iter().map(|row| dot(row, b)).collect()
}

/// A unit vector `x` with `H x ≈ 0` (`H` is `rows × p`), when `H` is rank-deficient.
fn null_vector(h: &[Vec<f64>]) -> Option<Vec<f64>> {
    let p = h.first()?.len();
    let mut gram = vec![vec![0f64; p]; p];
    for a in 0..p {
        for b in 0..p {
            gram[a][b] = h.iter().map(|r| r[a] * r[b]).sum();
        }
    }
    let (values, vectors) = symmetric_eigen(&gram);
    let smallest = (0..p).min_by(|&a, &b| values[a].total_cmp(&values[b]))?;
    Some(vectors[smallest].clone())
}

/// Eigenvalues and unit eigenvectors of a small symmetric matrix (cyclic Jacobi).
fn symmetric_eigen(m: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = m.len();
    let mut a = m.to_vec();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        if off < 1e-30 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let (cs, sn) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                for row in a.iter_mut() {
                    let (akp, akq) = (row[p], row[q]);
                    row[p] = cs * akp - sn * akq;
                    row[q] = sn * akp + cs * akq;
                }
                // q > p: rows p and q, both mutable.
                let (low, high) = a.split_at_mut(q);
                for (x, y) in low[p].iter_mut().zip(high[0].iter_mut()) {
                    let (apk, aqk) = (*x, *y);
                    *x = cs * apk - sn * aqk;
                    *y = sn * apk + cs * aqk;
                }
                for row in v.iter_mut() {
                    let (vp, vq) = (row[p], row[q]);
                    row[p] = cs * vp - sn * vq;
                    row[q] = sn * vp + cs * vq;
                }
            }
        }
    }
    let values = (0..n).map(|i| a[i][i]).collect();
    // Columns of v are the eigenvectors.
    let vectors = (0..n).map(|j| (0..n).map(|i| v[i][j]).collect()).collect();
    (values, vectors)
}

/// An orthonormal basis (up to `rank` vectors, leading singular directions first) of the
/// column space of `wg` (`[cut, k]` row-major).
fn column_basis(wg: &[f64], cut: usize, k: usize, rank: usize) -> Vec<Vec<f64>> {
    let mut gram = vec![vec![0f64; k]; k];
    for a in 0..k {
        for b in 0..k {
            gram[a][b] = (0..cut).map(|i| wg[i * k + a] * wg[i * k + b]).sum();
        }
    }
    let (values, vectors) = symmetric_eigen(&gram);
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let top = values[order[0]].max(0.0);
    order
        .into_iter()
        .take(rank)
        .filter(|&j| values[j] > top * 1e-12 && values[j] > 0.0)
        .map(|j| {
            let s = values[j].sqrt();
            (0..cut)
                .map(|i| dot(&wg[i * k..(i + 1) * k], &vectors[j]) / s)
                .collect()
        })
        .collect()
}

/// Every multiset of `n` labels out of `k`, as non-decreasing sequences.
fn multisets(n: usize, k: usize) -> Vec<Vec<usize>> {
    fn go(n: usize, k: usize, from: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if cur.len() == n {
            out.push(cur.clone());
            return;
        }
        for l in from..k {
            cur.push(l);
            go(n, k, l, cur, out);
            cur.pop();
        }
    }
    let mut out = Vec::new();
    go(n, k, 0, &mut Vec::new(), &mut out);
    out
}

/// Levenberg–Marquardt with a forward-difference Jacobian; returns the final ‖r‖².
fn levenberg_marquardt(x: &mut [f64], f: impl Fn(&[f64], &mut Vec<f64>), iterations: usize) -> f64 {
    let n = x.len();
    let mut r = Vec::new();
    f(x, &mut r);
    let mut cost = dot(&r, &r);
    let mut lambda = 1e-3;
    let mut trial = Vec::new();
    let mut shifted = Vec::new();
    for _ in 0..iterations {
        let m = r.len();
        let mut jac = vec![vec![0f64; n]; m];
        for j in 0..n {
            let h = 1e-6 * x[j].abs().max(1e-3);
            let saved = x[j];
            x[j] = saved + h;
            f(x, &mut shifted);
            x[j] = saved;
            for i in 0..m {
                jac[i][j] = (shifted[i] - r[i]) / h;
            }
        }
        let mut jtj = vec![vec![0f64; n]; n];
        let mut jtr = vec![0f64; n];
        for i in 0..m {
            for a in 0..n {
                jtr[a] += jac[i][a] * r[i];
                for b in 0..n {
                    jtj[a][b] += jac[i][a] * jac[i][b];
                }
            }
        }
        let mut improved = false;
        for _ in 0..10 {
            let mut damped = jtj.clone();
            for a in 0..n {
                damped[a][a] += lambda * (jtj[a][a] + 1e-12);
            }
            let step = solve(&damped, &jtr);
            let candidate: Vec<f64> = x.iter().zip(&step).map(|(xi, s)| xi - s).collect();
            f(&candidate, &mut trial);
            let c = dot(&trial, &trial);
            if c.is_finite() && c < cost {
                x.copy_from_slice(&candidate);
                std::mem::swap(&mut r, &mut trial);
                cost = c;
                lambda = (lambda * 0.3).max(1e-12);
                improved = true;
                break;
            }
            lambda *= 10.0;
        }
        if !improved || cost < 1e-24 {
            break;
        }
    }
    cost
}

/// The readable table of a report.
pub fn table(report: &AttackReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<18} {:>5} {:>6} {:>4} {:>8} {:>7} {:>7} {:>7} {:>7} {:>6} {:>8}",
        "attacker",
        "batch",
        "window",
        "dp",
        "cos med",
        "> 0.9",
        "> 0.99",
        "labels",
        "k-NN",
        "major",
        "samples"
    );
    for r in &report.results {
        let _ = writeln!(
            out,
            "{:<18} {:>5} {:>6} {:>4} {:>8.3} {:>7.3} {:>7.3} {:>7} {:>7.3} {:>6.3} {:>8}",
            r.attacker,
            r.batch_size,
            r.window,
            if r.dp { "yes" } else { "no" },
            r.cosine_median,
            r.recovered_share,
            r.exact_share,
            r.label_recovery
                .map_or("-".to_owned(), |l| format!("{l:.3}")),
            r.knn_accuracy,
            r.majority_rate,
            r.samples
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hungarian_finds_the_best_assignment() {
        let w = vec![vec![0.1, 0.9, 0.2], vec![0.8, 0.85, 0.1]];
        assert_eq!(hungarian_max(&w), vec![1, 0]);
    }

    #[test]
    fn counts_round_to_the_total() {
        assert_eq!(round_counts(&[1.6, 0.2, 2.2], 4), vec![2, 0, 2]);
        assert_eq!(round_counts(&[0.0, 0.0, 0.1], 1), vec![0, 0, 1]);
    }

    #[test]
    fn the_column_basis_spans_the_columns() {
        // Two rank-one terms in 6 dimensions, 3 columns.
        let a = [1.0, 2.0, 0.0, 0.0, 1.0, 3.0];
        let b = [0.0, 1.0, 1.0, 4.0, 0.0, 0.0];
        let (ga, gb) = ([0.5, -0.2, -0.3], [-0.1, 0.4, -0.3]);
        let wg: Vec<f64> = (0..6)
            .flat_map(|i| (0..3).map(move |j| a[i] * ga[j] + b[i] * gb[j]))
            .collect();
        let basis = column_basis(&wg, 6, 3, 3);
        assert_eq!(basis.len(), 2);
        for v in [&a[..], &b[..]] {
            let projected: f64 = basis.iter().map(|u| dot(u, v).powi(2)).sum();
            assert!((projected - dot(v, v)).abs() < 1e-9);
        }
    }
}
