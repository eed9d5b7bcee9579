//! The privacy accountant of DP-SGD: Rényi differential privacy (RDP) of the Poisson-subsampled
//! Gaussian mechanism, converted to (ε, δ), and the plan a hospital follows for a job.
//!
//! Each training step samples every training row independently with probability `q` and adds
//! Gaussian noise of standard deviation `σ·clip` to the clipped sums. The RDP of one step at
//! order α is computed as in Google's `dp_accounting` (`rdp/rdp_privacy_accountant.py`), after
//! Mironov, Talwar and Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism"
//! (2019, arXiv:1908.10530); steps compose by adding RDP, and the total is converted to ε at a
//! given δ with the improved conversion `dp_accounting` uses (Canonne, Kamath and Steinke 2020,
//! arXiv:2004.00010, Proposition 12; Asoodeh et al. 2020, arXiv:2001.05990, eq. 20; Balle et
//! al. 2020, arXiv:1905.09982), minimised over [`ORDERS`]. The neighbouring relation is
//! add-or-remove-one sample.

/// What keeps a plan from being made.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DpError {
    #[error("the job has no differential privacy settings")]
    NoDp,
    #[error("exactly one of noise_multiplier and target_epsilon must be set")]
    NoiseSetting,
    #[error("noise_multiplier must be a positive number, not {0}")]
    NoiseMultiplier(f64),
    #[error("target_epsilon must be a positive number, not {0}")]
    TargetEpsilon(f64),
    #[error("delta must lie strictly between 0 and 1, not {0}")]
    Delta(f64),
    #[error("batch_size must be positive")]
    BatchSize,
    #[error("the hospital has no training samples")]
    NoSamples,
    #[error("no noise multiplier reaches ε = {epsilon} at δ = {delta} in {steps} steps")]
    Unreachable {
        epsilon: f64,
        delta: f64,
        steps: u64,
    },
}

/// The orders α at which RDP is tracked: `dp_accounting`'s `DEFAULT_RDP_ORDERS`,
/// `[1 + x/10 for x in 1..=99] + [11..=63] + [128, 256, 512, 1024]` (the same doubles).
pub const ORDERS: &[f64] = &ORDER_TABLE;

const ORDER_TABLE: [f64; 156] = {
    let mut t = [0.0; 156];
    let mut i = 0;
    while i < 99 {
        t[i] = 1.0 + (i + 1) as f64 / 10.0;
        i += 1;
    }
    while i < 152 {
        t[i] = (i - 99 + 11) as f64;
        i += 1;
    }
    t[152] = 128.0;
    t[153] = 256.0;
    t[154] = 512.0;
    t[155] = 1024.0;
    t
};

/// RDP at order `order` (> 1) of one step of the Gaussian mechanism with noise multiplier `sigma`
/// on a Poisson sample with rate `q`: `_compute_rdp_poisson_subsampled_gaussian` of
/// `dp_accounting`. `q == 0`: 0; `σ == 0` or an infinite order: ∞; `q == 1`: the plain Gaussian
/// mechanism, `α / (2σ²)`; otherwise `log(A_α) / (α − 1)` (Mironov et al. 2019, section 3), which
/// is ∞ where the fractional-order series does not converge.
pub fn rdp_poisson_gaussian(q: f64, sigma: f64, order: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if order.is_infinite() || sigma <= 0.0 {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return order / (2.0 * sigma * sigma);
    }
    let log_a = if order.fract() == 0.0 {
        log_a_int(q, sigma, order as u64)
    } else {
        log_a_frac(q, sigma, order)
    };
    log_a / (order - 1.0)
}

/// `log A_α` for integer α (`_compute_log_a_int`): the binomial expansion
/// `A_α = Σ_{i=0..α} C(α,i) q^i (1−q)^(α−i) exp((i² − i) / (2σ²))`, summed in log space.
/// The binomial weights sum to 1, so `A_α = 1 + Σ_{i≥2} C(α,i) q^i (1−q)^(α−i) expm1((i²−i)/(2σ²))`
/// (the terms `i < 2` vanish): a sum of positive terms, free of the cancellation that costs the
/// plain sum about 1e-9 of relative precision where `A_α − 1` is tiny (small q, large σ).
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let two_var = 2.0 * sigma * sigma;
    let a = alpha as f64;
    let log_excess = (2..=alpha).fold(f64::NEG_INFINITY, |acc, i| {
        let i = i as f64;
        let log_coef = log_comb(a, i) + i * log_q + (a - i) * log_1mq;
        log_add(acc, log_coef + log_expm1((i * i - i) / two_var))
    });
    log_add(0.0, log_excess)
}

/// `log(e^x − 1)` for `x > 0`.
fn log_expm1(x: f64) -> f64 {
    if x > 1.0 {
        x + (-(-x).exp()).ln_1p()
    } else {
        x.exp_m1().ln()
    }
}

/// Terms `_compute_log_a_frac` sums at most before it gives up on an order (returning ∞).
const MAX_FRAC_TERMS: u32 = 1000;

/// `log A_α` for fractional α (`_compute_log_a_frac`; Mironov et al. 2019, section 3.3): the
/// integrals of `A_α` over `(−∞, z₀]` and `[z₀, ∞)`, `z₀ = σ² log(1/q − 1) + 1/2`, as two series
/// `Σ_i |C(α,i)| q^i (1−q)^(α−i) e^((i²−i)/(2σ²)) · erfc((i − z₀)/(√2σ))/2` and the same with `i`
/// and `j = α − i` swapped in the powers and `erfc((z₀ − j)/(√2σ))/2`, summed until both terms
/// decrease and fall 30 nats below the total.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let two_var = 2.0 * sigma * sigma;
    let sqrt2_sigma = std::f64::consts::SQRT_2 * sigma;
    let log_half = 0.5f64.ln();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for i in 0..MAX_FRAC_TERMS {
        let i = f64::from(i);
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * log_q + j * log_1mq;
        let log_t1 = log_coef + j * log_q + i * log_1mq;
        let log_e0 = log_half + log_erfc((i - z0) / sqrt2_sigma);
        let log_e1 = log_half + log_erfc((z0 - j) / sqrt2_sigma);
        let log_s0 = log_t0 + (i * i - i) / two_var + log_e0;
        let log_s1 = log_t1 + (j * j - j) / two_var + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// `log(e^x + e^y)` as `dp_accounting`'s `_log_add`.
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = (x.min(y), x.max(y));
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// `log |C(n, k)|` through `log |Γ|` (real `n`, `k`; as `_log_comb` with scipy's `gammaln`).
fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// `log erfc(x)`, accurate where `erfc` underflows: below 25, the logarithm of `erfc` (which keeps
/// full relative precision out there, `erfc(25) ≈ 8e-274`); beyond, the asymptotic expansion
/// `erfc(x) = e^(−x²) / (x√π) · Σ_k (−1)^k (2k−1)!! / (2x²)^k` (Abramowitz & Stegun 7.1.23),
/// whose terms past the eighth are below 1e-16 for x ≥ 25.
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        libm::erfc(x).ln()
    } else {
        log_erfc_asymptotic(x)
    }
}

fn log_erfc_asymptotic(x: f64) -> f64 {
    let u = 1.0 / (2.0 * x * x);
    let (mut term, mut series) = (1.0, 1.0);
    for k in 1..8 {
        term *= -f64::from(2 * k - 1) * u;
        series += term;
    }
    -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln() + series.ln()
}

/// ε at `delta` from RDP values `rdp` at [`ORDERS`] (`dp_accounting`'s `compute_epsilon`): per
/// order `ε_α = r + log(1 − 1/α) − log(δ·α)/(α − 1)` (arXiv:2004.00010 Proposition 12,
/// arXiv:2001.05990 eq. 20), used only for α > 1.01 where it is numerically stable; 0 where
/// `δ² + expm1(−r) > 0` (the bound `δ ≤ √(1 − e^(−KL))` via the KL divergence) or `r < 0`
/// (rounding on extreme inputs); the minimum over orders, at least 0.
fn epsilon_from_rdp(mut rdp: impl Iterator<Item = (f64, f64)>, delta: f64) -> f64 {
    if delta <= 0.0 {
        // δ = 0: ε is 0 when every order's RDP is, else unbounded.
        return if rdp.all(|(_, r)| r == 0.0) {
            0.0
        } else {
            f64::INFINITY
        };
    }
    let best = rdp
        .map(|(a, r)| {
            if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
                0.0
            } else if a > 1.01 {
                r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
            } else {
                f64::INFINITY
            }
        })
        .fold(f64::INFINITY, f64::min);
    best.max(0.0)
}

/// ε at `delta` after `steps` steps with sampling rate `q` and noise multiplier `sigma`: the RDP of
/// one step times `steps` at each of [`ORDERS`], converted to ε (the best order); as
/// `dp_accounting`'s `RdpAccountant` after composing `PoissonSampledDpEvent(q, GaussianDpEvent(σ))`
/// `steps` times. `f64::INFINITY` when no order gives a finite bound.
pub fn epsilon(q: f64, sigma: f64, steps: u64, delta: f64) -> f64 {
    if steps == 0 {
        return 0.0;
    }
    let steps = steps as f64;
    epsilon_from_rdp(
        ORDERS
            .iter()
            .map(|&a| (a, steps * rdp_poisson_gaussian(q, sigma, a))),
        delta,
    )
}

/// Relative precision of [`noise_for_epsilon`].
const NOISE_TOLERANCE: f64 = 1e-3;
/// No σ beyond this is searched: past it, training is pure noise.
const MAX_NOISE: f64 = 1e6;

/// The smallest noise multiplier σ (within 0.1 %, erring upwards) with
/// `epsilon(q, σ, steps, delta) ≤ epsilon`: bisection, ε being decreasing in σ. `None` when even
/// σ = 10⁶ does not get there.
pub fn noise_for_epsilon(q: f64, steps: u64, epsilon: f64, delta: f64) -> Option<f64> {
    let eps = |sigma| self::epsilon(q, sigma, steps, delta);
    if eps(0.0) <= epsilon {
        return Some(0.0);
    }
    // Bracket: eps(lo) > target ≥ eps(hi).
    let (mut lo, mut hi) = (0.0, 1.0);
    while eps(hi) > epsilon {
        if hi >= MAX_NOISE {
            return None;
        }
        lo = hi;
        hi *= 2.0;
    }
    while hi - lo > NOISE_TOLERANCE * hi {
        let mid = 0.5 * (lo + hi);
        if eps(mid) > epsilon {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

/// The smallest `k` with `steps · P(Bin(n, q) > k) ≤ failure`: the fixed batch a Poisson sample
/// is padded to, such that over `steps` steps a draw larger than `k` (cut down to `k`) happens
/// with probability at most `failure` (union bound). The binomial tail is summed exactly in log
/// space, from far above the mean (where the terms have fallen 40 nats below the target) down to
/// where the tail passes the target.
pub fn padded_batch(n: u64, q: f64, steps: u64, failure: f64) -> u32 {
    let cap = |k: u64| u32::try_from(k).unwrap_or(u32::MAX);
    if q <= 0.0 || steps == 0 || n == 0 {
        return 0;
    }
    if q >= 1.0 || failure <= 0.0 {
        return cap(n);
    }
    // Each step may fail with probability t.
    let log_t = failure.ln() - (steps as f64).ln();
    let (nf, log_q, log_1mq) = (n as f64, q.ln(), (-q).ln_1p());
    let log_pmf = |i: u64| {
        let i = i as f64;
        log_comb(nf, i) + i * log_q + (nf - i) * log_1mq
    };
    // The top of the sum: past the mode, where the terms are negligible against t (the rest,
    // a geometric-like tail with ratio < 1, is smaller still).
    let mut top = ((nf + 1.0) * q).floor() as u64;
    while top < n && log_pmf(top) > log_t - 40.0 {
        top += 1;
    }
    // tail = log P(X > k), for k going down from `top`.
    let mut tail = f64::NEG_INFINITY;
    let mut k = top;
    while k > 0 {
        let with_k = log_add(tail, log_pmf(k));
        if with_k > log_t {
            break;
        }
        tail = with_k;
        k -= 1;
    }
    cap(k)
}

/// What a hospital follows under DP for one job.
#[derive(Clone, Debug, PartialEq)]
pub struct DpPlan {
    /// q: each training sample's probability of being in a step's batch.
    pub sampling_rate: f64,
    /// σ: noise standard deviation over the clip norm.
    pub noise_multiplier: f64,
    pub steps_per_visit: u64,
    /// Steps over the whole job (every round's visit).
    pub total_steps: u64,
    /// The fixed size every step's batch is padded (or cut) to.
    pub padded_batch: u32,
    /// ε of the whole job at `delta`.
    pub epsilon: f64,
    /// δ of the whole job, the batch-cutting failure probability included.
    pub delta: f64,
}

/// Share of δ that goes to the RDP conversion; the rest (δ/100) bounds the probability of a
/// batch being cut to `padded_batch` over the job.
const CONVERSION_SHARE: f64 = 0.99;
const FAILURE_SHARE: f64 = 0.01;

/// The parts of a job spec that set the number of steps.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub batch_size: u32,
    pub rounds: u32,
    pub local_epochs: u32,
    pub local_steps: Option<u32>,
}

/// The plan a hospital with `n` training samples follows for a job of `schedule`, with
/// `noise_multiplier` σ or `target_epsilon` (exactly one) at `delta`. Sampling rate
/// `q = min(1, batch_size / N)`; steps per visit `local_steps`, else
/// `local_epochs · ⌈N / batch_size⌉`; total steps `rounds` times that. σ is the given one, or the
/// smallest reaching the target ε; ε is computed at `0.99·δ` and the batch padded so that it is
/// cut with probability at most `δ/100` over the job, so that the job is (ε, δ)-DP for this
/// hospital's samples.
pub fn plan_with(
    noise_multiplier: Option<f64>,
    target_epsilon: Option<f64>,
    delta: f64,
    schedule: &Schedule,
    n: u64,
) -> Result<DpPlan, DpError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(DpError::Delta(delta));
    }
    if schedule.batch_size == 0 {
        return Err(DpError::BatchSize);
    }
    if n == 0 {
        return Err(DpError::NoSamples);
    }
    let batch = u64::from(schedule.batch_size);
    let q = (batch as f64 / n as f64).min(1.0);
    let steps_per_visit = match schedule.local_steps {
        Some(steps) => u64::from(steps),
        None => u64::from(schedule.local_epochs) * n.div_ceil(batch),
    };
    let total_steps = u64::from(schedule.rounds) * steps_per_visit;
    let conversion_delta = CONVERSION_SHARE * delta;
    let noise_multiplier = match (noise_multiplier, target_epsilon) {
        (Some(sigma), None) if sigma > 0.0 && sigma.is_finite() => sigma,
        (Some(sigma), None) => return Err(DpError::NoiseMultiplier(sigma)),
        (None, Some(target)) if target > 0.0 && target.is_finite() => {
            noise_for_epsilon(q, total_steps, target, conversion_delta).ok_or(
                DpError::Unreachable {
                    epsilon: target,
                    delta,
                    steps: total_steps,
                },
            )?
        }
        (None, Some(target)) => return Err(DpError::TargetEpsilon(target)),
        _ => return Err(DpError::NoiseSetting),
    };
    Ok(DpPlan {
        sampling_rate: q,
        noise_multiplier,
        steps_per_visit,
        total_steps,
        padded_batch: padded_batch(n, q, total_steps, FAILURE_SHARE * delta),
        epsilon: epsilon(q, noise_multiplier, total_steps, conversion_delta),
        delta,
    })
}

/// The plan a hospital with `train_samples` training samples follows for `spec`
/// ([`plan_with`] on the spec's DP settings and schedule).
pub fn plan(spec: &crate::api::JobSpec, train_samples: u64) -> Result<DpPlan, DpError> {
    let dp = spec.dp.as_ref().ok_or(DpError::NoDp)?;
    plan_with(
        dp.noise_multiplier,
        dp.target_epsilon,
        dp.delta,
        &Schedule {
            batch_size: spec.batch_size,
            rounds: spec.rounds,
            local_epochs: spec.local_epochs,
            local_steps: spec.local_steps,
        },
        train_samples,
    )
}

/// ε spent after `steps_done` of the plan's steps (same q, σ and conversion δ as the plan).
pub fn spent(plan: &DpPlan, steps_done: u64) -> f64 {
    epsilon(
        plan.sampling_rate,
        plan.noise_multiplier,
        steps_done,
        CONVERSION_SHARE * plan.delta,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_erfc_is_continuous_where_the_expansion_takes_over() {
        for x in [25.0, 26.0, 26.5] {
            let direct = libm::erfc(x).ln();
            let series = log_erfc_asymptotic(x);
            assert!(
                (direct - series).abs() <= 1e-14 * direct.abs(),
                "{x}: {direct} vs {series}"
            );
        }
        // Past where erfc underflows, still finite and near −x².
        let far = log_erfc(1e3);
        assert!(far.is_finite() && (far + 1e6).abs() < 10.0, "{far}");
    }

    #[test]
    fn orders_are_dp_accountings_defaults() {
        assert_eq!(ORDERS.len(), 156);
        assert_eq!(ORDERS[0], 1.0 + 1.0 / 10.0);
        assert_eq!(ORDERS[9], 2.0);
        assert_eq!(ORDERS[98], 10.9);
        assert_eq!(&ORDERS[99..102], &[11.0, 12.0, 13.0]);
        assert_eq!(&ORDERS[151..], &[63.0, 128.0, 256.0, 512.0, 1024.0]);
    }
}
